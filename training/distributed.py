"""One global batch under data parallel, for losses that compare samples across the batch.

Under ``accelerate launch`` each process holds a contiguous share of every global batch
(``training.data.shard``). A loss that is a mean over records is exact as it is (each process
weights its share, the loop sums gradients). A loss that compares a sample with the *other* samples
of the batch (contrastive routing losses, in-batch negatives) must see the whole batch: gather the
features of every process with ``gather_rows`` (gradients flow back to the process that owns each
row) and score only the local rows against them; ``local_rows`` says where the local rows sit in the
global batch, so random draws made for the global batch (with a generator seeded the same on every
process) can be sliced to the local rows. With one process both are the identity.
"""
import contextlib

import torch
import torch.distributed as dist

_local_rows_count = True   # False while this process holds a weight-0 filler record (training.data.shard)


def world() -> tuple[int, int]:
    """(process index, number of processes) of the current process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@contextlib.contextmanager
def local_rows_count(counts: bool):
    """Set by the training loop around ``training_losses``: ``False`` when this process's records
    are a weight-0 filler, whose rows must not join the global batch."""
    global _local_rows_count
    old, _local_rows_count = _local_rows_count, counts
    try:
        yield
    finally:
        _local_rows_count = old


def _counts(n: int, device) -> list[int]:
    rank, size = world()
    n = n if _local_rows_count else 0
    if size == 1:
        return [n]
    t = torch.tensor([n], device=device)
    out = [torch.zeros_like(t) for _ in range(size)]
    dist.all_gather(out, t)
    return [int(x) for x in out]


def local_rows(n_local: int, device="cpu") -> tuple[int, int]:
    """(offset of this process's first row in the global batch, global number of rows)."""
    rank, _ = world()
    counts = _counts(n_local, device)
    return sum(counts[:rank]), sum(counts)


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Every process's rows of ``t`` (dim 0), concatenated in process order, with gradient: the
    backward sends each row's gradient to the process that owns it. One process: ``t`` itself."""
    rank, size = world()
    if size == 1:
        return t
    counts = _counts(t.shape[0], t.device)
    local = t if _local_rows_count else t[:0]
    pad = max(counts) - local.shape[0]
    if pad:
        local = torch.cat([local, local.new_zeros((pad,) + tuple(t.shape[1:]))])
    parts = _AllGatherRows.apply(local.contiguous())
    return torch.cat([p[:c] for p, c in zip(parts, counts)])


class _AllGatherRows(torch.autograd.Function):
    """all_gather with a backward that sums each copy's gradient over processes (an all_reduce,
    which every backend has, gloo included) and keeps the local part."""

    @staticmethod
    def forward(ctx, t):
        parts = [torch.empty_like(t) for _ in range(world()[1])]
        dist.all_gather(parts, t)
        return tuple(parts)

    @staticmethod
    def backward(ctx, *grads):
        g = torch.stack(grads).contiguous()
        dist.all_reduce(g)
        return g[world()[0]]
