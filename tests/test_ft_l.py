"""The FT-L and none editors: configs, frozen backbone, exact restore, edited state, and FT-L's effect
through the evaluation CLI."""
import json

import pytest
import torch

from editors import EDITORS
from editors.ft_l import FTLConfig, FTLEditor
from editors.none import NoneConfig
from evaluation.cli import main
from fixtures import write_evqa
from utils.config import load_config
from utils.errors import UserError
from utils.losses import token_accuracy
from vl_datasets import load_dataset

BACKBONE_NAMES = ["blip2-opt-2.7b", "llava-v1.5-7b", "minigpt-4-vicuna-7b", "tiny-blip2", "tiny-llava", "tiny-minigpt4"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_evqa(tmp_path_factory.mktemp("evqa"), n=3, seed=1)


def tiny_cfg(**kw):
    return FTLConfig(**{"layer": 2, "steps": 10, "lr": 1e-2, "early_stop_loss": 0.01, "norm_constraint": None, **kw})


def snapshot(bb):
    return {k: v.detach().clone() for k, v in bb.model.state_dict().items()}


def rel_accuracy(editor, sample):
    with torch.no_grad():
        batch = editor.backbone.encode([sample])
        return token_accuracy(editor.logits(batch), batch.labels).item()


@pytest.mark.parametrize("backbone", BACKBONE_NAMES)
def test_configs_load_strictly_for_every_backbone(backbone):
    assert EDITORS.get("none").config_class is NoneConfig
    assert load_config(NoneConfig, "none", backbone) == NoneConfig()
    cfg = load_config(FTLConfig, "ft-l", backbone)
    assert isinstance(cfg, FTLConfig) and cfg.steps >= 1 and cfg.lr > 0
    # tiny: each backbone's val choice (tiny-blip2 layer 4 of 6, tiny-llava / tiny-minigpt4 layer 2)
    assert cfg.layer == {"tiny-blip2": -2, "tiny-llava": 2, "tiny-minigpt4": 2}.get(backbone, 21)


def test_unknown_config_key_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("layer: 2\nsteps: 1\nlr: 0.1\nearly_stop_loss: 0\nnorm_constraint: null\nlayers: [2]\n")
    with pytest.raises(UserError, match="unknown key 'layers'"):
        load_config(FTLConfig, "ft-l", "tiny-blip2", path)


@pytest.mark.parametrize("family, module", [("blip2", "fc2"), ("llava", "down_proj"), ("minigpt4", "down_proj")])
def test_ft_l_edits_one_layer_and_restores_exactly(family, module, load_tiny, data_dir):
    bb = load_tiny(family)
    request = load_dataset("EVQA", "eval", data_dir)[0].edit
    editor = EDITORS.get("ft-l")(bb, tiny_cfg())
    target = bb.mlp_output_projection(2)
    assert target is (bb.layer(2).fc2 if module == "fc2" else bb.layer(2).mlp.down_proj)
    assert editor.weight is target.weight
    before = snapshot(bb)
    acc_before = rel_accuracy(editor, request)

    trainable_during = []
    handle = bb.layer(bb.num_layers - 1).register_forward_hook(
        lambda *_: trainable_during.append(sorted(n for n, p in bb.model.named_parameters() if p.requires_grad)))
    try:
        editor.edit(request)
    finally:
        handle.remove()
    name = next(n for n, p in bb.model.named_parameters() if p is editor.weight)
    assert trainable_during and all(t == [name] for t in trainable_during)
    assert not any(p.requires_grad for p in bb.model.parameters())
    assert rel_accuracy(editor, request) > acc_before
    after = snapshot(bb)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == [name]

    editor.edit(load_dataset("EVQA", "eval", data_dir)[1].edit)
    assert editor.n_edits == 2
    editor.restore()
    assert editor.n_edits == 0
    assert all(torch.equal(before[k], v) for k, v in snapshot(bb).items())


def test_norm_constraint_bounds_each_edit(load_tiny, data_dir):
    bb = load_tiny("blip2")
    editor = FTLEditor(bb, tiny_cfg(norm_constraint=1e-3))
    start = editor.weight.detach().clone()
    editor.edit(load_dataset("EVQA", "eval", data_dir)[0].edit)
    delta = (editor.weight.detach() - start).abs().max().item()
    editor.restore()
    assert 0 < delta <= 1e-3 + 1e-7


def test_bad_layer_is_a_user_error(load_tiny):
    with pytest.raises(UserError, match="layer 9 out of range"):
        FTLEditor(load_tiny("blip2"), tiny_cfg(layer=9))


def test_save_and_load_state_round_trip(load_tiny, data_dir, tmp_path):
    bb = load_tiny("blip2")
    editor = FTLEditor(bb, tiny_cfg())
    original = editor.weight.detach().clone()
    editor.edit(load_dataset("EVQA", "eval", data_dir)[0].edit)
    edited = editor.weight.detach().clone()
    editor.save_state(tmp_path / "s")
    editor.restore()
    assert torch.equal(editor.weight, original)
    editor.load_state(tmp_path / "s")
    assert torch.equal(editor.weight, edited) and editor.n_edits == 1
    editor.restore()
    with pytest.raises(UserError, match="not 'ft-l' on 'tiny-blip2' layer 1"):
        FTLEditor(bb, tiny_cfg(layer=1)).load_state(tmp_path / "s")
    with pytest.raises(UserError, match="no edited state"):
        editor.load_state(tmp_path / "missing")
    assert torch.equal(editor.weight, original)


def run(tiny_dirs, data_dir, records, editor, *extra):
    return main(["-en", editor, "-mn", "tiny-blip2", "--model_path", str(tiny_dirs["blip2"]), "-dn", "EVQA",
                 "--data_dir", str(data_dir), "--records_dir", str(records), "-dvc", "cpu", *extra])


def test_ft_l_raises_rel_well_above_none(tiny_dirs, data_dir, tmp_path):
    none = run(tiny_dirs, data_dir, tmp_path, "none", "-sen", "1")["means"]["total"]
    ftl = run(tiny_dirs, data_dir, tmp_path, "ft-l", "-sen", "1")["means"]["total"]
    assert ftl["Rel"] >= none["Rel"] + 50, (ftl["Rel"], none["Rel"])
    assert ftl["exact_match"]["Rel"] >= none["exact_match"]["Rel"] + 50
    assert ftl["pre_edit"]["Rel"] == pytest.approx(none["Rel"])
    assert ftl["edit_time"] > 0 and none["edit_time"] >= 0
    assert ftl["T-Loc"] <= 100 and none["T-Loc"] == 100


def test_edited_state_saved_by_one_run_is_loaded_by_another(tiny_dirs, data_dir, tmp_path):
    saved = run(tiny_dirs, data_dir, tmp_path / "a", "ft-l", "-sen", "2", "--save_edited_state", str(tmp_path / "st"))
    for chunk, indices in (("chunk_00000", [0, 1]), ("chunk_00001", [2])):
        meta = json.loads((tmp_path / "st" / chunk / "edit_meta.json").read_text())
        assert meta["record_indices"] == indices and (tmp_path / "st" / chunk / "ft_l_state.safetensors").is_file()
    loaded = run(tiny_dirs, data_dir, tmp_path / "b", "ft-l", "-sen", "2", "--load_edited_state", str(tmp_path / "st"))
    a = json.loads((saved["run_dir"] / "results.json").read_text())["chunks"]
    b = json.loads((loaded["run_dir"] / "results.json").read_text())["chunks"]
    assert a == b  # edit times are carried over from the saved state too
    with pytest.raises(UserError, match="other records"):
        run(tiny_dirs, data_dir, tmp_path / "c", "ft-l", "-sen", "2", "--shuffle", "--seed", "1",
            "--load_edited_state", str(tmp_path / "st"))
    assert not (tmp_path / "c").exists()
