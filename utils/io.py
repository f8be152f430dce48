"""Atomic file writes: write to a temporary file in the same folder, then rename over the target."""
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import yaml


@contextmanager
def atomic_path(path):
    """Yield a temporary path beside ``path``; on success it is renamed to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path, text: str):
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path, obj, indent=2):
    write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def write_yaml(path, obj):
    write_text(path, yaml.safe_dump(obj, sort_keys=False))


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)
