"""Files, written in one way everywhere: atomically (a temporary file or folder beside the target,
then a rename, so a crash never leaves a half-written file under the real name) and with the modes
the umask asks for (``mkstemp`` / ``mkdtemp`` alone would force 0600 / 0700, so a shared group could
not read results). Reading helpers turn an unreadable, non-UTF-8 or malformed file into one
``UserError`` naming the file."""
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import yaml

from utils.errors import UserError, describe_os_error, one_line


def current_umask() -> int:
    """The process umask, read without changing it (os.umask can only be read by setting it, which
    would race with other threads creating files)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    return 0o777 & ~current_umask()


def _honour_umask(root: Path) -> None:
    """Give ``root`` (a file, or a folder and everything in it) the modes the umask asks for: some
    writers (safetensors) create their files 0600 whatever the umask."""
    fmode, dmode = file_mode(), dir_mode()
    if root.is_dir():
        os.chmod(root, dmode)
        for folder, dirs, files in os.walk(root):
            for d in dirs:
                os.chmod(os.path.join(folder, d), dmode)
            for f in files:
                os.chmod(os.path.join(folder, f), fmode)
    else:
        os.chmod(root, fmode)


@contextmanager
def atomic_path(path):
    """Yield a temporary path beside ``path``; on success it is renamed to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        _honour_umask(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def atomic_dir(path):
    """Yield a new temporary folder beside ``path``; on success it takes the name ``path``. A folder
    already there is moved aside first and removed after the rename, so ``path`` always names either
    the old or the new complete folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    old = None
    try:
        yield tmp
        _honour_umask(tmp)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def remove_temporaries(folder, name: str | None = None) -> list[Path]:
    """Remove what interrupted atomic writes left in ``folder`` (``.<name>.<random>.tmp`` and
    ``.<name>.<random>.old``), only those of target ``name`` when given; returns what was removed.
    Call it only while no other process can be writing them (e.g. holding the folder's run lock)."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    prefix = f".{name}." if name else "."
    for p in folder.iterdir():
        if p.name.startswith(prefix) and p.name.endswith((".tmp", ".old")) and p.name.count(".") >= 3:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def write_text(path, text: str):
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path, obj, indent=2):
    write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def write_yaml(path, obj):
    write_text(path, yaml.safe_dump(obj, sort_keys=False))


def read_text(path, what: str = "file") -> str:
    """The UTF-8 text of ``path``; a missing, unreadable or non-UTF-8 file is a UserError naming it."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{what} {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise UserError(f"cannot read {what} {describe_os_error(e)}") from None


def read_json(path, what: str = "file"):
    text = read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{what} {path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None


def read_yaml(path, what: str = "file"):
    text = read_text(path, what)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        raise UserError(f"{what} {path} is not valid YAML ({where}{one_line(problem)})") from None
