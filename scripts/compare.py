"""Every editor on one backbone and dataset, run the same way, in one table (see evaluation/compare.py).

    python -m scripts.compare -mn tiny-blip2 -dn SYNTH-EVQA --editors all --eval_at 1,10,100,1000 [--seeds 0,1,2]
    python -m scripts.compare -mn tiny-blip2 -dn SYNTH-EVQA,SYNTH-EIC,SYNTH-VLKEB --update_readme   # make compare

Writes records/compare/<backbone>/<dataset>/{table.md, table.csv, curves.png}.
"""
from utils.errors import cli_main


@cli_main
def main(argv=None):
    from evaluation.compare import main as run
    return run(argv)


if __name__ == "__main__":
    main()
