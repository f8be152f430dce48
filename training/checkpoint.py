"""Checkpoints of the shared training loop.

Layout of one checkpoint, ``<run>/checkpoints/step_<N>/`` (written to a temporary folder, then
renamed into place, so a crash never leaves a half-written checkpoint under that name):

- ``trainable.safetensors``: the editor's ``trainable_state_dict()``; its metadata holds
  ``editor`` (the editor's name), ``backbone`` (full backbone name), ``dataset``, ``run``, ``step``
  and ``format``;
- ``training_state.pt``: what exact resume needs (step, data-order position, optimizer, scheduler
  and grad-scaler state, the displayed EMA loss, the RNG states of every process);
- ``config.yaml``: the run's resolved editor config and CLI arguments (as in the run folder).
"""
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from backbones.fingerprint import check_same_backbone
from utils.errors import UserError
from utils.io import write_yaml

WEIGHTS_FILE = "trainable.safetensors"
STATE_FILE = "training_state.pt"
CONFIG_FILE = "config.yaml"
FORMAT = "liveedit-suite-ckpt/1"


def checkpoint_dir(run_dir, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step}"


def _step_of(folder: Path) -> int:
    try:
        return int(folder.name.split("_", 1)[1])
    except (IndexError, ValueError):
        return -1


def resolve_checkpoint(path) -> Path:
    """A checkpoint folder from: that folder, its ``trainable.safetensors``, a run folder or its
    ``checkpoints/`` folder (the latest step). A missing or unrecognised path is a UserError."""
    p = Path(path)
    if p.is_file() and p.name == WEIGHTS_FILE:
        return p.parent
    if p.is_dir():
        if (p / WEIGHTS_FILE).is_file():
            return p
        folder = p / "checkpoints" if (p / "checkpoints").is_dir() else p
        steps = [d for d in folder.glob("step_*") if (d / WEIGHTS_FILE).is_file() and _step_of(d) >= 0]
        if steps:
            return max(steps, key=_step_of)
    what = "does not exist" if not p.exists() else "holds no checkpoint"
    raise UserError(f"checkpoint {str(path)!r} {what}; expected a checkpoint folder "
                    f"(.../checkpoints/step_<N>) holding {WEIGHTS_FILE}, that file, or a run folder")


def read_metadata(ckpt) -> dict:
    """The metadata of a checkpoint's trainable weights (``ckpt``: anything resolve_checkpoint takes)."""
    path = resolve_checkpoint(ckpt) / WEIGHTS_FILE
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError) as e:
        raise UserError(f"checkpoint weights {path} are unreadable: {e}") from None


def save_checkpoint(run_dir, step: int, weights: dict, metadata: dict, state: dict, config: dict) -> Path:
    """Write checkpoint ``step`` of ``run_dir`` atomically (replacing one of the same step)."""
    final = checkpoint_dir(run_dir, step)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    old = None
    try:
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in weights.items()}
        save_file(tensors, str(tmp / WEIGHTS_FILE),
                  metadata={"format": FORMAT, **{k: str(v) for k, v in metadata.items()}})
        torch.save(state, tmp / STATE_FILE)
        write_yaml(tmp / CONFIG_FILE, config)
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_training_state(ckpt) -> dict:
    path = resolve_checkpoint(ckpt) / STATE_FILE
    if not path.is_file():
        raise UserError(f"checkpoint {path.parent} has no {STATE_FILE}; it cannot be resumed")
    # Our own file: it holds numpy / python RNG states, which the weights-only unpickler refuses.
    return torch.load(path, map_location="cpu", weights_only=False)


def load_trained_weights(editor, ckpt_path) -> dict:
    """Load the trained weights of checkpoint ``ckpt_path`` into ``editor`` and return the
    checkpoint's metadata. The checkpoint must have been trained for the same editor and backbone;
    otherwise a UserError names both pairs."""
    ckpt = resolve_checkpoint(ckpt_path)
    meta = read_metadata(ckpt)
    want = (editor.name, editor.backbone.name)
    got = (meta.get("editor"), meta.get("backbone"))
    if got != want:
        raise UserError(f"checkpoint {ckpt} was trained for editor {got[0]!r} on backbone {got[1]!r}, "
                        f"but this run uses editor {want[0]!r} on backbone {want[1]!r}")
    if not getattr(editor, "trainable", False):
        raise UserError(f"editor {editor.name!r} is not trainable; it takes no -ckpt")
    check_same_backbone(f"checkpoint {ckpt}", meta.get("backbone_fingerprint"), editor.backbone.fingerprint)
    editor.load_trainable_state_dict(load_file(str(ckpt / WEIGHTS_FILE), device="cpu"))
    return meta
