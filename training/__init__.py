"""The shared training loop of trainable editors (``train_vllm_editor.py``) and its checkpoints.

- ``train(opts, resume_ckpt, saved) -> TrainResult``: one run (see ``training/loop.py``);
- ``load_trained_weights(editor, ckpt_path) -> metadata``: load a checkpoint's trained weights into
  an editor after checking it was trained for the same editor and backbone (used by evaluation);
- ``resolve_checkpoint(path)``, ``read_metadata(path)``: find / inspect a checkpoint.
"""
from training.checkpoint import (CONFIG_FILE, STATE_FILE, WEIGHTS_FILE, load_trained_weights, read_metadata,
                                 resolve_checkpoint)

__all__ = ["CONFIG_FILE", "STATE_FILE", "WEIGHTS_FILE", "TrainResult", "load_trained_weights", "read_metadata",
           "resolve_checkpoint", "train"]


def __getattr__(name):
    # The loop imports accelerate and the backbones; evaluation only needs the checkpoint helpers.
    if name in ("train", "TrainResult"):
        from training import loop
        return getattr(loop, name)
    raise AttributeError(f"module 'training' has no attribute {name!r}")
