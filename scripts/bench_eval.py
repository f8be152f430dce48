"""Benchmark the evaluation of one edit stream: the reference way against the default (prints figures).

    python -m scripts.bench_eval -en liveedit -mn tiny-blip2 -dn SYNTH-EVQA -ckpt CKPT --eval_at 1,10,100,1000

Runs ``test_vllm_edit.py`` twice on the same stream, each in a fresh process and a temporary records
folder:

- **reference**: every sample's greedy generation decoded step by step with a full forward per token
  (``--decode_all``), every image encoded again at each use (``--image_cache_mb 0``), one edit per call
  (``--edit_batch 1``): what evaluation did before these four were added;
- **default**: candidate generations verified by one teacher-forced pass (``evaluation/scoring.py``),
  the rest decoded with the key/value cache where the editor allows it (``VLBackbone.generate``),
  image features cached between passes (``backbones/base.py``, ``ImageFeatureCache``), and edits in
  groups of ``--edit_batch`` for editors that have ``edit_batch``.

It prints each run's wall time and CPU time (user + system of the child process: the fair figure on a
shared machine), the speed-up, and whether the two runs agree on every sample: the same scores, the
same generations and teacher-forced predictions (``results.json``, edit times left out). Exit code 1
if they differ.
"""
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from utils.errors import CliParser, UserError, cli_main

# what may differ between the two runs: timings, and the edit grouping itself
TIMING_KEYS = {"edit_time", "edit_times", "s_per_edit", "seconds", "time", "edit_seconds", "edit_batch"}


def parse_args(argv):
    p = CliParser(prog="scripts/bench_eval.py", description=__doc__.split("\n")[0])
    p.add_argument("-en", "--editor_name", default="liveedit")
    p.add_argument("-mn", "--edit_model_name", default="tiny-blip2")
    p.add_argument("-dn", "--data_name", default="SYNTH-EVQA")
    p.add_argument("-ckpt", "--checkpoint", default=None, help="trained editor checkpoint (trainable editors)")
    p.add_argument("--eval_at", default="1,10,100,1000")
    p.add_argument("--split", default="eval", choices=("eval", "val"))
    p.add_argument("--edit_batch", type=int, default=100, help="edits per call in the default run (100)")
    p.add_argument("--eval_batch_size", type=int, default=8)
    p.add_argument("--data_dir", default=None)
    p.add_argument("--keep", default=None, metavar="DIR", help="keep both runs' records under DIR")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    return p.parse_args(argv)


def _without_timings(x):
    if isinstance(x, dict):
        return {k: _without_timings(v) for k, v in x.items() if k not in TIMING_KEYS}
    if isinstance(x, list):
        return [_without_timings(v) for v in x]
    return x


def run(args, records_dir: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "test_vllm_edit", "-en", args.editor_name, "-mn", args.edit_model_name,
           "-dn", args.data_name, "--eval_at", args.eval_at, "--split", args.split,
           "--eval_batch_size", str(args.eval_batch_size), "--records_dir", str(records_dir)] + extra
    if args.checkpoint:
        cmd += ["-ckpt", args.checkpoint]
    if args.data_dir:
        cmd += ["--data_dir", args.data_dir]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-3000:])
        raise UserError(f"{' '.join(cmd)} failed with exit code {proc.returncode}")
    results = sorted(records_dir.rglob("results.json"))
    if len(results) != 1:
        raise UserError(f"expected one results.json under {records_dir}, found {len(results)}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": wall, "cpu_s": cpu, "results": json.loads(results[0].read_text())}


@cli_main
def main(argv=None):
    args = parse_args(argv)
    if args.edit_batch < 1:
        raise UserError(f"--edit_batch must be a positive integer, got {args.edit_batch}")
    modes = {"reference": ["--decode_all", "--image_cache_mb", "0", "--edit_batch", "1"],
             "default": ["--edit_batch", str(args.edit_batch)]}
    with tempfile.TemporaryDirectory(prefix="bench_eval_") as tmp:
        root = Path(args.keep) if args.keep else Path(tmp)
        figures = {}
        for name, extra in modes.items():
            print(f"bench_eval: {name} run ({' '.join(extra)}) ...", file=sys.stderr, flush=True)
            figures[name] = run(args, root / name, extra)
    ref, new = figures["reference"], figures["default"]
    same = _without_timings(ref["results"]) == _without_timings(new["results"])
    stages = new["results"].get("points") or new["results"].get("chunks") or []
    n_samples = sum(len(r["samples"]) for st in stages for r in st["records"])
    print(f"| run | wall s | CPU s |\n|---|---|---|")
    for name in modes:
        print(f"| {name} | {figures[name]['wall_s']:.1f} | {figures[name]['cpu_s']:.1f} |")
    print(f"speed-up (CPU time): {ref['cpu_s'] / max(new['cpu_s'], 1e-9):.2f}x; wall: "
          f"{ref['wall_s'] / max(new['wall_s'], 1e-9):.2f}x; {n_samples} scored samples after edits; "
          f"results {'IDENTICAL' if same else 'DIFFERENT'} (scores, generations, teacher-forced predictions)")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "editor": args.editor_name, "backbone": args.edit_model_name, "dataset": args.data_name,
            "eval_at": args.eval_at, "edit_batch": args.edit_batch, "identical": same,
            **{f"{k}_{m}": figures[k][m] for k in modes for m in ("wall_s", "cpu_s")}}, indent=2))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
