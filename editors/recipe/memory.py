"""A growing edit memory: named per-edit tensors in a ``GrowingRows`` (preallocated storage that
doubles when full: an append is amortised O(1), never a ``torch.cat`` of the pool), plus one request
dict per edit (prompt, target, image path). Saved as ``memory.safetensors`` + ``memory.json`` with a
fingerprint of what the stored tensors depend on (editor, backbone, trained weights); loading checks
it. Used by RECIPE (keys and prompt tokens) and LTE (retrieval keys; the prefixes are re-embedded from
the requests)."""
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from editors.common import GrowingRows
from utils.errors import UserError
from utils.io import atomic_path, read_json, write_json

TENSORS_FILE = "memory.safetensors"
META_FILE = "memory.json"


class GrowingMemory:
    def __init__(self, shapes: dict[str, tuple], device="cpu", dtype=torch.float32, initial_capacity: int = 16):
        self.rows = GrowingRows(shapes, device, dtype, initial_capacity)
        self.shapes = self.rows.shapes
        self.requests: list[dict] = []

    def clear(self) -> None:
        """Empty the memory (storage shrinks back to the initial capacity)."""
        self.rows.clear()
        self.requests = []

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def capacity(self) -> int:
        return self.rows.capacity

    def append(self, tensors: dict[str, torch.Tensor], requests: list[dict]) -> None:
        """Append ``n`` entries: each named tensor ``[n, *shape]``, one request dict each."""
        counts = {name: tuple(t.shape[:1]) for name, t in tensors.items()}
        if any(c != (len(requests),) for c in counts.values()):
            raise ValueError(f"memory: {len(requests)} requests but rows {counts}")
        self.rows.extend(tensors)
        self.requests.extend(dict(r) for r in requests)

    def tensor(self, name: str) -> torch.Tensor:
        """The first ``len(self)`` entries of ``name`` (a view, no copy)."""
        return self.rows.view(name)

    def nbytes(self) -> int:
        """Bytes of the stored tensors of the current entries (not the spare capacity)."""
        return self.rows.nbytes()

    # ---- persistence ----------------------------------------------------------------------------
    def save(self, directory, fingerprint: dict) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = self.rows.state()
        with atomic_path(directory / TENSORS_FILE) as tmp:
            save_file(tensors, str(tmp), metadata={"fingerprint": json.dumps(fingerprint, sort_keys=True)})
        write_json(directory / META_FILE, {"fingerprint": fingerprint, "size": len(self), "requests": self.requests})

    def load(self, directory, fingerprint: dict, what: str = "memory") -> None:
        """Replace the contents with a saved memory; a memory saved by another editor, backbone or
        trained weights is refused with a UserError naming the first difference."""
        directory = Path(directory)
        if not (directory / TENSORS_FILE).is_file() or not (directory / META_FILE).is_file():
            raise UserError(f"no {what} saved in {directory} ({TENSORS_FILE} and {META_FILE} expected)")
        meta = read_json(directory / META_FILE)
        saved = meta.get("fingerprint", {})
        for key in sorted(set(saved) | set(fingerprint)):
            if saved.get(key) != fingerprint.get(key):
                hint = " (load the same trained checkpoint first)" if key == "weights" else ""
                raise UserError(f"{what} in {directory} does not fit this editor: {key}: saved "
                                f"{saved.get(key)!r}, this editor has {fingerprint.get(key)!r}{hint}")
        with safe_open(str(directory / TENSORS_FILE), framework="pt") as f:
            tensors = {n: f.get_tensor(n) for n in f.keys()}
        if set(tensors) != set(self.shapes):
            raise UserError(f"{what} in {directory} holds {sorted(tensors)}, expected {sorted(self.shapes)}")
        n = int(meta["size"])
        self.clear()
        self.append(tensors, meta["requests"][:n])
