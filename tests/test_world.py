"""Tests of the synthetic world generator (small worlds, a few seconds in all)."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from synthetic import world as W

SMALL = dict(n_train=14, n_eval=7, n_val=5, n_loc=4, pretrain_renders=1, extra_entities=3,
             n_heldout_renders=4)


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _eid(path: str) -> str:
    """Entity id of an image path of either layout (``eval/e0123_0.png``, ``e0123/render_0.png``),
    relative to its image root or to the world (``pretrain/images/e0123_2.png``)."""
    parts = path.split("/")
    return parts[-2] if parts[-1].startswith("render_") else parts[-1].split("_")[0]


# Every paraphrase list of the world: (kind, question type) -> templates.
LISTS = {
    **{("vqa", t): W.VQA_QUESTIONS[t] for t in W.VQA_TYPES},
    ("caption", "caption"): W.CAPTION_PROMPTS,
    **{("vlkeb", t): W.VLKEB_QUESTIONS[t] for t in ("city", "country")},
}


def _template(ex: dict) -> tuple[tuple[str, str], str]:
    """(list, template) of a pretraining / held-out image example."""
    q = ex["prompt"].removesuffix(" The answer is:")
    key = next(k for k, qs in LISTS.items() if k[0] == ex["kind"] and q in qs)
    return key, q


@pytest.fixture(scope="module")
def small_world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world") / "synthetic"
    return W.ensure_world(out, seed=0, workers=1, progress=False, **SMALL)


def _datasets(root: Path):
    for name in W.DATASET_FILES:
        recs, img_root = W.load_dataset(root, name)
        yield name, recs, img_root


def _entities(root: Path) -> dict[str, dict]:
    return {e["id"]: e for e in json.loads((root / "entities.json").read_text())}


def _sig(e: dict) -> tuple[str, str, str]:
    return (e["color"], e["background"], e["frame"])


# ----------------------------------------------------------------------------- determinism


def test_same_seed_is_byte_identical(small_world, tmp_path):
    # the second world uses a process pool: output must not depend on the worker count
    again = W.generate_world(tmp_path / "again", W.WorldConfig(seed=0, **SMALL), workers=2,
                             progress=False)
    a, b = _tree(small_world), _tree(again)
    assert sorted(a) == sorted(b)
    assert any(k.endswith(".png") for k in a) and any(k.endswith(".json") for k in a)
    diff = [k for k in a if a[k] != b[k]]
    assert diff == []


def test_other_seed_gives_other_world(small_world, tmp_path):
    other = W.generate_world(tmp_path / "seed1", W.WorldConfig(seed=1, **SMALL), workers=1,
                             progress=False)
    for rel, _ in W.DATASET_FILES.values():
        assert (small_world / rel).read_bytes() != (other / rel).read_bytes(), rel
    e = W.build_world(0).entities[5]
    assert W.render_entity(e, 3, seed=0).tobytes() != W.render_entity(e, 3, seed=1).tobytes()
    assert W.build_world(0).cities != W.build_world(1).cities


def test_renders_differ_and_are_deterministic():
    e = W.build_world(0).entities[123]
    r0, r1 = W.render_entity(e, 0, 0), W.render_entity(e, 1, 0)
    assert r0.size == (64, 64) and r0.mode == "RGB"
    assert r0.tobytes() == W.render_entity(e, 0, 0).tobytes()
    assert r0.tobytes() != r1.tobytes()  # a rephrased image is another render


def test_png_has_no_metadata(small_world):
    png = next((small_world / "easy-edit-mm/images/train").glob("*.png"))
    data = png.read_bytes()
    for chunk in (b"tIME", b"tEXt", b"iTXt", b"zTXt"):
        assert chunk not in data


# ----------------------------------------------------------------------------- schema


def test_schema_and_paths(small_world):
    sizes = {"train": SMALL["n_train"], "eval": SMALL["n_eval"], "val": SMALL["n_val"]}
    for name, recs, img_root in _datasets(small_world):
        assert len(recs) == sizes[name.split("_")[1]], name
        for r in recs:
            # SYNTH-VLKEB adds VLKEB's one-hop portability list (format 10)
            extra = {"port_new"} if name.startswith("vlkeb") else set()
            assert set(r) == set(W.RECORD_KEYS) | extra, (name, r)
            for key in W.RECORD_KEYS:
                assert isinstance(r[key], str) and r[key].strip() == r[key] and r[key], (name, key)
            for key in ("image", "image_rephrase", "m_loc"):
                assert (img_root / r[key]).is_file(), (name, key, r[key])
                assert not r[key].startswith("/")
            assert r["alt"] != r["pred"], (name, r)
            assert r["src"] != r["rephrase"], (name, r)
            assert r["image"] != r["image_rephrase"]
            assert _eid(r["image"]) == _eid(r["image_rephrase"])  # same content, another render
            assert _eid(r["m_loc"]) != _eid(r["image"])
            if name.startswith("vlkeb"):
                assert not r["loc"].startswith("nq question:")
            else:
                assert r["loc"].startswith("nq question: ")
            assert not r["loc"].endswith("?")


def test_layout_matches_real_data(small_world):
    assert (small_world / "easy-edit-mm/vqa/vqa_train.json").is_file()
    assert (small_world / "easy-edit-mm/vqa/vqa_eval.json").is_file()
    assert (small_world / "easy-edit-mm/caption/caption_train_edit.json").is_file()
    assert (small_world / "easy-edit-mm/caption/caption_eval_edit.json").is_file()
    assert (small_world / "VLKEB/train.json").is_file() and (small_world / "VLKEB/eval.json").is_file()
    recs, _ = W.load_dataset(small_world, "vlkeb_train")
    assert all(r["image"].split("/")[1].startswith("render_") for r in recs)
    assert (small_world / "VLKEB/mmkb_images" / recs[0]["image"]).is_file()
    m = W.read_manifest(small_world)
    assert m["seed"] == 0 and m["config"]["n_train"] == SMALL["n_train"]


def test_real_schema_sample_keys_match():
    samples = Path("/work/shared/data/schema-samples")
    if not samples.is_dir():
        pytest.skip("no schema samples on this machine")
    for f in samples.glob("*.json"):
        for r in json.loads(f.read_text()):  # VLKEB's portability files add port_new
            assert set(r) - {"port_new"} == set(W.RECORD_KEYS), f


def test_train_eval_entities_disjoint(small_world):
    train_ids, eval_ids, loc_ids = set(), set(), set()
    for name, recs, _ in _datasets(small_world):
        ids = [_eid(r["image"]) for r in recs]
        (train_ids if name.endswith("train") else eval_ids).update(ids)
        loc_ids.update(_eid(r["m_loc"]) for r in recs)
        # one distinct entity per record within a split (the pools are large enough here)
        assert len(set(ids)) == len(ids), name
    assert train_ids and eval_ids
    assert not train_ids & eval_ids
    assert not loc_ids & (train_ids | eval_ids)  # m_loc images are never edited


def test_answers_true_and_alt_plausible(small_world):
    ents = _entities(small_world)
    for e in W.all_entities()[::211]:  # colour alts: any colour but the image's three
        alts = {W.vqa_alt(random.Random(f"a{i}"), e) for i in range(60)}
        assert alts == set(W.COLORS) - {e.color, e.background, e.frame}, (e, alts)
    recs = W.load_dataset(small_world, "evqa_train")[0] + W.load_dataset(small_world, "evqa_eval")[0]
    for r in recs:
        e = ents[_eid(r["image"])]
        qtype = next(t for t, qs in W.VQA_QUESTIONS.items() if r["src"] in qs)
        assert r["rephrase"] in W.VQA_QUESTIONS[qtype] and r["rephrase"] != r["src"]
        assert r["pred"] == e[qtype]
        assert r["alt"] in W.COLORS and r["alt"] not in _sig(e)
        le = ents[_eid(r["m_loc"])]
        mtype = next(t for t, qs in W.VQA_QUESTIONS.items() if r["m_loc_q"] in qs)
        assert r["m_loc_a"] == str(le[mtype])
    recs, _ = W.load_dataset(small_world, "eic_train")
    for r in recs:
        e = ents[_eid(r["image"])]
        assert r["pred"] == e["caption"]
        lead, of, the, shape, in_, color = r["alt"].split()  # "sketch of the {shape} in {colour}"
        assert (lead, of, the, in_) == (W.ALT_CAPTION_LEAD, "of", "the", "in"), r["alt"]
        assert shape in W.SHAPES and shape != e["shape"], (r["alt"], e)
        assert color in W.COLORS and color not in _sig(e), (r["alt"], e)
    recs, _ = W.load_dataset(small_world, "vlkeb_eval")
    cities = {e["city"] for e in ents.values()}
    countries = {e["country"] for e in ents.values()}
    for r in recs:
        e = ents[_eid(r["image"])]
        assert r["pred"] in (e["city"], e["country"])
        assert r["alt"] in (cities if r["pred"] == e["city"] else countries)
    facts = {q: f.answer for f in W.text_facts() for q in f.train_questions}
    for name, recs, _ in _datasets(small_world):
        for r in recs:
            q = r["loc"].removeprefix("nq question: ")
            assert facts[q] == r["loc_ans"]  # a trained template of the fact


def test_vlkeb_portability_follows_from_the_edit_only(small_world):
    """Each SYNTH-VLKEB record's port question asks an attribute of the NEW city's emblem / country's
    flag (the hop), which is never what the unedited picture answers."""
    ents = _entities(small_world)
    world = W.build_world(0)
    emblem = {city: pair.split("|") for pair, city in world.cities.items()}   # city -> (shape, colour)
    flag = {country: colour for colour, country in world.countries.items()}
    for name in ("vlkeb_train", "vlkeb_eval", "vlkeb_val"):
        for r in W.load_dataset(small_world, name)[0]:
            e = ents[_eid(r["image"])]
            (item,) = r["port_new"]
            assert set(item) == {"port_edit_q", "port_edit_a", "port_q", "port_a"}
            assert item["port_a"] == item["port_edit_a"] and r["alt"] in item["port_edit_q"]
            kind = next(k for k, qs in W.PORT_QUESTIONS.items() if item["port_q"] in qs)
            if r["pred"] == e["city"]:
                shape, colour = emblem[r["alt"]]
                if kind == "emblem_color":
                    assert item["port_a"] == colour and (colour not in _sig(e) or shape == e["shape"])
                else:
                    assert kind == "emblem_shape" and item["port_a"] == shape != e["shape"]
                    assert colour in _sig(e)
            else:
                assert kind == "flag" and item["port_a"] == flag[r["alt"]] != e["background"]


def test_general_set_is_untouched_by_edits(small_world):
    ents = _entities(small_world)
    m = W.read_manifest(small_world)
    general = json.loads((small_world / W.GENERAL_FILE).read_text())
    assert m["general"]["questions"] == len(general) > 0
    edited = {_sig(ents[_eid(r["image"])]) for _, recs, _ in _datasets(small_world) for r in recs}
    pretrained_images = {ex["image"] for ex in W.load_pretrain(small_world, "train")}
    for q in general:
        e = ents[q["entity"]]
        assert e["reserved"] and _sig(e) not in edited
        assert (small_world / "general" / q["image"]).is_file()
        assert ("general/" + q["image"]) not in pretrained_images
        qtype = q["question_type"]
        assert q["question"] in W.VQA_QUESTIONS[qtype] and q["answers"] == [e[qtype]]
    assert len({(q["entity"], q["question_type"]) for q in general}) == len(general)


def test_render_shows_its_colours():
    world = W.build_world(0)
    w = W.frame_width(64)
    assert w == 6 and W.frame_width(32) == 3
    for e in world.entities[::397]:
        arr = np.asarray(W.render_entity(e, 0, 0), dtype=np.float32)
        band = np.concatenate([arr[:w].reshape(-1, 3), arr[-w:].reshape(-1, 3),
                               arr[:, :w].reshape(-1, 3), arr[:, -w:].reshape(-1, 3)])
        # every frame pixel is nearest to the frame colour (jitter and noise stay small)
        palette = np.array(list(W.COLORS.values()), np.float32)
        nearest = np.linalg.norm(band[:, None] - palette[None], axis=-1).argmin(1)
        assert (nearest == list(W.COLORS).index(e.frame)).all(), e
        assert np.linalg.norm(band.mean(0) - W.COLORS[e.frame]) < 25, e
        inner = arr[w:-w, w:-w]  # the corners inside the frame show the background
        corners = np.concatenate([inner[:3, :3].reshape(-1, 3), inner[-3:, -3:].reshape(-1, 3),
                                  inner[:3, -3:].reshape(-1, 3), inner[-3:, :3].reshape(-1, 3)])
        assert np.linalg.norm(corners.mean(0) - W.COLORS[e.background]) < 30, e
        fg_dist = np.linalg.norm(arr - np.array(W.COLORS[e.color]), axis=-1)
        assert (fg_dist < 30).sum() > 40, e  # the shape's colour is there


def test_shapes_stay_inside_the_frame():
    for e in W.build_world(0).entities[::37]:
        for size in (64, 32, 16):
            for k in range(3):
                m = W._shape_mask(e, np.random.default_rng([0, e.idx, k, 7919]), size)
                w = W.frame_width(size)
                assert m.sum() > 0
                assert m[:w].max() == m[-w:].max() == m[:, :w].max() == m[:, -w:].max() == 0, e


def test_signatures_and_frame_constraints():
    sigs = W.signatures()
    assert len(sigs) == len(set(sigs)) > 500
    for color, bg, frame in sigs:
        assert len({color, bg, frame}) == 3
        assert W._contrast(color, bg) >= W.MIN_CONTRAST
        assert W._contrast(frame, bg) >= W.MIN_CONTRAST
    ents = W.all_entities(0)
    assert [e.idx for e in ents] == list(range(len(ents)))
    by_sig: dict[tuple, list] = {}
    for e in ents:
        by_sig.setdefault(e.signature, []).append(e.shape)
    assert set(by_sig) == set(sigs)
    for sig, shapes in by_sig.items():  # by default one entity per shape
        assert sorted(shapes) == sorted(W.SHAPES) and W.WorldConfig().entities_per_signature == 8
    assert {e.frame for e in ents} == set(W.COLORS)
    assert W.all_entities(0) == ents and W.all_entities(1) != ents  # shape order from the seed
    three = W.all_entities(0, per_signature=3)
    assert len(three) == 3 * len(sigs) and len({(e.signature, e.shape) for e in three}) == len(three)
    assert len({e.shape for e in three}) == len(W.SHAPES)
    for bad in (0, len(W.SHAPES) + 1):
        with pytest.raises(ValueError):
            W.all_entities(0, per_signature=bad)


def test_mloc_signatures_never_edited(small_world):
    ents = _entities(small_world)
    m = W.read_manifest(small_world)
    reserved = {tuple(s) for s in m["entities"]["loc_signatures"]}
    n_sig = m["entities"]["signatures"]
    assert n_sig == len(W.signatures()) and abs(len(reserved) - 0.12 * n_sig) <= 1
    assert reserved == {_sig(e) for e in ents.values() if e["reserved"]}
    edit_sigs, loc_sigs = set(), set()
    for name, recs, _ in _datasets(small_world):
        edit_sigs.update(_sig(ents[_eid(r["image"])]) for r in recs)
        loc_sigs.update(_sig(ents[_eid(r["m_loc"])]) for r in recs)
    assert loc_sigs and loc_sigs <= reserved
    assert not edit_sigs & reserved and not edit_sigs & loc_sigs
    # no train / eval entity of the whole universe has a reserved signature
    assert all(not e["reserved"] for e in ents.values() if e["split"] in ("train", "eval"))
    assert all(e["reserved"] for e in ents.values() if e["split"] == "loc")


def test_default_split_covers_every_entity():
    cfg = W.WorldConfig()
    ents = W.build_world(0, cfg.entities_per_signature).entities
    train, ev, val, loc, extra, reserved = W._split_universe(cfg, ents, random.Random("0:split"))
    assert (len(train), len(ev), len(val), len(loc)) == (cfg.n_train, cfg.n_eval, cfg.n_val, cfg.n_loc)
    assert cfg.n_val >= 500
    pools = train + ev + val + loc + extra  # all pretrained (extra_entities=-1), each in one pool
    assert sorted(pools) == list(range(len(ents)))
    res = set(reserved)
    assert all(ents[i].signature in res for i in loc)
    assert not any(ents[i].signature in res for i in train + ev + val)
    # edits are dealt over signatures: any 100 consecutive eval edits differ in colours
    assert len({ents[i].signature for i in ev[:100]}) == 100


def _build(near: bool = True):
    """Default-size builder (no rendering): (builder, datasets, pretraining corpus); ``near=False``
    turns the train near misses off, i.e. format 7's random m_loc draws."""
    b = W._Builder(W.WorldConfig())
    if not near:
        b.near_misses = lambda e: []
    n_tr, n_ev = b.cfg.n_train, b.cfg.n_eval
    ds = {f"{k}_{s}": getattr(b, k)(s, pool, n) for k in ("evqa", "eic", "vlkeb")
          for s, pool, n in (("train", b.train, n_tr), ("eval", b.eval, n_ev))}
    return b, ds, b.pretrain()


@pytest.fixture(scope="module")
def default_build():
    return _build()


def _shared(b, r) -> int:
    ids = {e.id: e for e in b.ents}
    e, le = ids[_eid(r["image"])], ids[_eid(r["m_loc"])]
    return sum(x == y for x, y in zip(e.signature, le.signature))


def test_train_mloc_are_near_misses(default_build):
    b, ds, _ = default_build
    ids = {e.id: e for e in b.ents}
    loc = set(b.loc)
    for name, recs in ds.items():
        assert all(ids[_eid(r["m_loc"])].idx in loc for r in recs)  # reserved m_loc pool
        shared = [_shared(b, r) for r in recs]
        if name.endswith("_train"):
            # a near miss whenever the pool has one (~93% by default); the rest stay random
            has = [bool(b.near_misses(ids[_eid(r["image"])])) for r in recs]
            assert [s == 2 for s in shared] == has, name
            assert sum(has) / len(recs) >= 0.9, name
        else:  # eval: random from the pool, near misses only by chance
            assert shared.count(2) / len(recs) < 0.1, name


def test_near_misses_change_only_train_mloc(default_build):
    """Format 8 vs format 7: eval records and the pretraining corpus are identical; train records
    differ only in their m_loc image and answer."""
    _, ds, pre = default_build
    _, ds7, pre7 = _build(near=False)
    assert pre == pre7
    for name, recs in ds.items():
        if name.endswith("_eval"):
            assert recs == ds7[name]
        else:
            strip = lambda rs: [{k: v for k, v in r.items() if k not in ("m_loc", "m_loc_a")}
                                for r in rs]
            assert strip(recs) == strip(ds7[name])
            assert sum(r["m_loc"] != r7["m_loc"] for r, r7 in zip(recs, ds7[name])) > len(recs) // 2


# ----------------------------------------------------------------------------- pretraining


def test_pretrain_corpus(small_world):
    train = W.load_pretrain(small_world, "train")
    held = W.load_pretrain(small_world, "heldout")
    dataset_images = set()
    for name, recs, img_root in _datasets(small_world):
        for r in recs:
            for key in ("image", "image_rephrase", "m_loc"):
                dataset_images.add((img_root / r[key]).relative_to(small_world).as_posix())
    for split, exs in (("train", train), ("heldout", held)):
        assert {ex["kind"] for ex in exs} == {"vqa", "caption", "vlkeb", "text"}, split
        for ex in exs:
            assert ex["target"] and not ex["target"].startswith(" "), ex
            if ex["kind"] == "text":
                assert ex["image"] is None and ex["prompt"].endswith("?")
            else:
                assert (small_world / ex["image"]).is_file(), ex
            if ex["kind"] == "vqa":
                assert ex["prompt"].endswith(" The answer is:")
    # pretraining renders are never dataset renders (compared by content); held-out renders are
    def content(paths):
        return {(small_world / p).read_bytes() for p in paths}

    pretrain_images = {ex["image"] for ex in train if ex["image"]}
    assert not content(pretrain_images) & content(dataset_images)
    render_held = {ex["image"] for ex in held if ex["heldout"].startswith("render")}
    assert render_held and render_held <= dataset_images
    assert {ex["heldout"] for ex in held} == {"render", "paraphrase", "render+paraphrase"}
    # every text fact is in the corpus, with and without the "nq question: " prefix
    prompts = {ex["prompt"] for ex in train}
    for f in W.text_facts():
        for q in f.train_questions:
            assert f"nq question: {q}?" in prompts and f"{q}?" in prompts


def test_caption_edit_targets_are_not_pretrained(small_world):
    # A SYNTH-EIC edit target must not score high before any edit: its phrasing is never used in
    # pretraining (no shared leading word with any caption target) and it is not a true caption.
    pretrain = W.load_pretrain(small_world, "train") + W.load_pretrain(small_world, "heldout")
    captions = [ex["target"] for ex in pretrain if ex["kind"] == "caption"]
    targets = {ex["target"] for ex in pretrain}
    first_words = {c.split()[0] for c in captions}
    assert captions and first_words <= {"a", "an"}
    all_captions = {W.caption(e) for e in W.all_entities()}
    for name in ("eic_train", "eic_eval"):
        recs, _ = W.load_dataset(small_world, name)
        for r in recs:
            assert r["alt"] != r["pred"], r
            assert r["alt"].split()[0] not in first_words, r["alt"]
            assert 4 <= len(r["alt"].split()) <= 8, r["alt"]
            assert r["alt"] not in all_captions and r["alt"] not in targets, r["alt"]
            # no word coincides with the true caption's word at the same position
            assert all(a != p for a, p in zip(r["alt"].split(), r["pred"].split())), r
    # still deterministic from the seed
    e = W.build_world(0).entities[77]
    alts = {W.alt_caption(random.Random(f"s{i}"), e) for i in range(40)}
    assert len(alts) > 5 and W.caption(e) not in alts
    assert W.alt_caption(random.Random("x"), e) == W.alt_caption(random.Random("x"), e)


def test_dataset_questions_seen_in_pretraining(small_world):
    prompts = {ex["prompt"] for ex in W.load_pretrain(small_world, "train")}
    for name, recs, _ in _datasets(small_world):
        for r in recs:
            for q in (r["src"], r["rephrase"]):
                assert (q + " The answer is:" if name.startswith("evqa") else q) in prompts


def test_vqa_asks_only_colours(small_world):
    # questions about the shape stay at chance for a tiny model: only colours are asked
    assert W.VQA_TYPES == ("color", "background", "frame")
    assert set(W.VQA_QUESTIONS) == set(W.VQA_TYPES)
    for qs in W.VQA_QUESTIONS.values():
        assert len(qs) == 5 == len(set(qs)) and all("color" in q or "colour" in q for q in qs), qs
    colour_qs = {q for qs in W.VQA_QUESTIONS.values() for q in qs}
    assert len(colour_qs) == 15
    ents = _entities(small_world)
    for name, recs, _ in _datasets(small_world):
        for r in recs:
            if name.startswith("evqa"):
                assert {r["src"], r["rephrase"]} <= colour_qs, r
                assert r["pred"] in W.COLORS and r["alt"] in W.COLORS, r
            if not name.startswith("vlkeb"):  # E-VQA and E-IC share the VQA m_loc questions
                assert r["m_loc_q"] in colour_qs and r["m_loc_a"] in W.COLORS, r
    pretrain = W.load_pretrain(small_world, "train") + W.load_pretrain(small_world, "heldout")
    vqa = [ex for ex in pretrain if ex["kind"] == "vqa"]
    assert vqa
    for ex in vqa:
        (_, qtype), _ = _template(ex)
        assert ex["target"] == ents[_eid(ex["image"])][qtype], ex
    # captions name every attribute of the one solid shape, with the right articles
    for e in ents.values():
        assert set(e) >= {"shape", "color", "background", "frame"} and "count" not in e
        art = {c: ("an " if c[0] in "aeiou" else "a ") + c for c in W.COLORS}
        assert e["caption"] == (f"{art[e['color']]} {e['shape']} on {art[e['background']]} "
                                f"background with {art[e['frame']]} frame"), e
    assert {r["src"] for _, recs, _ in _datasets(small_world) for r in recs} & set(
        W.VQA_QUESTIONS["frame"])  # frame questions are asked


def test_every_template_pretrained(small_world):
    train = W.load_pretrain(small_world, "train")
    seen = {_template(ex) for ex in train if ex["kind"] != "text"}
    for key, qs in LISTS.items():
        for q in qs:
            assert (key, q) in seen, (key, q)
    prompts = {ex["prompt"] for ex in train if ex["kind"] == "text"}
    families: dict[str, list] = {}
    for f in W.text_facts():
        families.setdefault(f.family, []).append(f)
    for fam, facts in families.items():  # template j of a family: questions[j] of its facts
        for j in range(len(facts[0].questions)):
            assert any(f"nq question: {f.questions[j]}?" in prompts for f in facts), (fam, j)
            assert any(f"{f.questions[j]}?" in prompts for f in facts), (fam, j)


def test_heldout_paraphrases_are_unseen_pairs(small_world):
    train = W.load_pretrain(small_world, "train")
    held = W.load_pretrain(small_world, "heldout")
    trained_pairs = {(_eid(ex["image"]), *_template(ex)) for ex in train if ex["kind"] != "text"}
    pt_entities = {_eid(ex["image"]) for ex in train if ex["image"]}
    n_para = 0
    for ex in held:
        if ex["kind"] == "text":
            continue
        eid, (key, q) = _eid(ex["image"]), _template(ex)
        rotated = LISTS[key][(int(eid[1:]) + int(eid[1:]) // len(LISTS[key])) % len(LISTS[key])]
        if "paraphrase" in ex["heldout"]:
            n_para += 1
            assert eid in pt_entities  # the entity is pretrained, with its other templates ...
            assert (eid, key, q) not in trained_pairs, ex  # ... but never with this one
            assert q == rotated, ex
        else:  # "render": a template the entity trains on
            assert q != rotated, ex
    assert n_para
    # no pretraining entity ever sees the template it holds out
    for eid, key, q in trained_pairs:
        i = int(eid[1:])
        assert q != LISTS[key][(i + i // len(LISTS[key])) % len(LISTS[key])], (eid, key, q)
    # text: fact i holds out template i % 3 (with and without the prefix); the others are trained
    prompts = {ex["prompt"] for ex in train}
    held_text = {ex["prompt"] for ex in held if ex["kind"] == "text"}
    assert {ex["heldout"] for ex in held if ex["kind"] == "text"} == {"paraphrase"}
    for i, f in enumerate(W.text_facts()):
        for j, q in enumerate(f.questions):
            for prompt in (f"nq question: {q}?", f"{q}?"):
                assert (prompt in held_text) == (j == i % len(f.questions)), prompt
                assert (prompt in prompts) == (j != i % len(f.questions)), prompt


def test_heldout_rotation_spreads_templates():
    ents = W.all_entities()
    for n in (5, 6):  # VQA / VLKEB lists (5), caption prompts (6)
        held = [W.heldout_template(e.idx, n) for e in ents]
        counts = np.bincount(held, minlength=n)
        assert len(counts) == n and counts.min() > 0.9 * len(ents) / n, counts
        # not tied to any attribute value: every value holds out every template somewhere
        for attr in ("color", "background", "frame", "shape"):
            for v in {getattr(e, attr) for e in ents}:
                got = {h for e, h in zip(ents, held) if getattr(e, attr) == v}
                assert got == set(range(n)), (n, attr, v, got)
    for i, f in enumerate(W.text_facts()):
        assert f.heldout == i % len(f.questions)
        assert f.heldout_question not in f.train_questions
        assert len(f.train_questions) == len(f.questions) - 1


def test_text_corpus_covers_everything(small_world):
    corpus = W.text_corpus(small_world)
    assert len(corpus) == len(set(corpus))
    text = "\n".join(corpus)
    for name, recs, _ in _datasets(small_world):
        for r in recs:
            for key in ("alt", "pred", "src", "rephrase", "loc_ans", "m_loc_q", "m_loc_a"):
                assert r[key] in text
    for city in W.build_world(0).cities.values():
        assert city in corpus


# ----------------------------------------------------------------------------- ensure_world


def test_ensure_world_reuses_complete_world(small_world, monkeypatch):
    before = {p: p.stat().st_mtime_ns for p in small_world.rglob("*.json")}

    def boom(*a, **k):
        raise AssertionError("the world was regenerated")

    monkeypatch.setattr(W, "_write_world", boom)
    assert W.ensure_world(small_world, seed=0, progress=False, **SMALL) == small_world
    assert {p: p.stat().st_mtime_ns for p in small_world.rglob("*.json")} == before
    with pytest.raises(AssertionError, match="regenerated"):  # another config does regenerate
        W.ensure_world(small_world, seed=0, progress=False, **{**SMALL, "n_eval": 5})
    assert W.is_complete(small_world, W.WorldConfig(seed=0, **SMALL))


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    out = tmp_path / "w"
    real = W._dump_lines

    def fail_late(path, records):
        if Path(path).name == "heldout.json":
            raise KeyboardInterrupt("simulated interruption")
        return real(path, records)

    monkeypatch.setattr(W, "_dump_lines", fail_late)
    with pytest.raises(KeyboardInterrupt):
        W.ensure_world(out, seed=0, workers=1, progress=False, **SMALL)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary sibling left either
    monkeypatch.setattr(W, "_dump_lines", real)
    W.ensure_world(out, seed=0, workers=1, progress=False, **SMALL)
    assert W.read_manifest(out) is not None


def test_stale_world_is_replaced_and_foreign_dir_refused(tmp_path):
    out = tmp_path / "w"
    W.ensure_world(out, seed=1, workers=1, progress=False, **SMALL)
    W.ensure_world(out, seed=0, workers=1, progress=False, **SMALL)
    assert W.read_manifest(out)["seed"] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w"]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError):
        W.ensure_world(foreign, seed=0, workers=1, progress=False, **SMALL)
    assert (foreign / "keep.txt").read_text() == "user data"


def test_bad_arguments():
    with pytest.raises(TypeError, match="n_trian"):
        W.ensure_world("/nonexistent/never", n_trian=3)
    with pytest.raises(ValueError, match="n_eval"):
        W.WorldConfig(n_eval=0).validate()
    for bad in (0, 9):
        with pytest.raises(ValueError, match="entities_per_signature"):
            W.WorldConfig(entities_per_signature=bad).validate()
    W.WorldConfig(entities_per_signature=1).validate()


def test_cli(tmp_path, capsys):
    args = ["--out", str(tmp_path / "w"), "--n_train", "6", "--n_eval", "3", "--n_loc", "2",
            "--pretrain_renders", "1", "--extra_entities", "0", "--n_heldout_renders", "2",
            "--workers", "1", "--quiet"]
    assert W.main(args) == 0
    assert "vlkeb_eval 3" in capsys.readouterr().out
    assert W.main(args) == 0
    assert "already complete" in capsys.readouterr().out
    assert W.main(args[:2] + ["--n_eval", "0"]) == 2
