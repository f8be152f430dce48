"""A tiny evaluation dataset in the real E-VQA schema, written into a temporary data dir.

``write_evqa(data_dir, n)`` writes ``<data_dir>/easy-edit-mm/vqa/vqa_eval.json`` (and the same records
as ``vqa_train.json``) plus small PNGs under ``<data_dir>/easy-edit-mm/images/``, laid out as users
download E-VQA, so ``load_dataset("EVQA", "eval", data_dir)`` reads it like the real data.
"""
import json
import random
from pathlib import Path

from PIL import Image

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (40, 60, 230), "yellow": (230, 220, 40),
           "purple": (140, 40, 170), "orange": (240, 140, 20)}
# Short targets from the vocabulary of the test tokenizer (tests/conftest.py CORPUS): one or two tokens.
ANSWERS = ["red", "blue", "green", "circle", "shape", "photo"]
SHAPES = ["circle", "shape"]
QUESTIONS = [("What color is the shape?", "What color is it?"),
             ("What shape is it?", "What shape is the image?"),
             ("What is in the image?", "describe the image")]
FACTS = [("nq question: who rules zorbia", "Queen Quell"), ("nq question: who rules the image", "red"),
         ("nq question: what color is a photo", "blue")]


def _image(path: Path, colour, offset: int):
    im = Image.new("RGB", (32, 32), tuple(255 - c for c in colour))
    for x in range(4 + offset, 24 + offset):
        for y in range(6, 26):
            im.putpixel((x % 32, y), colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)


def write_evqa(data_dir, n: int = 8, seed: int = 0) -> Path:
    """Write ``n`` E-VQA-schema records and their images under ``data_dir``; returns ``data_dir``."""
    data_dir = Path(data_dir)
    rng = random.Random(seed)
    root = data_dir / "easy-edit-mm"
    names = list(COLOURS)
    records = []
    for i in range(n):
        colour = names[i % len(names)]
        image = f"val2014/img_{i:03d}.png"
        rephrase_image = f"val2014_image_rephrase/img_{i:03d}_r.png"
        loc_image = f"val2014/loc_{i:03d}.png"
        _image(root / "images" / image, COLOURS[colour], 0)
        _image(root / "images" / rephrase_image, COLOURS[colour], 3)
        _image(root / "images" / loc_image, COLOURS[names[(i + 3) % len(names)]], 1)
        question, rephrase = QUESTIONS[i % len(QUESTIONS)]
        fact, answer = FACTS[i % len(FACTS)]
        records.append({
            "src": question, "rephrase": rephrase, "pred": colour,
            "alt": rng.choice(ANSWERS),
            "image": image, "image_rephrase": rephrase_image,
            "loc": fact, "loc_ans": answer,
            "m_loc": loc_image, "m_loc_q": "What shape is it?", "m_loc_a": rng.choice(SHAPES),
        })
    for split in ("eval", "train"):
        path = root / "vqa" / f"vqa_{split}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(records, indent=1), encoding="utf-8")
    return data_dir
