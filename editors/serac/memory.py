"""SERAC's edit memory: per edit, its scope key and what it takes to embed the edit again (its token
ids, the number of them that are context, and its image path), not its embedding tensor (on LLaVA
that is ~10 MB per edit). Embeddings are recomputed lazily by the backbone when the counterfactual
model needs an edit, with a small cache of the most recent ones.

The key pool is preallocated with the pooled key width (3 x the classifier width; the authors' code
sizes it with the classifier width and crashes on the first edit) and grows by doubling."""
from collections import OrderedDict

import torch

from utils.errors import UserError
from vl_datasets.records import Sample, open_image


class EditMemory:
    def __init__(self, key_width: int, device="cpu", initial_capacity: int = 16, cache_size: int = 64):
        if initial_capacity < 1:
            raise ValueError(f"initial_capacity must be positive, got {initial_capacity}")
        self.key_width, self.device = key_width, torch.device(device)
        self.initial_capacity, self.cache_size = initial_capacity, cache_size
        self.clear()

    def clear(self) -> None:
        self.size = 0
        self._keys = torch.zeros(self.initial_capacity, self.key_width, device=self.device)
        self.entries: list[dict] = []    # {"ids": [...], "n_context": int, "image": str | None}
        self._cache: OrderedDict[int, torch.Tensor] = OrderedDict()

    def __len__(self) -> int:
        return self.size

    @property
    def capacity(self) -> int:
        return self._keys.shape[0]

    @property
    def keys(self) -> torch.Tensor:
        return self._keys[:self.size]

    def append(self, key: torch.Tensor, ids, n_context: int, image: str | None) -> None:
        if tuple(key.shape) != (self.key_width,):
            raise ValueError(f"key of shape {tuple(key.shape)}, expected ({self.key_width},)")
        if self.size == self.capacity:
            grown = torch.zeros(2 * self.capacity, self.key_width, device=self.device)
            grown[:self.size] = self._keys[:self.size]
            self._keys = grown
        self._keys[self.size] = key.detach().to(self.device, torch.float32)
        self.entries.append({"ids": [int(i) for i in ids], "n_context": int(n_context), "image": image})
        self.size += 1

    def state_bytes(self) -> int:
        """Keys (float32), token ids (as int32), one int per edit and the image paths (UTF-8)."""
        return (self.size * self.key_width * 4
                + sum(4 * len(e["ids"]) + 4 + len((e["image"] or "").encode()) for e in self.entries))

    def embeddings(self, backbone, indices: list[int]) -> list[torch.Tensor]:
        """Input embeddings [l_i, d] of the edits ``indices`` (image + prompt + target), re-embedded by
        the backbone from the stored ids and image, in one batch for those not cached."""
        missing = sorted({i for i in indices if i not in self._cache})
        if missing:
            entries = [self.entries[i] for i in missing]
            samples = [Sample("", "", e["image"]) for e in entries]
            rows = [(tuple(e["ids"]), e["n_context"]) for e in entries]
            paths = [e["image"] for e in entries if e["image"] is not None]
            pixels = backbone.pixel_values([open_image(p) for p in paths]) if paths else None
            with torch.no_grad():
                batch = backbone.collate(samples, rows, pixels)
            for i, b in zip(missing, range(len(missing))):
                self._cache[i] = batch.inputs_embeds[b, :len(entries[b]["ids"])]
        out = []
        for i in indices:
            self._cache.move_to_end(i)
            out.append(self._cache[i])
        while len(self._cache) > max(self.cache_size, len(set(indices))):
            self._cache.popitem(last=False)
        return out

    def load(self, keys: torch.Tensor, entries: list[dict]) -> None:
        if keys.shape[0] != len(entries) or (len(entries) and keys.shape[1] != self.key_width):
            raise UserError(f"serac memory: {keys.shape[0]} keys of width {keys.shape[1] if keys.dim() == 2 else '?'} "
                            f"for {len(entries)} edits; expected width {self.key_width}")
        self.clear()
        for k, e in zip(keys, entries):
            self.append(k, e["ids"], e["n_context"], e["image"])
