"""The shared training loop (train_vllm_editor.py + training/): outputs, exact resume, the lr cut,
two-process data parallel on CPU, and bad input. Uses the tiny trainable editor of
tests/dummy_editor.py on a tiny random BLIP-2 and a 7-record E-VQA-format dataset."""
import json
import math
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

import dummy_editor
from fixtures import write_evqa
import train_vllm_editor
from training import load_trained_weights, read_metadata, resolve_checkpoint
from training.data import BatchOrder, Position, shard
from utils.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
N_RECORDS, BS, STEPS, CUT = 7, 3, 6, 3   # 3 batches per epoch (3, 3, 1): steps 4-6 are epoch 2


pytestmark = pytest.mark.usefixtures("dummy_editors")


@pytest.fixture(scope="module")
def evqa_dir(tmp_path_factory):
    return write_evqa(tmp_path_factory.mktemp("data"), n=N_RECORDS)


def write_config(path: Path, dropout=0.1, random_rephrase=True, cut=CUT, max_steps=None) -> Path:
    path.write_text(yaml.safe_dump({"layer": 2, "rank": 4, "dropout": dropout, "random_rephrase": random_rephrase,
                                    "train": {"lr": 0.01, "lr_cut_step": cut, "lr_cut_factor": 10,
                                              "max_steps": max_steps}}))
    return path


def train_args(tiny_dirs, evqa_dir, records, config, *extra):
    return ["-en", "dummy-residual", "-mn", "tiny-blip2", "--model_path", str(tiny_dirs["blip2"]),
            "-dna", "EVQA", "--data_dir", str(evqa_dir), "-bs", str(BS), "--config", str(config),
            "--records_dir", str(records), "-rs", "1", "--include_val_slice", *map(str, extra)]


def log_entries(run_dir: Path):
    lines = (run_dir / "logs" / "train.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(ln).items() if k != "elapsed_s"} for ln in lines]


def weights(ckpt: Path):
    return load_file(str(ckpt / "trainable.safetensors"))


@pytest.fixture(scope="module")
def short_run(tiny_dirs, evqa_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("short")
    cfg = write_config(tmp / "cfg.yaml")
    result = train_vllm_editor.main(train_args(tiny_dirs, evqa_dir, tmp / "records", cfg,
                                               "--max_steps", STEPS, "-sci", 2, "-lpi", 1, "-tnp", "short"))
    return result, tmp / "records"


# ---- pieces -----------------------------------------------------------------------------------------
def test_batch_order_is_a_function_of_seed_and_position():
    order = BatchOrder(7, 3, seed=5)
    full = list(order.iterate(Position(0, 0), epochs=3))
    assert len(full) == 9 and [len(i) for _, i in full[:3]] == [3, 3, 1]
    assert sorted(sum((i for _, i in full[:3]), [])) == list(range(7))      # an epoch sees every record
    assert full[:3] != full[3:6]                                             # reshuffled per epoch
    assert list(order.iterate(Position(1, 1), epochs=3)) == full[4:]         # resumable mid-epoch
    assert order.after(Position(0, 2)) == Position(1, 0)
    assert BatchOrder(7, 3, seed=6).permutation(0) != order.permutation(0)


def test_shards_split_a_batch_with_weights_summing_to_one():
    batch = list("abcde")
    parts = [shard(batch, r, 2) for r in range(2)]
    assert [p for p, _ in parts] == [list("abc"), list("de")]
    assert [w for _, w in parts] == [0.6, 0.4]
    assert shard(["x"], 1, 2) == (["x"], 0.0)    # nothing left: a dummy record that adds nothing


# ---- a short run ----------------------------------------------------------------------------------
def test_short_run_writes_config_logs_and_checkpoints(short_run, capsys):
    result, records = short_run
    run_dir = result.run_dir
    assert run_dir.parent == records / "dummy-residual" / "tiny-blip2" / "EVQA"
    assert run_dir.name.startswith("short-")
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert (cfg["editor"], cfg["backbone"], cfg["dataset"]) == ("dummy-residual", "tiny-blip2", "EVQA")
    assert cfg["editor_config"]["train"] == {"lr": 0.01, "lr_cut_step": CUT, "lr_cut_factor": 10, "max_steps": None,
                                             "rel_weight": 1.0, "gen_weight": 1.0, "loc_weight": 1.0}
    assert cfg["args"]["batch_size"] == BS and cfg["args"]["random_seed"] == 1 and cfg["args"]["max_steps"] == STEPS

    entries = log_entries(run_dir)
    assert [e["step"] for e in entries] == list(range(1, STEPS + 1))
    assert [e["epoch"] for e in entries] == [0, 0, 0, 1, 1, 1]
    for e in entries:
        assert set(e["terms"]) == {"rel", "gen", "loc"}
        assert e["loss"] == pytest.approx(sum(e["terms"].values()), rel=1e-6)
        assert all(math.isfinite(v) for v in e["terms"].values())
    ema = entries[0]["loss"]
    for e in entries[1:]:
        ema = 0.1 * e["loss"] + 0.9 * ema
        assert e["ema_loss"] == pytest.approx(ema)

    ckpts = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_2", "step_4", "step_6"]   # no temp leftovers
    for step in (2, 4, 6):
        d = ckpts / f"step_{step}"
        assert sorted(p.name for p in d.iterdir()) == ["config.yaml", "trainable.safetensors", "training_state.pt"]
        meta = read_metadata(d)
        assert (meta["editor"], meta["backbone"], meta["step"]) == ("dummy-residual", "tiny-blip2", str(step))
    assert result.final_checkpoint == ckpts / "step_6" and result.step == STEPS
    assert resolve_checkpoint(run_dir) == ckpts / "step_6"
    final = weights(ckpts / "step_6")
    for k, v in result.editor.trainable_state_dict().items():
        assert torch.equal(final[k], v)
    assert not torch.equal(weights(ckpts / "step_2")["0.weight"], final["0.weight"])   # it trained


def test_final_checkpoint_path_is_printed(tiny_dirs, evqa_dir, tmp_path, capsys):
    cfg = write_config(tmp_path / "cfg.yaml")
    result = train_vllm_editor.main(train_args(tiny_dirs, evqa_dir, tmp_path / "rec", cfg, "--max_steps", 1,
                                               "-edvc", "1,2"))
    out, err = capsys.readouterr()
    if not torch.cuda.is_available():
        assert "note: -edvc cuda:1,cuda:2 is ignored on CPU" in err
    assert f"final checkpoint: {result.final_checkpoint}" in out
    assert f"-ckpt {result.final_checkpoint}" in out
    assert (result.final_checkpoint / "trainable.safetensors").is_file()


def test_config_max_steps_is_the_default_length(tiny_dirs, evqa_dir, tmp_path):
    cfg = write_config(tmp_path / "cfg.yaml", max_steps=2)
    by_config = train_vllm_editor.main(train_args(tiny_dirs, evqa_dir, tmp_path / "a", cfg))
    assert [e["step"] for e in log_entries(by_config.run_dir)] == [1, 2]
    by_flag = train_vllm_editor.main(train_args(tiny_dirs, evqa_dir, tmp_path / "b", cfg, "--max_steps", 1))
    assert by_flag.final_checkpoint.name == "step_1"


def test_lr_cut_happens_at_the_configured_step(short_run):
    result, _ = short_run
    lrs = [e["lr"] for e in log_entries(result.run_dir)]
    assert lrs[:CUT] == [0.01] * CUT
    assert lrs[CUT:] == pytest.approx([0.001] * (STEPS - CUT))
    state = torch.load(result.final_checkpoint / "training_state.pt", weights_only=False)
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.001)


def test_load_trained_weights_checks_editor_and_backbone(short_run, load_tiny):
    result, _ = short_run
    ckpt = result.final_checkpoint
    cfg = result.editor.config
    torch.manual_seed(123)
    fresh = dummy_editor.ResidualEditor(load_tiny("blip2"), cfg)
    meta = load_trained_weights(fresh, ckpt / "trainable.safetensors")
    assert meta["step"] == str(STEPS)
    for k, v in weights(ckpt).items():
        assert torch.equal(fresh.trainable_state_dict()[k], v)

    other_backbone = dummy_editor.ResidualEditor(load_tiny("llava"), cfg)
    with pytest.raises(UserError, match="'dummy-residual' on backbone 'tiny-blip2'.*'dummy-residual' on backbone 'tiny-llava'"):
        load_trained_weights(other_backbone, ckpt)

    class Renamed(dummy_editor.ResidualEditor):
        name = "renamed"
    with pytest.raises(UserError, match="editor 'dummy-residual'.*editor 'renamed'"):
        load_trained_weights(Renamed(load_tiny("blip2"), cfg), ckpt)
    with pytest.raises(UserError, match="does not exist"):
        load_trained_weights(fresh, ckpt.parent / "step_99")


# ---- exact resume ---------------------------------------------------------------------------------
def test_resume_from_mid_run_checkpoint_matches_uninterrupted_run(short_run, tmp_path, capsys):
    result, _ = short_run
    copy = tmp_path / "run"
    shutil.copytree(result.run_dir, copy)
    shutil.rmtree(copy / "checkpoints" / "step_6")
    # Resume from step 2: the rest crosses the lr cut (after step 3) and the epoch boundary (after step 3).
    resumed = train_vllm_editor.main(["-lkpt", str(copy / "checkpoints" / "step_2")])
    assert resumed.run_dir == copy and resumed.final_checkpoint == copy / "checkpoints" / "step_6"
    assert resumed.step == STEPS and len(resumed.step_seconds) == STEPS - 2
    assert log_entries(copy) == log_entries(result.run_dir)     # every step, lr and loss term, exactly
    a, b = weights(result.final_checkpoint), weights(resumed.final_checkpoint)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    cfg = yaml.safe_load((copy / "config.yaml").read_text())
    assert cfg["resumed_from"] == str(copy / "checkpoints" / "step_2")


def test_resume_rejects_a_different_batch_size(short_run, capsys):
    result, _ = short_run
    with pytest.raises(SystemExit) as e:
        train_vllm_editor.main(["-lkpt", str(result.final_checkpoint), "-bs", "2"])
    assert e.value.code == 2
    assert "batch_size=3" in capsys.readouterr().err


# ---- data parallel --------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_data_parallel_on_cpu(tiny_dirs, evqa_dir, tmp_path):
    # No dropout and no random rephrase: the two-process run must then match a one-process run.
    cfg = write_config(tmp_path / "cfg.yaml", dropout=0.0, random_rephrase=False)
    out = tmp_path / "out"
    out.mkdir()
    args = train_args(tiny_dirs, evqa_dir, tmp_path / "dp", cfg, "--max_steps", 4, "-sci", 2, "-dvc", "cpu")
    # `--multi_gpu` on a machine without a GPU starts N CPU processes (gloo); `--cpu` would start one.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), str(ROOT / "tests" / "dp_launcher.py"), str(out), *args]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    runs = list((tmp_path / "dp" / "dummy-residual" / "tiny-blip2" / "EVQA").iterdir())
    assert len(runs) == 1
    assert sorted(p.name for p in (runs[0] / "checkpoints").iterdir()) == ["step_2", "step_4"]
    assert proc.stdout.count("final checkpoint:") == 1       # only the main process reports and writes
    cfg_saved = yaml.safe_load((runs[0] / "config.yaml").read_text())
    assert cfg_saved["world_size"] == 2
    w0, w1 = (load_file(str(out / f"rank{r}.safetensors")) for r in (0, 1))
    ckpt = weights(runs[0] / "checkpoints" / "step_4")
    for k in ckpt:
        assert torch.equal(w0[k], w1[k]), k                     # gradients were synchronised
        assert torch.equal(w0[k], ckpt[k]), k
    seen = [json.loads((out / f"rank{r}.json").read_text())["seen"] for r in (0, 1)]

    single = train_vllm_editor.main(train_args(tiny_dirs, evqa_dir, tmp_path / "single", cfg, "--max_steps", 4))
    assert len(single.editor.seen) == 4
    for step, batch in enumerate(single.editor.seen):
        r0, r1 = seen[0][step], seen[1][step]
        if len(batch) >= 2:
            assert sorted(r0 + r1) == sorted(batch) and not set(r0) & set(r1)   # each process its shard
        else:
            assert r0 == r1 == batch     # one record for two processes: the second one adds weight 0
    # Shard-weighted gradients summed over processes = the one-process gradient of the whole batch.
    dp_log, single_log = log_entries(runs[0]), log_entries(single.run_dir)
    for a, b in zip(dp_log, single_log):
        assert a["lr"] == b["lr"]
        for k in a["terms"]:
            assert a["terms"][k] == pytest.approx(b["terms"][k], rel=1e-4, abs=1e-6)
    single_w = weights(single.final_checkpoint)
    for k in ckpt:
        assert torch.allclose(ckpt[k], single_w[k], atol=1e-5), k


# ---- mixed precision ------------------------------------------------------------------------------
def test_bf16_mixed_precision_runs_on_cpu(tiny_dirs, evqa_dir, tmp_path):
    cfg = write_config(tmp_path / "cfg.yaml")
    result = train_vllm_editor.main(train_args(tiny_dirs, evqa_dir, tmp_path / "rec", cfg, "--max_steps", 2,
                                               "--mixed_precision", "bf16"))
    assert yaml.safe_load((result.run_dir / "config.yaml").read_text())["mixed_precision"] == "bf16"
    assert all(math.isfinite(e["loss"]) for e in log_entries(result.run_dir))
    with safe_open(str(result.final_checkpoint / "trainable.safetensors"), "pt") as f:
        assert f.get_tensor("0.weight").dtype == torch.float32   # trainable weights stay fp32


# ---- bad input ------------------------------------------------------------------------------------
BAD = {
    "unknown editor": (["-en", "nosuch"], "unknown editor 'nosuch'"),
    "unknown backbone": (["-mn", "gpt-5"], "unknown backbone 'gpt-5'"),
    "unknown dataset": (["-dna", "COCO"], "unknown dataset 'COCO'"),
    "missing checkpoint": (["-lkpt", "/nonexistent/step_3"], "checkpoint '/nonexistent/step_3' does not exist"),
    "batch size 0": (["-bs", "0"], "-bs/--batch_size must be a positive integer, got 0"),
    "untrainable editor": (["-en", "dummy-frozen"], "editor 'dummy-frozen' is not trainable"),
    "negative max steps": (["--max_steps", "-1"], "--max_steps must be a positive integer"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(case, tiny_dirs, evqa_dir, tmp_path, capsys):
    override, message = BAD[case]
    args = train_args(tiny_dirs, evqa_dir, tmp_path / "rec", write_config(tmp_path / "cfg.yaml"), "--max_steps", 1)
    args += override          # argparse: the last value of a flag wins
    with pytest.raises(SystemExit) as e:
        train_vllm_editor.main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err, err
    assert not (tmp_path / "rec").exists()


def test_new_run_without_required_flags_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        train_vllm_editor.main(["-en", "dummy-residual"])
    assert e.value.code == 2
    assert "-mn/--edit_model_name" in capsys.readouterr().err
