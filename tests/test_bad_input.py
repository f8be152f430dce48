"""One error path (issue 11): every bad input or failing environment given to either script ends in
exactly one stderr line ``error: ...`` naming the problem, exit code 2, and nothing written under the
records folder (a folder that existed is left byte for byte, mtimes included).

The table runs both scripts' ``main`` in-process on the tiny fixtures; two cases also run the real
command lines in a subprocess."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import save_file

import test_vllm_edit
import train_vllm_editor
from fixtures import write_evqa
from utils.locks import RunLock

ROOT = Path(__file__).resolve().parent.parent
N = 4


pytestmark = pytest.mark.usefixtures("dummy_editors")


def dummy_config(path: Path, **train) -> Path:
    path.write_text(yaml.safe_dump({"layer": 2, "rank": 4, "dropout": 0.0, "random_rephrase": False,
                                    "train": {"lr": 0.01, "lr_cut_step": None, "lr_cut_factor": 10, **train}}))
    return path


@pytest.fixture(scope="module")
def env(tiny_dirs, tmp_path_factory):
    """Good data, a finished training run (dummy editor, 2 steps) and a finished evaluation run."""
    root = tmp_path_factory.mktemp("bad_input")
    data = write_evqa(root / "data", n=N)
    cfg = dummy_config(root / "cfg.yaml")
    model = str(tiny_dirs["blip2"])
    run = train_vllm_editor.main(["-en", "dummy-residual", "-mn", "tiny-blip2", "--model_path", model, "-dna", "EVQA",
                                  "--data_dir", str(data), "--include_val_slice", "-bs", "2", "--config", str(cfg),
                                  "--records_dir", str(root / "trained"), "-rs", "1", "--max_steps", "2", "-sci", "1"])
    evaluated = test_vllm_edit.main(["-en", "none", "-mn", "tiny-blip2", "--model_path", model, "-dn", "EVQA",
                                     "--data_dir", str(data), "--records_dir", str(root / "evaluated"), "-sen", "2",
                                     "-dvc", "cpu"])
    return {"root": root, "data": data, "cfg": cfg, "model": model, "run": run.run_dir,
            "eval_records": root / "evaluated", "eval_run": evaluated["run_dir"]}


class Case:
    """A scratch copy of what a case needs; ``records`` is where the script is told to write."""

    def __init__(self, env, tmp: Path):
        self.env, self.tmp = env, tmp
        self.records = tmp / "records"
        self.data = env["data"]

    # ---- argument lists --------------------------------------------------------------------------
    def train(self, *extra, records=None):
        return ("train", ["-en", "dummy-residual", "-mn", "tiny-blip2", "--model_path", self.env["model"],
                          "-dna", "EVQA", "--data_dir", str(self.data), "--include_val_slice", "-bs", "2",
                          "--config", str(self.env["cfg"]), "--records_dir", str(records or self.records),
                          "-rs", "1", "--max_steps", "1", *extra])

    def evaluate(self, *extra, editor="none", sen="2"):
        out = ["-en", editor, "-mn", "tiny-blip2", "--model_path", self.env["model"], "-dn", "EVQA",
               "--data_dir", str(self.data), "--records_dir", str(self.records), "-dvc", "cpu"]
        return ("eval", out + (["-sen", sen] if sen else []) + list(extra))

    # ---- scratch material ------------------------------------------------------------------------
    def bad_data(self, change) -> Path:
        """A copy of the data whose record 0 is changed by ``change(record, image_root)``."""
        self.data = self.tmp / "data"
        shutil.copytree(self.env["data"], self.data)
        path = self.data / "easy-edit-mm" / "vqa" / "vqa_eval.json"
        records = json.loads(path.read_text())
        change(records[0], self.data / "easy-edit-mm" / "images")
        for split in ("eval", "train"):
            (path.parent / f"vqa_{split}.json").write_text(json.dumps(records))
        return self.data

    def data_file(self, raw: bytes) -> Path:
        self.data = self.tmp / "data"
        shutil.copytree(self.env["data"], self.data)
        for split in ("eval", "train"):
            (self.data / "easy-edit-mm" / "vqa" / f"vqa_{split}.json").write_bytes(raw)
        return self.data

    def run_copy(self) -> Path:
        """A copy of the finished training run, inside this case's records folder."""
        dst = self.records / "dummy-residual" / "tiny-blip2" / "EVQA" / self.env["run"].name
        shutil.copytree(self.env["run"], dst)
        return dst

    def eval_copy(self) -> Path:
        """A copy of the finished evaluation records; returns the run folder inside it."""
        shutil.copytree(self.env["eval_records"], self.records)
        return self.records / self.env["eval_run"].relative_to(self.env["eval_records"])

    def config(self, text: str) -> str:
        path = self.tmp / "config.yaml"
        path.write_text(text)
        return str(path)

    def fake_ckpt(self, meta: dict, config: str | None = None, weights: bytes | None = None) -> str:
        folder = self.tmp / "ckpt"
        folder.mkdir()
        if weights is None:
            save_file({"w": __import__("torch").zeros(2)}, str(folder / "c.safetensors"), metadata=meta)
        else:
            (folder / "c.safetensors").write_bytes(weights)
        if config is not None:
            (folder / "config.yaml").write_text(config)
        return str(folder)


def _image_outside(record, root):
    outside = root.parent / "outside.png"
    shutil.copy(root / record["image"], outside)
    record["image"] = "../outside.png"


def _truncate_state(c):
    run = c.run_copy()
    state = run / "checkpoints" / "step_2" / "training_state.pt"
    state.write_bytes(state.read_bytes()[:200])
    return c.train("-lkpt", str(run / "checkpoints" / "step_2"))


def _bad_ckpt_config(c):
    run = c.run_copy()
    (run / "checkpoints" / "step_2" / "config.yaml").write_text("args: [unclosed\n  - {")
    return c.train("-lkpt", str(run / "checkpoints" / "step_2"))


def _stale_ckpt(c):
    """step_1 after its log line was rewritten (as by a resume that logged step 1 again)."""
    run = c.run_copy()
    log = run / "logs" / "train.jsonl"
    lines = log.read_text().splitlines()
    first = json.loads(lines[0])
    first["loss"] += 1.0
    log.write_text("\n".join([json.dumps(first)] + lines[1:]) + "\n")
    return c.train("-lkpt", str(run / "checkpoints" / "step_1"))


def _locked_run(c, lock_holder):
    run = c.run_copy()
    lock_holder.append(RunLock(run, "training run folder").acquire())
    return c.train("-lkpt", str(run))


def _locked_eval(c, lock_holder):
    run = c.eval_copy()
    lock_holder.append(RunLock(run, "evaluation run folder").acquire())
    return c.evaluate("--overwrite")


def _corrupt_saved_state(c):
    """A --load_edited_state folder whose metadata fits this run but whose weights file is garbage."""
    for name, indices in (("chunk_00000", [0, 1]), ("chunk_00001", [0, 1, 2, 3][2:])):
        folder = c.tmp / "states" / name
        folder.mkdir(parents=True)
        (folder / "edit_meta.json").write_text(json.dumps({"editor": "ft-l", "backbone": "tiny-blip2", "stage": name,
                                                          "record_indices": indices, "edit_times": [0.1, 0.1]}))
        (folder / "ft_l_state.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    return c.evaluate("--load_edited_state", str(c.tmp / "states"), editor="ft-l")


def _corrupt_stage(c):
    run = c.eval_copy()
    (run / "mean_results.json").unlink()
    (run / "stages" / "chunk_00001.json").write_text('{"name": "chunk_00001", "rec')
    return c.evaluate()


def _corrupt_run_file(c):
    run = c.eval_copy()
    (run / "run.json").write_bytes(b"\xff\xfe not json")
    return c.evaluate()


def _ftl_string_lr(c, monkeypatch):
    import utils.config
    configs = c.tmp / "configs"
    shutil.copytree(utils.config.CONFIG_DIR, configs)
    path = configs / "ft-l" / "tiny-blip2.yaml"
    path.write_text(path.read_text().replace("lr: ", "lr: '1e-4' # was ", 1))
    monkeypatch.setattr(utils.config, "CONFIG_DIR", configs)
    return c.evaluate(editor="ft-l")


# name -> (how to build the command from a Case, a substring of the one error line)
CASES = {
    # ---- train_vllm_editor.py: flags
    "train -bs eight": (lambda c: c.train("-bs", "eight"), "argument -bs/--batch_size: invalid int value: 'eight'"),
    "train unknown flag": (lambda c: c.train("--nosuch"), "unrecognized arguments: --nosuch"),
    "train unknown editor": (lambda c: c.train("-en", "nosuch"), "unknown editor 'nosuch'"),
    "train unknown backbone": (lambda c: c.train("-mn", "gpt-5"), "unknown backbone 'gpt-5'"),
    "train unknown dataset": (lambda c: c.train("-dna", "COCO"), "unknown dataset 'COCO'"),
    "train -bs 0": (lambda c: c.train("-bs", "0"), "-bs/--batch_size must be a positive integer, got 0"),
    "train --max_steps -1": (lambda c: c.train("--max_steps", "-1"), "--max_steps must be a positive integer"),
    "train -dn 0": (lambda c: c.train("-dn", "0"), "-dn/--data_n must be a positive integer"),
    "train -rs -5": (lambda c: c.train("-rs", "-5"), "-rs/--random_seed must be in"),
    "train -ea 2": (lambda c: c.train("-ea", "2"), "-ea/--ema_alpha must be in (0, 1]"),
    "train --mixed_precision fp8": (lambda c: c.train("--mixed_precision", "fp8"), "invalid choice: 'fp8'"),
    "train -dvc gpu7": (lambda c: c.train("-dvc", "gpu7"), "-dvc: unknown device 'gpu7'"),
    "train -dvc cuda:99": (lambda c: c.train("-dvc", "cuda:99"), "-dvc cuda:99"),
    "train -edvc foo": (lambda c: c.train("-edvc", "foo"), "-edvc: unknown device 'foo'"),
    "train untrainable editor": (lambda c: c.train("-en", "dummy-frozen"), "editor 'dummy-frozen' is not trainable"),
    "train -tnp ../x": (lambda c: c.train("-tnp", "../x"), "-tnp/--train_name_prefix '../x': expected a plain name"),
    # ---- train: paths, config, model, records folder
    "train --config missing": (lambda c: c.train("--config", str(c.tmp / "nope.yaml")), "nope.yaml: no such file"),
    "train --config malformed YAML": (lambda c: c.train("--config", c.config("layer: [2\ntrain: {")), "is not valid YAML"),
    "train --config string lr": (lambda c: c.train("--config", c.config(
        "layer: 2\nrank: 4\ndropout: 0.0\ntrain: {lr: 1e-2, lr_cut_step: null}\n")),
        "train.lr: expected float, got '1e-2'"),
    "train --config unknown key": (lambda c: c.train("--config", c.config(
        "layer: 2\nrnak: 4\ntrain: {lr: 0.01, lr_cut_step: null}\n")), "unknown key 'rnak'"),
    "train --config missing key": (lambda c: c.train("-en", "liveedit", "--config", c.config(
        "edit_layer: 1\nheads: 4\nrank: 4\nn_queries: 4\nscale: 5.0\ntrain: {lr: 0.001, lr_cut_step: null}\n")),
        "missing key 'd_m'"),
    "train --config wrong nested type": (lambda c: c.train("--config", c.config(
        "layer: two\ntrain: {lr: 0.01, lr_cut_step: null}\n")), "layer: expected int, got 'two'"),
    "train --model_path missing": (lambda c: c.train("--model_path", str(c.tmp / "nowhere")), "no model at"),
    "train --model_path not a model": (lambda c: c.train("--model_path", str(c.tmp)), "has no config.json"),
    "train --records_dir is a file": (lambda c: c.train(records=Path(c.config("x"))), "exists and is not a folder"),
    "train --data_dir missing": (lambda c: c.train("--data_dir", str(c.tmp / "nodata")), "annotation file missing"),
    # ---- train: records and images
    "train data not UTF-8": (lambda c: (c.data_file(b'[{"src": "\xff\xfe"}]'), c.train())[1], "is not UTF-8 text"),
    "train image null": (lambda c: (c.bad_data(lambda r, root: r.update(image=None)), c.train())[1],
                         "record 0 key 'image' must be an image path"),
    "train image is a text file": (lambda c: (c.bad_data(lambda r, root: (root / r["image"]).write_text("hello")),
                                              c.train())[1], "image unreadable"),
    "train alt null": (lambda c: (c.bad_data(lambda r, root: r.update(alt=None)), c.train())[1],
                       "record 0 key 'alt' must be a non-empty string, got null"),
    # ---- train: checkpoints
    "train -lkpt missing": (lambda c: c.train("-lkpt", "/nonexistent/step_3"), "'/nonexistent/step_3' does not exist"),
    "train -lkpt truncated training_state.pt": (_truncate_state, "is unreadable (truncated or corrupt"),
    "train -lkpt unparsable config.yaml": (_bad_ckpt_config, "is not valid YAML"),
    "train -lkpt other batch size": (lambda c: c.train("-lkpt", str(c.run_copy()), "-bs", "3"), "batch_size=2"),
    "train -lkpt stale checkpoint": (_stale_ckpt, "no longer agrees with"),
    "train -lkpt of a running run": (_locked_run, "is in use by pid"),
    # ---- test_vllm_edit.py: flags
    "eval -sen abc": (lambda c: c.evaluate(sen="abc"), "argument -sen/--sequential_edit_n: invalid int value: 'abc'"),
    "eval no -en": (lambda c: ("eval", c.evaluate()[1][2:]), "the following arguments are required: -en"),
    "eval -sen 9": (lambda c: c.evaluate(sen="9"), "-sen 9 exceeds the 4 records"),
    "eval -dsn 0": (lambda c: c.evaluate("-dsn", "0"), "-dsn/--data_sample_n must be a positive integer"),
    "eval unknown editor": (lambda c: c.evaluate(editor="nosuch"), "unknown editor 'nosuch'"),
    "eval unknown backbone": (lambda c: c.evaluate("-mn", "gpt-5"), "unknown backbone 'gpt-5'"),
    "eval unknown dataset": (lambda c: c.evaluate("-dn", "NOPE"), "unknown dataset 'NOPE'"),
    "eval --eval_at 2,x": (lambda c: c.evaluate("--eval_at", "2,x", sen=None), "--eval_at must be"),
    "eval neither -sen nor --eval_at": (lambda c: c.evaluate(sen=None), "give -sen"),
    "eval --eval_batch_size 0": (lambda c: c.evaluate("--eval_batch_size", "0"), "--eval_batch_size must be"),
    "eval --split test": (lambda c: c.evaluate("--split", "test"), "invalid choice: 'test'"),
    "eval --split eval_large of a real dataset": (lambda c: c.evaluate("--split", "eval_large"),
                                                  "eval_large exists for SYNTH-EVQA only"),
    "eval -enp ../../x": (lambda c: c.evaluate("-enp", "../../x"), "-enp/--eval_name_postfix '../../x'"),
    "eval -dvc foo": (lambda c: c.evaluate("-dvc", "foo"), "-dvc: unknown device 'foo'"),
    "eval --records_dir is a file": (lambda c: ("eval", c.evaluate()[1] + ["--records_dir", c.config("x")]),
                                     "exists and is not a folder"),
    "eval --records_dir under a file": (lambda c: ("eval", c.evaluate()[1] + [
        "--records_dir", str(Path(c.config("x")) / "records")]), "is not a folder"),
    "eval --model_path missing": (lambda c: c.evaluate("--model_path", str(c.tmp / "nowhere")), "no model at"),
    "eval save and load state": (lambda c: c.evaluate("--save_edited_state", str(c.tmp / "s"), "--load_edited_state",
                                                      str(c.tmp / "s")), "not both"),
    "eval save state of none": (lambda c: c.evaluate("--save_edited_state", str(c.tmp / "s")),
                                "cannot save or load its edited state"),
    "eval load missing state": (lambda c: c.evaluate("--load_edited_state", str(c.tmp / "s"), editor="ft-l"),
                                "no saved state"),
    "eval ft-l string lr": (_ftl_string_lr, "lr: expected float, got '1e-4'"),
    "eval --config missing": (lambda c: c.evaluate("--config", str(c.tmp / "nope.yaml"), editor="ft-l"),
                              "no config"),
    "eval --config unknown key": (lambda c: c.evaluate("--config", c.config(
        "layer: 2\nsteps: 1\nlr: 1.0e-2\nearly_stop_loss: 0.0\nnorm_constraint: null\nwings: 2\n"), editor="ft-l"),
        "wings"),
    "eval --config with -ckpt": (lambda c: c.evaluate("--config", c.config("x: 1"), "-ckpt", str(c.tmp),
                                                      editor="liveedit"), "--config and -ckpt"),
    "eval --edit_batch 0": (lambda c: c.evaluate("--edit_batch", "0"), "--edit_batch must be a positive integer"),
    "eval --image_cache_mb -1": (lambda c: c.evaluate("--image_cache_mb", "-1"), "--image_cache_mb must be 0 or more"),
    "eval load a corrupt saved state": (_corrupt_saved_state, "ft_l_state.safetensors is not a readable safetensors"),
    # ---- eval: checkpoints
    "eval -ckpt for none": (lambda c: c.evaluate("-ckpt", str(c.tmp)), "is not trainable and takes no checkpoint"),
    "eval -ckpt missing": (lambda c: c.evaluate("-ckpt", str(c.tmp / "nope"), editor="liveedit"), "checkpoint not found"),
    "eval -ckpt not safetensors": (lambda c: c.evaluate("-ckpt", c.fake_ckpt({}, weights=b"\x00" * 64),
                                                        editor="liveedit"), "not a readable safetensors file"),
    "eval -ckpt owners conflict": (lambda c: c.evaluate("-ckpt", c.fake_ckpt(
        {"editor": "liveedit", "backbone": "tiny-blip2"}, config="editor: ft-l\nbackbone: tiny-blip2\n"),
        editor="liveedit"), "names two owners"),
    "eval -ckpt unparsable config.yaml": (lambda c: c.evaluate("-ckpt", c.fake_ckpt(
        {"editor": "liveedit", "backbone": "tiny-blip2"}, config="editor: [liveedit\n"), editor="liveedit"),
        "is not valid YAML"),
    # ---- eval: records and images
    "eval data not UTF-8": (lambda c: (c.data_file(b"[\xff]"), c.evaluate())[1], "is not UTF-8 text"),
    "eval data not JSON": (lambda c: (c.data_file(b"[{]"), c.evaluate())[1], "is not valid JSON"),
    "eval data not a list": (lambda c: (c.data_file(b'{"src": 1}'), c.evaluate())[1], "must hold a JSON list"),
    "eval record lacks key": (lambda c: (c.bad_data(lambda r, root: r.pop("m_loc_q")), c.evaluate())[1],
                              "record 0 lacks key 'm_loc_q'"),
    "eval image null": (lambda c: (c.bad_data(lambda r, root: r.update(image=None)), c.evaluate())[1],
                        "record 0 key 'image' must be an image path"),
    "eval alt empty": (lambda c: (c.bad_data(lambda r, root: r.update(alt="")), c.evaluate())[1],
                       "record 0 key 'alt' must be a non-empty string, got ''"),
    "eval alt null": (lambda c: (c.bad_data(lambda r, root: r.update(alt=None)), c.evaluate())[1],
                      "key 'alt' must be a non-empty string, got null"),
    "eval alt a number": (lambda c: (c.bad_data(lambda r, root: r.update(alt=5)), c.evaluate())[1],
                          "key 'alt' must be a non-empty string, got 5"),
    "eval loc_ans null": (lambda c: (c.bad_data(lambda r, root: r.update(loc_ans=None)), c.evaluate())[1],
                          "key 'loc_ans' must be a non-empty string"),
    "eval image ../ outside the root": (lambda c: (c.bad_data(_image_outside), c.evaluate())[1],
                                        "'../outside.png' leads outside the image folder"),
    "eval image absolute path": (lambda c: (c.bad_data(lambda r, root: r.update(image="/etc/hostname")),
                                            c.evaluate())[1], "'/etc/hostname' leads outside the image folder"),
    "eval image missing": (lambda c: (c.bad_data(lambda r, root: r.update(m_loc="val2014/nope.png")),
                                      c.evaluate())[1], "image file missing"),
    "eval image is a text file": (lambda c: (c.bad_data(lambda r, root: (root / r["m_loc"]).write_text("hello")),
                                             c.evaluate())[1], "image unreadable"),
    # ---- eval: an existing run folder
    "eval corrupt stage file": (_corrupt_stage, "chunk_00001.json is not valid JSON"),
    "eval corrupt run.json": (_corrupt_run_file, "run.json is not UTF-8 text"),
    "eval --overwrite of a running run": (_locked_eval, "is in use by pid"),
}


def snapshot(root: Path):
    if not root.exists():
        return None
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(name, env, tmp_path, capsys, monkeypatch):
    build, message = CASES[name]
    case = Case(env, tmp_path)
    held = []
    kwargs = {}
    if build in (_locked_run, _locked_eval):
        kwargs["lock_holder"] = held
    if build is _ftl_string_lr:
        kwargs["monkeypatch"] = monkeypatch
    script, argv = build(case, **kwargs)
    before = snapshot(case.records)
    capsys.readouterr()
    try:
        with pytest.raises(SystemExit) as exit_:
            (train_vllm_editor if script == "train" else test_vllm_edit).main(argv)
        after = snapshot(case.records)   # taken while a case's own lock is still held
    finally:
        for lock in held:
            lock.release()
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert exit_.value.code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert message in lines[0], lines[0]
    assert after == before, name


def test_table_is_large_and_covers_both_scripts():
    scripts = [name.split()[0] for name in CASES]
    assert len(CASES) >= 40 and scripts.count("train") >= 20 and scripts.count("eval") >= 20


@pytest.mark.parametrize("script, argv, message", [
    ("train_vllm_editor.py", ["-bs", "eight"], "error: argument -bs/--batch_size: invalid int value: 'eight'"),
    ("test_vllm_edit.py", ["-en", "none", "-mn", "tiny-blip2", "-dn", "EVQA", "-sen", "abc"],
     "error: argument -sen/--sequential_edit_n: invalid int value: 'abc'"),
])
def test_command_line_bad_input_is_one_line(script, argv, message, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / script), *argv, "--records_dir", str(tmp_path / "records")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"{message} (see {script} --help)"]
    assert not (tmp_path / "records").exists()
