"""Checks the baseline-editor tests share (tests/test_ft_m.py, test_tp.py, test_grace.py): exact
restore, batch-size independence, a saved state reloaded in a new process, Rel of an edit, and the
strict config loading of every backbone's YAML."""
import dataclasses
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from utils.config import load_config
from utils.errors import UserError
from utils.losses import IGNORE, token_accuracy
from vl_datasets.records import Sample

ROOT = Path(__file__).resolve().parent.parent
QUESTION = "What color is the shape? The answer is:"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Six E-VQA-schema records (tests/fixtures.py): edits from the first ones, the pool from 2.."""
    from fixtures import write_evqa
    return write_evqa(tmp_path_factory.mktemp("evqa"), n=6, seed=1)


@pytest.fixture(scope="module")
def records(data_dir):
    from vl_datasets import load_dataset
    return load_dataset("EVQA", "eval", data_dir)
BACKBONE_NAMES = ["blip2-opt-2.7b", "llava-v1.5-7b", "minigpt-4-vicuna-7b", "tiny-blip2", "tiny-llava", "tiny-minigpt4"]


def mixed_samples(records, n: int = 8) -> list[Sample]:
    """``n`` samples of mixed kinds and lengths (image + question, text only) from ``records``."""
    out = [s for r in records for s in r.samples().values()]
    return out[:n]


def logits_of(editor, samples) -> torch.Tensor:
    with torch.no_grad():
        return editor.logits(editor.backbone.encode(samples))


def rel(editor, sample) -> float:
    with torch.no_grad():
        batch = editor.backbone.encode([sample])
        return token_accuracy(editor.logits(batch), batch.labels).item()


def assert_restore_exact(editor, requests, samples):
    """After edits, ``restore()`` gives logits bit-identical to the unedited model (twice: idempotent)."""
    before = logits_of(editor, samples)
    for r in requests:
        editor.edit(r)
    assert editor.n_edits == len(requests)
    assert not torch.equal(logits_of(editor, samples), before), "the edits changed nothing"
    editor.restore()
    assert editor.n_edits == 0 and torch.equal(logits_of(editor, samples), before)
    editor.restore()
    assert torch.equal(logits_of(editor, samples), before)
    assert not any(p.requires_grad for p in editor.backbone.model.parameters())


def assert_batch_independent(editor, samples):
    """Each sample scored alone and inside one batch: close logits on its real positions, the same
    teacher-forced argmax on its target and the same greedy generation."""
    bb = editor.backbone
    with torch.no_grad():
        batch = bb.encode(samples)
        together = editor.logits(batch)
        gens = editor.generate(samples, 3)
        for b, s in enumerate(samples):
            one = bb.encode([s])
            alone = editor.logits(one)[0]
            n = int(one.attention_mask.sum())
            assert int(batch.attention_mask[b].sum()) == n
            torch.testing.assert_close(together[b, :n], alone[:n], atol=1e-4, rtol=1e-4)
            tgt = one.labels[0, 1:] != IGNORE
            assert torch.equal(together[b, :n - 1][tgt[:n - 1]].argmax(-1), alone[:n - 1][tgt[:n - 1]].argmax(-1))
            assert gens[b] == editor.generate([s], 3)[0]


CHILD = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {root!r})
    torch.set_num_threads(1)
    from safetensors.torch import save_file
    from backbones import BACKBONES
    from editors import EDITORS
    from utils.config import from_dict
    from vl_datasets import load_dataset
    from vl_datasets.records import Sample
    for job in {jobs!r}:
        bb = BACKBONES.get(job["backbone"]).load(job["backbone"], job["model"])
        cls = EDITORS.get(job["editor"])
        kwargs = {{}} if job["pool"] is None else {{"pool": load_dataset("EVQA", "eval", job["pool"])[2:]}}
        ed = cls(bb, from_dict(cls.config_class, job["config"], "test"), **kwargs)
        ed.load_state(job["state"])
        samples = [Sample(*s) for s in job["samples"]]
        with torch.no_grad():
            save_file({{"logits": ed.logits(bb.encode(samples)).contiguous()}}, job["out"])
        print(job["editor"], ed.n_edits)
""")


def assert_states_reload_in_new_process(cases, tmp_path):
    """``cases``: (editor, requests, samples, model_dir, pool_dir or None). Each editor edits and saves
    its state; one new process loads every state (pool: records 2.. of the EVQA fixture) and must give
    bit-identical logits; here, restore then load gives them too."""
    jobs, expected = [], []
    for i, (editor, requests, samples, model_dir, pool_dir) in enumerate(cases):
        for r in requests:
            editor.edit(r)
        editor.backbone.image_cache.clear()   # the child's computation: these samples' images encoded together
        expected.append(logits_of(editor, samples))
        editor.save_state(tmp_path / f"state{i}")
        editor.restore()   # they may share one backbone
        jobs.append({"backbone": editor.backbone.name, "model": str(model_dir), "editor": editor.name,
                     "config": dataclasses.asdict(editor.config), "pool": None if pool_dir is None else str(pool_dir),
                     "state": str(tmp_path / f"state{i}"), "samples": [(s.prompt, s.target, s.image) for s in samples],
                     "out": str(tmp_path / f"out{i}.st")})
    proc = subprocess.run([sys.executable, "-c", CHILD.format(root=str(ROOT), jobs=jobs)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == [w for (e, r, *_ ) in cases for w in (e.name, str(len(r)))]
    for i, (editor, requests, samples, *_) in enumerate(cases):
        assert torch.equal(load_file(jobs[i]["out"])["logits"], expected[i]), editor.name
        editor.load_state(tmp_path / f"state{i}")
        editor.backbone.image_cache.clear()
        assert editor.n_edits == len(requests) and torch.equal(logits_of(editor, samples), expected[i])
        editor.restore()
        with pytest.raises(UserError, match="no edited state"):
            editor.load_state(tmp_path / "missing")


def assert_configs_checked(config_cls, editor_name: str, tmp_path, negative_key: str, float_key: str):
    """Every backbone's YAML loads strictly; an unknown key, a negative value and a wrong type are
    UserErrors naming the key."""
    for backbone in BACKBONE_NAMES:
        assert isinstance(load_config(config_cls, editor_name, backbone), config_cls)
    base = yaml.safe_load((ROOT / "configs" / editor_name / "tiny-blip2.yaml").read_text())
    for change, message in (({"no_such_key": 1}, "unknown key 'no_such_key'"),
                            ({negative_key: -3}, f"{editor_name}.{negative_key}: expected"),
                            ({float_key: "1e-3"}, rf"\.{float_key}: expected float")):   # the shared type check
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump({**base, **change}))
        with pytest.raises(UserError, match=message):
            load_config(config_cls, editor_name, "tiny-blip2", path)
    missing = {k: v for k, v in base.items() if k != negative_key}
    path.write_text(yaml.safe_dump(missing))
    with pytest.raises(UserError, match=f"missing key '{negative_key}'"):
        load_config(config_cls, editor_name, "tiny-blip2", path)
