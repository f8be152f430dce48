"""Named sites: the places inside a decoder layer where an editor may act, so that no editor guesses
module names.

An *activation site* is a tensor computed during the forward; an editor changes it by passing
``{Site(...): f}`` in ``layer_edits`` of one call (``f(tensor, batch) -> tensor``), and nothing stays
on the model afterwards. A plain ``int`` key ``i`` is short for ``Site(BLOCK_OUTPUT, i)``.

Components of decoder layer ``i`` (OPT / Llama names in brackets):

- ``mlp_input``: the FFN's input after its norm, ``[B, L, d]`` (input of ``fc1`` / ``gate_proj`` and ``up_proj``);
- ``mlp_activation``: the FFN's hidden activation, ``[B, L, d_ff]`` (input of ``fc2`` / ``down_proj``);
- ``mlp_output``: the FFN's output before the residual add, ``[B, L, d]``;
- ``block_output``: the layer's output, ``[B, L, d]`` (what LiveEdit edits).

*Module sites* (for editors that change weights) are named by the backbone:
``backbone.mlp_input_projections(i)``, ``backbone.mlp_output_projection(i)`` and
``backbone.connector_parameters()`` (BLIP-2 and MiniGPT-4: Q-Former, query tokens and projection;
LLaVA: the multi-modal projector).
"""
from dataclasses import dataclass

MLP_INPUT = "mlp_input"
MLP_ACTIVATION = "mlp_activation"
MLP_OUTPUT = "mlp_output"
BLOCK_OUTPUT = "block_output"
COMPONENTS = (MLP_INPUT, MLP_ACTIVATION, MLP_OUTPUT, BLOCK_OUTPUT)


@dataclass(frozen=True)
class Site:
    component: str
    layer: int

    def __post_init__(self):
        if self.component not in COMPONENTS:
            raise ValueError(f"unknown site component {self.component!r}; known: {', '.join(COMPONENTS)}")

    def __str__(self) -> str:
        return f"layers.{self.layer}.{self.component}"

    @staticmethod
    def of(key) -> "Site":
        """A ``layer_edits`` key: a Site, or an int meaning that layer's block output."""
        if isinstance(key, Site):
            return key
        if isinstance(key, int) and not isinstance(key, bool):
            return Site(BLOCK_OUTPUT, key)
        raise TypeError(f"layer_edits keys are Site or int (block output of that layer), got {key!r}")


def edits_by_layer(layer_edits) -> dict[int, dict[str, object]]:
    """``{Site or int: f}`` -> ``{layer: {component: f}}``."""
    out: dict[int, dict[str, object]] = {}
    for key, fn in (layer_edits or {}).items():
        site = Site.of(key)
        out.setdefault(site.layer, {})[site.component] = fn
    return out
