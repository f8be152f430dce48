"""scripts/compare.py on a tiny grid: tables and curves, resume after a kill, training of trainable
editors (the dummy editor of tests/dummy_editor.py, a few steps) and seeds."""
import csv
import dataclasses
import io
import json
import shutil
from pathlib import Path

import pytest
import yaml

import dummy_editor
from compare_fixtures import write_general
from editors.ft_l import FTLEditor
from evaluation.compare import main, training_seconds
from fixtures import write_evqa
from utils.GLOBAL import ROOT_PATH
from utils.errors import UserError
from vl_datasets import DATASETS

TIMING = ("sec_per_edit_mean", "sec_per_edit_std", "train_seconds_mean", "train_seconds_std")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = write_evqa(tmp_path_factory.mktemp("evqa"), n=4)
    images = sorted(str(p) for p in (d / "easy-edit-mm/images/val2014").glob("img_*.png"))[:1]
    return d, write_general(tmp_path_factory.mktemp("general") / "vqa.json", images)


def argv(tiny_dirs, data, records, *extra):
    d, general = data
    return ["-mn", "tiny-blip2", "--model_path", str(tiny_dirs["blip2"]), "-dn", "EVQA", "--data_dir", str(d),
            "--records_dir", str(records), "-dvc", "cpu", "--eval_at", "1,2", "-dsn", "3",
            "--general", str(general), *extra]


def table(out):
    """table.csv without the wall-clock columns."""
    rows = list(csv.DictReader(io.StringIO((out / "table.csv").read_text())))
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


class Killed(BaseException):
    """Stands for a kill: not an Exception, so compare does not catch it."""


def test_grid_writes_tables_and_resumes_after_a_kill(tiny_dirs, data, tmp_path, monkeypatch):
    grid = ["--editors", "none,ft-l,not-an-editor"]
    ref = main(argv(tiny_dirs, data, tmp_path / "ref", *grid))["EVQA"]
    out = ref["out"]
    assert out == tmp_path / "ref" / "compare" / "tiny-blip2" / "EVQA"
    for name in ("table.md", "table.csv", "curves.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    rows = table(out)
    assert [(r["editor"], r["n_edits"], r["n_seeds"]) for r in rows] == [
        ("none", "1", "1"), ("none", "2", "1"), ("ft-l", "1", "1"), ("ft-l", "2", "1")]
    none2 = rows[1]
    assert float(none2["T-Loc_tf_mean"]) == 100 and float(none2["M-Loc_em_mean"]) == 100
    assert float(none2["general_drop_mean"]) == 0 and none2["General_tf_mean"] != ""
    md = (out / "table.md").read_text()
    assert "## tiny-blip2 on EVQA (eval split, 3 records; edits 1, 2)" in md
    assert "| editor | seeds | edits | Rel | T-Gen | M-Gen | T-Loc | M-Loc | General | General drop |" in md
    assert "`not-an-editor`: not in the editor registry" in md
    assert (out / "cells" / "ft-l-s0.json").is_file()

    # killed in the middle of FT-L's stream (its second edit), then the same command again
    calls = []

    def edit(self, request):
        calls.append(request)
        if len(calls) == 2:
            raise Killed()
        return original(self, request)

    original = FTLEditor.edit
    monkeypatch.setattr(FTLEditor, "edit", edit)
    with pytest.raises(Killed):
        main(argv(tiny_dirs, data, tmp_path / "again", *grid))
    assert not (tmp_path / "again" / "compare" / "tiny-blip2" / "EVQA" / "table.csv").exists()
    monkeypatch.setattr(FTLEditor, "edit", original)
    again = main(argv(tiny_dirs, data, tmp_path / "again", *grid))["EVQA"]
    assert table(again["out"]) == rows
    # finished cells are not redone; --no_run only rebuilds the tables
    monkeypatch.setattr(FTLEditor, "edit", edit)
    calls.clear()
    main(argv(tiny_dirs, data, tmp_path / "again", *grid))
    main(argv(tiny_dirs, data, tmp_path / "again", *grid, "--no_run"))
    assert calls == [] and table(again["out"]) == rows


def test_trainable_editors_are_trained_once_per_seed(tiny_dirs, data, tmp_path, monkeypatch):
    names = dummy_editor.register()
    try:
        configs = tmp_path / "configs"
        (configs / names[0]).mkdir(parents=True)
        (configs / names[0] / "tiny-blip2.yaml").write_text(
            "layer: 2\nrank: 4\ndropout: 0.0\nrandom_rephrase: false\n"
            "train: {lr: 0.01, lr_cut_step: null, lr_cut_factor: 10, max_steps: 3}\n")
        shutil.copytree(ROOT_PATH / "configs" / "none", configs / "none")
        monkeypatch.setattr("utils.config.CONFIG_DIR", configs)
        # the fixture's train file is tiny: no val slice to leave out of training
        monkeypatch.setitem(DATASETS._entries, "EVQA", dataclasses.replace(DATASETS.get("EVQA"), val_slice=0))
        grid = ["--editors", f"none,{names[0]}", "--seeds", "0,1", "--train_bs", "2"]
        res = main(argv(tiny_dirs, data, tmp_path / "records", *grid))["EVQA"]
        rows = {(r["editor"], r["n_edits"]): r for r in table(res["out"])}
        assert rows[("none", "2")]["n_seeds"] == "1" and rows[(names[0], "2")]["n_seeds"] == "2"
        assert rows[(names[0], "2")]["seeds"] == "0 1"
        runs = sorted((tmp_path / "records" / names[0] / "tiny-blip2" / "EVQA").iterdir())
        assert [r.name.split("-")[1] for r in runs] == ["s0", "s1"]
        for run in runs:
            assert (run / "checkpoints" / "step_3").is_dir() and training_seconds(run) > 0
        cells = [json.loads((res["out"] / "cells" / f"{names[0]}-s{s}.json").read_text()) for s in (0, 1)]
        assert [c["checkpoint"].endswith("step_3") for c in cells] == [True, True]
        assert "min" in (res["out"] / "table.md").read_text() or " s |" in (res["out"] / "table.md").read_text()
        # again: nothing is retrained
        main(argv(tiny_dirs, data, tmp_path / "records", *grid))
        assert len(list((tmp_path / "records" / names[0] / "tiny-blip2" / "EVQA").iterdir())) == 2
        # the shipped config changes an inference-only key: the trainings are reused, the evaluations
        # are redone with the new value (the old ones moved aside)
        yaml_file = configs / names[0] / "tiny-blip2.yaml"
        yaml_file.write_text(yaml_file.read_text() + "output_scale: 0.5\n")
        main(argv(tiny_dirs, data, tmp_path / "records", *grid))
        assert len(list((tmp_path / "records" / names[0] / "tiny-blip2" / "EVQA").iterdir())) == 2
        cell = json.loads((res["out"] / "cells" / f"{names[0]}-s0.json").read_text())
        run = json.loads((Path(cell["run_dir"]) / "run.json").read_text())
        assert run["identity"]["editor_config"]["output_scale"] == 0.5
        assert list(Path(cell["run_dir"]).parent.glob("*.superseded-*"))
        # a training run recorded on another build of the backbone is not reused: seed 1 trains anew
        run_config = runs[1] / "config.yaml"
        run_config.write_text(yaml.safe_dump({**yaml.safe_load(run_config.read_text()),
                                              "backbone_fingerprint": "0123456789abcdef"}))
        main(argv(tiny_dirs, data, tmp_path / "records", *grid))
        now = sorted((tmp_path / "records" / names[0] / "tiny-blip2" / "EVQA").iterdir())
        assert len(now) == 3 and [r.name.split("-")[1] for r in now].count("s1") == 2
        cell = json.loads((res["out"] / "cells" / f"{names[0]}-s1.json").read_text())
        assert not cell["checkpoint"].startswith(str(runs[1]))
    finally:
        dummy_editor.unregister()


def test_training_seconds_adds_up_resumed_invocations(tmp_path):
    log = tmp_path / "logs" / "train.jsonl"
    log.parent.mkdir()
    lines = [(1, 1.0), (2, 2.0), (3, 0.5), (4, 1.5)]   # killed after step 2, resumed
    log.write_text("".join(json.dumps({"step": s, "elapsed_s": e}) + "\n" for s, e in lines))
    assert training_seconds(tmp_path) == 3.5
    assert training_seconds(tmp_path, 2) == 2.0
    assert training_seconds(tmp_path / "none") is None


def test_figure_scripts_draw(tmp_path):
    import importlib.util
    for name in ("liveedit_dataflow", "world_samples"):
        spec = importlib.util.spec_from_file_location(name, ROOT_PATH / "figures" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        out = module.draw(tmp_path / f"{name}.png")
        assert out.is_file() and out.stat().st_size > 10_000


def test_set_overrides_one_editors_config_in_its_own_runs(tiny_dirs, data, tmp_path):
    """--set ft-l.steps=1: FT-L's cells run (apart from the plain ones) with the key replaced, the
    table notes it, and a bad item is one clear error."""
    base = main(argv(tiny_dirs, data, tmp_path / "r", "--editors", "ft-l"))["EVQA"]
    plain = json.loads((base["out"] / "cells" / "ft-l-s0.json").read_text())
    res = main(argv(tiny_dirs, data, tmp_path / "r", "--editors", "ft-l", "--set", "ft-l.steps=1"))["EVQA"]
    cell = json.loads((res["out"] / "cells" / "ft-l-s0.json").read_text())
    assert cell["set"] == ["steps=1"] and cell["run_dir"] != plain["run_dir"]
    saved = yaml.safe_load((Path(cell["run_dir"]) / "config.yaml").read_text())
    assert saved["editor_config"]["steps"] == 1
    assert "`ft-l`: evaluated with `--set steps=1`" in (res["out"] / "table.md").read_text()
    with pytest.raises(UserError, match="--set takes EDITOR.KEY=VALUE"):
        main(argv(tiny_dirs, data, tmp_path / "r", "--editors", "ft-l", "--set", "steps=1"))


def test_jobs_runs_datasets_in_processes_of_their_own(tiny_dirs, data, tmp_path):
    d, general = data
    caption = d / "easy-edit-mm" / "caption"   # an E-IC copy of the E-VQA records: same schema
    caption.mkdir(exist_ok=True)
    for split in ("train", "eval"):
        shutil.copyfile(d / "easy-edit-mm" / "vqa" / "vqa_eval.json", caption / f"caption_{split}_edit.json")
    grid = ["--editors", "none,ft-l", "-dsn", "2"]

    def run(records, *extra):
        args = argv(tiny_dirs, data, records, *grid, *extra)
        args[args.index("-dn") + 1] = "EVQA,EIC"
        return main(args)

    serial = run(tmp_path / "serial")
    parallel = run(tmp_path / "parallel", "--jobs", "2", "--results_md", str(tmp_path / "results.md"))
    for name in ("EVQA", "EIC"):
        out = parallel[name]["out"]
        assert "compare: none (seed 0) on tiny-blip2" in (out / "compare.log").read_text()
        assert table(out) == table(serial[name]["out"]) and len(table(out)) == 4
    assert "--jobs 2" in (tmp_path / "results.md").read_text()


def test_child_argv_keeps_what_the_dataset_needs():
    from evaluation.compare import build_parser, child_argv
    parser = build_parser()
    args = parser.parse_args(["-mn", "tiny-blip2", "-dn", "A,B", "--jobs", "3", "--update_readme", "--set", "x.k=1",
                              "--set", "y.k=2", "--seeds", "0,1", "--all_seeds", "-dsn", "5"])
    child = parser.parse_args(child_argv(parser, args, "B"))
    assert child.data_name == "B" and child.jobs == 1 and not child.update_readme
    assert (child.set, child.seeds, child.all_seeds, child.data_sample_n) == (["x.k=1", "y.k=2"], "0,1", True, 5)
    with pytest.raises(UserError, match="--jobs must be a positive integer"):
        main(["-mn", "tiny-blip2", "-dn", "EVQA", "--jobs", "0"])
