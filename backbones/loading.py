"""Loading a local Hugging Face folder onto one device or, with ``auto``, across all visible GPUs."""
import logging
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoProcessor

from utils.devices import check_available, parse_device
from utils.errors import UserError


def resolve_device(device: str):
    """A device flag value (``utils.devices``: cpu, cuda:N, N or auto) -> (device for .to() or None,
    device_map or None)."""
    device = check_available(parse_device(device, "device", allow_auto=True), "device")
    if device == "auto":
        return ("cpu", None) if not torch.cuda.is_available() else (None, "auto")
    return device, None


def check_model_folder(path) -> Path:
    """``path`` looks like a Hugging Face model folder (has config.json); checked before a run writes."""
    path = Path(path)
    if not (path / "config.json").is_file():
        what = "does not exist" if not path.exists() else "has no config.json"
        raise UserError(f"no model at {path} ({what}); point utils/GLOBAL.py model_path_map "
                        f"at your local weights or pass --model_path")
    return path


def default_dtype(device: str) -> torch.dtype:
    """The frozen backbone's dtype when none is asked for: float32 on the CPU; on GPUs bfloat16 where
    supported (gradients that editors backpropagate through the frozen layers keep float32's
    exponent range), else float16 (trainers then scale the loss: ``training/precision.py``)."""
    if device == "cpu" or not torch.cuda.is_available():
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def load_pretrained(model_class, path, device="cpu", dtype=None):
    """Load model and processor from a local folder; returns (model in eval mode, processor)."""
    path = check_model_folder(path)
    target, device_map = resolve_device(device)
    if dtype is None:
        dtype = default_dtype("cpu" if target == "cpu" else "cuda")
    # Quiet the expected "no torchvision, using the PIL image processor" notices.
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        model = model_class.from_pretrained(path, dtype=dtype, device_map=device_map)
        processor = AutoProcessor.from_pretrained(path)
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:   # missing, corrupt or mismatched files
        raise UserError(f"cannot load {model_class.__name__} from {path}: {e}") from None
    if target is not None:
        model = model.to(target)
    return model.eval(), processor
