"""WISE: a side memory beside one FFN output projection, routed by activation distance."""
from editors.wise.editor import WISEConfig, WISEEditor, ties_merge

__all__ = ["WISEConfig", "WISEEditor", "ties_merge"]
