"""LiveEdit's trainable building blocks (DESIGN section 3): multi-head cross-attention, the feature
extractor (prompt-guided visual feature, textual feature, optional vision sentinel) and the low-rank
expert generator. Everything is batched: hidden states ``[B, L, d]`` with boolean position masks
``[B, L]`` selecting each sample's span, so samples of different layouts share one call.

Module details follow the authors' code by default (measured to matter on the tiny backbones, DESIGN
section 3): no output projection after the attention heads (the value projection has the output
width), the vision sentinel starts Kaiming-normal (std sqrt(2 / (n_v * d))). ``out_proj=True`` and
``sentinel_init="normal"`` keep this project's earlier modules."""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class CrossAttention(nn.Module):
    """``Attn(Q, X)``: queries from ``Q``, keys and values projected from ``X`` (restricted to the
    positions where ``mask`` is true), ``heads`` heads, output width ``d_out``. With ``out_proj`` the
    heads (width ``d_model / heads``) are mixed by an output projection; without it (the authors'
    design) the value projection has width ``d_out`` and the heads are concatenated as they are.
    A sample whose mask is empty gets a zero output."""

    def __init__(self, d_query: int, d_kv: int, d_model: int, heads: int, d_out: int, out_proj: bool = False):
        super().__init__()
        d_value = d_model if out_proj else d_out
        for name, width in (("d_model", d_model), ("value width", d_value)):
            if width % heads:
                raise ValueError(f"{name}={width} is not divisible by heads={heads}")
        self.heads = heads
        self.q = nn.Linear(d_query, d_model)
        self.k = nn.Linear(d_kv, d_model)
        self.v = nn.Linear(d_kv, d_value)
        self.out = nn.Linear(d_model, d_out) if out_proj else nn.Identity()

    def _split(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, d_model] -> [B, heads, T, d_head]
        B, T, _ = x.shape
        return x.view(B, T, self.heads, -1).transpose(1, 2)

    def forward(self, query: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """query [B or 1, Q, d_query], x [B or 1, L, d_kv], mask [B, L] bool or None -> [B, Q, d_out]."""
        B = max(query.shape[0], x.shape[0], 1 if mask is None else mask.shape[0])
        q = self._split(self.q(query).expand(B, -1, -1))
        k = self._split(self.k(x).expand(B, -1, -1))
        v = self._split(self.v(x).expand(B, -1, -1))
        attn_mask, empty = None, None
        if mask is not None:
            empty = ~mask.any(1)                                # [B]
            # an empty row attends everywhere (finite) and is zeroed below
            attn_mask = (mask | empty[:, None])[:, None, None, :]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        o = self.out(o.transpose(1, 2).reshape(B, q.shape[2], -1))
        if empty is not None and bool(empty.any()):
            o = o.masked_fill(empty[:, None, None], 0.0)
        return o


@dataclass
class Features:
    phi: torch.Tensor                    # [B, k, d_m] prompt-guided visual feature
    psi: torch.Tensor                    # [B, k, d_m] textual feature
    phi_sentinel: torch.Tensor | None    # [B, k, d_m] visual feature of the vision sentinel (input side)


class FeatureExtractor(nn.Module):
    """``Z = Attn(E1, LN1(H_p))``, ``phi = Attn(Z, LN1(H_v))``, ``psi = Attn(E2, LN2(H_p))``; with
    ``n_vision`` set, also a learned vision sentinel ``S [n_v, d]`` and ``phi_S = Attn(Z, LN1(S))``."""

    def __init__(self, d: int, d_m: int, k: int, heads: int, n_vision: int | None = None,
                 out_proj: bool = False, sentinel_init: str = "kaiming"):
        super().__init__()
        self.E1 = nn.Parameter(torch.randn(k, d_m) / math.sqrt(d_m))
        self.E2 = nn.Parameter(torch.randn(k, d_m) / math.sqrt(d_m))
        self.ln1 = nn.LayerNorm(d)
        self.ln2 = nn.LayerNorm(d)
        self.attn_prompt = CrossAttention(d_m, d, d_m, heads, d_m, out_proj)   # Z = Attn(E1, LN1(H_p))
        self.attn_vision = CrossAttention(d_m, d, d_m, heads, d_m, out_proj)   # phi = Attn(Z, LN1(H_v))
        self.attn_text = CrossAttention(d_m, d, d_m, heads, d_m, out_proj)     # psi = Attn(E2, LN2(H_p))
        self.sentinel = None
        if n_vision:
            # Kaiming-normal over the whole [n_v, d] matrix: small, so under Adam it moves fast in
            # relative terms (the authors' init); "normal" is unit scale
            std = math.sqrt(2.0 / (n_vision * d)) if sentinel_init == "kaiming" else 1.0
            self.sentinel = nn.Parameter(torch.randn(n_vision, d) * std)

    def forward(self, hidden: torch.Tensor, vision_mask: torch.Tensor, prompt_mask: torch.Tensor) -> Features:
        """hidden [B, L, d] (float), masks [B, L] bool -> features of each sample."""
        x1 = self.ln1(hidden)
        z = self.attn_prompt(self.E1[None], x1, prompt_mask)
        phi = self.attn_vision(z, x1, vision_mask)
        psi = self.attn_text(self.E2[None], self.ln2(hidden), prompt_mask)
        phi_s = None
        if self.sentinel is not None:
            phi_s = self.attn_vision(z, self.ln1(self.sentinel)[None])
        return Features(phi, psi, phi_s)


class LowRankGenerator(nn.Module):
    """``Attn(Q_r, LN(H_e)) / (scale * sqrt(r))`` with values projected to width ``d``: ``[B, r, d]``."""

    def __init__(self, d: int, d_m: int, r: int, heads: int, scale: float, out_proj: bool = False):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(r, d_m) / math.sqrt(d_m))
        self.ln = nn.LayerNorm(d)
        self.attn = CrossAttention(d_m, d, d_m, heads, d, out_proj)
        self.factor = 1.0 / (scale * math.sqrt(r))

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.attn(self.queries[None], self.ln(hidden), mask) * self.factor


def similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``sim(a, b) = mean_j <a_j, b_j> / sqrt(d_m)`` for all pairs: a [A, k, d_m], b [N, k, d_m] -> [A, N]."""
    k, d_m = a.shape[-2:]
    return (a.flatten(1) @ b.flatten(1).T) / (k * math.sqrt(d_m))


def paired_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise ``sim(a_i, b_i)``: a, b [A, k, d_m] -> [A]."""
    k, d_m = a.shape[-2:]
    return (a * b).flatten(1).sum(1) / (k * math.sqrt(d_m))


def expert_mixture(x: torch.Tensor, weights: torch.Tensor, U: torch.Tensor, V: torch.Tensor,
                   max_elements: int = 1 << 24) -> torch.Tensor:
    """``sum_i w_i V_i^T relu(U_i x)`` at every position: x [B, L, d] (already ``LN_x``-normed),
    weights [B, M], U, V [M, r, d] -> [B, L, d]. Works on chunks of experts so that the
    ``[B, L, chunk * r]`` intermediate stays below ``max_elements``."""
    B, L, d = x.shape
    M, r, _ = U.shape
    chunk = max(1, max_elements // max(1, B * L * r))
    out = None
    for s in range(0, M, chunk):
        u = U[s:s + chunk].reshape(-1, d)                              # [c*r, d]
        a = torch.relu(x @ u.T)                                         # [B, L, c*r]
        a = a * weights[:, s:s + chunk].repeat_interleave(r, dim=1)[:, None, :]
        part = a @ V[s:s + chunk].reshape(-1, d)                        # [B, L, d]
        out = part if out is None else out + part
    return out
