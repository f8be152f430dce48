"""FT-L: each edit fine-tunes the output projection of the feed-forward block of one decoder layer
(the backbone's named site ``mlp_output_projection``: OPT ``fc2``, Llama ``down_proj``) on the edit's teacher-forced target NLL, for a fixed number of
Adam steps; edits accumulate (lifelong). Optionally each edit's change is clamped to an L-infinity
ball around the weights before that edit (the "L" of FT-L in the ROME paper).

The backbone stays frozen: only this weight gets ``requires_grad`` during an edit, and loses it after.
Layers below the edited one are run once per edit (their output cannot change), each step runs only
the edited layer and the ones above it. The optimiser steps a float32 master copy of the weight, kept
across edits on the weight's device (the weight is its rounding), so a float16 / bfloat16 backbone is
tuned without losing small updates; with a float16 weight the loss is scaled (a dynamic GradScaler
kept across edits) so the gradient through the half-precision layers does not underflow.
``restore()`` copies the original weights back (exactly: the copy has the weight's dtype).
"""
from dataclasses import dataclass

import torch

from editors import EDITORS
from editors.common import resolve_layer
from editors.ft_l.tuning import WeightEditor
from utils.errors import UserError
from utils.losses import masked_nll


@dataclass
class FTLConfig:
    layer: int                    # decoder layer (0-based; negative counts from the top)
    steps: int                    # optimisation steps per edit
    lr: float                     # Adam learning rate
    early_stop_loss: float        # stop an edit once the target NLL is below this (0: never)
    norm_constraint: float | None  # max |change| of any weight entry per edit; null: unconstrained


@EDITORS.register("ft-l")
class FTLEditor(WeightEditor):
    name = "ft-l"
    config_class = FTLConfig
    state_file = "ft_l_state.safetensors"

    def __init__(self, backbone, config: FTLConfig):
        super().__init__(backbone, config)
        if config.steps < 1 or config.lr <= 0:
            raise UserError(f"ft-l: steps must be >= 1 and lr > 0, got steps={config.steps} lr={config.lr}")
        self.layer_index = resolve_layer("ft-l", config.layer, backbone)
        self.module = backbone.mlp_output_projection(self.layer_index)
        self.weight = self.module.weight
        self._own_weights({"weight": self.weight})

    @property
    def original(self) -> torch.Tensor:
        return self.snapshot.originals[0]

    def _owner(self) -> dict:
        return {**super()._owner(), "layer": self.layer_index}

    # ---- lifelong editing -------------------------------------------------------------------
    def edit(self, request) -> None:
        bb, cfg = self.backbone, self.config
        batch = bb.encode([request])
        below = self.layer_index - 1
        with torch.no_grad():
            hidden = bb.hidden_at(batch, below)  # below == -1: the embeddings entering layer 0
        self._fine_tune(lambda: masked_nll(bb.logits_from(hidden, batch, below), batch.labels), cfg)
        self.n_edits += 1
