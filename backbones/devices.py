"""Where each part of a backbone computes when the model is spread over several devices (``-dvc auto``,
an accelerate device map), and the explicit moves between them.

The rules the wrappers and editors follow (no part of the code assumes "the backbone's device"):

- a decoder layer runs on its own device: the hidden state and the per-layer keyword arguments
  (attention mask, position embeddings) are moved there before the call (``VLBackbone._run``); a
  ``layer_edit`` of layer ``i`` receives the hidden state and the ``VLBatch`` on layer ``i``'s device;
- the head (final norm, LM head) moves its input to its own modules; logits stay on the LM head's
  device, and the losses (``utils.losses``) bring the labels to the logits;
- an editor's trainable modules (and any memory they read) live on the device of the layer whose
  output they read; a weight editor's float32 master copy lives on its weight's device;
- ``generate`` gathers the last position's logits of each step on the batch's device.

With accelerate's hooks on the modules (a model loaded with ``device_map``) these moves are no-ops
where the hooks already moved a tensor; without hooks (a hand-made placement) they are what makes
the model run. ``module_device`` reads an offloaded module's execution device from its hook.
"""
from itertools import chain

import torch


def _hook_device(module):
    hook = getattr(module, "_hf_hook", None)
    for h in [hook] + list(getattr(hook, "hooks", ()) or ()):
        dev = getattr(h, "execution_device", None)
        if dev is not None:
            return torch.device("cuda", dev) if isinstance(dev, int) else torch.device(dev)
    return None


def module_device(module: torch.nn.Module) -> torch.device:
    """The device ``module`` computes on: its accelerate hook's execution device when it has one
    (weights offloaded to the CPU or disk sit on 'meta' and are brought there per call), else the
    device of its first parameter or buffer (the CPU for a module without any)."""
    dev = _hook_device(module)
    if dev is not None:
        return dev
    for t in chain(module.parameters(), module.buffers()):
        return t.device
    return torch.device("cpu")


def to_device(obj, device):
    """``obj`` with every tensor inside (nested tuples, lists, dicts) moved to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return type(obj)(*(to_device(o, device) for o in obj)) if hasattr(obj, "_fields") else \
            tuple(to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


class PerDevice:
    """One copy of some inputs (e.g. a decoder layer's keyword arguments) per device, made on first
    use: a forward over layers on two devices moves them once, not once per layer."""

    def __init__(self, value):
        self.value = value
        self.copies = {}

    def on(self, device: torch.device):
        if device not in self.copies:
            self.copies[device] = to_device(self.value, device)
        return self.copies[device]


def model_devices(model: torch.nn.Module) -> list[torch.device]:
    """The distinct devices ``model`` computes on (execution devices of hooked modules included)."""
    seen = []
    for m in model.modules():
        dev = _hook_device(m)
        devs = [dev] if dev is not None else [t.device for t in chain(m.parameters(recurse=False),
                                                                        m.buffers(recurse=False))]
        for d in devs:
            if d.type != "meta" and d not in seen:
                seen.append(d)
    return seen
