"""A backbone's identity beyond its name: a digest of its config and weight files.

A tiny backbone is rebuilt when the world or the pretraining recipe changes, and a user may swap the
weights behind a name; a checkpoint, a saved edited state or a finished evaluation made on another
build must then not be used silently. ``backbone_fingerprint(folder)`` hashes ``config.json`` and
every weight file (``*.safetensors``, ``*.bin``, ``*.pth``) of the folder. Hashing a 7B model
takes a while, so the result is cached in ``<folder>/.backbone_fingerprint.json`` together with the
names, sizes and modification times of the files it covers; any change of those recomputes it.
"""
import hashlib
import json
from pathlib import Path

CACHE = ".backbone_fingerprint.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth")


def _files(folder: Path) -> list[Path]:
    files = [p for p in sorted(folder.iterdir()) if p.is_file()
             and (p.name == "config.json" or p.suffix in WEIGHT_SUFFIXES)]
    return files


def _stat_key(files: list[Path]) -> list:
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def backbone_fingerprint(folder) -> str | None:
    """16 hex digits identifying the weights in ``folder`` (None when it holds no config.json)."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        return None
    files = _files(folder)
    key = _stat_key(files)
    cache = folder / CACHE
    try:
        cached = json.loads(cache.read_text())
        if cached.get("files") == key:
            return cached["fingerprint"]
    except (OSError, ValueError, KeyError, AttributeError):
        pass
    digest = hashlib.sha256()
    for p in files:
        digest.update(p.name.encode() + b"\0")
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
    fingerprint = digest.hexdigest()[:16]
    try:  # a read-only weights folder is fine: the digest is just not cached
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps({"fingerprint": fingerprint, "files": key}))
        tmp.replace(cache)
    except OSError:
        pass
    return fingerprint


def check_same_backbone(what: str, recorded: str | None, current: str | None) -> None:
    """Refuse ``what`` (a checkpoint, a saved state) made on another build of the backbone. A record
    without a fingerprint (made before fingerprints existed) or a backbone without one is let through."""
    from utils.errors import UserError
    if recorded and current and recorded != current:
        raise UserError(f"{what} was made on backbone build {recorded}, but the backbone loaded now is build "
                        f"{current} (its weights changed, e.g. a tiny backbone rebuilt); retrain or redo it on this build")
