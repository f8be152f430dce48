"""Command-line options of train_vllm_editor.py, resolved and validated before anything is loaded.

Every flag defaults to ``None`` on the parser, so we can tell what the user typed. A new run fills
the gaps from ``DEFAULTS``; a resumed run (``-lkpt``) fills them from the arguments saved with its
checkpoint, so ``-lkpt PATH`` alone continues the run as it was configured. Flags that decide what
is trained and in which order (editor, backbone, dataset, batch size, seed, number of records) must
match the checkpoint's when given.
"""
import argparse
import dataclasses
import random
from dataclasses import dataclass
from pathlib import Path

from training.checkpoint import CONFIG_FILE, resolve_checkpoint
from utils.devices import check_available, default_device, parse_device, parse_device_list
from utils.errors import CliParser, UserError
from utils.io import read_yaml

MIXED_PRECISION = ("no", "fp16", "bf16")


@dataclass
class TrainOptions:
    editor_name: str
    edit_model_name: str
    data_name: str
    batch_size: int
    device: str = "cpu"
    data_n: int | None = None
    load_ckpt_path: str | None = None
    extra_devices: list | None = None
    epochs: int = 1000
    train_name_prefix: str | None = None
    save_ckpt_per_i: int = 1000
    log_per_i: int = 1
    ema_alpha: float = 0.1
    random_seed: int | None = None
    data_buffer_size: int = 4
    max_steps: int | None = None
    data_dir: str | None = None
    model_path: str | None = None
    records_dir: str | None = None
    mixed_precision: str | None = None   # None: what `accelerate launch` / its config says, else "no"
    config: str | None = None            # editor config YAML; default configs/<editor>/<backbone>.yaml
    include_val_slice: bool = False      # real datasets: also train on the train-file slice that is `val`


REQUIRED = ("editor_name", "edit_model_name", "data_name", "batch_size")
# Flags that fix what is trained and in which order: a resumed run must keep them.
IDENTITY = ("editor_name", "edit_model_name", "data_name", "batch_size", "random_seed", "data_n",
            "include_val_slice")


def _none_or(value: str):
    return None if value is None or value.strip().lower() == "none" else value


def build_parser() -> argparse.ArgumentParser:
    p = CliParser(
        prog="train_vllm_editor.py",
        description="Train a trainable knowledge editor (e.g. LiveEdit) on a frozen vision-language "
                    "model. Multi-process data parallel: `accelerate launch --num_processes N "
                    "train_vllm_editor.py ...`.")
    a = p.add_argument
    a("-en", "--editor_name", help="editor to train, e.g. liveedit (required for a new run)")
    a("-mn", "--edit_model_name", help="backbone: blip2, llava, minigpt4, tiny-blip2, ... (required for a new run)")
    a("-dna", "--data_name", help="training dataset: EVQA, EIC, VLKEB or SYNTH-EVQA, ... (required for a new run)")
    a("-bs", "--batch_size", type=int, help="training records per step, over all processes (required for a new run)")
    a("-dvc", "--device", help="device of a single-process run: cpu, cuda:N, N or auto (the backbone spread over "
                               "the visible GPUs by accelerate; default: cuda:0 when "
                               "available, else cpu); under `accelerate launch` each process uses its own")
    a("-dn", "--data_n", type=int, help="use only the first N training records (default: all)")
    a("-lkpt", "--load_ckpt_path", help="checkpoint (or run folder) to resume from; 'none' for a new run")
    a("-edvc", "--extra_devices", help="extra GPUs for the editor's helper work, e.g. a second frozen backbone "
                                       "copy ('1,2' or 'cuda:1,cuda:2'); 'none' (default); ignored on CPU")
    a("-eps", "--epochs", type=int, help="stop after this many epochs (default 1000)")
    a("-tnp", "--train_name_prefix", help="prefix of the run name: records/.../<prefix>-<timestamp>")
    a("-sci", "--save_ckpt_per_i", type=int, help="save a checkpoint every N steps (default 1000; always at the end)")
    a("-lpi", "--log_per_i", type=int, help="log every loss term every N steps to logs/train.jsonl (default 1)")
    a("-ea", "--ema_alpha", type=float, help="EMA factor of the displayed loss: ema = a*loss + (1-a)*ema (default 0.1)")
    a("-rs", "--random_seed", type=int, help="random seed (default: drawn at random and saved with the run)")
    a("-dbs", "--data_buffer_size", type=int, help="batches the data loader prepares ahead (default 4)")
    a("--max_steps", type=int, help="stop after this many steps in total (default: the editor config's train.max_steps, else -eps epochs)")
    a("--data_dir", help="root of the datasets (default: data/)")
    a("--model_path", help="local folder of the backbone weights (default: utils/GLOBAL.py model_path_map)")
    a("--records_dir", help="where runs are written (default: records/)")
    a("--mixed_precision", choices=MIXED_PRECISION,
      help="autocast the forward in fp16/bf16 (default: as `accelerate launch` says, else no)")
    a("--config", help="editor config YAML (default: configs/<editor>/<backbone>.yaml)")
    a("--include_val_slice", action="store_true", default=None,
      help="real datasets (no val file): also train on the last records of the train file, which "
           "test_vllm_edit.py --split val evaluates on (default: left out)")
    return p


def _saved_args(ckpt: Path) -> dict:
    path = ckpt / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"checkpoint {ckpt} has no {CONFIG_FILE}; it cannot be resumed")
    saved = read_yaml(path, "checkpoint config") or {}
    if not isinstance(saved, dict) or not isinstance(saved.get("args"), dict) or "editor_config" not in saved:
        raise UserError(f"{path} is not a training config (no 'args' / 'editor_config')")
    return saved


def _canonical(key: str, value):
    """Names compared by what they mean: backbone aliases and dataset aliases resolved."""
    if value is None:
        return None
    if key == "edit_model_name":
        from backbones import resolve_backbone_name
        return resolve_backbone_name(value)
    if key == "data_name":
        from vl_datasets import get_dataset_spec
        return get_dataset_spec(value).name
    return value


def resolve_options(ns: argparse.Namespace):
    """-> (TrainOptions, resume checkpoint folder or None, saved run config or None)."""
    given = {k: v for k, v in vars(ns).items() if v is not None}
    ckpt = saved = None
    lkpt = _none_or(given.pop("load_ckpt_path", None))
    if lkpt is not None:
        ckpt = resolve_checkpoint(lkpt)
        if ckpt.parent.name != "checkpoints":
            raise UserError(f"-lkpt {lkpt}: checkpoint {ckpt} is not inside a run folder "
                            f"(<run>/checkpoints/step_<N>), so there is no run to continue")
        saved = _saved_args(ckpt)
        for key in IDENTITY:
            if key in given and _canonical(key, given[key]) != _canonical(key, saved["args"].get(key)):
                raise UserError(f"-lkpt {lkpt}: the checkpoint was trained with {key}="
                                f"{saved['args'].get(key)!r}, not {given[key]!r}; leave the flag out to resume")
        fields = {f.name for f in dataclasses.fields(TrainOptions)}
        # Where the run's files live comes from the checkpoint; its editor config is the saved one.
        values = {k: v for k, v in saved["args"].items() if k in fields and k not in ("config", "records_dir")}
        values.update(given)
    else:
        missing = [k for k in REQUIRED if k not in given]
        if missing:
            flags = {"editor_name": "-en", "edit_model_name": "-mn", "data_name": "-dna", "batch_size": "-bs"}
            raise UserError(f"missing required flag(s) for a new run: "
                            f"{', '.join(flags[k] + '/--' + k for k in missing)}")
        values = given
    values["load_ckpt_path"] = str(ckpt) if ckpt else None
    opts = TrainOptions(**values)
    # -dvc auto: a backbone split over the GPUs (backbones/devices.py)
    opts.device = (check_available(parse_device(opts.device, "-dvc", allow_auto=True)) if opts.device
                   else default_device())
    opts.extra_devices = parse_device_list(opts.extra_devices, "-edvc")
    _validate(opts)
    if opts.random_seed is None:
        opts.random_seed = random.SystemRandom().randrange(2 ** 31)
    return opts, ckpt, saved


def _validate(o: TrainOptions):
    def positive(name, flag, allow_none=False):
        v = getattr(o, name)
        if v is None and allow_none:
            return
        if not isinstance(v, int) or v < 1:
            raise UserError(f"{flag}/--{name} must be a positive integer, got {v!r}")
    positive("batch_size", "-bs")
    positive("epochs", "-eps")
    positive("save_ckpt_per_i", "-sci")
    positive("log_per_i", "-lpi")
    positive("data_buffer_size", "-dbs")
    positive("data_n", "-dn", allow_none=True)
    positive("max_steps", "--max_steps", allow_none=True)
    if not 0.0 < o.ema_alpha <= 1.0:
        raise UserError(f"-ea/--ema_alpha must be in (0, 1], got {o.ema_alpha}")
    if o.random_seed is not None and not 0 <= o.random_seed < 2 ** 32 - 100_000:
        raise UserError(f"-rs/--random_seed must be in [0, 2**32 - 100000), got {o.random_seed}")
    if o.mixed_precision is not None and o.mixed_precision not in MIXED_PRECISION:
        raise UserError(f"--mixed_precision must be one of {', '.join(MIXED_PRECISION)}, got {o.mixed_precision!r}")
    if o.config is not None and not Path(o.config).is_file():
        raise UserError(f"--config {o.config}: no such file")
