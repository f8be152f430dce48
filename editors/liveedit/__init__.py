"""LiveEdit: lifelong VLLM editing with a low-rank mixture of experts (DESIGN.md section 3)."""
from editors.liveedit.config import LOSS_TERMS, LiveEditConfig, LiveEditLossWeights, LiveEditTrain
from editors.liveedit.editor import LiveEdit
from editors.liveedit.repository import ExpertRepository

__all__ = ["LOSS_TERMS", "ExpertRepository", "LiveEdit", "LiveEditConfig", "LiveEditLossWeights", "LiveEditTrain"]
