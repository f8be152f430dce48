"""Checks of user-given paths, before anything is written: a name that becomes one folder stays one
folder (no ``..``, no separators), and an output root is a writable folder."""
import os
from pathlib import Path

from utils.errors import UserError


def check_folder_name(value: str, flag: str) -> str:
    """``value`` used as (part of) one folder name: no path separators, no '..', not hidden."""
    bad = (not value or "/" in value or "\\" in value or value in (".", "..") or value.startswith(".")
           or any(ord(c) < 32 for c in value))
    if bad:
        raise UserError(f"{flag} {value!r}: expected a plain name (letters, digits, '-', '_', '.'), not a path; "
                        f"it becomes part of a folder name under the records folder")
    return value


def check_writable_root(path, flag: str) -> Path:
    """``path`` is, or can be created as, a folder this process can write into (nothing is created)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} exists and is not a folder")
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{flag} {path}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: cannot write into {existing} (permission denied or read-only)")
    return path


def inside(root, relative) -> Path:
    """``root / relative`` when it stays inside ``root`` (lexically: no '..' out of it, and an
    absolute path only if it is under ``root``); raises ValueError otherwise."""
    root = Path(os.path.normpath(root))
    full = Path(os.path.normpath(root / relative))
    if full != root and root not in full.parents:
        raise ValueError(f"{relative!r} is outside {root}")
    return full
