"""Backbone identity: a digest of the weights travels with checkpoints, saved states and evaluation
runs, and work made on another build of a backbone is refused instead of silently reused."""
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import dummy_editor
import test_vllm_edit
import train_vllm_editor
from backbones import backbone_fingerprint, load_backbone
from backbones.fingerprint import CACHE
from fixtures import write_evqa
from training import load_trained_weights
from utils.errors import UserError


def rebuilt_copy(src, dst):
    """A copy of the backbone folder with one weight changed slightly: another build."""
    shutil.copytree(src, dst)
    path = next(dst.glob("*.safetensors"))
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1e-3
    save_file(tensors, str(path), metadata=meta)
    return dst


def test_fingerprint_follows_the_weights_and_is_cached(tiny_dirs, tmp_path):
    a = tmp_path / "a"
    shutil.copytree(tiny_dirs["blip2"], a)
    fp = backbone_fingerprint(a)
    assert fp and len(fp) == 16 and (a / CACHE).is_file()
    assert backbone_fingerprint(a) == fp == backbone_fingerprint(tiny_dirs["blip2"])   # same bytes, same id
    assert backbone_fingerprint(rebuilt_copy(tiny_dirs["blip2"], tmp_path / "b")) != fp
    assert backbone_fingerprint(tmp_path) is None                                      # no config.json


def test_checkpoint_of_another_build_is_refused(tiny_dirs, tmp_path):
    dummy_editor.register()
    try:
        data = write_evqa(tmp_path / "data", n=4)
        cfg = tmp_path / "cfg.yaml"
        cfg.write_text("layer: 2\nrank: 4\ndropout: 0.0\nrandom_rephrase: false\n"
                       "train: {lr: 0.01, lr_cut_step: null, lr_cut_factor: 10, max_steps: 1}\n")
        result = train_vllm_editor.main(["-en", "dummy-residual", "-mn", "tiny-blip2", "--model_path",
                                         str(tiny_dirs["blip2"]), "-dna", "EVQA", "--data_dir", str(data),
                                         "-bs", "2", "--config", str(cfg), "--records_dir", str(tmp_path / "rec"),
                                         "-rs", "1"])
        same = dummy_editor.ResidualEditor(load_backbone("tiny-blip2", model_path=tiny_dirs["blip2"]),
                                           result.editor.config)
        load_trained_weights(same, result.final_checkpoint)                        # same build: fine
        other = rebuilt_copy(tiny_dirs["blip2"], tmp_path / "rebuilt")
        editor = dummy_editor.ResidualEditor(load_backbone("tiny-blip2", model_path=other), result.editor.config)
        with pytest.raises(UserError, match=f"build {backbone_fingerprint(tiny_dirs['blip2'])}.*"
                                            f"build {backbone_fingerprint(other)}"):
            load_trained_weights(editor, result.final_checkpoint)
    finally:
        dummy_editor.unregister()


def test_finished_evaluation_is_not_reused_after_the_backbone_changed(tiny_dirs, tmp_path, capsys):
    data = write_evqa(tmp_path / "data", n=2)
    model = tmp_path / "model"
    shutil.copytree(tiny_dirs["blip2"], model)
    args = ["-en", "none", "-mn", "tiny-blip2", "--model_path", str(model), "-dn", "EVQA", "--data_dir", str(data),
            "--records_dir", str(tmp_path / "rec"), "-sen", "2", "-dvc", "cpu"]
    test_vllm_edit.main(args)
    assert test_vllm_edit.main(args)["already_finished"]
    shutil.rmtree(model)
    rebuilt_copy(tiny_dirs["blip2"], model)                  # the same path now holds another build
    with pytest.raises(SystemExit) as e:
        test_vllm_edit.main(args)
    assert e.value.code == 2 and "backbone_fingerprint" in capsys.readouterr().err
