"""Half-precision frozen backbones with float32 editor weights: LiveEdit trains through bfloat16
layers with finite, accurate gradients; under float16 the loss is scaled (``training/precision.py``),
without which small gradients underflow; FT-L steps a float32 master copy and restores exactly."""
from dataclasses import replace

import pytest
import torch
import yaml

import backbones.loading
import train_vllm_editor
from backbones import BACKBONES
from conftest import FAMILY_NAMES
from editors.ft_l import FTLConfig, FTLEditor
from editors.liveedit import LiveEdit, LiveEditConfig, LiveEditTrain
from fixtures import write_evqa
from training.checkpoint import load_training_state
from training.precision import LossScaling
from vl_datasets import DATASETS
from vl_datasets.records import EditRecord, Sample

FAMILIES = list(FAMILY_NAMES)


def load(tiny_dirs, family, dtype):
    name = FAMILY_NAMES[family]
    return BACKBONES.get(name).load(name, tiny_dirs[family], dtype=dtype)


def records(images):
    q = "What color is the shape? The answer is:"
    return [EditRecord(i, edit=Sample(q, a, images[i]), text_rephrase=Sample("What color is it?", a, images[i]),
                       image_rephrase=Sample(q, a, images[2]), text_loc=Sample("nq question: who rules zorbia?", "Queen Quell"),
                       image_loc=Sample("What shape is it? The answer is:", "circle", images[2]))
            for i, a in enumerate(["red", "blue"])]


def liveedit(bb):
    return LiveEdit(bb, LiveEditConfig(edit_layer=1, d_m=32, heads=4, rank=4, n_queries=4, scale=5.0,
                                       train=LiveEditTrain(lr=1e-2, lr_cut_step=None)))


def grads_of(bb, recs, factor=1.0, scaling=None):
    """Gradient of LiveEdit's loss (times ``factor``) w.r.t. its float32 weights, flattened."""
    ed = liveedit(bb).train()
    loss = sum(ed.training_losses(recs).values()) * factor
    params = ed.trainable_parameters()
    if scaling is None:
        loss.backward()
    else:
        scaling.backward(loss)
        scaling.own.unscale_(torch.optim.SGD(params, lr=0.0))
    assert all(p.dtype == torch.float32 for p in params)
    return torch.cat([p.grad.flatten() for p in params if p.grad is not None]) / factor


@pytest.mark.parametrize("family", FAMILIES)
def test_liveedit_trains_through_a_bf16_backbone(family, tiny_dirs, images):
    recs = records(images)
    bb16 = load(tiny_dirs, family, torch.bfloat16)
    assert bb16.dtype == torch.bfloat16 and bb16.mlp_output_projection(3).weight.dtype == torch.bfloat16
    g16 = grads_of(bb16, recs)
    g32 = grads_of(load(tiny_dirs, family, torch.float32), recs)
    assert torch.isfinite(g16).all() and g16.abs().sum() > 0
    # bfloat16 keeps float32's exponent range: accurate to its 8-bit mantissa, no underflow
    assert (g16 - g32).norm() / g32.norm() < 0.05
    ed = liveedit(bb16).train()
    opt = torch.optim.Adam(ed.trainable_parameters(), lr=1e-2)
    before = [p.detach().clone() for p in ed.trainable_parameters()]
    LossScaling(bb16.dtype, bb16.device).backward(sum(ed.training_losses(recs).values()))
    opt.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, ed.trainable_parameters()))


def test_loss_scaling_only_where_needed():
    class Acc:
        scaler = object()
    assert LossScaling(torch.float16, torch.device("cpu")).own is not None
    assert LossScaling(torch.bfloat16, torch.device("cpu")).own is None
    assert LossScaling(torch.float32, torch.device("cpu")).own is None
    assert LossScaling(torch.float16, torch.device("cpu"), Acc()).own is None     # accelerate's fp16 scaler


def test_fp16_gradients_underflow_unscaled_and_not_with_loss_scaling(tiny_dirs, images):
    """A small loss (here x1e-6) through float16 layers: unscaled, most of the gradient is lost."""
    recs = records(images)
    g32 = grads_of(load(tiny_dirs, "llava", torch.float32), recs, factor=1e-6)
    bb = load(tiny_dirs, "llava", torch.float16)
    plain = grads_of(bb, recs, factor=1e-6)
    scaled = grads_of(bb, recs, factor=1e-6, scaling=LossScaling(bb.dtype, bb.device))
    err = lambda g: float((g - g32).norm() / g32.norm())
    assert err(plain) > 0.3
    assert err(scaled) < 0.02 and torch.isfinite(scaled).all()


def train_liveedit(tiny_dirs, tmp_path, monkeypatch, *extra):
    """train_vllm_editor.py: LiveEdit on the tiny LLaVA, 2 steps of 2 records (4 EVQA-schema records)."""
    # 4 records: no val slice to leave out of them (real EVQA keeps its last 500 train records for val)
    monkeypatch.setitem(DATASETS._entries, "EVQA", replace(DATASETS.get("EVQA"), val_slice=0))
    cfg = tmp_path / "liveedit.yaml"
    cfg.write_text(yaml.safe_dump({"edit_layer": 2, "d_m": 32, "heads": 4, "rank": 4, "n_queries": 4, "scale": 5.0,
                                   "train": {"lr": 1e-3, "lr_cut_step": None}}))
    data = write_evqa(tmp_path / "data", n=4)
    return train_vllm_editor.main(["-en", "liveedit", "-mn", "tiny-llava", "--model_path", str(tiny_dirs["llava"]),
                                   "-dna", "EVQA", "--data_dir", str(data), "-bs", "2", "--config", str(cfg),
                                   "--records_dir", str(tmp_path / "records"), "-rs", "0", "--max_steps", "2",
                                   *extra])


def test_training_loop_scales_the_loss_of_an_fp16_backbone(tiny_dirs, tmp_path, monkeypatch):
    """--mixed_precision no with a float16 backbone (a GPU without bfloat16): the loop adds a
    GradScaler, trains with finite losses and checkpoints the scaler's state."""
    monkeypatch.setattr(backbones.loading, "default_dtype", lambda device: torch.float16)
    result = train_liveedit(tiny_dirs, tmp_path, monkeypatch, "-dvc", "cpu", "--mixed_precision", "no")
    assert result.editor.backbone.dtype == torch.float16
    state = load_training_state(result.final_checkpoint)
    assert state["scaler"] is not None and state["scaler"]["scale"] > 1
    assert all(torch.isfinite(p).all() for p in result.editor.trainable_parameters())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ft_l_on_a_half_backbone_keeps_a_float32_master_and_restores_exactly(family, dtype, tiny_dirs, images):
    bb = load(tiny_dirs, family, dtype)
    ed = FTLEditor(bb, FTLConfig(layer=2, steps=5, lr=1e-2, early_stop_loss=0.0, norm_constraint=None))
    batch = bb.encode([r.edit for r in records(images)])
    before = bb.logits(batch)
    original = ed.weight.detach().clone()
    for r in records(images):
        ed.edit(r.edit)
    assert ed.weight.dtype == dtype and ed.master.dtype == torch.float32
    assert not torch.equal(ed.weight, original) and torch.isfinite(ed.master).all()
    assert torch.equal(ed.master.to(dtype), ed.weight)       # the weight is the master's rounding
    assert not torch.equal(bb.logits(batch), before)
    ed.restore()
    assert torch.equal(ed.weight, original) and ed.master is None
    assert torch.equal(bb.logits(batch), before)
