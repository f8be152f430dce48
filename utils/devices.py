"""Device flags, parsed in one place for every command (``-dvc``, ``-edvc``).

Accepted: ``cpu``; ``cuda`` (= ``cuda:0``); ``cuda:N``; a bare GPU index ``N`` (as the reference
scripts write it); and, where a backbone may be spread over all visible GPUs, ``auto``."""
import torch

from utils.errors import UserError


def default_device() -> str:
    return "cuda:0" if torch.cuda.is_available() else "cpu"


def parse_device(value: str, flag: str = "-dvc", allow_auto: bool = False) -> str:
    """The canonical device string of a flag value (``cpu``, ``cuda:N`` or ``auto``)."""
    v = str(value).strip().lower()
    if v.isdigit():
        return f"cuda:{int(v)}"
    if v == "cuda":
        return "cuda:0"
    if v == "cpu" or (v.startswith("cuda:") and v[5:].isdigit()):
        return v if v == "cpu" else f"cuda:{int(v[5:])}"
    if v == "auto" and allow_auto:
        return v
    expected = "cpu, cuda, cuda:N, a GPU index N" + (" or auto" if allow_auto else "")
    raise UserError(f"{flag}: unknown device {value!r}; expected {expected}")


def check_available(device: str, flag: str = "-dvc") -> str:
    """``device`` (canonical) if this machine has it; a CUDA device that is not there is a UserError."""
    if not device.startswith("cuda:"):
        return device
    if not torch.cuda.is_available():
        raise UserError(f"{flag} {device}: CUDA is not available on this machine; use -dvc cpu")
    index = int(device[5:])
    if index >= torch.cuda.device_count():
        raise UserError(f"{flag} {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def parse_device_list(value, flag: str = "-edvc") -> list[str] | None:
    """'none', empty, or a comma list ('1,2' or 'cuda:1,cuda:2'); also a list -> device strings or None."""
    if value is None:
        return None
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    items = [str(v).strip() for v in items if str(v).strip()]
    if not items or (len(items) == 1 and items[0].lower() == "none"):
        return None
    return [parse_device(v, flag) for v in items]
