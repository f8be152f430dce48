"""Training speed of an editor through the shared training loop: steps per second.

    python -m scripts.bench_training                      # liveedit on tiny-blip2, SYNTH-EVQA, bs 8
    python -m scripts.bench_training -en liveedit -mn tiny-llava -bs 4 --steps 50

Runs ``--warmup`` + ``--steps`` real training steps (``training.loop.train``, the code
``train_vllm_editor.py`` runs) into a temporary records folder and reports the mean over the steps
after the warm-up. A tiny backbone that is not built yet is timed as a randomly initialised model
of the same size (same speed; no pretraining wait). An editor that is not registered is reported,
not an error.
"""
import statistics
import tempfile
from pathlib import Path

import torch

from utils.errors import CliParser, UserError, cli_main


def random_tiny_backbone(full_name: str, records, out: Path) -> Path:
    """A randomly initialised tiny backbone of the size the project pretrains (backbones.tiny.TinySize)."""
    from backbones.tiny import TinySize, build_tiny_model, save_tiny, train_tokenizer
    family = full_name.removeprefix("tiny-")
    texts = [s.prompt + " " + s.target for r in records for s in r.samples().values()]
    tok = train_tokenizer(texts * 4, vocab_size=1024)
    size = TinySize()
    return save_tiny(build_tiny_model(family, tok, size, seed=0), family, tok, size, out / family)


@cli_main
def main(argv=None):
    p = CliParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-en", "--editor_name", default="liveedit")
    p.add_argument("-mn", "--edit_model_name", default="tiny-blip2")
    p.add_argument("-dna", "--data_name", default="SYNTH-EVQA")
    p.add_argument("-bs", "--batch_size", type=int, default=8)
    p.add_argument("-dvc", "--device", default="cpu")
    p.add_argument("--steps", type=int, default=30, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--data_dir", default=None)
    p.add_argument("--model_path", default=None)
    p.add_argument("--config", default=None, help="editor config YAML (default configs/<editor>/<backbone>.yaml)")
    p.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default=None)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    a = p.parse_args(argv)
    if a.steps < 1 or a.warmup < 0 or a.batch_size < 1:
        raise UserError("--steps and -bs must be >= 1, --warmup >= 0")

    from editors import EDITORS
    if a.editor_name not in EDITORS:
        print(f"editor {a.editor_name!r} is not available yet (registered: {', '.join(EDITORS.names()) or 'none'}); "
              f"nothing to benchmark")
        return None
    if not getattr(EDITORS.get(a.editor_name), "trainable", False):
        print(f"editor {a.editor_name!r} is not trainable; nothing to benchmark")
        return None
    if a.threads:
        torch.set_num_threads(a.threads)

    from backbones import TINY_BACKBONES, resolve_backbone_name
    from synthetic.embedded import prepare_dataset
    from training.loop import train
    from training.options import TrainOptions
    from utils.GLOBAL import model_path_map
    from vl_datasets import load_dataset

    full = resolve_backbone_name(a.edit_model_name)
    with tempfile.TemporaryDirectory(prefix="bench-training-") as tmp:
        model_path = a.model_path
        if model_path is None and full in TINY_BACKBONES and not (Path(model_path_map[full]) / "config.json").is_file():
            print(f"note: {full} is not built yet ({model_path_map[full]}); timing a randomly initialised model "
                  f"of the same size")
            prepare_dataset(a.data_name, a.data_dir)
            records = load_dataset(a.data_name, "train", a.data_dir, 64)
            model_path = str(random_tiny_backbone(full, records, Path(tmp)))
        total = a.warmup + a.steps
        opts = TrainOptions(editor_name=a.editor_name, edit_model_name=full, data_name=a.data_name,
                            batch_size=a.batch_size, device=a.device, data_dir=a.data_dir, model_path=model_path,
                            records_dir=str(Path(tmp) / "records"), config=a.config, max_steps=total,
                            save_ckpt_per_i=total, log_per_i=total, random_seed=0,
                            mixed_precision=a.mixed_precision)
        result = train(opts, announce=False)
    timed = result.step_seconds[a.warmup:]
    if not timed:
        raise UserError(f"the run stopped after {result.step} steps, before the timed ones (too few records?)")
    mean = statistics.mean(timed)
    print(f"{a.editor_name} on {full}, {a.data_name}, batch size {a.batch_size}, device {a.device}, "
          f"{torch.get_num_threads()} thread(s): {1 / mean:.2f} steps/s ({mean * 1000:.1f} ms/step, "
          f"{a.batch_size / mean:.1f} records/s; median {statistics.median(timed) * 1000:.1f} ms, "
          f"{len(timed)} timed steps after {a.warmup} warm-up)")
    return 1 / mean


if __name__ == "__main__":
    main()
