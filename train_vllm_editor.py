"""Train a trainable editor (e.g. LiveEdit) on a frozen vision-language model.

    python train_vllm_editor.py -en liveedit -mn blip2 -dna EVQA -bs 8 -dvc cuda:0
    accelerate launch --num_processes 2 train_vllm_editor.py -en liveedit -mn blip2 -dna EVQA -bs 8
    python train_vllm_editor.py -lkpt records/liveedit/blip2-opt-2.7b/EVQA/<run>/checkpoints/step_1000

Writes ``records/<editor>/<backbone>/<dataset>/<run>/{config.yaml, checkpoints/step_<N>/, logs/train.jsonl}``
and prints the final checkpoint, ready for ``python test_vllm_edit.py -ckpt PATH``. See
``training/README.md``.
"""
from training.options import build_parser, resolve_options
from utils.errors import cli_main


@cli_main
def main(argv=None):
    """Parse ``argv`` (default: sys.argv), train, and return the TrainResult. A user error prints one
    line and exits with code 2 (SystemExit), before anything is written."""
    opts, ckpt, saved = resolve_options(build_parser().parse_args(argv))
    from training.loop import train
    return train(opts, ckpt, saved)


if __name__ == "__main__":
    main()
