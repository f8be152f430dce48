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
from editors import EDITORS
from editors.base import BaseEditor
from editors.liveedit.config import LOSS_TERMS, LiveEditConfig
from editors.liveedit.modules import (FeatureExtractor, LowRankGenerator, expert_mixture, paired_similarity,
                                      similarity)
from editors.liveedit.repository import ExpertRepository
from utils.errors import UserError
from utils.losses import masked_kl, masked_nll
from vl_datasets.records import EditRecord, Sample


@dataclass
class TrainingBatch:
    """``prepare_training_batch``'s result: one encoded batch of every sample of the records."""

    n_records: int
    n_loc: int
    batch: VLBatch


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
        k, d_m, h, r = cfg.n_queries, cfg.d_m, cfg.heads, cfg.rank
        self.edit_extractor = FeatureExtractor(d, d_m, k, h)
        self.input_extractor = FeatureExtractor(d, d_m, k, h, n_vision=n_vision)
        self.gen_u = LowRankGenerator(d, d_m, r, h, cfg.scale)
        self.gen_v = LowRankGenerator(d, d_m, r, h, cfg.scale)
        self.ln_x = nn.LayerNorm(d)
        # LoRA-style start: V's output projection is zero, so a fresh editor's experts add exactly
        # nothing; V learns first while relu(U x) is still half active. (With random U and V at
        # the start, the locality/reliability losses quickly drive every relu(U x) to zero and the
        # experts die for good: seen on a tiny BLIP-2.)
        nn.init.zeros_(self.gen_v.attn.out.weight)
        nn.init.zeros_(self.gen_v.attn.out.bias)


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
        self.net.to(backbone.device).eval()
        self.generator = torch.Generator().manual_seed(config.seed)
        self.repository = ExpertRepository(config.n_queries, config.d_m, config.rank, d, device=backbone.device)

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
        phi, psi, U, V = self._edit_side(hidden, batch)
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
        rows = batch.has_image.nonzero().flatten()
        if rows.numel() == 0:
            n, dev = len(self.repository), hidden.device
            return rows, torch.zeros(0, n, device=dev), torch.zeros(0, n, dtype=torch.bool, device=dev)
        sub = select_rows(batch, rows)
        feats = self._input_side(hidden[rows], sub)
        weights, kept = self.repository.route(feats.phi, feats.psi, feats.phi_sentinel)
        return rows, weights, kept

    def _intervene(self, hidden: torch.Tensor, batch: VLBatch) -> torch.Tensor:
        """The edit-layer intervention: adds the routed experts' residual on every position of the
        samples that keep at least one expert; every other sample is returned bit for bit."""
        if len(self.repository) == 0 or not bool(batch.has_image.any()):
            return hidden
        with torch.no_grad():
            rows, weights, kept = self.route(hidden, batch)
            any_kept = kept.any(1)
            if not bool(any_kept.any()):
                return hidden
            rows, weights, kept = rows[any_kept], weights[any_kept], kept[any_kept]
            delta = self.repository.residual(self.net.ln_x(hidden[rows].float()), weights, kept)
        out = hidden.clone()
        out[rows] = hidden[rows] + delta.to(hidden.dtype)
        return out

    def layer_edits(self) -> dict[int, LayerEdit]:
        return {self.layer: self._intervene} if len(self.repository) else {}

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

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights of every trainable module (the RNG state is separate: ``rng_state()``)."""
        return {k: v.detach().clone() for k, v in self.net.state_dict().items()}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        own = self.net.state_dict()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise UserError(f"LiveEdit checkpoint does not match this editor: missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]}")
        for k, v in state.items():
            if v.shape != own[k].shape:
                raise UserError(f"LiveEdit checkpoint tensor {k!r} has shape {tuple(v.shape)}; this editor "
                                f"(backbone {self.backbone.name!r} with hidden size {self.backbone.hidden_size}, "
                                f"d_m={self.config.d_m}, rank={self.config.rank}, n_queries={self.config.n_queries}) "
                                f"expects {tuple(own[k].shape)}")
        self.net.load_state_dict(state)

    def _random_sets(self, owners: torch.Tensor, n: int) -> torch.Tensor:
        """Expert sets [S, n] (bool) for S samples over the n experts of the batch. A sample with an
        owner (>= 0) gets its own expert plus a uniformly random number (0..n-1) of random others; one
        without (-1, a locality sample) gets a random non-empty set (1..n experts)."""
        g, S = self.generator, owners.shape[0]
        own = F.one_hot(owners.clamp(min=0), n).bool() & (owners >= 0)[:, None]
        scores = torch.rand(S, n, generator=g).masked_fill(own, 2.0)        # own expert ranks last
        rank = scores.argsort(1).argsort(1)
        count = torch.where(owners >= 0, torch.randint(0, n, (S,), generator=g),
                            torch.randint(1, n + 1, (S,), generator=g))
        return own | (rank < count[:, None])

    def prepare_training_batch(self, records: Sequence[EditRecord]) -> "TrainingBatch":
        """Encode every sample of a batch of records in one call (no randomness: the training loop
        may run this in its prefetch thread); ``training_losses`` accepts the result."""
        if not records:
            raise UserError("LiveEdit training needs at least one record per batch")
        for r in records:
            for kind, s in (("edit", r.edit), ("text_rephrase", r.text_rephrase),
                            ("image_rephrase", r.image_rephrase)):
                if s.image is None:
                    raise UserError(f"record {r.index}: LiveEdit training needs an image on its {kind} sample")
        locs = [r.image_loc for r in records if r.image_loc.image is not None]   # M-Loc with an image only
        samples = ([r.edit for r in records] + [r.text_rephrase for r in records]
                   + [r.image_rephrase for r in records] + locs)
        return TrainingBatch(len(records), len(locs), self.backbone.encode(samples))

    def training_losses(self, records) -> dict[str, torch.Tensor]:
        """Weighted loss terms for a batch of records, or of ``prepare_training_batch(records)``
        (DESIGN section 3, "Training"): ``rel``, ``gen`` (token NLL of the adapted model, mean over
        samples), ``loc`` (KL to the unedited model on M-Loc samples), ``soft_relative``,
        ``soft_absolute`` (soft routing), ``hard_neighbour``, ``hard_sentinel`` (hard routing).

        Rows of the one encoded batch: R edit requests, R text rephrases, R image rephrases, then
        the locality samples that have an image. The frozen model runs once to layer l_e for all of
        them; every loss runs only layers l_e+1.. and the head from those captured states."""
        prepared = records if isinstance(records, TrainingBatch) else self.prepare_training_batch(records)
        R, n_loc, batch = prepared.n_records, prepared.n_loc, prepared.batch
        bb, le, dev = self.backbone, self.layer, self.backbone.device
        n_nb = 3 * R                                            # rows of the edits' neighbourhoods

        with torch.no_grad():
            hidden = bb.hidden_at(batch, le)                    # [S, L, d], frozen, taken once
        h = hidden.float()
        vision, prompt, target = span_masks(batch)

        # experts (with gradient) of the batch's edit requests, teacher forced with their targets
        efeat = self.net.edit_extractor(h[:R], vision[:R], prompt[:R])
        span = (vision | prompt | target)[:R]                  # H_e = concat(H_v, H_p, H_o)
        U, V = self.net.gen_u(h[:R], span), self.net.gen_v(h[:R], span)

        # input-side features of every sample
        ifeat = self.net.input_extractor(h, vision, prompt)
        owners = torch.cat([torch.arange(R).repeat(3), torch.full((n_loc,), -1, dtype=torch.long)])
        owner_nb = owners[:n_nb].to(dev)
        own = F.one_hot(owner_nb, R).bool()                    # [3R, R] the matching pairs

        # each sample adapted by its expert set, weighted by soft routing
        sets = self._random_sets(owners, R).to(dev)
        t = similarity(ifeat.psi, efeat.psi)                   # [S, R]
        soft = torch.softmax(t.masked_fill(~sets, float("-inf")), dim=1)
        w = torch.where(sets, soft * torch.sigmoid(t), torch.zeros_like(t))
        delta = expert_mixture(self.net.ln_x(h), w, U, V)
        logits = bb.logits_from(hidden + delta.to(hidden.dtype), batch, le)
        labels = batch.labels

        zero = logits.new_zeros(())
        nll = masked_nll(logits[:n_nb], labels[:n_nb], per_sample=True)   # each sample's token mean
        losses = {"rel": nll[:R].mean(), "gen": nll[R:].mean()}
        if n_loc:
            loc_rows = torch.arange(n_nb, n_nb + n_loc, device=dev)
            with torch.no_grad():                             # the unedited model, same captured states
                ref = bb.logits_from(hidden[loc_rows], select_rows(batch, loc_rows), le)
            losses["loc"] = masked_kl(logits[n_nb:], ref, labels[n_nb:], per_sample=True).mean()
        else:
            losses["loc"] = zero

        # soft routing: rel/gen samples of record j against the edit features psi_hat of the batch
        t_nb = t[:n_nb]
        losses["soft_relative"] = F.cross_entropy(t_nb, owner_nb)
        soft_abs = -F.logsigmoid(t_nb[own]).mean()
        if R > 1:
            soft_abs = soft_abs - F.logsigmoid(-t_nb[~own]).mean()
        losses["soft_absolute"] = soft_abs

        # hard routing over [sim(phi_bar_a, phi_hat_b) for b in batch] + [sim(phi_bar_a, phi_bar_S)]
        hard = torch.cat([similarity(ifeat.phi, efeat.phi),
                          paired_similarity(ifeat.phi, ifeat.phi_sentinel)[:, None]], 1)   # [S, R+1]
        losses["hard_neighbour"] = F.cross_entropy(hard[:n_nb], owner_nb)
        # the sentinel must win against every edit of another neighbourhood: locality samples
        # against all edits of the batch, rel/gen samples against the other records' edits
        parts = [hard[n_nb:]]
        if R > 1:
            parts.insert(0, hard[:n_nb].masked_fill(F.pad(own, (0, 1)), float("-inf")))
        sentinel_logits = torch.cat(parts)
        if sentinel_logits.shape[0]:
            target_s = torch.full((sentinel_logits.shape[0],), R, dtype=torch.long, device=dev)
            losses["hard_sentinel"] = F.cross_entropy(sentinel_logits, target_s)
        else:
            losses["hard_sentinel"] = zero
        weights = self.config.loss_weights
        return {name: losses[name] * getattr(weights, name) for name in LOSS_TERMS}

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
