"""RECIPE: retrieval-augmented continuous prompts (BASELINES.md section 6). The package also holds
what LTE shares with it: batches with inserted embeddings (``batching``), the growing memory
(``memory``) and the text encoders (``text_encoder``)."""
from editors.recipe.config import RecipeConfig, RecipeLossWeights, RecipeTrain
from editors.recipe.editor import Recipe

__all__ = ["Recipe", "RecipeConfig", "RecipeLossWeights", "RecipeTrain"]
