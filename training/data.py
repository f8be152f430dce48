"""Batch order, data-parallel sharding and the prefetch buffer of the shared training loop.

The order is a pure function of ``(seed, epoch)``: epoch ``e`` is a permutation of the records
drawn from a generator seeded with ``seed + e``, cut into batches of ``batch_size`` (the last one
may be smaller). So a position ``(epoch, batch)`` is all a checkpoint needs to continue the same
order, whatever happened before.
"""
import math
import queue
import threading
from dataclasses import dataclass
from typing import Callable, Sequence

import torch


@dataclass(frozen=True)
class Position:
    """The next batch to train on: batch ``batch`` of epoch ``epoch`` (both 0-based)."""

    epoch: int
    batch: int


class BatchOrder:
    def __init__(self, n_records: int, batch_size: int, seed: int):
        if n_records < 1:
            raise ValueError("no training records")
        self.n_records = n_records
        self.batch_size = batch_size
        self.seed = seed
        self.batches_per_epoch = math.ceil(n_records / batch_size)

    def permutation(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.n_records, generator=g).tolist()

    def after(self, pos: Position) -> Position:
        """The position that follows ``pos``."""
        if pos.batch + 1 >= self.batches_per_epoch:
            return Position(pos.epoch + 1, 0)
        return Position(pos.epoch, pos.batch + 1)

    def iterate(self, start: Position, epochs: int):
        """Yield ``(position, record indices)`` from ``start`` up to the end of epoch ``epochs - 1``."""
        for epoch in range(start.epoch, epochs):
            perm = self.permutation(epoch)
            first = start.batch if epoch == start.epoch else 0
            for b in range(first, self.batches_per_epoch):
                yield Position(epoch, b), perm[b * self.batch_size:(b + 1) * self.batch_size]


def shard(batch: Sequence, rank: int, world: int):
    """This process's contiguous share of a global batch and its weight (share size / batch size).

    The first ``len(batch) % world`` processes take one record more. A process left without a
    record (a last batch smaller than the number of processes) gets the batch's first record with
    weight 0: it still runs forward and backward, so every process joins the gradient all-reduce,
    but it adds nothing to the gradient or the logged loss."""
    n = len(batch)
    q, r = divmod(n, world)
    start = rank * q + min(rank, r)
    size = q + (1 if rank < r else 0)
    if size == 0:
        return list(batch[:1]), 0.0
    return list(batch[start:start + size]), size / n


class Prefetcher:
    """Produces items of ``source`` in a background thread, at most ``buffer_size`` ahead.

    ``prepare`` (optional) runs in that thread on each item; an error there is raised in the
    consumer. Nothing here touches a random number generator, so prefetching never changes what
    the training loop computes."""

    _END = object()

    def __init__(self, source, buffer_size: int, prepare: Callable | None = None):
        self._queue = queue.Queue(maxsize=buffer_size)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, args=(source, prepare), daemon=True,
                                        name="train-prefetch")
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _work(self, source, prepare):
        try:
            for item in source:
                if prepare is not None:
                    item = prepare(item)
                if not self._put(("item", item)):
                    return
            self._put(("end", None))
        except BaseException as e:  # handed to the consumer, re-raised there
            self._put(("error", e))

    def __iter__(self):
        while True:
            kind, value = self._queue.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value

    def close(self):
        self._stop.set()
        self._thread.join(timeout=5)
