"""The ``none`` editor: edits nothing. Its scores are the unedited model's, the honest floor."""
from editors.none.editor import NoneConfig, NoneEditor

__all__ = ["NoneConfig", "NoneEditor"]
