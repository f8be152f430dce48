"""LiveEdit (CVPR, arXiv 2411.15432): lifelong editing of a frozen VLLM with a low-rank mixture of
experts, one expert per edit, routed by visual (hard filtering against a learned vision sentinel) and
textual (soft routing) features. Definitions: DESIGN.md section 3."""
import hashlib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from backbones.base import LayerEdit, VLBackbone, VLBatch
from backbones.devices import module_device
from editors import EDITORS
from editors.base import BaseEditor
from editors.common import check_trained_state
from editors.liveedit.config import LOSS_TERMS, LiveEditConfig
from editors.liveedit.modules import (FeatureExtractor, LowRankGenerator, expert_mixture, paired_similarity,
                                      similarity)
from editors.liveedit.index import LowRankBound
from editors.liveedit.repository import ExpertRepository
from utils.distributed import gather_rows, local_rows
from utils.errors import UserError
from utils.losses import masked_kl, masked_nll
from vl_datasets.records import EditRecord, Sample


@dataclass
class TrainingBatch:
    """``prepare_training_batch``'s result: one encoded batch of every sample of the records."""

    n_records: int
    batch: VLBatch            # rows: R edits, R text rephrases, R image rephrases, R image locs
    image_ids: torch.Tensor   # [R] an id of each record's edit image file (same file, same id)


def _path_id(path: str) -> int:
    """A stable 63-bit id of an image file path (records that edit the same file share it)."""
    return int.from_bytes(hashlib.sha256(str(path).encode()).digest()[:8], "little") >> 1


def span_masks(batch: VLBatch):
    """Per-sample position masks [B, L] (bool) of the vision, prompt and target spans."""
    L = batch.inputs_embeds.shape[1]
    pos = torch.arange(L, device=batch.vision_range.device)[None]

    def inside(r):
        return (pos >= r[:, :1]) & (pos < r[:, 1:])
    return inside(batch.vision_range), inside(batch.prompt_range), inside(batch.target_range)


def select_rows(batch: VLBatch, rows: torch.Tensor) -> VLBatch:
    """The sub-batch of the given rows (same padded length)."""
    return replace(batch, **{f.name: getattr(batch, f.name)[rows] for f in fields(batch)})


class LiveEditNet(nn.Module):
    """All trainable modules: both extractors, both generators, ``LN_x``."""

    def __init__(self, d: int, n_vision: int, cfg: LiveEditConfig):
        super().__init__()
        k, d_m, h, r, proj = cfg.n_queries, cfg.d_m, cfg.heads, cfg.rank, cfg.attention_out_proj
        self.edit_extractor = FeatureExtractor(d, d_m, k, h, out_proj=proj)
        self.input_extractor = FeatureExtractor(d, d_m, k, h, n_vision=n_vision, out_proj=proj,
                                                sentinel_init=cfg.sentinel_init)
        self.gen_u = LowRankGenerator(d, d_m, r, h, cfg.scale, out_proj=proj)
        self.gen_v = LowRankGenerator(d, d_m, r, h, cfg.scale, out_proj=proj)
        self.ln_x = nn.LayerNorm(d)
        if cfg.zero_init_v:
            # LoRA-style start (this project's first modules): a fresh editor's experts add nothing
            last = self.gen_v.attn.out if proj else self.gen_v.attn.v
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)


@EDITORS.register("liveedit")
class LiveEdit(BaseEditor):
    name = "liveedit"
    config_class = LiveEditConfig
    trainable = True

    def __init__(self, backbone: VLBackbone, config: LiveEditConfig):
        super().__init__(backbone, config)
        if not 0 <= config.edit_layer < backbone.num_layers:
            raise UserError(f"liveedit.edit_layer={config.edit_layer} is out of range for backbone "
                            f"{backbone.name!r} with {backbone.num_layers} decoder layers "
                            f"(0..{backbone.num_layers - 1})")
        self.layer = config.edit_layer
        d = backbone.hidden_size
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.net = LiveEditNet(d, backbone.n_vision_tokens, config)
        # on the device of the layer whose output it reads (a split model: not the first device)
        dev = module_device(backbone.layer(self.layer))
        self.net.to(dev).eval()
        self.generator = torch.Generator().manual_seed(config.seed)
        index = (LowRankBound(config.filter_index_rank, config.filter_index_min)
                 if config.filter_index_rank is not None else None)
        self.repository = ExpertRepository(config.n_queries, config.d_m, config.rank, d, device=dev, index=index)
        # training only (config.negative_pool): earlier batches' edit requests, as
        # (layer-l_e hidden [b, L, d], vision mask, prompt mask, image ids [b]), oldest first
        self.negative_pool: list[tuple] = []

    @property
    def device(self) -> torch.device:
        """Where the trainable modules and the expert repository live: layer l_e's device."""
        return self.net.ln_x.weight.device

    @classmethod
    def from_backbone(cls, backbone: VLBackbone, config_path=None) -> "LiveEdit":
        """The editor with its config for this backbone (``configs/liveedit/<backbone>.yaml``)."""
        from utils.config import load_config
        return cls(backbone, load_config(LiveEditConfig, cls.name, backbone.name, config_path))

    # ---- features --------------------------------------------------------------------------
    def _edit_side(self, hidden: torch.Tensor, batch: VLBatch):
        """Edit-side features and experts of teacher-forced edit samples: (phi_hat, psi_hat, U, V)."""
        h = hidden.float()
        vision, prompt, target = span_masks(batch)
        feats = self.net.edit_extractor(h, vision, prompt)
        span = vision | prompt | target                       # H_e = concat(H_v, H_p, H_o)
        return feats.phi, feats.psi, self.net.gen_u(h, span), self.net.gen_v(h, span)

    def _input_side(self, hidden: torch.Tensor, batch: VLBatch):
        vision, prompt, _ = span_masks(batch)
        return self.net.input_extractor(hidden.float(), vision, prompt)

    # ---- lifelong editing ------------------------------------------------------------------
    @torch.no_grad()
    def edit_batch(self, requests: Sequence[Sample]) -> None:
        """Append one expert per request (independent of each other: the same as ``edit`` in order)."""
        if not requests:
            return
        missing = [r for r in requests if r.image is None]
        if missing:
            raise UserError(f"LiveEdit edits need an image; request {missing[0].prompt!r} has none")
        batch = self.backbone.encode(requests)
        hidden = self.backbone.hidden_at(batch, self.layer)
        phi, psi, U, V = self._edit_side(hidden, batch.to(hidden.device))
        self.repository.append(phi, psi, U, V, [{"prompt": r.prompt, "target": r.target, "image": r.image}
                                                for r in requests])
        self.n_edits += len(requests)

    def edit(self, request: Sample) -> None:
        self.edit_batch([request])

    def restore(self) -> None:
        self.repository.clear()
        self.n_edits = 0

    def route(self, hidden: torch.Tensor, batch: VLBatch):
        """Routing of every sample with an image against the repository, from the layer-l_e output:
        (rows [b] of the batch that have an image, weights [b, N], kept [b, N])."""
        rows, routing = self.route_kept(hidden, batch)
        return (rows, *self.repository.dense(*routing))

    def route_kept(self, hidden: torch.Tensor, batch: VLBatch):
        """(rows [b] with an image, (cols [M], weights [b, M], kept [b, M])): ``route`` on the kept
        experts' columns only."""
        rows = batch.has_image.nonzero().flatten()
        if rows.numel() == 0:
            dev = hidden.device
            return rows, (rows, torch.zeros(0, 0, device=dev), torch.zeros(0, 0, dtype=torch.bool, device=dev))
        sub = select_rows(batch, rows)
        feats = self._input_side(hidden[rows], sub)
        return rows, self.repository.route_kept(feats.phi, feats.psi, feats.phi_sentinel, self.config.max_kept,
                                                self.config.filter_margin, self.config.max_kept_by)

    def _routing(self, hidden: torch.Tensor, batch: VLBatch):
        """(rows, cols, weights, kept) of the samples that keep at least one expert; None if none does."""
        if len(self.repository) == 0 or not bool(batch.has_image.any()):
            return None
        with torch.no_grad():
            rows, (cols, weights, kept) = self.route_kept(hidden, batch)
            any_kept = kept.any(1)
            if not bool(any_kept.any()):
                return None
            return rows[any_kept], cols, weights[any_kept], kept[any_kept]

    def _add_residual(self, hidden: torch.Tensor, routing) -> torch.Tensor:
        """The routed experts' residual added on every position of the routed samples; every other
        sample is returned bit for bit."""
        if routing is None:
            return hidden
        rows, cols, weights, _ = routing
        with torch.no_grad():
            delta = self.repository.residual(self.net.ln_x(hidden[rows].float()), weights, cols)
        out = hidden.clone()
        out[rows] = hidden[rows] + delta.to(hidden.dtype)
        return out

    def _intervene(self, hidden: torch.Tensor, batch: VLBatch) -> torch.Tensor:
        """The edit-layer intervention (inference): route, then add the residual."""
        return self._add_residual(hidden, self._routing(hidden, batch))

    def layer_edits(self) -> dict[int, LayerEdit]:
        return {self.layer: self._intervene} if len(self.repository) else {}

    def decoding_edits(self) -> dict[int, LayerEdit]:
        """Cached decoding: routing reads only the prompt's image and text spans, so it is computed
        once, on the prompt, and its experts' residual (a function of each position alone) is
        added at layer l_e on every new token too: the full forward's result."""
        if not len(self.repository):
            return {}
        routing = {}

        def edit(hidden, batch):
            if batch is not None:      # the prompt
                routing["prompt"] = self._routing(hidden, batch)
            return self._add_residual(hidden, routing["prompt"])
        return {self.layer: edit}

    # ---- training --------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.net.parameters())

    def train(self, mode: bool = True) -> "LiveEdit":
        self.net.train(mode)
        return self

    def eval(self) -> "LiveEdit":
        return self.train(False)

    def rng_state(self) -> torch.Tensor:
        """State of the editor's generator (the random expert sets of training), for exact resume."""
        return self.generator.get_state()

    def set_rng_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)

    def training_memory(self) -> list[tuple]:
        """The negative pool (saved in training checkpoints, so a resumed run continues exactly)."""
        return [tuple(t.to("cpu") for t in entry) for entry in self.negative_pool]

    def set_training_memory(self, memory: list[tuple]) -> None:
        self.negative_pool = [tuple(t.to(self.device) for t in entry) for entry in memory]

    def _pool_features(self):
        """(phi_hat [P, k, d_m] of the global negative pool, with gradient, its image ids [P]), or
        (None, None) when the pool is off or empty on every process."""
        if not self.config.negative_pool:
            return None, None
        k, d_m, dev = self.config.n_queries, self.config.d_m, self.device
        phis = [self.net.edit_extractor(h.float(), v, p).phi for h, v, p, _ in self.negative_pool]
        phi = torch.cat(phis) if phis else torch.zeros(0, k, d_m, device=dev)
        ids = (torch.cat([e[3] for e in self.negative_pool]) if self.negative_pool
               else torch.zeros(0, dtype=torch.long, device=dev))
        phi, ids = gather_rows(phi), gather_rows(ids)
        return (phi, ids) if phi.shape[0] else (None, None)

    def _remember(self, hidden, vision, prompt, image_ids) -> None:
        """Push this batch's edit requests into the negative pool, dropping the oldest beyond its size."""
        if not self.config.negative_pool:
            return
        self.negative_pool.append((hidden.detach(), vision, prompt, image_ids))
        while sum(e[3].shape[0] for e in self.negative_pool) > self.config.negative_pool:
            self.negative_pool.pop(0)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights of every trainable module (the RNG state is separate: ``rng_state()``)."""
        return {k: v.detach().clone() for k, v in self.net.state_dict().items()}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        check_trained_state(state, self.net.state_dict(), "LiveEdit",
                            f"backbone {self.backbone.name!r} with hidden size {self.backbone.hidden_size}, "
                            f"d_m={self.config.d_m}, rank={self.config.rank}, n_queries={self.config.n_queries}")
        self.net.load_state_dict(state)

    def prepare_training_batch(self, records: Sequence[EditRecord]) -> "TrainingBatch":
        """Encode every sample of a batch of records in one call (no randomness: the training loop
        may run this in its prefetch thread); ``training_losses`` accepts the result."""
        if not records:
            raise UserError("LiveEdit training needs at least one record per batch")
        for r in records:
            for kind, s in (("edit", r.edit), ("text_rephrase", r.text_rephrase),
                            ("image_rephrase", r.image_rephrase), ("image_loc", r.image_loc)):
                if s.image is None:
                    raise UserError(f"record {r.index}: LiveEdit training needs an image on its {kind} sample")
        samples = ([r.edit for r in records] + [r.text_rephrase for r in records]
                   + [r.image_rephrase for r in records] + [r.image_loc for r in records])
        image_ids = torch.tensor([_path_id(r.edit.image) for r in records], dtype=torch.long)
        return TrainingBatch(len(records), self.backbone.encode(samples), image_ids)

    def _draws(self, G: int) -> dict:
        """Every random choice of one training step, for the G records of the *global* batch, from
        the editor's generator (seeded alike on every process, so data-parallel processes draw the
        same and each takes its rows)."""
        g = self.generator
        ri = lambda hi, shape: torch.randint(0, hi, shape, generator=g)
        return {"a_kind": ri(3, (G,)),           # routing pair, first sample: rel, gen or loc
                "a_gen": ri(2, (G,)),            # ... a gen sample: text or image rephrase
                "b_pick": ri(3, (G,)),           # ... second sample of a rel/gen pair: rel, t-gen, m-gen
                "s_order": ri(2, (G,)),          # sentinel pair: (rel/gen, loc) or (loc, rel/gen)
                "s_pick": ri(3, (G,)),           # ... its rel/gen sample
                "set_size": ri(G + 1, (G, 4)),   # expert sets: n of the batch's experts per sample kind
                "set_scores": torch.rand(G, 4, G, generator=g)}   # "random" sets: which n

    def _expert_sets(self, draws: dict, offset: int, R: int, G: int, dev) -> torch.Tensor:
        """[4R, G] bool: the experts adapting each local sample (rows kind-major: rel, t-gen, m-gen,
        loc). Rel and gen samples get their record's expert, every sample n more of the batch's."""
        n = draws["set_size"][offset:offset + R].T.reshape(-1)            # [4R], kind-major
        cols = torch.arange(G)
        own_col = (offset + torch.arange(R)).repeat(4)
        own = (cols[None] == own_col[:, None]) & (torch.arange(4 * R) < 3 * R)[:, None]
        if self.config.expert_sets == "prefix":
            extra = cols[None] < n[:, None]
        else:   # a random n of the others; a loc sample at least one
            scores = draws["set_scores"][offset:offset + R].transpose(0, 1).reshape(4 * R, G)
            rank = scores.masked_fill(own, 2.0).argsort(1).argsort(1)
            n = torch.where(own.any(1), n.clamp(max=G - 1), n.clamp(min=1))
            extra = rank < n[:, None]
        return (own | extra).to(dev)

    def training_losses(self, records) -> dict[str, torch.Tensor]:
        """Weighted loss terms for a batch of records, or of ``prepare_training_batch(records)``
        (DESIGN section 3, "Training"): ``rel``, ``gen`` (token NLL of the adapted model, mean over
        samples), ``loc`` (KL to the unedited model on M-Loc samples), ``soft_relative``,
        ``soft_absolute`` (soft routing), ``hard_neighbour``, ``hard_sentinel`` (hard routing).

        Rows of the one encoded batch: R edit requests, R text rephrases, R image rephrases, R
        locality samples. The frozen model runs once to layer l_e for all of them; every loss runs
        only layers l_e+1.. and the head from those captured states. Under data parallel, experts
        and the features that samples are contrasted with are gathered from every process
        (``utils/distributed.py``), so each process scores its rows against the global batch."""
        prepared = records if isinstance(records, TrainingBatch) else self.prepare_training_batch(records)
        bb, le, dev = self.backbone, self.layer, self.device
        R, batch = prepared.n_records, prepared.batch.to(dev)
        offset, G = local_rows(R, dev)

        with torch.no_grad():
            hidden = bb.hidden_at(batch, le)                    # [4R, L, d], frozen, taken once
        h = hidden.float()
        vision, prompt, target = span_masks(batch)
        ifeat = self.net.input_extractor(h, vision, prompt)     # input side, every sample
        efeat = self.net.edit_extractor(h, vision, prompt)      # edit side, every sample
        span = (vision | prompt | target)[:R]                  # H_e = concat(H_v, H_p, H_o)
        U = gather_rows(self.net.gen_u(h[:R], span))            # experts of the global batch
        V = gather_rows(self.net.gen_v(h[:R], span))
        psi_hat = gather_rows(efeat.psi[:R])
        draws = self._draws(G)

        # each sample adapted by its expert set, weighted by soft routing
        sets = self._expert_sets(draws, offset, R, G, dev)
        t = similarity(ifeat.psi, psi_hat)                      # [4R, G]
        masked = t.masked_fill(~sets, float("-inf"))
        masked = torch.where(sets.any(1, keepdim=True), masked, torch.zeros_like(t))  # no NaN rows
        w = torch.where(sets, torch.softmax(masked, 1) * torch.sigmoid(t), torch.zeros_like(t))
        delta = expert_mixture(self.net.ln_x(h), w, U, V)
        logits = bb.logits_from(hidden + delta.to(hidden.dtype), batch, le)
        nll = masked_nll(logits[:3 * R], batch.labels[:3 * R], per_sample=True)   # each sample's token mean
        loc_rows = torch.arange(3 * R, 4 * R, device=dev)
        with torch.no_grad():                                   # the unedited model, same captured states
            ref = bb.logits_from(hidden[loc_rows], select_rows(batch, loc_rows), le)
        losses = {"rel": nll[:R].mean(), "gen": nll[R:].mean(),
                  "loc": masked_kl(logits[3 * R:], ref, batch.labels[3 * R:], per_sample=True).mean()}

        # hard routing never contrasts two records that edit the same image (their experts may
        # rightly both apply): those columns are left out
        image_ids = prepared.image_ids.to(dev)
        same_image = image_ids[:, None] == gather_rows(image_ids)[None]               # [R, G]
        same_image &= torch.arange(G, device=dev)[None] != (offset + torch.arange(R, device=dev))[:, None]
        pool_phi, pool_ids = self._pool_features()
        pool = None
        if pool_phi is not None:   # (features [P], same edit image [R, P], which of the 4R samples meet it [4R])
            meets = torch.arange(4 * R, device=dev) >= (3 * R if self.config.negative_pool_rows == "locality" else 0)
            pool = (pool_phi, image_ids[:, None] == pool_ids[None], meets)
        routing = (self._neighbourhood_routing if self.config.routing_pairs == "neighbourhood"
                   else self._edit_request_routing)
        losses.update(routing(ifeat, efeat, draws, offset, R, G, same_image, pool))
        self._remember(hidden[:R], vision[:R], prompt[:R], image_ids)
        weights = self.config.loss_weights
        # on one device (logits, hence rel / gen / loc, sit on the LM head's device)
        return {name: (losses[name] * getattr(weights, name)).to(dev) for name in LOSS_TERMS}

    @staticmethod
    def _soft_losses(t: torch.Tensor, own: torch.Tensor) -> dict:
        """Soft routing over [A, G] similarities with ``own`` [A, G] marking the matching column."""
        absolute = -F.logsigmoid(t[own]).mean()
        if t.shape[1] > 1:
            absolute = absolute - F.logsigmoid(-t[~own]).mean()
        return {"soft_relative": F.cross_entropy(t, own.float().argmax(1)), "soft_absolute": absolute}

    @staticmethod
    def _pool_columns(pool, rows, records):
        """The pool's (features, blocked [A, P]) for input rows ``rows`` of the 4R samples belonging to
        records ``records`` [A]: blocked where the record edits the same image, or the row does not
        meet the pool (``negative_pool_rows``); None without a pool."""
        if pool is None:
            return None
        phi, same_image, meets = pool
        return phi, same_image[records] | ~meets[rows][:, None]

    @staticmethod
    def _hard_logits(ifeat, rows, phi_hat, blocked, pool=None) -> torch.Tensor:
        """[A, G (+ P) + 1]: sim(phi_bar(a), phi_hat(b_j)) for every column j, then for every pooled
        edit request (``pool``: (phi_hat [P, k, d_m], blocked [A, P]) or None), then the sentinel's
        sim(phi_bar(a), phi_bar_S(a)); ``blocked`` columns are -inf."""
        phi = ifeat.phi[rows]
        cols = [similarity(phi, phi_hat).masked_fill(blocked, float("-inf"))]
        if pool is not None:
            cols.append(similarity(phi, pool[0]).masked_fill(pool[1], float("-inf")))
        cols.append(paired_similarity(phi, ifeat.phi_sentinel[rows])[:, None])
        return torch.cat(cols, 1)

    def _neighbourhood_routing(self, ifeat, efeat, draws, offset, R, G, same_image, pool) -> dict:
        """The authors' routing contrasts. Record j draws a pair (a_j, b_j) from one neighbourhood:
        a_j is its rel, a gen or its loc sample; b_j is rel/t-gen/m-gen for a rel/gen a_j, the loc
        sample itself for a loc a_j. The input side reads a_j, the edit side b_j. The sentinel
        contrast pairs a rel/gen sample with the record's loc sample, in random order, and the
        sentinel must beat every column. ``pool``: the negative pool's columns (or None)."""
        dev = ifeat.psi.device
        local = lambda x: x[offset:offset + R].to(dev)
        j = torch.arange(R, device=dev)
        kind, a_gen, b_pick = local(draws["a_kind"]), local(draws["a_gen"]), local(draws["b_pick"])
        loc = 3 * R + j
        a = torch.where(kind == 0, j, torch.where(kind == 1, (1 + a_gen) * R + j, loc))
        b = torch.where(kind == 2, loc, b_pick * R + j)
        rel_gen = local(draws["s_pick"]) * R + j
        first_is_loc = local(draws["s_order"]) == 1
        a2, b2 = torch.where(first_is_loc, loc, rel_gen), torch.where(first_is_loc, rel_gen, loc)

        own = torch.arange(G, device=dev)[None] == (offset + j)[:, None]              # [R, G]
        out = self._soft_losses(similarity(ifeat.psi[a], gather_rows(efeat.psi[b])), own)
        out["hard_neighbour"] = F.cross_entropy(
            self._hard_logits(ifeat, a, gather_rows(efeat.phi[b]), same_image, self._pool_columns(pool, a, j)),
            offset + j)
        sentinel_logits = self._hard_logits(ifeat, a2, gather_rows(efeat.phi[b2]), same_image,
                                            self._pool_columns(pool, a2, j))
        sentinel = torch.full((R,), sentinel_logits.shape[1] - 1, dtype=torch.long, device=dev)
        out["hard_sentinel"] = F.cross_entropy(sentinel_logits, sentinel)
        return out

    def _edit_request_routing(self, ifeat, efeat, draws, offset, R, G, same_image, pool) -> dict:
        """This project's first routing contrasts: every rel/gen sample against the batch's edit
        requests; locality samples, and rel/gen samples against other records' edits, must prefer
        the sentinel."""
        dev = ifeat.psi.device
        rows = torch.arange(3 * R, device=dev)
        owner = offset + rows % R
        own = torch.arange(G, device=dev)[None] == owner[:, None]                     # [3R, G]
        out = self._soft_losses(similarity(ifeat.psi[rows], gather_rows(efeat.psi[:R])), own)
        phi_hat = gather_rows(efeat.phi[:R])
        blocked = same_image.repeat(3, 1)
        pool3 = self._pool_columns(pool, rows, rows % R)
        out["hard_neighbour"] = F.cross_entropy(self._hard_logits(ifeat, rows, phi_hat, blocked, pool3), owner)
        loc = torch.arange(3 * R, 4 * R, device=dev)
        pool_loc = self._pool_columns(pool, loc, loc - 3 * R)
        sentinel_logits = torch.cat([self._hard_logits(ifeat, rows, phi_hat, blocked | own, pool3),
                                     self._hard_logits(ifeat, loc, phi_hat, torch.zeros_like(same_image), pool_loc)])
        sentinel = torch.full((4 * R,), sentinel_logits.shape[1] - 1, dtype=torch.long, device=dev)
        out["hard_sentinel"] = F.cross_entropy(sentinel_logits, sentinel)
        return out

    # ---- edited state across processes ---------------------------------------------------------
    def weights_digest(self) -> str:
        """A short hash of the trainable weights (the experts are only meaningful with these)."""
        hsh = hashlib.sha256()
        for k, v in sorted(self.net.state_dict().items()):
            hsh.update(k.encode())
            hsh.update(v.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return hsh.hexdigest()[:16]

    def fingerprint(self) -> dict:
        bb = self.backbone
        return {"editor": self.name, "backbone": bb.name, "family": bb.family, "hidden_size": bb.hidden_size,
                "num_layers": bb.num_layers, "n_vision_tokens": bb.n_vision_tokens,
                "config": self.config.architecture(), "weights": self.weights_digest()}

    def state_bytes(self) -> int:
        """The filled part of the expert repository (features and low-rank experts)."""
        return len(self.repository) * self.repository.bytes_per_expert()

    def save_state(self, directory: Path) -> None:
        self.repository.save(directory, self.fingerprint())

    def load_state(self, directory: Path) -> None:
        self.repository.load(directory, self.fingerprint())
        self.n_edits = len(self.repository)
