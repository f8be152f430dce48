"""Editor configs: one YAML per editor x backbone under ``configs/<editor>/<backbone>.yaml``,
loaded strictly into typed dataclasses (an unknown or missing key is an error naming it)."""
import dataclasses
import typing
from pathlib import Path

import yaml

from utils.GLOBAL import ROOT_PATH
from utils.errors import UserError

CONFIG_DIR = ROOT_PATH / "configs"


def from_dict(cls, data: dict, where: str):
    """Build dataclass ``cls`` from ``data``; nested dataclass fields are built recursively."""
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a mapping for {cls.__name__}, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise UserError(f"{where}: unknown key {unknown[0]!r} for {cls.__name__}; known: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise UserError(f"{where}: missing key {name!r} for {cls.__name__}")
            continue
        value = data[name]
        if dataclasses.is_dataclass(hints[name]):
            value = from_dict(hints[name], value, f"{where}.{name}")
        kwargs[name] = value
    return cls(**kwargs)


def config_path(editor: str, backbone: str) -> Path:
    return CONFIG_DIR / editor / f"{backbone}.yaml"


def load_config(cls, editor: str, backbone: str, path=None):
    """Load the config of ``editor`` for ``backbone`` (or an explicit YAML ``path``)."""
    path = Path(path) if path else config_path(editor, backbone)
    if not path.exists():
        known = sorted(p.stem for p in (CONFIG_DIR / editor).glob("*.yaml"))
        raise UserError(f"no config {path} for editor {editor!r} on backbone {backbone!r}; "
                        f"configs exist for: {', '.join(known) or 'none'}")
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    return from_dict(cls, data, str(path))


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
