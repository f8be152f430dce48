"""Pieces the baseline editors share: typed config checks, edited-state files (safetensors with the
owner in the metadata), memories that grow by doubling, a pool of training-split samples, and a
per-forward capture of one site's tensor for the site that follows it."""
import dataclasses
import json
import math
import typing
from pathlib import Path

import torch

from utils.errors import UserError
from utils.io import atomic_path


# ---- typed configs ------------------------------------------------------------------------------
def check_config(cfg, where: str) -> None:
    """Reject values of the wrong type, one line naming ``<where>.<key>`` (YAML reads ``1e-4``
    without a dot as a string; ``yes`` as a bool)."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value, hint = getattr(cfg, f.name), hints[f.name]
        options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, type(int | None)) else (hint,)
        if value is None and type(None) in options:
            continue
        if not any(_is(value, t) for t in options if t is not type(None)):
            hint_text = " (write floats with a dot, e.g. 1.0e-4)" if isinstance(value, str) else ""
            names = " or ".join("null" if t is type(None) else getattr(t, "__name__", str(t)) for t in options)
            raise UserError(f"{where}.{f.name}: expected {names}, got {value!r}{hint_text}")


def _is(value, t) -> bool:
    if t is bool:
        return isinstance(value, bool)
    if t is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if t is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if t is str:
        return isinstance(value, str)
    if typing.get_origin(t) is list:
        (item,) = typing.get_args(t)
        return isinstance(value, list) and all(_is(v, item) for v in value)
    return isinstance(value, t)


def require(ok: bool, where: str, expected: str, value) -> None:
    """A range check: ``UserError('<where>: expected <expected>, got <value>')`` unless ``ok``."""
    if not ok:
        raise UserError(f"{where}: expected {expected}, got {value!r}")


def resolve_layer(editor: str, layer: int, backbone) -> int:
    """A config's layer (negative counts from the top) -> 0-based index, or a UserError."""
    n = backbone.num_layers
    if not -n <= layer < n:
        raise UserError(f"{editor}: layer {layer} out of range for {backbone.name} with {n} decoder layers")
    return layer % n


# ---- edited state on disk -----------------------------------------------------------------------
def check_trained_state(state: dict, own: dict, editor: str, shapes: str, setup: str = "") -> None:
    """A checkpoint's trained tensors fit the editor's own (the same names and shapes), else one line
    naming the first differences; ``setup`` (e.g. " (layers [3, 4])") follows "this editor" when names
    differ, ``shapes`` describes the sizes that decide the shapes."""
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise UserError(f"{editor} checkpoint does not match this editor{setup}: missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}")
    for k, v in state.items():
        if v.shape != own[k].shape:
            raise UserError(f"{editor} checkpoint tensor {k!r} has shape {tuple(v.shape)}; this editor "
                            f"({shapes}) expects {tuple(own[k].shape)}")


def save_state_file(path: Path, tensors: dict[str, torch.Tensor], owner: dict, **extra) -> None:
    """Write ``tensors`` to a safetensors file whose metadata names its ``owner`` (editor, backbone
    and what else must match to load it) plus ``extra`` facts; written atomically."""
    from safetensors.torch import save_file

    meta = {k: str(v) for k, v in {**owner, **extra}.items()}
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def load_state_file(path: Path, owner: dict, names) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a file written by ``save_state_file``; its owner must equal ``owner`` (same keys: editor,
    backbone, then the rest) and it must hold every tensor in ``names``. -> (tensors, metadata)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{owner['editor']}: no edited state at {path}")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    saved = {k: meta.get(k) for k in owner}
    want = {k: str(v) for k, v in owner.items()}
    if saved != want or any(n not in tensors for n in names):
        def describe(o):
            rest = "".join(f" {k} {v}" for k, v in o.items() if k not in ("editor", "backbone"))
            return f"{o['editor']!r} on {o['backbone']!r}{rest}"
        raise UserError(f"edited state {path} belongs to editor {describe(saved)}, not {describe(want)}")
    return tensors, meta


# ---- growing memories ---------------------------------------------------------------------------
class GrowingRows:
    """Named float tensors with one row per entry, preallocated and grown by doubling, so appending
    is amortised O(1) (never a ``torch.cat`` of the whole pool). ``view(name)`` is the filled part.
    The one row storage of the editors: GRACE, T-Patcher, LEMoE and WISE use it as is; LiveEdit's
    expert repository and RECIPE's (and LTE's) memory hold one.

    The capacity is the initial one (a power of two) times a power of two. Storage is allocated with
    zeros, also when it grows: rows past ``len(self)`` are never read (``view`` stops there), so this
    changes no result; it keeps spare rows from holding uninitialised memory (possibly NaN) should a
    later change read the whole store, for a memset per growth of the same order as its copy."""

    def __init__(self, shapes: dict[str, tuple], device="cpu", dtype=torch.float32, initial_capacity: int = 16):
        if initial_capacity < 1 or initial_capacity & (initial_capacity - 1):
            raise ValueError(f"initial_capacity must be a power of two, got {initial_capacity}")
        self.shapes = {k: tuple(v) for k, v in shapes.items()}
        self.device, self.dtype = torch.device(device), dtype
        self.initial_capacity = initial_capacity
        self.clear()

    def clear(self) -> None:
        """Empty (storage shrinks back to the initial capacity)."""
        self.size = 0
        self._store = {k: torch.zeros((self.initial_capacity,) + s, device=self.device, dtype=self.dtype)
                       for k, s in self.shapes.items()}

    def __len__(self) -> int:
        return self.size

    @property
    def capacity(self) -> int:
        return next(iter(self._store.values())).shape[0]

    def reserve(self, n: int) -> None:
        """Room for ``n`` rows: the capacity doubles until it fits (the filled rows are copied)."""
        cap = self.capacity
        if n <= cap:
            return
        while cap < n:
            cap *= 2
        for k, old in self._store.items():
            new = torch.zeros((cap,) + old.shape[1:], device=self.device, dtype=self.dtype)
            new[:self.size] = old[:self.size]
            self._store[k] = new

    def append(self, **rows: torch.Tensor) -> int:
        """Append one entry (a tensor of each named shape); returns its index."""
        self.extend({k: t[None] for k, t in rows.items()})
        return self.size - 1

    def extend(self, rows: dict[str, torch.Tensor]) -> None:
        """Append ``n`` entries: ``rows[name]`` is ``[n, *shapes[name]]``, the same ``n`` for all."""
        n = self._count(rows, "GrowingRows", ValueError)
        self.reserve(self.size + n)
        for k, t in rows.items():
            self._store[k][self.size:self.size + n] = t.detach().to(self.device, self.dtype)
        self.size += n

    def _count(self, rows: dict[str, torch.Tensor], where, error) -> int:
        """The row count of ``rows`` (one tensor per name, each ``[n, *shape]``); else ``error``."""
        if set(rows) != set(self.shapes):
            raise error(f"{where}: expected tensors {sorted(self.shapes)}, got {sorted(rows)}")
        for k, t in rows.items():
            if t.dim() < 1 or tuple(t.shape[1:]) != self.shapes[k]:
                raise error(f"{where}: {k} has shape {tuple(t.shape)}, expected rows of shape {self.shapes[k]}")
        counts = {k: t.shape[0] for k, t in rows.items()}
        if len(set(counts.values())) != 1:
            raise error(f"{where}: row counts differ: {counts}")
        return next(iter(counts.values()))

    def truncate(self, n: int) -> None:
        """Keep the first ``n`` rows (storage is kept)."""
        if not 0 <= n <= self.size:
            raise ValueError(f"cannot truncate {self.size} rows to {n}")
        self.size = n

    def view(self, name: str) -> torch.Tensor:
        return self._store[name][:self.size]

    def set_row(self, name: str, i: int, value) -> None:
        if not 0 <= i < self.size:
            raise IndexError(f"row {i} of {self.size}")
        self._store[name][i] = torch.as_tensor(value, dtype=self.dtype).to(self.device)

    def row_bytes(self) -> int:
        """Bytes of one entry (all names)."""
        return sum(math.prod(s) * self._store[k].element_size() for k, s in self.shapes.items())

    def nbytes(self) -> int:
        """Bytes of the filled rows (what the entries hold, not the spare capacity)."""
        return self.size * self.row_bytes()

    def state(self) -> dict[str, torch.Tensor]:
        """The filled rows of every name, on the CPU, contiguous (ready to save)."""
        return {k: self.view(k).detach().cpu().contiguous() for k in self.shapes}

    def load(self, tensors: dict[str, torch.Tensor], where) -> None:
        """Replace the content by ``tensors`` (``[n, *shape]`` each, same ``n``); tensors of other
        names, shapes or row counts are a one-line UserError naming ``where`` (what was read)."""
        self._count(tensors, where, UserError)
        self.clear()
        self.extend(tensors)


# ---- a pool of training-split records -----------------------------------------------------------
def training_pool(datasets: list[str], n_per_dataset: int, data_dir=None):
    """The first ``n_per_dataset`` records of the *train* split of each dataset (never the evaluated
    split): what T-Patcher's memory and GRACE's radius calibration read."""
    from vl_datasets import load_dataset

    records = []
    for name in datasets:
        records.extend(load_dataset(name, "train", data_dir, limit=n_per_dataset))
    return records


def batched(items, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


# ---- per-forward capture ------------------------------------------------------------------------
class Capture:
    """Hands one site's tensor to a later site of the same forward: ``read`` (an identity layer edit)
    stores it, ``take`` returns and clears it. One is made per ``layer_edits()`` call, so nothing
    outlives the calls that use it and nothing is set on the model."""

    def __init__(self):
        self._x = None

    def read(self, x, batch):
        self._x = x
        return x

    def take(self):
        x, self._x = self._x, None
        if x is None:
            raise RuntimeError("Capture.take before read: the reading site did not run in this forward")
        return x


def dumps_list(items) -> str:
    return json.dumps(list(items), ensure_ascii=False)
