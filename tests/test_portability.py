"""Port: VLKEB's one-hop / multi-hop files (``port_new``) load as VLKEB-ONEHOP / VLKEB-MULTIHOP, and
the portability questions are scored beside the five metrics in both scoring modes."""
import json
import shutil
from pathlib import Path

import pytest

from compare_fixtures import onehop_records
from evaluation.cli import main
from fixtures import write_evqa
from test_datasets import write_fixture
from utils.errors import UserError
from vl_datasets import get_dataset_spec, load_dataset

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "schema-samples" / "vlkeb_onehop_sample.json"


def sample_records():
    if SAMPLE.is_file():
        return json.loads(SAMPLE.read_text())
    return [{"src": "What city is featured in the image?", "rephrase": "Which city is this?", "pred": "Wichita",
             "alt": "Fort Smith, Arkansas", "image": "m.1/bing_0.jpg", "image_rephrase": "m.1/bing_3.jpg",
             "loc": "who wrote hamlet", "loc_ans": "Shakespeare", "m_loc": "m.2/yahoo_0.jpg",
             "m_loc_q": "Which city is this?", "m_loc_a": "Texarkana",
             "port_new": [{"port_edit_q": "What timezone does Fort Smith, Arkansas follow?",
                           "port_edit_a": "Central Time Zone",
                           "port_q": "What is the time zone of the location shown in the picture?",
                           "port_a": "Central Time Zone"}]}]


def test_onehop_and_multihop_loaders_read_port_new(tmp_path, images):
    raw = sample_records()
    write_fixture(tmp_path, "VLKEB-ONEHOP", raw, images[0])
    recs = load_dataset("VLKEB-ONEHOP", "eval", tmp_path)
    assert len(recs) == len(raw)
    for r, x in zip(recs, raw):
        assert [(s.prompt, s.target) for s in r.portability] == [(p["port_q"], p["port_a"]) for p in x["port_new"]]
        assert all(s.image == r.edit.image for s in r.portability)  # asked about the edit image
        assert r.edit.prompt == x["src"]                            # VLKEB prompts as is
    # multi-hop: the same schema, any number of items (also none)
    multi = [{**raw[0], "port_new": raw[0]["port_new"] * 3}, {k: v for k, v in raw[0].items() if k != "port_new"}]
    write_fixture(tmp_path, "VLKEB-MULTIHOP", multi, images[0])
    recs = load_dataset("VLKEB-MULTIHOP", "eval", tmp_path)
    assert [len(r.portability) for r in recs] == [3, 0]
    assert get_dataset_spec("VLKEB-MULTIHOP").files == {"eval": "VLKEB/eval_multihop.json"}
    bad = [{**raw[0], "port_new": [{"port_q": "where?"}]}]
    write_fixture(tmp_path, "VLKEB-MULTIHOP", bad, images[0])
    with pytest.raises(UserError, match=r"record 0 port_new\[0\] needs string keys port_q, port_a"):
        load_dataset("VLKEB-MULTIHOP", "eval", tmp_path)


@pytest.fixture(scope="module")
def onehop_dir(tmp_path_factory):
    evqa = write_evqa(tmp_path_factory.mktemp("evqa"), n=3)
    base = json.loads((evqa / "easy-edit-mm/vqa/vqa_eval.json").read_text())
    data = tmp_path_factory.mktemp("onehop")
    path = get_dataset_spec("VLKEB-ONEHOP").split_file(data, "eval")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(onehop_records(3, base)))
    shutil.copytree(evqa / "easy-edit-mm/images", data / "VLKEB/mmkb_images")
    return data


def run(tiny_dirs, data, records, editor):
    return main(["-en", editor, "-mn", "tiny-blip2", "--model_path", str(tiny_dirs["blip2"]), "-dn", "VLKEB-ONEHOP",
                 "--data_dir", str(data), "--records_dir", str(records), "-dvc", "cpu", "-sen", "1"])


def test_port_is_scored_and_an_edit_carries_over(tiny_dirs, onehop_dir, tmp_path):
    none = run(tiny_dirs, onehop_dir, tmp_path, "none")
    ftl = run(tiny_dirs, onehop_dir, tmp_path, "ft-l")
    for out in (none, ftl):
        total = out["means"]["total"]
        for key in ("Port",):
            assert total[key] is not None and total["exact_match"][key] is not None
            assert total["pre_edit"][key] is not None
        results = json.loads((out["run_dir"] / "results.json").read_text())
        rec = results["chunks"][0]["records"][0]
        (port,) = rec["portability"]
        assert {"prompt", "target", "image", "pred_before", "pred_after", "acc", "em", "acc_before"} <= set(port)
        assert "| Port |" in (out["run_dir"] / "table.md").read_text().splitlines()[0]
    assert none["means"]["total"]["Port"] == none["means"]["total"]["pre_edit"]["Port"]
    # FT-L's edit reaches the portability question (a rephrase of the edit here), `none` stays at the floor
    assert ftl["means"]["total"]["Port"] > none["means"]["total"]["Port"]
