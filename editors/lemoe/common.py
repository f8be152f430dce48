"""Helpers shared by the LEMoE and WISE editors (WISE imports them from here):

- ``query_mask`` / ``query_mean``: the positions a routing decision may read (image + prompt, never the
  teacher-forced target, never padding) and a masked mean over them;
- ``GrowingStack``: preallocated per-row storage that doubles when full (appending is amortised O(1));
- ``IrrelevantPool``: unrelated samples (the locality samples of a dataset's *train* split) for the
  terms that teach an edit to stay off unrelated inputs; never evaluation or validation records;
- ``save_edited_state`` / ``load_edited_state``: an edited state as one safetensors file plus one JSON
  file that carries a fingerprint (editor, backbone, layer, shapes, config) checked on load;
- ``check_fields``: type and range checks of a config dataclass, as one-line ``UserError`` s naming the key.
"""
import dataclasses
import json
import types
import typing
from pathlib import Path

import torch

from backbones.base import VLBatch
from utils.errors import UserError
from utils.io import atomic_path, read_json, write_json


# ---- routing queries ---------------------------------------------------------------------------
def query_mask(batch: VLBatch, length: int | None = None) -> torch.Tensor:
    """[B, L] bool: the positions before each sample's target (image and prompt tokens, with the
    backbone's template tokens around them). Identical whether the batch was encoded with or without
    targets, and for the longer batches of greedy generation (the prompt range does not move)."""
    L = batch.inputs_embeds.shape[1] if length is None else length
    pos = torch.arange(L, device=batch.prompt_range.device)
    return pos[None] < batch.prompt_range[:, 1:]


def query_mean(x: torch.Tensor, batch: VLBatch) -> torch.Tensor:
    """Mean of ``x`` [B, L, ...] over each sample's query positions -> [B, ...] (padding never enters)."""
    m = query_mask(batch, x.shape[1]).to(x.dtype)
    m = m.reshape(m.shape + (1,) * (x.dim() - 2))
    return (x * m).sum(1) / m.sum(1).clamp(min=1)


# ---- growing storage ---------------------------------------------------------------------------
class GrowingStack:
    """Named tensors with one row per item, preallocated and grown by doubling (never a ``torch.cat``
    of the whole pool per append). ``view(name)`` is the filled part."""

    def __init__(self, shapes: dict[str, tuple], device, dtype=torch.float32, initial_capacity: int = 4):
        self.shapes = {k: tuple(v) for k, v in shapes.items()}
        self.device, self.dtype = torch.device(device), dtype
        self.initial_capacity = initial_capacity
        self.clear()

    def clear(self) -> None:
        self.size = 0
        self._store = {k: torch.zeros((self.initial_capacity,) + s, device=self.device, dtype=self.dtype)
                       for k, s in self.shapes.items()}

    def __len__(self) -> int:
        return self.size

    @property
    def capacity(self) -> int:
        return next(iter(self._store.values())).shape[0]

    def _reserve(self, n: int) -> None:
        cap = self.capacity
        if n <= cap:
            return
        while cap < n:
            cap *= 2
        for k, old in self._store.items():
            new = torch.zeros((cap,) + old.shape[1:], device=self.device, dtype=self.dtype)
            new[:self.size] = old[:self.size]
            self._store[k] = new

    def append(self, rows: dict[str, torch.Tensor]) -> None:
        """Append one item: ``rows[name]`` has shape ``shapes[name]``."""
        if set(rows) != set(self.shapes):
            raise ValueError(f"expected tensors {sorted(self.shapes)}, got {sorted(rows)}")
        for k, t in rows.items():
            if tuple(t.shape) != self.shapes[k]:
                raise ValueError(f"{k} has shape {tuple(t.shape)}, expected {self.shapes[k]}")
        self._reserve(self.size + 1)
        for k, t in rows.items():
            self._store[k][self.size] = t.detach().to(self.device, self.dtype)
        self.size += 1

    def truncate(self, n: int) -> None:
        if not 0 <= n <= self.size:
            raise ValueError(f"cannot truncate {self.size} items to {n}")
        self.size = n

    def view(self, name: str) -> torch.Tensor:
        return self._store[name][:self.size]

    def row_bytes(self) -> int:
        return sum(int(torch.Size(s).numel()) * self._store[k].element_size() for k, s in self.shapes.items())

    def nbytes(self) -> int:
        """Bytes of the filled rows (what the items hold, not the spare capacity)."""
        return self.size * self.row_bytes()

    def state(self) -> dict[str, torch.Tensor]:
        return {k: self.view(k).detach().cpu().contiguous() for k in self.shapes}

    def load(self, tensors: dict[str, torch.Tensor], where) -> None:
        sizes = {t.shape[0] for t in tensors.values()}
        if set(tensors) != set(self.shapes) or len(sizes) != 1:
            raise UserError(f"{where}: expected tensors {sorted(self.shapes)} with one row count, "
                            f"got {sorted(tensors)}")
        for k, t in tensors.items():
            if tuple(t.shape[1:]) != self.shapes[k]:
                raise UserError(f"{where}: {k} has rows of shape {tuple(t.shape[1:])}, expected {self.shapes[k]}")
        self.clear()
        n = sizes.pop()
        self._reserve(max(n, 1))
        for k, t in tensors.items():
            self._store[k][:n] = t.to(self.device, self.dtype)
        self.size = n


# ---- unrelated samples -------------------------------------------------------------------------
class IrrelevantPool:
    """The text and image locality samples (with their answers as targets) of the first ``size``
    records of ``dataset``'s **train** split (real datasets: without the val slice), loaded on first use.
    Draws are made with a caller-seeded generator, so a run (and a resumed run) draws the same."""

    def __init__(self, dataset: str, data_dir: str | None, size: int):
        self.dataset, self.data_dir, self.size = dataset, data_dir, size
        self._samples = None

    @classmethod
    def of(cls, samples) -> "IrrelevantPool":
        """A pool of the given samples (tests, or a caller that has its own unrelated samples)."""
        pool = cls("<given>", None, max(1, len(samples)))
        pool._samples = list(samples)
        return pool

    @property
    def samples(self):
        if self._samples is None:
            from vl_datasets import load_dataset
            records = load_dataset(self.dataset, "train", Path(self.data_dir) if self.data_dir else None,
                                   limit=self.size)
            self._samples = [s for r in records for s in (r.text_loc, r.image_loc)]
            if not self._samples:
                raise UserError(f"irrelevant_dataset {self.dataset!r}: its train split has no records")
        return self._samples

    def draw(self, k: int, seed: int) -> list:
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(self.samples), generator=g)[:k]
        return [self.samples[i] for i in idx.tolist()]


def item_seed(seed: int, index: int, salt: int = 0) -> int:
    """A per-item seed (expert, shard, edit) derived from the config seed."""
    return (seed * 1_000_003 + index * 7_919 + salt) % (2 ** 62)


# ---- edited state on disk ------------------------------------------------------------------------
def save_edited_state(directory, stem: str, tensors: dict, fingerprint: dict, extra: dict) -> None:
    """Write ``<stem>.safetensors`` (the tensors) and ``<stem>.json`` (fingerprint and ``extra``)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    with atomic_path(directory / f"{stem}.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"format": fingerprint.get("format", "")})
    write_json(directory / f"{stem}.json", {**fingerprint, **extra}, indent=None)


def load_edited_state(directory, stem: str, fingerprint: dict, editor: str):
    """-> (tensors, meta) saved by ``save_edited_state``; a missing state, or one whose fingerprint
    differs from ``fingerprint``, is a UserError naming the first difference."""
    from safetensors.torch import load_file

    directory = Path(directory)
    files = directory / f"{stem}.safetensors", directory / f"{stem}.json"
    if not all(f.is_file() for f in files):
        raise UserError(f"{editor}: no edited state at {directory} ({files[0].name}, {files[1].name})")
    meta = read_json(files[1])
    for key, value in fingerprint.items():
        if meta.get(key) != json.loads(json.dumps(value)):
            raise UserError(f"{editor}: edited state {directory} has {key} = {meta.get(key)!r}, "
                            f"this editor has {value!r}")
    return load_file(str(files[0])), meta


# ---- config checks -----------------------------------------------------------------------------
def _allowed(hint) -> tuple:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return tuple(a for h in typing.get_args(hint) for a in _allowed(h))
    return (hint,)


def _matches(value, allowed) -> bool:
    for t in allowed:
        if t is type(None) and value is None:
            return True
        if t is bool and isinstance(value, bool):
            return True
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return True
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        if t is str and isinstance(value, str):
            return True
    return False


def check_fields(cfg, editor: str, ranges: dict) -> None:
    """Every field of ``cfg`` has its annotated type; ``ranges[key] = (predicate, "what it must be")``
    holds for each non-null value. Floats given as ints become floats."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        allowed = _allowed(hints[f.name])
        if not _matches(value, allowed):
            names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
            raise UserError(f"{editor} config: {f.name} must be {names}, got {value!r}")
        if float in allowed and isinstance(value, int) and not isinstance(value, bool):
            object.__setattr__(cfg, f.name, float(value))
    for key, (ok, what) in ranges.items():
        value = getattr(cfg, key)
        if value is not None and not ok(value):
            raise UserError(f"{editor} config: {key} must be {what}, got {value!r}")
