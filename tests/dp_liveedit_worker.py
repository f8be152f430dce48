"""One process of the data-parallel LiveEdit check (tests/test_liveedit_objective.py).

    python tests/dp_liveedit_worker.py RANK WORLD PORT BACKBONE_DIR RECORDS_JSON OUT_DIR [NEGATIVE_POOL]

Joins a gloo group, takes its contiguous share of the records (training.data.shard), computes
LiveEdit's loss terms scaled by its share (as the training loop does) and their gradients, and
writes them to OUT_DIR/rank<RANK>.pt. With WORLD 1 it is the single-process reference. With a
NEGATIVE_POOL, a first step on the records in reverse order fills each process's pool."""
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from backbones import BACKBONES  # noqa: E402
from editors.liveedit import LiveEdit, LiveEditConfig, LiveEditTrain  # noqa: E402
from training.data import shard  # noqa: E402
from vl_datasets.records import EditRecord, Sample  # noqa: E402


def main(rank, world, port, backbone_dir, records_json, out_dir, negative_pool=0):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    bb = BACKBONES.get("tiny-blip2").load("tiny-blip2", backbone_dir)
    cfg = LiveEditConfig(edit_layer=2, d_m=32, heads=4, rank=4, n_queries=4, scale=5.0, seed=11,
                         train=LiveEditTrain(lr=1e-3, lr_cut_step=None), negative_pool=negative_pool)
    ed = LiveEdit(bb, cfg)
    records = [EditRecord(i, **{k: Sample(*v) for k, v in r.items()}) for i, r in
               enumerate(json.loads(Path(records_json).read_text()))]
    if negative_pool:
        with torch.no_grad():
            ed.training_losses(shard(records[::-1], rank, world)[0])
    mine, weight = shard(records, rank, world)
    terms = ed.training_losses(mine)
    total = sum(terms.values()) * weight
    total.backward()
    out = {"terms": {k: float(v.detach()) * weight for k, v in terms.items()},
           "grads": {n: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
                     for n, p in ed.net.named_parameters()}}
    torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    a = sys.argv[1:]
    main(int(a[0]), int(a[1]), int(a[2]), a[3], a[4], a[5], int(a[6]) if len(a) > 6 else 0)
