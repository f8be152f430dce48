"""MEND's gradient transform (BASELINES.md section 2): for the rank-1 factors of a linear layer's
gradient, ``u`` (the layer's input at one token) and ``delta`` (the loss gradient w.r.t. its output at
that token), an MLP on ``concat(u, delta)`` returns edited factors ``(u~, delta~)``.

One transform serves every edited module of the same shape (``d_in``, ``d_out``); each module has a
learned scale and shift (its "mode") inside every layer. The MLP is ``n_hidden + 1`` low-rank
residual layers, ReLU inside the residual branch of all but the last, and starts as the identity
(the up-projections and biases are zero). Inputs are normalised per dimension by running mean and
standard deviation, updated only while training, kept as buffers (saved with the weights; before any
update they are the identity, never NaN)."""
import torch
from torch import nn

from utils.distributed import gather_rows


class RunningNorm(nn.Module):
    """Per-dimension running mean / variance over every row seen while training (merged batch by
    batch, in float64)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(dim, dtype=torch.float64))

    @torch.no_grad()
    def update(self, rows: torch.Tensor) -> None:
        n = rows.shape[0]
        if n == 0:
            return
        rows = rows.double()
        batch_mean = rows.mean(0)
        batch_m2 = ((rows - batch_mean) ** 2).sum(0)
        total = self.count + n
        diff = batch_mean - self.mean
        self.mean += diff * (n / total)
        self.m2 += batch_m2 + diff ** 2 * (self.count * n / total)
        self.count.copy_(total)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.count < 2:
            return z
        std = (self.m2 / (self.count - 1)).sqrt()
        return ((z.double() - self.mean) / (std + self.eps)).to(z.dtype)


class LowRankResidual(nn.Module):
    """``z + act(mode(B (A z) + b))`` with rank-``rank`` factors; ``mode`` scales and shifts the
    pre-activation per module. ``B`` and ``b`` start at zero: the layer starts as the identity."""

    def __init__(self, dim: int, rank: int, n_modes: int, relu: bool):
        super().__init__()
        self.relu = relu
        self.down = nn.Parameter(torch.empty(rank, dim))
        nn.init.kaiming_uniform_(self.down, a=5 ** 0.5)
        self.up = nn.Parameter(torch.zeros(dim, rank))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.mode_scale = nn.Parameter(torch.ones(n_modes, dim))
        self.mode_shift = nn.Parameter(torch.zeros(n_modes, dim))

    def forward(self, z: torch.Tensor, mode: int) -> torch.Tensor:
        pre = (z @ self.down.T) @ self.up.T + self.bias
        pre = pre * self.mode_scale[mode] + self.mode_shift[mode]
        return z + (pre.clamp(min=0) if self.relu else pre)


class GradientTransform(nn.Module):
    def __init__(self, d_in: int, d_out: int, rank: int, n_hidden: int, n_modes: int, norm: bool):
        super().__init__()
        self.d_in, self.d_out = d_in, d_out
        dim = d_in + d_out
        self.norm = RunningNorm(dim) if norm else None
        self.layers = nn.ModuleList(LowRankResidual(dim, rank, n_modes, relu=i < n_hidden)
                                    for i in range(n_hidden + 1))

    def forward(self, u: torch.Tensor, delta: torch.Tensor, mode: int, update_norm: bool = False):
        """u [n, d_in], delta [n, d_out] (one row per token) -> (u~ [n, d_in], delta~ [n, d_out]).
        ``update_norm``: merge these rows into the running statistics first (training; under data
        parallel the rows of every process, so all processes keep the same statistics)."""
        z = torch.cat([u, delta], -1).float()
        if self.norm is not None:
            if update_norm:
                self.norm.update(gather_rows(z.detach()))
            z = self.norm(z)
        for layer in self.layers:
            z = layer(z, mode)
        return z[:, :self.d_in], z[:, self.d_in:]
