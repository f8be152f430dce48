"""What FT-L and FT-M share: the fine-tuning loop (Adam on float32 master copies of some backbone
weights, for a fixed number of steps of a loss, with an optional early stop and an optional
L-infinity bound on each entry's change per edit), the exact snapshot / restore of those weights, and
a base class giving such an editor its restore, state bytes and edited state on disk."""
from pathlib import Path
from typing import Callable, Sequence

import torch

from editors.base import BaseEditor
from editors.common import load_state_file, save_state_file
from utils.errors import UserError


def fine_tune(params: Sequence[torch.nn.Parameter], loss_fn: Callable[[], torch.Tensor], steps: int, lr: float,
              early_stop_loss: float, norm_constraint: float | None) -> int:
    """Minimise ``loss_fn()`` over ``params`` in place; returns the optimisation steps taken.

    Only ``params`` get ``requires_grad`` during the call (and lose it after). The optimiser steps a
    float32 master copy of each, so a float16 backbone is tuned without losing small updates. The
    loop stops once the loss is below ``early_stop_loss``; with ``norm_constraint`` each entry stays
    within that distance of its value before the call. A parameter that gets no gradient is skipped."""
    params = list(params)
    starts = [p.detach().clone() for p in params]
    masters = [p.detach().float().clone().requires_grad_(True) for p in params]
    optimiser = torch.optim.Adam(masters, lr=lr)
    for p in params:
        p.requires_grad_(True)
    taken = 0
    try:
        for _ in range(steps):
            loss = loss_fn()
            if loss.item() < early_stop_loss:
                break
            for p in params:
                p.grad = None
            loss.backward()
            for m, p in zip(masters, params):
                m.grad = None if p.grad is None else p.grad.float()
            optimiser.step()
            taken += 1
            with torch.no_grad():
                for m, p, start in zip(masters, params, starts):
                    if norm_constraint is not None:
                        eps = norm_constraint
                        lo, hi = start.float() - eps, start.float() + eps
                        m.copy_(torch.maximum(torch.minimum(m, hi), lo))
                    p.copy_(m)
    finally:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
    return taken


class WeightSnapshot:
    """The values of some weights before the first edit; ``restore()`` copies them back exactly."""

    def __init__(self, params: Sequence[torch.nn.Parameter]):
        self.params = list(params)
        self.originals = [p.detach().clone() for p in self.params]

    def restore(self) -> None:
        with torch.no_grad():
            for p, o in zip(self.params, self.originals):
                p.copy_(o)

    def nbytes(self) -> int:
        """Bytes of the weights the edits change."""
        return sum(p.numel() * p.element_size() for p in self.params)


class WeightEditor(BaseEditor):
    """An editor whose edits change some backbone weights in place (FT-L, FT-M). Subclasses call
    ``_own_weights({name: parameter})`` in ``__init__``; this gives the exact ``restore()``, the state
    bytes and the edited state on disk (``state_file``, owned by ``_owner()``)."""

    state_file = "weights.safetensors"

    def _own_weights(self, named: dict[str, torch.nn.Parameter]) -> None:
        self.named_weights = dict(named)
        for p in self.named_weights.values():
            p.requires_grad_(False)
        self.snapshot = WeightSnapshot(list(self.named_weights.values()))

    def _owner(self) -> dict:
        return {"editor": self.name, "backbone": self.backbone.name}

    def restore(self) -> None:
        self.snapshot.restore()
        self.n_edits = 0

    def state_bytes(self) -> int:
        """The edited weights (edits change them in place; nothing grows)."""
        return self.snapshot.nbytes()

    def save_state(self, directory: Path) -> None:
        save_state_file(Path(directory) / self.state_file, self.named_weights, self._owner(), n_edits=self.n_edits)

    def load_state(self, directory: Path) -> None:
        path = Path(directory) / self.state_file
        tensors, meta = load_state_file(path, self._owner(), list(self.named_weights))
        for name, p in self.named_weights.items():
            if tensors[name].shape != p.shape:
                raise UserError(f"edited state {path}: {name} shape {tuple(tensors[name].shape)} != {tuple(p.shape)}")
        with torch.no_grad():
            for name, p in self.named_weights.items():
                p.copy_(tensors[name].to(p.device, p.dtype))
        self.n_edits = int(meta.get("n_edits", 0))
