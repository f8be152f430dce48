import json
import shutil
from pathlib import Path

import pytest

from utils.errors import UserError
from vl_datasets import DATASETS, get_dataset_spec, load_dataset

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "data" / "schema-samples"
SAMPLE_FILES = {"EVQA": "evqa_train_sample.json", "EIC": "eic_train_sample.json", "VLKEB": "vlkeb_train_sample.json"}


def real_schema_records(name):
    """The real schema samples when ../shared is beside the checkout, else one record like them."""
    path = SAMPLES / SAMPLE_FILES[name]
    if path.exists():
        return json.loads(path.read_text())[:5]
    return [{"src": "How many skyscrapers are there?", "rephrase": "What is the number of high-rise buildings?",
             "pred": "no", "alt": "2", "image": "val2014/a.jpg", "image_rephrase": "rephrase/a.png",
             "loc": "nq question: who wrote hamlet", "loc_ans": "Shakespeare", "m_loc": "val2014/b.jpg",
             "m_loc_q": "What sport can you use this for?", "m_loc_a": "motocross"}]


def write_fixture(data_dir: Path, name: str, records, image_file):
    spec = get_dataset_spec(name)
    path = spec.split_file(data_dir, "eval")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records))
    for r in records:
        for key in ("image", "image_rephrase", "m_loc"):
            dst = data_dir / spec.image_root / r[key]
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(image_file, dst)
    return path


@pytest.mark.parametrize("name", ["EVQA", "EIC", "VLKEB"])
def test_loader_reads_real_schema_with_templates(name, tmp_path, images):
    raw = real_schema_records(name)
    write_fixture(tmp_path, name, raw, images[0])
    records = load_dataset(name, "eval", data_dir=tmp_path)
    assert len(records) == len(raw)
    r, x = records[0], raw[0]
    root = tmp_path / get_dataset_spec(name).image_root
    if name == "EVQA":
        assert r.edit.prompt == f"{x['src']} The answer is:"
        assert r.text_rephrase.prompt == f"{x['rephrase']} The answer is:"
    else:
        assert r.edit.prompt == x["src"] and r.text_rephrase.prompt == x["rephrase"]
    assert r.edit.target == r.text_rephrase.target == r.image_rephrase.target == x["alt"]
    assert r.edit.image == r.text_rephrase.image == str(root / x["image"])
    assert r.image_rephrase.image == str(root / x["image_rephrase"])
    assert r.image_rephrase.prompt == r.edit.prompt
    assert (r.text_loc.prompt, r.text_loc.target, r.text_loc.image) == (f"{x['loc']}?", x["loc_ans"], None)
    assert r.image_loc.prompt == f"{x['m_loc_q']} The answer is:"
    assert (r.image_loc.target, r.image_loc.image) == (x["m_loc_a"], str(root / x["m_loc"]))
    assert len(load_dataset(name, "eval", data_dir=tmp_path, limit=2)) == min(2, len(raw))


def test_images_are_paths_not_decoded(tmp_path, images):
    write_fixture(tmp_path, "EVQA", real_schema_records("EVQA"), images[0])
    records = load_dataset("EVQA", "eval", data_dir=tmp_path)
    assert all(isinstance(s.image, (str, type(None))) for r in records for s in r.samples().values())


def test_errors_name_the_problem(tmp_path, images):
    with pytest.raises(UserError, match=r"annotation file missing: .*vqa_eval\.json"):
        load_dataset("EVQA", "eval", data_dir=tmp_path)
    raw = real_schema_records("EVQA")[:2]
    path = write_fixture(tmp_path, "EVQA", raw, images[0])
    with pytest.raises(UserError, match="number of records must be positive"):
        load_dataset("EVQA", "eval", data_dir=tmp_path, limit=0)
    bad = [dict(raw[0]), {k: v for k, v in raw[-1].items() if k != "m_loc_q"}]
    path.write_text(json.dumps(bad))
    with pytest.raises(UserError, match=r"record 1 lacks key 'm_loc_q'"):
        load_dataset("EVQA", "eval", data_dir=tmp_path)
    path.write_text(json.dumps([dict(raw[0], image="nowhere/missing.jpg")]))
    with pytest.raises(UserError, match=r"image file missing: .*nowhere/missing\.jpg"):
        load_dataset("EVQA", "eval", data_dir=tmp_path)
    path.write_text(json.dumps(raw[:1]))
    broken = tmp_path / "easy-edit-mm" / "images" / raw[0]["image"]
    broken.write_bytes(b"not an image")
    # every image is decoded once when the records are loaded, before a run writes anything ...
    with pytest.raises(UserError, match=r"image unreadable: .*" + broken.name):
        load_dataset("EVQA", "eval", data_dir=tmp_path)
    # ... and again when it is used (opened lazily)
    from vl_datasets import open_image
    record = load_dataset("EVQA", "eval", data_dir=tmp_path, verify_images=False)[0]
    with pytest.raises(UserError, match=r"image unreadable: .*" + broken.name):
        open_image(record.edit.image)
    path.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_dataset("EVQA", "eval", data_dir=tmp_path)


def test_registry_lists_known_names():
    assert {"EVQA", "EIC", "VLKEB", "SYNTH-EVQA", "SYNTH-EIC", "SYNTH-VLKEB"} <= set(DATASETS.names())
    assert get_dataset_spec("E-VQA").name == "EVQA"
    with pytest.raises(UserError, match="unknown dataset 'COCO'; known: .*EVQA"):
        get_dataset_spec("COCO")


def test_real_dataset_val_is_a_fixed_slice_left_out_of_training(tmp_path, images):
    """Real datasets ship no val file: val is the last ``val_slice`` records of the train file, and
    train leaves them out unless asked to keep them."""
    from dataclasses import replace
    from vl_datasets.mmedit import load_records
    raw = real_schema_records("EVQA")
    raw = [dict(raw[i % len(raw)], src=f"question {i}?") for i in range(30)]
    spec = replace(get_dataset_spec("EVQA"), val_slice=5)   # the last min(5, 30 // 10) = 3 records
    path = spec.split_file(tmp_path, "train")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(raw))
    for r in raw:
        for key in ("image", "image_rephrase", "m_loc"):
            dst = tmp_path / spec.image_root / r[key]
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(images[0], dst)
    src = lambda recs: [r.edit.prompt.split("?")[0] for r in recs]
    assert src(load_records(spec, tmp_path, "val")) == ["question 27", "question 28", "question 29"]
    assert src(load_records(spec, tmp_path, "train")) == [f"question {i}" for i in range(27)]
    assert len(load_records(spec, tmp_path, "train", include_val_slice=True)) == 30
    assert get_dataset_spec("EVQA").splits == ("train", "eval", "val")
    with pytest.raises(UserError, match="no split 'test'"):
        spec.split_file(tmp_path, "test")


def test_synthetic_val_split_has_its_own_entities(tmp_path):
    """SYNTH-* val records edit entities that neither train nor eval edits."""
    from synthetic.world import ensure_world
    world = ensure_world(tmp_path / "synthetic", n_train=12, n_eval=6, n_val=5, n_loc=8, pretrain_renders=1,
                         extra_entities=0, n_heldout_renders=4, image_size=32, entities_per_signature=2,
                         progress=False, workers=1)
    from vl_datasets.mmedit import load_records
    load = lambda split: load_records(get_dataset_spec("SYNTH-EVQA"), tmp_path, split)  # no default-world check
    ents = {s: {r.edit.image.rsplit("/", 1)[1].rsplit("_", 1)[0] for r in load(s)} for s in ("train", "eval", "val")}
    assert len(load("val")) == 5
    assert ents["val"] and not ents["val"] & ents["train"] and not ents["val"] & ents["eval"]
    assert world.is_dir()
