"""Named sites (backbones/sites.py): every family names its FFN sites and its connector, the spelled
out layer forward equals the module's own, and an edit at a site changes only that call."""
import pytest
import torch

from backbones.sites import BLOCK_OUTPUT, COMPONENTS, MLP_ACTIVATION, MLP_INPUT, MLP_OUTPUT, Site, edits_by_layer
from vl_datasets.records import Sample

FAMILIES = ["blip2", "llava", "minigpt4"]
PROJ = {"blip2": (["fc1"], "fc2"), "minigpt4": (["gate_proj", "up_proj"], "down_proj"),
        "llava": (["gate_proj", "up_proj"], "down_proj")}


def samples(images):
    return [Sample("What color is the shape? The answer is:", "red", images[0]),
            Sample("nq question: who rules zorbia?", "Queen Quell", None)]


@pytest.mark.parametrize("family", FAMILIES)
def test_module_sites_name_the_real_modules(family, load_tiny):
    bb = load_tiny(family)
    layer = bb.layer(1)
    names = {id(m): n for n, m in layer.named_modules()}
    ins, out = PROJ[family]
    assert [names[id(m)].split(".")[-1] for m in bb.mlp_input_projections(1)] == ins
    assert names[id(bb.mlp_output_projection(1))].split(".")[-1] == out
    connector = {id(p) for p in bb.connector_parameters()}
    llm = {id(p) for p in bb.stack.decoder.parameters()}
    assert connector and not connector & llm  # the connector is not part of the LLM


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_site_edits_reproduce_the_plain_forward(family, load_tiny, images):
    """With identity functions at every inner site, the spelled-out layer forward is the module's."""
    bb = load_tiny(family)
    batch = bb.encode(samples(images))
    ident = {Site(c, layer): (lambda x, b: x) for c in COMPONENTS for layer in range(bb.num_layers)}
    with torch.no_grad():
        torch.testing.assert_close(bb.logits(batch, ident), bb.logits(batch), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_each_site_edit_reaches_its_tensor(family, load_tiny, images):
    bb = load_tiny(family)
    batch = bb.encode(samples(images))
    d_ff = bb.mlp_output_projection(2).in_features
    seen = {}

    def record(component):
        def f(x, b):
            seen[component] = x.shape[-1]
            return x * 0.5
        return f
    with torch.no_grad():
        plain = bb.logits(batch)
        for c in COMPONENTS:
            edited = bb.logits(batch, {Site(c, 2): record(c)})
            assert not torch.allclose(edited, plain), c
        torch.testing.assert_close(bb.logits(batch), plain)  # nothing left behind
    assert seen == {MLP_INPUT: bb.hidden_size, MLP_ACTIVATION: d_ff, MLP_OUTPUT: bb.hidden_size,
                    BLOCK_OUTPUT: bb.hidden_size}


def test_site_keys():
    assert Site.of(3) == Site(BLOCK_OUTPUT, 3) and str(Site(MLP_ACTIVATION, 4)) == "layers.4.mlp_activation"
    assert edits_by_layer({1: "a", Site(MLP_INPUT, 1): "b"}) == {1: {BLOCK_OUTPUT: "a", MLP_INPUT: "b"}}
    with pytest.raises(ValueError, match="unknown site component"):
        Site("attention", 1)
    with pytest.raises(TypeError):
        Site.of("layers.1")
