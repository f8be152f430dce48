"""The lifelong evaluation instrument (test_vllm_edit.py / evaluation/), run in-process on tiny random
backbones and a tiny E-VQA-schema dataset written into a temporary folder."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from editors import EDITORS
from editors.none import NoneEditor
from evaluation.checkpoints import check_checkpoint, checkpoint_metadata
from evaluation.cli import main
from fixtures import write_evqa
from utils.errors import UserError
from utils.losses import token_accuracy
from vl_datasets import load_dataset

ROOT = Path(__file__).resolve().parent.parent
N = 4


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_evqa(tmp_path_factory.mktemp("evqa"), n=N)


def argv(tiny_dirs, data_dir, records, *extra, editor="none", family="blip2", sen="2"):
    out = ["-en", editor, "-mn", f"tiny-{family}", "--model_path", str(tiny_dirs[family]), "-dn", "EVQA",
           "--data_dir", str(data_dir), "--records_dir", str(records), "-dvc", "cpu"]
    if sen is not None:
        out += ["-sen", sen]
    return out + list(extra)


def strip_times(obj):
    """Results without the wall-clock fields (edit times differ between runs)."""
    if isinstance(obj, dict):
        return {k: strip_times(v) for k, v in obj.items() if k not in ("edit_time", "edit_times")}
    if isinstance(obj, list):
        return [strip_times(v) for v in obj]
    return obj


def load_results(run_dir):
    return (strip_times(json.loads((run_dir / "results.json").read_text())),
            strip_times(json.loads((run_dir / "mean_results.json").read_text())))


def files_under(path):
    path = Path(path)
    return sorted(p.relative_to(path) for p in path.rglob("*")) if path.exists() else []


@pytest.fixture(scope="module")
def none_run(tiny_dirs, data_dir, tmp_path_factory):
    """The reference run: none, T=2 over 4 records (2 chunks), batch size 4."""
    records = tmp_path_factory.mktemp("records")
    out = main(argv(tiny_dirs, data_dir, records, "--eval_batch_size", "4"))
    return out, records


def test_none_locality_is_exact_and_rel_is_the_unedited_score(none_run, load_tiny, data_dir):
    out, records = none_run
    run_dir = out["run_dir"]
    assert run_dir == records / "none" / "tiny-blip2" / "eval" / "EVQA" / "sequential_edit_2"
    for name in ("results.json", "mean_results.json", "config.yaml", "run.json", "table.md"):
        assert (run_dir / name).is_file(), name
    means = json.loads((run_dir / "mean_results.json").read_text())
    total = means["total"]
    assert total["T-Loc"] == 100.0 and total["M-Loc"] == 100.0
    assert total["exact_match"]["T-Loc"] == 100.0 and total["exact_match"]["M-Loc"] == 100.0
    for key in ("Rel", "T-Gen", "M-Gen"):
        assert total[key] == pytest.approx(total["pre_edit"][key])
        assert total["exact_match"][key] == pytest.approx(total["pre_edit_exact_match"][key])
    assert [c["n_edits"] for c in means["chunks"]] == [2, 2] and total["n_edits"] == N
    # Rel is the unedited backbone's own teacher-forced accuracy of the targets, computed independently
    bb = load_tiny("blip2")
    recs = load_dataset("EVQA", "eval", data_dir)
    with torch.no_grad():
        batch = bb.encode([r.edit for r in recs])
        expected = 100 * token_accuracy(bb.logits(batch), batch.labels).mean().item()
    assert total["Rel"] == pytest.approx(expected, abs=1e-4)
    # results.json: every sample with prompt, target, decoded predictions before/after, scores, edit time
    results = json.loads((run_dir / "results.json").read_text())
    assert [len(c["records"]) for c in results["chunks"]] == [2, 2]
    rec = results["chunks"][1]["records"][0]
    assert rec["record"] == 2 and isinstance(rec["edit_time"], float)
    assert set(rec["samples"]) == {"rel", "t_gen", "m_gen", "t_loc", "m_loc"}
    rel = rec["samples"]["rel"]
    assert rel["prompt"] == recs[2].edit.prompt and rel["target"] == recs[2].edit.target
    ids = bb.generate([recs[2].edit], len(bb.encode([recs[2].edit]).labels[0].ne(-100).nonzero()))[0]
    assert rel["pred_before"] == bb.decode(ids) == rel["pred_after"]
    assert rel["em"] == (100.0 if rel["pred_after"] == rel["target"] else 0.0)
    assert "| none | tiny-blip2 | EVQA | T=2 total | token acc |" in (run_dir / "table.md").read_text()


def test_batch_size_one_gives_the_same_numbers(none_run, tiny_dirs, data_dir, tmp_path):
    out = main(argv(tiny_dirs, data_dir, tmp_path, "--eval_batch_size", "1"))
    assert load_results(out["run_dir"]) == load_results(none_run[0]["run_dir"])


class Interrupt(Exception):
    pass


def test_interrupted_run_resumes_after_last_finished_chunk(none_run, tiny_dirs, data_dir, tmp_path, monkeypatch):
    calls, crash = [], {"at": 3}

    class Crashing(NoneEditor):
        def edit(self, request):
            calls.append(request.prompt)
            if len(calls) == crash["at"]:  # the first edit of the second chunk
                raise Interrupt("killed")
            super().edit(request)

    monkeypatch.setitem(EDITORS._entries, "none", Crashing)
    with pytest.raises(Interrupt):
        main(argv(tiny_dirs, data_dir, tmp_path, "--eval_batch_size", "4"))
    run_dir = tmp_path / none_run[0]["run_dir"].relative_to(none_run[1])
    assert (run_dir / "stages" / "chunk_00000.json").is_file()
    assert not (run_dir / "stages" / "chunk_00001.json").exists()
    assert not (run_dir / "mean_results.json").exists()
    partial = {p: (run_dir / p).stat().st_mtime_ns for p in files_under(run_dir)}

    # resuming with other arguments is refused and changes nothing
    with pytest.raises(UserError, match="unfinished run with other arguments"):
        main(argv(tiny_dirs, data_dir, tmp_path, "--shuffle", "--seed", "3"))
    assert {p: (run_dir / p).stat().st_mtime_ns for p in files_under(run_dir)} == partial

    calls.clear()
    crash["at"] = None
    out = main(argv(tiny_dirs, data_dir, tmp_path, "--eval_batch_size", "2"))
    assert out["resumed"] and len(calls) == 2  # only the second chunk is edited again
    assert load_results(out["run_dir"]) == load_results(none_run[0]["run_dir"])


def test_finished_run_is_not_redone_and_overwrite_redoes_it(none_run, tiny_dirs, data_dir, tmp_path, capsys,
                                                           monkeypatch):
    args = argv(tiny_dirs, data_dir, tmp_path, "-dsn", "2")
    first = main(args)
    run_dir = first["run_dir"]
    before = {p: (run_dir / p).stat().st_mtime_ns for p in files_under(run_dir)}
    capsys.readouterr()
    again = main(args)
    assert again["already_finished"]
    assert str(run_dir) in capsys.readouterr().out
    assert {p: (run_dir / p).stat().st_mtime_ns for p in files_under(run_dir)} == before
    with pytest.raises(UserError, match="finished run with other arguments"):
        main(argv(tiny_dirs, data_dir, tmp_path, "-dsn", "3"))
    assert {p: (run_dir / p).stat().st_mtime_ns for p in files_under(run_dir)} == before

    edits = []
    monkeypatch.setitem(EDITORS._entries, "none", type("Counting", (NoneEditor,), {
        "edit": lambda self, r: (edits.append(r), NoneEditor.edit(self, r))}))
    first_results = load_results(run_dir)
    redo = main(args + ["--overwrite"])
    assert not redo["already_finished"] and len(edits) == 2
    assert load_results(run_dir) == first_results
    assert (run_dir / "mean_results.json").stat().st_mtime_ns > before[Path("mean_results.json")]


def test_eval_at_points_match_chunked_runs(tiny_dirs, data_dir, tmp_path):
    """With a deterministic editor (FT-L), the eval_at point n equals a chunked run's first chunk at T=n."""
    curve = main(argv(tiny_dirs, data_dir, tmp_path / "a", "--eval_at", "1,3", "-dsn", "3", editor="ft-l", sen=None))
    run_dir = curve["run_dir"]
    assert run_dir.name == "eval_at_1_3"
    data = json.loads((run_dir / "curve.json").read_text())
    assert data["n_edits"] == [1, 3]
    assert set(data["teacher_forced"]) == {"Rel", "T-Gen", "M-Gen", "T-Loc", "M-Loc"}
    assert (run_dir / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    points = json.loads((run_dir / "results.json").read_text())["points"]
    assert [len(p["records"]) for p in points] == [1, 3]
    for n, point in zip((1, 3), points):
        chunked = main(argv(tiny_dirs, data_dir, tmp_path / f"c{n}", "-dsn", str(n), sen=str(n), editor="ft-l"))
        first = json.loads((chunked["run_dir"] / "results.json").read_text())["chunks"][0]
        assert strip_times(point["records"]) == strip_times(first["records"])
        assert strip_times(point["means"]) == strip_times(first["means"])
        assert data["teacher_forced"]["Rel"][[1, 3].index(n)] == first["means"]["Rel"]


def fake_checkpoint(path, editor, backbone):
    from safetensors.torch import save_file
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"w": torch.zeros(2)}, str(path), metadata=checkpoint_metadata(editor, backbone))
    return path


def test_checkpoint_owner_check(tmp_path):
    ok = fake_checkpoint(tmp_path / "a" / "checkpoint.safetensors", "liveedit", "blip2")
    assert check_checkpoint(tmp_path / "a", "liveedit", "blip2-opt-2.7b") == ok
    with pytest.raises(UserError, match="belongs to editor 'liveedit' on backbone 'blip2'"):
        check_checkpoint(ok, "ft-l", "blip2")
    with pytest.raises(UserError, match="not editor 'liveedit' on backbone 'llava'"):
        check_checkpoint(ok, "liveedit", "llava")
    # no metadata: a config.yaml beside the weights names the owner
    from safetensors.torch import save_file
    (tmp_path / "b").mkdir()
    save_file({"w": torch.zeros(2)}, str(tmp_path / "b" / "model.safetensors"))
    (tmp_path / "b" / "config.yaml").write_text("run:\n  editor: liveedit\n  backbone: tiny-llava\n")
    assert check_checkpoint(tmp_path / "b", "liveedit", "tiny-llava").name == "model.safetensors"
    with pytest.raises(UserError, match="belongs to editor 'liveedit' on backbone 'tiny-llava'"):
        check_checkpoint(tmp_path / "b", "liveedit", "tiny-blip2")
    (tmp_path / "b" / "config.yaml").unlink()
    with pytest.raises(UserError, match="cannot tell which editor"):
        check_checkpoint(tmp_path / "b", "liveedit", "tiny-llava")
    with pytest.raises(UserError, match="not found"):
        check_checkpoint(tmp_path / "missing", "liveedit", "tiny-llava")


def test_checkpoint_check_reads_the_training_loop_layout(tmp_path):
    ckpt = pytest.importorskip("training.checkpoint")
    run = tmp_path / "run"
    for step in (5, 10):
        ckpt.save_checkpoint(run, step, {"w": torch.zeros(2)}, {"editor": "liveedit", "backbone": "tiny-llava"},
                             {}, {"editor": "liveedit"})
    weights = check_checkpoint(run, "liveedit", "tiny-llava")  # a run folder: its latest step
    assert weights == ckpt.checkpoint_dir(run, 10) / ckpt.WEIGHTS_FILE
    with pytest.raises(UserError, match="belongs to editor 'liveedit' on backbone 'tiny-llava'"):
        check_checkpoint(ckpt.checkpoint_dir(run, 5), "liveedit", "tiny-blip2")


class TrainableNone(NoneEditor):
    trainable = True


@pytest.mark.parametrize("extra, message", [
    (["-sen", "9"], "-sen 9 exceeds the 4 records"),
    (["-sen", "2", "-dsn", "0"], "-dsn/--data_sample_n must be a positive integer"),
    (["-sen", "2", "-en", "no-such-editor"], "unknown editor 'no-such-editor'"),
    (["-sen", "2", "-ckpt", "{ckpt_other_editor}"], "belongs to editor 'ft-l'"),
    (["-sen", "2", "-ckpt", "{ckpt_other_backbone}"], "on backbone 'tiny-llava'"),
    (["-sen", "2", "--save_edited_state", "{tmp}/state"], "cannot save or load its edited state"),
    (["-sen", "2", "-dn", "NOPE"], "unknown dataset 'NOPE'"),
    (["--eval_at", "2,x"], "--eval_at must be"),
    (["-sen", "2", "--set", "nope=1"], "unknown key 'nope'"),
    (["-sen", "2", "--set", "lr"], "expected KEY=VALUE"),
    ([], "give -sen"),
])
def test_bad_input_is_one_clear_error_and_writes_nothing(tiny_dirs, data_dir, tmp_path, monkeypatch, extra, message):
    monkeypatch.setitem(EDITORS._entries, "none", TrainableNone)
    subs = {"{ckpt_other_editor}": str(fake_checkpoint(tmp_path / "ck1" / "c.safetensors", "ft-l", "tiny-blip2")),
            "{ckpt_other_backbone}": str(fake_checkpoint(tmp_path / "ck2" / "c.safetensors", "none", "tiny-llava"))}
    extra = [subs.get(x, x.replace("{tmp}", str(tmp_path))) for x in extra]
    records = tmp_path / "records"
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        main(argv(tiny_dirs, data_dir, records, sen=None) + extra)
    assert not records.exists() and not (tmp_path / "state").exists()


def test_cli_exit_code_two_on_bad_input(tiny_dirs, data_dir, tmp_path):
    records = tmp_path / "records"
    proc = subprocess.run([sys.executable, str(ROOT / "test_vllm_edit.py"),
                           *argv(tiny_dirs, data_dir, records, sen="50")],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == ["error: -sen 50 exceeds the 4 records of EVQA eval"]
    assert not records.exists()


def test_checkpoint_is_evaluated_with_its_saved_editor_config(tiny_dirs, data_dir, tmp_path, capsys):
    """LiveEdit trained with --config (edit_layer 1, d_m 32) is evaluated with that config, not with
    configs/liveedit/tiny-blip2.yaml (edit_layer 4: out of range for this 4-layer backbone)."""

    import train_vllm_editor
    from utils.config import config_path

    default = yaml.safe_load(config_path("liveedit", "tiny-blip2").read_text())
    trained = {**default, "edit_layer": 1, "d_m": 32, "seed": 7}
    assert (trained["edit_layer"], trained["d_m"]) != (default["edit_layer"], default["d_m"])
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(trained))
    result = train_vllm_editor.main(["-en", "liveedit", "-mn", "tiny-blip2", "--model_path", str(tiny_dirs["blip2"]),
                                     "-dna", "EVQA", "--data_dir", str(data_dir), "-bs", "2", "-dvc", "cpu",
                                     "--max_steps", "2", "-rs", "1", "--config", str(tmp_path / "cfg.yaml"), "--include_val_slice",
                                     "--records_dir", str(tmp_path / "train")])
    ckpt = result.final_checkpoint
    saved = yaml.safe_load((ckpt / "config.yaml").read_text())["editor_config"]
    assert saved["edit_layer"] == 1 and saved["d_m"] == 32
    capsys.readouterr()

    out = main(argv(tiny_dirs, data_dir, tmp_path / "records", "-ckpt", str(ckpt), "-dsn", "2", editor="liveedit"))
    assert f"note: editor config saved with the checkpoint: {ckpt / 'config.yaml'}" in capsys.readouterr().err
    resolved = yaml.safe_load((out["run_dir"] / "config.yaml").read_text())
    assert resolved["editor_config"] == saved == resolved["run"]["editor_config"]
    assert resolved["editor_config_source"] == str((ckpt / "config.yaml").resolve())
    identity = json.loads((out["run_dir"] / "run.json").read_text())["identity"]
    assert identity["editor_config"]["edit_layer"] == 1
    assert out["means"]["total"]["n_edits"] == 2 and not out["already_finished"]

    # a run folder whose checkpoint lacks its config.yaml: the run folder's config.yaml is used
    import shutil
    run_copy = tmp_path / "run_copy"
    shutil.copytree(result.run_dir, run_copy)
    step_dir = run_copy / ckpt.relative_to(result.run_dir)
    (step_dir / "config.yaml").unlink()
    out = main(argv(tiny_dirs, data_dir, tmp_path / "records3", "-ckpt", str(run_copy), "-dsn", "2", editor="liveedit"))
    assert f"note: editor config saved with the checkpoint: {run_copy / 'config.yaml'}" in capsys.readouterr().err
    assert yaml.safe_load((out["run_dir"] / "config.yaml").read_text())["editor_config"] == saved

    # no saved config at all: the YAML is used (with a note), here refused since its edit_layer does
    # not fit this backbone
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(ckpt / "trainable.safetensors", bare / "trainable.safetensors")
    with pytest.raises(UserError, match="edit_layer=4 is out of range"):
        main(argv(tiny_dirs, data_dir, tmp_path / "records2", "-ckpt", str(bare), "-dsn", "2", editor="liveedit"))
    assert "has no saved editor config" in capsys.readouterr().err


def test_verified_generations_equal_step_by_step_decoding(load_tiny, data_dir, images):
    """run_samples checks a candidate generation with one teacher-forced pass and decodes step by
    step only where it fails; the outputs equal full greedy decoding of every sample (an FT-L-edited
    model, targets and locality candidates alike)."""
    from editors.ft_l import FTLConfig, FTLEditor
    from evaluation.scoring import run_samples
    from vl_datasets import load_dataset
    bb = load_tiny("blip2")
    ed = FTLEditor(bb, FTLConfig(layer=2, steps=5, lr=1e-2, early_stop_loss=0.0, norm_constraint=None))
    recs = load_dataset("EVQA", "eval", data_dir)
    samples = [s for r in recs for s in r.samples().values()]
    decoded = []
    original = ed.generate
    ed.generate = lambda part, n: decoded.extend(part) or original(part, n)
    try:
        pre = run_samples(ed, samples, 3)
        with torch.no_grad():
            assert [o.gen for o in pre] == [list(g[:len(o.target)]) for o, g in zip(pre, original(samples, 8))]
        assert any(o.gen != o.target for o in pre)
        ed.edit(recs[0].edit)
        ed.edit(recs[1].edit)
        got = run_samples(ed, samples, 3, expected=[o.gen for o in pre])
        with torch.no_grad():
            full = [list(g[:len(o.target)]) for o, g in zip(got, original(samples, 8))]
        assert [o.gen for o in got] == full
        assert any(o.gen != o.target for o in got) and any(o.gen == o.target for o in got)  # both paths ran
        # the teacher-forced passes settled every generation: none was decoded step by step
        assert decoded == [] and max(len(o.target) for o in got) > 1
    finally:
        ed.restore()


def test_a_teacher_forced_pass_proves_the_greedy_prefix():
    from evaluation.scoring import exact_prefix, finished
    eos = 2
    assert exact_prefix([5, 6, 7], [5, 6, 7], eos) == [5, 6, 7]          # the model says it: all of it
    assert exact_prefix([5, 9, 7], [5, 6, 7], eos) == [5, 9]             # up to the first wrong token
    assert exact_prefix([2, 6, 7], [5, 6, 7], eos) == [2]
    assert exact_prefix([5, 2, 7], [5, 2, 7], eos) == [5, 2]             # greedy decoding stops at EOS
    assert finished([5, 9], 3, eos) is False and finished([5, 2], 3, eos) and finished([1, 1, 1], 3, eos)


def test_val_split_names_the_run_folder(tiny_dirs, tmp_path):
    """--split val evaluates the val records (for a real dataset: the last 10% of its train file) in
    a run folder of its own."""
    data = write_evqa(tmp_path / "data", n=20)
    out = main(argv(tiny_dirs, data, tmp_path / "rec", "--split", "val"))
    assert out["run_dir"] == tmp_path / "rec" / "none" / "tiny-blip2" / "val" / "EVQA" / "sequential_edit_2"
    assert out["means"]["total"]["n_records"] == 2
    with pytest.raises(UserError, match="too few for a val slice"):
        main(argv(tiny_dirs, write_evqa(tmp_path / "small", n=5), tmp_path / "rec2", "--split", "val"))


def test_config_flag_replaces_the_shipped_yaml(tiny_dirs, data_dir, tmp_path, capsys):
    """--config: the editor is built from the given YAML (what tuning on val needs), and the run
    records that config and where it came from."""
    cfg = tmp_path / "ftl.yaml"
    cfg.write_text("layer: 1\nsteps: 1\nlr: 1.0e-3\nearly_stop_loss: 0.0\nnorm_constraint: 0.5\n")
    out = main(argv(tiny_dirs, data_dir, tmp_path / "rec", "--config", str(cfg), editor="ft-l"))
    saved = yaml.safe_load((out["run_dir"] / "config.yaml").read_text())
    assert saved["editor_config"] == {"layer": 1, "steps": 1, "lr": 1e-3, "early_stop_loss": 0.0, "norm_constraint": 0.5}
    assert saved["editor_config_source"] == str(cfg.resolve())


def test_a_config_change_is_refused_or_superseded(tiny_dirs, data_dir, tmp_path):
    """A finished run made with another editor config is refused; --supersede moves it aside (kept)
    and runs anew. A config key added since, at its default, is no difference."""
    from evaluation.results import differences
    old = {"editor_config": {"layer": 1}}
    assert differences(old, {"editor_config": {"layer": 1, "new_key": 0.0}}, {"new_key": 0.0}) == []
    assert differences(old, {"editor_config": {"layer": 1, "new_key": 0.5}}, {"new_key": 0.0}) != []
    cfg = lambda layer: tmp_path / f"ftl{layer}.yaml"
    for layer in (1, 2):
        cfg(layer).write_text(f"layer: {layer}\nsteps: 1\nlr: 1.0e-3\nearly_stop_loss: 0.0\nnorm_constraint: null\n")
    first = main(argv(tiny_dirs, data_dir, tmp_path / "rec", "--config", str(cfg(1)), editor="ft-l"))
    with pytest.raises(UserError, match="holds a finished run with other arguments"):
        main(argv(tiny_dirs, data_dir, tmp_path / "rec", "--config", str(cfg(2)), editor="ft-l"))
    second = main(argv(tiny_dirs, data_dir, tmp_path / "rec", "--config", str(cfg(2)), "--supersede", editor="ft-l"))
    assert second["run_dir"] == first["run_dir"] and not second.get("already_finished")
    aside = list(first["run_dir"].parent.glob(first["run_dir"].name + ".superseded-*"))
    assert len(aside) == 1 and (aside[0] / "mean_results.json").is_file()
    again = main(argv(tiny_dirs, data_dir, tmp_path / "rec", "--config", str(cfg(2)), "--supersede", editor="ft-l"))
    assert again["already_finished"]     # the same arguments: reported, not redone or moved


def test_set_flag_overrides_one_config_key_type_checked(tiny_dirs, data_dir, tmp_path, capsys):
    """--set KEY=VALUE replaces one key after the YAML (or a checkpoint's saved config): the run
    records the new value, a wrong type is one clear error."""
    out = main(argv(tiny_dirs, data_dir, tmp_path / "rec", "--set", "steps=2", "--set", "lr=0.5", editor="ft-l"))
    saved = yaml.safe_load((out["run_dir"] / "config.yaml").read_text())["editor_config"]
    assert (saved["steps"], saved["lr"]) == (2, 0.5)
    assert "note: --set steps=2 (was" in capsys.readouterr().err
    with pytest.raises(UserError, match=r"--set.steps: expected int, got 'two'"):
        main(argv(tiny_dirs, data_dir, tmp_path / "rec2", "--set", "steps=two", editor="ft-l"))
