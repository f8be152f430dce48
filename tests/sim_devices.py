"""Simulated accelerators on a CPU-only machine, to test code meant for a model split over devices.

``SimulatedDevices`` is a ``TorchFunctionMode``. Inside it, a tensor can carry a *logical* device,
``torch.device("cpu", k)`` for ``k >= 1`` (simulated accelerator ``k``), while all arithmetic runs on
the real CPU, so the numbers are exactly those of a single-device run. The mode enforces torch's
device rules on the logical devices, as two GPUs would:

- an op whose tensor arguments sit on two different devices raises (a 0-dim host tensor may join
  any device, and host tensors may index a device tensor, as in torch);
- host tensors (created without a device, or moved with ``.cpu()`` / ``.to("cpu")``) are a device
  of their own: mixing one with an accelerator tensor raises too;
- ``tensor.device`` answers the logical device; ``.to(device)``, ``device=`` factory arguments,
  ``module.to(device)`` (through ``param.data = ...``) and ``param.grad`` follow it.

``place(module, k)`` puts a module's parameters and buffers on simulated device ``k`` (a hand-made
device map). Tensors the mode never saw (e.g. made before it was entered, or by autograd inside
C++) are "unknown" and join any device; a module's ``nn.Parameter`` the mode never saw counts as a
host tensor (it was built on the CPU and never moved).
"""
from itertools import chain

import torch
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakTensorKeyDictionary

HOST = 0
INDEXING = {"__getitem__", "__setitem__", "index_select", "index_put_", "index_put"}
METADATA = {"_has_compatible_shallow_copy_type", "is_same_size"}   # compare metadata only, never compute


class DeviceMismatch(RuntimeError):
    pass


def logical_index(device) -> int:
    d = device if isinstance(device, torch.device) else torch.device(device)
    if d.type != "cpu":
        raise DeviceMismatch(f"simulated devices: unexpected real device {d}")
    return d.index or HOST


def logical_device(k: int) -> torch.device:
    return torch.device("cpu", k) if k else torch.device("cpu")


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


def _is_device_arg(a) -> bool:
    return isinstance(a, torch.device) or (isinstance(a, str) and not a.startswith("torch."))


class SimulatedDevices(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.tags = WeakTensorKeyDictionary()

    # ---- placement ---------------------------------------------------------------------------
    def place(self, module: torch.nn.Module, k: int) -> None:
        for t in chain(module.parameters(), module.buffers()):
            self.tags[t] = k

    def tag(self, t: torch.Tensor):
        k = self.tags.get(t)
        if k is None and isinstance(t, torch.nn.Parameter):
            return HOST
        return k

    def _tag_out(self, out, k):
        if k is None:
            return out
        for t in _tensors(out):
            self.tags[t] = k
        return out

    # ---- the rules ---------------------------------------------------------------------------
    def _check(self, name, args, kwargs):
        """The one device of the tensor arguments (None when all are unknown)."""
        found = {}
        index_args = list(_tensors(args[1:])) if name in INDEXING else []
        for t in _tensors((args, kwargs)):
            k = self.tag(t)
            if k is None or (k == HOST and (t.dim() == 0 or any(t is i for i in index_args))):
                continue
            found.setdefault(k, t)
        if len(found) > 1:
            devs = ", ".join(str(logical_device(k)) for k in sorted(found))
            raise DeviceMismatch(f"Expected all tensors to be on the same device, but found at least two "
                                 f"devices, {devs} (simulated), in {name}")
        return next(iter(found), None)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", "")
        if name in ("__get__", "__set__"):
            return self._attribute(func, name, getattr(getattr(func, "__self__", None), "__name__", ""),
                                   args, kwargs)
        if name in METADATA:
            return func(*args, **kwargs)
        if name in ("to", "cuda", "cpu"):
            return self._move(func, name, args, kwargs)
        if name == "copy_":   # cross-device copies are allowed; the destination keeps its device
            out = func(*args, **kwargs)
            return self._tag_out(out, self.tag(args[0]))
        if "device" in kwargs:   # factories: torch.zeros(..., device=d), new_full(..., device=d), ...
            dev = kwargs["device"]
            k = HOST if dev is None else logical_index(dev)
            if dev is not None:
                kwargs["device"] = "cpu"
            self._check(name, args, {key: v for key, v in kwargs.items() if key != "device"})
            return self._tag_out(func(*args, **kwargs), k)
        k = self._check(name, args, kwargs)
        out = func(*args, **kwargs)
        if k is None and not any(True for _ in _tensors((args, kwargs))):
            k = HOST     # a factory without a device argument: a host tensor
        return self._tag_out(out, k)

    def _attribute(self, func, name, attr, args, kwargs):
        if name == "__get__" and attr == "device":
            k = self.tag(args[0])
            return logical_device(k) if k else func(*args, **kwargs)
        if name == "__get__" and attr == "grad":
            g = func(*args, **kwargs)
            if g is not None:
                self._tag_out(g, self.tag(args[0]))
            return g
        if name == "__set__" and attr == "data":
            out = func(*args, **kwargs)
            k = self.tag(args[1])
            if k is not None:
                self.tags[args[0]] = k
            return out
        if name == "__set__" and attr == "grad" and args[1] is not None:
            a, b = self.tag(args[0]), self.tag(args[1])
            if a is not None and b is not None and a != b:
                raise DeviceMismatch(f"assigned grad on {logical_device(b)} to a parameter on {logical_device(a)}")
        return func(*args, **kwargs)

    def _move(self, func, name, args, kwargs):
        src = args[0]
        if name == "cpu":
            k = HOST
        elif name == "cuda":
            raise DeviceMismatch("simulated devices: .cuda() called")
        else:
            k, rest = None, list(args[1:])
            for i, a in enumerate(rest):
                if isinstance(a, torch.Tensor):      # .to(other): other's device and dtype
                    k = self.tag(a)
                elif _is_device_arg(a):
                    k, rest[i] = logical_index(a), "cpu"
            if kwargs.get("device") is not None:
                k, kwargs["device"] = logical_index(kwargs["device"]), "cpu"
            args = (src, *rest)
        out = func(*args, **kwargs)
        before = self.tag(src)
        if k is None:
            k = before
        elif out is src and k != before:
            out = out.clone()           # a move to another (simulated) device is a copy
        return self._tag_out(out, k)
