"""LiveEdit's training objective: the reference hyper-parameters of the real configs, same-image
pairs left out of hard routing, and one global batch under data parallel (2 gloo processes at
global batch 4 give the loss terms and gradients of 1 process at batch 4)."""
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from editors.liveedit import LiveEdit, LiveEditConfig, LiveEditTrain
from utils.config import load_config
from vl_datasets.records import EditRecord, Sample

ROOT = Path(__file__).resolve().parent.parent
REAL = ("blip2-opt-2.7b", "llava-v1.5-7b", "minigpt-4-vicuna-7b")


@pytest.mark.parametrize("backbone", REAL)
def test_real_configs_pin_the_reference_hyper_parameters(backbone):
    """DESIGN section 3 and the authors' configs (lr_cut_it [10000], rate 0.1)."""
    c = load_config(LiveEditConfig, "liveedit", backbone)
    assert (c.d_m, c.heads, c.rank, c.n_queries, c.scale, c.edit_layer) == (1024, 8, 4, 4, 5.0, 21)
    assert (c.train.lr, c.train.lr_cut_step, 1 / c.train.lr_cut_factor) == (1e-4, 10000, 0.1)
    assert (c.routing_pairs, c.expert_sets, c.attention_out_proj, c.sentinel_init) == \
        ("neighbourhood", "prefix", False, "kaiming")
    assert all(getattr(c.loss_weights, k) == 1.0 for k in vars(c.loss_weights))


def config(**over):
    kw = dict(edit_layer=2, d_m=32, heads=4, rank=4, n_queries=4, scale=5.0, seed=11,
              train=LiveEditTrain(lr=1e-3, lr_cut_step=None))
    return LiveEditConfig(**{**kw, **over})


def records(images, n=4, shared_image=False):
    """n records; with ``shared_image`` records 0 and 1 edit the same image file."""
    out = []
    for i in range(n):
        img = images[0] if shared_image and i < 2 else images[i % len(images)]
        out.append(EditRecord(i, edit=Sample("What color is the shape? The answer is:", ["red", "blue", "green", "circle"][i % 4], img),
                              text_rephrase=Sample("What color is it? The answer is:", "red", img),
                              image_rephrase=Sample("What color is the shape? The answer is:", "red", images[(i + 1) % len(images)]),
                              text_loc=Sample("nq question: who rules zorbia?", "Queen Quell"),
                              image_loc=Sample("a photo of a", "circle", images[(i + 2) % len(images)])))
    return out


@pytest.mark.parametrize("routing_pairs", ["neighbourhood", "edit_requests"])
def test_same_image_pairs_are_left_out_of_hard_routing(routing_pairs, load_tiny, images, monkeypatch):
    ed = LiveEdit(load_tiny("blip2"), config(routing_pairs=routing_pairs))
    seen = []
    original = LiveEdit._hard_logits

    def spy(ifeat, rows, phi_hat, blocked, pool=None):
        out = original(ifeat, rows, phi_hat, blocked, pool)
        seen.append((rows.tolist(), out.detach()))
        return out
    monkeypatch.setattr(LiveEdit, "_hard_logits", staticmethod(spy))
    losses = ed.training_losses(records(images, 3, shared_image=True))
    assert all(torch.isfinite(v) for v in losses.values())
    neighbour_rows, logits = seen[0]
    R = 3
    for row, rec in ((r, r % R) for r in range(len(neighbour_rows))):
        other = {0: 1, 1: 0}.get(rec)
        if other is not None:        # records 0 and 1 share their edit image: never contrasted
            assert logits[row, other] == float("-inf")
        assert torch.isfinite(logits[row, 2]) or rec == 2   # record 2 is contrasted with everyone else
    assert torch.isfinite(logits[:, -1]).all()                # the sentinel column is always there


@pytest.mark.parametrize("negative_pool", [0, 4])
def test_data_parallel_sees_the_global_batch(negative_pool, tiny_dirs, images, tmp_path):
    """2 processes (gloo) at global batch 4 == 1 process at batch 4: loss terms and gradients (with
    a negative pool: each process's pool is gathered, the same columns as one process's)."""
    recs = records(images, 4)
    spec = [{k: [s.prompt, s.target, s.image] for k, s in (("edit", r.edit), ("text_rephrase", r.text_rephrase),
             ("image_rephrase", r.image_rephrase), ("text_loc", r.text_loc), ("image_loc", r.image_loc))}
            for r in recs]
    (tmp_path / "records.json").write_text(json.dumps(spec))
    worker = ROOT / "tests" / "dp_liveedit_worker.py"

    def run(world):
        out = tmp_path / f"world{world}"
        out.mkdir()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        procs = [subprocess.Popen([sys.executable, str(worker), str(r), str(world), str(port), str(tiny_dirs["blip2"]),
                                   str(tmp_path / "records.json"), str(out), str(negative_pool)])
                 for r in range(world)]
        assert all(p.wait(timeout=300) == 0 for p in procs)
        parts = [torch.load(out / f"rank{r}.pt") for r in range(world)]
        terms = {k: sum(p["terms"][k] for p in parts) for k in parts[0]["terms"]}
        grads = {k: sum(p["grads"][k] for p in parts) for k in parts[0]["grads"]}
        return terms, grads
    one, two = run(1), run(2)
    for k in one[0]:
        assert two[0][k] == pytest.approx(one[0][k], rel=1e-5, abs=1e-5), k
    for k in one[1]:
        torch.testing.assert_close(two[1][k], one[1][k], rtol=1e-5, atol=1e-5, msg=k)
    assert any(g.abs().sum() > 0 for g in one[1].values())


def test_negative_pool_adds_earlier_edit_requests_as_hard_routing_columns(load_tiny, images, monkeypatch):
    """negative_pool: the last batches' edit requests join both hard contrasts (the sentinel stays the
    last column and the target of hard_sentinel), the pool keeps at most its size, the same edit
    image is never contrasted, and the pool travels with training_memory() for an exact resume."""
    bb = load_tiny("blip2")
    ed = LiveEdit(bb, config(negative_pool=4, negative_pool_rows="all"))
    first, second = records(images, 3), records(images[1:], 3)
    ed.training_losses(first)
    assert [e[3].shape[0] for e in ed.negative_pool] == [3]
    widths, original = [], LiveEdit._hard_logits

    def spy(ifeat, rows, phi_hat, blocked, pool=None):
        out = original(ifeat, rows, phi_hat, blocked, pool)
        widths.append((out.shape[1], pool))
        return out
    monkeypatch.setattr(LiveEdit, "_hard_logits", staticmethod(spy))
    memory, rng = ed.training_memory(), ed.rng_state()
    losses = ed.training_losses(second)
    assert [w for w, _ in widths] == [3 + 3 + 1, 3 + 3 + 1]          # batch, pool, sentinel
    blocked = widths[0][1][1]                                         # [R, P]: same edit image file
    for i, r in enumerate(second):
        for j, p in enumerate(first):
            assert bool(blocked[i, j]) == (r.edit.image == p.edit.image)
    assert [e[3].shape[0] for e in ed.negative_pool] == [3]           # 6 > 4: the oldest batch left
    # resume: another editor with the same weights, RNG and memory gives the same losses
    other = LiveEdit(bb, config(negative_pool=4, negative_pool_rows="all"))
    other.load_trainable_state_dict(ed.trainable_state_dict())
    other.set_rng_state(rng)
    other.set_training_memory(memory)
    again = other.training_losses(second)
    assert {k: float(v.detach()) for k, v in again.items()} == {k: float(v.detach()) for k, v in losses.items()}
    # without the memory the pool is empty and the hard losses differ
    fresh = LiveEdit(bb, config(negative_pool=4, negative_pool_rows="all"))
    fresh.load_trainable_state_dict(ed.trainable_state_dict())
    fresh.set_rng_state(rng)
    assert float(fresh.training_losses(second)["hard_sentinel"].detach()) != float(losses["hard_sentinel"].detach())
    # negative_pool_rows "locality" (the default): only locality samples meet the pool
    loc_only = LiveEdit(bb, config(negative_pool=4))
    loc_only.load_trainable_state_dict(ed.trainable_state_dict())
    loc_only.set_rng_state(rng)
    loc_only.set_training_memory(memory)
    rows_and_blocks = []

    def spy_rows(ifeat, rows, phi_hat, blocked, pool=None):
        rows_and_blocks.append((rows, pool[1]))
        return original(ifeat, rows, phi_hat, blocked, pool)
    monkeypatch.setattr(LiveEdit, "_hard_logits", staticmethod(spy_rows))
    loc_only.training_losses(second)
    for rows, block in rows_and_blocks:
        for row, blocked_row in zip(rows.tolist(), block):
            if row < 3 * 3:                                           # rel / gen samples: never
                assert bool(blocked_row.all())


def test_random_seed_flag_seeds_the_initialisation(tiny_dirs, tmp_path):
    """train_vllm_editor.py -rs replaces the config's seed: the saved editor config says so, and two
    seeds start from different weights."""
    import yaml

    import train_vllm_editor
    from fixtures import write_evqa
    data = write_evqa(tmp_path / "data", n=4)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"edit_layer": 2, "d_m": 32, "heads": 4, "rank": 4, "n_queries": 4, "scale": 5.0,
                                   "seed": 0, "train": {"lr": 1.0e-12, "lr_cut_step": None, "max_steps": 1}}))
    weights = []
    for seed in (5, 6):
        res = train_vllm_editor.main(["-en", "liveedit", "-mn", "tiny-blip2", "--model_path", str(tiny_dirs["blip2"]),
                                      "-dna", "EVQA", "--data_dir", str(data), "-bs", "2", "--config", str(cfg),
                                      "--records_dir", str(tmp_path / "rec"), "-rs", str(seed), "-tnp", f"s{seed}"])
        saved = yaml.safe_load((res.final_checkpoint / "config.yaml").read_text())
        assert saved["editor_config"]["seed"] == seed
        weights.append(res.editor.trainable_state_dict())
    assert not torch.allclose(weights[0]["gen_u.queries"], weights[1]["gen_u.queries"], atol=1e-3)


def test_routing_stats_count_kept_experts_and_leaks(load_tiny, images):
    """scripts/routing_stats.py: with hard filtering forced to keep every expert, every query keeps
    all n experts, its own among them, and every unrelated image leaks."""
    from scripts import routing_stats
    from tests.test_liveedit import force_routing
    ed = LiveEdit(load_tiny("blip2"), config())
    force_routing(ed, keep=True)
    recs = records(images, 3)
    ed.edit_batch([r.edit for r in recs])
    stats = routing_stats.point_stats(ed, recs)
    assert stats["n_edits"] == 3
    assert stats["Rel"]["kept_mean"] == 3 and stats["Rel"]["own_kept"] == 1.0
    assert stats["M-Loc"]["any_kept"] == 1.0
    force_routing(ed, keep=False)
    ed.restore()
    ed.edit_batch([r.edit for r in recs])
    none = routing_stats.point_stats(ed, recs)
    assert none["Rel"]["kept_mean"] == 0 and none["M-Loc"]["any_kept"] == 0.0


def test_near_misses_count_shared_attributes_of_leaked_experts():
    """routing_stats.near_misses: each (M-Loc image, leaked expert) pair is counted by how many
    attributes the two images share; shares sum to 1."""
    from scripts.routing_stats import near_misses
    q = "What color is the shape? The answer is:"
    recs = [EditRecord(i, edit=Sample(q, "red", f"edit{i}.png"), text_rephrase=Sample(q, "red", f"edit{i}.png"),
                       image_rephrase=Sample(q, "red", f"reph{i}.png"), text_loc=Sample("nq question: x", "y"),
                       image_loc=Sample(q, "red", f"loc{i}.png")) for i in range(3)]
    attrs = {f"edit{i}.png": ("red", "blue", "green") for i in range(3)}
    attrs.update({f"loc{i}.png": ("pink", "grey", "black") for i in range(3)})
    attrs["loc0.png"] = ("red", "blue", "white")                      # 2 shared with every edit image
    leaked = [torch.tensor([1, 2]), torch.tensor([0]), torch.tensor([], dtype=torch.long)]   # 2 of loc0, 1 of loc1
    out = near_misses(recs, leaked, lambda path: attrs[path])
    assert out["pairs"] == 3 and out["shared"] == {0: round(1 / 3, 3), 1: 0.0, 2: round(2 / 3, 3), 3: 0.0}
    assert abs(sum(out["random"].values()) - 1.0) < 1e-2 and out["random"][0] > out["random"][2] > 0
    # a picture of no entity (VLKEB's unrelated images) has no attributes: its pairs are left out
    out = near_misses(recs, leaked, lambda path: None if path == "loc1.png" else attrs[path])
    assert out["pairs"] == 2 and out["shared"][2] == 1.0
