"""The one training loop shared by every trainable editor, built on accelerate.

What an editor provides (see ``editors/base.py``): ``trainable = True``, ``trainable_parameters()``
(a deterministic order), ``training_losses(records) -> {name: already-weighted loss}``,
``trainable_state_dict()`` / ``load_trainable_state_dict()``, and a ``config`` with a ``train``
section holding ``lr``, ``lr_cut_step`` (None: never) and ``lr_cut_factor``, and optionally
``max_steps`` (the training length the config was tuned for; ``--max_steps`` overrides it). Optional:

- ``editor.generator``: a ``torch.Generator`` for the editor's random choices; the loop seeds it
  with ``-rs`` (the same on every process, so draws made for the global batch agree) and saves /
  restores its state for exact resume. An editor may instead define ``rng_state()`` /
  ``set_rng_state(state)``;
- ``editor.training_memory()`` / ``set_training_memory(memory)``: state other than the weights that
  shapes the next steps (LiveEdit's pool of earlier batches' samples), saved per process in each
  checkpoint so that a resumed run continues exactly;
- a config field ``seed``: replaced by ``-rs`` before the editor is built, so ``-rs`` seeds the
  initialisation of the trainable modules (the saved editor config records it);
- ``editor.prepare_training_batch(records)``: runs in the prefetch thread (``-dbs`` ahead) and its
  result is what ``training_losses`` receives; it must not use any random generator;
- ``editor.set_extra_devices(devices)``: receives ``-edvc`` on a CUDA machine.

Data parallel (``accelerate launch --num_processes N``): every process builds the same editor from
the same seed, takes its contiguous share of each global batch of ``-bs`` records, and scales its
loss by its share of the batch; the gradients of the trainable parameters are then summed across
processes with ``accelerator.reduce``, which gives the gradient of the mean over the whole batch
(for losses that are means over records), so every process takes the same optimizer step. Losses
that compare samples across the batch gather the other processes' features with
``utils.distributed.gather_rows`` and so see the global batch too.
"""
import dataclasses
import json
import random
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import broadcast_object_list, gather_object, set_seed
from tqdm import tqdm

from backbones import load_backbone, resolve_backbone_name
from editors import EDITORS
from backbones.loading import check_model_folder
from synthetic.embedded import prepare_backbone, prepare_dataset
from training import runlog
from training.checkpoint import (checkpoint_agrees, checkpoint_dir, latest_checkpoint, load_trained_weights,
                                 load_training_state, save_checkpoint)
from training.data import BatchOrder, Position, Prefetcher, shard
from utils.distributed import local_rows_count
from training.options import TrainOptions
from training.precision import LossScaling
from utils.GLOBAL import RECORDS_DIR
from utils.config import from_dict, load_config, to_dict
from utils.errors import UserError, describe_os_error
from utils.io import remove_temporaries, write_yaml
from utils.locks import RunLock, claim_folder
from utils.paths import check_folder_name, check_writable_root
from vl_datasets import get_dataset_spec, load_dataset

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class TrainResult:
    run_dir: Path
    final_checkpoint: Path
    step: int
    step_seconds: list = field(default_factory=list)   # wall time of each step of this invocation
    editor: object = None


def lr_lambda(cut_step, factor):
    """Multiplier of the base lr after ``n`` finished steps: 1, then 1/factor from step cut_step+1 on."""
    def f(n):
        return 1.0 if cut_step is None or n < cut_step else 1.0 / factor
    return f


# ---- random state ---------------------------------------------------------------------------------
def _editor_rng_get(editor):
    if hasattr(editor, "rng_state"):
        return editor.rng_state()
    g = getattr(editor, "generator", None)
    return g.get_state() if isinstance(g, torch.Generator) else None


def _editor_rng_set(editor, state):
    if state is None:
        return
    if hasattr(editor, "set_rng_state"):
        editor.set_rng_state(state)
    elif isinstance(getattr(editor, "generator", None), torch.Generator):
        editor.generator.set_state(state)


def _seed_all(editor, seed: int, editor_seed: int):
    """Global RNGs from ``seed`` (per process); the editor's generator from ``editor_seed`` (the
    same on every process: its draws are made for the global batch)."""
    set_seed(seed)
    g = getattr(editor, "generator", None)
    if isinstance(g, torch.Generator):
        g.manual_seed(editor_seed)


def rng_state(editor) -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "editor": _editor_rng_get(editor),
            "editor_memory": editor.training_memory() if hasattr(editor, "training_memory") else None}


def set_rng_state(editor, state: dict):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    _editor_rng_set(editor, state.get("editor"))
    if state.get("editor_memory") is not None and hasattr(editor, "set_training_memory"):
        editor.set_training_memory(state["editor_memory"])


# ---- gradients across processes ------------------------------------------------------------------
def sum_gradients(params, accelerator):
    """Sum the gradients of ``params`` over all processes (one flat all-reduce per dtype/device)."""
    groups = {}
    for p in params:
        groups.setdefault((p.dtype, p.device), []).append(p)
    for ps in groups.values():
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in ps])
        flat = accelerator.reduce(flat, reduction="sum")
        offset = 0
        for p in ps:
            n = p.numel()
            p.grad = flat[offset:offset + n].view_as(p).clone()
            offset += n


# ---- the loop -------------------------------------------------------------------------------------
def _make_accelerator(opts: TrainOptions) -> Accelerator:
    if PartialState._shared_state and PartialState().num_processes == 1:
        # In-process repeated runs (tests, notebooks): start from a fresh accelerate state, so a
        # second run may choose another mixed precision or device.
        AcceleratorState._reset_state(reset_partial_state=True)
    if opts.device.startswith("cuda") and torch.cuda.is_available() and ":" in opts.device:
        torch.cuda.set_device(opts.device)
    try:
        return Accelerator(cpu=opts.device == "cpu", mixed_precision=opts.mixed_precision)
    except ValueError as e:
        raise UserError(f"cannot set up accelerate: {e}") from None


def _claim_new_run(root: Path, prefix: str | None) -> RunLock:
    """Create and lock a new run folder ``<prefix>-<YYYYmmdd-HHMMSS>[-k]`` under ``root``. The folder is
    made exclusively, so two runs started in the same second with the same prefix get two names."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = f"{prefix}-{stamp}" if prefix else stamp
    for k in range(10_000):
        try:
            return claim_folder(root / (base if k == 0 else f"{base}-{k}"), "training run folder", new=True)
        except FileExistsError:
            continue
    raise UserError(f"cannot find a free run name {base}-<k> under {root}")


def _claim_resumed_run(run_dir: Path, ckpt: Path, resume_latest: bool) -> RunLock:
    """Lock the run folder of ``ckpt`` and check, now that no other process can change it, that the
    checkpoint is still the one to continue from; remove what killed checkpoint writes left."""
    lock = claim_folder(run_dir, "training run folder")
    try:
        remove_temporaries(run_dir / "checkpoints")
        if resume_latest:
            latest = latest_checkpoint(run_dir)
            if latest != ckpt:
                raise UserError(f"run {run_dir} moved on to {latest.name if latest else 'no checkpoint'} while this "
                                f"resume was starting (another process held it); run the command again")
        elif not checkpoint_agrees(ckpt):
            raise _disagreeing(ckpt, run_dir)
    except BaseException:
        lock.release()
        raise
    return lock


def _disagreeing(ckpt: Path, run_dir: Path) -> UserError:
    latest = latest_checkpoint(run_dir)
    return UserError(f"checkpoint {ckpt} no longer agrees with {runlog.log_path(run_dir)}: the run was resumed "
                     f"from an earlier checkpoint and its steps were logged again; resume from "
                     f"{latest or 'an earlier checkpoint'} or from the run folder (its latest agreeing checkpoint)")


def _on_main(accelerator, world: int, fn, share=lambda result: None):
    """Run ``fn`` on the main process only; every process gets ``share(result)`` (something picklable,
    e.g. a folder name) or, when ``fn`` failed on bad input or I/O, the same UserError. Returns
    ``(result, shared)``; ``result`` is None on the other processes."""
    result, shared, error = None, None, None
    if accelerator.is_main_process:
        try:
            result = fn()
            shared = share(result)
        except UserError as e:
            error = str(e)
        except OSError as e:
            error = describe_os_error(e)
    if world > 1:
        box = [(shared, error)]
        broadcast_object_list(box)
        shared, error = box[0]
    if error is not None:
        raise UserError(error)
    return result, shared


def train(opts: TrainOptions, resume_ckpt: Path | None = None, saved: dict | None = None,
          announce: bool = True, resume_latest: bool = False) -> TrainResult:
    """One training run (new, or resumed from ``resume_ckpt`` whose run config is ``saved``); with
    ``announce`` the main process prints the final checkpoint and the command to evaluate it.
    ``resume_latest``: the user named the run folder, so ``resume_ckpt`` must still be its latest
    checkpoint once the run is locked.

    Everything the user gave is checked before anything is written (names, paths, config, records
    and their images, the checkpoint and its training state, the model folder); then the main process
    claims the run folder (a new one, uniquely named, or the resumed one), which stays locked until
    the run ends. A new run that fails before its first checkpoint leaves no folder behind."""
    # -- names first: a bad one fails before anything is loaded or written
    editor_cls = EDITORS.get(opts.editor_name)
    if not getattr(editor_cls, "trainable", False):
        trainable = [n for n in EDITORS.names() if getattr(EDITORS.get(n), "trainable", False)]
        raise UserError(f"editor {opts.editor_name!r} is not trainable; trainable editors: "
                        f"{', '.join(trainable) or 'none'}")
    backbone_name = resolve_backbone_name(opts.edit_model_name)
    dataset = get_dataset_spec(opts.data_name).name
    if opts.train_name_prefix is not None:
        check_folder_name(opts.train_name_prefix, "-tnp/--train_name_prefix")
    if resume_ckpt is not None:
        root = check_writable_root(resume_ckpt.parent.parent, "-lkpt run folder")
    else:
        records_root = check_writable_root(Path(opts.records_dir or RECORDS_DIR), "--records_dir")
        root = records_root / opts.editor_name / backbone_name / dataset

    accelerator = _make_accelerator(opts)
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    notes = []   # printed once every check has passed, so that bad input gives exactly one line
    if opts.batch_size < world:
        raise UserError(f"-bs {opts.batch_size} is smaller than the number of processes ({world})")

    # -- editor config: the checkpoint's when resuming, else the YAML
    if saved is not None:
        if opts.config:
            notes.append("--config is ignored when resuming; the checkpoint's editor config is used")
        config = from_dict(editor_cls.config_class, saved["editor_config"], str(resume_ckpt / "config.yaml"))
    else:
        config = load_config(editor_cls.config_class, opts.editor_name, backbone_name, opts.config)
        if "seed" in {f.name for f in dataclasses.fields(config)}:
            config = dataclasses.replace(config, seed=opts.random_seed)   # -rs seeds the initialisation
    tcfg = getattr(config, "train", None)
    for key in ("lr", "lr_cut_step", "lr_cut_factor"):
        if not hasattr(tcfg, key):
            raise UserError(f"the config of editor {opts.editor_name!r} lacks train.{key}")

    prepare_dataset(dataset, opts.data_dir)
    records = load_dataset(dataset, "train", opts.data_dir, opts.data_n, opts.include_val_slice)
    if not records:
        raise UserError(f"dataset {dataset} has no training records")
    state = None
    if resume_ckpt is not None:
        state = load_training_state(resume_ckpt)   # a truncated or corrupt state fails here, before any write
        if resume_ckpt.name != f"step_{state['step']}":
            raise UserError(f"checkpoint {resume_ckpt}: its training state is of step {state['step']}")
        if not resume_latest and not checkpoint_agrees(resume_ckpt):
            raise _disagreeing(resume_ckpt, root)
    model_path = check_model_folder(prepare_backbone(backbone_name, opts.model_path))
    note = lambda msg: accelerator.print(f"note: {msg}", file=sys.stderr)

    # -- the run folder: claimed by the main process, locked for the whole run
    if resume_ckpt is not None:
        lock, _ = _on_main(accelerator, world, lambda: _claim_resumed_run(root, resume_ckpt, resume_latest))
        run_dir = root
    else:
        lock, name = _on_main(accelerator, world, lambda: _claim_new_run(root, opts.train_name_prefix),
                              share=lambda claimed: claimed.folder.name)
        run_dir = root / name
    for line in notes:   # the run is ours now: nothing below is a refusal of the input
        note(line)
    try:
        return _train_in(opts, accelerator, editor_cls, config, tcfg, records, backbone_name, dataset,
                         model_path, resume_ckpt, state, run_dir, announce, note)
    except BaseException:
        # a new run that produced no checkpoint leaves nothing: the corrected command starts clean
        if lock is not None and resume_ckpt is None and not any((run_dir / "checkpoints").glob("step_*")):
            lock.discard()
        raise
    finally:
        if lock is not None:
            lock.release()


def _train_in(opts, accelerator, editor_cls, config, tcfg, records, backbone_name, dataset, model_path,
              resume_ckpt, state, run_dir: Path, announce: bool, note) -> TrainResult:
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    # -- build: the same seed on every process gives every process the same initial weights
    set_seed(opts.random_seed)
    if world > 1:
        device = accelerator.device
        if device.type == "cuda" and str(device) != opts.device:
            note(f"-dvc {opts.device} is ignored under a multi-process launch; process {rank} uses {device}")
    else:   # -dvc auto: the backbone spread over the visible GPUs (each module placed by accelerate)
        device = accelerator.device if opts.device == "auto" else torch.device(opts.device)
    dtype = DTYPES.get(accelerator.mixed_precision) if device.type == "cuda" else None
    where = "auto" if opts.device == "auto" and world == 1 else "cpu" if device.type == "cpu" else str(device)
    backbone = load_backbone(backbone_name, where, model_path, dtype)
    editor = editor_cls(backbone, config)
    params = list(editor.trainable_parameters())
    if not params:
        raise UserError(f"editor {opts.editor_name!r} has no trainable parameters")
    if opts.extra_devices:
        if not torch.cuda.is_available():
            note(f"-edvc {','.join(opts.extra_devices)} is ignored on CPU")
        elif hasattr(editor, "set_extra_devices"):
            editor.set_extra_devices(opts.extra_devices)
        else:
            note(f"editor {opts.editor_name!r} does not use extra devices; -edvc ignored")

    optimizer = torch.optim.Adam(params, lr=float(tcfg.lr))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(tcfg.lr_cut_step, float(tcfg.lr_cut_factor)))
    optimizer = accelerator.prepare(optimizer)   # the scheduler stays ours: one cut step, any process count
    scaling = LossScaling(backbone.dtype, backbone.device, accelerator)   # a float16 backbone: scaled loss
    _seed_all(editor, opts.random_seed + rank, opts.random_seed)

    order = BatchOrder(len(records), opts.batch_size, opts.random_seed)
    total_steps = opts.epochs * order.batches_per_epoch
    max_steps = opts.max_steps if opts.max_steps is not None else getattr(tcfg, "max_steps", None)
    if max_steps is not None:
        total_steps = min(total_steps, max_steps)

    step, pos, ema = 0, Position(0, 0), None
    if resume_ckpt is not None:
        load_trained_weights(editor, resume_ckpt)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler") is not None and scaling.scaler is not None:
            scaling.scaler.load_state_dict(state["scaler"])
        step, pos, ema = state["step"], Position(**state["position"]), state["ema_loss"]
        if len(state["rng"]) == world:
            set_rng_state(editor, state["rng"][rank])
        else:
            note(f"the checkpoint was written by {len(state['rng'])} process(es), this run has {world}: "
                 f"random streams (and any editor memory) restart from the seed")
            _seed_all(editor, opts.random_seed + rank + 7919 * step, opts.random_seed + 7919 * step)

    run_config = {
        "editor": editor.name, "backbone": backbone_name, "dataset": dataset, "run": run_dir.name,
        "backbone_fingerprint": backbone.fingerprint,
        "world_size": world, "mixed_precision": accelerator.mixed_precision,
        "resumed_from": str(resume_ckpt) if resume_ckpt else None,
        "editor_config": to_dict(config), "args": to_dict(opts),
    }
    metadata = {"editor": editor.name, "backbone": backbone_name, "dataset": dataset, "run": run_dir.name,
                "backbone_fingerprint": str(backbone.fingerprint)}
    log_file = runlog.log_path(run_dir)
    digest = None
    if main:
        write_yaml(run_dir / "config.yaml", run_config)
        log_file.parent.mkdir(parents=True, exist_ok=True)
        # the log continues from the checkpoint: lines after its step are logged again below
        digest = runlog.LogDigest(runlog.truncate(log_file, step))

    def save(at_step: int) -> Path:
        states = gather_object([rng_state(editor)]) if world > 1 else [rng_state(editor)]
        path = checkpoint_dir(run_dir, at_step)
        if main:
            log_sha = digest.hexdigest()   # the log lines of steps <= at_step, as written so far
            state = {"step": at_step, "position": {"epoch": pos.epoch, "batch": pos.batch}, "ema_loss": ema,
                     "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "scaler": scaling.scaler.state_dict() if scaling.scaler is not None else None,
                     "rng": states, "world_size": world, "batches_per_epoch": order.batches_per_epoch,
                     "log_sha256": log_sha}
            save_checkpoint(run_dir, at_step, editor.trainable_state_dict(),
                            {**metadata, "step": at_step, "log_sha256": log_sha}, state, run_config)
        accelerator.wait_for_everyone()
        return path

    # -- train
    prepare = getattr(editor, "prepare_training_batch", None)

    def batches():
        for p, idx in order.iterate(pos, opts.epochs):
            recs, w = shard([records[i] for i in idx], rank, world)
            yield p, (prepare(recs) if prepare is not None else recs), w

    stream = Prefetcher(batches(), opts.data_buffer_size)
    editor.train(True)
    bar = tqdm(total=total_steps, initial=step, disable=not main, desc=run_dir.name, dynamic_ncols=True,
               file=sys.stderr)
    saved_at = step if resume_ckpt is not None else None
    keys, step_seconds, log = None, [], None
    if main:
        log = open(log_file, "a", encoding="utf-8")
    t_start = time.perf_counter()
    try:
        it = iter(stream)
        while step < total_steps:
            t0 = time.perf_counter()
            try:
                p, batch, weight = next(it)
            except StopIteration:
                break
            lr = optimizer.param_groups[0]["lr"]
            with accelerator.autocast(), local_rows_count(weight > 0):
                terms = editor.training_losses(batch)
            if keys is None:
                keys = sorted(terms)
            elif sorted(terms) != keys:
                raise RuntimeError(f"editor {opts.editor_name!r} returned loss terms {sorted(terms)}, "
                                   f"earlier {keys}; the set must not change between steps")
            total = sum(terms[k] for k in keys)
            scaling.backward(total * weight)
            if world > 1:
                sum_gradients(params, accelerator)
            scaling.step(optimizer)
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            values = torch.stack([terms[k].detach().float() for k in keys]) * weight
            if world > 1:
                values = accelerator.reduce(values, reduction="sum")
            values = values.tolist()
            loss = float(sum(values))
            ema = loss if ema is None else opts.ema_alpha * loss + (1 - opts.ema_alpha) * ema
            step, pos = step + 1, order.after(p)
            step_seconds.append(time.perf_counter() - t0)
            if main:
                bar.update(1)
                bar.set_postfix(loss=f"{ema:.4f}", lr=f"{lr:.2e}", epoch=p.epoch)
                if step % opts.log_per_i == 0:
                    entry = {"step": step, "epoch": p.epoch, "lr": lr, "loss": loss, "ema_loss": ema,
                             "terms": dict(zip(keys, values)),
                             "elapsed_s": round(time.perf_counter() - t_start, 3)}
                    line = json.dumps(entry)
                    log.write(line + "\n")
                    log.flush()
                    digest.update(line)
            if step % opts.save_ckpt_per_i == 0:
                save(step)
                saved_at = step
    finally:
        stream.close()
        bar.close()
        if log is not None:
            log.close()
    final = checkpoint_dir(run_dir, step) if saved_at == step else save(step)
    editor.eval()
    if announce:
        accelerator.print(f"final checkpoint: {final}")
        accelerator.print(f"evaluate it with: python test_vllm_edit.py -en {opts.editor_name} "
                          f"-mn {opts.edit_model_name} -dn {dataset} -ckpt {final}")
    return TrainResult(run_dir=run_dir, final_checkpoint=final, step=step, step_seconds=step_seconds, editor=editor)
