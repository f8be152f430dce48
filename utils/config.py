"""Editor configs: one YAML per editor x backbone under ``configs/<editor>/<backbone>.yaml``, loaded
strictly into typed dataclasses: an unknown or missing key, or a value of the wrong type (e.g.
``lr: 1e-4``, which YAML reads as a string), is a UserError naming the file and the key. Every editor's
config gets this for free; value ranges stay with the config class (``__post_init__``)."""
import dataclasses
import math
import types
import typing
from pathlib import Path

from utils.GLOBAL import ROOT_PATH
from utils.errors import UserError
from utils.io import read_yaml

CONFIG_DIR = ROOT_PATH / "configs"


def _type_name(hint) -> str:
    if hint is type(None):
        return "null"
    if isinstance(hint, type):
        return hint.__name__
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    return str(hint).replace("typing.", "")


def _matches(value, hint) -> bool:
    """Whether ``value`` (as read from YAML) fits type ``hint``; hints this does not know pass."""
    if hint is typing.Any:
        return True
    if hint is type(None) or hint is None:
        return value is None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if origin in (list, tuple, set, frozenset, typing.Sequence):
        if not isinstance(value, list):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args))
        return not args or all(_matches(v, args[0]) for v in value)
    if origin is dict:
        if not isinstance(value, dict):
            return False
        return not args or all(_matches(k, args[0]) and _matches(v, args[1]) for k, v in value.items())
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:   # an int is a fine float (lr_cut_factor: 10); nan / inf are not
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    if isinstance(hint, type) and hint in (list, dict):
        return isinstance(value, hint)
    return True


def check_value(value, hint, where: str) -> None:
    """A UserError naming ``where`` when ``value`` does not fit ``hint``."""
    if _matches(value, hint):
        return
    hint_text = ""
    if isinstance(value, str) and _matches(1.0, hint):
        hint_text = " (a string: write numbers without quotes, floats with a dot, e.g. 1.0e-4)"
    raise UserError(f"{where}: expected {_type_name(hint)}, got {value!r}{hint_text}")


def from_dict(cls, data: dict, where: str):
    """Build dataclass ``cls`` from ``data``, checking every key and value type; nested dataclass
    fields are built recursively."""
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a mapping for {cls.__name__}, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields), key=str)
    if unknown:
        raise UserError(f"{where}: unknown key {unknown[0]!r} for {cls.__name__}; known: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise UserError(f"{where}: missing key {name!r} for {cls.__name__}")
            continue
        value, hint = data[name], hints[name]
        if dataclasses.is_dataclass(hint):
            value = from_dict(hint, value, f"{where}.{name}")
        else:
            check_value(value, hint, f"{where}.{name}")
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
    if not path.is_file():
        raise UserError(f"config {path} is not a file")
    data = read_yaml(path, "editor config")
    return from_dict(cls, {} if data is None else data, str(path))


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def overrides_suffix(overrides) -> str:
    """A run-name suffix that tells evaluations with ``--set`` overrides apart ('' without any)."""
    import hashlib
    return "-set" + hashlib.sha256("\n".join(overrides).encode()).hexdigest()[:8] if overrides else ""


def with_overrides(cls, cfg, overrides) -> tuple:
    """``cfg`` with ``KEY=VALUE`` overrides (``KEY`` dotted for nested sections, ``VALUE`` read as
    YAML), type-checked like a config file: (new config, [(key, old value, new value)])."""
    import yaml
    data, changed = to_dict(cfg), []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. threshold=12.0 or train.lr=1.0e-4")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            raise UserError(f"--set {item!r}: {text!r} is not a YAML value") from None
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise UserError(f"--set {item!r}: {cls.__name__} has no section {part!r}")
            node = node[part]
        if leaf not in node:
            raise UserError(f"--set {item!r}: unknown key {key!r} for {cls.__name__}; known: {', '.join(node)}")
        changed.append((key, node[leaf], value))
        node[leaf] = value
    return from_dict(cls, data, "--set"), changed
