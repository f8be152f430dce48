"""SERAC: a memory of edits, a scope classifier that retrieves the top-1 edit per query, and a
counterfactual model that answers in-scope queries given that edit."""
from editors.serac.config import SeracConfig, SeracLossWeights, SeracModel, SeracTrain
from editors.serac.editor import Serac
from editors.serac.memory import EditMemory

__all__ = ["EditMemory", "Serac", "SeracConfig", "SeracLossWeights", "SeracModel", "SeracTrain"]
