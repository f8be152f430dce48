"""Checks shared by the tests of the trained baseline editors (tests/test_mend.py, tests/test_serac.py):
a short run of the shared training loop and its exact resume, refusal of another editor's or
backbone's checkpoint by the evaluation CLI, a saved edited state reloaded in a new process, and
batch-size independence of the evaluation decisions."""
import contextlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import test_vllm_edit
import train_vllm_editor
from utils.config import to_dict
from utils.errors import cli_main
from vl_datasets import DATASETS

ROOT = Path(__file__).resolve().parent.parent


def sharp_blip2(tiny_dirs, root: Path):
    """A copy of the fixture tiny-blip2 whose final LayerNorm has a 30x gain, saved under ``root``:
    the fixture's random LM head alone gives nearly flat logits (no edit takes the NLL far below
    log V), this one gives trained-model-like ones. -> (its folder, the loaded backbone)."""
    from backbones import BACKBONES
    folder = Path(root) / "sharp-blip2"
    shutil.copytree(tiny_dirs["blip2"], folder)
    bb = BACKBONES.get("tiny-blip2").load("tiny-blip2", folder)
    with torch.no_grad():
        bb.stack.decoder.final_layer_norm.weight.mul_(30.0)
    bb.model.save_pretrained(folder)
    return folder, bb


def write_config(path: Path, config) -> Path:
    path.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    return path


@contextlib.contextmanager
def few_record_evqa():
    """E-VQA's val split is the last 500 records of its train file, which a few-record test file
    does not have: within this block the E-VQA spec has no val slice (training uses every record)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(DATASETS._entries, "EVQA", replace(DATASETS.get("EVQA"), val_slice=0))
        yield


def train(tiny_dirs, data_dir, records, editor: str, config: Path, *extra):
    """A run of the shared loop on the fixture tiny-blip2 and an E-VQA-format folder of a few records."""
    with few_record_evqa():
        return train_vllm_editor.main(["-en", editor, "-mn", "tiny-blip2", "--model_path", str(tiny_dirs["blip2"]),
                                       "-dna", "EVQA", "--data_dir", str(data_dir), "-bs", "3", "--config", str(config),
                                       "--records_dir", str(records), "-rs", "1", *map(str, extra)])


def log_entries(run_dir: Path):
    lines = (run_dir / "logs" / "train.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(ln).items() if k != "elapsed_s"} for ln in lines]


def check_exact_resume(result, tmp_path: Path, steps: int) -> None:
    """Resuming from the run's step-2 checkpoint continues with the same step, lr and losses, and
    ends with the same weights as the uninterrupted run."""
    copy = tmp_path / "resumed"
    shutil.copytree(result.run_dir, copy)
    shutil.rmtree(copy / "checkpoints" / f"step_{steps}")
    with few_record_evqa():
        resumed = train_vllm_editor.main(["-lkpt", str(copy / "checkpoints" / "step_2")])
    assert resumed.step == steps and len(resumed.step_seconds) == steps - 2
    assert log_entries(copy) == log_entries(result.run_dir)       # every step, lr and loss term, exactly
    a = load_file(str(result.final_checkpoint / "trainable.safetensors"))
    b = load_file(str(resumed.final_checkpoint / "trainable.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def check_foreign_checkpoint_refused(tiny_dirs, data_dir, ckpt: Path, editor: str, other: str, tmp_path, capsys):
    """The evaluation CLI refuses ``ckpt`` (trained for ``editor`` on tiny-blip2) for another editor
    and for another backbone: one line, exit code 2, nothing written."""
    for en, mn in ((other, "tiny-blip2"), (editor, "tiny-llava")):
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            cli_main(test_vllm_edit.main)(["-en", en, "-mn", mn, "-dn", "EVQA", "--data_dir", str(data_dir), "-sen", "1",
                                 "-ckpt", str(ckpt), "--records_dir", str(tmp_path / "refused"), "-dvc", "cpu"])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err, err
        assert f"belongs to editor '{editor}' on backbone 'tiny-blip2', not editor '{en}' on backbone '{mn}'" in err
    assert not (tmp_path / "refused").exists()


CHILD = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {root!r})
    torch.set_num_threads(1)
    from safetensors.torch import load_file, save_file
    from backbones import BACKBONES
    from editors import EDITORS
    from utils.config import from_dict
    from vl_datasets.records import Sample
    bb = BACKBONES.get("tiny-blip2").load("tiny-blip2", {model!r})
    cls = EDITORS.get({editor!r})
    ed = cls(bb, from_dict(cls.config_class, {config!r}, "test"))
    ed.load_trainable_state_dict(load_file({weights!r}))
    ed.load_state({state!r})
    samples = [Sample(*s) for s in {samples!r}]
    with torch.no_grad():
        save_file({{"logits": ed.logits(bb.encode(samples))}}, {out!r})
    print(ed.n_edits)
""")


def check_state_reloads_in_new_process(ed, model_dir, samples, tmp_path: Path) -> torch.Tensor:
    """Save the edited state; a fresh process loading the backbone from ``model_dir`` and the same
    trained weights loads it and gets identical logits."""
    ed.backbone.image_cache.clear()   # the child's computation: these samples' images encoded together
    with torch.no_grad():
        expected = ed.logits(ed.backbone.encode(samples))
    save_file(ed.trainable_state_dict(), str(tmp_path / "weights.safetensors"))
    ed.save_state(tmp_path / "state")
    script = CHILD.format(root=str(ROOT), model=str(model_dir), editor=ed.name, config=to_dict(ed.config),
                          weights=str(tmp_path / "weights.safetensors"), state=str(tmp_path / "state"),
                          samples=[(s.prompt, s.target, s.image) for s in samples], out=str(tmp_path / "out.st"))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-1] == str(ed.n_edits)
    assert torch.equal(load_file(str(tmp_path / "out.st"))["logits"], expected)
    return expected


def check_batch_size_independent(ed, samples) -> None:
    """Batch size 8 and batch size 1 give the same logits (allclose), the same argmax at every real
    position and the same greedy generations."""
    bb = ed.backbone
    with torch.no_grad():
        batch = bb.encode(samples)
        logits = ed.logits(batch)
        for b, s in enumerate(samples):
            one = ed.logits(bb.encode([s]))[0]
            n = int(batch.lengths[b])
            torch.testing.assert_close(logits[b, :n], one, rtol=1e-4, atol=1e-4)
            assert torch.equal(logits[b, :n].argmax(-1), one.argmax(-1))
    assert ed.generate(samples, 3) == [ed.generate([s], 3)[0] for s in samples]
