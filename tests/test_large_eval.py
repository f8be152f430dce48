"""SYNTH-EVQA's large eval split (synthetic/large_eval.py): its plan on the default world (no
rendering), and a 300-record split written into a small world (a few seconds)."""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from pathlib import Path

import pytest

from synthetic import large_eval as L
from synthetic import world as W
from utils.errors import UserError

SMALL = dict(n_train=14, n_eval=7, n_val=5, n_loc=4, pretrain_renders=1, extra_entities=60,
             n_heldout_renders=4, image_size=32)
N = 300
NEW_FILES = (L.MANIFEST, L.RECORDS_FILE)


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _eid(path: str) -> str:
    return path.rsplit("/", 1)[-1].split("_")[0]


def _render(path: str) -> int:
    return int(path.rsplit("_", 1)[-1].removesuffix(".png"))


def _qtype(question: str) -> str:
    return next(t for t, qs in W.VQA_QUESTIONS.items() if question in qs)


# ----------------------------------------------------------------------------- the plan, default world


@pytest.fixture(scope="module")
def default_builder():
    return W._Builder(W.WorldConfig())


def test_default_plan_sizes_and_pools(default_builder):
    b = default_builder
    pool = L.entity_pool(b)
    reserved = set(b.reserved)
    assert not set(pool) & (set(b.train) | set(b.val) | set(b.loc))
    assert set(b.eval) <= set(pool) and set(pool) <= set(b.eval) | set(b.extra)
    assert not any(b.ents[i].signature in reserved for i in pool)
    assert (len(pool), len({b.ents[i].signature for i in pool})) == (2748, 656)
    facts = L.fact_order(b)
    assert len(facts) == len(set(facts)) == 3 * len(pool) == 8244
    assert {i for i, _ in facts} == set(pool)
    # the first 656 records: distinct signatures; the first 1,968: distinct (signature, question)
    # pairs on distinct entities
    look = [(b.ents[i].signature, qt) for i, qt in facts]
    assert len({s for s, _ in look[:656]}) == 656
    assert len(set(look[:1968])) == 1968 and len({i for i, _ in facts[:1968]}) == 1968
    assert len(set(look[:1969])) == 1968
    assert L.fact_order(W._Builder(W.WorldConfig())) == facts          # deterministic


def test_default_plan_targets(default_builder):
    b = default_builder
    facts = L.fact_order(b)
    targets = L.fact_targets(b, facts)
    by_entity = defaultdict(list)
    for (idx, qt), alt in targets.items():
        e = b.ents[idx]
        assert alt in W.COLORS and alt not in e.signature and alt != W.vqa_answer(e, qt)
        by_entity[idx].append(alt)
    assert all(len(alts) == len(set(alts)) == 3 for alts in by_entity.values())


# ----------------------------------------------------------------------------- a written split, small world


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """``{"dir": <data dir>, "world", "before": tree before, "copy": an untouched copy, "meta"}``."""
    root = tmp_path_factory.mktemp("large")
    world = W.ensure_world(root / "data" / "synthetic", seed=0, workers=1, progress=False, **SMALL)
    copy = root / "copy" / "synthetic"
    shutil.copytree(world, copy)
    before = _tree(world)
    meta = L.generate(world, N, workers=1, progress=False)
    return {"dir": root / "data", "world": world, "before": before, "copy": copy, "meta": meta}


def _records(world: Path) -> list[dict]:
    return json.loads((world / L.RECORDS_FILE).read_text())


def _manifest(world: Path) -> dict:
    return json.loads((world / L.MANIFEST).read_text())


def test_size_schema_and_manifest(data):
    recs, m = _records(data["world"]), _manifest(data["world"])
    assert len(recs) == N and all(tuple(r) == W.RECORD_KEYS for r in recs)
    facts = m["facts_available"]
    assert facts == 3 * m["entities"]["available"] and facts < N   # the small world has re-edits too
    assert (m["records"], m["distinct_facts"], m["re_edits"]) == (N, facts, N - facts)
    assert len(m["per_record"]) == N and L.is_complete(data["world"], N)
    assert not L.is_complete(data["world"], N + 1)
    for r, (eid, qt, p, f) in zip(recs, m["per_record"]):
        assert _eid(r["image"]) == _eid(r["image_rephrase"]) == eid and _qtype(r["src"]) == _qtype(r["rephrase"]) == qt
        assert r["src"] != r["rephrase"]


def test_no_entity_of_train_or_val(data):
    ents = {e["id"]: e for e in json.loads((data["world"] / "entities.json").read_text())}
    for r in _records(data["world"]):
        e = ents[_eid(r["image"])]
        assert e["split"] in ("eval", "extra") and not e["reserved"]
        assert ents[_eid(r["m_loc"])]["split"] == "loc"
    used = {_eid(r["image"]) for r in _records(data["world"])}
    trained = {_eid(r["image"]) for name in ("evqa_train", "evqa_val", "eic_train", "eic_val",
                                             "vlkeb_train", "vlkeb_val")
               for r in W.load_dataset(data["world"], name)[0]}
    assert used and not used & trained


def test_facts_are_never_contradictory(data):
    """One target per (entity, question); a fact comes back only as a re-edit (pass >= 1), with the
    same target and new renders; every edit request (image, question) is unique."""
    recs, m = _records(data["world"]), _manifest(data["world"])
    targets, first = defaultdict(set), {}
    for i, (r, (eid, qt, p, f)) in enumerate(zip(recs, m["per_record"])):
        targets[(eid, qt)].add(r["alt"])
        if p == 0:
            assert (eid, qt) not in first and f == i
            first[(eid, qt)] = i
            assert _render(r["image"]) == 0 and _render(r["image_rephrase"]) == 1
        else:
            assert first[(eid, qt)] == f and recs[f]["alt"] == r["alt"]
            assert _render(r["image"]) == L.LARGE_RENDER + 2 * (p - 1)
            assert _render(r["image_rephrase"]) == _render(r["image"]) + 1
            assert r["image"].startswith(f"{L.IMAGE_DIR}/")
    assert all(len(t) == 1 for t in targets.values())
    assert len({(r["image"], _qtype(r["src"])) for r in recs}) == N
    # an entity's questions have distinct targets
    by_entity = defaultdict(dict)
    for (eid, qt), alts in targets.items():
        by_entity[eid][qt] = next(iter(alts))
    assert all(len(set(t.values())) == len(t) for t in by_entity.values())


def test_answers_are_true_and_targets_wrong(data):
    ents = {e["id"]: e for e in json.loads((data["world"] / "entities.json").read_text())}
    key = {"color": "color", "background": "background", "frame": "frame"}
    for r in _records(data["world"]):
        e, le = ents[_eid(r["image"])], ents[_eid(r["m_loc"])]
        assert r["pred"] == e[key[_qtype(r["src"])]]
        assert r["alt"] not in (e["color"], e["background"], e["frame"])
        assert r["m_loc_a"] == le[key[_qtype(r["m_loc_q"])]]
        assert r["loc"].startswith(W.NQ_PREFIX) and r["loc_ans"]


def test_the_loader_reads_it(data):
    from vl_datasets import load_dataset
    recs = load_dataset("SYNTH-EVQA", "eval_large", data_dir=data["dir"])   # opens every image
    assert len(recs) == N
    assert recs[0].edit.prompt.endswith(" The answer is:") and recs[0].edit.target == _records(data["world"])[0]["alt"]
    assert len(load_dataset("SYNTH-EVQA", "eval_large", data_dir=data["dir"], limit=7)) == 7
    for name in ("SYNTH-EIC", "SYNTH-VLKEB", "EVQA"):
        with pytest.raises(UserError, match="no split 'eval_large'"):
            load_dataset(name, "eval_large", data_dir=data["dir"])
    with pytest.raises(UserError, match=r"python -m synthetic.world --large_eval 10000"):
        load_dataset("SYNTH-EVQA", "eval_large", data_dir=data["dir"].parent / "copy_nowhere")


def test_the_world_is_unchanged(data):
    """Every file of the world (datasets, images, pretraining corpus, manifest) is byte-identical; the
    split only adds its records, its manifest and images in its own folder."""
    after = _tree(data["world"])
    assert {k: after[k] for k in data["before"]} == data["before"]
    added = set(after) - set(data["before"])
    assert set(NEW_FILES) <= added
    assert all(p in NEW_FILES or p.startswith(f"{L.IMAGE_ROOT}/{L.IMAGE_DIR}/") for p in added)
    assert len(added) == len(NEW_FILES) + _manifest(data["world"])["new_images"]["files"]
    assert not [p for p in added if "/." in p or p.startswith(".")]      # no temporary or lock file left


def test_deterministic_a_prefix_and_resumable(data):
    """Same world, same split byte for byte; a smaller split is its prefix; a lost image and manifest
    are written again, the same."""
    world, copy = data["world"], data["copy"]
    L.generate(copy, 40, workers=1, progress=False)
    assert _records(copy) == _records(world)[:40]
    assert _manifest(copy)["per_record"] == _manifest(world)["per_record"][:40]
    L.generate(copy, N, workers=2, progress=False)
    ours = {k: v for k, v in _tree(world).items() if k not in data["before"]}
    theirs = {k: v for k, v in _tree(copy).items() if k not in data["before"]}
    assert ours == theirs
    lost = sorted((copy / L.IMAGE_ROOT / L.IMAGE_DIR).iterdir())[3]
    lost.unlink()
    (copy / L.MANIFEST).unlink()
    assert not L.is_complete(copy) and not L.is_complete(copy, N)
    L.ensure(copy, N, progress=False)
    assert {k: v for k, v in _tree(copy).items() if k not in data["before"]} == ours


def test_ensure_reuses_a_complete_split(data, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("regenerated a complete split")
    monkeypatch.setattr(L, "generate", boom)
    assert L.ensure(data["world"]) == data["world"]          # any size
    assert L.ensure(data["world"], N) == data["world"]


def test_a_stale_world_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no complete synthetic world"):
        L.generate(tmp_path / "nothing", 10, progress=False)


def test_prepare_dataset_generates_it_on_first_use(data, monkeypatch):
    """``prepare_dataset(..., split="eval_large")`` (what the scripts call) writes the split unless the
    world has one; other splits and datasets never do."""
    from synthetic import embedded
    calls = []
    monkeypatch.setattr(W, "ensure_world", lambda out, **k: Path(out))   # the small world stands in
    monkeypatch.setattr(L, "ensure", lambda world, *a, **k: calls.append(Path(world)))
    embedded.prepare_dataset("SYNTH-EVQA", data["dir"], "eval_large")
    assert calls == [data["world"]]
    embedded.prepare_dataset("SYNTH-EVQA", data["dir"], "eval")
    embedded.prepare_dataset("SYNTH-EVQA", data["dir"])
    embedded.prepare_dataset("SYNTH-VLKEB", data["dir"], "eval_large")
    assert calls == [data["world"]]


def test_world_cli_flag(data, capsys, monkeypatch):
    args = ["--out", str(data["world"]), "--workers", "1", "--quiet"]
    monkeypatch.setattr(W, "is_complete", lambda out, cfg: True)      # (the CLI has no --n_val for SMALL)
    assert W.main(args + ["--large_eval", str(N)]) == 0              # complete: nothing rewritten
    out = capsys.readouterr().out
    assert "already complete" in out and f"{N} records" in out and "nothing to do" not in out
    assert W.main(args + ["--large_eval", "-3"]) == 2
    assert "--large_eval must be" in capsys.readouterr().err


def test_evaluation_on_eval_large_names_its_run_folder(data, tiny_dirs, tmp_path, monkeypatch):
    from evaluation.cli import main
    monkeypatch.setattr(W, "ensure_world", lambda out, **k: Path(out))
    out = main(["-en", "none", "-mn", "tiny-blip2", "--model_path", str(tiny_dirs["blip2"]), "-dn", "SYNTH-EVQA",
                "--split", "eval_large", "-dsn", "4", "-sen", "2", "--data_dir", str(data["dir"]),
                "--records_dir", str(tmp_path / "rec"), "-dvc", "cpu"])
    run_dir = tmp_path / "rec" / "none" / "tiny-blip2" / "eval_large" / "SYNTH-EVQA" / "sequential_edit_2"
    assert out["run_dir"] == run_dir
    assert out["means"]["total"]["n_records"] == 4
    with pytest.raises(UserError, match="SYNTH-EVQA only"):
        main(["-en", "none", "-mn", "tiny-blip2", "--model_path", str(tiny_dirs["blip2"]), "-dn", "SYNTH-EIC",
              "--split", "eval_large", "-sen", "2", "--data_dir", str(data["dir"]),
              "--records_dir", str(tmp_path / "rec2"), "-dvc", "cpu"])
    assert not (tmp_path / "rec2").exists()


@pytest.mark.parametrize("dataset", ["EVQA", "SYNTH-VLKEB"])
def test_compare_and_seeds_refuse_eval_large_elsewhere(dataset, tmp_path, capsys):
    """scripts/compare.py and scripts.seeds pass --split on to test_vllm_edit.py: a dataset without the
    split is refused before any training or evaluation."""
    from evaluation.compare import main as compare
    from scripts.seeds import main as seeds
    with pytest.raises(UserError, match="has no such split"):
        compare(["-mn", "tiny-blip2", "-dn", dataset, "--split", "eval_large", "--records_dir", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_:
        seeds(["-en", "none", "-mn", "tiny-blip2", "-dn", dataset, "--split", "eval_large", "--eval_at", "1",
               "--records_dir", str(tmp_path)])
    assert exit_.value.code == 2 and "has no such split" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
