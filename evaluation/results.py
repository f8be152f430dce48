"""Means, the markdown table, and the files of a run folder (all written atomically).

Run folder ``records/<editor>/<backbone>/<split>/<DATASET>[-postfix]/<sequential_edit_T | eval_at_...>/``
(held by one process at a time: ``.lock``, see ``utils/locks.py``):

- ``run.json``: the run's arguments (``identity``: what must match to resume) — written first;
- ``config.yaml``: the resolved run arguments, editor config and backbone facts;
- ``stages/<name>.json``: one finished chunk (or eval point), written as soon as it finishes;
- ``results.json``, ``mean_results.json`` (and ``curve.json`` / ``curve.png`` with ``--eval_at``):
  written at the end; ``mean_results.json`` marks the run as finished.
"""
import json
from pathlib import Path

from evaluation.scoring import GENERAL_NAME, LOCALITY, METRIC_NAMES, METRICS, PORT_NAME
from utils.errors import UserError
from utils.io import read_json, write_json, write_text, write_yaml

RUN_FILE = "run.json"
CONFIG_FILE = "config.yaml"
STAGE_DIR = "stages"
RESULTS_FILE = "results.json"
MEANS_FILE = "mean_results.json"
CURVE_JSON = "curve.json"
CURVE_PNG = "curve.png"


def _mean(values) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def summarise(records: list[dict], edit_times: list[float]) -> dict:
    """Means (percent) over the samples of ``records`` (entries of a stage's ``records`` list) and the
    mean seconds per edit. Teacher-forced token accuracy under the metric names; exact match and the
    unedited model's scores of the targets in sub-mappings."""
    def over(metric, key):
        return _mean(r["samples"][metric][key] for r in records)

    out = {"n_records": len(records), "n_edits": len(edit_times)}
    out.update({METRIC_NAMES[m]: over(m, "acc") for m in METRICS})
    out["exact_match"] = {METRIC_NAMES[m]: over(m, "em") for m in METRICS}
    gen = [m for m in METRICS if m not in LOCALITY]
    out["pre_edit"] = {METRIC_NAMES[m]: over(m, "acc_before") for m in gen}
    out["pre_edit_exact_match"] = {METRIC_NAMES[m]: over(m, "em_before") for m in gen}
    out["edit_time"] = _mean(edit_times)
    ports = [s for r in records for s in r.get("portability", ())]
    if ports:  # Port: mean over every portability question of the records (scored like Rel)
        for key, field in (("", "acc"), ("exact_match", "em"), ("pre_edit", "acc_before"),
                           ("pre_edit_exact_match", "em_before")):
            (out[key] if key else out)[PORT_NAME] = _mean(s[field] for s in ports)
    return out


def extra_names(means: dict) -> list[str]:
    """The measured-where-available metrics present in ``means``: Port, General."""
    return [k for k in (PORT_NAME, GENERAL_NAME) if means.get(k) is not None]


# ---- the run folder ----------------------------------------------------------------------------
class RunStore:
    def __init__(self, run_dir: Path):
        self.dir = Path(run_dir)

    @property
    def finished(self) -> bool:
        return (self.dir / MEANS_FILE).is_file()

    def has_run(self) -> bool:
        return (self.dir / RUN_FILE).is_file()

    def identity(self) -> dict | None:
        if not self.has_run():
            return None
        data = read_json(self.dir / RUN_FILE, f"run file (pass --overwrite to discard the run in {self.dir})")
        if not isinstance(data, dict) or not isinstance(data.get("identity"), dict):
            raise UserError(f"run file {self.dir / RUN_FILE} holds no run identity; pass --overwrite to discard "
                            f"the run in {self.dir}")
        return data["identity"]

    def start(self, identity: dict, args: dict, config: dict):
        write_json(self.dir / RUN_FILE, {"identity": identity, "args": args})
        write_yaml(self.dir / CONFIG_FILE, config)

    def discard_run(self):
        """Remove the files of a run that finished no stage (written by ``start``), nothing else."""
        for name in (RUN_FILE, CONFIG_FILE):
            (self.dir / name).unlink(missing_ok=True)
        stages = self.dir / STAGE_DIR
        if stages.is_dir() and not any(stages.iterdir()):
            stages.rmdir()

    def stage_path(self, name: str) -> Path:
        return self.dir / STAGE_DIR / f"{name}.json"

    def done_stages(self, names) -> dict[str, dict]:
        done = {}
        for n in names:
            if self.stage_path(n).is_file():
                stage = read_json(self.stage_path(n), f"stage file (pass --overwrite to discard the run in {self.dir})")
                if not isinstance(stage, dict) or stage.get("name") != n or "records" not in stage:
                    raise UserError(f"stage file {self.stage_path(n)} is not a finished stage {n}; pass --overwrite "
                                    f"to discard the run in {self.dir}")
                done[n] = stage
        return done

    def save_stage(self, result: dict):
        write_json(self.stage_path(result["name"]), result)

    def means(self) -> dict:
        means = read_json(self.dir / MEANS_FILE, f"results file (pass --overwrite to redo the run in {self.dir})")
        if not isinstance(means, dict) or "total" not in means:
            raise UserError(f"results file {self.dir / MEANS_FILE} holds no results; pass --overwrite to redo the run")
        return means


def differences(old: dict, new: dict, config_defaults: dict | None = None) -> list[str]:
    """What differs between two run identities. An editor config key that the old run lacks and the new
    one holds at its default (``config_defaults``) was added since, with the behaviour runs had
    before it (this project's rule for new keys), so it is no difference."""
    old_cfg, new_cfg = old.get("editor_config"), new.get("editor_config")
    if config_defaults and isinstance(old_cfg, dict) and isinstance(new_cfg, dict):
        added = {k: v for k, v in new_cfg.items() if k not in old_cfg and k in config_defaults and v == config_defaults[k]}
        old = {**old, "editor_config": {**old_cfg, **added}}
    keys = sorted(set(old) | set(new))
    return [f"{k}: {json.dumps(old.get(k))} -> {json.dumps(new.get(k))}" for k in keys if old.get(k) != new.get(k)]


def finalise(store: RunStore, mode: str, header: dict, stages: list[dict]) -> dict:
    """Write results.json, mean_results.json (and the curve for eval_at); returns the means."""
    key = "chunks" if mode == "sequential" else "points"
    write_json(store.dir / RESULTS_FILE, {**header, key: stages})
    entries = [{"name": s["name"], "index": s["index"], "n_edits": s["n_edits"], **s["means"]} for s in stages]
    if mode == "sequential":
        records = [r for s in stages for r in s["records"]]
        times = [t for s in stages for t in s["edit_times"]]
        total = summarise(records, times)
        from evaluation.general import merge_chunks  # General and state bytes are per chunk
        merge_chunks(total, [s["means"] for s in stages])
    else:
        total = dict(stages[-1]["means"])
    total["n_stages"] = len(stages)
    means = {**header, key: entries, "total": total}
    write_json(store.dir / MEANS_FILE, means)
    if mode == "eval_at":
        write_curve(store.dir, entries)
    return means


def write_curve(run_dir: Path, points: list[dict]):
    """Metric versus number of edits, as JSON and as a PNG (two panels: token accuracy, exact match)."""
    n = [p["n_edits"] for p in points]
    names = [METRIC_NAMES[m] for m in METRICS] + extra_names(points[-1])
    curve = {"n_edits": n,
             "teacher_forced": {k: [p.get(k) for p in points] for k in names},
             "exact_match": {k: [p["exact_match"].get(k) for p in points] for k in names},
             "edit_time": [p["edit_time"] for p in points]}
    write_json(run_dir / CURVE_JSON, curve)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from utils.io import atomic_path

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, (title, key) in zip(axes, [("teacher-forced token accuracy", "teacher_forced"),
                                       ("exact match", "exact_match")]):
        for name, marker in zip(names, "osD^vPX"):
            style = "--" if name.endswith("Loc") else "-"
            ax.plot(n, curve[key][name], style, marker=marker, label=name, alpha=0.85)
        if len(n) > 1 and n[-1] / max(n[0], 1) >= 10:
            ax.set_xscale("log")
        ax.set_xlabel("number of edits")
        ax.set_title(title)
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("score (%)")
    axes[1].legend(loc="lower left")
    fig.tight_layout()
    with atomic_path(run_dir / CURVE_PNG) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


# ---- the printed table -------------------------------------------------------------------------
def _fmt(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def markdown_table(means: dict) -> str:
    """Markdown table of the total means (per point with --eval_at): token accuracy and exact match."""
    run = means["run"]
    names = [METRIC_NAMES[m] for m in METRICS] + extra_names(means["total"])
    head = ["Editor", "Backbone", "Dataset", "Edits", "Scoring"] + names + ["s/edit"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    if means["mode"] == "sequential":
        rows = [(f"T={run['sequential_edit_n']} total", means["total"])]
    else:
        rows = [(f"n={p['n_edits']}", p) for p in means["points"]]
    for label, m in rows:
        time = "-" if m["edit_time"] is None else f"{m['edit_time']:.4f}"
        for scoring, values in (("token acc", m), ("exact match", m["exact_match"])):
            cells = [run["editor"], run["backbone"], run["dataset"], label, scoring]
            cells += [_fmt(values.get(k)) for k in names] + [time]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_table(run_dir: Path, table: str):
    write_text(Path(run_dir) / "table.md", table + "\n")
