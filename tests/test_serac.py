"""SERAC (editors/serac): configs, the edit memory (ids + image path, key pool of the pooled width,
growth by doubling), per-sample retrieval from image + prompt only, exact restore and exact misses,
batch-size independence, the edited state across processes, and training through the shared loop
(losses fall, an edit then lifts Rel, exact resume, foreign checkpoints refused)."""
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from editors import EDITORS
from editors.serac import EditMemory, Serac, SeracConfig, SeracLossWeights, SeracModel, SeracTrain
from fixtures import write_evqa
from trainable_editor_checks import (check_batch_size_independent, check_exact_resume,
                                     check_foreign_checkpoint_refused, check_state_reloads_in_new_process,
                                     sharp_blip2, train, write_config)
from utils.config import load_config
from utils.errors import UserError
from utils.losses import token_accuracy
from vl_datasets import load_dataset
from vl_datasets.records import Sample

ROOT = Path(__file__).resolve().parent.parent
BACKBONE_NAMES = ["blip2-opt-2.7b", "llava-v1.5-7b", "minigpt-4-vicuna-7b", "tiny-blip2", "tiny-llava", "tiny-minigpt4"]


def make_config(**over) -> SeracConfig:
    small = lambda: SeracModel(None, hidden=32, layers=1, heads=4, max_positions=256)
    kw = dict(classifier=small(), counterfactual=small(), threshold=10.0, anchor_in_scope=True,
              train=SeracTrain(lr=1e-2, lr_cut_step=None))
    kw.update(over)
    return SeracConfig(**kw)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_evqa(tmp_path_factory.mktemp("serac"), n=7, seed=3)


@pytest.fixture(scope="module")
def records(data_dir):
    return load_dataset("EVQA", "eval", data_dir)


@pytest.fixture(scope="module")
def sharp(tiny_dirs, tmp_path_factory):
    return sharp_blip2(tiny_dirs, tmp_path_factory.mktemp("sharp"))


@pytest.fixture(scope="module")
def trained(sharp, records):
    """A SERAC on the (sharp) fixture tiny-blip2 trained on the records (batches of 4), and its loss history."""
    # (loc_kl small: a 1-layer counterfactual model learns to copy the edit's answer within the
    # budget, while imitating the random base model on unrelated queries would take far longer)
    ed = Serac(sharp[1], make_config(loss_weights=SeracLossWeights(loc_kl=0.01)))
    opt = torch.optim.Adam(ed.trainable_parameters(), lr=ed.config.train.lr)
    ed.train()
    history = []
    for step in range(80):
        batch = [records[(4 * step + i) % len(records)] for i in range(4)]
        losses = ed.training_losses(batch)
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
        history.append({k: float(v.detach()) for k, v in losses.items()})
    ed.eval()
    return ed, history


def mixed_samples(records):
    return ([r.edit for r in records[:3]] + [r.image_rephrase for r in records[:2]] + [r.image_loc for r in records[:2]]
            + [records[0].text_loc])


# ---- config ------------------------------------------------------------------------------------
@pytest.mark.parametrize("backbone", BACKBONE_NAMES)
def test_configs_load_for_every_backbone(backbone):
    from utils.GLOBAL import model_path_map
    assert EDITORS.get("serac") is Serac
    cfg = load_config(SeracConfig, "serac", backbone)
    assert cfg.threshold == 10.0 and cfg.train.lr == 1e-4
    assert all(getattr(cfg.loss_weights, k) == 1.0 for k in ("nll", "scope", "loc_kl", "loc_scope"))
    if backbone.startswith("tiny"):
        assert cfg.classifier.pretrained is None and cfg.classifier.hidden == cfg.counterfactual.hidden == 128
    else:   # BERT-base-cased and OPT-125m from local folders named in the path map
        assert cfg.classifier.pretrained == "serac-classifier-bert-base-cased"
        assert cfg.counterfactual.pretrained == "serac-counterfactual-opt-125m"
        assert {cfg.classifier.pretrained, cfg.counterfactual.pretrained} <= set(model_path_map)


def test_config_keys_and_values_are_checked(tmp_path, load_tiny, monkeypatch):
    good = (ROOT / "configs" / "serac" / "tiny-blip2.yaml").read_text()
    cases = {"unknown key 'treshold'": good.replace("\nthreshold:", "\ntreshold:"),
             "missing key 'anchor_in_scope'": good.replace("anchor_in_scope:", "# anchor_in_scope:"),
             "serac.classifier.hidden: expected a positive integer": good.replace("hidden: 128", "hidden: -8", 1),
             "serac.classifier: hidden=128 is not divisible by heads=3": good.replace("heads: 4", "heads: 3"),
             "train.lr: expected float": re.sub(r"\blr: \S+", "lr: 1e-4", good),
             "serac.loss_weights.scope: expected >= 0": good.replace("scope: 1.0", "scope: -1.0"),
             ".anchor_in_scope: expected bool, got 1": good.replace("anchor_in_scope: true", "anchor_in_scope: 1"),
             "serac.classifier.hidden: the pretrained model 'bert' fixes it":
                 good.replace("pretrained: null           # null: a tiny BertModel", "pretrained: bert #", 1)}
    for message, text in cases.items():
        path = tmp_path / "c.yaml"
        path.write_text(text)
        with pytest.raises(UserError, match=re.escape(message)):
            load_config(SeracConfig, "serac", "tiny-blip2", path)
    real = SeracModel("serac-classifier-bert-base-cased")
    with pytest.raises(UserError, match="'nosuch' is not in utils/GLOBAL.py model_path_map"):
        Serac(load_tiny("blip2"), make_config(classifier=SeracModel("nosuch")))
    monkeypatch.setitem(__import__("utils.GLOBAL").GLOBAL.model_path_map, real.pretrained, str(tmp_path / "none"))
    with pytest.raises(UserError, match="no Hugging Face model folder at .*none"):
        Serac(load_tiny("blip2"), make_config(classifier=real))


# ---- memory ------------------------------------------------------------------------------------
def test_memory_stores_ids_and_image_and_grows_by_doubling(load_tiny, records):
    bb = load_tiny("blip2")
    ed = Serac(bb, make_config())
    assert ed.memory.key_width == 3 * 32 and ed.memory.keys.shape == (0, 96)      # the pooled width
    capacity, pointers = [], set()
    for i in range(40):
        ed.edit(records[i % len(records)].edit)
        capacity.append(ed.memory.capacity)
        pointers.add(ed.memory._keys.data_ptr())
    assert capacity[0] == 16 and capacity[-1] == 64 and len(pointers) == 3     # 16 -> 32 -> 64, no per-edit copy
    entry = ed.memory.entries[1]
    assert set(entry) == {"ids", "n_context", "image"} and entry["image"] == records[1].edit.image
    batch = bb.encode([records[i % len(records)].edit for i in range(40)])
    with torch.no_grad():
        torch.testing.assert_close(ed.memory.keys, ed.edit_keys(batch), rtol=1e-4, atol=1e-5)
    for i, e in zip([1, 8, 39], ed.memory.embeddings(bb, [1, 8, 39])):      # re-embedded from ids + image
        n = int(batch.lengths[i])
        assert torch.equal(e, batch.inputs_embeds[i, :n])
    assert ed.state_bytes() == 40 * 96 * 4 + sum(4 * len(e["ids"]) + 4 + len(e["image"].encode())
                                                for e in ed.memory.entries)
    with pytest.raises(ValueError, match="expected \\(96,\\)"):
        EditMemory(96).append(torch.zeros(32), [1], 1, None)      # the authors' pool width: refused, not a crash
    ed.restore()
    assert len(ed.memory) == 0 and ed.memory.capacity == 16 and ed.state_bytes() == 0


# ---- retrieval and inference -------------------------------------------------------------------
def test_misses_and_restore_are_exact(load_tiny, records):
    bb = load_tiny("blip2")
    samples = mixed_samples(records)
    batch = bb.encode(samples)
    with torch.no_grad():
        plain = bb.logits(batch)
    never, always = Serac(bb, make_config(threshold=1e9)), Serac(bb, make_config(threshold=-1e9))
    # inference_threshold replaces threshold at inference (training keeps anchoring at threshold)
    never_too = Serac(bb, make_config(threshold=-1e9, inference_threshold=1e9))
    for ed in (never, always, never_too):
        for r in records[:3]:
            ed.edit(r.edit)
    with torch.no_grad():
        assert not never.retrieve(batch)[2].any() and torch.equal(never.logits(batch), plain)
        assert not never_too.retrieve(batch)[2].any()
        assert always.retrieve(batch)[2].all()
        hit = always.logits(batch)
    assert all(not torch.equal(hit[b], plain[b]) for b in range(len(samples)))
    for ed in (never, always):
        ed.restore()
        with torch.no_grad():
            assert torch.equal(ed.logits(batch), plain)
        assert ed.generate(samples[:2], 2) == bb.generate(samples[:2], 2)


def test_retrieval_ignores_the_target(trained, records):
    ed, _ = trained
    bb = ed.backbone
    for r in records[:4]:
        ed.edit(r.edit)
    try:
        for r in records[:3]:
            s = r.image_rephrase
            variants = [replace(s, target=t) for t in ("red", "blue circle photo")]
            batches = [bb.encode(variants), bb.encode([s], with_targets=False), bb.encode([variants[1]])]
            with torch.no_grad():
                keys = [ed.query_keys(b) for b in batches]
                found = [ed.retrieve(b) for b in batches]
            for k, (score, index, hit) in zip(keys[1:], found[1:]):
                torch.testing.assert_close(k[0], keys[0][0], rtol=1e-5, atol=1e-5)
                assert index[0] == found[0][1][0] and hit[0] == found[0][2][0]
            torch.testing.assert_close(keys[0][0], keys[0][1], rtol=1e-5, atol=1e-5)
            assert found[0][1][0] == found[0][1][1]
    finally:
        ed.restore()


def test_batch_size_1_and_8_agree_with_hits_and_misses(trained, records):
    ed, _ = trained
    for r in records[:3]:
        ed.edit(r.edit)
    try:
        samples = mixed_samples(records)
        with torch.no_grad():
            hit = ed.retrieve(ed.backbone.encode(samples))[2]
        assert hit.any() and not hit.all(), hit
        check_batch_size_independent(ed, samples)
    finally:
        ed.restore()


# ---- training ----------------------------------------------------------------------------------
def test_training_losses_fall_and_an_edit_lifts_rel(trained, records):
    ed, history = trained
    assert set(history[0]) == {"nll", "scope", "loc_kl", "loc_scope"}
    first = {k: sum(h[k] for h in history[:5]) for k in history[0]}
    last = {k: sum(h[k] for h in history[-5:]) for k in history[0]}
    for k in ("nll", "scope", "loc_scope"):
        assert last[k] < 0.7 * first[k], (k, first, last)
    rel_before, rel_after = [], []
    for r in records:                                      # T = 1: edit, test, restore
        with torch.no_grad():
            batch = ed.backbone.encode([r.edit])
            rel_before.append(token_accuracy(ed.backbone.logits(batch), batch.labels).item())
            ed.edit(r.edit)
            rel_after.append(token_accuracy(ed.logits(batch), batch.labels).item())
        ed.restore()
    assert sum(rel_after) / len(records) >= sum(rel_before) / len(records) + 0.5, (rel_before, rel_after)


def test_saved_state_reloads_in_a_new_process(trained, sharp, load_tiny, records, tmp_path):
    ed, _ = trained
    for r in records[:3]:
        ed.edit(r.edit)
    try:
        expected = check_state_reloads_in_new_process(ed, sharp[0], mixed_samples(records), tmp_path)
        ed.restore()
        ed.load_state(tmp_path / "state")
        with torch.no_grad():
            assert ed.n_edits == 3 and torch.equal(ed.logits(ed.backbone.encode(mixed_samples(records))), expected)
    finally:
        ed.restore()
    with pytest.raises(UserError, match="made with weights .*load the same trained checkpoint first"):
        Serac(sharp[1], make_config(seed=1, loss_weights=SeracLossWeights(loc_kl=0.01))).load_state(tmp_path / "state")
    with pytest.raises(UserError, match="made with backbone 'tiny-blip2', this editor has 'tiny-llava'"):
        Serac(load_tiny("llava"), make_config()).load_state(tmp_path / "state")


def test_loop_resumes_exactly_and_checkpoint_is_refused_elsewhere(tiny_dirs, data_dir, tmp_path, capsys):
    cfg = write_config(tmp_path / "serac.yaml", make_config())
    result = train(tiny_dirs, data_dir, tmp_path / "records", "serac", cfg, "--max_steps", 4, "-sci", 2)
    check_exact_resume(result, tmp_path, steps=4)
    check_foreign_checkpoint_refused(tiny_dirs, data_dir, result.final_checkpoint, "serac", "mend", tmp_path, capsys)
