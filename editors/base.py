"""The shared editor base. An editor wraps a frozen backbone and offers:

- ``edit(request)``: one lifelong editing step (requests arrive one at a time, never revisited);
- ``restore()``: back to the unedited model, exactly;
- ``layer_edits()``: what the editor applies to decoder-layer outputs during a forward (memory-based
  editors such as LiveEdit route here; weight-editing editors return ``{}``);
- for trainable editors: ``trainable_parameters()`` and ``training_losses(records)`` for the shared
  training loop, and ``load_trainable_state_dict`` for a trained checkpoint;
- optionally ``save_state`` / ``load_state`` of what the edits produced;
- ``train(mode)`` / ``eval()``, as on ``nn.Module``: the training loop calls ``train()``, evaluation
  calls ``eval()`` before anything is scored. Editors with dropout or other train-time behaviour
  override ``train``; the defaults do nothing.

Evaluation scores (``logits``, ``generate``) under ``torch.inference_mode()``, while ``edit()`` runs
outside it (an editor may optimise during an edit). So ``logits`` / ``generate`` must not create state
that a later ``edit()`` differentiates through: tensors made under inference mode cannot be.
- optionally ``save_state`` / ``load_state`` of what the edits produced, and ``state_bytes()``: its
  size in bytes (reported beside the scores; ``None``: not known).
"""
from pathlib import Path
from typing import Sequence

import torch

from backbones.base import LayerEdit, VLBackbone, VLBatch
from utils.errors import UserError
from vl_datasets.records import EditRecord, Sample


def owner_metadata(editor: str, backbone: str, **extra) -> dict[str, str]:
    """The safetensors metadata that names who a saved file belongs to (all values strings): an
    editor's saved edited state, a trained checkpoint. Checked when it is loaded."""
    meta = {"editor": editor, "backbone": backbone}
    meta.update({k: str(v) for k, v in extra.items()})
    return meta


class BaseEditor:
    name = "base"
    config_class = None      # dataclass loaded from configs/<editor>/<backbone>.yaml
    trainable = False        # True: train_vllm_editor.py can train it and -ckpt loads its weights

    def __init__(self, backbone: VLBackbone, config):
        self.backbone = backbone
        self.config = config
        self.n_edits = 0

    # ---- lifelong editing -------------------------------------------------------------------
    def edit(self, request: Sample) -> None:
        raise NotImplementedError

    def restore(self) -> None:
        raise NotImplementedError

    def layer_edits(self) -> dict[int, LayerEdit]:
        return {}

    # ---- modes ------------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> "BaseEditor":
        """Switch the editor's own modules to training mode (``mode=False``: evaluation mode)."""
        return self

    def eval(self) -> "BaseEditor":
        return self.train(False)

    # ---- inference through the edited model ------------------------------------------------------
    def logits(self, batch: VLBatch) -> torch.Tensor:
        return self.backbone.logits(batch, self.layer_edits())

    def decoding_edits(self) -> dict[int, LayerEdit] | None:
        """The edits for cached greedy decoding (``VLBackbone.generate``), or None when this editor's
        edits need a full forward per new token. An editor may return edits here only if each acts
        on a position from what the prompt gave it and that position alone, so that running the
        prompt once and then each new token alone gives the full forward's result. Default: ``{}``
        when nothing is edited at inference (the unedited model; editors that change weights in
        place), else None."""
        return {} if not self.layer_edits() else None

    def generate(self, samples: Sequence[Sample], max_new_tokens: int) -> list[list[int]]:
        cached = self.decoding_edits() if self.backbone.decode_with_cache else None
        if cached is not None:
            return self.backbone.generate(samples, max_new_tokens, decoding_edits=cached)
        return self.backbone.generate(samples, max_new_tokens, self.layer_edits())

    # ---- training (trainable editors) -----------------------------------------------------------
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return []

    def training_losses(self, records: Sequence[EditRecord]) -> dict[str, torch.Tensor]:
        """Loss terms for a batch of training records (each already weighted); the loop sums them."""
        raise UserError(f"editor {self.name!r} is not trainable")

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        raise UserError(f"editor {self.name!r} has no trained weights to load")

    # ---- edited state across processes ---------------------------------------------------------
    def state_bytes(self) -> int | None:
        """Bytes of what the edits so far produced (memory, expert pool, changed weights); None: unknown."""
        return None

    def save_state(self, directory: Path) -> None:
        raise UserError(f"editor {self.name!r} cannot save its edited state")

    def load_state(self, directory: Path) -> None:
        raise UserError(f"editor {self.name!r} cannot load an edited state")
