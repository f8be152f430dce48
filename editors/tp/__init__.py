"""T-Patcher: one new FFN neuron per edit in one decoder layer."""
from editors.tp.editor import TPConfig, TPEditor

__all__ = ["TPConfig", "TPEditor"]
