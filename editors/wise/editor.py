"""WISE (BASELINES.md section 9; Wang et al., NeurIPS 2024): a side memory beside one FFN weight.

The edited weight is the FFN output projection of decoder layer ``layer`` (the named module site
``mlp_output_projection``: OPT ``fc2``, Llama ``down_proj``), ``W0`` (frozen, never written). The
editor keeps float32 copies of it:

- the **side memory** ``Ws`` (starts at ``W0``): each edit runs at most ``steps`` SGD steps on it, the
  gradient multiplied by the current shard's random mask (a fraction ``mask_ratio`` of the entries,
  drawn anew every ``save_freq`` edits), entries clamped to ``W0 +- norm_constraint``. The loss is the
  edit's target NLL with ``Ws`` in place of ``W0`` plus WISE's activation margins
  ``relu(D_out - D_in + gamma) + relu(D_out - alpha) + relu(beta - D_in)``, where ``D(x)`` is the
  mean over the sample's image + prompt positions (never the target, never padding) of the L2 norm
  of the FFN-output change ``a (Ws - W0)^T`` (``a`` = the FFN activation, the site ``mlp_activation``),
  ``D_in`` on the edit and ``D_out`` on ``irrelevant_samples`` unrelated samples drawn from a
  train-split locality pool. Each edit records its final ``D_in``;
- every ``save_freq`` edits the side memory becomes a **shard** and starts again from ``W0``;
- every ``merge_freq`` edits shards are merged with TIES (trim to ``merge_density``, elect signs,
  average the agreeing entries): ``mode: merge`` folds all shards into one **merged memory** (the first
  merge weighs the shards equally, later ones 0.4 for the new shards and 0.6 for the previous merged
  memory, as EasyEdit does); ``mode: retrieve`` merges the last ``merge_freq / save_freq`` shards into
  one retrievable shard.

**Inference** (per sample, state never changes): each memory ``m`` in play is a candidate with its
distance ``D_m`` (as above, on the query's image + prompt positions) and a threshold:
``act_ratio x`` the smallest recorded ``D_in`` of all edits (merge mode; candidates: the merged
memory, shards saved but not merged yet, the side memory) or of the shard's own edits (retrieve mode;
candidates: every shard and the side memory). The sample's FFN output comes from the candidate with
the largest distance above its threshold, or from ``W0`` (the unedited output, exactly) if none is.

Fixed against EasyEdit: inference never merges or appends (EasyEdit's ``__call__`` does, after
``save_freq`` edits); shards saved but not merged yet answer queries in merge mode (EasyEdit ignores
them until that mutating call); routing is per sample, not one ``.item()`` for the batch; padding and
the target never enter a distance; the side output keeps the layer's bias (EasyEdit's side forward
drops it, so an OPT ``fc2`` side memory differs from ``W0`` before any edit); weight decay acts inside
the shard's mask only (EasyEdit's decays every entry of the side memory, so its unmasked part drifts
from ``W0``); irrelevant samples come from a train split, never from evaluation records; distances
are on the FFN output itself (EasyEdit applies the model's activation function to it first).
"""
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from backbones.base import VLBatch
from backbones.sites import BLOCK_OUTPUT, MLP_ACTIVATION, MLP_OUTPUT, Site
from editors import EDITORS
from editors.base import BaseEditor
from editors.common import GrowingRows
from editors.lemoe.common import (IrrelevantPool, check_fields, item_seed, load_edited_state,
                                  query_mask, save_edited_state)
from utils.errors import UserError
from utils.losses import masked_nll
from vl_datasets.records import Sample

STATE_STEM = "wise_state"   # wise_state.safetensors (memories) + wise_state.json (fingerprint, counters, thresholds)
FORMAT = "wise-state-v1"
MODES = ("merge", "retrieve")


@dataclass
class WISEConfig:
    layer: int                  # decoder layer whose FFN output projection gets a side memory
    mode: str                   # merge | retrieve
    steps: int                  # SGD steps per edit, at most (EasyEdit n_iter)
    lr: float                   # SGD learning rate
    weight_decay: float         # SGD weight decay (inside the shard's mask)
    mask_ratio: float           # fraction of the side memory's entries a shard may change
    norm_constraint: float | None  # |Ws - W0| bound per entry; null: unbounded
    alpha: float                # margin: D_out should stay below alpha
    beta: float                 # margin: D_in should exceed beta
    gamma: float                # margin: D_in should exceed D_out by gamma
    act_ratio: float            # routing threshold = act_ratio x the smallest recorded D_in
    save_freq: int              # edits per shard
    merge_freq: int             # edits per merge (a multiple of save_freq)
    merge_density: float        # TIES: fraction of each shard's change kept (largest magnitudes)
    early_stop_loss: float      # stop an edit when the loss is below this ...
    early_stop_delta: float     # ... and changed by at most this since the previous step
    irrelevant_samples: int     # unrelated samples per edit for D_out
    irrelevant_dataset: str     # dataset whose train-split locality samples form the unrelated pool
    irrelevant_data_dir: str | None  # its data root (null: the project's data/)
    irrelevant_pool_size: int   # first N train records of that dataset
    seed: int                   # masks and draws (derived per shard / edit from this)

    def __post_init__(self):
        pos, nonneg = (lambda v: v >= 1, ">= 1"), (lambda v: v >= 0, ">= 0")
        frac = (lambda v: 0 < v <= 1, "in (0, 1]")
        check_fields(self, "wise", {
            "mode": (lambda v: v in MODES, " or ".join(MODES)), "steps": pos, "lr": (lambda v: v > 0, "> 0"),
            "weight_decay": nonneg, "mask_ratio": frac, "norm_constraint": (lambda v: v > 0, "> 0"),
            "alpha": nonneg, "beta": nonneg, "gamma": nonneg, "act_ratio": nonneg, "save_freq": pos,
            "merge_freq": pos, "merge_density": frac, "early_stop_loss": nonneg, "early_stop_delta": nonneg,
            "irrelevant_samples": pos, "irrelevant_pool_size": pos, "seed": nonneg})
        if self.merge_freq % self.save_freq:
            raise UserError(f"wise config: merge_freq must be a multiple of save_freq ({self.save_freq}), "
                            f"got {self.merge_freq}")


def ties_merge(deltas: torch.Tensor, weights: torch.Tensor, density: float) -> torch.Tensor:
    """TIES merging of task vectors ``deltas [n, ...]`` with ``weights [n]``: keep each one's largest
    ``density`` fraction by magnitude, elect each entry's sign from the weighted sum, and take the
    weighted mean of the entries that agree with it (0 where none does)."""
    n = deltas.shape[0]
    flat = deltas.reshape(n, -1)
    keep = max(1, math.ceil(density * flat.shape[1]))
    if keep < flat.shape[1]:
        cut = flat.abs().kthvalue(flat.shape[1] - keep + 1, dim=1, keepdim=True).values
        flat = torch.where(flat.abs() >= cut, flat, torch.zeros_like(flat))
    w = weights.to(flat)[:, None]
    weighted = flat * w
    elected = torch.where(weighted.sum(0) >= 0, 1.0, -1.0).to(flat)
    agree = (weighted.sign() == elected).to(flat)
    divisor = (w * agree).sum(0)
    divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    return ((weighted * agree).sum(0) / divisor).reshape(deltas.shape[1:])


def query_weights(batch: VLBatch) -> torch.Tensor:
    """[B, L] weights of a mean over each sample's image + prompt positions (0 on target and padding)."""
    m = query_mask(batch).float()
    return m / m.sum(1, keepdim=True).clamp(min=1)


def change_norm(a: torch.Tensor, delta: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """D per sample [B]: the weighted mean over positions of ||a delta^T|| (a [B, L, D], delta [d, D])."""
    return (F.linear(a.float(), delta).norm(dim=-1) * weights[:, :a.shape[1]]).sum(1)


@EDITORS.register("wise")
class WISEEditor(BaseEditor):
    name = "wise"
    config_class = WISEConfig

    def __init__(self, backbone, config: WISEConfig):
        super().__init__(backbone, config)
        n = backbone.num_layers
        if not -n <= config.layer < n:
            raise UserError(f"wise: layer {config.layer} out of range for {backbone.name} with {n} decoder layers")
        self.layer_index = config.layer % n
        module = backbone.mlp_output_projection(self.layer_index)
        self.W0 = module.weight.detach().float().clone()
        self.bias = None if module.bias is None else module.bias.detach().float().clone()
        self.shards = GrowingRows({"W": tuple(self.W0.shape)}, self.W0.device, torch.float32,
                                  initial_capacity=4)      # each row a whole FFN weight: start small
        self.pool = IrrelevantPool(config.irrelevant_dataset, config.irrelevant_data_dir,
                                   config.irrelevant_pool_size)
        self._additive = None  # whether the FFN output enters the layer output additively (checked once)
        self.restore()

    # ---- lifelong editing -------------------------------------------------------------------
    def restore(self) -> None:
        self.side = self.W0.clone()
        self.side_edits, self.side_min = 0, math.inf
        self.global_min = math.inf
        self.merged = None
        self.shards.clear()
        self.shard_min: list[float] = []
        self.mask = None
        self.n_edits = 0

    def _shard_mask(self, shard: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(item_seed(self.config.seed, shard, 3))
        return (torch.rand(self.W0.shape, generator=g) < self.config.mask_ratio).to(self.W0.device)

    def distance(self, a: torch.Tensor, W: torch.Tensor, batch: VLBatch) -> torch.Tensor:
        """D per sample [B]: mean over image + prompt positions of ||a (W - W0)^T||."""
        return change_norm(a, W - self.W0, query_weights(batch))

    def _run_edited_layer(self, batch: VLBatch, hidden: torch.Tensor):
        """-> (FFN activation, block output) of the edited layer, unedited, for ``batch`` given the
        output of the layer below. The activation does not depend on any memory of this layer."""
        out = {}

        def read(a, b):
            out["a"] = a.detach()
            return a

        def read_output(h, b):
            out["h"] = h.detach()
            return h
        l = self.layer_index
        self.backbone.logits_from(hidden, batch, l - 1, {Site(MLP_ACTIVATION, l): read, Site(BLOCK_OUTPUT, l): read_output})
        return out["a"], out["h"]

    def _side_logits(self, W, batch, hidden, a, h):
        """Logits of ``batch`` with ``W`` in place of ``W0``. When the FFN output enters the layer's
        output additively (pre-norm decoders: OPT-2.7B, Llama), from the cached block output ``h`` plus
        ``a (W - W0)^T`` (the layer is not run again); otherwise through the layer's named sites."""
        l = self.layer_index
        if self._additive:
            return self.backbone.logits_from(h + F.linear(a.float(), W - self.W0).to(h.dtype), batch, l)
        ctx = {}

        def read(x, b):
            ctx["a"] = x
            return x

        def side_output(y, b):
            return F.linear(ctx.pop("a").float(), W, self.bias).to(y.dtype)
        return self.backbone.logits_from(hidden, batch, l - 1, {Site(MLP_ACTIVATION, l): read,
                                                                 Site(MLP_OUTPUT, l): side_output})

    def _check_additive(self, batch, hidden, a, h) -> None:
        """Decide once whether the cached-block-output path equals running the layer (it does for
        pre-norm decoders); either way the result is the same, only the speed differs."""
        if self._additive is not None:
            return
        g = torch.Generator().manual_seed(0)
        W = self.W0 + 0.05 * torch.randn(self.W0.shape, generator=g).to(self.W0)
        self._additive = False
        slow = self._side_logits(W, batch, hidden, a, h)
        self._additive = True
        fast = self._side_logits(W, batch, hidden, a, h)
        self._additive = bool(torch.allclose(slow.float(), fast.float(), atol=1e-4, rtol=1e-3))

    def edit(self, request: Sample) -> None:
        cfg, bb, below = self.config, self.backbone, self.layer_index - 1
        if self.side_edits == 0:
            self.mask = self._shard_mask(self.n_edits // cfg.save_freq)
        batch = bb.encode([request])
        irrelevant = bb.encode(self.pool.draw(cfg.irrelevant_samples, item_seed(cfg.seed, self.n_edits, 2)),
                               with_targets=False)
        with torch.no_grad():
            hidden = bb.hidden_at(batch, below)
            a_edit, h_edit = self._run_edited_layer(batch, hidden)
            a_out, _ = self._run_edited_layer(irrelevant, bb.hidden_at(irrelevant, below))
            self._check_additive(batch, hidden, a_edit, h_edit)
        w_in, w_out = query_weights(batch), query_weights(irrelevant)
        lo = hi = None
        if cfg.norm_constraint is not None:
            lo, hi = self.W0 - cfg.norm_constraint, self.W0 + cfg.norm_constraint
        W = self.side.clone().requires_grad_(True)
        previous = None
        with torch.enable_grad():
            for _ in range(cfg.steps):
                nll = masked_nll(self._side_logits(W, batch, hidden, a_edit, h_edit), batch.labels)
                delta = W - self.W0
                d_in = change_norm(a_edit, delta, w_in)[0]
                d_out = change_norm(a_out, delta, w_out)
                loss = (nll + F.relu(d_out - d_in + cfg.gamma).mean() + F.relu(d_out - cfg.alpha).mean()
                        + F.relu(cfg.beta - d_in))
                value = loss.item()
                if previous is not None and abs(previous - value) <= cfg.early_stop_delta and value <= cfg.early_stop_loss:
                    break
                previous = value
                W.grad = None
                loss.backward()
                with torch.no_grad():
                    W -= cfg.lr * (W.grad + cfg.weight_decay * W) * self.mask
                    if lo is not None:
                        W.copy_(torch.maximum(torch.minimum(W, hi), lo))
        self.side = W.detach()
        with torch.no_grad():
            reached = self.distance(a_edit, self.side, batch)[0].item()
        self.side_min, self.global_min = min(self.side_min, reached), min(self.global_min, reached)
        self.side_edits += 1
        self.n_edits += 1
        if self.side_edits == cfg.save_freq:
            self.shards.append(W=self.side)
            self.shard_min.append(self.side_min)
            self.side, self.side_edits, self.side_min = self.W0.clone(), 0, math.inf
        if self.n_edits % cfg.merge_freq == 0:
            self._merge()

    def _merge(self) -> None:
        cfg = self.config
        if cfg.mode == "merge":
            n = len(self.shards)
            deltas = self.shards.view("W") - self.W0
            if self.merged is None:
                weights = torch.full((n,), 1.0 / n)
            else:
                deltas = torch.cat([deltas, (self.merged - self.W0)[None]])
                weights = torch.tensor([0.4 / n] * n + [0.6])
            self.merged = self.W0 + ties_merge(deltas, weights, cfg.merge_density)
            self.shards.clear()
            self.shard_min = []
        else:
            k = cfg.merge_freq // cfg.save_freq
            if k == 1:
                return
            start = len(self.shards) - k
            group = self.shards.view("W")[start:] - self.W0
            merged = self.W0 + ties_merge(group, torch.full((k,), 1.0 / k), cfg.merge_density)
            threshold = min(self.shard_min[start:])
            self.shards.truncate(start)
            del self.shard_min[start:]
            self.shards.append(W=merged)
            self.shard_min.append(threshold)

    # ---- inference --------------------------------------------------------------------------
    def candidates(self) -> list[tuple[torch.Tensor, float]]:
        """The memories a query may be routed to, each with its threshold."""
        r = self.config.act_ratio
        shards = [self.shards.view("W")[i] for i in range(len(self.shards))]
        if self.config.mode == "merge":
            mems = ([self.merged] if self.merged is not None else []) + shards
            mems += [self.side] if self.side_edits else []
            return [(m, r * self.global_min) for m in mems]
        out = [(w, r * t) for w, t in zip(shards, self.shard_min)]
        return out + ([(self.side, r * self.side_min)] if self.side_edits else [])

    def choose(self, a: torch.Tensor, batch: VLBatch, candidates=None) -> torch.Tensor:
        """Per sample, the index of the candidate memory it is routed to, or -1 (the unedited ``W0``)."""
        candidates = self.candidates() if candidates is None else candidates
        dist = torch.stack([self.distance(a, W, batch) for W, _ in candidates], 1)
        thr = torch.tensor([t for _, t in candidates], device=dist.device, dtype=dist.dtype)
        above = dist > thr
        best = torch.where(above, dist, torch.full_like(dist, -1.0)).argmax(1)
        return torch.where(above.any(1), best, torch.full_like(best, -1))

    def layer_edits(self) -> dict:
        candidates = self.candidates()
        if not candidates:
            return {}
        ctx = {}

        def read(a, batch):
            ctx["a"] = a
            return a

        def write(y, batch):
            a = ctx.pop("a")
            choice = self.choose(a, batch, candidates)
            out = y
            for c in choice.unique().tolist():
                if c >= 0:
                    y_c = F.linear(a.float(), candidates[c][0], self.bias).to(y.dtype)
                    out = torch.where((choice == c)[:, None, None], y_c, out)
            return out
        return {Site(MLP_ACTIVATION, self.layer_index): read, Site(MLP_OUTPUT, self.layer_index): write}

    def route_batch(self, batch: VLBatch) -> torch.Tensor:
        """``choose`` for a batch (runs the backbone); for tests and diagnostics."""
        out = {}
        self.backbone.logits(batch, {Site(MLP_ACTIVATION, self.layer_index): lambda a, b: out.setdefault("a", a)})
        return self.choose(out["a"], batch) if self.candidates() else torch.full((len(batch.input_ids),), -1)

    # ---- state ------------------------------------------------------------------------------
    def state_bytes(self) -> int:
        """Bytes of the memories the edits made: side memory (once edited), merged memory, shards."""
        per = self.W0.numel() * 4
        return per * (bool(self.side_edits) + (self.merged is not None)) + self.shards.nbytes()

    def _fingerprint(self) -> dict:
        return {"format": FORMAT, "editor": self.name, "backbone": self.backbone.name, "layer": self.layer_index,
                "shape": list(self.W0.shape), "config": asdict(self.config)}

    def save_state(self, directory: Path) -> None:
        tensors = {"side": self.side, "shards": self.shards.view("W")}
        if self.merged is not None:
            tensors["merged"] = self.merged
        finite = lambda v: None if math.isinf(v) else v
        save_edited_state(directory, STATE_STEM, tensors, self._fingerprint(), {
            "n_edits": self.n_edits, "side_edits": self.side_edits, "side_min": finite(self.side_min),
            "global_min": finite(self.global_min), "shard_min": self.shard_min})

    def load_state(self, directory: Path) -> None:
        tensors, meta = load_edited_state(directory, STATE_STEM, self._fingerprint(), self.name)
        self.restore()
        dev = self.W0.device
        self.side = tensors["side"].to(dev)
        self.merged = tensors["merged"].to(dev) if "merged" in tensors else None
        self.shards.load({"W": tensors["shards"]}, directory)
        unset = lambda v: math.inf if v is None else float(v)
        self.side_edits, self.n_edits = int(meta["side_edits"]), int(meta["n_edits"])
        self.side_min, self.global_min = unset(meta["side_min"]), unset(meta["global_min"])
        self.shard_min = [float(v) for v in meta["shard_min"]]
        if self.side_edits:
            self.mask = self._shard_mask(self.n_edits // self.config.save_freq)
