"""The embedded default on demand: what a command needs of it is built the first time, once.

The two main scripts (and the tools in scripts/) call these before loading a dataset or a backbone:

- ``prepare_dataset(name, data_dir, split)``: a ``SYNTH-*`` dataset's world is generated under
  ``<data_dir>/synthetic`` unless it is there (and SYNTH-EVQA's ``eval_large`` split when asked for);
- ``prepare_backbone(name, model_path)``: a tiny backbone is pretrained at its default path
  (``utils/GLOBAL.py``) unless it is there, built from the current world and recipe. An explicit
  ``--model_path`` is never built into: a wrong one is an error when loading, not a pretraining run
  into a folder beside it.

Both build under a file lock, so the processes of a multi-process launch build once and the others
wait and then find it done. Dependencies go one way: this module uses ``backbones`` and
``vl_datasets``; neither imports ``synthetic``.
"""
from pathlib import Path

from utils.GLOBAL import DATA_DIR, model_path_map


def prepare_dataset(name: str, data_dir=None, split: str | None = None) -> None:
    """``split`` ``eval_large`` also generates SYNTH-EVQA's large eval split (synthetic/large_eval.py)
    unless the world has one (of any size: ``python -m synthetic.world --large_eval N`` chooses it)."""
    from vl_datasets import LARGE_EVAL_SPLIT, get_dataset_spec
    spec = get_dataset_spec(name)
    if spec.synthetic:
        from synthetic.world import ensure_world
        world = ensure_world(Path(data_dir or DATA_DIR) / "synthetic")
        if split == LARGE_EVAL_SPLIT and split in spec.splits:
            from synthetic import large_eval
            large_eval.ensure(world)


def _same_path(a: Path, b: Path) -> bool:
    return a.expanduser().resolve() == b.expanduser().resolve()


def prepare_backbone(name: str, model_path=None) -> Path:
    """The folder the backbone loads from; a tiny backbone at its default path is built first."""
    from backbones import TINY_BACKBONES, resolve_backbone_name
    full = resolve_backbone_name(name)
    default = Path(model_path_map[full])
    path = Path(model_path) if model_path else default
    if full in TINY_BACKBONES and _same_path(path, default):
        from synthetic.pretrain import ensure_tiny_backbone
        ensure_tiny_backbone(full, default)
    return path
