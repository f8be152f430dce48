"""FT-M: FT-L's fine-tuning loop (``editors/ft_l/tuning.py``) applied to the vision-language
connector, the backbone's module site ``connector_parameters()`` (BLIP-2 / MiniGPT-4: Q-Former,
query tokens and projection; LLaVA: the multi-modal projector). Each edit runs a fixed number of Adam
steps on float32 master copies of those weights, on the edit's teacher-forced target NLL; edits
accumulate; ``restore()`` copies the original weights back exactly.

The connector sits before the LLM, so no decoder layer can be cached; what is cached is the frozen
image encoder's output for the edit image (computed once per edit), and every step recomputes the
image features through the connector with gradient, then runs the whole LLM. An edit without an
image cannot move the connector and changes nothing (text-only queries are never affected).
"""
from dataclasses import dataclass

import torch

from editors import EDITORS
from editors.common import check_config, require
from editors.ft_l.tuning import WeightEditor
from utils.losses import masked_nll
from vl_datasets.records import open_image


@dataclass
class FTMConfig:
    steps: int                     # Adam steps per edit
    lr: float                      # Adam learning rate (steps float32 master copies of the connector)
    early_stop_loss: float         # stop an edit once the target NLL is below this (0: never)
    norm_constraint: float | None  # max |change| of any connector entry per edit; null: unconstrained

    def __post_init__(self):
        check_config(self, "ft-m")
        require(self.steps >= 1, "ft-m.steps", "an integer >= 1", self.steps)
        require(self.lr > 0, "ft-m.lr", "> 0", self.lr)
        require(self.early_stop_loss >= 0, "ft-m.early_stop_loss", ">= 0", self.early_stop_loss)
        require(self.norm_constraint is None or self.norm_constraint > 0, "ft-m.norm_constraint",
                "> 0 or null", self.norm_constraint)


@EDITORS.register("ft-m")
class FTMEditor(WeightEditor):
    name = "ft-m"
    config_class = FTMConfig
    state_file = "ft_m_state.safetensors"

    def __init__(self, backbone, config: FTMConfig):
        super().__init__(backbone, config)
        self.params = list(backbone.connector_parameters())
        self._own_weights({f"p{i:04d}": p for i, p in enumerate(self.params)})

    def _owner(self) -> dict:
        return {**super()._owner(), "n_params": len(self.params)}

    # ---- lifelong editing -------------------------------------------------------------------
    def edit(self, request) -> None:
        from synthetic.pretrain import encode_frozen, features_from_encoded

        bb, cfg = self.backbone, self.config
        self.n_edits += 1
        if request.image is None:
            return
        row = bb.tokenize(request.prompt, True, request.target)
        with torch.no_grad():
            encoded = encode_frozen(bb.model, bb.pixel_values([open_image(request.image)]))

        def loss():
            batch = bb.collate([request], [row], image_features=features_from_encoded(bb.model, encoded))
            return masked_nll(bb.logits(batch), batch.labels)

        self._fine_tune(loss, cfg)
