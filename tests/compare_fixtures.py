"""Small data for the tests of Port, General and scripts/compare.py: a VQAv2-style general set about the
E-VQA fixture images, a tiny model that knows that set, and VLKEB portability records."""
import json
import shutil
from pathlib import Path

import torch

from backbones import BACKBONES
from utils.losses import masked_nll
from vl_datasets.mmedit import answer_prompt
from vl_datasets.records import Sample

# question -> answer, the same for every image (the tokenizer of tests/conftest.py knows these words)
GENERAL_QA = {"What color is the shape?": "red", "What shape is it?": "circle", "What is in the image?": "photo"}


def write_general(path: Path, images: list[str]) -> Path:
    """A VQAv2-style general set: every question of GENERAL_QA about every image (paths relative to
    the file, answers in VQAv2's annotation form)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    items = []
    for i, image in enumerate(images):
        rel = Path("images") / f"g{i}{Path(image).suffix}"
        (path.parent / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(image, path.parent / rel)
        for q, a in GENERAL_QA.items():
            items.append({"question_id": len(items), "question": q, "image": rel.as_posix(),
                          "answers": [{"answer": a}, {"answer": a}, {"answer": "blue"}]})
    path.write_text(json.dumps(items), encoding="utf-8")
    return path


def knowing_model(src: Path, dst: Path, images: list[str], steps: int = 40, lr: float = 1e-2) -> Path:
    """A copy of the tiny random BLIP-2 in ``src``, fine-tuned until it answers GENERAL_QA on
    ``images``: a model with a general skill that editing can damage."""
    shutil.copytree(src, dst)
    bb = BACKBONES.get("tiny-blip2").load("tiny-blip2", dst)
    samples = [Sample(answer_prompt(q), a, im) for im in images for q, a in GENERAL_QA.items()]
    params = list(bb.model.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        batch = bb.encode(samples)  # the image features carry the graph: encode every step
        loss = masked_nll(bb.logits(batch), batch.labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for p in params:
        p.requires_grad_(False)
    bb.model.save_pretrained(dst)
    return dst


def onehop_records(n: int, base: list[dict]) -> list[dict]:
    """VLKEB one-hop records (the VLKEB schema plus ``port_new``) from E-VQA fixture records: the
    portability question asks the edited fact again in other words, so an editor that generalises
    answers it (a wiring check; real one-hop questions need a hop)."""
    out = []
    for r in base[:n]:
        out.append({**r, "port_new": [{"port_edit_q": f"{r['src']} (hop)", "port_edit_a": r["alt"],
                                       "port_q": r["rephrase"], "port_a": r["alt"]}]})
    return out
