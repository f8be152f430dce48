"""Lifelong knowledge editing evaluation of a vision-language model.

    python test_vllm_edit.py -en ft-l -mn blip2 -dn EVQA -sen 1000 -dvc cuda:0
    python test_vllm_edit.py -en liveedit -mn llava -dn VLKEB -sen 100 -ckpt records/liveedit/.../checkpoint
    python test_vllm_edit.py -en none -mn tiny-blip2 -dn SYNTH-EVQA --eval_at 1,10,100

Writes results.json, mean_results.json and the resolved config under
records/<editor>/<backbone>/eval/<DATASET>[-postfix]/sequential_edit_<T>/ (see evaluation/README.md).
"""
from utils.errors import cli_main


def main(argv=None):
    from evaluation.cli import main as run
    return run(argv)


if __name__ == "__main__":
    cli_main(main)()
