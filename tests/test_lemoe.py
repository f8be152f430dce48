"""LEMoE: configs, exact restore, per-sample routing that ignores the target, buffered edits answering
queries, batch-size independence, and the edited state reloaded in a new process."""
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from backbones.sites import MLP_INPUT, Site
from editors import EDITORS
from editors.lemoe import LEMoEConfig, LEMoEEditor
from editors.lemoe.common import IrrelevantPool, query_mask
from fixtures import write_evqa
from utils.config import load_config
from utils.errors import UserError
from utils.losses import token_accuracy
from vl_datasets import load_dataset
from vl_datasets.records import Sample

ROOT = Path(__file__).resolve().parent.parent
BACKBONE_NAMES = ["blip2-opt-2.7b", "llava-v1.5-7b", "minigpt-4-vicuna-7b", "tiny-blip2", "tiny-llava", "tiny-minigpt4"]


def cfg(**over) -> LEMoEConfig:
    kw = dict(layer=2, rank=4, router_hidden=16, edits_per_expert=2, max_steps=25, lr=5e-2, min_loss=0.03,
              init_std=0.01, train_router_keys=True, flush_before_query=True, null_expert=False, locality_weight=0.0,
              locality_samples=2, irrelevant_dataset="EVQA", irrelevant_data_dir=None, irrelevant_pool_size=10, seed=0)
    kw.update(over)
    return LEMoEConfig(**kw)


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    return load_dataset("EVQA", "eval", write_evqa(tmp_path_factory.mktemp("evqa"), n=6, seed=1))


def make(bb, records, **over) -> LEMoEEditor:
    ed = LEMoEEditor(bb, cfg(**over))
    ed.pool = IrrelevantPool.of([s for r in records[3:] for s in (r.text_loc, r.image_loc)])
    return ed


def logits_of(ed, samples):
    with torch.no_grad():
        return ed.logits(ed.backbone.encode(samples))


def rel(ed, sample) -> float:
    with torch.no_grad():
        batch = ed.backbone.encode([sample])
        return token_accuracy(ed.logits(batch), batch.labels).item()


def mixed(records):
    """Samples of every kind (image / text-only, different lengths) for batch checks."""
    return [s for r in records[:2] for s in r.samples().values()]


# ---- configs ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("backbone", BACKBONE_NAMES)
def test_configs_load_strictly_for_every_backbone(backbone):
    c = load_config(LEMoEConfig, "lemoe", backbone)
    assert EDITORS.get("lemoe").config_class is LEMoEConfig
    assert c.train_router_keys and c.flush_before_query and c.edits_per_expert >= 1
    assert c.layer == (4 if backbone.startswith("tiny") else 30)


def test_config_keys_types_and_ranges_are_checked(tmp_path):
    text = (ROOT / "configs/lemoe/tiny-blip2.yaml").read_text()
    (tmp_path / "a.yaml").write_text(text + "ranks: 4\n")
    with pytest.raises(UserError, match="unknown key 'ranks'"):
        load_config(LEMoEConfig, "lemoe", "tiny-blip2", tmp_path / "a.yaml")
    (tmp_path / "b.yaml").write_text(re.sub(r"\bmax_steps: \d+", "max_steps: -1", text))
    with pytest.raises(UserError, match="max_steps must be >= 1, got -1"):
        load_config(LEMoEConfig, "lemoe", "tiny-blip2", tmp_path / "b.yaml")
    (tmp_path / "c.yaml").write_text(text.replace("train_router_keys: true", "train_router_keys: 1"))
    with pytest.raises(UserError, match="train_router_keys: expected bool, got 1"):
        load_config(LEMoEConfig, "lemoe", "tiny-blip2", tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text(text.replace("seed: 0", ""))
    with pytest.raises(UserError, match="missing key 'seed'"):
        load_config(LEMoEConfig, "lemoe", "tiny-blip2", tmp_path / "d.yaml")
    with pytest.raises(UserError, match="locality_samples must be >= 1 when locality_weight > 0"):
        cfg(locality_weight=1.0, locality_samples=0)


# ---- editing -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["blip2", "llava"])
def test_restore_is_exact_and_the_backbone_never_changes(family, load_tiny, records):
    bb = load_tiny(family)
    weights = {k: v.clone() for k, v in bb.model.state_dict().items()}
    samples = mixed(records)
    before = logits_of(make(bb, records), samples)
    ed = make(bb, records, locality_weight=1.0)
    for r in records[:3]:
        ed.edit(r.edit)
    edited = logits_of(ed, samples)
    assert not torch.equal(edited, before) and ed.state_bytes() == 2 * ed.experts.row_bytes()
    ed.restore()
    assert torch.equal(logits_of(ed, samples), before)
    assert ed.state_bytes() == 0 and ed.n_edits == 0 and not ed.buffer
    assert all(torch.equal(weights[k], v) for k, v in bb.model.state_dict().items())
    assert not any(p.requires_grad for p in bb.model.parameters())


def test_an_edit_lifts_rel_far_above_the_unedited_model(load_tiny, records):
    bb = load_tiny("blip2")
    ed = make(bb, records, edits_per_expert=1)
    unedited, edited = [], []
    for r in records[:3]:
        unedited.append(rel(ed, r.edit))
        ed.edit(r.edit)
        edited.append(rel(ed, r.edit))
        ed.restore()
    assert sum(edited) / 3 >= sum(unedited) / 3 + 0.5, (unedited, edited)


def test_edits_short_of_a_full_buffer_answer_queries(load_tiny, records):
    """3 edits with batch 2: one committed expert and a provisional one for the third edit. Queries
    do not change what the edits commit; with the authors' behaviour the buffered edit is invisible."""
    bb = load_tiny("blip2")
    ed = make(bb, records)
    for r in records[:3]:
        ed.edit(r.edit)
    assert len(ed.experts) == 1 and len(ed.buffer) == 1 and ed.pending is None
    assert rel(ed, records[2].edit) == 1.0 and ed.pending is not None
    third_pending = {k: v.clone() for k, v in ed.pending.items()}
    assert ed.state_bytes() == 2 * ed.experts.row_bytes()
    ed.edit(records[3].edit)           # fills the buffer: the provisional expert is replaced
    quiet = make(bb, records)          # the same four edits, never queried in between
    for r in records[:4]:
        quiet.edit(r.edit)
    assert len(ed.experts) == 2 and not ed.buffer and ed.pending is None
    assert all(torch.equal(ed.experts.view(k), quiet.experts.view(k)) for k in ed.shapes)

    # the evaluation's scoring pass runs under inference mode: a flush from there trains the same expert
    scored = make(bb, records)
    for r in records[:3]:
        scored.edit(r.edit)
    with torch.inference_mode():
        scored.logits(bb.encode(mixed(records)))
    assert all(torch.equal(scored.pending[k], ed_pending) for k, ed_pending in third_pending.items())

    authors = make(bb, records, flush_before_query=False)
    committed_only = make(bb, records)
    for r in records[:3]:
        authors.edit(r.edit)
    for r in records[:2]:
        committed_only.edit(r.edit)
    assert torch.equal(logits_of(authors, mixed(records)), logits_of(committed_only, mixed(records)))
    assert authors.pending is None


def test_buffered_edits_are_flushed_from_a_scoring_pass(load_tiny, records):
    """The evaluation scores under inference mode; a query then trains the provisional expert."""
    from evaluation.scoring import run_samples
    ed = make(load_tiny("blip2"), records, max_steps=2)
    ed.edit(records[0].edit)
    out = run_samples(ed, [records[0].edit, records[1].image_loc], 2)
    assert len(out) == 2 and ed.pending is not None


def test_router_keys_are_trained_unless_the_authors_flag_is_set(load_tiny, records):
    bb = load_tiny("blip2")
    keys = {}
    for flag in (True, False):
        ed = make(bb, records, train_router_keys=flag)
        for r in records[:4]:
            ed.edit(r.edit)
        keys[flag] = ed.experts.view("key").clone()
        initial = torch.stack([ed.initial_expert(n)["key"] for n in range(2)])
    assert torch.equal(keys[False], initial)          # the authors' anchors: never trained
    assert (keys[True] - initial).abs().max() > 0.01


def route(ed, batch):
    out = {}

    def read(x, b):
        out["w"] = ed.routing(x, b)
        return x
    with torch.no_grad():
        ed.backbone.logits(batch, {Site(MLP_INPUT, ed.layer_index): read})
    return out["w"]


def test_routing_is_per_sample_and_ignores_the_target(load_tiny, records):
    bb = load_tiny("llava")
    ed = make(bb, records, train_router_keys=True)
    for r in records[:5]:
        ed.edit(r.edit)
    ed.flush()
    s = records[0].edit
    a, b = Sample(s.prompt, "blue", s.image), Sample(s.prompt, "circle shape photo", s.image)
    wa, wb = route(ed, bb.encode([a])), route(ed, bb.encode([b]))
    assert wa.shape == (1, 3) and torch.equal(wa, wb)
    assert torch.equal(wa, route(ed, bb.encode([a], with_targets=False)))
    # in a padded batch each sample routes as it does alone; padding and targets never enter the mean
    batch = bb.encode([b, records[1].text_loc, a])
    assert query_mask(batch)[1].sum() < query_mask(batch)[0].sum()
    w = route(ed, batch)
    torch.testing.assert_close(w[0], wb[0])
    torch.testing.assert_close(w[2], wa[0])
    torch.testing.assert_close(w[1], route(ed, bb.encode([records[1].text_loc]))[0])


def test_batch_size_does_not_change_results(load_tiny, records):
    bb = load_tiny("minigpt4")
    ed = make(bb, records)
    for r in records[:3]:
        ed.edit(r.edit)
    samples = mixed(records)
    with torch.no_grad():
        batch = bb.encode(samples)
        together = ed.logits(batch)
        gen8 = ed.generate(samples, 3)
    for i, s in enumerate(samples):
        with torch.no_grad():
            alone = ed.logits(bb.encode([s]))[0]
        n = alone.shape[0]
        torch.testing.assert_close(together[i, :n], alone, atol=1e-5, rtol=1e-4)
        assert torch.equal(together[i, :n].argmax(-1), alone.argmax(-1))
        assert ed.generate([s], 3) == [gen8[i]]


CHILD = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {root!r})
    from safetensors.torch import save_file
    from backbones import BACKBONES
    from editors.lemoe import LEMoEConfig, LEMoEEditor
    from vl_datasets.records import Sample
    bb = BACKBONES.get("tiny-blip2").load("tiny-blip2", {model!r})
    ed = LEMoEEditor(bb, LEMoEConfig(**{cfg!r}))
    ed.load_state({state!r})
    samples = [Sample(*s) for s in {samples!r}]
    with torch.no_grad():
        save_file({{"logits": ed.logits(bb.encode(samples))}}, {out!r})
    print(len(ed.experts), len(ed.buffer), ed.n_edits, ed.state_bytes())
""")


def test_saved_state_reloads_in_a_new_process(load_tiny, tiny_dirs, records, tmp_path):
    bb = load_tiny("blip2")
    ed = make(bb, records)
    for r in records[:3]:
        ed.edit(r.edit)
    samples = mixed(records)
    expected = logits_of(ed, samples)
    ed.save_state(tmp_path / "state")
    script = CHILD.format(root=str(ROOT), model=str(tiny_dirs["blip2"]), cfg=vars(cfg()), state=str(tmp_path / "state"),
                          samples=[(s.prompt, s.target, s.image) for s in samples], out=str(tmp_path / "out.st"))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["1", "1", "3", str(ed.state_bytes())]
    assert torch.equal(load_file(str(tmp_path / "out.st"))["logits"], expected)
    # here too, and a further edit continues from the loaded buffer
    again = make(bb, records)
    again.load_state(tmp_path / "state")
    assert torch.equal(logits_of(again, samples), expected)
    again.edit(records[3].edit)
    ed.edit(records[3].edit)
    assert all(torch.equal(ed.experts.view(k), again.experts.view(k)) for k in ed.shapes)
    with pytest.raises(UserError, match="has shapes"):
        make(bb, records, rank=2).load_state(tmp_path / "state")
    with pytest.raises(UserError, match="no edited state"):
        again.load_state(tmp_path / "missing")
