"""Train a trainable editor (e.g. LiveEdit) on a frozen vision-language model.

    python train_vllm_editor.py -en liveedit -mn blip2 -dna EVQA -bs 8 -dvc cuda:0
    accelerate launch --num_processes 2 train_vllm_editor.py -en liveedit -mn blip2 -dna EVQA -bs 8
    python train_vllm_editor.py -lkpt records/liveedit/blip2-opt-2.7b/EVQA/<run>/checkpoints/step_1000

Writes ``records/<editor>/<backbone>/<dataset>/<run>/{config.yaml, checkpoints/step_<N>/, logs/train.jsonl}``
and prints the final checkpoint, ready for ``python test_vllm_edit.py -ckpt PATH``. See the README.
"""
from training.options import build_parser, resolve_options
from utils.errors import cli_main


@cli_main
def main(argv=None):
    """Parse ``argv`` (default: sys.argv), train, and return the TrainResult. Bad input or a failing
    environment prints one ``error:`` line and exits with code 2 (SystemExit), before anything is written."""
    args = build_parser().parse_args(argv)
    opts, ckpt, saved = resolve_options(args)
    from training.checkpoint import is_checkpoint_folder
    from training.loop import train
    # -lkpt naming the run folder means "its latest checkpoint", re-checked once the run is locked
    return train(opts, ckpt, saved, resume_latest=ckpt is not None and not is_checkpoint_folder(args.load_ckpt_path))


if __name__ == "__main__":
    main()
