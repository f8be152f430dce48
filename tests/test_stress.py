"""Stress (issue 11): three trainings and three evaluations start at once, as separate processes, into
the same records folder. Each either completes with its own results or is refused cleanly (exit 2,
one ``error:`` line); nothing is shared, interleaved or half-written."""
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from fixtures import write_evqa
from utils.config import config_path

ROOT = Path(__file__).resolve().parent.parent
STEPS = 3


def test_three_trainings_and_three_evaluations_at_once(tiny_dirs, tmp_path):
    data = write_evqa(tmp_path / "data", n=4)
    records = tmp_path / "records"
    cfg = yaml.safe_load(config_path("liveedit", "tiny-blip2").read_text())
    cfg.update(edit_layer=1, d_m=16, heads=2)                  # fits the 4-layer fixture backbone, and is quick
    (tmp_path / "liveedit.yaml").write_text(yaml.safe_dump(cfg))
    model = str(tiny_dirs["blip2"])
    # the same -tnp for all three: started together they share a second, never a folder
    trainings = [[str(ROOT / "train_vllm_editor.py"), "-en", "liveedit", "-mn", "tiny-blip2", "--model_path", model,
                  "-dna", "EVQA", "--data_dir", str(data), "--include_val_slice", "-bs", "2", "-dvc", "cpu",
                  "--config", str(tmp_path / "liveedit.yaml"), "--records_dir", str(records), "-tnp", "stress",
                  "--max_steps", str(STEPS), "-sci", "1", "-rs", str(seed)] for seed in (11, 12, 13)]
    # three evaluations of one run folder, one of them with --overwrite
    evaluation = [str(ROOT / "test_vllm_edit.py"), "-en", "none", "-mn", "tiny-blip2", "--model_path", model,
                  "-dn", "EVQA", "--data_dir", str(data), "--records_dir", str(records), "-sen", "2", "-dvc", "cpu"]
    evaluations = [evaluation, evaluation + ["--overwrite"], evaluation]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONWARNINGS": "ignore"}
    procs = [subprocess.Popen([sys.executable, *cmd], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for cmd in trainings + evaluations]
    outs = [p.communicate(timeout=600) for p in procs]

    def refused_cleanly(proc, err):
        lines = [line for line in err.splitlines() if line.strip()]
        return proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "in use by" in lines[0]

    # ---- trainings: each its own folder, seed, log and checkpoints
    runs = {}
    for proc, (out, err), seed in zip(procs[:3], outs[:3], (11, 12, 13)):
        assert proc.returncode == 0, err[-3000:]
        final = Path(out.split("final checkpoint: ")[1].split()[0])
        run = final.parent.parent
        runs[seed] = run
        assert run.name.startswith("stress-")
        assert yaml.safe_load((run / "config.yaml").read_text())["args"]["random_seed"] == seed
        steps = [json.loads(line)["step"] for line in (run / "logs" / "train.jsonl").read_text().splitlines()]
        assert steps == list(range(1, STEPS + 1))
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [f"step_{s}" for s in range(1, STEPS + 1)]
        ckpt_cfg = yaml.safe_load((final / "config.yaml").read_text())
        assert ckpt_cfg["run"] == run.name and ckpt_cfg["args"]["random_seed"] == seed
    assert len(set(runs.values())) == 3

    # ---- evaluations: completed (ran, or found it finished) or refused; the folder is consistent
    completed = 0
    for proc, (out, err) in zip(procs[3:], outs[3:]):
        if proc.returncode == 0:
            assert "results in" in out or "run already finished" in out, out
            completed += 1
        else:
            assert refused_cleanly(proc, err), (proc.returncode, err[-3000:])
    assert completed >= 1
    (run_dir,) = {p.parent for p in records.glob("none/tiny-blip2/eval/EVQA/*/run.json")}
    identity = json.loads((run_dir / "run.json").read_text())["identity"]
    means = json.loads((run_dir / "mean_results.json").read_text())
    assert means["run"] == identity and means["total"]["n_edits"] == 4
    assert sorted(p.name for p in (run_dir / "stages").iterdir()) == ["chunk_00000.json", "chunk_00001.json"]
    results = json.loads((run_dir / "results.json").read_text())
    assert [r["record"] for c in results["chunks"] for r in c["records"]] == [0, 1, 2, 3]
    assert (run_dir / ".lock").read_text() == ""          # every holder let go
