"""``none``: every edit is a no-op, so every locality score is exactly 100 and reliability /
generality equal the unedited model's scores of the targets."""
from dataclasses import dataclass

from editors import EDITORS
from editors.base import BaseEditor


@dataclass
class NoneConfig:
    """``none`` has no settings; its YAML files are empty mappings."""


@EDITORS.register("none")
class NoneEditor(BaseEditor):
    name = "none"
    config_class = NoneConfig

    def edit(self, request) -> None:
        self.n_edits += 1

    def restore(self) -> None:
        self.n_edits = 0

    def state_bytes(self) -> int:
        return 0
