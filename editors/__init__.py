"""Editor registry. A new editor is a package ``editors/<name>/`` whose module registers its class
with ``@EDITORS.register("<name>")``, imported below, plus one config per backbone in
``configs/<name>/``."""
from utils.registry import Registry

EDITORS = Registry("editor")

# Importing an editor package registers it.
from editors import ft_l, liveedit, none  # noqa: E402,F401
from editors import ft_m, grace, lemoe, tp, wise  # noqa: E402,F401  (baselines I)
from editors import mend, serac  # noqa: E402,F401
from editors import lte, recipe  # noqa: E402,F401

