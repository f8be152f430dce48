"""LEMoE (BASELINES.md section 7): lifelong editing with a growing mixture of LoRA experts in one FFN.

Edits are buffered; every ``edits_per_expert`` edits a new expert is trained on the buffer (Adam, at
most ``max_steps`` steps, until the batch NLL is below ``min_loss``) and then frozen. Expert ``n`` is a
low-rank FFN beside the FFN of decoder layer ``layer``: it reads the FFN's input ``x`` (the named site
``mlp_input``) and its output is added to the FFN's output (``mlp_output``):

    E_n(x) = relu(x C1_n R1_n^T) C2_n R2_n^T,       y = mlp(x) + sum_n w_n E_n(x) at every position,

with the router ``w = softmax_n(s_n)``, ``s_n = <silu(q Kd_n) Ku_n, k_n>`` and ``q`` the mean of ``x``
over the sample's image + prompt positions (per sample; never the target, never padding). Every
parameter starts at ``randn * init_std``.

Differences from the authors' code (each one a config flag where it changes numbers):
- the router anchors ``k_n`` are trained with the rest of the new expert (``train_router_keys``; the
  authors leave them out of the optimiser, so they stay at their random initialisation);
- buffered edits answer queries (``flush_before_query``): before any query an expert is trained on
  the partial buffer. It is *provisional*: the next edit discards it and the buffer keeps filling, so
  the committed experts (one per ``edits_per_expert`` edits) do not depend on when queries happen.
  With the flag off, buffered edits are invisible to queries (the authors' code raises instead);
- an optional locality term (``locality_weight``): KL(unedited || edited) on the answers of
  ``locality_samples`` unrelated samples drawn from a train-split pool (the authors have none);
- the routing mean excludes padding and the target (the authors average every position of a padded
  batch, so a training batch routes differently from the same sample alone);
- training runs only the layers from ``layer`` up, from the cached output of layer ``layer - 1``.

Storage is preallocated and doubles; ``restore()`` drops experts and buffer (the backbone is never
modified, so logits are bit-identical to the unedited model's).
"""
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from backbones.base import VLBatch
from backbones.sites import MLP_INPUT, MLP_OUTPUT, Site
from editors import EDITORS
from editors.base import BaseEditor
from editors.common import GrowingRows
from editors.lemoe.common import (IrrelevantPool, check_fields, item_seed, load_edited_state,
                                  query_mean, save_edited_state)
from editors.liveedit.editor import select_rows
from utils.errors import UserError
from utils.losses import masked_kl, masked_nll
from vl_datasets.records import Sample

STATE_STEM = "lemoe_state"   # lemoe_state.safetensors (experts) + lemoe_state.json (fingerprint, requests)
FORMAT = "lemoe-state-v1"
EXPERT_CHUNK = 16  # experts evaluated together at inference (bounds the [B, L, n, D] intermediate)


@dataclass
class LEMoEConfig:
    layer: int                  # decoder layer whose FFN the experts sit beside (negative: from the top)
    rank: int                   # LoRA rank r of each expert
    router_hidden: int          # width of each expert's router MLP (authors: d / 4)
    edits_per_expert: int       # buffer size: one expert per this many edits (authors: 20)
    max_steps: int              # Adam steps per expert, at most
    lr: float                   # Adam learning rate
    min_loss: float             # stop training an expert once its loss is below this
    init_std: float             # every new parameter starts at randn * init_std (authors: 0.01)
    train_router_keys: bool     # true: anchors k_n are trained; false: authors' untrained random anchors
    flush_before_query: bool    # true: buffered edits answer queries; false: they do not (authors)
    null_expert: bool           # true: the softmax also holds an expert with score 0 and output 0 (not in the authors')
    locality_weight: float      # weight of the KL locality term (0: off, as the authors)
    locality_samples: int       # unrelated samples per expert for that term
    irrelevant_dataset: str     # dataset whose train-split locality samples form the unrelated pool
    irrelevant_data_dir: str | None  # its data root (null: the project's data/)
    irrelevant_pool_size: int   # first N train records of that dataset
    seed: int                   # initialisation and draws (per expert: derived from this)

    def __post_init__(self):
        pos, nonneg = (lambda v: v >= 1, ">= 1"), (lambda v: v >= 0, ">= 0")
        check_fields(self, "lemoe", {
            "rank": pos, "router_hidden": pos, "edits_per_expert": pos, "max_steps": pos,
            "lr": (lambda v: v > 0, "> 0"), "min_loss": nonneg, "init_std": (lambda v: v > 0, "> 0"),
            "locality_weight": nonneg, "locality_samples": nonneg, "irrelevant_pool_size": pos, "seed": nonneg})
        if self.locality_weight > 0 and self.locality_samples < 1:
            raise UserError("lemoe config: locality_samples must be >= 1 when locality_weight > 0, "
                            f"got {self.locality_samples}")


def route_scores(q: torch.Tensor, experts: dict) -> torch.Tensor:
    """Router scores ``s [B, n]`` of queries ``q [B, d]``."""
    v = F.silu(torch.einsum("bd,ndh->bnh", q, experts["kd"]))
    v = torch.einsum("bnh,nhd->bnd", v, experts["ku"])
    return torch.einsum("bnd,nd->bn", v, experts["key"])


def expert_outputs(x: torch.Tensor, experts: dict) -> torch.Tensor:
    """``E_n(x)`` for every expert: x [B, L, d] -> [B, L, n, d]."""
    z = torch.einsum("bld,ndr->blnr", x, experts["C1"])
    a = F.relu(torch.einsum("blnr,nfr->blnf", z, experts["R1"]))
    return torch.einsum("blnr,ndr->blnd", torch.einsum("blnf,nfr->blnr", a, experts["C2"]), experts["R2"])


def slice_experts(experts: dict, start: int, stop: int) -> dict:
    return {k: v[start:stop] for k, v in experts.items()}


@EDITORS.register("lemoe")
class LEMoEEditor(BaseEditor):
    name = "lemoe"
    config_class = LEMoEConfig

    def __init__(self, backbone, config: LEMoEConfig):
        super().__init__(backbone, config)
        n = backbone.num_layers
        if not -n <= config.layer < n:
            raise UserError(f"lemoe: layer {config.layer} out of range for {backbone.name} with {n} decoder layers")
        self.layer_index = config.layer % n
        proj = backbone.mlp_output_projection(self.layer_index)
        d, D, r, h = proj.out_features, proj.in_features, config.rank, config.router_hidden
        self.shapes = {"C1": (d, r), "R1": (D, r), "C2": (D, r), "R2": (d, r),
                       "kd": (d, h), "ku": (h, d), "key": (d,)}
        self.experts = GrowingRows(self.shapes, backbone.device, torch.float32,
                                  initial_capacity=4)     # each row a whole expert: start small
        self.pool = IrrelevantPool(config.irrelevant_dataset, config.irrelevant_data_dir,
                                   config.irrelevant_pool_size)
        self.buffer: list[Sample] = []
        self.pending = None          # provisional expert trained on the buffer (None: not trained yet)
        self.edited: list[Sample] = []  # requests of the committed experts, in order

    # ---- lifelong editing -------------------------------------------------------------------
    def edit(self, request: Sample) -> None:
        self.buffer.append(request)
        self.pending = None
        self.n_edits += 1
        if len(self.buffer) >= self.config.edits_per_expert:
            self.experts.append(**self._train_expert(self.buffer, len(self.experts)))
            self.edited.extend(self.buffer)
            self.buffer = []

    def restore(self) -> None:
        self.experts.clear()
        self.buffer, self.pending, self.edited = [], None, []
        self.n_edits = 0

    def flush(self) -> None:
        """Train the provisional expert on the buffered edits (if any, and not yet trained)."""
        if self.buffer and self.config.flush_before_query and self.pending is None:
            self.pending = self._train_expert(self.buffer, len(self.experts))

    def _groups(self) -> list[dict]:
        """The experts a query sees: committed ones, then the provisional one."""
        groups = []
        if len(self.experts):
            groups.append({k: self.experts.view(k) for k in self.shapes})
        if self.pending is not None and self.config.flush_before_query:
            groups.append({k: v[None] for k, v in self.pending.items()})
        return groups

    # ---- inference --------------------------------------------------------------------------
    def routing(self, x: torch.Tensor, batch: VLBatch) -> torch.Tensor:
        """Router weights [B, n] of every sample (committed experts, then the provisional one), from
        the FFN input ``x`` at the sample's image + prompt positions."""
        q = query_mean(x.float(), batch)
        w = torch.softmax(self._scores(q, self._groups()), 1)
        return w[:, :-1] if self.config.null_expert else w

    def _scores(self, q: torch.Tensor, groups: list[dict]) -> torch.Tensor:
        """Router scores [B, n] of the experts in ``groups``, plus a last column of zeros for the null
        expert (an expert whose output is 0) when the config has one."""
        scores = [route_scores(q, g) for g in groups]
        if self.config.null_expert:
            scores.append(q.new_zeros(q.shape[0], 1))
        return torch.cat(scores, 1) if scores else q.new_zeros(q.shape[0], 0)

    def _mixture(self, x: torch.Tensor, batch: VLBatch) -> torch.Tensor:
        w = self.routing(x, batch)
        x32, out, col = x.float(), 0, 0
        for g in self._groups():
            n = g["key"].shape[0]
            for s in range(0, n, EXPERT_CHUNK):
                part = slice_experts(g, s, min(s + EXPERT_CHUNK, n))
                k = part["key"].shape[0]
                out = out + torch.einsum("blnd,bn->bld", expert_outputs(x32, part), w[:, col:col + k])
                col += k
        return out

    def layer_edits(self) -> dict:
        self.flush()
        if not self._groups():
            return {}
        return self._site_edits(self._mixture)

    def _site_edits(self, mixture) -> dict:
        """The two site edits of one forward: read the FFN input, add ``mixture(x, batch)`` to its output."""
        ctx = {}

        def read_input(x, batch):
            ctx["delta"] = mixture(x, batch)
            return x

        def add_output(y, batch):
            return y + ctx.pop("delta").to(y.dtype)
        return {Site(MLP_INPUT, self.layer_index): read_input, Site(MLP_OUTPUT, self.layer_index): add_output}

    # ---- training one expert ----------------------------------------------------------------
    def initial_expert(self, index: int) -> dict[str, torch.Tensor]:
        """Expert ``index`` before training: every tensor ``randn * init_std``, seeded per expert."""
        g = torch.Generator().manual_seed(item_seed(self.config.seed, index))
        return {k: (torch.randn(s, generator=g) * self.config.init_std).to(self.backbone.device)
                for k, s in self.shapes.items()}

    def _train_expert(self, requests: list[Sample], index: int) -> dict[str, torch.Tensor]:
        """A new expert (and its router) trained on ``requests``; the existing experts stay frozen.
        Out of inference mode from the start (a flush may come from a scoring pass): the expert's
        parameters and the encoded batch must be ordinary tensors for autograd."""
        with torch.inference_mode(False), torch.enable_grad():
            return self._fit_expert(requests, index)

    def _fit_expert(self, requests: list[Sample], index: int) -> dict[str, torch.Tensor]:
        cfg, bb, below = self.config, self.backbone, self.layer_index - 1
        params = {k: v.requires_grad_(True) for k, v in self.initial_expert(index).items()}
        trained = [p for k, p in params.items() if k != "key" or cfg.train_router_keys]
        n_edit = len(requests)
        loc = self.pool.draw(cfg.locality_samples, item_seed(cfg.seed, index, 1)) if cfg.locality_weight > 0 else []
        batch = bb.encode(list(requests) + loc)
        # the committed experts (a provisional one never exists while an expert is trained)
        old = [{k: self.experts.view(k) for k in self.shapes}] if len(self.experts) else []
        cache = {}

        def mixture(x, b):
            if "x" not in cache:  # the FFN input does not depend on the experts: computed once
                with torch.no_grad():
                    x32 = x.float()
                    cache["x"], cache["q"] = x32, query_mean(x32, b)
                    scores = self._scores(cache["q"], old)
                    if scores.shape[1]:
                        w_old = torch.softmax(scores, 1)
                        cache["lse"] = torch.logsumexp(scores, 1)
                        n_old = old[0]["key"].shape[0] if old else 0
                        cache["mix"] = sum((torch.einsum("blnd,bn->bld", expert_outputs(x32, slice_experts(old[0], s, s + EXPERT_CHUNK)),
                                                         w_old[:, s:min(s + EXPERT_CHUNK, n_old)])
                                            for s in range(0, n_old, EXPERT_CHUNK)), torch.zeros_like(x32))
            new = {k: v[None] for k, v in params.items()}
            e_new = expert_outputs(cache["x"], new)[:, :, 0]
            if "lse" not in cache:  # a single expert takes the whole softmax
                return e_new
            # softmax over [old experts (and the null expert), new]: the old ones keep their relative weights
            w_new = torch.sigmoid(route_scores(cache["q"], new)[:, 0] - cache["lse"])[:, None, None]
            return (1 - w_new) * cache["mix"] + w_new * e_new

        with torch.enable_grad():
            with torch.no_grad():
                hidden = bb.hidden_at(batch, below)
                rows = torch.arange(n_edit, len(batch.input_ids), device=hidden.device)
                ref = bb.logits_from(hidden[n_edit:], select_rows(batch, rows), below) if loc else None
            optimiser = torch.optim.Adam(trained, lr=cfg.lr)
            edits = self._site_edits(mixture)
            for _ in range(cfg.max_steps):
                logits = bb.logits_from(hidden, batch, below, edits)
                loss = masked_nll(logits[:n_edit], batch.labels[:n_edit])
                if loc:
                    loss = loss + cfg.locality_weight * masked_kl(logits[n_edit:], ref, batch.labels[n_edit:])
                if loss.item() < cfg.min_loss:
                    break
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
        return {k: p.detach() for k, p in params.items()}

    # ---- state ------------------------------------------------------------------------------
    def state_bytes(self) -> int:
        """Bytes of the experts the edits added (committed and provisional)."""
        return self.experts.nbytes() + (self.experts.row_bytes() if self.pending is not None else 0)

    def _fingerprint(self) -> dict:
        return {"format": FORMAT, "editor": self.name, "backbone": self.backbone.name, "layer": self.layer_index,
                "shapes": {k: list(v) for k, v in self.shapes.items()}, "config": asdict(self.config)}

    def save_state(self, directory: Path) -> None:
        self.flush()
        tensors = self.experts.state()
        if self.pending is not None:
            tensors.update({f"pending.{k}": v for k, v in self.pending.items()})
        as_dict = lambda s: {"prompt": s.prompt, "target": s.target, "image": s.image}
        save_edited_state(directory, STATE_STEM, tensors, self._fingerprint(), {
            "n_edits": self.n_edits, "edited": [as_dict(s) for s in self.edited],
            "buffer": [as_dict(s) for s in self.buffer]})

    def load_state(self, directory: Path) -> None:
        tensors, meta = load_edited_state(directory, STATE_STEM, self._fingerprint(), self.name)
        pending = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("pending.")}
        self.restore()
        self.experts.load({k: v for k, v in tensors.items() if not k.startswith("pending.")}, directory)
        self.pending = {k: v.to(self.backbone.device) for k, v in pending.items()} or None
        self.edited = [Sample(**s) for s in meta["edited"]]
        self.buffer = [Sample(**s) for s in meta["buffer"]]
        self.n_edits = int(meta["n_edits"])
