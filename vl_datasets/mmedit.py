"""Loaders for the shared MMEdit / VLKEB JSON schema (E-VQA, E-IC, VLKEB and their synthetic twins).

Schema: a list of records with keys ``src, rephrase, pred, alt, image, image_rephrase, loc, loc_ans,
m_loc, m_loc_q, m_loc_a``; image paths are relative to the dataset's image root. VLKEB's portability
files (``eval_edit_onehop.json``, ``eval_multihop.json``) and SYNTH-VLKEB add ``port_new``: a list of
``{port_q, port_a, port_edit_q, port_edit_a}``; ``port_q`` is asked about the edit image after the
edit and its answer ``port_a`` is scored as Port (the prompt as is, like ``src``).
"""
from dataclasses import dataclass
from pathlib import Path

from utils.errors import UserError
from utils.io import read_json
from utils.paths import inside
from vl_datasets.records import EditRecord, Sample, check_images

REQUIRED_KEYS = ("src", "rephrase", "pred", "alt", "image", "image_rephrase",
                 "loc", "loc_ans", "m_loc", "m_loc_q", "m_loc_a")
IMAGE_KEYS = ("image", "image_rephrase", "m_loc")
# Prompts and targets: each must be a non-empty string (a null or a number is never silently str()-ed).
TEXT_KEYS = ("src", "rephrase", "alt", "loc", "loc_ans", "m_loc_q", "m_loc_a")


@dataclass(frozen=True)
class DatasetSpec:
    """Where a dataset lives (relative to the data dir) and how its prompts are written."""

    name: str
    files: dict            # split -> JSON path relative to the data dir
    image_root: str        # relative to the data dir
    vqa_prompts: bool      # E-VQA style: "{question} The answer is:"; else src/rephrase as is
    synthetic: bool = False
    # Datasets that ship no validation file: ``val`` is the last min(val_slice, n // 10) records of
    # the train file of n records, and ``train`` leaves them out (unless ``include_val_slice``).
    # 0: ``val`` has its own file.
    val_slice: int = 0

    def val_slice_size(self, n_train_file: int) -> int:
        return min(self.val_slice, n_train_file // 10)

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
    for key in TEXT_KEYS:
        value = raw[key]
        if not isinstance(value, str) or not value.strip():
            raise UserError(f"{where}: record {index} key {key!r} must be a non-empty string, got "
                            f"{'null' if value is None else repr(value)}")
    images = {}
    for key in IMAGE_KEYS:
        value = raw[key]
        if not isinstance(value, str) or not value.strip():
            raise UserError(f"{where}: record {index} key {key!r} must be an image path (a non-empty string), "
                            f"got {value!r}")
        try:
            path = inside(image_root, value)
        except ValueError:
            raise UserError(f"{where}: record {index} key {key!r}: image path {value!r} leads outside the image "
                            f"folder {image_root}") from None
        if not path.is_file():
            raise UserError(f"image file missing: {path} (record {index} key {key!r} in {where})")
        images[key] = str(path)
    fmt = answer_prompt if spec.vqa_prompts else (lambda s: s)
    target = raw["alt"]
    return EditRecord(
        index=index,
        edit=Sample(fmt(raw["src"]), target, images["image"]),
        text_rephrase=Sample(fmt(raw["rephrase"]), target, images["image"]),
        image_rephrase=Sample(fmt(raw["src"]), target, images["image_rephrase"]),
        text_loc=Sample(f"{raw['loc']}?", raw["loc_ans"], None),
        image_loc=Sample(answer_prompt(raw["m_loc_q"]), raw["m_loc_a"], images["m_loc"]),
        pred=None if raw["pred"] is None else str(raw["pred"]),
        portability=portability_samples(raw, index, images["image"], where),
    )


def load_records(spec: DatasetSpec, data_dir, split: str, limit: int | None = None,
                 include_val_slice: bool = False, verify_images: bool = True) -> list[EditRecord]:
    """Read ``split`` of ``spec`` under ``data_dir``; ``limit`` keeps the first N records. For a
    dataset whose ``val`` is a slice of its train file, ``train`` leaves that slice out unless
    ``include_val_slice``. Every record is checked (keys, non-empty string prompts and targets, image
    paths inside the image folder) and, with ``verify_images``, every image is opened and decoded
    once, so a bad one is found before a run writes anything."""
    path = spec.split_file(data_dir, split)
    if not path.is_file():
        hint = ""
        if spec.synthetic:
            large = " --large_eval 10000" if split == "eval_large" else ""
            hint = (f" (generate it with `python -m synthetic.world{large}`; the main scripts do it on "
                    f"first use)")
        raise UserError(f"dataset {spec.name}: annotation file missing: {path}{hint}")
    raw = read_json(path, f"dataset {spec.name}: annotation file")
    if not isinstance(raw, list):
        raise UserError(f"dataset {spec.name}: {path} must hold a JSON list of records")
    if spec.val_slice and split in ("train", "val"):
        n_val = spec.val_slice_size(len(raw))
        if split == "val" and n_val == 0:
            raise UserError(f"dataset {spec.name}: {path} has {len(raw)} records, too few for a val slice "
                            f"(its last 10%, at most {spec.val_slice})")
        cut = len(raw) - n_val
        raw = raw[cut:] if split == "val" else (raw if include_val_slice else raw[:cut])
    if limit is not None:
        if limit <= 0:
            raise UserError(f"the number of records must be positive, got {limit}")
        raw = raw[:limit]
    image_root = Path(data_dir) / spec.image_root
    records = [record_from_json(spec, r, i, image_root, str(path)) for i, r in enumerate(raw)]
    if verify_images:
        check_images(records)
    return records
