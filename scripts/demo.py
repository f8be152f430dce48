"""The main job on the embedded default, end to end, with the project's own two scripts:

1. train LiveEdit on SYNTH-EVQA with tiny-blip2 (the synthetic world and the tiny backbone are built
   on first use and cached under data/synthetic/);
2. evaluate it in the lifelong protocol (T = 100 edits per chunk), beside the `none` floor.

Each command is printed before it runs, so it can be copied and changed.

    python -m scripts.demo [--backbone tiny-blip2] [--dataset SYNTH-EVQA] [--steps N] [-sen 100]
"""
import argparse
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(cmd: list[str]) -> str:
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    out = []
    for line in proc.stdout:  # stream the output (progress bars go to stderr, untouched)
        print(line, end="", flush=True)
        out.append(line)
    if proc.wait() != 0:
        sys.exit(proc.returncode)
    return "".join(out)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default="tiny-blip2")
    p.add_argument("--dataset", default="SYNTH-EVQA")
    p.add_argument("--steps", type=int, default=None,
                   help="LiveEdit training steps (default: the config's train.max_steps)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("-sen", "--sequential_edit_n", type=int, default=100)
    p.add_argument("-dsn", "--data_sample_n", type=int, default=1000)
    a = p.parse_args()
    t0 = time.time()
    py = sys.executable
    out = run([py, "train_vllm_editor.py", "-en", "liveedit", "-mn", a.backbone, "-dna", a.dataset,
               "-bs", str(a.batch_size), "-dvc", "cpu", "-sci", "500", "-rs", "0", "-tnp", "demo"]
              + (["--max_steps", str(a.steps)] if a.steps else []))
    ckpt = re.findall(r"^final checkpoint: (.+)$", out, flags=re.M)[-1].strip()
    evaluate = [py, "test_vllm_edit.py", "-mn", a.backbone, "-dn", a.dataset, "-sen", str(a.sequential_edit_n),
                "-dsn", str(a.data_sample_n), "-dvc", "cpu"]
    run(evaluate + ["-en", "none"])
    run(evaluate + ["-en", "liveedit", "-ckpt", ckpt])
    print(f"\ndemo finished in {(time.time() - t0) / 60:.1f} min; results under records/")


if __name__ == "__main__":
    main()
