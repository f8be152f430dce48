"""Real-size backbones without weights: every code path at BLIP-2 OPT-2.7B / LLaVA-1.5-7B / MiniGPT-4
shapes, with memory and speed measured.

Each backbone is built from its published configuration (``backbones/real_configs.py``, sources named
there) with random weights and a byte-level BPE tokenizer padded to the real vocabulary size; nothing
is downloaded and nothing big is written unless ``--save_model`` asks. For each backbone and each
editor of the registry that has a config for it (``liveedit``, ``ft-l``, ``none``, ...; one that fails
is skipped with a note), it runs: a few training steps for a trainable editor (its
``training_losses``, Adam and the training loop's loss scaling), ``--edits`` edits and a batched
evaluation of the edited records' five samples (``evaluation.scoring.run_samples``: teacher-forced
pass and greedy generation, as ``test_vllm_edit.py`` scores). It prints, per editor, the peak memory
of each phase, training steps/s, seconds per edit and evaluation samples/s, then what a user needs
at the published depth: parameter bytes plus the measured activations, extrapolated per decoder
layer with the bytes one layer saves for backward (measured with ``saved_tensors_hooks``).

    python -m scripts.real_size --layers 2 --dtype bf16           # CPU: full width, 2 decoder layers
    python -m scripts.real_size -dvc cuda:0 --dtype bf16          # a GPU: full depth
    python -m scripts.real_size -dvc auto --max_memory 24GiB      # spread as over 24 GB cards (accelerate)

Flags: ``--backbones`` (blip2,llava,minigpt4), ``--editors`` (default: every registered editor),
``--layers N`` (cut the LLM depth; the editors' layers, e.g. LiveEdit's l_e = 21, are clamped to
N - 1 with a note), ``--edit_layer K`` (put every editor's layer at K), ``-dvc cpu|cuda:N|auto``,
``--dtype fp32|bf16|fp16`` (default: fp32 on the CPU, bf16 on GPUs that support it),
``--max_memory`` (per-GPU cap for ``-dvc auto``, e.g. 24GiB), ``--mixed_precision no|bf16|fp16``
(autocast of the training forward, as in ``train_vllm_editor.py``), ``--train_steps``, ``--batch_size``
(records per training step: 4 samples each), ``--edits``, ``--eval_records`` (edited records whose
five samples are evaluated; 0: none), ``--eval_batch_size``, ``--json PATH``
(all figures), ``--save_model DIR`` (write each built model and processor, loadable with
``--model_path``), ``--set EDITOR.FIELD=VALUE`` (override a field of an editor's config, e.g.
``ft-l.steps=5``), ``--fingerprint`` (sums of the logits of two samples: the weights depend only on
``--seed``, so a ``-dvc auto`` run must match a single-device one), ``--threads``. Test shortcut: ``--vision_layers N`` cuts the vision encoder (the
default keeps it real).

Memory: on CUDA, torch's allocator peak (summed over devices) per phase; on the CPU, the process's
peak resident set (VmHWM, reset at each phase start through /proc/self/clear_refs, else getrusage's
maximum RSS), minus the resident set at the phase start (glibc set to return freed blocks to the OS).
"""
import argparse
import contextlib
import ctypes
import dataclasses
import gc
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from utils.errors import UserError, cli_main

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GiB = 2 ** 30
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (40, 60, 230), "yellow": (230, 220, 40),
           "purple": (140, 40, 170), "orange": (240, 140, 20), "white": (245, 245, 245), "black": (15, 15, 15)}
TEMPLATE_WORDS = "USER: <image>\n ASSISTANT: ###Human: <Img></Img> ###Assistant: "
LAYER_FIELDS = ("layer", "edit_layer", "layers")   # editor config fields that name decoder layers


# ---- memory ------------------------------------------------------------------------------------------
class Memory:
    """Peak memory of a phase, above what was in use at its start."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.resettable = False
        if not cuda:
            try:
                Path("/proc/self/clear_refs").write_text("5")
                self.resettable = True
            except OSError:
                pass

    @staticmethod
    def _rss() -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()

    @staticmethod
    def _hwm() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def in_use(self) -> int:
        if self.cuda:
            return sum(torch.cuda.memory_allocated(i) for i in range(torch.cuda.device_count()))
        return self._rss()

    def start(self) -> None:
        gc.collect()
        if self.cuda:
            for i in range(torch.cuda.device_count()):
                torch.cuda.synchronize(i)
                torch.cuda.reset_peak_memory_stats(i)
        elif self.resettable:
            Path("/proc/self/clear_refs").write_text("5")
        self.base = self.in_use()

    def stop(self) -> dict:
        if self.cuda:
            per = [torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())]
            return {"peak": sum(per), "above_start": sum(per) - self.base, "per_device": per}
        peak = self._hwm()
        return {"peak": peak, "above_start": max(0, peak - self.base)}


def return_freed_memory() -> None:
    """glibc's dynamic mmap threshold keeps freed tensors of earlier phases resident, and later phases
    reuse them unseen by the resident set; a fixed threshold returns every large block to the OS when
    freed. Called when run as a script (not in tests: it slows small allocations down)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 16)     # M_MMAP_THRESHOLD: 64 KiB, fixed
        libc.mallopt(-1, 1 << 20)     # M_TRIM_THRESHOLD: 1 MiB
    except (OSError, AttributeError):
        pass


def gib(n) -> str:
    return "-" if n is None else f"{n / GiB:.2f}"


# ---- data --------------------------------------------------------------------------------------------
def make_records(n: int, folder: Path):
    """``n`` edit records in the project's schema, on small drawn images (the processor resizes)."""
    from PIL import Image, ImageDraw

    from vl_datasets.records import EditRecord, Sample
    names = list(COLOURS)
    paths = []
    for i, colour in enumerate(names):
        im = Image.new("RGB", (64, 64), COLOURS[names[(i + 3) % len(names)]])
        ImageDraw.Draw(im).ellipse((12 + i, 14, 50, 50 - i), fill=COLOURS[colour])
        paths.append(str(folder / f"img{i}.png"))
        im.save(paths[-1])
    q = "What color is the shape in the image? The answer is:"
    recs = []
    for i in range(n):
        target = names[(i + 5) % len(names)]
        recs.append(EditRecord(
            i, edit=Sample(q, target, paths[i % len(paths)]),
            text_rephrase=Sample("Which colour does the shape in this picture have? The answer is:", target,
                                 paths[i % len(paths)]),
            image_rephrase=Sample(q, target, paths[(i + 1) % len(paths)]),
            text_loc=Sample(f"nq question: who wrote the book number {i} of the year?", "a famous writer"),
            image_loc=Sample("What is the colour of the background? The answer is:", names[(i + 2) % len(names)],
                             paths[(i + 2) % len(paths)])))
    return recs


def corpus(records) -> list[str]:
    texts = [s.prompt + " " + s.target for r in records for s in r.samples().values()]
    return (texts + [TEMPLATE_WORDS] * 5) * 4


# ---- editors -----------------------------------------------------------------------------------------
def clamp_layers(config, n_layers: int, edit_layer: int | None, notes: list):
    """The editor config with every decoder-layer field inside the cut depth (``--edit_layer`` first)."""
    changes = {}
    for f in dataclasses.fields(config):
        if f.name not in LAYER_FIELDS:
            continue
        value = getattr(config, f.name)
        single = isinstance(value, int) and not isinstance(value, bool)
        values = [value] if single else list(value) if isinstance(value, (list, tuple)) else None
        if values is None:
            continue
        new = [edit_layer if edit_layer is not None else v for v in values]
        new = [min(v, n_layers - 1) if v >= 0 else max(v, -n_layers) for v in new]
        if new != values:
            changes[f.name] = new[0] if single else type(value)(new)
            notes.append(f"{f.name} {value} -> {changes[f.name]} (the LLM has {n_layers} decoder layers here)")
    return dataclasses.replace(config, **changes) if changes else config


def layer_of(config):
    for name in LAYER_FIELDS:
        v = getattr(config, name, None)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


def grad_activation_bytes(backbone, batch, layer: int) -> int:
    """Bytes that decoder layer ``layer`` saves for backward on ``batch`` (its input requiring grad;
    parameters excluded): what each layer above an edit layer adds to training memory."""
    params = {p.untyped_storage().data_ptr() for p in backbone.model.parameters()}
    saved = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params and st.device.type != "meta":
            saved[(st.device, st.data_ptr())] = st.nbytes()
        return t

    with torch.no_grad():
        h = backbone.hidden_at(batch, layer - 1)
    h = h.detach().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = backbone._run(batch, layer, layer + 1, hidden=h)
    del out
    return sum(saved.values())


def sync(cuda: bool):
    if cuda:
        for i in range(torch.cuda.device_count()):
            torch.cuda.synchronize(i)


def run_editor(name, backbone, records, args, mem, cuda):
    """Train (trainable editors), edit and evaluate one editor; its figures, or a skip note."""
    from editors import EDITORS
    from evaluation.scoring import run_samples
    from training.precision import LossScaling
    from utils.config import load_config
    out = {"editor": name, "notes": []}
    cls = EDITORS.get(name)
    try:
        config = load_config(cls.config_class, name, backbone.name)
        config = clamp_layers(config, backbone.num_layers, args.edit_layer, out["notes"])
        if args.overrides.get(name):
            config = dataclasses.replace(config, **args.overrides[name])
            out["notes"].append(f"config overrides {args.overrides[name]}")
        editor = cls(backbone, config)
    except Exception as e:  # noqa: BLE001 - any editor that cannot run here is reported, not fatal
        out["skipped"] = f"{type(e).__name__}: {e}"
        return out
    out["layer"] = layer_of(config)
    try:
        if getattr(cls, "trainable", False):
            params = list(editor.trainable_parameters())
            out["trainable_parameters"] = sum(p.numel() for p in params)
            out["trainable_bytes"] = sum(p.numel() * p.element_size() for p in params)
            opt = torch.optim.Adam(params, lr=float(config.train.lr))
            amp = DTYPES.get(args.mixed_precision)
            scaling = LossScaling(torch.float16 if amp == torch.float16 else backbone.dtype, backbone.device)
            autocast = (torch.autocast("cuda" if cuda else "cpu", dtype=amp) if amp is not None
                        else contextlib.nullcontext())
            editor.train()
            times = []
            mem.start()
            for step in range(args.train_steps):
                recs = [records[(step * args.batch_size + j) % len(records)] for j in range(args.batch_size)]
                t0 = time.perf_counter()
                with autocast:
                    terms = editor.training_losses(recs)
                loss = sum(terms.values())
                scaling.backward(loss)
                scaling.step(opt)
                opt.zero_grad(set_to_none=True)
                sync(cuda)
                times.append(time.perf_counter() - t0)
                if not torch.isfinite(loss.detach()):
                    out["notes"].append(f"training step {step + 1}: loss {float(loss)} is not finite")
            out["train_memory"] = mem.stop()
            del opt, terms, loss
            editor.eval()
            timed = times[1:] or times
            out["train_step_s"] = times
            out["train_steps_per_s"] = 1 / statistics.mean(timed)
            out["train_samples"] = 4 * args.batch_size
        edit_recs = records[:args.edits]
        mem.start()
        times = []
        for r in edit_recs:
            t0 = time.perf_counter()
            editor.edit(r.edit)
            sync(cuda)
            times.append(time.perf_counter() - t0)
        out["edit_memory"] = mem.stop()
        out["edit_s"] = times
        out["s_per_edit"] = statistics.mean(times[1:] or times)
        samples = [s for r in edit_recs[:args.eval_records] for s in r.samples().values()]
        if not samples:
            editor.restore()
            return out
        mem.start()
        t0 = time.perf_counter()
        results = run_samples(editor, samples, args.eval_batch_size)
        sync(cuda)
        dt = time.perf_counter() - t0
        out["eval_memory"] = mem.stop()
        out["eval_samples"] = len(samples)
        out["eval_samples_per_s"] = len(samples) / dt
        out["rel_hits"] = sum(o.tf == o.target for o in results[0::5])
        repo = getattr(editor, "repository", None)
        if repo is not None and hasattr(repo, "bytes_per_expert"):
            out["bytes_per_expert"] = repo.bytes_per_expert()
        master = getattr(editor, "master", None)
        if isinstance(master, torch.Tensor):
            out["master_bytes"] = master.numel() * master.element_size()
            out["original_bytes"] = editor.original.numel() * editor.original.element_size()
        editor.restore()
    except Exception as e:  # noqa: BLE001
        out["failed"] = f"{type(e).__name__}: {e}"
        if args.raise_errors:
            raise
    finally:
        del editor
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return out


# ---- what a user needs at the published depth --------------------------------------------------------
def estimates(built, res, probe, n_full_layers, batch_size):
    """Memory at the published depth from the figures measured at the cut depth (README, "Real-size
    backbones"): parameter bytes at full depth, plus what the phase measured above its start, plus,
    for every decoder layer that backpropagates at full depth but not at the cut depth, the bytes a
    layer saves for backward per token (``probe``) times the tokens of the batch. Training is also
    given per record (activations scale with the batch; Adam state and gradients do not) and at the
    README's batch size 8."""
    n = built.backbone.num_layers
    per_token = probe["bytes_per_token_per_layer"]
    est = {}
    layer = res.get("layer")
    full_layer = None
    if layer is not None:
        from utils.config import load_config
        from editors import EDITORS
        cfg = load_config(EDITORS.get(res["editor"]).config_class, res["editor"], built.backbone.name)
        full_layer = layer_of(cfg) % n_full_layers
        cut_layer = layer % n
    if "train_memory" in res and full_layer is not None:
        extra = (n_full_layers - 1 - full_layer) - (n - 1 - cut_layer)       # more layers above l_e
        fixed = 3 * res["trainable_bytes"]                                    # gradients, Adam's two moments
        per_record = (max(0, res["train_memory"]["above_start"] - fixed)
                      + extra * per_token * probe["train_tokens"]) / batch_size
        est["train"] = built.full_parameter_bytes + fixed + batch_size * per_record
        est["train_bs8"] = built.full_parameter_bytes + fixed + 8 * per_record
        est["train_per_record"] = per_record
        est["train_extra_layers"] = extra
    state = 0
    if "bytes_per_expert" in res:
        state = res["bytes_per_expert"] * 1024          # 1,000 experts: storage doubles to 1,024
    edit_above = res.get("edit_memory", {}).get("above_start", 0)
    if "master_bytes" in res and full_layer is not None:
        # FT-L's edits backprop from its layer to the top for one sample: more layers at full depth
        extra = (n_full_layers - full_layer) - (n - cut_layer)
        edit_above += extra * per_token * probe["edit_tokens"]
        state = 0        # master and original copies are measured in the edit phase already
    if "eval_memory" in res:
        est["eval_1000"] = built.full_parameter_bytes + max(edit_above, res["eval_memory"]["above_start"]) + state
    return est


# ---- main --------------------------------------------------------------------------------------------
def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbones", default="blip2,llava,minigpt4", help="comma list of aliases or full names")
    p.add_argument("--editors", default="all", help="comma list of editors, or all (the registry)")
    p.add_argument("--layers", type=int, default=None, help="LLM decoder layers (default: the published depth)")
    p.add_argument("--vision_layers", type=int, default=None,
                   help="TEST SHORTCUT: cut the vision encoder to N layers (default: real)")
    p.add_argument("--edit_layer", type=int, default=None, help="every editor's layer (clamped to the depth)")
    p.add_argument("-dvc", "--device", default=None, help="cpu, cuda:N or auto (default: cuda:0 if any, else cpu)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="backbone dtype (default: fp32 on the CPU, bf16 on GPUs that support it, else fp16)")
    p.add_argument("--max_memory", default=None, help="-dvc auto: memory cap per GPU, e.g. 24GiB")
    p.add_argument("--train_steps", type=int, default=3)
    p.add_argument("--batch_size", type=int, default=2, help="records per training step (4 samples each)")
    p.add_argument("--edits", type=int, default=10)
    p.add_argument("--eval_records", type=int, default=None,
                   help="evaluate the first N edited records, 5 samples each (default: all edited; 0: no evaluation)")
    p.add_argument("--eval_batch_size", type=int, default=8, help="as test_vllm_edit.py's default")
    p.add_argument("--mixed_precision", choices=("no", "bf16", "fp16"), default="no",
                   help="autocast the training forward, as train_vllm_editor.py --mixed_precision")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="write every figure to this JSON file")
    p.add_argument("--save_model", default=None, metavar="DIR", help="save each built model under DIR/<name>")
    p.add_argument("--set", action="append", default=[], metavar="EDITOR.FIELD=VALUE",
                   help="override a top-level field of an editor's config, e.g. ft-l.steps=5 (repeatable)")
    p.add_argument("--fingerprint", action="store_true",
                   help="record a fingerprint of the logits of two samples (compare a split run with a single-device one)")
    p.add_argument("--raise_errors", action="store_true", help="an editor's failure raises (tests)")
    a = p.parse_args(argv)
    for flag in ("train_steps", "batch_size", "edits", "eval_batch_size"):
        if getattr(a, flag) < 1:
            raise UserError(f"--{flag} must be >= 1, got {getattr(a, flag)}")
    a.overrides = {}
    for item in a.set:
        key, eq, value = item.partition("=")
        editor, dot, field = key.partition(".")
        if not (eq and dot and editor and field):
            raise UserError(f"--set {item!r}: expected EDITOR.FIELD=VALUE, e.g. ft-l.steps=5")
        a.overrides.setdefault(editor, {})[field] = yaml.safe_load(value)
    if a.eval_records is None:
        a.eval_records = a.edits
    if a.eval_records < 0:
        raise UserError(f"--eval_records must be >= 0, got {a.eval_records}")
    for flag in ("layers", "vision_layers"):
        if getattr(a, flag) is not None and getattr(a, flag) < 1:
            raise UserError(f"--{flag} must be >= 1, got {getattr(a, flag)}")
    return a


@cli_main
def main(argv=None) -> dict:
    a = parse_args(argv)
    from backbones import resolve_backbone_name
    from backbones.devices import model_devices
    from backbones.loading import default_dtype
    from backbones.real_configs import REAL_SPECS, build_real_backbone, padded_tokenizer
    from editors import EDITORS
    from utils.devices import check_available, default_device, parse_device
    if a.threads:
        torch.set_num_threads(a.threads)
    device = check_available(parse_device(a.device, "-dvc", allow_auto=True)) if a.device else default_device()
    if device == "auto" and not torch.cuda.is_available():
        print("note: -dvc auto without a GPU: everything on the CPU", file=sys.stderr)
        device = "cpu"
    cuda = device != "cpu"
    dtype = DTYPES[a.dtype] if a.dtype else default_dtype(device if device == "cpu" else "cuda")
    names = [resolve_backbone_name(b.strip()) for b in a.backbones.split(",") if b.strip()]
    unknown = [n for n in names if n not in REAL_SPECS]
    if unknown:
        raise UserError(f"no published configuration for {unknown}; real-size backbones: {', '.join(REAL_SPECS)}")
    editors = EDITORS.names() if a.editors == "all" else [e.strip() for e in a.editors.split(",") if e.strip()]
    for e in editors:
        EDITORS.get(e)
    editors = sorted(editors, key=lambda e: (e != "liveedit", e))
    n_records = max(a.edits, a.batch_size * a.train_steps)
    report = {"device": device, "dtype": str(dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
              "mixed_precision": a.mixed_precision, "train_steps": a.train_steps, "batch_size": a.batch_size,
              "edits": a.edits, "eval_records": a.eval_records, "eval_batch_size": a.eval_batch_size,
              "layers": a.layers, "vision_layers": a.vision_layers, "max_memory": a.max_memory,
              "memory_kind": "cuda max_memory_allocated" if cuda else "cpu peak RSS", "backbones": []}
    mem = Memory(cuda)
    print(f"real-size backbones on {device}, {report['dtype']}, {report['threads']} thread(s); memory: "
          f"{report['memory_kind']}" + ("" if cuda or mem.resettable else " (getrusage max RSS: only grows)"))
    with tempfile.TemporaryDirectory(prefix="real-size-") as tmp:
        records = make_records(n_records, Path(tmp))
        for name in names:
            spec = REAL_SPECS[name]
            tok = padded_tokenizer(corpus(records), spec.vocab_size)
            if not cuda:
                import psutil
                from backbones.real_configs import empty_model, parameter_bytes, real_config
                need = parameter_bytes(empty_model(spec, real_config(spec, tok, a.layers, a.vision_layers)), dtype)
                if need > 0.8 * psutil.virtual_memory().available:
                    raise UserError(f"{name}: {need / GiB:.1f} GiB of parameters in {report['dtype']} do not fit in the "
                                    f"{psutil.virtual_memory().available / GiB:.1f} GiB available; cut the depth with "
                                    f"--layers N")
            mem.start()
            t0 = time.perf_counter()
            built = build_real_backbone(name, tok, dtype, device, a.layers, a.vision_layers, a.max_memory, a.seed)
            build_s = time.perf_counter() - t0
            bb = built.backbone
            entry = {"backbone": name, "source": spec.source, "family": spec.family, "build_s": build_s,
                     "build_memory": mem.stop(), "hidden_size": bb.hidden_size, "num_layers": bb.num_layers,
                     "full_layers": built.full_layers, "n_vision_tokens": bb.n_vision_tokens,
                     "vocab_size": bb.model.get_input_embeddings().num_embeddings,
                     "parameters": built.parameters, "parameter_bytes": built.parameter_bytes,
                     "full_parameters": built.full_parameters, "full_parameter_bytes": built.full_parameter_bytes,
                     "device_map": {k: str(v) for k, v in (built.device_map or {}).items()},
                     "devices": sorted({str(d) for d in model_devices(bb.model)})}
            print(f"\n== {name} ({spec.source}): hidden {bb.hidden_size}, {bb.num_layers} of {built.full_layers} "
                  f"decoder layers, {bb.n_vision_tokens} vision tokens, vocabulary {entry['vocab_size']}; "
                  f"{built.parameters / 1e9:.2f}B parameters here ({gib(built.parameter_bytes)} GiB), "
                  f"{built.full_parameters / 1e9:.2f}B at full depth ({gib(built.full_parameter_bytes)} GiB); "
                  f"built in {build_s:.1f} s on {', '.join(entry['devices'])}")
            if a.fingerprint:      # to compare a split model with a single-device one (same seed: same weights)
                with torch.no_grad():
                    lg = bb.logits(bb.encode([records[0].edit, records[1].image_loc])).float()
                entry["logits_fingerprint"] = {"sum": float(lg.sum()), "abs_mean": float(lg.abs().mean()),
                                               "last_argmax": lg[:, -1].argmax(-1).tolist(),
                                               "finite": bool(torch.isfinite(lg).all())}
                del lg
                print(f"logits fingerprint: {entry['logits_fingerprint']}")
            if a.save_model:
                out_dir = Path(a.save_model) / name
                bb.model.save_pretrained(out_dir)
                bb.processor.save_pretrained(out_dir)
                print(f"saved to {out_dir} (use --model_path {out_dir})")
            # bytes one decoder layer saves for backward, per token (measured on one edit sample)
            train_samples = [s for r in records[:a.batch_size]
                             for s in (r.edit, r.text_rephrase, r.image_rephrase, r.image_loc)]
            train_tokens = len(train_samples) * max(len(bb.tokenize(s.prompt, s.image is not None, s.target)[0])
                                                    for s in train_samples)
            edit_batch = bb.encode([records[0].edit])
            probe_layer = bb.num_layers - 1
            per_layer = grad_activation_bytes(bb, edit_batch, probe_layer)
            edit_tokens = edit_batch.input_ids.numel()
            probe = {"layer": probe_layer, "train_tokens": train_tokens, "edit_tokens": edit_tokens,
                     "train_batch_shape": [len(train_samples), train_tokens // len(train_samples), bb.hidden_size],
                     "grad_bytes_edit_sample": per_layer, "bytes_per_token_per_layer": per_layer / edit_tokens}
            del edit_batch
            entry["probe"] = probe
            print(f"one decoder layer saves {per_layer / edit_tokens / 1024:.1f} KiB per token for backward "
                  f"({per_layer * train_tokens / edit_tokens / 2 ** 20:.0f} MiB on a training batch "
                  f"{probe['train_batch_shape']})")
            entry["editors"] = []
            for e in editors:
                res = run_editor(e, bb, records, a, mem, cuda)
                for note in res["notes"]:
                    print(f"note: {e}: {note}")
                if "skipped" in res or "failed" in res:
                    print(f"{e}: {'skipped' if 'skipped' in res else 'FAILED'}: {res.get('skipped', res.get('failed'))}")
                if "skipped" not in res:
                    res["estimate"] = estimates(built, res, probe, built.full_layers, a.batch_size)
                entry["editors"].append(res)
            print_table(entry)
            report["backbones"].append(entry)
            del bb, built
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(report, indent=1, default=str))
        print(f"\nfigures written to {a.json}")
    return report


def print_table(entry):
    kind = "GiB"
    print(f"| editor | train peak {kind} (above start) | train steps/s | s/edit | edit peak {kind} | eval samples/s | "
          f"eval peak {kind} | at full depth: train (bs 8) / eval @1,000 edits {kind} |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in entry["editors"]:
        if "skipped" in r:
            continue
        tm, em, vm, est = r.get("train_memory"), r.get("edit_memory"), r.get("eval_memory"), r.get("estimate", {})
        fmt = lambda m: "-" if m is None else f"{gib(m['peak'])} ({gib(m['above_start'])})"
        print(f"| {r['editor']} | {fmt(tm)} | {r.get('train_steps_per_s', float('nan')):.3g} | "
              f"{r.get('s_per_edit', float('nan')):.3g} | {fmt(em)} | {r.get('eval_samples_per_s', float('nan')):.3g} | "
              f"{fmt(vm)} | {gib(est.get('train'))} ({gib(est.get('train_bs8'))}) / {gib(est.get('eval_1000'))} |")


if __name__ == "__main__":
    return_freed_memory()
    main()
