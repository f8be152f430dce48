"""Robust under concurrency and bad input (issue 11) and the shared helpers behind it (issue 10, items
7, 8, 10): run-folder locks, unique run names, log integrity over kills and resumes, file modes, a
fresh multi-process start building the embedded default once, evaluation in eval mode under
inference mode, typed configs, one device parser, and a one-way import graph."""
import ast
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import torch
import torch.nn.functional as F
import yaml

import dummy_editor
import test_vllm_edit
import train_vllm_editor
from editors import EDITORS
from fixtures import write_evqa
from training import resolve_checkpoint
from utils.config import from_dict
from utils.devices import parse_device, parse_device_list
from utils.errors import UserError
from utils.locks import RunLock, claim_folder

ROOT = Path(__file__).resolve().parent.parent
STEPS, SCI = 6, 2


pytestmark = pytest.mark.usefixtures("dummy_editors")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_evqa(tmp_path_factory.mktemp("data"), n=7)


def train_argv(tiny_dirs, data_dir, records, config, *extra):
    return ["-en", "dummy-residual", "-mn", "tiny-blip2", "--model_path", str(tiny_dirs["blip2"]), "-dna", "EVQA",
            "--data_dir", str(data_dir), "--include_val_slice", "-bs", "3", "--config", str(config),
            "--records_dir", str(records), "-rs", "1", *map(str, extra)]


def write_config(path: Path) -> Path:
    path.write_text(yaml.safe_dump({"layer": 2, "rank": 4, "dropout": 0.1, "random_rephrase": True,
                                    "train": {"lr": 0.01, "lr_cut_step": 3, "lr_cut_factor": 10}}))
    return path


def log_steps(run: Path):
    return [json.loads(line)["step"] for line in (run / "logs" / "train.jsonl").read_text().splitlines()]


def log_entries(run: Path):
    return [{k: v for k, v in json.loads(line).items() if k != "elapsed_s"}
            for line in (run / "logs" / "train.jsonl").read_text().splitlines()]


# ---- locks ------------------------------------------------------------------------------------------
HOLDER = textwrap.dedent("""
    import sys, time
    from utils.locks import RunLock
    lock = RunLock(sys.argv[1]).acquire()
    print("locked", flush=True)
    time.sleep(60)
""")


def test_run_lock_names_the_holder_and_a_crashed_holder_is_stale(tmp_path, capsys):
    folder = tmp_path / "run"
    folder.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=rf"run folder {folder} is in use by pid {proc.pid} on .*-c {folder}"):
            RunLock(folder).acquire()
        proc.send_signal(signal.SIGKILL)          # a crash: no cleanup runs, the holder info stays
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert json.loads((folder / ".lock").read_text())["pid"] == proc.pid
    capsys.readouterr()
    with RunLock(folder) as lock:                  # the kernel released the lock: taken over, reported
        assert lock.stale["pid"] == proc.pid
        assert f"left locked by pid {proc.pid}" in capsys.readouterr().err
        with pytest.raises(UserError, match=f"in use by pid {os.getpid()}"):
            RunLock(folder).acquire()              # a second holder in the same process is refused too
    assert (folder / ".lock").read_text() == ""    # released cleanly: nothing stale left


def test_claimed_new_folders_are_exclusive(tmp_path):
    first = claim_folder(tmp_path / "a" / "b" / "run", new=True)
    with pytest.raises(FileExistsError):
        claim_folder(tmp_path / "a" / "b" / "run", new=True)
    assert first.created == [tmp_path / "a", tmp_path / "a" / "b", tmp_path / "a" / "b" / "run"]
    first.discard()                                # removes exactly what the claim made
    assert not (tmp_path / "a").exists()


def test_same_prefix_in_the_same_second_gives_two_runs(tiny_dirs, data_dir, tmp_path, monkeypatch):
    import training.loop as loop

    class Frozen:                                  # every run starts "in the same second"
        @staticmethod
        def now():
            from datetime import datetime
            return datetime(2026, 1, 2, 3, 4, 5)
    monkeypatch.setattr(loop, "datetime", Frozen)
    cfg = write_config(tmp_path / "cfg.yaml")
    runs = [train_vllm_editor.main(train_argv(tiny_dirs, data_dir, tmp_path / "rec", cfg, "--max_steps", 1,
                                              "-tnp", "same", "-rs", seed)) for seed in (1, 2)]
    assert [r.run_dir.name for r in runs] == ["same-20260102-030405", "same-20260102-030405-1"]
    for run, seed in zip(runs, (1, 2)):
        assert yaml.safe_load((run.run_dir / "config.yaml").read_text())["args"]["random_seed"] == seed
        assert log_steps(run.run_dir) == [1]


# ---- log integrity ----------------------------------------------------------------------------------
class Killed(BaseException):
    """Stands for a kill: not an Exception, so nothing on the way out treats it as bad input."""


def crash_after(monkeypatch, n_steps):
    calls = {"n": 0}

    class Crashing(dummy_editor.ResidualEditor):
        def training_losses(self, records):
            calls["n"] += 1
            if calls["n"] > n_steps:
                raise Killed()
            return super().training_losses(records)
    monkeypatch.setitem(EDITORS._entries, "dummy-residual", Crashing)


def test_log_has_one_line_per_step_after_kills_and_resumes(tiny_dirs, data_dir, tmp_path, monkeypatch):
    cfg = write_config(tmp_path / "cfg.yaml")
    ref = train_vllm_editor.main(train_argv(tiny_dirs, data_dir, tmp_path / "ref", cfg, "--max_steps", STEPS,
                                            "-sci", SCI)).run_dir
    run = tmp_path / "run"
    shutil.copytree(ref, run)
    ckpts = run / "checkpoints"

    # resume from step 2, killed during step 5: step_4 is written again, step_6 is left from before
    with monkeypatch.context() as m:
        crash_after(m, 2)
        with pytest.raises(Killed):
            train_vllm_editor.main(["-lkpt", str(ckpts / "step_2")])
    assert log_steps(run) == [1, 2, 3, 4]
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_2", "step_4", "step_6"]
    # what more kills leave: a half-written checkpoint folder, a torn log line, a dead holder's lock
    (ckpts / ".step_6.k1ll3d.tmp").mkdir()
    (ckpts / ".step_6.k1ll3d.tmp" / "trainable.safetensors").write_bytes(b"partial")
    with open(run / "logs" / "train.jsonl", "a") as f:
        f.write('{"step": 5, "epoch": 1, "lr"')
    (run / ".lock").write_text(json.dumps({"pid": 999999999, "host": "h", "command": "killed", "since": "then"}))

    # the latest checkpoint is the highest step that agrees with the log: step_4, not the stale step_6
    assert resolve_checkpoint(run) == ckpts / "step_4"
    resumed = train_vllm_editor.main(["-lkpt", str(run)])
    assert resumed.final_checkpoint == ckpts / "step_6" and len(resumed.step_seconds) == 2
    assert log_steps(run) == list(range(1, STEPS + 1))             # exactly one line per step
    assert log_entries(run) == log_entries(ref)                    # and the same as without the kills
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_2", "step_4", "step_6"]   # the tmp folder is gone
    assert resolve_checkpoint(run) == ckpts / "step_6"

    # an explicit checkpoint that no longer agrees with the log is refused, nothing touched
    with monkeypatch.context() as m:
        crash_after(m, 0)
        with pytest.raises(Killed):
            train_vllm_editor.main(["-lkpt", str(ckpts / "step_2")])   # truncates the log to step 2
    before = (run / "logs" / "train.jsonl").read_bytes()
    with pytest.raises(SystemExit):
        train_vllm_editor.main(["-lkpt", str(ckpts / "step_6")])
    assert (run / "logs" / "train.jsonl").read_bytes() == before
    assert resolve_checkpoint(run) == ckpts / "step_2"


def test_a_new_run_that_fails_before_its_first_checkpoint_leaves_no_folder(tiny_dirs, data_dir, tmp_path,
                                                                          monkeypatch):
    cfg = write_config(tmp_path / "cfg.yaml")
    crash_after(monkeypatch, 1)
    with pytest.raises(Killed):
        train_vllm_editor.main(train_argv(tiny_dirs, data_dir, tmp_path / "rec", cfg, "--max_steps", 4, "-sci", 3))
    assert not (tmp_path / "rec").exists()
    crash_after(monkeypatch, 1)
    with pytest.raises(Killed):                    # after a checkpoint, the run stays (it can be resumed)
        train_vllm_editor.main(train_argv(tiny_dirs, data_dir, tmp_path / "rec", cfg, "--max_steps", 4, "-sci", 1))
    (run,) = (tmp_path / "rec" / "dummy-residual" / "tiny-blip2" / "EVQA").iterdir()
    assert resolve_checkpoint(run).name == "step_1"


# ---- file modes -----------------------------------------------------------------------------------
def test_files_honour_the_umask(tiny_dirs, data_dir, tmp_path):
    cfg = write_config(tmp_path / "cfg.yaml")
    old = os.umask(0o002)                          # a shared group may read and write
    try:
        run = train_vllm_editor.main(train_argv(tiny_dirs, data_dir, tmp_path / "rec", cfg, "--max_steps", 1))
        out = test_vllm_edit.main(["-en", "none", "-mn", "tiny-blip2", "--model_path", str(tiny_dirs["blip2"]),
                                   "-dn", "EVQA", "--data_dir", str(data_dir), "--records_dir", str(tmp_path / "rec"),
                                   "-sen", "7", "-dvc", "cpu"])
    finally:
        os.umask(old)
    ckpt = run.final_checkpoint
    for path in (run.run_dir / "config.yaml", ckpt / "trainable.safetensors", ckpt / "training_state.pt",
                 ckpt / "config.yaml", out["run_dir"] / "mean_results.json", out["run_dir"] / "stages" / "chunk_00000.json"):
        assert oct(path.stat().st_mode & 0o777) == oct(0o664), path
    for path in (ckpt, run.run_dir, out["run_dir"], out["run_dir"] / "stages"):
        assert oct(path.stat().st_mode & 0o777) == oct(0o775), path


# ---- a fresh multi-process start builds the embedded default once ----------------------------------
BUILDER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from synthetic.world import ensure_world
    from utils.io import atomic_dir
    from utils.locks import build_once

    out = Path(sys.argv[1])
    (out / f"ready-{os.getpid()}").touch()
    while len(list(out.glob("ready-*"))) < 2:      # both processes start building together
        time.sleep(0.01)
    world = ensure_world(out / "synthetic", n_train=6, n_eval=4, n_val=3, n_loc=6, pretrain_renders=1,
                         extra_entities=0, n_heldout_renders=2, image_size=32, entities_per_signature=2,
                         workers=1, progress=True)

    # a tiny-backbone builder stub (the real one, synthetic.pretrain.ensure_tiny_backbone, pretrains for
    # minutes through the same build_once)
    target = out / "tiny" / "tiny-blip2"
    def build():
        with open(out / "builds.txt", "a") as f:
            f.write(f"{os.getpid()}\\n")
        time.sleep(1.0)
        with atomic_dir(target) as tmp:
            (tmp / "config.json").write_text("{}")
    build_once(target, lambda: (target / "config.json").is_file(), build, "tiny backbone")
    print("done", world)
""")


def test_two_processes_on_an_empty_data_folder_build_once(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", BUILDER, str(tmp_path)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    stderr = "".join(err for _, err in outs)
    assert stderr.count("synthetic world (seed 0) written to") == 1, stderr
    assert len((tmp_path / "builds.txt").read_text().splitlines()) == 1
    assert (tmp_path / "tiny" / "tiny-blip2" / "config.json").is_file()
    assert all(f"done {tmp_path / 'synthetic'}" in out for out, _ in outs)
    leftovers = [p.name for p in list(tmp_path.iterdir()) + list((tmp_path / "tiny").iterdir()) if p.name.startswith(".")]
    assert leftovers == []                          # no lock file or temporary folder left


# ---- evaluation: eval mode, inference mode ----------------------------------------------------------
@dataclass
class DropoutConfig:
    dropout: float = 0.5
    train: dict = field(default_factory=dict)


class DropoutEditor(dummy_editor.ResidualEditor):
    """A residual with dropout that honours train()/eval(), with fixed weights large enough that a
    dropout mask changes the predictions."""
    name = "dummy-dropout"
    config_class = DropoutConfig
    seen_modes = []

    def __init__(self, backbone, config):
        super().__init__(backbone, dummy_editor.DummyConfig(layer=1, rank=8, dropout=config.dropout))
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in self.module.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 3)
        self.module.train(True)

    def train(self, mode=True):
        self.module.train(mode)
        return self

    def _edit(self, h, batch):
        self.seen_modes.append(("score", torch.is_inference_mode_enabled()))
        down, up = self.module
        return h + up(F.dropout(torch.relu(down(h)), self.config.dropout, training=self.module.training))

    def edit(self, request):
        self.seen_modes.append(("edit", torch.is_inference_mode_enabled() or not torch.is_grad_enabled()))
        super().edit(request)


def eval_scores(tiny_dirs, data_dir, records, seed):
    out = test_vllm_edit.main(["-en", "dummy-dropout", "-mn", "tiny-blip2", "--model_path", str(tiny_dirs["blip2"]),
                               "-dn", "EVQA", "--data_dir", str(data_dir), "--records_dir", str(records),
                               "-sen", "7", "-dvc", "cpu", "--seed", str(seed)])
    results = json.loads((out["run_dir"] / "results.json").read_text())
    return [{m: (s["tf_after"], s["pred_after"]) for m, s in r["samples"].items()}
            for c in results["chunks"] for r in c["records"]]


def test_evaluation_scores_in_eval_mode_and_under_inference_mode(tiny_dirs, data_dir, tmp_path, monkeypatch):
    import utils.config
    monkeypatch.setitem(EDITORS._entries, "dummy-dropout", DropoutEditor)
    (tmp_path / "configs" / "dummy-dropout").mkdir(parents=True)
    (tmp_path / "configs" / "dummy-dropout" / "tiny-blip2.yaml").write_text("dropout: 0.5\n")
    monkeypatch.setattr(utils.config, "CONFIG_DIR", tmp_path / "configs")
    DropoutEditor.seen_modes.clear()
    a, b = (eval_scores(tiny_dirs, data_dir, tmp_path / f"r{seed}", seed) for seed in (0, 1))
    assert a == b                                   # no dropout mask: the RNG seed does not matter
    assert ("score", True) in DropoutEditor.seen_modes and ("score", False) not in DropoutEditor.seen_modes
    assert ("edit", True) not in DropoutEditor.seen_modes and ("edit", False) in DropoutEditor.seen_modes
    # the control: left in training mode, the same editor's scores do depend on the seed
    monkeypatch.setattr(DropoutEditor, "eval", lambda self: self)
    c, d = (eval_scores(tiny_dirs, data_dir, tmp_path / f"t{seed}", seed) for seed in (0, 1))
    assert c != d


# ---- typed configs -----------------------------------------------------------------------------
@dataclass
class Inner:
    rate: float
    steps: int = 1


@dataclass
class Typed:
    name: str
    mode: Literal["fast", "slow"]
    layers: list[int]
    limit: int | None
    inner: Inner
    flags: dict[str, bool] = field(default_factory=dict)


@pytest.mark.parametrize("change, message", [
    ({"layers": [1, "2"]}, r"where.layers: expected list\[int\], got \[1, '2'\]"),
    ({"mode": "medium"}, r"where.mode: expected one of 'fast', 'slow', got 'medium'"),
    ({"limit": 2.5}, "where.limit: expected int or null, got 2.5"),
    ({"inner": {"rate": "1e-3"}}, r"where.inner.rate: expected float, got '1e-3' \(a string"),
    ({"inner": {"rate": 1.0, "steps": True}}, "where.inner.steps: expected int, got True"),
    ({"name": 3}, "where.name: expected str, got 3"),
    ({"flags": {"a": 1}}, r"where.flags: expected dict\[str, bool\]"),
    ({"extra": 1}, "where: unknown key 'extra' for Typed"),
])
def test_every_config_dataclass_is_type_checked(change, message):
    good = {"name": "x", "mode": "fast", "layers": [1, 2], "limit": None, "inner": {"rate": 1}, "flags": {"a": True}}
    assert from_dict(Typed, good, "where").inner.rate == 1        # an int is a fine float
    with pytest.raises(UserError, match=message):
        from_dict(Typed, {**good, **change}, "where")
    bad = dict(good)
    del bad["mode"]
    with pytest.raises(UserError, match="where: missing key 'mode' for Typed"):
        from_dict(Typed, bad, "where")


# ---- one device parser ------------------------------------------------------------------------------
def test_device_flags_are_parsed_in_one_place():
    assert [parse_device(v) for v in ("cpu", "CUDA", "cuda:1", "2", " 0 ")] == ["cpu", "cuda:0", "cuda:1", "cuda:2", "cuda:0"]
    assert parse_device("auto", allow_auto=True) == "auto"
    with pytest.raises(UserError, match="-dvc: unknown device 'auto'"):
        parse_device("auto")
    assert parse_device_list("1,cuda:2") == ["cuda:1", "cuda:2"] and parse_device_list("none") is None
    with pytest.raises(UserError, match="-edvc: unknown device 'gpu'"):
        parse_device_list("1,gpu")


# ---- one-way dependencies -----------------------------------------------------------------------
PACKAGES = ("utils", "vl_datasets", "backbones", "synthetic", "editors", "training", "evaluation")


def package_imports() -> dict[str, set[str]]:
    """Package -> the project packages its modules import (module level or inside functions)."""
    graph = {p: set() for p in PACKAGES}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                        [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
                for name in names:
                    top = name.split(".")[0]
                    if top in graph and top != pkg:
                        graph[pkg].add(top)
    return graph


def test_package_imports_go_one_way():
    graph = package_imports()
    assert "synthetic" not in graph["backbones"] and "synthetic" not in graph["vl_datasets"]
    assert not {"evaluation", "training"} & graph["editors"]
    assert graph["utils"] == set()
    order, left = [], dict(graph)                   # a topological order exists: no cycle at all
    while left:
        ready = [p for p, deps in left.items() if deps <= set(order)]
        assert ready, f"import cycle among {sorted(left)}: {left}"
        order += sorted(ready)
        for p in ready:
            del left[p]


# ---- the environment failing mid-run --------------------------------------------------------------
def test_a_folder_turning_read_only_mid_run_is_one_line_and_keeps_finished_work(tiny_dirs, data_dir, tmp_path,
                                                                                 monkeypatch, capsys):
    """(Tests run as root here, where chmod cannot forbid a write: the failure is injected where the
    file system would raise it.)"""
    import evaluation.results as results
    import training.loop as loop

    real_save, saves = loop.save_checkpoint, []

    def save_then_fail(run_dir, step, *args, **kwargs):
        if saves:
            raise OSError(30, "Read-only file system", str(run_dir / "checkpoints" / f"step_{step}"))
        saves.append(step)
        return real_save(run_dir, step, *args, **kwargs)
    monkeypatch.setattr(loop, "save_checkpoint", save_then_fail)
    cfg = write_config(tmp_path / "cfg.yaml")
    with pytest.raises(SystemExit) as exit_:
        train_vllm_editor.main(train_argv(tiny_dirs, data_dir, tmp_path / "rec", cfg, "--max_steps", 4, "-sci", 2))
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("error")] == \
           [f"error: {next((tmp_path / 'rec').rglob('checkpoints'))}/step_4: Read-only file system"]
    assert err.strip().endswith("Read-only file system")
    (run,) = (tmp_path / "rec" / "dummy-residual" / "tiny-blip2" / "EVQA").iterdir()
    assert resolve_checkpoint(run).name == "step_2"            # the finished work is kept

    real_write = results.write_json

    def write_then_fail(path, obj, **kwargs):
        if Path(path).name == "chunk_00001.json":
            raise OSError(28, "No space left on device", str(path))
        return real_write(path, obj, **kwargs)
    monkeypatch.setattr(results, "write_json", write_then_fail)
    argv = ["-en", "none", "-mn", "tiny-blip2", "--model_path", str(tiny_dirs["blip2"]), "-dn", "EVQA",
            "--data_dir", str(data_dir), "--records_dir", str(tmp_path / "rec"), "-sen", "4", "-dvc", "cpu"]
    with pytest.raises(SystemExit) as exit_:
        test_vllm_edit.main(argv)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith("chunk_00001.json: No space left on device")
    monkeypatch.setattr(results, "write_json", real_write)
    out = test_vllm_edit.main(argv)                             # space again: it resumes after chunk 0
    assert out["resumed"] and out["means"]["total"]["n_edits"] == 7
