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
from pathlib import Path

import torch

from editors import EDITORS
from editors.base import BaseEditor, owner_metadata
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
        self.module = backbone.mlp_output_projection(self.layer_index)
        self.weight = self.module.weight
        if self.weight.device.type == "meta":
            raise UserError(f"ft-l: the weight of layer {self.layer_index} is offloaded by accelerate (on 'meta'); "
                            f"give the GPUs more memory so that it is resident")
        self.weight.requires_grad_(False)
        self.original = self.weight.detach().clone()
        self.master = None   # float32 copy of the weight that the edits step (made at the first edit)
        self.scaler = torch.amp.GradScaler(self.weight.device.type, enabled=self.weight.dtype == torch.float16)

    # ---- lifelong editing -------------------------------------------------------------------
    def edit(self, request) -> None:
        bb, cfg, w = self.backbone, self.config, self.weight
        batch = bb.encode([request])
        below = self.layer_index - 1
        with torch.no_grad():
            hidden = bb.hidden_at(batch, below)  # below == -1: the embeddings entering layer 0
        if self.master is None:
            self.master = w.detach().float().clone()
        master = self.master.requires_grad_(True)
        start = master.detach().clone()
        optimiser = torch.optim.Adam([master], lr=cfg.lr)
        w.requires_grad_(True)
        try:
            for _ in range(cfg.steps):
                loss = masked_nll(bb.logits_from(hidden, batch, below), batch.labels)
                if loss.item() < cfg.early_stop_loss:
                    break
                w.grad = None
                self.scaler.scale(loss).backward()
                master.grad = w.grad.float()
                self.scaler.step(optimiser)    # unscales; skips a step whose gradient overflowed
                self.scaler.update()
                with torch.no_grad():
                    if cfg.norm_constraint is not None:
                        eps = cfg.norm_constraint
                        master.copy_(torch.maximum(torch.minimum(master, start + eps), start - eps))
                    w.copy_(master)
        finally:
            w.requires_grad_(False)
            w.grad = None
            master.requires_grad_(False)
            master.grad = None
        self.n_edits += 1

    def restore(self) -> None:
        with torch.no_grad():
            self.weight.copy_(self.original)
        self.master = None
        self.n_edits = 0

    # ---- edited state across processes ---------------------------------------------------------
    def save_state(self, directory: Path) -> None:
        from safetensors.torch import save_file

        meta = owner_metadata(self.name, self.backbone.name, layer=self.layer_index, n_edits=self.n_edits)
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
        self.master = None   # a float32 copy of the loaded weight is made at the next edit
        self.n_edits = int(meta.get("n_edits", 0))
