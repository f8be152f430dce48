"""FT-M: sequential fine-tuning of the vision-language connector per edit."""
from editors.ft_m.editor import FTMConfig, FTMEditor

__all__ = ["FTMConfig", "FTMEditor"]
