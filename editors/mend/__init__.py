"""MEND: a trained gradient transform turns each edit's rank-1 gradient factors into a weight update
of the FFN projections of the last layers, applied as per-call activation-site edits."""
from editors.mend.config import MendConfig, MendLossWeights, MendTrain
from editors.mend.editor import Mend

__all__ = ["Mend", "MendConfig", "MendLossWeights", "MendTrain"]
