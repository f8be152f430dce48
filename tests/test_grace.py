"""GRACE: a codebook at one FFN keyed on the last prompt token, radius calibrated to the layer."""
import pytest
import torch

from editor_checks import (QUESTION, data_dir, records,  # noqa: F401 (fixtures)
                           assert_batch_independent, assert_configs_checked, assert_restore_exact,
                           logits_of, mixed_samples, rel)
from editors import EDITORS
from editors.grace import GraceConfig
from utils.errors import UserError
from vl_datasets.records import Sample


def cfg(**kw):
    return GraceConfig(**{"layer": 2, "n_iter": 10, "lr": 1.0, "early_stop_loss": 0.0, "value_init": "cold",
                          "epsilon_factor": 0.5, "epsilon_init": None, "pool_datasets": ["EVQA"],
                          "pool_records": 4, "pool_data_dir": None, "reference_query_position": False, **kw})


def make(bb, records, **kw):
    return EDITORS.get("grace")(bb, cfg(**kw), pool=records[2:])


@pytest.mark.parametrize("family", ["blip2", "llava", "minigpt4"])
def test_restore_is_exact(family, load_tiny, records):
    editor = make(load_tiny(family), records, epsilon_factor=100.0)   # every query hits
    assert_restore_exact(editor, [r.edit for r in records[:2]], mixed_samples(records))
    assert len(editor.book) == 0 and editor.labels == []


def test_radius_is_calibrated_on_the_pool(load_tiny, records):
    bb = load_tiny("blip2")
    editor = make(bb, records)
    q = editor._queries([r.edit for r in records[2:]])
    d = torch.cdist(q, q)
    d.fill_diagonal_(float("inf"))
    assert editor.typical_distance == pytest.approx(d.min(1).values.median().item(), rel=1e-4)
    assert editor.eps_init == pytest.approx(0.5 * editor.typical_distance)
    assert make(bb, records, epsilon_init=2.5).eps_init == 2.5


def test_one_edit_lifts_rel_and_a_far_query_is_untouched(load_tiny, records, images):
    bb = load_tiny("blip2")
    editor = make(bb, records, n_iter=20)
    request = Sample(QUESTION, "blue", images[0])
    far = [records[3].text_loc, records[4].text_loc]
    before = logits_of(editor, far)
    assert rel(editor, request) == 0
    editor.edit(request)
    assert rel(editor, request) == 1
    pos, hit, idx = editor.lookup(bb.encode(far))
    assert not hit.any() and torch.equal(logits_of(editor, far), before)
    editor.restore()


def test_codebook_rules(load_tiny, records, images):
    bb = load_tiny("blip2")
    editor = make(bb, records, n_iter=2, epsilon_init=1e6)
    a = Sample(QUESTION, "blue", images[0])
    editor.edit(a)
    editor.edit(Sample(QUESTION, "blue", images[1]))          # same label within range: radius grows
    assert len(editor.book) == 1 and editor.book.view("epsilon")[0] == 1e6
    editor.edit(Sample(QUESTION, "red", images[2]))           # another label: a new key, both radii halved
    assert len(editor.book) == 2 and editor.labels == ["blue", "red"]
    eps = editor.book.view("epsilon")
    dist = torch.dist(editor.book.view("key")[0], editor.book.view("key")[1]).item()
    assert eps[0].item() == pytest.approx(dist / 2, rel=1e-5) and eps[1].item() == pytest.approx(dist / 2, rel=1e-5)
    d = bb.hidden_size
    assert editor.state_bytes() == 2 * (editor.key_dim + d + 1) * 4 + len("blue") + len("red")
    editor.restore()


def test_query_ignores_the_target(load_tiny, records, images):
    bb = load_tiny("blip2")
    editor = make(bb, records, epsilon_factor=1.0)
    editor.edit(Sample(QUESTION, "blue", images[0]))
    editor.edit(records[0].edit)
    same = [Sample(QUESTION, t, images[0]) for t in ("blue", "Queen Quell", "red")]
    with_targets = editor.lookup(bb.encode(same))
    without = editor.lookup(bb.encode(same, with_targets=False))
    for got in (with_targets, without):
        assert got[1].all() and (got[2] == 0).all()
        assert torch.equal(got[0], with_targets[0])
    # the replaced position is the last prompt token, never a target token
    batch = bb.encode(same)
    assert torch.equal(with_targets[0], batch.prompt_range[:, 1] - 1)
    assert (with_targets[0] < batch.target_range[:, 0]).all()
    editor.restore()


def test_reference_query_position_reads_the_last_edits_position(load_tiny, records, images):
    bb = load_tiny("blip2")
    editor = make(bb, records, reference_query_position=True)
    editor.edit(Sample(QUESTION, "blue", images[0]))
    short = Sample("nq question: who rules zorbia?", "red", None)
    batch = bb.encode([short, Sample(QUESTION, "red", images[1])])
    pos = editor.lookup(batch)[0]
    assert pos.tolist() == [min(editor.last_query_position, int(batch.lengths[0]) - 1), editor.last_query_position]
    editor.restore()


def test_batch_of_one_and_eight_agree(load_tiny, records, images):
    editor = make(load_tiny("llava"), records, epsilon_factor=3.0)
    editor.edit(Sample(QUESTION, "blue", images[0]))
    editor.edit(records[1].edit)
    samples = mixed_samples(records)
    assert editor.lookup(editor.backbone.encode(samples))[1].any()
    assert_batch_independent(editor, samples)
    editor.restore()


def test_configs_are_checked(tmp_path, load_tiny):
    assert_configs_checked(GraceConfig, "grace", tmp_path, negative_key="n_iter", float_key="lr")
    with pytest.raises(UserError, match="grace.value_init: expected cold or warm"):
        cfg(value_init="hot")
