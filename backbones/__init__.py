"""Backbone registry: full name -> wrapper class. A new backbone of a known family is one line
here plus its path in utils/GLOBAL.py; a new family is a wrapper module next to blip2.py."""
from pathlib import Path

from backbones.base import IGNORE, VLBackbone, VLBatch
from backbones.blip2 import Blip2Backbone
from backbones.fingerprint import backbone_fingerprint
from backbones.llava import LlavaBackbone
from backbones.minigpt4 import MiniGPT4Backbone
from utils.GLOBAL import model_aliases, model_path_map
from utils.errors import UserError
from utils.registry import Registry

BACKBONES = Registry("backbone")
BACKBONES.register("blip2-opt-2.7b", Blip2Backbone)
BACKBONES.register("llava-v1.5-7b", LlavaBackbone)
BACKBONES.register("minigpt-4-vicuna-7b", MiniGPT4Backbone)
# Tiny backbones of the same classes, pretrained by the project on the synthetic world.
BACKBONES.register("tiny-blip2", Blip2Backbone)
BACKBONES.register("tiny-llava", LlavaBackbone)
BACKBONES.register("tiny-minigpt4", MiniGPT4Backbone)

TINY_BACKBONES = ("tiny-blip2", "tiny-llava", "tiny-minigpt4")


def resolve_backbone_name(name: str) -> str:
    """Alias ('blip2') or full name -> full name; an unknown name lists the known ones."""
    full = model_aliases.get(name, name)
    if full not in BACKBONES:
        known = sorted(set(BACKBONES.names()) | set(model_aliases))
        raise UserError(f"unknown backbone {name!r}; known: {', '.join(known)}")
    return full


def backbone_path(name: str, model_path=None) -> Path:
    """The weights folder of backbone ``name``: ``model_path`` or its entry in ``model_path_map``.
    Nothing is built here (``synthetic.embedded.prepare_backbone`` builds a tiny default first)."""
    full = resolve_backbone_name(name)
    return Path(model_path) if model_path else Path(model_path_map[full])


def load_backbone(name: str, device: str = "cpu", model_path=None, dtype=None) -> VLBackbone:
    """Load backbone ``name`` from ``model_path`` or its entry in ``model_path_map``; ``.fingerprint``
    identifies its weights. Nothing is built here: the scripts first call
    ``synthetic.embedded.prepare_backbone``, which pretrains a tiny backbone at its default path on
    first use (the dependency goes synthetic -> backbones only)."""
    full = resolve_backbone_name(name)
    path = backbone_path(full, model_path)
    if full in TINY_BACKBONES and model_path is None and not (path / "config.json").is_file():
        raise UserError(f"tiny backbone {full} is not built yet at {path}; build it with "
                        f"`python -m synthetic.pretrain --backbone {full}` (the main scripts do it on first use)")
    backbone = BACKBONES.get(full).load(full, path, device=device, dtype=dtype)
    backbone.fingerprint = backbone_fingerprint(path)
    return backbone


__all__ = ["BACKBONES", "IGNORE", "VLBackbone", "VLBatch", "backbone_fingerprint", "backbone_path", "load_backbone",
           "resolve_backbone_name"]
