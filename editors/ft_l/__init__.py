"""FT-L: sequential fine-tuning of one LLM feed-forward layer per edit."""
from editors.ft_l.editor import FTLConfig, FTLEditor, ffn_output_projection

__all__ = ["FTLConfig", "FTLEditor", "ffn_output_projection"]
