"""Loading a local Hugging Face folder onto one device or, with ``auto``, across all visible GPUs."""
import logging
from pathlib import Path

import torch
from transformers import AutoProcessor

from utils.errors import UserError


def resolve_device(device: str):
    """'cpu', 'cuda:N' or 'auto' -> (device for .to() or None, device_map or None)."""
    if device == "auto":
        if not torch.cuda.is_available():
            return "cpu", None
        return None, "auto"
    if device == "cpu":
        return "cpu", None
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"device {device!r} requested but CUDA is not available; use -dvc cpu")
        return device, None
    raise UserError(f"unknown device {device!r}; expected cpu, cuda:N or auto")


def default_dtype(device: str) -> torch.dtype:
    """The frozen backbone's dtype when none is asked for: float32 on the CPU; on GPUs bfloat16 where
    supported (gradients that editors backpropagate through the frozen layers keep float32's
    exponent range), else float16 (trainers then scale the loss: ``training/precision.py``)."""
    if device == "cpu" or not torch.cuda.is_available():
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def load_pretrained(model_class, path, device="cpu", dtype=None):
    """Load model and processor from a local folder; returns (model in eval mode, processor)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise UserError(f"no model at {path} (config.json missing); point utils/GLOBAL.py model_path_map "
                        f"at your local weights or pass --model_path")
    target, device_map = resolve_device(device)
    if dtype is None:
        dtype = default_dtype("cpu" if target == "cpu" else "cuda")
    # Quiet the expected "no torchvision, using the PIL image processor" notices.
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        model = model_class.from_pretrained(path, dtype=dtype, device_map=device_map)
        processor = AutoProcessor.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load {model_class.__name__} from {path}: {e}") from None
    if target is not None:
        model = model.to(target)
    return model.eval(), processor
