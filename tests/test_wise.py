"""WISE: configs, exact restore, inference that never changes state, per-sample routing that ignores
the target, shards / merges in both modes, TIES merging, batch-size independence, and the edited state
reloaded in a new process."""
import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from editors import EDITORS
from editors.lemoe.common import IrrelevantPool
from editors.wise import WISEConfig, WISEEditor, ties_merge
from fixtures import write_evqa
from utils.config import load_config
from utils.errors import UserError
from utils.losses import token_accuracy
from vl_datasets import load_dataset
from vl_datasets.records import Sample

ROOT = Path(__file__).resolve().parent.parent
BACKBONE_NAMES = ["blip2-opt-2.7b", "llava-v1.5-7b", "minigpt-4-vicuna-7b", "tiny-blip2", "tiny-llava", "tiny-minigpt4"]


def cfg(**over) -> WISEConfig:
    kw = dict(layer=2, mode="merge", steps=20, lr=20.0, weight_decay=1e-5, mask_ratio=0.2, norm_constraint=1.0,
              alpha=1.0, beta=3.5, gamma=1.8, act_ratio=0.5, save_freq=2, merge_freq=4, merge_density=0.53,
              early_stop_loss=0.02, early_stop_delta=1e-4, irrelevant_samples=2, irrelevant_dataset="EVQA",
              irrelevant_data_dir=None, irrelevant_pool_size=10, seed=0)
    kw.update(over)
    return WISEConfig(**kw)


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    return load_dataset("EVQA", "eval", write_evqa(tmp_path_factory.mktemp("evqa"), n=6, seed=1))


def make(bb, records, **over) -> WISEEditor:
    ed = WISEEditor(bb, cfg(**over))
    ed.pool = IrrelevantPool.of([s for r in records[3:] for s in (r.text_loc, r.image_loc)])
    return ed


def logits_of(ed, samples):
    with torch.no_grad():
        return ed.logits(ed.backbone.encode(samples))


def mixed(records):
    return [s for r in records[:2] for s in r.samples().values()]


def digest(ed) -> str:
    h = hashlib.sha256()
    for t in [ed.side, ed.shards.view("W")] + ([ed.merged] if ed.merged is not None else []):
        h.update(t.cpu().numpy().tobytes())
    h.update(repr((ed.n_edits, ed.side_edits, ed.side_min, ed.global_min, ed.shard_min)).encode())
    return h.hexdigest()


# ---- configs ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("backbone", BACKBONE_NAMES)
def test_configs_load_strictly_for_every_backbone(backbone):
    c = load_config(WISEConfig, "wise", backbone)
    assert EDITORS.get("wise").config_class is WISEConfig
    assert c.mode in ("merge", "retrieve") and c.merge_freq % c.save_freq == 0


def test_config_keys_types_and_ranges_are_checked(tmp_path):
    text = (ROOT / "configs/wise/tiny-blip2.yaml").read_text()
    cases = [("mode: merge", "mode: merged", "mode must be merge or retrieve, got 'merged'"),
             ("mask_ratio: 0.2", "mask_ratio: -0.2", r"mask_ratio must be in \(0, 1\], got -0.2"),
             ("steps: ", "steps: 2.5 #", "steps: expected int, got 2.5"),
             ("seed: 0", "seed: 0\nretrieve: true", "unknown key 'retrieve'")]
    for i, (old, new, message) in enumerate(cases):
        assert old in text
        (tmp_path / f"{i}.yaml").write_text(text.replace(old, new, 1))
        with pytest.raises(UserError, match=message):
            load_config(WISEConfig, "wise", "tiny-blip2", tmp_path / f"{i}.yaml")
    with pytest.raises(UserError, match="merge_freq must be a multiple of save_freq"):
        cfg(save_freq=3, merge_freq=4)


# ---- TIES --------------------------------------------------------------------------------------------
def test_ties_merge_trims_elects_signs_and_averages_agreeing_entries():
    deltas = torch.tensor([[4.0, -1.0, 2.0, 0.0], [2.0, 3.0, -6.0, 0.5]])
    merged = ties_merge(deltas, torch.tensor([0.5, 0.5]), density=1.0)
    # entry 0: both +, mean 3; entry 1: elected + (sum 2), only the +3; entry 2: elected -, only -6
    torch.testing.assert_close(merged, torch.tensor([3.0, 3.0, -6.0, 0.5]))
    trimmed = ties_merge(deltas, torch.tensor([0.5, 0.5]), density=0.5)  # keeps 2 of 4 entries each
    torch.testing.assert_close(trimmed, torch.tensor([4.0, 3.0, -6.0, 0.0]))


# ---- editing -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("family, mode", [("blip2", "merge"), ("llava", "retrieve")])
def test_restore_is_exact_and_the_backbone_never_changes(family, mode, load_tiny, records):
    bb = load_tiny(family)
    weights = {k: v.clone() for k, v in bb.model.state_dict().items()}
    samples = mixed(records)
    before = logits_of(make(bb, records, mode=mode), samples)
    ed = make(bb, records, mode=mode, steps=5)
    for r in records[:5]:
        ed.edit(r.edit)
    assert ed.state_bytes() > 0
    ed.restore()
    assert torch.equal(logits_of(ed, samples), before)
    assert ed.state_bytes() == 0 and ed.n_edits == 0 and not ed.candidates()
    assert all(torch.equal(weights[k], v) for k, v in bb.model.state_dict().items())
    assert not any(p.requires_grad for p in bb.model.parameters())


def test_an_edit_lifts_rel_far_above_the_unedited_model(load_tiny, records):
    bb = load_tiny("blip2")
    ed = make(bb, records)
    unedited, edited = [], []
    for r in records[:3]:
        with torch.no_grad():
            batch = bb.encode([r.edit])
            unedited.append(token_accuracy(ed.logits(batch), batch.labels).item())
            ed.edit(r.edit)
            edited.append(token_accuracy(ed.logits(batch), batch.labels).item())
            assert ed.route_batch(batch).tolist() == [0]     # the edit is routed to the side memory
        ed.restore()
    assert sum(edited) / 3 >= sum(unedited) / 3 + 0.5, (unedited, edited)


def test_shards_and_merges_in_both_modes(load_tiny, records):
    bb = load_tiny("blip2")
    per = bb.mlp_output_projection(2).weight.numel() * 4
    merge = make(bb, records, steps=3)
    for i, r in enumerate(records[:5]):
        merge.edit(r.edit)
        shards, merged, side = {1: (0, False, 1), 2: (1, False, 0), 3: (1, False, 1), 4: (0, True, 0), 5: (0, True, 1)}[i + 1]
        assert (len(merge.shards), merge.merged is not None, merge.side_edits) == (shards, merged, side)
        assert merge.state_bytes() == per * (shards + merged + bool(side))
        assert len(merge.candidates()) == shards + merged + bool(side)
    assert merge.global_min == min(merge.global_min, merge.side_min)
    retrieve = make(bb, records, mode="retrieve", steps=3)
    for r in records[:5]:
        retrieve.edit(r.edit)
    # 4 edits: two shards merged into one retrievable shard, with the smaller of their thresholds
    assert len(retrieve.shards) == 1 and retrieve.merged is None and retrieve.side_edits == 1
    assert [t for _, t in retrieve.candidates()] == [0.5 * retrieve.shard_min[0], 0.5 * retrieve.side_min]


def test_inference_never_changes_state(load_tiny, records):
    bb = load_tiny("blip2")
    ed = make(bb, records, steps=3)
    for r in records[:3]:       # a merge is due at 4: nothing may happen at query time
        ed.edit(r.edit)
    state, size = digest(ed), ed.state_bytes()
    samples = mixed(records)
    first, second = logits_of(ed, samples), logits_of(ed, samples)
    assert torch.equal(first, second)
    with torch.no_grad():
        assert ed.generate(samples, 2) == ed.generate(samples, 2)
    assert digest(ed) == state and ed.state_bytes() == size


def test_routing_is_per_sample_and_ignores_the_target(load_tiny, records):
    bb = load_tiny("llava")
    ed = make(bb, records, mode="retrieve", act_ratio=0.0)
    for r in records[:3]:
        ed.edit(r.edit)
    s = records[0].edit
    a, b = Sample(s.prompt, "blue", s.image), Sample(s.prompt, "circle shape photo", s.image)
    with torch.no_grad():
        ra, rb = ed.route_batch(bb.encode([a])), ed.route_batch(bb.encode([b]))
        assert torch.equal(ra, rb) and torch.equal(ra, ed.route_batch(bb.encode([a], with_targets=False)))
        samples = [b, records[1].text_loc, a, records[2].edit]
        together = ed.route_batch(bb.encode(samples))
        assert together.tolist() == [ed.route_batch(bb.encode([x])).item() for x in samples]
        ed.config.act_ratio = 1e9          # no memory passes its threshold: every sample gets W0
        assert ed.route_batch(bb.encode(samples)).tolist() == [-1] * 4
        ed.config.act_ratio = 0.0


def test_batch_size_does_not_change_results(load_tiny, records):
    bb = load_tiny("minigpt4")
    ed = make(bb, records, mode="retrieve", steps=5)
    for r in records[:3]:
        ed.edit(r.edit)
    samples = mixed(records)
    with torch.no_grad():
        together = ed.logits(bb.encode(samples))
        gen8 = ed.generate(samples, 3)
        for i, s in enumerate(samples):
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
    from editors.wise import WISEConfig, WISEEditor
    from vl_datasets.records import Sample
    bb = BACKBONES.get("tiny-blip2").load("tiny-blip2", {model!r})
    ed = WISEEditor(bb, WISEConfig(**{cfg!r}))
    ed.load_state({state!r})
    samples = [Sample(*s) for s in {samples!r}]
    with torch.no_grad():
        save_file({{"logits": ed.logits(bb.encode(samples))}}, {out!r})
    print(len(ed.shards), ed.merged is not None, ed.side_edits, ed.n_edits, ed.state_bytes())
""")


def test_saved_state_reloads_in_a_new_process(load_tiny, tiny_dirs, records, tmp_path):
    bb = load_tiny("blip2")
    ed = make(bb, records, steps=5, save_freq=1, merge_freq=2)
    for r in records[:3]:
        ed.edit(r.edit)
    samples = mixed(records)
    expected = logits_of(ed, samples)
    ed.save_state(tmp_path / "state")
    config = vars(cfg(steps=5, save_freq=1, merge_freq=2))
    script = CHILD.format(root=str(ROOT), model=str(tiny_dirs["blip2"]), cfg=config, state=str(tmp_path / "state"),
                          samples=[(s.prompt, s.target, s.image) for s in samples], out=str(tmp_path / "out.st"))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["1", "True", "0", "3", str(ed.state_bytes())]
    assert torch.equal(load_file(str(tmp_path / "out.st"))["logits"], expected)
    again = make(bb, records, steps=5, save_freq=1, merge_freq=2)
    again.load_state(tmp_path / "state")
    assert digest(again) == digest(ed) and torch.equal(logits_of(again, samples), expected)
    with pytest.raises(UserError, match="has config"):
        make(bb, records, steps=5, save_freq=1, merge_freq=2, mode="retrieve").load_state(tmp_path / "state")
    with pytest.raises(UserError, match="no edited state"):
        again.load_state(tmp_path / "missing")
