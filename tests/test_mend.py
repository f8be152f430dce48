"""MEND (editors/mend): configs, the gradient capture through named sites, exact restore with the
frozen weights untouched and no hooks, sum / mean_ref accumulation, batch-size independence, the
edited state across processes, and training through the shared loop (losses fall, exact resume,
foreign checkpoints refused). MEND has no retrieval: every query sees the same dW."""
import re
from pathlib import Path

import pytest
import torch

from editors import EDITORS
from editors.mend import Mend, MendConfig, MendTrain
from fixtures import write_evqa
from trainable_editor_checks import (check_batch_size_independent, check_exact_resume,
                                     check_foreign_checkpoint_refused, check_state_reloads_in_new_process,
                                     sharp_blip2, train, write_config)
from utils.config import load_config
from utils.errors import UserError
from utils.losses import masked_nll, token_accuracy
from vl_datasets import load_dataset

ROOT = Path(__file__).resolve().parent.parent
BACKBONE_NAMES = ["blip2-opt-2.7b", "llava-v1.5-7b", "minigpt-4-vicuna-7b", "tiny-blip2", "tiny-llava", "tiny-minigpt4"]


def make_config(**over) -> MendConfig:
    kw = dict(layers=[2, 3], projections=["input", "output"], rank=8, n_hidden=1, norm=True, init_edit_lr=1e-3,
              edit_lr_lr=1e-3, descent=True, accumulate="sum", train=MendTrain(lr=1e-3, lr_cut_step=None))
    kw.update(over)
    return MendConfig(**kw)


def gradient_step_config(**over) -> MendConfig:
    """Untrained transform (the identity) and no normalisation: an edit is one gradient step of size lr."""
    return make_config(norm=False, init_edit_lr=1.0, **over)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_evqa(tmp_path_factory.mktemp("mend"), n=7, seed=2)


@pytest.fixture(scope="module")
def records(data_dir):
    return load_dataset("EVQA", "eval", data_dir)


def rel(ed, sample) -> float:
    with torch.no_grad():
        batch = ed.backbone.encode([sample])
        return token_accuracy(ed.logits(batch), batch.labels).item()


def mixed_samples(records):
    return ([r.edit for r in records[:3]] + [r.text_rephrase for r in records[:2]] + [r.image_loc for r in records[:2]]
            + [records[0].text_loc])


# ---- config ------------------------------------------------------------------------------------
@pytest.mark.parametrize("backbone", BACKBONE_NAMES)
def test_configs_load_for_every_backbone(backbone):
    assert EDITORS.get("mend") is Mend
    cfg = load_config(MendConfig, "mend", backbone)
    assert cfg.accumulate == "sum" and cfg.descent and cfg.projections == ["input", "output"]
    if backbone.startswith("tiny"):
        assert cfg.layers == [3, 4, 5] and cfg.rank == 128
    else:   # the authors' values
        assert (cfg.layers, cfg.rank, cfg.n_hidden, cfg.init_edit_lr, cfg.edit_lr_lr, cfg.train.lr) == \
            ([29, 30, 31], 1920, 1, 1e-4, 1e-4, 1e-6)
        assert (cfg.loss_weights.edit, cfg.loss_weights.gen, cfg.loss_weights.loc) == (0.1, 0.1, 0.1)


def test_config_keys_and_values_are_checked(tmp_path, load_tiny):
    good = (ROOT / "configs" / "mend" / "tiny-blip2.yaml").read_text()
    cases = {"unknown key 'rnak'": good.replace("rank:", "rnak:"),
             "missing key 'descent'": good.replace("descent:", "# descent:"),
             "mend.rank: expected a positive integer, got -1": re.sub(r"\brank: \d+", "rank: -1", good),
             "train.lr: expected float": re.sub(r"\blr: \S+", "lr: 1e-3", good),
             "mend.init_edit_lr: expected > 0": re.sub(r"init_edit_lr: \S+", "init_edit_lr: -1.0", good),
             "mend.accumulate: expected one of sum, mean_ref": good.replace("accumulate: sum", "accumulate: avg"),
             "mend.projections": good.replace("[input, output]", "[input, hidden]"),
             ".norm: expected bool, got 1": good.replace("norm: true", "norm: 1")}
    for message, text in cases.items():
        path = tmp_path / "c.yaml"
        path.write_text(text)
        with pytest.raises(UserError, match=re.escape(message)):
            load_config(MendConfig, "mend", "tiny-blip2", path)
    with pytest.raises(UserError, match="mend.layers: layer 4 is out of range"):
        Mend(load_tiny("blip2"), make_config(layers=[2, 4]))


# ---- editing -------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["blip2", "llava"])
def test_capture_gives_the_true_weight_gradients(family, load_tiny, records):
    """u^T delta summed over the captured token rows is autograd's gradient of each projection weight."""
    bb = load_tiny(family)
    ed = Mend(bb, make_config())
    batch = bb.encode([records[0].edit, records[1].edit])
    with torch.no_grad():
        hidden = bb.hidden_at(batch, ed.below)
    xs, gs, valid = ed._capture(batch, hidden, None)
    weights = [(bb.mlp_input_projections(m.layer)[m.slot] if m.kind == "input" else bb.mlp_output_projection(m.layer))
               for m in ed.modules]
    for w in weights:
        w.weight.requires_grad_(True)
    try:
        masked_nll(bb.logits(batch), batch.labels, per_sample=True).sum().backward()
        for m, w, x, g, v in zip(ed.modules, weights, xs, gs, valid):
            assert v.any() and not v[~batch.attention_mask.bool()].any()
            torch.testing.assert_close(x[v].T @ g[v], w.weight.grad.T, rtol=1e-4, atol=1e-6)
    finally:
        for w in weights:
            w.weight.requires_grad_(False)
            w.weight.grad = None


@pytest.mark.parametrize("family", ["blip2", "minigpt4"])
def test_edits_leave_weights_and_hooks_alone_and_restore_is_exact(family, load_tiny, records):
    bb = load_tiny(family)
    ed = Mend(bb, gradient_step_config())
    before = {k: v.clone() for k, v in bb.model.state_dict().items()}
    samples = mixed_samples(records)
    with torch.no_grad():
        plain = bb.logits(bb.encode(samples))
    for r in records[:3]:
        ed.edit(r.edit)
    assert ed.n_edits == 3 and ed.state_bytes() == sum(4 * m.d_in * m.d_out for m in ed.modules)
    with torch.no_grad():
        edited = ed.logits(bb.encode(samples))
    assert not torch.equal(edited, plain)
    assert all(torch.equal(before[k], v) for k, v in bb.model.state_dict().items())      # frozen weights untouched
    assert not any(p.requires_grad for p in bb.model.parameters())
    for mod in bb.model.modules():
        assert not (mod._forward_hooks or mod._forward_pre_hooks or mod._backward_hooks), mod
    ed.restore()
    assert ed.layer_edits() == {} and ed.n_edits == 0 and ed.state_bytes() == 0
    with torch.no_grad():
        assert torch.equal(ed.logits(bb.encode(samples)), plain)


def test_an_edit_lifts_rel_far_above_none(load_tiny, records):
    ed = Mend(load_tiny("blip2"), gradient_step_config())
    before, after = [], []
    for r in records[:4]:
        before.append(rel(ed, r.edit))
        ed.edit(r.edit)
        after.append(rel(ed, r.edit))
        ed.restore()
    assert sum(after) / 4 >= sum(before) / 4 + 0.5, (before, after)


def test_sum_and_mean_ref_accumulation(load_tiny, records):
    bb = load_tiny("blip2")
    summed, mean = Mend(bb, gradient_step_config()), Mend(bb, gradient_step_config(accumulate="mean_ref"))
    a, b = records[0].edit, records[1].edit
    summed.edit(a)
    mean.edit(a)
    n_a = list(mean.rows)
    assert min(n_a) >= 1 and max(n_a) > 1      # (the top layer sees the loss at the target position only)
    for s, m, n in zip(summed.deltas, mean.deltas, n_a):     # one edit: the token mean of its update
        torch.testing.assert_close(m, s / n)
    # the update G_b of edit b on the model holding mean's dW_a, taken with a summing copy
    summed.deltas = [d.clone() for d in mean.deltas]
    summed.edit(b)
    G_b = [s - d for s, d in zip(summed.deltas, mean.deltas)]
    mean.edit(b)
    for d_new, d_old, g, na, nt in zip(mean.deltas, [s - g for s, g in zip(summed.deltas, G_b)], G_b, n_a, mean.rows):
        torch.testing.assert_close(d_new, (na * d_old + g) / nt, rtol=1e-4, atol=1e-7)
    assert all(nt > na for nt, na in zip(mean.rows, n_a))


def test_batch_size_1_and_8_agree(load_tiny, records):
    ed = Mend(load_tiny("llava"), gradient_step_config())
    for r in records[:3]:
        ed.edit(r.edit)
    check_batch_size_independent(ed, mixed_samples(records))


def test_saved_state_reloads_in_a_new_process(load_tiny, tiny_dirs, records, tmp_path):
    bb = load_tiny("blip2")
    ed = Mend(bb, gradient_step_config(accumulate="mean_ref"))
    for r in records[:2]:
        ed.edit(r.edit)
    expected = check_state_reloads_in_new_process(ed, tiny_dirs["blip2"], mixed_samples(records), tmp_path)
    ed.restore()
    ed.load_state(tmp_path / "state")
    with torch.no_grad():
        assert ed.n_edits == 2 and torch.equal(ed.logits(bb.encode(mixed_samples(records))), expected)
    with pytest.raises(UserError, match="saved with accumulate 'mean_ref', this editor has 'sum'"):
        Mend(bb, gradient_step_config()).load_state(tmp_path / "state")
    with pytest.raises(UserError, match="saved with modules"):
        Mend(bb, gradient_step_config(layers=[3], accumulate="mean_ref")).load_state(tmp_path / "state")
    with pytest.raises(UserError, match="saved with backbone 'tiny-blip2'"):
        Mend(load_tiny("llava"), gradient_step_config(accumulate="mean_ref")).load_state(tmp_path / "state")


# ---- training --------------------------------------------------------------------------------------
def test_training_losses_fall(tiny_dirs, records, tmp_path):
    _, bb = sharp_blip2(tiny_dirs, tmp_path)
    ed = Mend(bb, make_config(init_edit_lr=1e-5, edit_lr_lr=1e-4, train=MendTrain(lr=1e-2, lr_cut_step=None)))
    opt = torch.optim.Adam(ed.trainable_parameters(), lr=ed.config.train.lr)
    ed.train()
    history = []
    for _ in range(15):
        losses = ed.training_losses(records[:4])
        assert set(losses) == {"edit", "gen", "loc"}
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
        history.append({k: float(v.detach()) for k, v in losses.items()})
    ed.eval()
    first, last = history[0], history[-1]
    for k in ("edit", "gen"):
        assert last[k] < 0.8 * first[k], (first, last)
        assert sum(h[k] for h in history[-5:]) < sum(h[k] for h in history[:5])
    assert all(t.norm.count > 0 for t in ed.net.transforms.values())          # statistics were gathered


def test_loop_resumes_exactly_and_checkpoint_is_refused_elsewhere(tiny_dirs, data_dir, tmp_path, capsys):
    cfg = write_config(tmp_path / "mend.yaml", make_config())
    result = train(tiny_dirs, data_dir, tmp_path / "records", "mend", cfg, "--max_steps", 4, "-sci", 2)
    check_exact_resume(result, tmp_path, steps=4)
    check_foreign_checkpoint_refused(tiny_dirs, data_dir, result.final_checkpoint, "mend", "serac", tmp_path, capsys)
