"""A tiny trainable editor used only by tests of the shared training loop: a learned low-rank
residual (with dropout) on the output of one decoder layer, trained with three loss terms.

It exercises what the loop must handle: several weighted loss terms, the editor's own
``torch.Generator`` (which rephrase a record's generality term uses) and the global torch RNG
(dropout), both of which exact resume must restore. Not registered by default: call ``register()``.
"""
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F

from editors import EDITORS
from editors.base import BaseEditor
from utils.losses import masked_kl, masked_nll


@dataclass
class DummyTrainConfig:
    lr: float = 1e-2
    lr_cut_step: int | None = None
    lr_cut_factor: float = 10.0
    max_steps: int | None = None
    rel_weight: float = 1.0
    gen_weight: float = 1.0
    loc_weight: float = 1.0


@dataclass
class DummyConfig:
    inference_only: ClassVar[tuple[str, ...]] = ("output_scale",)
    layer: int = 2
    rank: int = 4
    dropout: float = 0.1
    random_rephrase: bool = True   # the generality sample is drawn with the editor's generator
    output_scale: float = 1.0      # read only at inference (scales the residual there)
    train: DummyTrainConfig = field(default_factory=DummyTrainConfig)


class ResidualEditor(BaseEditor):
    name = "dummy-residual"
    config_class = DummyConfig
    trainable = True

    def __init__(self, backbone, config):
        super().__init__(backbone, config)
        d = backbone.hidden_size
        self.module = torch.nn.Sequential(torch.nn.Linear(d, config.rank), torch.nn.Linear(config.rank, d))
        self.module.to(backbone.device)
        self.generator = torch.Generator()
        self.seen = []            # record indices of every training batch (to check data sharding)

    def _edit(self, h, batch):
        down, up = self.module
        return h + up(F.dropout(torch.relu(down(h)), self.config.dropout, training=True))

    def layer_edits(self):
        if self.config.output_scale == 1.0:
            return {self.config.layer: self._edit}
        return {self.config.layer: lambda h, batch: h + self.config.output_scale * (self._edit(h, batch) - h)}

    def edit(self, request):
        self.n_edits += 1

    def restore(self):
        self.n_edits = 0

    def trainable_parameters(self):
        return list(self.module.parameters())

    def trainable_state_dict(self):
        return {k: v.detach().clone() for k, v in self.module.state_dict().items()}

    def load_trainable_state_dict(self, state):
        self.module.load_state_dict(state)

    def training_losses(self, records):
        self.seen.append([r.index for r in records])
        bb, edits, t = self.backbone, self.layer_edits(), self.config.train
        if self.config.random_rephrase:
            pick = torch.rand(len(records), generator=self.generator) < 0.5
            gen = [r.text_rephrase if p else r.image_rephrase for r, p in zip(records, pick.tolist())]
        else:
            gen = [r.text_rephrase for r in records]
        rel_batch, gen_batch = bb.encode([r.edit for r in records]), bb.encode(gen)
        loc_batch = bb.encode([r.image_loc for r in records])
        with torch.no_grad():
            ref = bb.logits(loc_batch)
        # means over records of each record's token mean, so the shard-weighted data-parallel
        # gradient equals the one-process gradient exactly (a token mean would weight by length)
        def nll(b):
            return masked_nll(bb.logits(b, edits), b.labels, per_sample=True).mean()
        kl = masked_kl(bb.logits(loc_batch, edits), ref, loc_batch.labels, per_sample=True).mean()
        return {"rel": t.rel_weight * nll(rel_batch), "gen": t.gen_weight * nll(gen_batch), "loc": t.loc_weight * kl}


class FrozenEditor(BaseEditor):
    """An editor that cannot be trained."""
    name = "dummy-frozen"
    config_class = DummyConfig
    trainable = False


def register():
    """Register both test editors (idempotent); returns their names."""
    for cls in (ResidualEditor, FrozenEditor):
        if cls.name not in EDITORS:
            EDITORS.register(cls.name, cls)
    return ResidualEditor.name, FrozenEditor.name


def unregister():
    for cls in (ResidualEditor, FrozenEditor):
        EDITORS._entries.pop(cls.name, None)
