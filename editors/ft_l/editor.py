"""FT-L: each edit fine-tunes the output projection of the feed-forward block of one decoder layer
(OPT ``fc2``, Llama ``mlp.down_proj``) on the edit's teacher-forced target NLL, for a fixed number of
Adam steps; edits accumulate (lifelong). Optionally each edit's change is clamped to an L-infinity
ball around the weights before that edit (the "L" of FT-L in the ROME paper).

The backbone stays frozen: only this weight gets ``requires_grad`` during an edit, and loses it after.
Layers below the edited one are run once per edit (their output cannot change), each step runs only
the edited layer and the ones above it. The optimiser steps a float32 master copy, so a float16
backbone is tuned without losing small updates. ``restore()`` copies the original weights back.
"""
from dataclasses import dataclass
from pathlib import Path

import torch

from editors import EDITORS
from editors.base import BaseEditor
from evaluation.checkpoints import checkpoint_metadata
from utils.errors import UserError
from utils.io import atomic_path
from utils.losses import masked_nll

STATE_FILE = "ft_l_state.safetensors"


@dataclass
class FTLConfig:
    layer: int                    # decoder layer (0-based; negative counts from the top)
    steps: int                    # optimisation steps per edit
    lr: float                     # Adam learning rate
    early_stop_loss: float        # stop an edit once the target NLL is below this (0: never)
    norm_constraint: float | None  # max |change| of any weight entry per edit; null: unconstrained


def ffn_output_projection(layer: torch.nn.Module) -> torch.nn.Linear:
    """The output projection of a decoder layer's feed-forward block (OPT ``fc2``, Llama ``down_proj``)."""
    if isinstance(getattr(layer, "fc2", None), torch.nn.Linear):
        return layer.fc2
    mlp = getattr(layer, "mlp", None)
    if isinstance(getattr(mlp, "down_proj", None), torch.nn.Linear):
        return mlp.down_proj
    raise ValueError(f"decoder layer {type(layer).__name__} has no fc2 or mlp.down_proj to fine-tune")


@EDITORS.register("ft-l")
class FTLEditor(BaseEditor):
    name = "ft-l"
    config_class = FTLConfig

    def __init__(self, backbone, config: FTLConfig):
        super().__init__(backbone, config)
        n = backbone.num_layers
        if not -n <= config.layer < n:
            raise UserError(f"ft-l: layer {config.layer} out of range for {backbone.name} with {n} decoder layers")
        if config.steps < 1 or config.lr <= 0:
            raise UserError(f"ft-l: steps must be >= 1 and lr > 0, got steps={config.steps} lr={config.lr}")
        self.layer_index = config.layer % n
        self.module = ffn_output_projection(backbone.layer(self.layer_index))
        self.weight = self.module.weight
        self.weight.requires_grad_(False)
        self.original = self.weight.detach().clone()

    # ---- lifelong editing -------------------------------------------------------------------
    def edit(self, request) -> None:
        bb, cfg, w = self.backbone, self.config, self.weight
        batch = bb.encode([request])
        below = self.layer_index - 1
        with torch.no_grad():
            hidden = bb.hidden_at(batch, below)  # below == -1: the embeddings entering layer 0
        start = w.detach().clone()
        master = w.detach().float().clone().requires_grad_(True)
        optimiser = torch.optim.Adam([master], lr=cfg.lr)
        w.requires_grad_(True)
        try:
            for _ in range(cfg.steps):
                loss = masked_nll(bb.logits_from(hidden, batch, below), batch.labels)
                if loss.item() < cfg.early_stop_loss:
                    break
                w.grad = None
                loss.backward()
                master.grad = w.grad.float()
                optimiser.step()
                with torch.no_grad():
                    if cfg.norm_constraint is not None:
                        eps = cfg.norm_constraint
                        lo, hi = start.float() - eps, start.float() + eps
                        master.copy_(torch.maximum(torch.minimum(master, hi), lo))
                    w.copy_(master)
        finally:
            w.requires_grad_(False)
            w.grad = None
        self.n_edits += 1

    def restore(self) -> None:
        with torch.no_grad():
            self.weight.copy_(self.original)
        self.n_edits = 0

    # ---- edited state across processes ---------------------------------------------------------
    def state_bytes(self) -> int:
        """The tuned weight (what save_state writes)."""
        return self.weight.numel() * self.weight.element_size()

    def save_state(self, directory: Path) -> None:
        from safetensors.torch import save_file

        meta = checkpoint_metadata(self.name, self.backbone.name, layer=self.layer_index, n_edits=self.n_edits)
        with atomic_path(Path(directory) / STATE_FILE) as tmp:
            save_file({"weight": self.weight.detach().cpu().contiguous()}, str(tmp), metadata=meta)

    def load_state(self, directory: Path) -> None:
        from safetensors import safe_open

        path = Path(directory) / STATE_FILE
        if not path.is_file():
            raise UserError(f"ft-l: no edited state at {path}")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            weight = f.get_tensor("weight") if "weight" in f.keys() else None
        owner = (meta.get("editor"), meta.get("backbone"), meta.get("layer"))
        if owner != (self.name, self.backbone.name, str(self.layer_index)) or weight is None:
            raise UserError(f"edited state {path} belongs to editor {owner[0]!r} on {owner[1]!r} layer {owner[2]}, "
                            f"not {self.name!r} on {self.backbone.name!r} layer {self.layer_index}")
        if weight.shape != self.weight.shape:
            raise UserError(f"edited state {path}: weight shape {tuple(weight.shape)} != {tuple(self.weight.shape)}")
        with torch.no_grad():
            self.weight.copy_(weight.to(self.weight.device, self.weight.dtype))
        self.n_edits = int(meta.get("n_edits", 0))
