"""T-Patcher: one neuron per edit in one FFN, margin losses against a training-split memory."""
import pytest
import torch

from editor_checks import (QUESTION, data_dir, records,  # noqa: F401 (fixtures)
                           assert_batch_independent, assert_configs_checked, assert_restore_exact,
                           mixed_samples, rel)
from editors import EDITORS
from editors.tp import TPConfig, TPEditor
from vl_datasets.records import Sample

def cfg(**kw):
    return TPConfig(**{"layer": -1, "steps": 6, "lr": 5e-2, "early_stop_loss": 0.0, "lambda_act": 1.0,
                       "lambda_memory": 1.0, "margin_edit": 1.0, "margin_memory": -0.5, "margin_gap": 1.0,
                       "memory_datasets": ["EVQA"], "memory_records": 4, "memory_data_dir": None,
                       "reference_behaviour": False, **kw})


def make(bb, records, **kw):
    return EDITORS.get("tp")(bb, cfg(**kw), pool=records[2:])


@pytest.mark.parametrize("family", ["blip2", "llava", "minigpt4"])
def test_restore_is_exact(family, load_tiny, records):
    editor = make(load_tiny(family), records)
    assert_restore_exact(editor, [r.edit for r in records[:2]], mixed_samples(records))
    assert len(editor.patches) == 0


def test_one_neuron_per_edit_in_doubling_storage(load_tiny, records):
    editor = make(load_tiny("blip2"), records, steps=1)
    d = editor.backbone.hidden_size
    caps = []
    for i in range(17):
        editor.edit(records[i % 2].edit)
        caps.append(editor.patches.capacity)
    assert len(editor.patches) == 17 and editor.state_bytes() == 17 * (2 * d + 1) * 4
    assert caps[15] == 16 and caps[16] == 32   # grown once, by doubling
    editor.restore()


def test_one_edit_lifts_rel(load_tiny, records, images):
    editor = make(load_tiny("blip2"), records, steps=30)
    request = Sample(QUESTION, "blue", images[0])
    assert rel(editor, request) == 0
    editor.edit(request)
    assert rel(editor, request) == 1
    editor.restore()


def test_reference_behaviour_starts_from_zero_and_trains_on_overwritten_inputs(load_tiny, records, images):
    """The repo's tp_vl: zero key and value, so step 1's NLL gradient is zero and only the activation
    term moves the key; from step 2 the "edit" input is a memory text followed by the target."""
    bb = load_tiny("blip2")
    editor = make(bb, records, steps=1, reference_behaviour=True, lambda_act=1e-3, lambda_memory=1e-3)
    editor.edit(Sample(QUESTION, "blue", images[0]))
    assert not editor.patches.view("value").any() and editor.patches.view("key").abs().max() > 0
    seen = []
    real = editor._prepare
    editor._prepare = lambda s: (seen.append(s), real(s))[1]
    editor.config.steps = 3
    editor.edit(Sample(QUESTION, "blue", images[0]))
    assert seen[0].image is not None and all(s.image is None and s.target == "blue" for s in seen[1:])
    assert {s.prompt for s in seen[1:]} <= {m.prompt for m in editor.memory_text}
    editor.restore()


def test_key_starts_at_activation_one_and_memory_is_pushed_off(load_tiny, records, images):
    bb = load_tiny("blip2")
    request = Sample(QUESTION, "blue", images[0])
    editor = make(bb, records, steps=1, lr=1e-9)   # the initial neuron
    editor.edit(request)
    batch = bb.encode([request])
    act = editor.activations(batch)[0, :, 0]
    pred = (batch.labels[0, 1:] != -100).nonzero().flatten()
    assert act[pred].mean().item() == pytest.approx(1.0, abs=1e-4)
    trained = make(bb, records, steps=40)
    trained.edit(request)
    on_memory = (trained.memory @ trained.patches.view("key")[0] + trained.patches.view("bias")[0] > 0)
    initial = (editor.memory @ editor.patches.view("key")[0] > 0)
    assert on_memory.float().mean() < initial.float().mean()
    assert trained.activations(batch)[0, pred, 0].min() > 0
    editor.restore()


def test_activation_ignores_the_target_and_padding(load_tiny, records, images):
    bb = load_tiny("blip2")
    editor = make(bb, records)
    editor.edit(Sample(QUESTION, "blue", images[0]))
    editor.edit(records[0].edit)
    a, b = Sample(QUESTION, "red", images[1]), Sample(QUESTION, "Queen Quell", images[1])
    batch = bb.encode([a, b, Sample(QUESTION, "red", None)])
    acts = editor.activations(batch)
    end = int(batch.prompt_range[0, 1])
    assert torch.allclose(acts[0, :end], acts[1, :end], atol=1e-6)
    no_target = bb.encode([a], with_targets=False)
    assert torch.allclose(editor.activations(no_target)[0, :end], acts[0, :end], atol=1e-6)
    pad = batch.attention_mask == 0
    assert pad.any() and not acts[pad].any()
    editor.restore()


def test_batch_of_one_and_eight_agree(load_tiny, records, images):
    editor = make(load_tiny("llava"), records)
    editor.edit(Sample(QUESTION, "blue", images[0]))
    editor.edit(records[1].edit)
    assert_batch_independent(editor, mixed_samples(records))
    editor.restore()


def test_configs_are_checked(tmp_path, load_tiny):
    assert_configs_checked(TPConfig, "tp", tmp_path, negative_key="lambda_memory", float_key="lr")
    from utils.errors import UserError
    with pytest.raises(UserError, match="tp: layer 9 out of range"):
        TPEditor(load_tiny("blip2"), cfg(layer=9), pool=[])
