"""GRACE: a codebook of (key, value, radius) at one FFN, keyed on the last prompt token."""
from editors.grace.editor import GraceConfig, GraceEditor

__all__ = ["GraceConfig", "GraceEditor"]
