"""Loss scaling for training an editor through a frozen half-precision backbone.

The editor's trainable weights stay float32, but their gradients flow back through the frozen
backbone layers above the edit layer, in the backbone's dtype. In float16 (smallest normal 6e-5,
subnormal 6e-8) small gradients underflow to zero on the way; bfloat16 has float32's exponent range
and does not. accelerate scales the loss only under ``--mixed_precision fp16``. A backbone in float16
for another reason (a GPU without bfloat16, where ``backbones.loading.default_dtype`` falls back to
float16, with ``--mixed_precision no``) would backprop unscaled: ``LossScaling`` adds a dynamic
``GradScaler`` then (scale the loss, unscale the float32 gradients, skip a step whose gradients
overflowed, adapt the scale), and otherwise defers to accelerate.
"""
import torch


def needs_own_scaler(backbone_dtype: torch.dtype, accelerator=None) -> bool:
    return backbone_dtype == torch.float16 and getattr(accelerator, "scaler", None) is None


class LossScaling:
    """``backward(loss)`` and ``step(optimizer)`` for the training loop (or a script without
    accelerate: ``accelerator=None``), with a GradScaler when ``needs_own_scaler``."""

    def __init__(self, backbone_dtype: torch.dtype, device: torch.device, accelerator=None):
        self.accelerator = accelerator
        self.own = torch.amp.GradScaler(torch.device(device).type) if needs_own_scaler(backbone_dtype, accelerator) \
            else None

    @property
    def scaler(self):
        """The scaler in use (ours or accelerate's), or None: its state goes into checkpoints."""
        return self.own if self.own is not None else getattr(self.accelerator, "scaler", None)

    def backward(self, loss: torch.Tensor) -> None:
        if self.own is not None:
            self.own.scale(loss).backward()
        elif self.accelerator is not None:
            self.accelerator.backward(loss)
        else:
            loss.backward()

    def step(self, optimizer) -> None:
        if self.own is not None:
            self.own.step(optimizer)      # unscales; skips the step when a gradient is inf / NaN
            self.own.update()
        else:
            optimizer.step()
