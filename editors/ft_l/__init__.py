"""FT-L: sequential fine-tuning of one LLM feed-forward layer per edit."""
from editors.ft_l.editor import FTLConfig, FTLEditor

__all__ = ["FTLConfig", "FTLEditor"]
