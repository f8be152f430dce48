"""Which editor and backbone a checkpoint belongs to, checked in one place.

A checkpoint is what ``train_vllm_editor.py`` writes (``training/checkpoint.py``: a folder
``.../checkpoints/step_<N>/`` holding ``trainable.safetensors``, or its run folder, meaning the latest
step), or any safetensors file, or a folder holding one. Its owner is read from the safetensors
metadata keys ``editor`` and ``backbone`` and from a ``config.yaml`` beside the weights that names
them (top-level keys ``editor`` / ``backbone``, or ``editor_name`` / ``edit_model_name``, possibly one
level down, e.g. under ``run:``); either may be missing, but when both name an owner they must agree.
The training loop writes these keys into ``trainable.safetensors``; editors that save an edited state
use ``editors.base.owner_metadata`` for theirs (``checkpoint_metadata`` here is the same function).

The editor config a checkpoint was trained with is the top-level ``editor_config`` of that
``config.yaml`` (the training loop writes it into every ``step_<N>/`` folder and into the run folder);
:func:`saved_editor_config` finds it, so evaluation builds the editor the checkpoint was trained as.
"""
from pathlib import Path

from editors.base import owner_metadata
from training.checkpoint import WEIGHTS_FILE, resolve_checkpoint
from utils.errors import UserError
from utils.io import read_yaml

# In a folder with several weight files, the first of these names that exists is the checkpoint.
PREFERRED_NAMES = ("checkpoint.safetensors", "editor.safetensors", "model.safetensors", "final.safetensors")
EDITOR_KEYS = ("editor", "editor_name")
BACKBONE_KEYS = ("backbone", "edit_model_name")


checkpoint_metadata = owner_metadata   # the name evaluation used first; editors.base owns it


def _training_layout(path: Path) -> Path | None:
    """The weights file of a checkpoint in the training loop's layout, if ``path`` is one."""
    if not (path / WEIGHTS_FILE).is_file() and not path.name == WEIGHTS_FILE \
            and not any(path.glob("step_*")) and not any(path.glob("checkpoints/step_*")):
        return None
    return resolve_checkpoint(path) / WEIGHTS_FILE


def find_weights(path) -> Path:
    """A checkpoint path (file or folder) -> its safetensors file."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint not found: {path}")
    weights = _training_layout(path)
    if weights is not None:
        return weights
    if path.is_file():
        if path.suffix != ".safetensors":
            raise UserError(f"checkpoint {path} is not a .safetensors file")
        return path
    files = sorted(path.glob("*.safetensors"))
    if len(files) == 1:
        return files[0]
    for name in PREFERRED_NAMES:
        if (path / name).is_file():
            return path / name
    if not files:
        raise UserError(f"checkpoint folder {path} holds no .safetensors file")
    raise UserError(f"checkpoint folder {path} holds several weight files ({', '.join(f.name for f in files)}); "
                    f"pass one of them with -ckpt")


def _pick(mapping: dict, keys) -> str | None:
    for key in keys:
        if isinstance(mapping.get(key), str):
            return mapping[key]
    return None


def _owner_from_config(config: Path):
    data = read_yaml(config, "checkpoint config")
    if not isinstance(data, dict):
        return None, None
    candidates = [data] + [v for v in data.values() if isinstance(v, dict)]
    editor = next((e for e in (_pick(c, EDITOR_KEYS) for c in candidates) if e), None)
    backbone = next((b for b in (_pick(c, BACKBONE_KEYS) for c in candidates) if b), None)
    return editor, backbone


def checkpoint_owner(path) -> tuple[str, str, Path]:
    """-> (editor name, backbone name, weights file) of the checkpoint at ``path``."""
    from safetensors import safe_open

    weights = find_weights(path)
    try:
        with safe_open(str(weights), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for a corrupt header
        raise UserError(f"checkpoint {weights} is not a readable safetensors file ({e})") from None
    editor, backbone = meta.get("editor"), meta.get("backbone")
    config = weights.parent / "config.yaml"
    if config.is_file():
        c_editor, c_backbone = _owner_from_config(config)
        conflicts = [f"{key} {a!r} in its weights' metadata but {b!r} in {config}"
                     for key, a, b in (("editor", editor, c_editor), ("backbone", backbone, c_backbone))
                     if a is not None and b is not None and not _same_owner(key, a, b)]
        if conflicts:
            raise UserError(f"checkpoint {weights} names two owners: {'; '.join(conflicts)}; refusing it")
        editor, backbone = editor or c_editor, backbone or c_backbone
    if editor is None or backbone is None:
        raise UserError(f"cannot tell which editor and backbone checkpoint {weights} belongs to: no safetensors "
                        f"metadata keys 'editor'/'backbone' and no config.yaml beside it naming them")
    return editor, backbone, weights


def _same_owner(key: str, a: str, b: str) -> bool:
    if key == "editor":
        return a == b
    from backbones import resolve_backbone_name
    canonical = []
    for name in (a, b):
        try:
            canonical.append(resolve_backbone_name(name))
        except UserError:
            canonical.append(name)
    return canonical[0] == canonical[1]


def saved_editor_config(weights: Path) -> tuple[dict | None, Path | None]:
    """-> (``editor_config`` mapping, the config.yaml holding it) saved with the checkpoint whose
    weights file is ``weights``, or ``(None, None)`` when there is none. Looked up in the
    ``config.yaml`` beside the weights, then (training layout ``<run>/checkpoints/step_<N>/``) in the
    run folder's ``config.yaml``. An unreadable config.yaml is a UserError."""
    weights = Path(weights)
    candidates = [weights.parent / "config.yaml"]
    if weights.parent.parent.name == "checkpoints":
        candidates.append(weights.parent.parent.parent / "config.yaml")
    for config in candidates:
        if not config.is_file():
            continue
        data = read_yaml(config, "checkpoint config")
        if isinstance(data, dict) and isinstance(data.get("editor_config"), dict):
            return data["editor_config"], config
    return None, None


def check_checkpoint(path, editor: str, backbone: str) -> Path:
    """Check that the checkpoint at ``path`` was trained for ``editor`` on ``backbone`` (aliases
    allowed on both sides); returns its weights file. A mismatch is a UserError naming both."""
    from backbones import resolve_backbone_name

    owner_editor, owner_backbone, weights = checkpoint_owner(path)
    try:
        owner_full = resolve_backbone_name(owner_backbone)
    except UserError:
        owner_full = owner_backbone
    if owner_editor != editor or owner_full != resolve_backbone_name(backbone):
        raise UserError(f"checkpoint {weights} belongs to editor {owner_editor!r} on backbone {owner_backbone!r}, "
                        f"not editor {editor!r} on backbone {backbone!r}")
    return weights


def load_checkpoint(editor_obj, weights: Path) -> None:
    """Load the trained weights of a checked checkpoint (see :func:`check_checkpoint`) into an editor."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    from backbones.fingerprint import check_same_backbone
    try:
        with safe_open(str(weights), framework="pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError) as e:
        raise UserError(f"checkpoint weights {weights} are unreadable: {e}") from None
    check_same_backbone(f"checkpoint {weights}", meta.get("backbone_fingerprint"), editor_obj.backbone.fingerprint)
    editor_obj.load_trainable_state_dict(state)
