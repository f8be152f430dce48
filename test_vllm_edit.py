"""Lifelong knowledge editing evaluation of a vision-language model.

    python test_vllm_edit.py -en ft-l -mn blip2 -dn EVQA -sen 1000 -dvc cuda:0
    python test_vllm_edit.py -en liveedit -mn llava -dn VLKEB -sen 100 -ckpt records/liveedit/.../checkpoint
    python test_vllm_edit.py -en none -mn tiny-blip2 -dn SYNTH-EVQA --eval_at 1,10,100

Writes results.json, mean_results.json and the resolved config under
records/<editor>/<backbone>/<split>/<DATASET>[-postfix]/<mode>/ (see the README).
"""
from utils.errors import cli_main


@cli_main
def main(argv=None):
    """Parse ``argv`` (default: sys.argv) and run the evaluation; returns what ``evaluation.cli.main``
    returns. Bad input or a failing environment prints one ``error:`` line and exits with code 2."""
    from evaluation.cli import main as run
    return run(argv)


if __name__ == "__main__":
    main()
