"""Helpers shared by the LEMoE and WISE editors (WISE imports them from here):

- ``query_mask`` / ``query_mean``: the positions a routing decision may read (image + prompt, never the
  teacher-forced target, never padding) and a masked mean over them;
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
