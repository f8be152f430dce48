"""An exact shortcut for LiveEdit's hard filter over a large repository.

Hard filtering keeps expert i for query q iff ``<q, x_i> > tau`` (``x_i`` the expert's flattened
``phi_hat``, ``tau`` the query's similarity to the sentinel, both before the common scale). Scanning
every ``x_i`` costs ``N x D`` per query (D = k * d_m = 512 on the tiny configs), and at 100,000 experts
that scan is most of a query's time. The features live near a low-dimensional subspace (measured on
tiny-blip2 / SYNTH-EVQA: rank 32 holds 98.9% of the experts' variance), so with an orthonormal basis
``P`` [r, D] and a centre ``mu``, for every expert

    <q, x> = <q, mu> + <P q, P (x - mu)> + <q_perp, (x - mu)_perp>
          <= <q, mu> + <P q, p_i> + |q_perp| * e_i        (Cauchy-Schwarz on the perpendicular parts)

with ``p_i = P (x_i - mu)`` [r] and ``e_i = |(x_i - mu)_perp|`` stored per expert. An expert whose bound
is at most ``tau`` cannot pass, so only the others (the *candidates*) are scored exactly. The bound holds
for any orthonormal ``P``: the basis decides how many candidates remain, never which experts pass, so
the filter's result is the full scan's (the experts left are scored by the same formula, on a subset of
the columns: equal up to the last float bit). The basis is fitted (SVD of an even sample of about
``sample`` experts) when the
repository first reaches ``min_experts`` and again each time it has doubled since; experts appended in
between are projected on the current basis when the next query comes.
"""
import torch

from editors.common import GrowingRows

# Float rounding may put a computed bound a little below the true one; this relative slack (of
# |q| * (|mu| + max |p_i| + max e_i), a bound on every term's size) keeps such experts as candidates,
# so they are scored exactly instead of dropped.
SLACK = 1e-4


class LowRankBound:
    def __init__(self, rank: int, min_experts: int, sample: int = 8192):
        self.rank, self.min_experts, self.sample = rank, min_experts, sample
        self.reset()

    def reset(self) -> None:
        """Forget the basis and the projections (the repository was cleared, truncated or loaded)."""
        self.mu = self.basis = self.rows = None
        self.fitted_at, self.reach = 0, 0.0

    def active(self, n: int) -> bool:
        return n >= self.min_experts

    # The index is often first built by a query under inference mode (scoring) and then extended by
    # one under no_grad (a script): its storage must be normal tensors, or that in-place append fails.
    @torch.inference_mode(False)
    @torch.no_grad()
    def _fit(self, x: torch.Tensor) -> None:
        """Basis and centre from (an even sample of) ``x`` [N, D]; every row projected again."""
        step = max(1, len(x) // self.sample)
        sample = x[::step].float()
        mu = sample.mean(0)
        rank = min(self.rank, *sample.shape)
        self.basis = torch.linalg.svd(sample - mu, full_matrices=False).Vh[:rank].to(x.dtype)
        self.mu = mu.to(x.dtype)
        # one row per expert, [p_i, e_i, 1], so that a query's bound on every expert is one matmul
        # with [P q, |q_perp|, <q, mu>]
        self.rows = GrowingRows({"bound": (rank + 2,)}, x.device, x.dtype)
        self.fitted_at, self.reach = len(x), float(self.mu.norm())
        self._project(x)

    @torch.inference_mode(False)
    @torch.no_grad()
    def _project(self, x: torch.Tensor) -> None:
        """Append the rows of the experts of ``x`` that are not indexed yet."""
        new = x[len(self.rows):] - self.mu
        proj = new @ self.basis.T
        perp = (new - proj @ self.basis).norm(dim=1, keepdim=True)
        self.rows.extend({"bound": torch.cat([proj, perp, torch.ones_like(perp)], dim=1)})
        self.reach = max(self.reach, float(self.mu.norm() + proj.norm(dim=1).max() + perp.max()))

    def candidates(self, x: torch.Tensor, q: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        """Experts of ``x`` [N, D] that may satisfy ``<q_b, x_i> > tau_b`` for queries ``q`` [B, D]
        (``tau`` [B], same scale): [B, N] bool, True for every expert that does."""
        if self.rows is None or len(x) >= 2 * self.fitted_at or len(x) < len(self.rows):
            self._fit(x)
        elif len(self.rows) < len(x):
            self._project(x)
        q_proj = q @ self.basis.T
        q_perp = (q - q_proj @ self.basis).norm(dim=1, keepdim=True)
        bound = torch.cat([q_proj, q_perp, q @ self.mu[:, None]], dim=1) @ self.rows.view("bound").T
        return bound > (tau - SLACK * self.reach * q.norm(dim=1))[:, None]
