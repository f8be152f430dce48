"""LTE: Learning to Edit, an aligned LLM that uses a retrieved edit given in context (BASELINES.md section 5)."""
from editors.lte.config import LteConfig, LteLossWeights, LteTrain
from editors.lte.editor import LTE

__all__ = ["LTE", "LteConfig", "LteLossWeights", "LteTrain"]
