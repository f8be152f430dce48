"""General capability after editing: accuracy on an ordinary VQA set, before any edit and after each
chunk / point of a lifelong-editing run (``test_vllm_edit.py --general FILE_or_NAME``).

Every question is a sample ``("{question} The answer is:", answer, image)`` scored like Rel, in both
modes: teacher-forced token accuracy of the answer, and exact match of the greedy generation. The
results go into each stage's means as ``General`` (and ``exact_match.General``), with the unedited
model's score in ``pre_edit.General`` and ``general = {n_questions, before, drop, ...}``; ``drop`` is
before minus after, in points, and ``relative`` is after / before in percent. The whole set runs in
batches of ``--eval_batch_size`` through the editor, once per stage.

Sets (``--general`` takes a name or a path):

- ``synth`` (or ``SYNTH-GENERAL``): ``<data>/synthetic/general/vqa_general.json``, written by the
  world generator: held-out renders of entities whose colours no edit of any dataset has;
- ``vqav2``: ``<data>/general/vqav2.json``; ``mme``: the folder ``<data>/general/MME``;
- a JSON file, VQAv2-style: a list of ``{"question": str, "image": path, "answers": [...]}`` where
  ``answers`` holds strings or ``{"answer": str}`` objects (VQAv2's annotation form); the scored
  answer is ``multiple_choice_answer`` when given, else the most frequent of ``answers`` (first on a
  tie). ``"answer": str`` may stand in for ``answers`` (MME-style yes/no questions as JSON). Image
  paths are relative to the JSON file's folder, or to ``"image_root"`` when the file is an object
  ``{"image_root": ..., "questions": [...]}``;
- a folder, MME layout (the MME benchmark release): every ``*.txt`` below it holds lines
  ``question<TAB>answer`` (``Yes`` / ``No``) about the image of the same stem, which lies beside it
  or, for a file in ``questions_answers_YN/``, in the sibling ``images/`` folder.
"""
import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from evaluation.scoring import GENERAL_NAME, run_samples
from utils.errors import UserError
from vl_datasets.mmedit import answer_prompt
from vl_datasets.records import Sample

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG")
# name -> (path relative to the data dir, is it synthetic)
GENERAL_SETS = {"synth": ("synthetic/general/vqa_general.json", True),
                "synth-general": ("synthetic/general/vqa_general.json", True),
                "vqav2": ("general/vqav2.json", False),
                "mme": ("general/MME", False)}


@dataclass
class GeneralSet:
    name: str                  # as the user gave it
    source: Path               # the file or folder read
    samples: list              # Sample(prompt, answer, image)

    def identity(self) -> dict:
        """What a resumed run must match."""
        h = hashlib.sha256(json.dumps([[s.prompt, s.target, s.image] for s in self.samples]).encode())
        return {"source": str(self.source.resolve()), "n_questions": len(self.samples),
                "fingerprint": h.hexdigest()[:16]}


def resolve_general(spec: str, data_dir: Path) -> Path:
    """A set name or a path -> the file / folder to read (a synthetic set is generated if missing)."""
    key = spec.strip().lower()
    if key in GENERAL_SETS:
        rel, synthetic = GENERAL_SETS[key]
        if synthetic:
            from synthetic.world import ensure_world
            ensure_world(Path(data_dir) / "synthetic")
        path = Path(data_dir) / rel
        if not path.exists():
            raise UserError(f"--general {spec}: {path} is missing (see evaluation/general.py for the layout)")
        return path
    path = Path(spec)
    if not path.exists():
        raise UserError(f"--general {spec}: no such file or folder, and not a set name "
                        f"({', '.join(sorted(GENERAL_SETS))})")
    return path


def _answer(item: dict, where: str) -> str:
    if isinstance(item.get("multiple_choice_answer"), str):
        return item["multiple_choice_answer"]
    if isinstance(item.get("answer"), str):
        return item["answer"]
    answers = item.get("answers")
    if isinstance(answers, list) and answers:
        texts = [a["answer"] if isinstance(a, dict) else a for a in answers]
        if all(isinstance(t, str) for t in texts):
            counts = Counter(texts)
            return max(texts, key=lambda t: (counts[t], -texts.index(t)))
    raise UserError(f"{where}: needs 'answers' (strings or {{'answer': ...}}), 'answer' or 'multiple_choice_answer'")


def _image(path: Path, where: str) -> str:
    if not path.is_file():
        raise UserError(f"image file missing: {path} ({where})")
    return str(path)


def load_vqa_json(path: Path) -> list[Sample]:
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"--general: {path} is not valid JSON ({e})") from None
    root = Path(path).parent
    if isinstance(raw, dict):
        root = root / raw.get("image_root", "")
        raw = raw.get("questions")
    if not isinstance(raw, list) or not raw:
        raise UserError(f"--general: {path} must hold a non-empty list of questions "
                        f"(or an object with 'questions')")
    out = []
    for i, item in enumerate(raw):
        where = f"{path} question {i}"
        if not isinstance(item, dict) or not isinstance(item.get("question"), str) \
                or not isinstance(item.get("image"), str):
            raise UserError(f"{where}: needs string keys 'question' and 'image'")
        out.append(Sample(answer_prompt(item["question"]), _answer(item, where), _image(root / item["image"], where)))
    return out


def load_mme_folder(path: Path) -> list[Sample]:
    out = []
    for txt in sorted(Path(path).rglob("*.txt")):
        folder = txt.parent.parent / "images" if txt.parent.name == "questions_answers_YN" else txt.parent
        image = next((folder / (txt.stem + s) for s in IMAGE_SUFFIXES if (folder / (txt.stem + s)).is_file()), None)
        for n, line in enumerate(txt.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) != 2:
                raise UserError(f"{txt} line {n}: expected 'question<TAB>answer'")
            if image is None:
                raise UserError(f"image file missing: {folder / txt.stem}.jpg|png ({txt})")
            out.append(Sample(answer_prompt(parts[0].strip()), parts[1].strip(), str(image)))
    if not out:
        raise UserError(f"--general: no MME question files (*.txt with question<TAB>answer) under {path}")
    return out


def load_general(spec: str, data_dir, limit: int | None = None) -> GeneralSet:
    path = resolve_general(spec, Path(data_dir))
    samples = load_mme_folder(path) if path.is_dir() else load_vqa_json(path)
    if limit is not None:
        samples = samples[:limit]
    return GeneralSet(spec, path, samples)


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


class GeneralProbe:
    """Measures the set through an editor: ``start(editor)`` on the unedited model, then, as the
    protocol's ``after_stage`` hook, after each stage's edits."""

    def __init__(self, gset: GeneralSet, batch_size: int):
        self.set, self.batch_size = gset, batch_size
        self.before = None

    def measure(self, editor) -> tuple[float, float]:
        from evaluation.scoring import sample_scores
        outs = run_samples(editor, self.set.samples, self.batch_size)
        scores = [sample_scores("general", o, o) for o in outs]
        return _mean(s["acc"] for s in scores), _mean(s["em"] for s in scores)

    def start(self, editor) -> None:
        self.before = self.measure(editor)

    def __call__(self, editor, stage=None) -> dict:
        acc, em = self.measure(editor)
        return scores_entry(self.before, (acc, em), len(self.set.samples))


def scores_entry(before: tuple, after: tuple, n: int) -> dict:
    """The entries a stage's means get (see the module docstring)."""
    (b_acc, b_em), (acc, em) = before, after
    return {GENERAL_NAME: acc, "exact_match": {GENERAL_NAME: em},
            "pre_edit": {GENERAL_NAME: b_acc}, "pre_edit_exact_match": {GENERAL_NAME: b_em},
            "general": {"n_questions": n, "before": b_acc, "after": acc, "drop": b_acc - acc,
                        "relative": 100.0 * acc / b_acc if b_acc else None,
                        "before_exact_match": b_em, "after_exact_match": em, "drop_exact_match": b_em - em}}


def merge_chunks(total: dict, stage_means: list[dict]) -> None:
    """Into the totals of a chunked run, what is measured per chunk: General (mean over chunks, each
    after its own T edits) and the edited-state bytes (the largest chunk's)."""
    sizes = [m["state_bytes"] for m in stage_means if m.get("state_bytes") is not None]
    if sizes:
        total["state_bytes"] = max(sizes)
    gen = [m["general"] for m in stage_means if m.get("general")]
    if gen:
        before = (gen[0]["before"], gen[0]["before_exact_match"])
        after = (_mean(g["after"] for g in gen), _mean(g["after_exact_match"] for g in gen))
        for key, value in scores_entry(before, after, gen[0]["n_questions"]).items():
            if isinstance(value, dict) and key != "general":
                total.setdefault(key, {}).update(value)
            else:
                total[key] = value
