"""Loaders for the shared MMEdit / VLKEB JSON schema (E-VQA, E-IC, VLKEB and their synthetic twins).

Schema: a list of records with keys ``src, rephrase, pred, alt, image, image_rephrase, loc, loc_ans,
m_loc, m_loc_q, m_loc_a``; image paths are relative to the dataset's image root. VLKEB's portability
files (``eval_edit_onehop.json``, ``eval_multihop.json``) and SYNTH-VLKEB add ``port_new``: a list of
``{port_q, port_a, port_edit_q, port_edit_a}``; ``port_q`` is asked about the edit image after the
edit and its answer ``port_a`` is scored as Port (the prompt as is, like ``src``).
"""
import json
from dataclasses import dataclass
from pathlib import Path

from utils.errors import UserError
from vl_datasets.records import EditRecord, Sample

REQUIRED_KEYS = ("src", "rephrase", "pred", "alt", "image", "image_rephrase",
                 "loc", "loc_ans", "m_loc", "m_loc_q", "m_loc_a")


@dataclass(frozen=True)
class DatasetSpec:
    """Where a dataset lives (relative to the data dir) and how its prompts are written."""

    name: str
    files: dict            # split -> JSON path relative to the data dir
    image_root: str        # relative to the data dir
    vqa_prompts: bool      # E-VQA style: "{question} The answer is:"; else src/rephrase as is
    synthetic: bool = False
    # Datasets that ship no validation file: ``val`` is the last ``val_slice`` records of the train
    # file, and ``train`` leaves them out (unless ``include_val_slice``). 0: ``val`` has its own file.
    val_slice: int = 0

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self.files) + (("val",) if self.val_slice else ())

    def split_file(self, data_dir: Path, split: str) -> Path:
        if split not in self.splits:
            raise UserError(f"dataset {self.name} has no split {split!r}; splits: {', '.join(self.splits)}")
        return Path(data_dir) / self.files["train" if split == "val" and self.val_slice else split]


def answer_prompt(question: str) -> str:
    return f"{question} The answer is:"


PORT_KEYS = ("port_q", "port_a")


def portability_samples(raw: dict, index: int, image: str, where: str) -> tuple[Sample, ...]:
    """The Port samples of a record: one per ``port_new`` item (none when the key is absent)."""
    items = raw.get("port_new")
    if items is None:
        return ()
    if not isinstance(items, list):
        raise UserError(f"{where}: record {index} key 'port_new' must be a list, got {type(items).__name__}")
    out = []
    for j, item in enumerate(items):
        if not isinstance(item, dict) or any(not isinstance(item.get(k), str) for k in PORT_KEYS):
            raise UserError(f"{where}: record {index} port_new[{j}] needs string keys {', '.join(PORT_KEYS)}")
        out.append(Sample(item["port_q"], item["port_a"], image))
    return tuple(out)


def record_from_json(spec: DatasetSpec, raw: dict, index: int, image_root: Path, where: str) -> EditRecord:
    if not isinstance(raw, dict):
        raise UserError(f"{where}: record {index} is not a JSON object")
    for key in REQUIRED_KEYS:
        if key not in raw:
            raise UserError(f"{where}: record {index} lacks key {key!r}")
    images = {}
    for key in ("image", "image_rephrase", "m_loc"):
        path = image_root / raw[key]
        if not path.is_file():
            raise UserError(f"image file missing: {path} (record {index} key {key!r} in {where})")
        images[key] = str(path)
    fmt = answer_prompt if spec.vqa_prompts else (lambda s: s)
    target = str(raw["alt"])
    return EditRecord(
        index=index,
        edit=Sample(fmt(raw["src"]), target, images["image"]),
        text_rephrase=Sample(fmt(raw["rephrase"]), target, images["image"]),
        image_rephrase=Sample(fmt(raw["src"]), target, images["image_rephrase"]),
        text_loc=Sample(f"{raw['loc']}?", str(raw["loc_ans"]), None),
        image_loc=Sample(answer_prompt(raw["m_loc_q"]), str(raw["m_loc_a"]), images["m_loc"]),
        pred=None if raw["pred"] is None else str(raw["pred"]),
        portability=portability_samples(raw, index, images["image"], where),
    )


def load_records(spec: DatasetSpec, data_dir, split: str, limit: int | None = None,
                 include_val_slice: bool = False) -> list[EditRecord]:
    """Read ``split`` of ``spec`` under ``data_dir``; ``limit`` keeps the first N records. For a
    dataset whose ``val`` is a slice of its train file, ``train`` leaves that slice out unless
    ``include_val_slice``."""
    path = spec.split_file(data_dir, split)
    if not path.is_file():
        raise UserError(f"dataset {spec.name}: annotation file missing: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"dataset {spec.name}: {path} is not valid JSON ({e})") from None
    if not isinstance(raw, list):
        raise UserError(f"dataset {spec.name}: {path} must hold a JSON list of records")
    if spec.val_slice and split in ("train", "val"):
        if len(raw) <= spec.val_slice:
            raise UserError(f"dataset {spec.name}: {path} has {len(raw)} records; its last {spec.val_slice} "
                            f"are the val split, so it needs more")
        cut = len(raw) - spec.val_slice
        raw = raw[cut:] if split == "val" else (raw if include_val_slice else raw[:cut])
    if limit is not None:
        if limit <= 0:
            raise UserError(f"the number of records must be positive, got {limit}")
        raw = raw[:limit]
    image_root = Path(data_dir) / spec.image_root
    return [record_from_json(spec, r, i, image_root, str(path)) for i, r in enumerate(raw)]
