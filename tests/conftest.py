"""Shared fixtures: tiny random models of the three backbone classes, saved and loaded back through
the same ``from_pretrained`` path as real weights, and a few small images."""

import pytest
from PIL import Image

from backbones import BACKBONES
from backbones.tiny import TinySize, build_tiny_model, save_tiny, train_tokenizer

CORPUS = ["What color is the shape? The answer is: red", "What shape is it? The answer is: circle",
          "a photo of a blue circle on a green background", "nq question: who rules zorbia? Queen Quell",
          "###Human: USER: ASSISTANT: ###Assistant: describe the image"] * 20
FAMILY_NAMES = {"blip2": "tiny-blip2", "llava": "tiny-llava", "minigpt4": "tiny-minigpt4"}


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """family -> folder of a saved tiny random model (model, tokenizer, processor)."""
    root = tmp_path_factory.mktemp("tiny")
    tok = train_tokenizer(CORPUS, vocab_size=400)
    size = TinySize(hidden=64, layers=4, heads=4, vision_layers=2, qformer_layers=1, num_query_tokens=4)
    return {fam: save_tiny(build_tiny_model(fam, tok, size, seed=1), fam, tok, size, root / fam)
            for fam in FAMILY_NAMES}


@pytest.fixture(scope="session")
def load_tiny(tiny_dirs):
    cache = {}

    def load(family):
        if family not in cache:
            name = FAMILY_NAMES[family]
            cache[family] = BACKBONES.get(name).load(name, tiny_dirs[family])
        return cache[family]
    return load


@pytest.fixture(scope="session")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("img")
    paths = []
    for i, colour in enumerate([(220, 30, 30), (30, 200, 40), (40, 60, 230)]):
        im = Image.new("RGB", (48, 40), colour)
        for x in range(10 + 5 * i, 30):
            for y in range(8, 28):
                im.putpixel((x, y), (255 - colour[0], 255, 255 - colour[2]))
        p = root / f"im{i}.png"
        im.save(p)
        paths.append(str(p))
    return paths


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP
    spinning makes them many times slower."""
    import torch
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def dummy_editors():
    """The test editors of tests/dummy_editor.py, registered for one module
    (``pytestmark = pytest.mark.usefixtures("dummy_editors")``)."""
    import dummy_editor
    names = dummy_editor.register()
    yield names
    dummy_editor.unregister()
