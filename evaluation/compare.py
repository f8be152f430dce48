"""``scripts/compare.py``: every editor on one backbone and dataset, run the same way, in one table.

For each dataset, editor and seed (a *cell*) it trains what needs training (trainable editors, with
the shared training loop, for the editor config's ``train.max_steps``) unless a checkpoint is given
(``--ckpt editor=PATH``), then runs ``test_vllm_edit.py``'s own code (``evaluation.cli.main``) on one
edit stream tested at ``--eval_at`` points, and writes ``records/compare/<backbone>/<dataset>/``:

- ``table.md``: two tables (teacher-forced token accuracy, exact match) with a row per editor and
  number of edits: Rel, T-Gen, M-Gen, T-Loc, M-Loc, and Port / General where measured (mean ± std over
  seeds), seconds per edit, edited-state bytes and training time; notes on what was skipped;
- ``table.csv``: the same numbers, one row per editor and number of edits, every mean and std;
- ``curves.png``: each metric against the number of edits (log x), one line per editor;
- ``cells/<editor>-s<seed>.json``: where each cell's run and checkpoint are.

Seeds: a trainable editor is trained and evaluated once per seed (``-rs`` = ``--seed`` = the seed;
an editor config with a top-level ``seed`` also gets it, so seed 0 is the shipped config); an editor
that is not trainable is deterministic, so it runs on the first seed only (``--all_seeds``, or a class
attribute ``uses_seed = True``, runs it on every seed). The table says how many seeds each row has.

Resume: an evaluation resumes by itself (a finished run is reported, not redone; a killed one continues
after its last finished point) and a training run of this command (``compare-s<seed>-*`` under the
editor's records) continues from its latest checkpoint; so rerunning the same command after a kill
finishes the grid and gives the same table.
"""
import argparse
import csv
import io
import json
import math
import shutil
import sys
import time
import traceback
from pathlib import Path

from utils.config import overrides_suffix
from utils.errors import UserError
from utils.io import read_json, write_json, write_text

METRICS = ("Rel", "T-Gen", "M-Gen", "T-Loc", "M-Loc")
OPTIONAL = ("Port", "General")
SCORINGS = (("teacher-forced token accuracy", "tf"), ("exact match", "em"))
README_START, README_END = "<!-- compare:results:start -->", "<!-- compare:results:end -->"


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UserError(f"{message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="scripts/compare.py",
                description="Every editor on one backbone and dataset: train what needs training, run "
                            "test_vllm_edit.py's protocol on one edit stream, write one table.")
    a = p.add_argument
    a("-mn", "--edit_model_name", required=True, help="backbone name or alias, e.g. tiny-blip2")
    a("-dn", "--data_name", required=True, help="dataset, or several comma-separated (SYNTH-EVQA,SYNTH-EIC)")
    a("--editors", default="all", help="comma-separated editor names, or 'all' (every registered editor)")
    a("--eval_at", default="1,10,100,1000", help="edit counts at which the stream is tested")
    a("--seeds", default="0", help="comma-separated seeds (training seed of trainable editors and --seed)")
    a("--all_seeds", action="store_true", help="run non-trainable editors on every seed too")
    a("--split", default="eval", choices=("eval", "val", "eval_large"),
      help="records to edit and test (eval_large: SYNTH-EVQA's 10,000 records, test_vllm_edit.py --split)")
    a("-dsn", "--data_sample_n", type=int, default=None, help="use the first N records of the split")
    a("--ckpt", action="append", default=[], metavar="EDITOR=PATH",
      help="a trained checkpoint instead of training; repeat for several seeds (in --seeds order)")
    a("--set", action="append", default=[], metavar="EDITOR.KEY=VALUE",
      help="evaluate one editor with one config key overridden (test_vllm_edit.py --set KEY=VALUE), e.g. "
           "serac.inference_threshold=12.0 over a checkpoint trained before that key; repeatable; its "
           "cells run apart from those without it, and the table notes it")
    a("--general", default=None,
      help="general-capability set (test_vllm_edit.py --general); default: synth for SYNTH-* datasets, "
           "none for real ones; 'none' turns it off")
    a("--general_n", type=int, default=None, help="use the first N questions of the general set")
    a("--train_bs", type=int, default=8, help="training batch size of trainable editors (8)")
    a("--train_steps", type=int, default=None, help="training steps (default: the config's train.max_steps)")
    a("-dvc", "--device", default=None, help="cpu or cuda:N (default: cuda:0 when available, else cpu)")
    a("--eval_batch_size", type=int, default=8, help="samples per scoring batch (8)")
    a("--data_dir", default=None, help="data root (default: data/)")
    a("--model_path", default=None, help="backbone folder (default: utils/GLOBAL.py)")
    a("--records_dir", default=None, help="records root (default: records/)")
    a("--out", default=None,
      help="output folder (default: <records>/compare/<backbone>/<dataset>[-<split>]; one dataset)")
    a("--no_run", action="store_true", help="only rebuild the tables from the finished cells")
    a("--jobs", type=int, default=1,
      help="with several -dn: run the datasets in this many processes at once, each on "
           "max(1, cores // jobs) threads, logging to <out>/compare.log; then write the tables (1)")
    a("--results_md", default=None, help="also write the README 'Results' block for every dataset to this file")
    a("--figures", default=None, help="copy each curves.png to DIR/results-<backbone>-<dataset>.png")
    a("--update_readme", action="store_true",
      help="replace the Results block of README.md (between its compare markers); copies the curves to figures/")
    return p


# ---- datasets in parallel ---------------------------------------------------------------------------
PARENT_ONLY = ("data_name", "jobs", "update_readme", "results_md", "figures", "no_run")


def child_argv(parser: argparse.ArgumentParser, args, dataset: str) -> list[str]:
    """The command line of one dataset's process: ``args`` without what only the parent does."""
    argv = ["-dn", dataset]
    for action in parser._actions:
        if action.dest in PARENT_ONLY or not action.option_strings or not hasattr(args, action.dest):
            continue
        value, flag = getattr(args, action.dest), action.option_strings[-1]
        if isinstance(action, argparse._StoreTrueAction):
            argv += [flag] if value else []
        elif isinstance(action, argparse._AppendAction):
            for item in value:
                argv += [flag, item]
        elif value is not None and value != action.default:
            argv += [f"{flag}={value}"]   # one token: a value may start with '-'
        elif not isinstance(action, (argparse._StoreAction, argparse._HelpAction)):
            raise NotImplementedError(f"child_argv: {flag} ({type(action).__name__}) is not passed on")
    return argv


def run_datasets_in_parallel(parser, args, datasets: list[str], outs: dict[str, Path]) -> None:
    """Each dataset's grid in a process of its own, ``args.jobs`` at a time; each one logs to
    ``<out>/compare.log``. The parent reports starts, ends and, once a minute, what each is doing."""
    import os
    import subprocess
    from utils.GLOBAL import ROOT_PATH as ROOT
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores // args.jobs)
    # the caller's working directory (relative paths mean the same to parent and children), with
    # the project importable from it
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONPATH": path}
    print(f"compare: {len(datasets)} datasets, {args.jobs} processes at once, {threads} thread(s) each",
          file=sys.stderr)
    pending, running, failed = list(datasets), {}, []
    last_report = time.monotonic()
    while pending or running:
        while pending and len(running) < args.jobs:
            dataset = pending.pop(0)
            log = outs[dataset] / "compare.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            handle = open(log, "a", encoding="utf-8")
            cmd = [sys.executable, "-m", "scripts.compare"] + child_argv(parser, args, dataset)
            running[dataset] = (subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env),
                                handle, log, time.monotonic())
            print(f"compare: {dataset} started (log: {log})", file=sys.stderr)
        time.sleep(2)
        for dataset, (proc, handle, log, start) in list(running.items()):
            if proc.poll() is None:
                continue
            handle.close()
            del running[dataset]
            took = _human_seconds(time.monotonic() - start)
            if proc.returncode:
                failed.append(f"{dataset} (exit {proc.returncode}, see {log})")
            print(f"compare: {dataset} {'failed' if proc.returncode else 'finished'} after {took}", file=sys.stderr)
        if running and time.monotonic() - last_report > 60:
            last_report = time.monotonic()
            for dataset, (_, _, log, _) in running.items():
                print(f"  {dataset}: {_last_step(log)}", file=sys.stderr)
    if failed:
        raise UserError(f"compare: {len(failed)} dataset process(es) failed: {'; '.join(failed)}")


def _last_step(log: Path) -> str:
    """The last ``compare:`` line of a dataset's log (which cell it is on)."""
    try:
        lines = [ln for ln in log.read_text(encoding="utf-8", errors="replace").replace("\r", "\n").splitlines()
                 if ln.startswith("compare: ")]
    except OSError:
        return "starting"
    return lines[-1][len("compare: "):] if lines else "starting"


# ---- small helpers ----------------------------------------------------------------------------------
def _ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{flag} must be comma-separated integers, got {text!r}") from None
    if not values or any(v < 0 for v in values) or len(set(values)) != len(values):
        raise UserError(f"{flag} must be distinct non-negative integers, got {text!r}")
    return values


def editor_order(names) -> list[str]:
    """``none`` first (the floor), ``liveedit`` last, the others alphabetically."""
    rank = lambda n: (n != "none", n == "liveedit", n)
    return sorted(names, key=rank)


def parse_ckpts(items: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise UserError(f"--ckpt takes EDITOR=PATH, got {item!r}")
        out.setdefault(name.strip(), []).append(path.strip())
    return out


def parse_sets(items: list[str]) -> dict[str, list[str]]:
    """``--set EDITOR.KEY=VALUE`` items -> {editor: ["KEY=VALUE", ...]}."""
    out: dict[str, list[str]] = {}
    for item in items:
        editor, dot, rest = item.partition(".")
        if not dot or "=" not in rest:
            raise UserError(f"--set takes EDITOR.KEY=VALUE (e.g. serac.inference_threshold=12.0), got {item!r}")
        out.setdefault(editor, []).append(rest)
    return out


def training_seconds(run_dir: Path, step: int | None = None) -> float | None:
    """Seconds spent in training steps up to ``step``, from the run's ``logs/train.jsonl``: each
    invocation (a resume starts a new one) logs ``elapsed_s`` from its own start, so the total is the
    sum over invocations of their last logged ``elapsed_s``."""
    log = Path(run_dir) / "logs" / "train.jsonl"
    if not log.is_file():
        return None
    total, last = 0.0, None
    for line in log.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        entry = json.loads(line)
        if step is not None and entry["step"] > step:
            break
        if last is not None and entry["elapsed_s"] < last:
            total += last
        last = entry["elapsed_s"]
    return total + (last or 0.0) if last is not None else None


def _human_bytes(n) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _human_seconds(s) -> str:
    if s is None:
        return "-"
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def _stats(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, None
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def _fmt(mean, std, digits=1) -> str:
    if mean is None:
        return "-"
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


# ---- one comparison ------------------------------------------------------------------------------
class Comparison:
    """The grid of one backbone x dataset: cells, training, evaluation, tables."""

    def __init__(self, args, dataset: str, out: Path):
        from backbones import resolve_backbone_name
        from utils.GLOBAL import DATA_DIR, RECORDS_DIR
        from vl_datasets import get_dataset_spec

        self.args = args
        self.backbone = resolve_backbone_name(args.edit_model_name)
        self.spec = get_dataset_spec(dataset)
        self.dataset = self.spec.name
        self.out = out
        self.data_dir = Path(args.data_dir) if args.data_dir else DATA_DIR
        self.records_dir = Path(args.records_dir) if args.records_dir else RECORDS_DIR
        self.points = _ints(args.eval_at, "--eval_at")
        self.seeds = _ints(args.seeds, "--seeds")
        general = args.general if args.general is not None else ("synth" if self.spec.synthetic else "none")
        self.general = None if general.strip().lower() == "none" else general
        self.notes: list[str] = []
        self.sets = parse_sets(args.set)
        for editor, items in self.sets.items():
            self.notes.append(f"`{editor}`: evaluated with `--set {' '.join(items)}`")

    # -- which cells ---------------------------------------------------------------------------
    def plan(self) -> list[tuple[str, list[int]]]:
        from editors import EDITORS
        wanted = self.args.editors.strip()
        names = EDITORS.names() if wanted.lower() == "all" else [n.strip() for n in wanted.split(",") if n.strip()]
        plan = []
        for name in editor_order(dict.fromkeys(names)):
            if name not in EDITORS:
                self.notes.append(f"`{name}`: not in the editor registry (known: {', '.join(EDITORS.names())}); skipped")
                continue
            cls = EDITORS.get(name)
            every = cls.trainable or getattr(cls, "uses_seed", False) or self.args.all_seeds
            plan.append((name, self.seeds if every else self.seeds[:1]))
        return plan

    def cell_file(self, editor: str, seed: int) -> Path:
        return self.out / "cells" / f"{editor}-s{seed}.json"

    def postfix(self, seed: int, editor: str) -> str:
        out = f"cmp-s{seed}" + (f"-n{self.args.data_sample_n}" if self.args.data_sample_n else "")
        return out + overrides_suffix(self.sets.get(editor, []))   # --set: a run folder of its own

    # -- training ------------------------------------------------------------------------------
    def _train_config(self, editor: str, seed: int):
        """(config dict, YAML path to train with): the shipped config, with ``seed`` set to the seed
        when the config has a top-level seed."""
        from editors import EDITORS
        from utils.config import config_path, load_config, to_dict
        cls = EDITORS.get(editor)
        config = to_dict(load_config(cls.config_class, editor, self.backbone))
        path = config_path(editor, self.backbone)
        if "seed" in config and config["seed"] != seed:
            import yaml
            config["seed"] = seed
            path = self.out / "train" / "configs" / f"{editor}-s{seed}.yaml"
            write_text(path, yaml.safe_dump(config, sort_keys=False))
        return config, path

    def _find_run(self, editor: str, seed: int, config: dict, steps: int):
        """This command's latest training run of ``editor`` with ``seed`` and this config that has a
        checkpoint at ``steps`` or can be continued to it, if any, made on the current backbone build."""
        import yaml
        from backbones import backbone_fingerprint
        from synthetic.embedded import prepare_backbone
        from training.checkpoint import (CONFIG_FILE, WEIGHTS_FILE, checkpoint_dir, resolve_checkpoint,
                                         run_backbone_fingerprint)
        current = backbone_fingerprint(prepare_backbone(self.backbone, self.args.model_path))
        root = self.records_dir / editor / self.backbone / self.dataset
        for run in sorted(root.glob(f"compare-s{seed}-*"), reverse=True):
            if run_backbone_fingerprint(run) != current:   # trained on another build of the backbone
                continue
            try:
                saved = yaml.safe_load((run / CONFIG_FILE).read_text())
            except (OSError, yaml.YAMLError):
                continue
            a = saved.get("args", {})
            if (self._trained_part(editor, saved.get("editor_config")) == self._trained_part(editor, config)
                    and a.get("random_seed") == seed
                    and a.get("batch_size") == self.args.train_bs and a.get("data_n") is None
                    and any((run / "checkpoints").glob("step_*"))):
                try:
                    latest = int(resolve_checkpoint(run).name.split("_")[-1])
                except UserError:
                    continue
                if latest < steps or (checkpoint_dir(run, steps) / WEIGHTS_FILE).is_file():
                    return run
        return None

    @staticmethod
    def _trained_part(editor: str, config) -> dict | None:
        """An editor config without its inference-only keys (what a training run depends on)."""
        from editors import EDITORS
        if not isinstance(config, dict):
            return None
        skip = getattr(EDITORS.get(editor).config_class, "inference_only", ())
        return {k: v for k, v in config.items() if k not in skip}

    def inference_sets(self, editor: str) -> list[str]:
        """``--set`` items giving a trained checkpoint the shipped config's inference-only keys (its
        saved config has those of its training time)."""
        from editors import EDITORS
        from utils.config import load_config, to_dict
        cls = EDITORS.get(editor)
        keys = getattr(cls.config_class, "inference_only", ())
        if not keys:
            return []
        shipped = to_dict(load_config(cls.config_class, editor, self.backbone))
        return [f"{k}={json.dumps(shipped[k])}" for k in keys if k in shipped]

    def train(self, editor: str, seed: int) -> tuple[str, float | None]:
        """Train (or finish training) ``editor`` with ``seed``; returns (checkpoint, training seconds)."""
        from training.checkpoint import WEIGHTS_FILE, checkpoint_dir, resolve_checkpoint
        from training.loop import train
        from training.options import build_parser as train_parser, resolve_options

        config, config_file = self._train_config(editor, seed)
        steps = self.args.train_steps or (config.get("train") or {}).get("max_steps")
        if not steps:
            raise UserError(f"editor {editor!r}: its config has no train.max_steps; pass --train_steps")
        common = ["--max_steps", str(steps), "-dvc", self.device]
        run = self._find_run(editor, seed, config, steps)
        if run is not None:
            if (checkpoint_dir(run, steps) / WEIGHTS_FILE).is_file():
                return str(checkpoint_dir(run, steps)), training_seconds(run, steps)
            ckpt = resolve_checkpoint(run)
            print(f"compare: resuming the training of {editor} (seed {seed}) from {ckpt}", file=sys.stderr)
            argv = ["-lkpt", str(run)] + common
        else:
            print(f"compare: training {editor} (seed {seed}, {steps} steps) on {self.dataset}", file=sys.stderr)
            argv = ["-en", editor, "-mn", self.backbone, "-dna", self.dataset, "-bs", str(self.args.train_bs),
                    "-rs", str(seed), "-tnp", f"compare-s{seed}", "--config", str(config_file),
                    "--records_dir", str(self.records_dir), "--data_dir", str(self.data_dir)] + common
            if self.args.model_path:
                argv += ["--model_path", self.args.model_path]
        opts, resume, saved = resolve_options(train_parser().parse_args(argv))
        result = train(opts, resume, saved, announce=False)
        return str(result.final_checkpoint), training_seconds(result.run_dir, result.step)

    @property
    def device(self) -> str:
        import torch
        return self.args.device or ("cuda:0" if torch.cuda.is_available() else "cpu")

    # -- one cell ------------------------------------------------------------------------------
    def run_cell(self, editor: str, seed: int, given_ckpt: str | None) -> dict:
        from editors import EDITORS
        from evaluation.cli import main as evaluate
        cell = {"editor": editor, "seed": seed, "status": "failed", "checkpoint": None, "train_seconds": None,
                "set": self.sets.get(editor, [])}
        try:
            if EDITORS.get(editor).trainable:
                if given_ckpt:
                    cell["checkpoint"] = given_ckpt
                    cell["train_seconds"] = given_training_seconds(given_ckpt)
                    cell["trained_by"] = "given"
                else:
                    cell["checkpoint"], cell["train_seconds"] = self.train(editor, seed)
                    cell["trained_by"] = "compare"
            argv = ["-en", editor, "-mn", self.backbone, "-dn", self.dataset, "--eval_at",
                    ",".join(map(str, self.points)), "--seed", str(seed), "--split", self.args.split,
                    "-enp", self.postfix(seed, editor), "--eval_batch_size", str(self.args.eval_batch_size),
                    "--supersede",   # a cell run with an older config (or checkpoint) is moved aside and redone
                    "--records_dir", str(self.records_dir), "--data_dir", str(self.data_dir), "-dvc", self.device]
            if self.args.data_sample_n:
                argv += ["-dsn", str(self.args.data_sample_n)]
            if self.args.model_path:
                argv += ["--model_path", self.args.model_path]
            if cell["checkpoint"]:
                argv += ["-ckpt", cell["checkpoint"]]
                for item in self.inference_sets(editor):   # before --set EDITOR.KEY, which wins
                    argv += ["--set", item]
            for item in self.sets.get(editor, []):
                argv += ["--set", item]
            if self.general:
                argv += ["--general", self.general]
                if self.args.general_n:
                    argv += ["--general_n", str(self.args.general_n)]
            print(f"compare: {editor} (seed {seed}) on {self.backbone} {self.dataset}", file=sys.stderr)
            result = evaluate(argv)
            cell.update(status="done", run_dir=str(result["run_dir"]))
        except UserError as e:
            cell["error"] = str(e)
        except Exception as e:  # an editor under development must not stop the grid; say what broke
            cell["error"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        if cell.get("error"):
            print(f"compare: {editor} (seed {seed}) failed: {cell['error']}", file=sys.stderr)
        write_json(self.cell_file(editor, seed), cell)
        return cell

    def run(self) -> list[dict]:
        ckpts = parse_ckpts(self.args.ckpt)
        cells = []
        for editor, seeds in self.plan():
            given = ckpts.get(editor, [])
            if given and len(given) not in (1, len(seeds)):
                raise UserError(f"--ckpt {editor}: {len(given)} checkpoints for {len(seeds)} seeds; "
                                f"give one, or one per seed")
            for i, seed in enumerate(seeds):
                ckpt = given[i if len(given) > 1 else 0] if given else None
                cells.append(self.run_cell(editor, seed, ckpt))
        return cells

    def finished_cells(self) -> list[dict]:
        """The plan's cells as last recorded (for --no_run)."""
        out = []
        for editor, seeds in self.plan():
            for seed in seeds:
                f = self.cell_file(editor, seed)
                out.append(read_json(f) if f.is_file() else {"editor": editor, "seed": seed, "status": "missing"})
        return out

    # -- tables --------------------------------------------------------------------------------
    def collect(self, cells: list[dict]) -> list[dict]:
        """One row per editor and number of edits, aggregated over the editor's seeds."""
        by_editor: dict[str, list[dict]] = {}
        for c in cells:
            means_file = Path(c.get("run_dir", "")) / "mean_results.json"
            if c.get("status") != "done" or not means_file.is_file():
                why = c.get("error") or c.get("status")
                self.notes.append(f"`{c['editor']}` seed {c['seed']}: no result ({why})")
                continue
            by_editor.setdefault(c["editor"], []).append({**c, "means": read_json(means_file)})
        rows = []
        for editor, runs in by_editor.items():
            points = sorted({p["n_edits"] for r in runs for p in r["means"]["points"]})
            for n in points:
                at = [next(p for p in r["means"]["points"] if p["n_edits"] == n) for r in runs
                      if any(p["n_edits"] == n for p in r["means"]["points"])]
                row = {"editor": editor, "n_seeds": len(at), "seeds": [r["seed"] for r in runs], "n_edits": n,
                       "n_records": runs[0]["means"]["run"]["n_records"]}
                for name in METRICS + OPTIONAL:
                    row[f"{name}_tf"] = _stats(p.get(name) for p in at)
                    row[f"{name}_em"] = _stats(p["exact_match"].get(name) for p in at)
                for key in ("before", "drop", "before_exact_match", "drop_exact_match"):
                    row[f"general_{key}"] = _stats((p.get("general") or {}).get(key) for p in at)
                row["sec_per_edit"] = _stats(p.get("edit_time") for p in at)
                row["state_bytes"] = _stats(p.get("state_bytes") for p in at)
                row["train_seconds"] = _stats(r.get("train_seconds") for r in runs)
                row["checkpoints"] = [r.get("checkpoint") for r in runs if r.get("checkpoint")]
                rows.append(row)
        return rows

    def title(self, rows) -> str:
        n = rows[0]["n_records"] if rows else self.args.data_sample_n
        return (f"{self.backbone} on {self.dataset} ({self.args.split} split, "
                f"{'?' if n is None else f'{n:,}'} records; edits {', '.join(map(str, self.points))})")

    def markdown(self, rows, level: int = 2, image: str | None = None) -> str:
        present = [m for m in OPTIONAL if any(r[f"{m}_tf"][0] is not None for r in rows)]
        names = list(METRICS) + present
        h = "#" * level
        lines = [f"{h} {self.title(rows)}", ""]
        for title, key in SCORINGS:
            head = ["editor", "seeds", "edits"] + names
            if "General" in present:
                head.append("General drop")
            if key == "tf":
                head += ["s/edit", "state", "training"]
            lines += [f"{h}# {title.capitalize()} (%)", "", "| " + " | ".join(head) + " |",
                      "|" + "---|" * len(head)]
            for r in rows:
                cells = [r["editor"], str(r["n_seeds"]), f"{r['n_edits']:,}"] + [_fmt(*r[f"{m}_{key}"]) for m in names]
                if "General" in present:
                    cells.append(_fmt(*r["general_drop" if key == "tf" else "general_drop_exact_match"]))
                if key == "tf":
                    cells += [_fmt(*r["sec_per_edit"], digits=4), _human_bytes(r["state_bytes"][0]),
                              _human_seconds(r["train_seconds"][0])]
                lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
        if image:
            lines += [f"![{self.dataset} curves]({image})", ""]
        lines += self.legend(present)
        return "\n".join(lines).rstrip() + "\n"

    def legend(self, present) -> list[str]:
        text = ["Mean ± std over the seeds of each row (`seeds`: how many; editors that are not trainable "
                "are deterministic and run once). One edit stream per seed, tested after each number of "
                "edits on every record edited so far."]
        if "Port" in present:
            text.append("Port: the records' portability questions, scored like Rel.")
        if "General" in present:
            text.append(f"General: accuracy on the general-capability set `{self.general}` after the edits; "
                        f"General drop: its unedited score minus that, in points.")
        text.append("s/edit: mean seconds per edit; state: bytes of what the edits produced; training: time "
                    "in training steps (trainable editors).")
        lines = [" ".join(text)]
        notes = list(dict.fromkeys(self.notes))
        if notes:
            lines += ["", *(f"- {n}" for n in notes)]
        return lines

    def csv_text(self, rows) -> str:
        buf = io.StringIO()
        cols = ["backbone", "dataset", "split", "n_records", "editor", "n_seeds", "seeds", "n_edits"]
        for m in METRICS + OPTIONAL:
            for key in ("tf", "em"):
                cols += [f"{m}_{key}_mean", f"{m}_{key}_std"]
        for key in ("general_before", "general_drop", "general_before_exact_match", "general_drop_exact_match",
                    "sec_per_edit", "state_bytes", "train_seconds"):
            cols += [f"{key}_mean", f"{key}_std"]
        cols.append("checkpoints")
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(cols)
        for r in rows:
            vals = [self.backbone, self.dataset, self.args.split, r["n_records"], r["editor"], r["n_seeds"],
                    " ".join(map(str, r["seeds"])), r["n_edits"]]
            for m in METRICS + OPTIONAL:
                for key in ("tf", "em"):
                    vals += list(r[f"{m}_{key}"])
            for key in ("general_before", "general_drop", "general_before_exact_match", "general_drop_exact_match",
                        "sec_per_edit", "state_bytes", "train_seconds"):
                vals += list(r[key])
            vals.append(" ".join(r["checkpoints"]))
            w.writerow(["" if v is None else (f"{v:.6g}" if isinstance(v, float) else v) for v in vals])
        return buf.getvalue()

    def curves(self, rows, path: Path):
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from utils.io import atomic_path
        present = [m for m in OPTIONAL if any(r[f"{m}_tf"][0] is not None for r in rows)]
        names = list(METRICS) + present
        editors = list(dict.fromkeys(r["editor"] for r in rows))
        fig, axes = plt.subplots(2, len(names), figsize=(2.6 * len(names), 5.4), sharex=True, sharey=True,
                                 squeeze=False)
        # twelve editors outgrow one 10-colour cycle: `none` (the floor) grey and dashed, LiveEdit black
        # and thick, every other editor its own colour
        palette = [plt.get_cmap("tab10")(i) for i in range(10)] + [plt.get_cmap("Dark2")(i) for i in range(8)]
        others = [e for e in editors if e not in ("none", "liveedit")]
        styles = {e: {"color": palette[i % len(palette)], "lw": 1.4} for i, e in enumerate(others)}
        styles["none"] = {"color": "0.5", "lw": 1.4, "ls": "--"}
        styles["liveedit"] = {"color": "black", "lw": 2.4}
        for i, (title, key) in enumerate(SCORINGS):
            for j, name in enumerate(names):
                ax = axes[i][j]
                for editor in editors:
                    pts = [r for r in rows if r["editor"] == editor and r[f"{name}_{key}"][0] is not None]
                    if not pts:
                        continue
                    x = [r["n_edits"] for r in pts]
                    y = [r[f"{name}_{key}"][0] for r in pts]
                    style = styles[editor]
                    c = style["color"]
                    ax.plot(x, y, marker="o", label=editor, ms=3.5, **{"ls": "-", **style})
                    sd = [r[f"{name}_{key}"][1] for r in pts]
                    if any(s is not None for s in sd):
                        sd = [s or 0.0 for s in sd]
                        ax.fill_between(x, [a - b for a, b in zip(y, sd)], [a + b for a, b in zip(y, sd)],
                                        color=c, alpha=0.15, lw=0)
                ax.set_xscale("log")
                ax.minorticks_off()
                ax.set_xticks(self.points, [f"{p:,}" for p in self.points], fontsize=8)
                ax.set_ylim(-3, 103)
                ax.grid(alpha=0.3)
                if i == 0:
                    ax.set_title(name)
                else:
                    ax.set_xlabel("number of edits")
                if j == 0:
                    ax.set_ylabel(f"{'token acc.' if key == 'tf' else 'exact match'} (%)")
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="upper center", ncol=max(1, len(labels)), frameon=False)
        fig.suptitle(self.title(rows), y=0.005, va="bottom", fontsize=9)
        fig.tight_layout(rect=(0, 0.03, 1, 0.93))
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=90)
        plt.close(fig)

    def write(self, rows) -> str:
        self.out.mkdir(parents=True, exist_ok=True)
        md = self.markdown(rows)
        write_text(self.out / "table.md", md)
        write_text(self.out / "table.csv", self.csv_text(rows))
        if rows:
            self.curves(rows, self.out / "curves.png")
        return md


def given_training_seconds(ckpt: str) -> float | None:
    """Training time of a given checkpoint, from its run's log when it lies in a run folder."""
    from training.checkpoint import resolve_checkpoint
    try:
        path = resolve_checkpoint(ckpt)
    except UserError:
        return None
    if path.parent.name != "checkpoints":
        return None
    try:
        step = int(path.name.split("_")[-1])
    except ValueError:
        step = None
    return training_seconds(path.parent.parent, step)


def replace_block(text: str, block: str) -> str:
    """``text`` with what lies between the compare markers replaced by ``block``."""
    if README_START not in text or README_END not in text:
        raise UserError(f"README.md has no Results markers ({README_START} ... {README_END})")
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    return f"{head}{README_START}\n{block.rstrip()}\n{README_END}{tail}"


def main(argv=None) -> dict:
    """Run the comparison(s); returns {dataset: {"out", "rows", "markdown"}}."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from backbones import resolve_backbone_name
    from utils.GLOBAL import RECORDS_DIR, ROOT_PATH
    from vl_datasets import get_dataset_spec

    for value, flag in ((args.data_sample_n, "-dsn"), (args.general_n, "--general_n"), (args.train_bs, "--train_bs"),
                        (args.train_steps, "--train_steps"), (args.eval_batch_size, "--eval_batch_size"),
                        (args.jobs, "--jobs")):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be a positive integer, got {value}")
    backbone = resolve_backbone_name(args.edit_model_name)
    specs = [get_dataset_spec(d.strip()) for d in args.data_name.split(",") if d.strip()]
    for spec in specs:   # before anything runs
        if args.split not in spec.splits:
            raise UserError(f"--split {args.split}: dataset {spec.name} has no such split "
                            f"(splits: {', '.join(spec.splits)})")
    datasets = [spec.name for spec in specs]
    if args.out and len(datasets) > 1:
        raise UserError("--out takes one dataset; leave it out with several -dn")
    parse_ckpts(args.ckpt)
    records_dir = Path(args.records_dir) if args.records_dir else RECORDS_DIR
    t0 = time.perf_counter()
    results, blocks = {}, []
    figures = Path(args.figures) if args.figures else (ROOT_PATH / "figures" if args.update_readme else None)
    outs = {d: Path(args.out) if args.out else
            records_dir / "compare" / backbone / (d if args.split == "eval" else f"{d}-{args.split}") for d in datasets}
    if args.jobs > 1 and len(datasets) > 1 and not args.no_run:
        run_datasets_in_parallel(parser, args, datasets, outs)
        args.no_run = True   # every cell is done: what is left is the tables
    for dataset in datasets:
        out = outs[dataset]
        comp = Comparison(args, dataset, out)
        cells = comp.finished_cells() if args.no_run else comp.run()
        rows = comp.collect(cells)
        md = comp.write(rows)
        print(md)
        image = None
        if figures is not None and (out / "curves.png").is_file():
            figures.mkdir(parents=True, exist_ok=True)
            target = figures / f"results-{backbone}-{dataset}.png"
            shutil.copyfile(out / "curves.png", target)
            try:
                image = target.resolve().relative_to(ROOT_PATH).as_posix()
            except ValueError:
                image = str(target)
        blocks.append(comp.markdown(rows, level=3, image=image))
        results[dataset] = {"out": out, "rows": rows, "markdown": md}
    seconds = time.perf_counter() - t0
    block = (f"Generated by `python -m scripts.compare {' '.join(argv if argv is not None else sys.argv[1:])}` "
             f"({_human_seconds(seconds)} this invocation).\n\n" + "\n".join(blocks))
    if args.results_md:
        write_text(Path(args.results_md), block)
    if args.update_readme:
        readme = ROOT_PATH / "README.md"
        write_text(readme, replace_block(readme.read_text(encoding="utf-8"), block))
    print(f"compare: done in {_human_seconds(seconds)}; tables under "
          f"{', '.join(str(r['out']) for r in results.values())}", file=sys.stderr)
    return results
