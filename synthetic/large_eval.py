"""SYNTH-EVQA's large eval split ``eval_large`` (issue 15): one edit stream of 10,000 records.

    python -m synthetic.world --large_eval 10000          # the world first if needed, then the split
    python test_vllm_edit.py -en liveedit -mn tiny-blip2 -dn SYNTH-EVQA --split eval_large \\
        --eval_at 1,10,100,1000,10000 -ckpt ...           # also generates it on first use

An addition to a complete world, generated on demand: no file of the world changes (the train / val /
eval files, their images, the pretraining corpus, ``world.json``), so the tiny backbones, whose build
identity hashes the pretraining corpus, stay current and every figure measured on ``eval`` stays valid.
It writes, under the world folder:

    easy-edit-mm/vqa/vqa_eval_large.json     the records (SYNTH-EVQA schema, read by vl_datasets)
    easy-edit-mm/images/eval_large/*.png     the images it needs that the world does not have
    eval_large.json                          its manifest, written last (marks it complete): sizes and,
                                             per record, [entity id, question type, pass, fact index]

Entities. The edit entities that no train or val record of any dataset uses: the eval entities and
the "extra" entities (pretrained like every entity, never in a dataset), without the extras whose
colour signature is reserved for m_loc images (an edit on one would make m_loc images look edited).
Default world: 1,000 eval + 1,748 extra = 2,748 entities on 656 colour signatures.

Facts. SYNTH-EVQA asks three questions about an image (:data:`VQA_TYPES`: the colour of the shape,
of the background, of the frame), so an entity carries three facts; each gets its own
counterfactual target (three distinct colours, none of the image's). A *fact* is an (entity, question
type) pair, and no fact appears twice with different targets: 3 x 2,748 = 8,244 distinct facts.
Records of one entity share its edit image (render 0) and rephrased image (render 1): they differ by
the question, so routing must tell them apart by the prompt (the regular eval split never asks this:
one record per entity).

Order. Facts are dealt round-robin over (colour signature, question type) pairs: the first 1,968
records (656 signatures x 3 questions) edit distinct (signature, question) pairs on distinct entities,
any 656 consecutive ones of them distinct signatures (as in the eval split, consecutive records differ
in colours). Later rounds edit the other entities of a signature: for the tiny backbones, which see
mostly the colours (the shape partly: tiny-blip2's held-out SYNTH-VLKEB token accuracy, where the city
needs the shape, is 61%), such a record asks the same question about a same-coloured image as an
earlier one with another target, and only the shape tells the two apart. Records with such a twin
earlier or later in the stream prefix: none up to 1,968 edits, 56 of 2,000, 4,727 of 5,000, 9,982 of
10,000 (the eval split has 174 of its 1,000).
The manifest names each record's entity, so metrics can be split by round.

Re-edits. 10,000 > 8,244: records past the distinct facts ("pass" 1, 2, ...) repeat the facts in the
same order with the SAME target, on new renders of the entity (k = :data:`LARGE_RENDER` + 2(p - 1)
for the edit image, + 1 for the rephrased one, never pretrained nor any other dataset's) and with fresh
question templates and locality samples. A re-edit never contradicts its first edit, but its fact is
already edited when it comes: at 10,000 edits the last 1,756 records (17.6%) are re-edits, which
makes Rel / T-Gen / M-Gen easier for them; any prefix up to 8,244 holds only distinct facts. Locality
is unaffected (M-Loc images: render 0 of the m_loc pool, random as in the eval split; T-Loc: a
trained template of a random text fact).

Deterministic in the world's seed; N records are the first N of any larger N. Images are written
one file at a time under a temporary name and renamed (an interrupted run resumes: existing ones are
kept), then the records file and last the manifest, each atomically. SYNTH-EIC (one question per
entity: 2,748 distinct facts) and SYNTH-VLKEB (two: 5,496) would be mostly re-edits at 10,000, so the
split exists for SYNTH-EVQA only.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from pathlib import Path

from synthetic import world as W
from utils.io import atomic_path, remove_temporaries
from utils.locks import build_once

SPLIT = "eval_large"
DEFAULT_RECORDS = 10_000
RECORDS_FILE = "easy-edit-mm/vqa/vqa_eval_large.json"   # relative to the world (vl_datasets names it too)
IMAGE_ROOT = "easy-edit-mm/images"
IMAGE_DIR = "eval_large"                                  # new images, under IMAGE_ROOT
MANIFEST = "eval_large.json"
FORMAT = "liveedit-synthetic-eval-large"
FORMAT_VERSION = 1
# First render index of the re-edit images: never pretrained (k = 2 .. 1 + pretrain_renders), not the
# datasets' (0, 1) nor the general set's (W.GENERAL_RENDER = 1000).
LARGE_RENDER = 2000


# ----------------------------------------------------------------------------- plan


def entity_pool(b: W._Builder) -> list[int]:
    """Entity indices the split may edit: eval entities and extras with a non-reserved signature."""
    reserved = set(b.reserved)
    pool = sorted(set(b.eval) | {i for i in b.extra if b.ents[i].signature not in reserved})
    taken = set(b.train) | set(b.val) | set(b.loc)
    if taken & set(pool):  # _split_universe deals disjoint pools; a change there must not leak here
        raise AssertionError("eval_large entity pool overlaps train / val / m_loc entities")
    return pool


def fact_order(b: W._Builder) -> list[tuple[int, str]]:
    """Every (entity index, question type) fact of :func:`entity_pool`, once, in stream order."""
    rng = random.Random(f"{b.cfg.seed}:{SPLIT}:order")
    by_sig: dict[tuple, list[int]] = {}
    for i in entity_pool(b):
        by_sig.setdefault(b.ents[i].signature, []).append(i)
    sigs = sorted(by_sig)
    rng.shuffle(sigs)
    members = {s: rng.sample(by_sig[s], len(by_sig[s])) for s in sigs}
    qtypes = {s: rng.sample(W.VQA_TYPES, len(W.VQA_TYPES)) for s in sigs}
    out = []
    for r in range(max((len(m) for m in members.values()), default=0)):
        for j in range(len(W.VQA_TYPES)):
            for s in sigs:
                m = members[s]
                if r < len(m):   # over the rounds, slot j of s takes every member once
                    out.append((m[(r + j) % len(m)], qtypes[s][j]))
    return out


def fact_targets(b: W._Builder, facts) -> dict[tuple[int, str], str]:
    """The counterfactual target of each fact: an entity's three questions get three distinct
    colours, none of the image's colours."""
    rng = random.Random(f"{b.cfg.seed}:{SPLIT}:alt")
    out = {}
    for idx in sorted({i for i, _ in facts}):
        e = b.ents[idx]
        cands = [c for c in W.COLORS if c not in e.signature]
        for qt, alt in zip(W.VQA_TYPES, rng.sample(cands, len(W.VQA_TYPES))):
            out[(idx, qt)] = alt
    return out


def build_records(b: W._Builder, n: int, world_dir: Path):
    """``(records, provenance, new renders)`` of an ``n``-record split; new renders map
    ``(entity index, k)`` to the image path (relative to :data:`IMAGE_ROOT`) to write."""
    if n < 1:
        raise ValueError(f"the large eval split needs at least 1 record, got {n}")
    facts = fact_order(b)
    if not facts:
        raise ValueError("the world has no entity outside train / val for a large eval split")
    targets = fact_targets(b, facts)
    images = Path(world_dir) / IMAGE_ROOT
    in_eval = set(b.eval)
    new: dict[tuple[int, int], str] = {}

    def image(idx: int, k: int) -> str:
        """An existing image of the world when it has this render, else a new one in IMAGE_DIR."""
        eid = b.ents[idx].id
        if k == 0 and idx in in_eval:
            rel = f"eval/{eid}_0.png"
        elif k == 1 and idx in in_eval:
            rel = f"rephrase/{eid}_1.png"
        elif k == 0 and (images / "loc" / f"{eid}_0.png").is_file():   # an m_loc pool render
            rel = f"loc/{eid}_0.png"
        else:
            rel = new.setdefault((idx, k), f"{IMAGE_DIR}/{eid}_{k}.png")
        if not rel.startswith(IMAGE_DIR) and not (images / rel).is_file():
            raise FileNotFoundError(f"the world in {world_dir} lacks {images / rel}; regenerate it "
                                    f"(python -m synthetic.world --force)")
        return rel

    rng = random.Random(f"{b.cfg.seed}:evqa:{SPLIT}")
    records, provenance = [], []
    for i in range(n):
        p, f = divmod(i, len(facts))
        idx, qt = facts[f]
        e = b.ents[idx]
        k = 0 if p == 0 else LARGE_RENDER + 2 * (p - 1)
        src, reph = rng.sample(W.VQA_QUESTIONS[qt], 2)
        loc, loc_ans = b._loc(rng, W.NQ_PREFIX)
        le = b.ents[rng.choice(b.loc)]
        mqt = rng.choice(W.VQA_TYPES)
        records.append({
            "src": src, "rephrase": reph, "pred": W.vqa_answer(e, qt), "alt": targets[(idx, qt)],
            "image": image(idx, k), "image_rephrase": image(idx, k + 1),
            "loc": loc, "loc_ans": loc_ans,
            "m_loc": image(le.idx, 0), "m_loc_q": rng.choice(W.VQA_QUESTIONS[mqt]),
            "m_loc_a": W.vqa_answer(le, mqt),
        })
        provenance.append([e.id, qt, p, f])
    return records, provenance, new


# ----------------------------------------------------------------------------- files


def _render_tasks(args) -> int:
    """Worker: render ``[(entity tuple, k, absolute path)]``, each into a temporary file renamed
    into place (a killed run leaves no half-written PNG under a real name)."""
    seed, size, tasks = args
    for ent_t, k, path in tasks:
        data = W._png_bytes(W.render_entity(W.Entity(*ent_t), k, seed, size))
        path = Path(path)
        tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return len(tasks)


def _render(b: W._Builder, world_dir: Path, new: dict, workers: int, progress: bool) -> int:
    folder = Path(world_dir) / IMAGE_ROOT / IMAGE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    remove_temporaries(folder)   # only this split writes there
    todo = [(W.astuple_entity(b.ents[idx]), k, str(folder.parent / rel))
            for (idx, k), rel in sorted(new.items()) if not (folder.parent / rel).is_file()]
    W.run_render_tasks(_render_tasks, todo, b.cfg.seed, b.cfg.image_size, workers, progress,
                       desc="render eval_large")
    return len(todo)


def _world_identity(manifest: dict) -> dict:
    return {"format_version": manifest.get("format_version"), "seed": manifest.get("seed"),
            "config": manifest.get("config")}


def _dump_manifest(path: Path, meta: dict, provenance: list) -> None:
    """The manifest with one compact line per record of ``per_record``."""
    head = json.dumps(meta, ensure_ascii=False, indent=1, sort_keys=True)
    rows = ",\n".join(json.dumps(r) for r in provenance)
    with atomic_path(path) as tmp:
        tmp.write_text(f'{head[:-2]},\n "per_record": [\n{rows}\n ]\n}}\n', encoding="utf-8")


def read_manifest(world_dir) -> dict | None:
    """The split's manifest, or None when ``world_dir`` holds no complete one."""
    try:
        with open(Path(world_dir) / MANIFEST, encoding="utf-8") as f:
            m = json.load(f)
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None
    return m if isinstance(m, dict) and m.get("format") == FORMAT else None


def is_complete(world_dir, n: int | None = None) -> bool:
    """Whether ``world_dir`` holds the split (of ``n`` records; any size when None) for its world."""
    world_dir = Path(world_dir)
    m, wm = read_manifest(world_dir), W.read_manifest(world_dir)
    return (m is not None and wm is not None and m.get("format_version") == FORMAT_VERSION
            and m.get("world") == _world_identity(wm) and (n is None or m.get("records") == n)
            and (world_dir / RECORDS_FILE).is_file())


def generate(world_dir, n: int = DEFAULT_RECORDS, workers: int = 1, progress: bool = True) -> dict:
    """Write the ``n``-record split into the complete world ``world_dir`` (replacing another size);
    returns its manifest without ``per_record``. Hold the world's build lock
    (:func:`utils.locks.build_lock`, as :func:`ensure` does) when other processes may use it."""
    world_dir = Path(world_dir).absolute()
    wm = W.read_manifest(world_dir)
    if wm is None or wm.get("format_version") != W.FORMAT_VERSION:
        raise FileNotFoundError(f"no complete synthetic world (format {W.FORMAT_VERSION}) in {world_dir}: "
                                f"generate it first (python -m synthetic.world --out {world_dir})")
    t0 = time.perf_counter()
    b = W._Builder(W.WorldConfig(**wm["config"]))
    records, provenance, new = build_records(b, n, world_dir)
    rendered = _render(b, world_dir, new, workers, progress)
    remove_temporaries((world_dir / RECORDS_FILE).parent, Path(RECORDS_FILE).name)
    remove_temporaries(world_dir, MANIFEST)
    with atomic_path(world_dir / RECORDS_FILE) as tmp:
        W._dump_records(tmp, records)
    n_facts = len(fact_order(b))
    pool = entity_pool(b)
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "dataset": "SYNTH-EVQA", "split": SPLIT,
        "world": _world_identity(wm), "file": RECORDS_FILE, "image_root": IMAGE_ROOT,
        "records": n, "distinct_facts": min(n, n_facts), "re_edits": max(0, n - n_facts),
        "facts_available": n_facts,
        "entities": {"available": len(pool), "eval": len(set(pool) & set(b.eval)),
                     "extra": len(set(pool) - set(b.eval)),
                     "used": len({r[0] for r in provenance})},
        "signatures": len({b.ents[i].signature for i in pool}),
        "new_images": {"folder": f"{IMAGE_ROOT}/{IMAGE_DIR}", "files": len(new)},
        "renders": {"edit": "0 (pass 0), LARGE_RENDER + 2 (pass - 1) after", "rephrase": "edit + 1",
                    "LARGE_RENDER": LARGE_RENDER},
        "per_record_fields": ["entity", "question_type", "pass", "fact"],
    }
    _dump_manifest(world_dir / MANIFEST, meta, provenance)   # last: marks the split complete
    if progress:
        size = (world_dir / RECORDS_FILE).stat().st_size
        print(f"eval_large: {n} SYNTH-EVQA records ({meta['distinct_facts']} distinct facts, "
              f"{meta['re_edits']} re-edits) on {meta['entities']['used']} entities in {world_dir}; "
              f"{rendered} images rendered ({len(new)} new in all); records file {size / 2**20:.1f} MiB; "
              f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return meta


def ensure(world_dir, n: int | None = None, workers: int = 1, progress: bool = True) -> Path:
    """Return ``world_dir`` holding the split: of ``n`` records, or of any size when ``n`` is None
    (:data:`DEFAULT_RECORDS` when there is none). The world must be complete
    (:func:`synthetic.world.ensure_world`). Concurrent callers generate once (the world's build lock)."""
    world_dir = Path(world_dir).absolute()
    build_once(world_dir, lambda: is_complete(world_dir, n),
               lambda: generate(world_dir, n or DEFAULT_RECORDS, workers, progress),
               f"the large eval split in {world_dir}")
    return world_dir
