"""LiveEdit's expert repository: for every edit, the edit-side features ``phi_hat, psi_hat`` and the
low-rank expert ``(U, V)``, plus the edit request (prompt, target, image path).

The tensors are held in a ``GrowingRows`` (preallocated, grown by doubling, so appending is amortised
O(1): no ``torch.cat`` of the pool). Routing is batched: B queries against N experts are ``[B, N]``
matmuls, masked and softmaxed per row, so each sample filters and weights its own experts."""
import json
import math
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from editors.common import GrowingRows
from editors.liveedit.index import LowRankBound
from editors.liveedit.modules import expert_mixture, paired_similarity, similarity
from utils.errors import UserError
from utils.io import atomic_path, read_json, write_json

TENSORS_FILE = "experts.safetensors"
REQUESTS_FILE = "requests.json"
FORMAT = "liveedit-repository-v1"


class ExpertRepository:
    def __init__(self, k: int, d_m: int, r: int, d: int, device="cpu", dtype=torch.float32,
                 initial_capacity: int = 16, index: LowRankBound | None = None):
        self.rows = GrowingRows({"phi": (k, d_m), "psi": (k, d_m), "U": (r, d), "V": (r, d)}, device, dtype,
                                initial_capacity)
        self.index = index      # exact shortcut of the hard filter over many experts (editors/liveedit/index.py)
        self.shapes, self.dtype = self.rows.shapes, dtype
        self.requests: list[dict] = []

    # ---- storage ----------------------------------------------------------------------------
    def clear(self) -> None:
        """Empty the repository (storage shrinks back to the initial capacity)."""
        self.rows.clear()
        self.requests = []
        if self.index is not None:
            self.index.reset()

    @property
    def capacity(self) -> int:
        return self.rows.capacity

    def __len__(self) -> int:
        return len(self.rows)

    def append(self, phi, psi, U, V, requests: list[dict]) -> None:
        """Append ``n`` experts: phi, psi [n, k, d_m], U, V [n, r, d], one request dict each."""
        if len(requests) != phi.shape[0]:
            raise ValueError(f"{phi.shape[0]} experts but {len(requests)} requests")
        self.rows.extend({"phi": phi, "psi": psi, "U": U, "V": V})
        self.requests.extend(dict(r) for r in requests)

    def truncate(self, n: int) -> None:
        """Keep the first ``n`` experts (storage is kept)."""
        self.rows.truncate(n)
        del self.requests[n:]
        if self.index is not None:
            self.index.reset()

    def tensor(self, name: str) -> torch.Tensor:
        """View of the filled part of one store: 'phi', 'psi', 'U' or 'V'."""
        return self.rows.view(name)

    def select(self, name: str, idx: torch.Tensor) -> torch.Tensor:
        """Rows ``idx`` of one store: the same values as ``tensor(name)[idx]``, copied row by row with
        ``index_select`` on a flat view (about 3x faster on CPU than advanced indexing of a 3-d tensor,
        which a large repository's routing does for thousands of candidates per batch)."""
        t = self.tensor(name)
        return torch.index_select(t.reshape(len(t), -1), 0, idx).view(len(idx), *t.shape[1:])

    def bytes_per_expert(self) -> int:
        return self.rows.row_bytes()

    # ---- routing ----------------------------------------------------------------------------
    def route(self, phi: torch.Tensor, psi: torch.Tensor, phi_sentinel: torch.Tensor, max_kept: int | None = None,
              margin: float = 0.0, max_kept_by: str = "visual"):
        """Input-side features of B queries [B, k, d_m] -> (weights [B, N], kept [B, N] bool).

        Hard filtering keeps expert i iff ``sim(phi, phi_hat_i) > sim(phi, phi_S) + margin`` (the
        paper: margin 0); soft routing over
        the kept ones gives ``w_i = softmax(t)_i * sigmoid(t_i)`` with ``t_i = sim(psi, psi_hat_i)``.
        Weights are exactly 0 outside the kept set. ``max_kept``: of the experts that pass, only the
        ``max_kept`` most visually similar (``max_kept_by="visual"``) or with the highest textual
        similarity, i.e. routing weight (``"text"``), are kept (not in the paper; None: all). With an ``index``
        (a ``LowRankBound``) and enough experts, only the experts its bound cannot rule out are
        scored: the same kept set, without a scan of the whole pool. ``route_kept`` gives the same
        on the kept experts' columns only (what inference uses: no [B, N] tensor)."""
        return self.dense(*self.route_kept(phi, psi, phi_sentinel, max_kept, margin, max_kept_by))

    def dense(self, cols: torch.Tensor, weights: torch.Tensor, kept: torch.Tensor):
        """``route_kept``'s columns spread over every expert: (weights [B, N], kept [B, N])."""
        full_w = torch.zeros((weights.shape[0], len(self)), device=weights.device, dtype=weights.dtype)
        full_k = torch.zeros((kept.shape[0], len(self)), device=kept.device, dtype=torch.bool)
        full_w[:, cols], full_k[:, cols] = weights, kept
        return full_w, full_k

    def route_kept(self, phi: torch.Tensor, psi: torch.Tensor, phi_sentinel: torch.Tensor, max_kept: int | None = None,
                   margin: float = 0.0, max_kept_by: str = "visual"):
        """``route`` on the experts that some query kept: (cols [M] expert indices, weights [B, M],
        kept [B, M])."""
        dt = self.dtype
        phi, psi, phi_sentinel = phi.to(dt), psi.to(dt), phi_sentinel.to(dt)
        n = len(self)
        threshold = paired_similarity(phi, phi_sentinel) + margin
        scored = self._candidates(phi, threshold)          # indices of the experts scored; None: all
        experts = self.tensor("phi") if scored is None else self.select("phi", scored)
        visual = similarity(phi, experts)
        kept = visual > threshold[:, None]
        local = kept.any(0).nonzero().flatten()          # the experts some query lets through
        cols = local if scored is None else scored[local]
        kept, visual = kept[:, local], visual[:, local]
        if cols.numel() == 0:
            return cols, torch.zeros(kept.shape, device=phi.device, dtype=dt), kept
        # textual similarities only for those experts: gather their rows when they are few (the usual
        # case), else one pass over the whole pool
        if 2 * cols.numel() > n:
            t = similarity(psi, self.tensor("psi"))[:, cols]
        else:
            t = similarity(psi, self.select("psi", cols))
        if max_kept is not None and kept.shape[1] > max_kept and bool((kept.sum(1) > max_kept).any()):
            score = visual if max_kept_by == "visual" else t   # text: the similarity soft routing weighs by
            top = score.masked_fill(~kept, float("-inf")).topk(max_kept, dim=1).indices
            kept &= torch.zeros_like(kept).scatter_(1, top, True)
            still = kept.any(0)
            cols, kept, t = cols[still], kept[:, still], t[:, still]
        soft = torch.softmax(t.masked_fill(~kept, float("-inf")), dim=1)   # NaN on rows with none kept
        return cols, torch.where(kept, soft * torch.sigmoid(t), torch.zeros_like(t)), kept

    def _candidates(self, phi: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor | None:
        """Indices of the experts that may pass hard filtering for some query (the index's bound), or
        None to score every expert (no index, too few experts, or too many candidates to gain)."""
        if self.index is None or not self.index.active(len(self)):
            return None
        k, d_m = phi.shape[-2:]
        q = phi.flatten(1)
        maybe = self.index.candidates(self.tensor("phi").flatten(1), q, threshold * (k * math.sqrt(d_m)))
        scored = maybe.any(0).nonzero().flatten()
        return None if 2 * scored.numel() > len(self) else scored

    def residual(self, x: torch.Tensor, weights: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """``sum_i w_i V_i^T relu(U_i x)`` over the experts ``cols`` (``route_kept``'s): x [B, L, d],
        weights [B, M] -> [B, L, d]."""
        return expert_mixture(x.to(self.dtype), weights, self.select("U", cols), self.select("V", cols))

    # ---- persistence ------------------------------------------------------------------------
    def save(self, directory, fingerprint: dict) -> None:
        """Write the experts (safetensors, with the fingerprint in its metadata) and the requests."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = self.rows.state()
        meta = {"format": FORMAT, "fingerprint": json.dumps(fingerprint, sort_keys=True), "size": str(len(self))}
        with atomic_path(directory / TENSORS_FILE) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        write_json(directory / REQUESTS_FILE, {"format": FORMAT, "fingerprint": fingerprint,
                                               "requests": self.requests}, indent=None)

    @staticmethod
    def read_fingerprint(directory) -> dict:
        path = Path(directory) / TENSORS_FILE
        if not path.is_file():
            raise UserError(f"no LiveEdit expert repository at {directory} ({TENSORS_FILE} missing)")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise UserError(f"{path}: not a LiveEdit expert repository (format {meta.get('format')!r}, "
                            f"expected {FORMAT!r})")
        return json.loads(meta["fingerprint"])

    def load(self, directory, fingerprint: dict) -> None:
        """Replace the contents with the repository saved in ``directory``; refuse one whose
        fingerprint (backbone, hidden size, editor config, trained weights) differs from ``fingerprint``."""
        directory = Path(directory)
        saved = self.read_fingerprint(directory)
        check_fingerprint(saved, fingerprint, directory)
        tensors = {}
        with safe_open(str(directory / TENSORS_FILE), framework="pt") as f:
            size = int(f.metadata()["size"])
            for name in self.shapes:
                tensors[name] = f.get_tensor(name)
        req = read_json(directory / REQUESTS_FILE)
        if req.get("fingerprint") != saved or len(req.get("requests", ())) != size:
            raise UserError(f"{directory}: {REQUESTS_FILE} does not belong to {TENSORS_FILE} "
                            f"(different fingerprint or {len(req.get('requests', ()))} requests for {size} experts)")
        for name, t in tensors.items():
            if tuple(t.shape) != (size,) + self.shapes[name]:
                raise UserError(f"{directory}: stored {name} has shape {tuple(t.shape)}, "
                                f"expected {(size,) + self.shapes[name]}")
        self.clear()
        self.append(tensors["phi"], tensors["psi"], tensors["U"], tensors["V"], req["requests"])


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_fingerprint(saved: dict, expected: dict, where) -> None:
    a, b = _flatten(saved), _flatten(expected)
    diff = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if not diff:
        return
    details = "; ".join(f"{k}: repository has {a.get(k)!r}, this editor has {b.get(k)!r}" for k in diff)
    hint = ""
    if diff == ["weights"]:
        hint = " (load the same trained checkpoint before loading the repository)"
    raise UserError(f"LiveEdit repository at {where} was made for a different setup: {details}{hint}")
