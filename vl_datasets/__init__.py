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
# The real datasets ship no validation file: their ``val`` split is the last 10% of the train file, at
# most REAL_VAL_SLICE records (E-VQA 500, E-IC 284, VLKEB 500), which training leaves out
# (train_vllm_editor.py --include_val_slice keeps them).
REAL_VAL_SLICE = 500
_SYNTH_VAL = {"EVQA": "easy-edit-mm/vqa/vqa_val.json", "EIC": "easy-edit-mm/caption/caption_val_edit.json",
              "VLKEB": "VLKEB/val.json"}
# SYNTH-EVQA's large eval split (10,000 records for one long edit stream; synthetic/large_eval.py writes it)
LARGE_EVAL_SPLIT = "eval_large"
_SYNTH_LARGE = {"EVQA": {LARGE_EVAL_SPLIT: "easy-edit-mm/vqa/vqa_eval_large.json"}}
for _name, _layout in _LAYOUTS.items():
    DATASETS.register(_name, DatasetSpec(name=_name, val_slice=REAL_VAL_SLICE, **_layout))
    # The synthetic twin has the same layout under <data_dir>/synthetic, plus a val file of its own
    # (entities disjoint from train and eval), and SYNTH-EVQA a large eval split.
    _files = {**_layout["files"], "val": _SYNTH_VAL[_name], **_SYNTH_LARGE.get(_name, {})}
    _synth = {**_layout, "files": {k: f"synthetic/{v}" for k, v in _files.items()},
              "image_root": f"synthetic/{_layout['image_root']}"}
    DATASETS.register(f"SYNTH-{_name}", DatasetSpec(name=f"SYNTH-{_name}", synthetic=True, **_synth))

# VLKEB's portability files: the VLKEB schema plus ``port_new`` (scored as Port); evaluation only.
for _name, _file in (("VLKEB-ONEHOP", "VLKEB/eval_edit_onehop.json"), ("VLKEB-MULTIHOP", "VLKEB/eval_multihop.json")):
    DATASETS.register(_name, DatasetSpec(name=_name, files={"eval": _file}, image_root="VLKEB/mmkb_images",
                                         vqa_prompts=False))

# Names as the reference implementation spells them.
DATASET_ALIASES = {"E-VQA": "EVQA", "E-IC": "EIC"}


def get_dataset_spec(name: str) -> DatasetSpec:
    return DATASETS.get(DATASET_ALIASES.get(name, name))


def load_dataset(name: str, split: str, data_dir=None, limit: int | None = None,
                 include_val_slice: bool = False, verify_images: bool = True) -> list[EditRecord]:
    """Load ``split`` ('train', 'val', 'eval'; SYNTH-EVQA also 'eval_large') of dataset ``name`` (``include_val_slice``,
    ``verify_images``: see ``load_records``). A synthetic dataset must have been generated: the scripts first call
    ``synthetic.embedded.prepare_dataset``, which generates the world on first use."""
    spec = get_dataset_spec(name)
    data_dir = Path(data_dir) if data_dir else DATA_DIR
    return load_records(spec, data_dir, split, limit, include_val_slice, verify_images)


__all__ = ["DATASETS", "LARGE_EVAL_SPLIT", "REAL_VAL_SLICE", "EditRecord", "Sample", "get_dataset_spec", "load_dataset", "open_image"]
