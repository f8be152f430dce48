"""General capability (test_vllm_edit.py --general): the set loaders, and the score before editing and
after each point / chunk: unchanged by `none`, lowered by an editor that damages the model."""
import dataclasses
import json
import shutil

import pytest

from compare_fixtures import GENERAL_QA, knowing_model, write_general
from editors import EDITORS
from editors.ft_l import FTLEditor
from evaluation.cli import main
from evaluation.general import load_general
from fixtures import write_evqa
from utils.errors import UserError


@pytest.fixture(scope="module")
def world(tiny_dirs, tmp_path_factory):
    """(data dir with a 4-record E-VQA, general set file, a tiny model that knows the general set)."""
    data = write_evqa(tmp_path_factory.mktemp("evqa"), n=4)
    images = sorted(str(p) for p in (data / "easy-edit-mm/images/val2014").glob("img_*.png"))[:2]
    general = write_general(tmp_path_factory.mktemp("general") / "vqa.json", images)
    model = knowing_model(tiny_dirs["blip2"], tmp_path_factory.mktemp("knowing") / "tiny-blip2", images)
    return data, general, model


def test_loaders(world, tmp_path, images):
    _, general, _ = world
    g = load_general(str(general), tmp_path)
    assert len(g.samples) == 2 * len(GENERAL_QA)
    assert [s.target for s in g.samples[:3]] == list(GENERAL_QA.values())   # the majority answer
    assert g.samples[0].prompt == "What color is the shape? The answer is:"
    assert len(load_general(str(general), tmp_path, limit=4).samples) == 4
    # MME layout: question<TAB>answer files beside their image, or in questions_answers_YN/ with images/
    mme = tmp_path / "MME"
    (mme / "color").mkdir(parents=True)
    shutil.copy(images[0], mme / "color" / "a.png")
    (mme / "color" / "a.txt").write_text("Is the shape red? Please answer yes or no.\tYes\n"
                                         "Is the shape blue? Please answer yes or no.\tNo\n")
    (mme / "artwork" / "images").mkdir(parents=True)
    (mme / "artwork" / "questions_answers_YN").mkdir()
    shutil.copy(images[1], mme / "artwork" / "images" / "b.png")
    (mme / "artwork" / "questions_answers_YN" / "b.txt").write_text("Is this a photo?\tNo\n")
    g = load_general(str(mme), tmp_path)
    assert [(s.target, s.image.split("/")[-1]) for s in g.samples] == [("No", "b.png"), ("Yes", "a.png"), ("No", "a.png")]
    # named sets live under the data dir
    (tmp_path / "general").mkdir()
    shutil.copytree(mme, tmp_path / "general" / "MME")
    assert len(load_general("mme", tmp_path).samples) == 3
    with pytest.raises(UserError, match="vqav2.json is missing"):
        load_general("vqav2", tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"question": "q?", "image": "nowhere.png", "answers": ["x"]}]))
    with pytest.raises(UserError, match="image file missing"):
        load_general(str(bad), tmp_path)


def argv(world, records, editor, *extra):
    data, general, model = world
    return ["-en", editor, "-mn", "tiny-blip2", "--model_path", str(model), "-dn", "EVQA", "--data_dir", str(data),
            "--records_dir", str(records), "-dvc", "cpu", "--general", str(general), *extra]


def test_none_keeps_every_point_at_the_unedited_score(world, tmp_path):
    out = main(argv(world, tmp_path, "none", "--eval_at", "1,2,4"))
    points = out["means"]["points"]
    assert [p["n_edits"] for p in points] == [1, 2, 4]
    for p in points:
        g = p["general"]
        assert g["before"] >= 80 and g["n_questions"] == 2 * len(GENERAL_QA)    # the model knows the set
        assert p["General"] == g["before"] == p["pre_edit"]["General"] and g["drop"] == 0 and g["relative"] == 100
        assert p["exact_match"]["General"] == g["before_exact_match"]
        assert p["state_bytes"] == 0
    curve = json.loads((out["run_dir"] / "curve.json").read_text())
    assert curve["teacher_forced"]["General"] == [points[0]["general"]["before"]] * 3
    # chunked runs average General over chunks
    out = main(argv(world, tmp_path, "none", "-sen", "2"))
    assert out["means"]["total"]["general"]["drop"] == 0
    assert out["means"]["total"]["General"] == out["means"]["total"]["pre_edit"]["General"]


def test_a_damaging_editor_lowers_it(world, tmp_path, monkeypatch):
    class Harsh(FTLEditor):  # FT-L with a big learning rate and no early stop
        def __init__(self, backbone, config):
            super().__init__(backbone, dataclasses.replace(config, lr=0.5, steps=10, early_stop_loss=0.0))

    monkeypatch.setitem(EDITORS._entries, "ft-l", Harsh)
    out = main(argv(world, tmp_path, "ft-l", "--eval_at", "1,4"))
    last = out["means"]["points"][-1]
    assert last["general"]["drop"] > 20 and last["General"] < last["pre_edit"]["General"]
    assert last["state_bytes"] > 0
    assert "| General |" in (out["run_dir"] / "table.md").read_text().splitlines()[0]
