"""Where LiveEdit's routing goes as the repository grows: one stream of edits, and at each point, for
the queries of every record edited so far,

- how many experts pass hard filtering, for edit images (Rel), rephrased images (M-Gen) and unrelated
  images (M-Loc);
- how often the record's own expert passes, and the share of the soft-routing weight it gets;
- for M-Loc images, how often any expert passes (a leak: the unedited model is changed).

    python -m scripts.routing_stats -mn tiny-blip2 -dn SYNTH-EVQA --split val -ckpt records/liveedit/.../run \\
        --points 10,100,1000

Errors of a growing repository come either from experts leaking into unrelated images (M-Loc falls,
"leak" rises) or from the own expert being drowned (own kept but its weight share falls). On a
synthetic dataset it also says which experts leak: how many of the picture's attributes (shape
colour, background, frame) each leaked expert's edit image shares with the unrelated image, against
the rate of random pairs (``near_misses``).
"""
import argparse
import collections
import json
import random
import re
import sys
from pathlib import Path

import torch

from utils.errors import UserError, cli_main
from utils.io import write_text

KINDS = (("Rel", "edit"), ("M-Gen", "image_rephrase"), ("M-Loc", "image_loc"))


@torch.no_grad()
def routing_of(editor, samples, batch_size=16):
    """Per sample, (indices [m] of the experts it keeps, their weights [m]) against the current
    repository. Sparse, so that 10,000 queries against 10,000 experts stay small."""
    bb, out = editor.backbone, []
    for i in range(0, len(samples), batch_size):
        batch = bb.encode(samples[i:i + batch_size], with_targets=False)
        rows, (cols, w, k) = editor.route_kept(bb.hidden_at(batch, editor.layer), batch)
        assert len(rows) == batch.has_image.sum()
        out += [(cols[k[j]].cpu(), w[j, k[j]].cpu()) for j in range(len(rows))]
    return out


def point_stats(editor, records, attributes_of=None) -> dict:
    """Routing figures of every kind of query against the current repository; with
    ``attributes_of`` (synthetic datasets) also the M-Loc leaks' ``near_misses``."""
    out = {"n_edits": len(records)}
    for name, kind in KINDS:
        routed = routing_of(editor, [getattr(r, kind) for r in records])
        counts = torch.tensor([len(c) for c, _ in routed], dtype=torch.float64)
        row = {"kept_mean": float(counts.mean()), "any_kept": float((counts > 0).double().mean())}
        if name != "M-Loc":
            shares, tops = [], []
            for own, (cols, w) in enumerate(routed):   # record i's edit is expert i
                hit = (cols == own).nonzero().flatten()
                if hit.numel():
                    shares.append(float(w[hit[0]] / w.sum().clamp(min=1e-12)))
                    tops.append(float(w.argmax() == hit[0]))
            row.update(own_kept=len(shares) / len(routed),
                       own_weight_share=sum(shares) / len(shares) if shares else 0.0,
                       own_top=sum(tops) / len(tops) if tops else 0.0)
        elif attributes_of is not None:
            row["near_misses"] = near_misses(records, [cols for cols, _ in routed], attributes_of)
        out[name] = row
    return out


ATTRIBUTES = ("color", "background", "frame")


def near_misses(records, leaked_experts, attributes_of) -> dict:
    """For the M-Loc queries' leaked experts (``leaked_experts[i]``: the indices of the experts that
    record i's unrelated image keeps): the share of (query, leaked expert)
    pairs by how many ``ATTRIBUTES`` the two images share, beside the share among random pairs.
    ``attributes_of(image_path)`` gives an image's attribute tuple, or None for a picture of no entity
    (such pairs are left out)."""
    def shared(path_a, path_b):
        a, b = attributes_of(path_a), attributes_of(path_b)
        return None if a is None or b is None else sum(x == y for x, y in zip(a, b))

    leaked = collections.Counter()
    for i, r in enumerate(records):
        for k in leaked_experts[i].tolist():
            n = shared(r.image_loc.image, records[k].edit.image)
            if n is not None:   # pictures of no entity (e.g. VLKEB's) are left out
                leaked[n] += 1
    rng, chance = random.Random(0), collections.Counter()
    for _ in range(20000):
        n = shared(rng.choice(records).image_loc.image, rng.choice(records).edit.image)
        if n is not None:
            chance[n] += 1
    total = max(1, sum(leaked.values()))
    return {"pairs": sum(leaked.values()),
            "shared": {n: round(leaked[n] / total, 3) for n in range(len(ATTRIBUTES) + 1)},
            "random": {n: round(chance[n] / max(1, sum(chance.values())), 3) for n in range(len(ATTRIBUTES) + 1)}}


def synthetic_attributes(world_dir: Path):
    """image path -> (colour, background, frame) of its entity (file names start with the entity id)."""
    entities = {e["id"]: tuple(e[a] for a in ATTRIBUTES) for e in json.loads((world_dir / "entities.json").read_text())}

    def attributes_of(path) -> tuple | None:
        found = re.search(r"(e\d+)_", Path(str(path)).name)
        return entities.get(found.group(1)) if found else None   # None: not an entity's picture
    return attributes_of


def table(rows) -> str:
    head = ("edits | Rel kept | Rel own kept | Rel own share | Rel own top | M-Gen kept | M-Gen own kept | "
            "M-Gen own share | M-Loc kept | M-Loc leak")
    lines = ["| " + head + " |", "|" + "---|" * (head.count("|") + 1)]
    for r in rows:
        rel, gen, loc = r["Rel"], r["M-Gen"], r["M-Loc"]
        cells = [r["n_edits"], f"{rel['kept_mean']:.2f}", f"{100 * rel['own_kept']:.1f}",
                 f"{100 * rel['own_weight_share']:.1f}", f"{100 * rel['own_top']:.1f}", f"{gen['kept_mean']:.2f}",
                 f"{100 * gen['own_kept']:.1f}", f"{100 * gen['own_weight_share']:.1f}",
                 f"{loc['kept_mean']:.2f}", f"{100 * loc['any_kept']:.1f}"]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


@cli_main
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-mn", "--edit_model_name", default="tiny-blip2")
    p.add_argument("-dn", "--data_name", default="SYNTH-EVQA")
    p.add_argument("--split", default="val", choices=("val", "eval", "eval_large"),
                   help="records to edit and query (eval_large: SYNTH-EVQA's 10,000 records)")
    p.add_argument("-ckpt", "--checkpoint", required=True)
    p.add_argument("--points", default="10,100,1000")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the checkpoint's saved config, e.g. max_kept=1 (test_vllm_edit.py --set)")
    p.add_argument("--edit_batch", type=int, default=100, help="edits appended per call (100)")
    p.add_argument("--out", help="write the rows as JSON here")
    p.add_argument("--data_dir")
    p.add_argument("--model_path")
    a = p.parse_args(argv)
    from backbones import load_backbone, resolve_backbone_name
    from editors.liveedit import LiveEdit
    from evaluation.checkpoints import check_checkpoint, load_checkpoint, saved_editor_config
    from utils.config import from_dict, with_overrides
    from vl_datasets import load_dataset

    try:
        points = sorted({int(x) for x in a.points.split(",")})
    except ValueError:
        raise UserError(f"--points must be comma-separated integers, got {a.points!r}") from None
    from synthetic.embedded import prepare_backbone, prepare_dataset
    backbone = resolve_backbone_name(a.edit_model_name)
    prepare_dataset(a.data_name, a.data_dir)             # the embedded default is built on first use
    model_path = prepare_backbone(backbone, a.model_path)
    weights = check_checkpoint(a.checkpoint, "liveedit", backbone)
    saved, source = saved_editor_config(weights)
    if a.edit_batch < 1:
        raise UserError(f"--edit_batch must be a positive integer, got {a.edit_batch}")
    if saved is None:
        raise UserError(f"checkpoint {weights} has no saved editor config")
    records = load_dataset(a.data_name, a.split, a.data_dir, limit=points[-1])
    if len(records) < points[-1]:
        raise UserError(f"--points {points[-1]} exceeds the {len(records)} records of {a.data_name} {a.split}")
    config = from_dict(LiveEdit.config_class, saved, f"{source}: editor_config")
    if a.set:
        config, changed = with_overrides(LiveEdit.config_class, config, a.set)
        print("note: --set " + ", ".join(f"{k}={new!r} (was {old!r})" for k, old, new in changed), file=sys.stderr)
    editor = LiveEdit(load_backbone(backbone, "cpu", model_path if a.model_path else None), config)
    load_checkpoint(editor, weights)
    editor.eval()
    from utils.GLOBAL import DATA_DIR
    world_dir = (Path(a.data_dir) if a.data_dir else DATA_DIR) / "synthetic"
    attributes_of = synthetic_attributes(world_dir) if a.data_name.startswith("SYNTH") else None
    rows, done = [], 0
    for n in points:
        for i in range(done, n, a.edit_batch):
            editor.edit_batch([r.edit for r in records[i:min(n, i + a.edit_batch)]])
        done = n
        rows.append(point_stats(editor, records[:n], attributes_of))
        print(f"{n} edits: {json.dumps(rows[-1])}", file=sys.stderr)
    print(table(rows))
    for r in rows:
        nm = r["M-Loc"].get("near_misses")
        if nm:
            print(f"{r['n_edits']} edits: {nm['pairs']} leaked (M-Loc image, expert) pairs; share by attributes "
                  f"shared (of {', '.join(ATTRIBUTES)}): {nm['shared']}; random pairs: {nm['random']}")
    if a.out:
        write_text(Path(a.out), json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
