"""Error bars: train (trainable editors) and evaluate an editor once per seed; report mean ± std.

    python -m scripts.seeds -en liveedit -mn tiny-blip2 -dn SYNTH-EVQA --seeds 0,1,2 --eval_at 100,1000
    python -m scripts.seeds -en liveedit -mn tiny-blip2 -dn SYNTH-EVQA --seeds 0,1,2 -sen 100 --split val

For each seed: ``train_vllm_editor.py -rs SEED`` (initialisation, data order and the editor's random
choices), then ``test_vllm_edit.py -enp seedSEED --seed SEED``; finished runs are reused, interrupted
ones resumed. Writes records/seeds/<editor>/<backbone>/<split>/<dataset>/<mode>/seeds_<...>/summary.{json,md}.
"""
import argparse

from utils.errors import UserError, cli_main


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UserError(f"{message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m scripts.seeds", description=__doc__.split("\n\n")[0])
    p.add_argument("-en", "--editor_name", required=True)
    p.add_argument("-mn", "--edit_model_name", required=True)
    p.add_argument("-dn", "--data_name", required=True, help="evaluation dataset (and training set by default)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--eval_at", help="one stream per seed, tested at these edit counts (e.g. 100,1000)")
    p.add_argument("-sen", "--sequential_edit_n", type=int, help="or: chunks of T edits")
    p.add_argument("--split", default="eval", choices=("eval", "val", "eval_large"),
                   help="evaluation split (tune on val; eval_large: SYNTH-EVQA's 10,000 records)")
    p.add_argument("-dsn", "--data_sample_n", type=int, help="first N records of the split")
    p.add_argument("--ckpt", action="append", metavar="SEED=PATH", help="use this checkpoint for SEED (no training)")
    p.add_argument("-bs", "--batch_size", type=int, default=8, help="training batch size (default 8)")
    p.add_argument("--max_steps", type=int, help="training steps (default: the config's train.max_steps)")
    p.add_argument("--train_data", help="training dataset (default: -dn)")
    p.add_argument("--train_n", type=int, help="first N training records")
    p.add_argument("--config", help="editor config YAML for training (default configs/<editor>/<backbone>.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="evaluate with one editor config key overridden (test_vllm_edit.py --set), e.g. "
                        "max_kept=2 over checkpoints trained before the key; repeatable")
    p.add_argument("--eval_batch_size", type=int)
    p.add_argument("-dvc", "--device")
    p.add_argument("--records_dir")
    p.add_argument("--data_dir")
    p.add_argument("--model_path")
    return p


@cli_main
def main(argv=None):
    from evaluation.seeds import run_seeds
    return run_seeds(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
