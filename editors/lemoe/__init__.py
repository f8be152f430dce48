"""LEMoE: a growing mixture of LoRA experts beside one FFN, one expert per batch of edits."""
from editors.lemoe.editor import LEMoEConfig, LEMoEEditor

__all__ = ["LEMoEConfig", "LEMoEEditor"]
