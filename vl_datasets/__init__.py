"""Dataset registry. A new dataset in the shared schema is one ``DatasetSpec`` registered below; a
new schema gets its own loader module and registers a spec of its own."""
from pathlib import Path

from utils.GLOBAL import DATA_DIR
from utils.registry import Registry
from vl_datasets.mmedit import DatasetSpec, load_records
from vl_datasets.records import EditRecord, Sample, open_image

DATASETS = Registry("dataset")

_LAYOUTS = {
    "EVQA": dict(files={"train": "easy-edit-mm/vqa/vqa_train.json", "eval": "easy-edit-mm/vqa/vqa_eval.json"},
                 image_root="easy-edit-mm/images", vqa_prompts=True),
    "EIC": dict(files={"train": "easy-edit-mm/caption/caption_train_edit.json",
                       "eval": "easy-edit-mm/caption/caption_eval_edit.json"},
                image_root="easy-edit-mm/images", vqa_prompts=False),
    "VLKEB": dict(files={"train": "VLKEB/train.json", "eval": "VLKEB/eval.json"},
                  image_root="VLKEB/mmkb_images", vqa_prompts=False),
}
for _name, _layout in _LAYOUTS.items():
    DATASETS.register(_name, DatasetSpec(name=_name, **_layout))
    # The synthetic twin has the same layout under <data_dir>/synthetic.
    _synth = {**_layout, "files": {k: f"synthetic/{v}" for k, v in _layout["files"].items()},
              "image_root": f"synthetic/{_layout['image_root']}"}
    DATASETS.register(f"SYNTH-{_name}", DatasetSpec(name=f"SYNTH-{_name}", synthetic=True, **_synth))

# Names as the reference implementation spells them.
DATASET_ALIASES = {"E-VQA": "EVQA", "E-IC": "EIC"}


def get_dataset_spec(name: str) -> DatasetSpec:
    return DATASETS.get(DATASET_ALIASES.get(name, name))


def load_dataset(name: str, split: str, data_dir=None, limit: int | None = None) -> list[EditRecord]:
    """Load ``split`` ('train' or 'eval') of dataset ``name``; synthetic datasets are generated on
    first use."""
    spec = get_dataset_spec(name)
    data_dir = Path(data_dir) if data_dir else DATA_DIR
    if spec.synthetic:
        from synthetic.world import ensure_world
        ensure_world(data_dir / "synthetic")
    return load_records(spec, data_dir, split, limit)


__all__ = ["DATASETS", "EditRecord", "Sample", "get_dataset_spec", "load_dataset", "open_image"]
