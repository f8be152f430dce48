"""FT-M: FT-L's loop on the vision-language connector."""
import pytest
import torch

from editor_checks import (data_dir, records,  # noqa: F401 (fixtures)
                           assert_batch_independent, assert_configs_checked, assert_restore_exact,
                           logits_of, mixed_samples, rel)
from editors import EDITORS
from editors.ft_m import FTMConfig, FTMEditor
from vl_datasets.records import Sample


def cfg(**kw):
    return FTMConfig(**{"steps": 4, "lr": 3e-2, "early_stop_loss": 0.01, "norm_constraint": None, **kw})


@pytest.mark.parametrize("family", ["blip2", "llava"])
def test_edits_only_the_connector_and_restores_exactly(family, load_tiny, records):
    bb = load_tiny(family)
    editor = EDITORS.get("ft-m")(bb, cfg())
    connector = {id(p) for p in bb.connector_parameters()}
    before = {n: p.detach().clone() for n, p in bb.model.named_parameters()}
    editor.edit(records[0].edit)
    changed = {n for n, p in bb.model.named_parameters() if not torch.equal(before[n], p)}
    assert changed and all(id(dict(bb.model.named_parameters())[n]) in connector for n in changed)
    assert editor.state_bytes() == sum(p.numel() * p.element_size() for p in bb.connector_parameters())
    editor.restore()
    assert_restore_exact(editor, [r.edit for r in records[:2]], mixed_samples(records))


def test_one_edit_lifts_rel(load_tiny, images):
    editor = FTMEditor(load_tiny("llava"), cfg(steps=30))
    request = Sample("What color is the shape? The answer is:", "blue", images[0])
    assert rel(editor, request) == 0
    editor.edit(request)
    assert rel(editor, request) == 1
    editor.restore()


def test_text_only_queries_and_requests_are_untouched(load_tiny, records):
    """FT-M cannot route: its change lives in the image features, so text-only samples keep their
    logits exactly, and a text-only request changes nothing."""
    bb = load_tiny("blip2")
    editor = FTMEditor(bb, cfg())
    text = [r.text_loc for r in records]
    before = logits_of(editor, text)
    editor.edit(Sample("nq question: who rules zorbia?", "red", None))
    assert editor.n_edits == 1 and torch.equal(logits_of(editor, mixed_samples(records)),
                                               logits_of(FTMEditor(bb, cfg()), mixed_samples(records)))
    editor.edit(records[0].edit)
    assert torch.equal(logits_of(editor, text), before)
    editor.restore()


def test_batch_of_one_and_eight_agree(load_tiny, records):
    editor = FTMEditor(load_tiny("blip2"), cfg())
    editor.edit(records[0].edit)
    assert_batch_independent(editor, mixed_samples(records))
    editor.restore()


def test_configs_are_checked(tmp_path):
    assert_configs_checked(FTMConfig, "ft-m", tmp_path, negative_key="steps", float_key="lr")
