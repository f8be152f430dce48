"""scripts/seeds.py: one training and one evaluation per seed, mean ± std over seeds, reuse of
finished runs, and -rs seeding the trainable initialisation."""
import json
from pathlib import Path

import pytest
import yaml

import dummy_editor
from evaluation.seeds import aggregate, mean_std
from fixtures import write_evqa

from scripts import seeds as seeds_script


def test_mean_std():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_std([5.0]) == (5.0, 0.0)


def test_seeds_train_evaluate_aggregate_and_reuse(tiny_dirs, tmp_path):
    dummy_editor.register()
    try:
        data = write_evqa(tmp_path / "data", n=4)
        cfg = tmp_path / "cfg.yaml"
        cfg.write_text("layer: 2\nrank: 4\ndropout: 0.0\nrandom_rephrase: false\n"
                       "train: {lr: 0.05, lr_cut_step: null, lr_cut_factor: 10, max_steps: 2}\n")
        argv = ["-en", "dummy-residual", "-mn", "tiny-blip2", "--model_path", str(tiny_dirs["blip2"]),
                "-dn", "EVQA", "--data_dir", str(data), "--records_dir", str(tmp_path / "rec"),
                "--seeds", "0,1", "--eval_at", "1,2", "-bs", "2", "--config", str(cfg), "-dvc", "cpu"]
        summary = seeds_script.main(argv)
        runs = sorted((tmp_path / "rec" / "dummy-residual" / "tiny-blip2" / "EVQA").glob("seeds*"))
        assert [r.name.split("-")[0] for r in runs] == ["seeds0", "seeds1"]
        # -rs seeds the initialisation: the two seeds' trained weights differ
        from safetensors.torch import load_file
        w = [load_file(str(Path(summary["training"][s]["checkpoint"]) / "trainable.safetensors")) for s in ("0", "1")]
        assert any(not (w[0][k] == w[1][k]).all() for k in w[0])
        rows = summary["rows"]
        assert [r["label"] for r in rows] == ["n=1", "n=2"] and rows[0]["n_seeds"] == 2
        per_seed = [json.loads((tmp_path / "rec" / "dummy-residual" / "tiny-blip2" / "eval" / f"EVQA-seed{s}" /
                                "eval_at_1_2" / "mean_results.json").read_text()) for s in (0, 1)]
        rel = [p["points"][1]["Rel"] for p in per_seed]
        assert rows[1]["teacher-forced"]["Rel"] == pytest.approx(mean_std(rel))
        out = Path(summary["rows"] and tmp_path / "rec" / "seeds" / "dummy-residual" / "tiny-blip2" / "eval" / "EVQA"
                   / "eval_at_1_2" / "seeds_0_1")
        assert (out / "summary.json").is_file() and "± " in (out / "summary.md").read_text()
        # a second call reuses the finished trainings and evaluations: no new run folder
        again = seeds_script.main(argv)
        assert sorted((tmp_path / "rec" / "dummy-residual" / "tiny-blip2" / "EVQA").glob("seeds*")) == runs
        assert again["rows"] == rows
        # --set: the same checkpoints evaluated with a key overridden, as other runs, without retraining
        dropped = seeds_script.main(argv + ["--set", "dropout=0.5"])
        assert sorted((tmp_path / "rec" / "dummy-residual" / "tiny-blip2" / "EVQA").glob("seeds*")) == runs
        assert dropped["set"] == ["dropout=0.5"]
        evals = sorted(p.name for p in (tmp_path / "rec" / "dummy-residual" / "tiny-blip2" / "eval").iterdir())
        assert len(evals) == 4 and sum("-set" in e for e in evals) == 2
        saved = yaml.safe_load(next((tmp_path / "rec" / "dummy-residual" / "tiny-blip2" / "eval").glob(
            "EVQA-seed0-set*/eval_at_1_2/config.yaml")).read_text())
        assert saved["editor_config"]["dropout"] == 0.5
        # a training run recorded on another build of the backbone is not reused: seed 0 trains anew
        run_config = runs[0] / "config.yaml"
        recorded = yaml.safe_load(run_config.read_text())
        run_config.write_text(yaml.safe_dump({**recorded, "backbone_fingerprint": "0123456789abcdef"}))
        rebuilt = seeds_script.main(argv)
        now = sorted((tmp_path / "rec" / "dummy-residual" / "tiny-blip2" / "EVQA").glob("seeds*"))
        assert len(now) == 3 and [r.name.split("-")[0] for r in now].count("seeds0") == 2
        assert Path(rebuilt["training"]["0"]["checkpoint"]).parent.parent not in runs
        assert Path(rebuilt["training"]["1"]["checkpoint"]).parent.parent == runs[1]
        evals = tmp_path / "rec" / "dummy-residual" / "tiny-blip2" / "eval"
        assert len(list((evals / "EVQA-seed0").glob("eval_at_1_2.superseded-*"))) == 1   # kept, moved aside
        assert not list((evals / "EVQA-seed1").glob("eval_at_1_2.superseded-*"))
    finally:
        dummy_editor.unregister()


def test_bad_seeds_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        seeds_script.main(["-en", "none", "-mn", "tiny-blip2", "-dn", "SYNTH-EVQA", "--seeds", "0,0", "-sen", "10"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "--seeds" in err[0]


def test_aggregate_of_identical_runs_has_zero_spread():
    means = {"mode": "eval_at", "points": [{"n_edits": 1, "edit_time": 0.1, "Rel": 50.0, "T-Gen": 40.0, "M-Gen": 30.0,
                                            "T-Loc": 100.0, "M-Loc": 90.0,
                                            "exact_match": {"Rel": 50.0, "T-Gen": 40.0, "M-Gen": 30.0,
                                                            "T-Loc": 100.0, "M-Loc": 90.0}}]}
    rows = aggregate({0: means, 1: means})
    assert rows[0]["teacher-forced"]["Rel"] == (50.0, 0.0) and rows[0]["exact match"]["M-Loc"] == (90.0, 0.0)
