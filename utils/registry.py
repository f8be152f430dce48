"""One registry per axis (editors, backbones, datasets): a name -> entry dict with clear errors."""
from utils.errors import UserError


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._entries = {}

    def register(self, name: str, entry=None):
        """``reg.register(name, obj)`` or, as a decorator, ``@reg.register(name)``."""
        if entry is None:
            return lambda obj: self.register(name, obj)
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = entry
        return entry

    def get(self, name: str):
        if name not in self._entries:
            raise UserError(f"unknown {self.kind} {name!r}; known: {', '.join(sorted(self._entries))}")
        return self._entries[name]

    def names(self):
        return sorted(self._entries)

    def __contains__(self, name):
        return name in self._entries
