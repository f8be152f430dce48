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
    """The weights folder of backbone ``name``: ``model_path`` or its entry in ``model_path_map``. A
    tiny backbone that is not on disk yet (or, at its default path, was built from another pretraining
    corpus or an older recipe) is pretrained on the synthetic world first, then cached."""
    full = resolve_backbone_name(name)
    path = Path(model_path) if model_path else Path(model_path_map[full])
    if full in TINY_BACKBONES and (model_path is None or not (path / "config.json").is_file()):
        from synthetic.pretrain import ensure_tiny_backbone
        ensure_tiny_backbone(full, path)
    return path


def load_backbone(name: str, device: str = "cpu", model_path=None, dtype=None) -> VLBackbone:
    """Load backbone ``name`` (see ``backbone_path``); ``.fingerprint`` identifies its weights."""
    full = resolve_backbone_name(name)
    path = backbone_path(full, model_path)
    backbone = BACKBONES.get(full).load(full, path, device=device, dtype=dtype)
    backbone.fingerprint = backbone_fingerprint(path)
    return backbone


__all__ = ["BACKBONES", "IGNORE", "VLBackbone", "VLBatch", "backbone_fingerprint", "backbone_path", "load_backbone",
           "resolve_backbone_name"]
