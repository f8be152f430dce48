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
              early_stop_loss: float, norm_constraint: float | None, masters: list[torch.Tensor] | None = None,
              scaler: torch.amp.GradScaler | None = None) -> list[torch.Tensor]:
    """Minimise ``loss_fn()`` over ``params`` in place; returns the float32 master copies it stepped.
    Only ``params`` get ``requires_grad`` during the call (and lose it after). The optimiser steps a
    float32 master copy of each (``masters``: the copies of earlier edits, kept so that a half-precision
    weight, which is only their rounding, does not lose small updates), and under float16 the loss is
    scaled by ``scaler`` so the gradient through the half-precision layers does not underflow. The
    loop stops once the loss is below ``early_stop_loss``; with ``norm_constraint`` each entry stays
    within that distance of its value before the call. A parameter that gets no gradient is skipped."""
    params = list(params)
    masters = masters or [p.detach().float().clone() for p in params]
    starts = [m.detach().clone() for m in masters]
    for m in masters:
        m.requires_grad_(True)
    optimiser = torch.optim.Adam(masters, lr=lr)
    for p in params:
        p.requires_grad_(True)
    try:
        for _ in range(steps):
            loss = loss_fn()
            if loss.item() < early_stop_loss:
                break
            for p in params:
                p.grad = None
            (scaler.scale(loss) if scaler is not None else loss).backward()
            for m, p in zip(masters, params):
                m.grad = None if p.grad is None else p.grad.float()
            if scaler is not None:
                scaler.step(optimiser)     # unscales; skips a step whose gradient overflowed
                scaler.update()
            else:
                optimiser.step()
            with torch.no_grad():
                for m, p, start in zip(masters, params, starts):
                    if norm_constraint is not None:
                        eps = norm_constraint
                        m.copy_(torch.maximum(torch.minimum(m, start + eps), start - eps))
                    p.copy_(m)
    finally:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        for m in masters:
            m.requires_grad_(False)
            m.grad = None
    return masters


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
            if p.device.type == "meta":
                raise UserError(f"{self.name}: a weight it edits is offloaded by accelerate (on 'meta'); "
                                f"give the GPUs more memory so that it is resident")
            p.requires_grad_(False)
        self.snapshot = WeightSnapshot(list(self.named_weights.values()))
        self.masters = None   # float32 copies the edits step, kept across edits (made at the first)
        first = next(iter(self.named_weights.values()))
        self.scaler = torch.amp.GradScaler(first.device.type, enabled=first.dtype == torch.float16)

    def _fine_tune(self, loss_fn, cfg) -> None:
        """One edit: ``fine_tune`` of the owned weights with the config's steps, lr, early stop and bound."""
        self.masters = fine_tune(list(self.named_weights.values()), loss_fn, cfg.steps, cfg.lr,
                                 cfg.early_stop_loss, cfg.norm_constraint, self.masters, self.scaler)

    def _owner(self) -> dict:
        return {"editor": self.name, "backbone": self.backbone.name}

    def restore(self) -> None:
        self.snapshot.restore()
        self.masters = None
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
        self.masters = None   # float32 copies of the loaded weights are made at the next edit
        self.n_edits = int(meta.get("n_edits", 0))
