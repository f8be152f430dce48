"""``test_vllm_edit.py``: lifelong editing evaluation of one editor on one backbone and dataset.

Every check of the user's input happens before anything is written; then the run folder is claimed
(created and locked for the whole run). See the README, "Evaluation".
"""
import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch

from utils.GLOBAL import DATA_DIR, RECORDS_DIR
from utils.devices import check_available, default_device, parse_device
from utils.errors import CliParser, UserError
from utils.locks import LOCK_FILE, claim_folder
from utils.paths import check_folder_name, check_writable_root


def build_parser() -> argparse.ArgumentParser:
    p = CliParser(prog="test_vllm_edit.py", description="Lifelong (sequential) knowledge editing evaluation.")
    p.add_argument("-en", "--editor_name", required=True, help="editor, e.g. none, ft-l, liveedit")
    p.add_argument("-mn", "--edit_model_name", required=True, help="backbone name or alias (blip2, llava, ...)")
    p.add_argument("-sen", "--sequential_edit_n", type=int, default=None,
                   help="T: edits per chunk before testing and restoring (required unless --eval_at)")
    p.add_argument("-enp", "--eval_name_postfix", default="", help="suffix of the dataset folder of this run")
    p.add_argument("-dvc", "--device", default=None, help="cpu, cuda:N or auto (default: cuda:0 if available)")
    p.add_argument("-ckpt", "--checkpoint", default=None,
                   help="trained editor checkpoint (file or folder); the editor is built from the editor config "
                        "saved with it (config.yaml), else from configs/<editor>/<backbone>.yaml")
    p.add_argument("--config", default=None, metavar="YAML",
                   help="editor config instead of configs/<editor>/<backbone>.yaml (tuning; not with -ckpt, "
                        "which brings the config it was trained with)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one key of the editor config (dotted for sections, YAML value), after "
                        "--config or the checkpoint's saved config; repeatable. E.g. --set threshold=12.0 "
                        "sweeps an inference-time key of a trained editor")
    p.add_argument("-dn", "--data_name", required=True, help="EVQA, EIC, VLKEB or SYNTH-EVQA/EIC/VLKEB")
    p.add_argument("--split", default="eval", choices=("eval", "val", "eval_large"),
                   help="records to edit and test: eval (report) or val (tune configs on it). Synthetic "
                        "datasets have a val file; real ones use the last records of their train file. "
                        "eval_large: SYNTH-EVQA's 10,000 records for one long stream (generated on first use)")
    p.add_argument("-dsn", "--data_sample_n", type=int, default=None, help="use the first N records of the split")
    p.add_argument("--data_dir", default=None, help="data root (default: data/)")
    p.add_argument("--model_path", default=None, help="backbone folder (default: utils/GLOBAL.py model_path_map)")
    p.add_argument("--records_dir", default=None, help="records root (default: records/)")
    p.add_argument("--eval_batch_size", type=int, default=8, help="samples per scoring batch")
    p.add_argument("--shuffle", action="store_true", help="shuffle the records (with --seed) before chunking")
    p.add_argument("--seed", type=int, default=0, help="seed of --shuffle and of torch")
    p.add_argument("--eval_at", default=None,
                   help="comma-separated edit counts, e.g. 1,10,100,1000: one edit stream, tested at each count "
                        "on everything edited so far")
    p.add_argument("--save_edited_state", default=None, metavar="DIR",
                   help="save the editor's edited state after each chunk / point under DIR/<stage>/")
    p.add_argument("--load_edited_state", default=None, metavar="DIR",
                   help="load the edited states saved by --save_edited_state instead of editing")
    p.add_argument("--overwrite", action="store_true", help="discard a finished or partial run in the run folder")
    p.add_argument("--supersede", action="store_true",
                   help="a run with other arguments in the run folder (e.g. made with an older config) is moved "
                        "aside to <folder>.superseded-<time>, kept, and this one runs (scripts/compare.py uses it)")
    p.add_argument("--general", default=None, metavar="FILE_or_NAME",
                   help="general-capability VQA set measured before editing and after each chunk / point: "
                        "synth, vqav2, mme, a VQAv2-style JSON or an MME folder (evaluation/general.py)")
    p.add_argument("--general_n", type=int, default=None, help="use the first N questions of --general")
    p.add_argument("--edit_batch", type=int, default=1,
                   help="edits applied per call for editors with edit_batch (LiveEdit, RECIPE, LTE): the same "
                        "state as one at a time; s/edit is then each group's time / its size (default 1)")
    p.add_argument("--decode_all", action="store_true",
                   help="decode every sample step by step, a full forward per token, instead of verifying candidate "
                        "generations by teacher forcing and decoding with the key/value cache: the same generations, "
                        "slower (scripts/bench_eval.py)")
    p.add_argument("--image_cache_mb", type=int, default=512,
                   help="image features kept between scoring passes, in MiB (0: off; backbones/base.py)")
    return p


def _positive(value, flag):
    if value is not None and value < 1:
        raise UserError(f"{flag} must be a positive integer, got {value}")


def parse_points(text: str) -> list[int]:
    try:
        points = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise UserError(f"--eval_at must be comma-separated positive integers, got {text!r}") from None
    if not points or points[0] < 1:
        raise UserError(f"--eval_at must be comma-separated positive integers, got {text!r}")
    return points


def data_fingerprint(records) -> str:
    h = hashlib.sha256()
    for r in records:
        item = [r.index, [[s.prompt, s.target, s.image] for s in r.samples().values()]]
        if getattr(r, "portability", ()):
            item.append([[s.prompt, s.target, s.image] for s in r.portability])
        h.update(json.dumps(item).encode())
    return h.hexdigest()[:16]


def run_folder(records_dir: Path, editor: str, backbone: str, dataset: str, postfix: str, mode_dir: str,
               split: str = "eval") -> Path:
    """``records/<editor>/<backbone>/<split>/<dataset>[-<postfix>]/<mode>``: the split names the folder."""
    name = f"{dataset}-{postfix}" if postfix else dataset
    return Path(records_dir) / editor / backbone / split / name / mode_dir


def supports_state(editor_cls) -> bool:
    from editors.base import BaseEditor
    return (editor_cls.save_state is not BaseEditor.save_state) and (editor_cls.load_state is not BaseEditor.load_state)


def main(argv=None) -> dict:
    """Run the evaluation; returns ``{"run_dir", "means", "resumed", "already_finished"}``.

    Order: every check of the input (flags, names, paths, config, checkpoint, records and their images,
    saved states, the model folder, an existing run in the run folder), then the run folder is claimed
    (created and locked: a second process is refused), then the backbone is loaded and the run starts
    or resumes. A run that fails before its first stage finished leaves nothing behind."""
    args = build_parser().parse_args(argv)
    _positive(args.sequential_edit_n, "-sen/--sequential_edit_n")
    _positive(args.data_sample_n, "-dsn/--data_sample_n")
    _positive(args.eval_batch_size, "--eval_batch_size")
    _positive(args.general_n, "--general_n")
    _positive(args.edit_batch, "--edit_batch")
    if args.image_cache_mb < 0:
        raise UserError(f"--image_cache_mb must be 0 or more, got {args.image_cache_mb}")
    if args.general_n is not None and not args.general:
        raise UserError("--general_n needs --general")
    points = parse_points(args.eval_at) if args.eval_at is not None else None
    if points is None and args.sequential_edit_n is None:
        raise UserError("give -sen/--sequential_edit_n (edits per chunk) or --eval_at")
    if points is not None and args.sequential_edit_n not in (None, points[-1]):
        raise UserError(f"with --eval_at the stream has max(--eval_at) = {points[-1]} edits; "
                        f"-sen {args.sequential_edit_n} disagrees (leave -sen out)")
    if args.save_edited_state and args.load_edited_state:
        raise UserError("give --save_edited_state or --load_edited_state, not both")
    if args.eval_name_postfix:
        check_folder_name(args.eval_name_postfix, "-enp/--eval_name_postfix")
    device = check_available(parse_device(args.device, "-dvc", allow_auto=True)) if args.device else default_device()
    records_dir = check_writable_root(Path(args.records_dir) if args.records_dir else RECORDS_DIR, "--records_dir")
    if args.save_edited_state:
        check_writable_root(args.save_edited_state, "--save_edited_state")
    notes = []   # printed once every check has passed, so that bad input gives exactly one line

    # the heavy imports (transformers, ...) only once the flags are known to be good
    from backbones import backbone_fingerprint, load_backbone, resolve_backbone_name
    from backbones.loading import check_model_folder
    from editors import EDITORS
    from evaluation.checkpoints import check_checkpoint, load_checkpoint, saved_editor_config
    from evaluation.protocol import check_saved_states, plan_chunks, plan_points, run_protocol
    from evaluation.results import RunStore, finalise, markdown_table, write_table
    from synthetic.embedded import prepare_backbone, prepare_dataset
    from utils.config import config_path, from_dict, load_config, to_dict, with_overrides
    from vl_datasets import get_dataset_spec, load_dataset

    # ---- names, config, checkpoint, data: all checked before anything is loaded or written ----
    editor_cls = EDITORS.get(args.editor_name)
    backbone_name = resolve_backbone_name(args.edit_model_name)
    spec = get_dataset_spec(args.data_name)
    weights, saved_config, config_source = None, None, None
    if args.config and args.checkpoint:
        raise UserError("--config and -ckpt: a checkpoint is evaluated with the config it was trained with")
    if args.checkpoint:
        if not editor_cls.trainable:
            raise UserError(f"editor {args.editor_name!r} is not trainable and takes no checkpoint (-ckpt)")
        weights = check_checkpoint(args.checkpoint, args.editor_name, backbone_name)
        saved_config, config_source = saved_editor_config(weights)
    elif editor_cls.trainable:
        notes.append(f"warning: evaluating trainable editor {args.editor_name!r} without a checkpoint (-ckpt)")
    # the editor is built as the checkpoint was trained: its saved editor config, else the YAML
    if saved_config is not None:
        config = from_dict(editor_cls.config_class, saved_config, f"{config_source}: editor_config")
        notes.append(f"note: editor config saved with the checkpoint: {config_source}")
    else:
        config_source = Path(args.config) if args.config else config_path(args.editor_name, backbone_name)
        config = load_config(editor_cls.config_class, args.editor_name, backbone_name, args.config)
        if weights is not None:
            notes.append(f"note: checkpoint {weights} has no saved editor config (config.yaml with editor_config); "
                         f"using {config_source}")
    if args.set:
        config, changed = with_overrides(editor_cls.config_class, config, args.set)
        notes.append("note: --set " + ", ".join(f"{k}={new!r} (was {old!r})" for k, old, new in changed))
    if (args.save_edited_state or args.load_edited_state) and not supports_state(editor_cls):
        raise UserError(f"editor {args.editor_name!r} cannot save or load its edited state "
                        f"(--save_edited_state / --load_edited_state)")
    data_dir = Path(args.data_dir) if args.data_dir else DATA_DIR
    split = args.split
    if split not in spec.splits:   # before anything is generated
        raise UserError(f"--split {split}: dataset {spec.name} has no such split (splits: {', '.join(spec.splits)})"
                        + ("; eval_large exists for SYNTH-EVQA only" if split == "eval_large" else ""))
    prepare_dataset(spec.name, data_dir, split)
    records = load_dataset(spec.name, split, data_dir, limit=args.data_sample_n)
    n = len(records)
    if args.data_sample_n and n < args.data_sample_n:
        notes.append(f"warning: -dsn {args.data_sample_n} but {spec.name} {split} has only {n} records; using {n}")
    if points is not None:
        T = points[-1]
        if T > n:
            raise UserError(f"--eval_at {points[-1]} exceeds the {n} records of {spec.name} {split}")
        mode, mode_dir, stages = "eval_at", "eval_at_" + "_".join(map(str, points)), plan_points(points)
    else:
        T = args.sequential_edit_n
        if T > n:
            raise UserError(f"-sen {T} exceeds the {n} records of {spec.name} {split}"
                            + (f" (-dsn {args.data_sample_n})" if args.data_sample_n else ""))
        mode, mode_dir, stages = "sequential", f"sequential_edit_{T}", plan_chunks(n, T)
    order = list(range(n))
    if args.shuffle:
        import random
        random.Random(args.seed).shuffle(order)
    records = [records[i] for i in order]
    model_path = prepare_backbone(backbone_name, args.model_path)   # a tiny default is built on first use
    check_model_folder(model_path)
    # the backbone's build: its fingerprint is part of the run's identity
    fingerprint = backbone_fingerprint(model_path)
    general = None
    if args.general:
        from evaluation.general import load_general
        general = load_general(args.general, data_dir, args.general_n)
    if args.load_edited_state:
        check_saved_states(Path(args.load_edited_state), stages, records, args.editor_name, backbone_name, fingerprint)

    store = RunStore(run_folder(records_dir, args.editor_name, backbone_name, spec.name,
                                args.eval_name_postfix, mode_dir, split))
    absolute = lambda p: str(Path(p).resolve()) if p else None
    identity = {"editor": args.editor_name, "backbone": backbone_name, "dataset": spec.name, "split": split,
                "sequential_edit_n": T, "eval_at": points, "data_sample_n": args.data_sample_n,
                "n_records": n, "shuffle": args.shuffle, "seed": args.seed,
                "checkpoint": absolute(weights), "model_path": absolute(args.model_path),
                "backbone_fingerprint": fingerprint,
                "data_dir": absolute(data_dir), "data_fingerprint": data_fingerprint(records),
                "load_edited_state": absolute(args.load_edited_state), "editor_config": to_dict(config)}
    if general is not None:
        identity["general"] = general.identity()

    # ---- an existing run in the folder: report it, or refuse (reading only; again under the lock) ----
    from evaluation.results import differences
    defaults = _config_defaults(editor_cls.config_class)
    if args.supersede and not args.overwrite and store.has_run() and differences(store.identity(), identity, defaults):
        aside = store.dir.with_name(f"{store.dir.name}.superseded-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(store.dir, aside)
        notes.append(f"a run with other arguments was in {store.dir}: moved to {aside}")
    if not args.overwrite and _existing_run(store, identity, stages, defaults) == "finished":
        return _report_finished(store, markdown_table)

    # ---- claim the folder, load, then write ----------------------------------------------------
    lock = claim_folder(store.dir, "evaluation run folder")
    started = False   # this process wrote the run's first files (run.json, config.yaml)
    for line in notes:   # the folder is ours now: nothing below is a refusal of the input
        print(line, file=sys.stderr)
    try:
        if args.overwrite:
            lock.clear()
        else:
            state = _existing_run(store, identity, stages, defaults)
            if state == "finished":          # another process finished it while we were starting
                return _report_finished(store, markdown_table)
        resumed = store.has_run()
        torch.manual_seed(args.seed)
        backbone = load_backbone(backbone_name, device, model_path)
        backbone.image_cache.max_bytes = args.image_cache_mb * 2 ** 20
        backbone.decode_with_cache = not args.decode_all
        editor = editor_cls(backbone, config)
        if weights is not None:
            load_checkpoint(editor, weights)
        if not resumed:
            full_args = {**vars(args), "device": device}
            started = True
            store.start(identity, full_args, {"run": identity, "device": device, "editor_config": to_dict(config),
                                               "editor_config_source": str(Path(config_source).resolve()),
                                               "backbone": {"name": backbone_name, "num_layers": backbone.num_layers,
                                                            "hidden_size": backbone.hidden_size}})
        done_names = set(store.done_stages([s.name for s in stages]))
        if resumed:
            print(f"resuming {store.dir}: {len(done_names)} of {len(stages)} "
                  f"{'chunks' if mode == 'sequential' else 'points'} already done", file=sys.stderr)

        probe = None
        if general is not None:  # the unedited model's score, then after each chunk / point
            from evaluation.general import GeneralProbe
            probe = GeneralProbe(general, args.eval_batch_size)
            probe.start(editor)
        from tqdm import tqdm
        todo = [s for s in stages if s.name not in done_names]
        total = sum(len(s.edit_positions) + 5 * len(s.test_positions) for s in todo)
        total += 5 * len({(s.stream, p) for s in todo for p in s.test_positions})
        with tqdm(total=total, desc=f"{args.editor_name} on {backbone_name} {spec.name}", unit="step",
                  file=sys.stderr, mininterval=1.0) as progress:
            results = run_protocol(editor, records, stages, store, batch_size=args.eval_batch_size,
                                   load_dir=args.load_edited_state, save_dir=args.save_edited_state,
                                   progress=progress, after_stage=probe, edit_batch=args.edit_batch,
                                   verify_generations=not args.decode_all)
        header = {"run": identity, "mode": mode, "edit_batch": args.edit_batch,
                  "scoring": {"default": "teacher-forced token accuracy (percent)",
                              "exact_match": "greedy generation of len(target) tokens equals the target "
                                             "(locality: equals the pre-edit generation), from real generations"}}
        means = finalise(store, mode, header, results)
        table = markdown_table(means)
        write_table(store.dir, table)
    except BaseException:
        # A run this process started that finished no stage is worth nothing: leave none behind, so
        # that the corrected command is not refused as "another run's folder".
        if started and not any(store.stage_path(s.name).is_file() for s in stages):
            store.discard_run()
        if lock.created and {p.name for p in store.dir.iterdir()} <= {LOCK_FILE}:
            lock.discard()   # the folder (and its parents) this claim made
        raise
    finally:
        lock.release()
    print(f"results in {store.dir}")
    print(table)
    return {"run_dir": store.dir, "means": means, "resumed": resumed, "already_finished": False}


def _config_defaults(config_class) -> dict | None:
    """The editor config's defaults as a dict (None when its class needs arguments)."""
    from utils.config import to_dict
    try:
        return to_dict(config_class())
    except Exception:   # a config class without defaults for every field
        return None


def _existing_run(store, identity: dict, stages, config_defaults: dict | None = None) -> str | None:
    """``"finished"`` / ``"unfinished"`` for a run with the same identity in the folder, None for no
    run; a run with other arguments, or an unreadable file of it, is a UserError naming the problem."""
    from evaluation.results import differences
    if not store.has_run():
        return None
    diff = differences(store.identity(), identity, config_defaults)
    state = "finished" if store.finished else "unfinished"
    if diff:
        raise UserError(f"{store.dir} holds a {state} run with other arguments ({'; '.join(diff)}); "
                        f"rerun with its arguments, pick another folder with -enp, or pass --overwrite")
    if state == "finished":
        store.means()
    else:
        store.done_stages([s.name for s in stages])   # a damaged stage file is found before anything is written
    return state


def _report_finished(store, markdown_table) -> dict:
    means = store.means()
    print(f"run already finished: results in {store.dir} (pass --overwrite to run it again)")
    print(markdown_table(means))
    return {"run_dir": store.dir, "means": means, "resumed": False, "already_finished": True}
