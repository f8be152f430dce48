"""Editor registry. A new editor is a package ``editors/<name>/`` whose module registers its class
with ``@EDITORS.register("<name>")``, plus one config per backbone in ``configs/<name>/``."""
import importlib

from utils.registry import Registry

EDITORS = Registry("editor")

# Importing an editor module registers it.
for _module in ("editors.none", "editors.ft_l", "editors.liveedit"):
    try:
        importlib.import_module(_module)
    except ModuleNotFoundError as e:
        if e.name != _module:  # a missing dependency inside an editor is a real error
            raise
