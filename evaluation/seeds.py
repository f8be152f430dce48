"""Error bars: train (trainable editors) and evaluate one editor once per seed, then report each
metric's mean and standard deviation over the seeds.

Each seed is an ordinary run of the two scripts' own code (``training.loop`` and
``evaluation.cli.main``), so every run folder is the usual one and is resumed or reused the usual way:
a training run is named ``seeds<seed>-<key>-<timestamp>``, where ``key`` digests what the training
depends on (editor config file, batch size, steps, data), and is reused when finished or resumed
when not; an evaluation is named by ``-enp seed<seed>`` and is reused when finished.
"""
import hashlib
import json
import math
import re
import sys
from pathlib import Path

from evaluation.results import METRIC_NAMES
from evaluation.scoring import METRICS
from utils.config import overrides_suffix
from utils.errors import UserError
from utils.io import write_json, write_text

SCORINGS = (("teacher-forced", None), ("exact match", "exact_match"))


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def _training_key(config_path: Path, batch_size: int, max_steps, data_name: str, data_n) -> str:
    h = hashlib.sha256(Path(config_path).read_bytes())
    h.update(json.dumps([batch_size, max_steps, data_name, data_n]).encode())
    return h.hexdigest()[:8]


def train_seed(editor: str, backbone: str, data_name: str, seed: int, batch_size: int, *, config_path: Path,
               max_steps=None, data_n=None, records_dir=None, data_dir=None, model_path=None, device=None) -> dict:
    """Train (or reuse / resume) the run of ``seed``; -> {"checkpoint", "train_seconds", "reused"}."""
    from training.checkpoint import resolve_checkpoint
    from training.loop import train
    from training.options import build_parser, resolve_options
    from utils.GLOBAL import RECORDS_DIR
    from vl_datasets import get_dataset_spec

    prefix = f"seeds{seed}-{_training_key(config_path, batch_size, max_steps, data_name, data_n)}"
    root = Path(records_dir or RECORDS_DIR) / editor / backbone / get_dataset_spec(data_name).name
    runs = sorted(root.glob(f"{prefix}-*")) if root.is_dir() else []
    if runs:   # a run made on another build of the backbone is not this seed's training
        from backbones import backbone_fingerprint
        from synthetic.embedded import prepare_backbone
        from training.checkpoint import run_backbone_fingerprint
        current = backbone_fingerprint(prepare_backbone(backbone, model_path))
        recorded = {run: run_backbone_fingerprint(run) for run in runs}
        for run, build in recorded.items():
            if build != current:
                print(f"seed {seed}: not reusing {run}: made on backbone build {build}, "
                      f"the current one is {current}", file=sys.stderr)
        runs = [run for run in runs if recorded[run] == current]
    argv = ["-en", editor, "-mn", backbone, "-dna", data_name, "-bs", str(batch_size), "-rs", str(seed),
            "-tnp", prefix, "--config", str(config_path)]
    for flag, value in (("--max_steps", max_steps), ("-dn", data_n), ("--records_dir", records_dir),
                        ("--data_dir", data_dir), ("--model_path", model_path), ("-dvc", device)):
        if value is not None:
            argv += [flag, str(value)]
    if runs and (runs[-1] / "checkpoints").is_dir() and any((runs[-1] / "checkpoints").glob("step_*")):
        run = runs[-1]
        done = _finished(run)
        if done is not None:
            print(f"seed {seed}: reusing the finished training run {run}", file=sys.stderr)
            return {"checkpoint": done[0], "train_seconds": done[1], "reused": True}
        argv = ["-lkpt", str(resolve_checkpoint(run))] + (["--max_steps", str(max_steps)] if max_steps else [])
        print(f"seed {seed}: resuming {run}", file=sys.stderr)
    opts, ckpt, saved = resolve_options(build_parser().parse_args(argv))
    result = train(opts, ckpt, saved, announce=False)
    (result.run_dir / "DONE").write_text(json.dumps({"checkpoint": str(result.final_checkpoint),
                                                     "train_seconds": _train_seconds(result.run_dir)}))
    return {"checkpoint": result.final_checkpoint, "train_seconds": _train_seconds(result.run_dir), "reused": False}


def _train_seconds(run_dir: Path) -> float | None:
    """Wall time of the training (the log's last elapsed_s; a resumed run adds up its segments)."""
    log = run_dir / "logs" / "train.jsonl"
    if not log.is_file():
        return None
    total, last = 0.0, 0.0
    for line in log.read_text(encoding="utf-8").splitlines():
        e = json.loads(line)["elapsed_s"]
        if e < last:          # a new segment after a resume
            total += last
        last = e
    return round(total + last, 1)


def _finished(run: Path):
    marker = run / "DONE"
    if not marker.is_file():
        return None
    done = json.loads(marker.read_text())
    return Path(done["checkpoint"]), done["train_seconds"]


def aggregate(per_seed: dict[int, dict]) -> list[dict]:
    """Per seed ``means`` of evaluation.cli.main -> one row per point (or the chunked total) with
    mean and std of every metric in both scorings, and of the seconds per edit."""
    first = next(iter(per_seed.values()))
    if first["mode"] == "sequential":
        points = {s: [dict(m["total"], label=f"T={m['run']['sequential_edit_n']}")] for s, m in per_seed.items()}
    else:
        points = {s: [dict(p, label=f"n={p['n_edits']}") for p in m["points"]] for s, m in per_seed.items()}
    rows = []
    for i, base in enumerate(points[next(iter(points))]):
        row = {"label": base["label"], "n_seeds": len(points)}
        for scoring, key in SCORINGS:
            row[scoring] = {}
            for name in (METRIC_NAMES[m] for m in METRICS):
                values = [(p[i][key] if key else p[i])[name] for p in points.values()]
                row[scoring][name] = None if any(v is None for v in values) else mean_std(values)
        times = [p[i]["edit_time"] for p in points.values() if p[i]["edit_time"] is not None]
        row["s_per_edit"] = mean_std(times) if times else None
        rows.append(row)
    return rows


def markdown(rows: list[dict], title: str) -> str:
    names = [METRIC_NAMES[m] for m in METRICS]
    head = ["Edits", "Scoring"] + names + ["s/edit"]
    out = [f"**{title}** (mean ± std over {rows[0]['n_seeds']} seeds)", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    fmt = lambda ms: "-" if ms is None else f"{ms[0]:.1f} ± {ms[1]:.1f}"
    for r in rows:
        for scoring, _ in SCORINGS:
            t = "-" if r["s_per_edit"] is None else f"{r['s_per_edit'][0]:.4f}"
            out.append("| " + " | ".join([r["label"], scoring] + [fmt(r[scoring][n]) for n in names] + [t]) + " |")
    return "\n".join(out)


def run_seeds(args) -> dict:
    """The whole command (see scripts/seeds.py); returns the summary written to disk."""
    from backbones import resolve_backbone_name
    from editors import EDITORS
    from evaluation.cli import main as evaluate
    from utils.GLOBAL import RECORDS_DIR
    from utils.config import config_path as default_config
    from vl_datasets import get_dataset_spec

    seeds = _parse_seeds(args.seeds)
    editor_cls = EDITORS.get(args.editor_name)
    backbone = resolve_backbone_name(args.edit_model_name)
    spec = get_dataset_spec(args.data_name)
    dataset = spec.name
    if args.split not in spec.splits:   # before any training
        raise UserError(f"--split {args.split}: dataset {dataset} has no such split (splits: {', '.join(spec.splits)})")
    given = dict(_parse_ckpt(c) for c in args.ckpt or [])
    config_path = Path(args.config) if args.config else default_config(args.editor_name, backbone)
    if args.eval_at is None and args.sequential_edit_n is None:
        raise UserError("give --eval_at (one stream, tested at each point) or -sen (chunks of T edits)")
    sets = list(getattr(args, "set", None) or [])
    set_suffix = overrides_suffix(sets)   # evaluations with overrides are other runs: their own names
    per_seed, trained = {}, {}
    for seed in seeds:
        ckpt = given.get(seed)
        if editor_cls.trainable and ckpt is None:
            trained[seed] = train_seed(args.editor_name, backbone, args.train_data or dataset, seed, args.batch_size,
                                       config_path=config_path, max_steps=args.max_steps, data_n=args.train_n,
                                       records_dir=args.records_dir, data_dir=args.data_dir,
                                       model_path=args.model_path, device=args.device)
            ckpt = trained[seed]["checkpoint"]
        argv = ["-en", args.editor_name, "-mn", backbone, "-dn", dataset, "--split", args.split,
                "-enp", f"seed{seed}{set_suffix}", "--seed", str(seed),
                "--supersede"]   # made with another checkpoint (a retrained seed) or config: moved aside, redone
        for item in sets:
            argv += ["--set", item]
        argv += ["--eval_at", args.eval_at] if args.eval_at else ["-sen", str(args.sequential_edit_n)]
        for flag, value in (("-ckpt", ckpt), ("-dsn", args.data_sample_n), ("--records_dir", args.records_dir),
                            ("--data_dir", args.data_dir), ("--model_path", args.model_path), ("-dvc", args.device),
                            ("--eval_batch_size", args.eval_batch_size)):
            if value is not None:
                argv += [flag, str(value)]
        if not editor_cls.trainable and args.config:
            raise UserError("--config applies to trainable editors (their training); evaluation uses "
                            "configs/<editor>/<backbone>.yaml")
        per_seed[seed] = evaluate(argv)["means"]
    rows = aggregate(per_seed)
    mode = f"eval_at_{args.eval_at.replace(',', '_')}" if args.eval_at else f"sequential_edit_{args.sequential_edit_n}"
    out_dir = (Path(args.records_dir or RECORDS_DIR) / "seeds" / args.editor_name / backbone / args.split
               / dataset / mode / ("seeds_" + "_".join(map(str, seeds)) + set_suffix))
    title = f"{args.editor_name} on {backbone}, {dataset} ({args.split} split)" + \
        (f", --set {' '.join(sets)}" if sets else "")
    summary = {"editor": args.editor_name, "backbone": backbone, "dataset": dataset, "split": args.split,
               "seeds": seeds, "config": str(config_path), "set": sets, "rows": rows,
               "training": {str(s): {"checkpoint": str(t["checkpoint"]), "train_seconds": t["train_seconds"]}
                            for s, t in trained.items()}}
    write_json(out_dir / "summary.json", summary)
    table = markdown(rows, title)
    write_text(out_dir / "summary.md", table + "\n")
    print(table)
    print(f"summary in {out_dir}")
    return summary


def _parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        seeds = []
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds must be distinct non-negative integers, e.g. 0,1,2; got {text!r}")
    return seeds


def _parse_ckpt(text: str) -> tuple[int, str]:
    m = re.fullmatch(r"(\d+)=(.+)", text)
    if not m:
        raise UserError(f"--ckpt takes SEED=PATH, got {text!r}")
    return int(m.group(1)), m.group(2)
