"""Checkpoints of the shared training loop.

Layout of one checkpoint, ``<run>/checkpoints/step_<N>/`` (written to a temporary folder, then
renamed into place, so a crash never leaves a half-written checkpoint under that name):

- ``trainable.safetensors``: the editor's ``trainable_state_dict()``; its metadata holds
  ``editor`` (the editor's name), ``backbone`` (full backbone name), ``dataset``, ``run``, ``step``,
  ``format`` and ``log_sha256`` (see ``training/runlog.py``);
- ``training_state.pt``: what exact resume needs (step, data-order position, optimizer, scheduler
  and grad-scaler state, the displayed EMA loss, the RNG states of every process, ``log_sha256``);
- ``config.yaml``: the run's resolved editor config and CLI arguments (as in the run folder).

The latest checkpoint of a run is the highest step that agrees with the run's log.
"""
import pickle
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from backbones.fingerprint import check_same_backbone
from training import runlog
from utils.errors import UserError
from utils.io import atomic_dir, write_yaml

WEIGHTS_FILE = "trainable.safetensors"
STATE_FILE = "training_state.pt"
CONFIG_FILE = "config.yaml"
FORMAT = "liveedit-suite-ckpt/1"


def run_backbone_fingerprint(run_dir) -> str | None:
    """The backbone fingerprint a training run recorded in its config.yaml (None if it has none)."""
    import yaml
    try:
        saved = yaml.safe_load((Path(run_dir) / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    value = saved.get("backbone_fingerprint") if isinstance(saved, dict) else None
    return None if value in (None, "None") else str(value)


def checkpoint_dir(run_dir, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step}"


def _step_of(folder: Path) -> int:
    try:
        return int(folder.name.split("_", 1)[1])
    except (IndexError, ValueError):
        return -1


def is_checkpoint_folder(path) -> bool:
    """``path`` names one checkpoint (its folder or its weights file), not a run folder."""
    p = Path(path)
    return (p.is_file() and p.name == WEIGHTS_FILE) or (p.is_dir() and (p / WEIGHTS_FILE).is_file())


def run_of(ckpt: Path) -> Path | None:
    """The run folder of a checkpoint in the training layout (``<run>/checkpoints/step_<N>``)."""
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else None


def _metadata(weights: Path) -> dict:
    try:
        with safe_open(str(weights), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError) as e:
        raise UserError(f"checkpoint weights {weights} are unreadable: {e}") from None


def checkpoint_agrees(ckpt: Path, log_lines=None) -> bool:
    """Whether checkpoint ``ckpt`` agrees with its run's log (``training/runlog.py``); ``log_lines``:
    the log as read by ``runlog.read_lines``, read here when not given."""
    run = run_of(ckpt)
    if log_lines is None and run is not None and runlog.log_path(run).is_file():
        log_lines = runlog.read_lines(runlog.log_path(run))
    return runlog.agrees(log_lines, _step_of(ckpt), _metadata(ckpt / WEIGHTS_FILE).get("log_sha256"))


def latest_checkpoint(folder: Path) -> Path | None:
    """The highest-step checkpoint under a run folder or its ``checkpoints/`` folder that agrees
    with the run's log; None when there is none."""
    folder = folder / "checkpoints" if (folder / "checkpoints").is_dir() else folder
    steps = sorted((d for d in folder.glob("step_*") if (d / WEIGHTS_FILE).is_file() and _step_of(d) >= 0),
                   key=_step_of, reverse=True)
    if not steps:
        return None
    log = runlog.log_path(folder.parent)
    lines = runlog.read_lines(log) if folder.name == "checkpoints" and log.is_file() else None
    return next((d for d in steps if checkpoint_agrees(d, lines)), None)


def resolve_checkpoint(path) -> Path:
    """A checkpoint folder from: that folder, its ``trainable.safetensors``, a run folder or its
    ``checkpoints/`` folder (the latest step that agrees with the run's log). A missing or
    unrecognised path is a UserError."""
    p = Path(path)
    if p.is_file() and p.name == WEIGHTS_FILE:
        return p.parent
    if p.is_dir():
        if (p / WEIGHTS_FILE).is_file():
            return p
        latest = latest_checkpoint(p)
        if latest is not None:
            return latest
        if any(p.glob("step_*")) or any(p.glob("checkpoints/step_*")):
            raise UserError(f"checkpoint {str(path)!r}: no checkpoint there agrees with the run's log "
                            f"{runlog.LOG_FILE}; give one checkpoint folder (.../checkpoints/step_<N>)")
    what = "does not exist" if not p.exists() else "holds no checkpoint"
    raise UserError(f"checkpoint {str(path)!r} {what}; expected a checkpoint folder "
                    f"(.../checkpoints/step_<N>) holding {WEIGHTS_FILE}, that file, or a run folder")


def read_metadata(ckpt) -> dict:
    """The metadata of a checkpoint's trainable weights (``ckpt``: anything resolve_checkpoint takes)."""
    return _metadata(resolve_checkpoint(ckpt) / WEIGHTS_FILE)


def save_checkpoint(run_dir, step: int, weights: dict, metadata: dict, state: dict, config: dict) -> Path:
    """Write checkpoint ``step`` of ``run_dir`` atomically (replacing one of the same step)."""
    final = checkpoint_dir(run_dir, step)
    with atomic_dir(final) as tmp:
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in weights.items()}
        save_file(tensors, str(tmp / WEIGHTS_FILE),
                  metadata={"format": FORMAT, **{k: str(v) for k, v in metadata.items()}})
        torch.save(state, tmp / STATE_FILE)
        write_yaml(tmp / CONFIG_FILE, config)
    return final


def load_training_state(ckpt) -> dict:
    path = resolve_checkpoint(ckpt) / STATE_FILE
    if not path.is_file():
        raise UserError(f"checkpoint {path.parent} has no {STATE_FILE}; it cannot be resumed")
    # Our own file: it holds numpy / python RNG states, which the weights-only unpickler refuses.
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as e:
        raise UserError(f"training state {path} is unreadable (truncated or corrupt: "
                        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}); resume from another "
                        f"checkpoint of the run") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise UserError(f"training state {path} is not a training state of this suite (no step)")
    return state


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
    try:
        weights = load_file(str(ckpt / WEIGHTS_FILE), device="cpu")
    except (SafetensorError, OSError) as e:
        raise UserError(f"checkpoint weights {ckpt / WEIGHTS_FILE} are unreadable: {e}") from None
    editor.load_trainable_state_dict(weights)
    return meta
