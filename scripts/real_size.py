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
of each phase (the editor's construction included: its own modules, copies of weights), training
steps/s, seconds per edit and evaluation samples/s, then what a user needs at the published depth
(``estimates``): for training, and for the evaluation after 1,000 edits (the editor's state at
1,000 edits: LiveEdit's 1,000 experts, FT-L's master copy). Depth is extrapolated per decoder
layer: the layers that backpropagate at full depth but not at the cut one (where backpropagation
starts is traced, ``gradient_reach``) each add the bytes one layer saves for backward (measured with
``saved_tensors_hooks``).

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
maximum RSS), minus the resident set at the phase start (glibc set to return freed blocks to the OS);
``retained``: what is still in use at the phase's end (after garbage collection). Not counted: the
CUDA context, the allocator's cached blocks and fragmentation (on a GPU ``nvidia-smi`` shows more).
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
        """``peak``, ``above_start`` (the peak minus the use at the start) and ``retained`` (what the
        phase left in use once its garbage is collected: an editor's modules, its edited state)."""
        gc.collect()
        retained = self.in_use() - self.base
        if self.cuda:
            per = [torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())]
            return {"peak": sum(per), "above_start": sum(per) - self.base, "retained": retained, "per_device": per}
        peak = self._hwm()
        return {"peak": peak, "above_start": max(0, peak - self.base), "retained": retained}


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


def layer_of(config, n_layers: int):
    """The lowest decoder layer (0-based, in a stack of ``n_layers``) that an editor's config names,
    or None (an editor that names no layer: FT-M, none, ...)."""
    for name in LAYER_FIELDS:
        v = getattr(config, name, None)
        if isinstance(v, int) and not isinstance(v, bool):
            return v % n_layers
        if isinstance(v, (list, tuple)) and v and all(isinstance(x, int) and not isinstance(x, bool) for x in v):
            return min(x % n_layers for x in v)
    return None


@contextlib.contextmanager
def gradient_reach(backbone):
    """Records where backpropagation starts in the decoder stack while the block runs: yields a dict
    whose ``from`` is, after the block, the lowest decoder layer whose output required grad, else
    the number of layers when only the head's input did (an editor acting on the top layer's output,
    e.g. LiveEdit's training at a cut depth), else None (no gradient through the LLM). Layers from
    ``from`` up save activations for backward; the layers above an editor's layer do at full depth
    too, which is what ``estimates`` adds for the published depth."""
    stack = backbone.stack
    seen = {"layers": set(), "head": False, "from": None}
    run_layer, head = stack.run_layer, stack.head

    def traced_layer(i, hidden, *args, **kwargs):
        out = run_layer(i, hidden, *args, **kwargs)
        if torch.is_grad_enabled() and isinstance(out, torch.Tensor) and out.requires_grad:
            seen["layers"].add(i)
        return out

    def traced_head(hidden):
        if torch.is_grad_enabled() and hidden.requires_grad:
            seen["head"] = True
        return head(hidden)

    stack.run_layer, stack.head = traced_layer, traced_head
    try:
        yield seen
    finally:
        del stack.run_layer, stack.head          # the class's methods again
        seen["from"] = (min(seen["layers"]) if seen["layers"]
                        else backbone.num_layers if seen["head"] else None)


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


def run_editor(name, backbone, records, args, mem, cuda, full_layers):
    """Train (trainable editors), edit and evaluate one editor; its figures, or a skip note."""
    from editors import EDITORS
    from evaluation.scoring import run_samples
    from training.precision import LossScaling
    from utils.config import load_config
    out = {"editor": name, "notes": []}
    cls = EDITORS.get(name)
    try:
        config = load_config(cls.config_class, name, backbone.name)
        if args.overrides.get(name):
            config = dataclasses.replace(config, **args.overrides[name])
            out["notes"].append(f"config overrides {args.overrides[name]}")
        out["full_layer"] = layer_of(config, full_layers)      # where it acts at the published depth
        config = clamp_layers(config, backbone.num_layers, args.edit_layer, out["notes"])
        mem.start()                        # the editor's own memory: modules, copies of weights, ...
        editor = cls(backbone, config)
        out["setup_memory"] = mem.stop()
    except Exception as e:  # noqa: BLE001 - any editor that cannot run here is reported, not fatal
        out["skipped"] = f"{type(e).__name__}: {e}"
        return out
    out["layer"] = layer_of(config, backbone.num_layers)
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
            with gradient_reach(backbone) as reach:
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
                del terms, loss
            del opt
            out["train_memory"] = mem.stop()
            out["train_grad_from"] = reach["from"]
            editor.eval()
            timed = times[1:] or times
            out["train_step_s"] = times
            out["train_steps_per_s"] = 1 / statistics.mean(timed)
            out["train_samples"] = 4 * args.batch_size
        edit_recs = records[:args.edits]
        mem.start()
        times, state = [], []
        with gradient_reach(backbone) as reach:
            for r in edit_recs:
                t0 = time.perf_counter()
                editor.edit(r.edit)
                sync(cuda)
                times.append(time.perf_counter() - t0)
                state.append(editor.state_bytes())
        out["edit_memory"] = mem.stop()
        out["edit_grad_from"] = reach["from"]
        out["edit_s"] = times
        out["s_per_edit"] = statistics.mean(times[1:] or times)
        out["state_bytes"] = state             # editor.state_bytes() after each edit (None: unknown)
        repo = getattr(editor, "repository", None)
        if repo is not None and hasattr(repo, "bytes_per_expert"):
            out["bytes_per_expert"] = repo.bytes_per_expert()
            out["repository_capacity"] = repo.capacity
        masters = getattr(editor, "masters", None)        # FT-L / FT-M: float32 copies the edits step
        if masters:
            out["master_bytes"] = sum(m.numel() * m.element_size() for m in masters)
        snapshot = getattr(editor, "snapshot", None)      # and the weights before the first edit
        if snapshot is not None and hasattr(snapshot, "originals"):
            out["original_bytes"] = sum(o.numel() * o.element_size() for o in snapshot.originals)
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
EVAL_EDITS = 1000       # "evaluation at 1,000 edits"


def full_depth_extra_layers(grad_from, n: int, n_full: int, layer, full_layer) -> int:
    """Decoder layers that backpropagate at the published depth (``n_full`` layers) but not at the
    cut depth (``n``). ``grad_from`` (``gradient_reach``) is where backpropagation started at the cut
    depth: it keeps its distance to the editor's layer (``layer`` at the cut depth, ``full_layer`` at
    full depth; FT-L's layer 21, LiveEdit's l_e = 21 whose output it changes: from 22), or, for an
    editor that names no layer (FT-M's connector sits below layer 0), its place."""
    if grad_from is None:
        return 0
    start = grad_from if layer is None or full_layer is None else grad_from - layer + full_layer
    start = min(max(start, 0), n_full)
    return max(0, (n_full - start) - (n - grad_from))


def state_growth(res: dict, n_edits: int = EVAL_EDITS):
    """Bytes the edited state grows by from the edits measured to ``n_edits``: ``state_bytes()`` per
    edit extrapolated linearly from the first to the last measured edit (0 for editors whose state
    does not grow: FT-L's master copy is made at the first edit); LiveEdit's repository allocates by
    doubling (1,000 experts: 1,024 slots). None when the editor cannot tell its state's size."""
    sb = res.get("state_bytes") or []
    if not sb or any(v is None for v in sb):
        return None
    slope = (sb[-1] - sb[0]) / (len(sb) - 1) if len(sb) > 1 else 0.0
    growth = max(0.0, slope * (n_edits - len(sb)))
    if "bytes_per_expert" in res:
        cap = res["repository_capacity"]
        while cap < n_edits:
            cap *= 2
        growth = max(growth, res["bytes_per_expert"] * cap - sb[-1])
    return int(growth)


def estimates(entry: dict, res: dict, batch_size: int, n_edits: int = EVAL_EDITS) -> dict:
    """What a user needs at the published depth, from one editor's figures at the cut depth (``res``)
    and its backbone's (``entry``: the JSON this script writes; README, "Real-size backbones"):

    - ``train``: parameter bytes at full depth + the editor's own memory (``setup_memory``: its
      modules) + what the training phase used above its start (Adam's state, gradients,
      activations) + the activations of the decoder layers that backpropagate at full depth but not
      at the cut depth (``full_depth_extra_layers``: the bytes one layer saves per token, ``probe``,
      times the tokens of the batch); ``train_bs8`` the same at 8 records (activations scale with
      the batch, gradients and Adam's state do not);
    - ``eval_1000``: parameter bytes + the editor's own memory + its edited state after ``n_edits``
      edits (what the edits retained, e.g. FT-L's float32 master copy, plus ``state_growth``, e.g.
      LiveEdit's 1,000 experts) + the larger transient of one edit (with the extra layers its
      backpropagation crosses at full depth, e.g. FT-L's) and of the batched evaluation."""
    P = entry["full_parameter_bytes"]
    n, n_full = entry["num_layers"], entry["full_layers"]
    probe = entry["probe"]
    per_token = probe["bytes_per_token_per_layer"]
    layer, full_layer = res.get("layer"), res.get("full_layer")
    own = max(0, res.get("setup_memory", {}).get("retained", 0))
    est = {"editor_bytes": own}
    if "train_memory" in res:
        extra = full_depth_extra_layers(res.get("train_grad_from"), n, n_full, layer, full_layer)
        fixed = 3 * res["trainable_bytes"]                       # gradients, Adam's two moments
        act = max(0, res["train_memory"]["above_start"] - fixed) + extra * per_token * probe["train_tokens"]
        est["train"] = P + own + fixed + act
        est["train_bs8"] = P + own + fixed + act * 8 / batch_size
        est["train_per_record"] = act / batch_size
        est["train_extra_layers"] = extra
    if "edit_memory" in res and "eval_memory" in res:
        kept = max(0, res["edit_memory"].get("retained", 0))
        extra = full_depth_extra_layers(res.get("edit_grad_from"), n, n_full, layer, full_layer)
        edit_peak = max(0, res["edit_memory"]["above_start"] - kept) + extra * per_token * probe["edit_tokens"]
        growth = state_growth(res, n_edits)
        est["edit_extra_layers"] = extra
        est["state_growth"] = growth                             # None: unknown, not included
        est["state_1000"] = kept + (growth or 0)
        est["eval_1000"] = P + own + est["state_1000"] + max(edit_peak, res["eval_memory"]["above_start"])
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
                res = run_editor(e, bb, records, a, mem, cuda, built.full_layers)
                for note in res["notes"]:
                    print(f"note: {e}: {note}")
                if "skipped" in res or "failed" in res:
                    print(f"{e}: {'skipped' if 'skipped' in res else 'FAILED'}: {res.get('skipped', res.get('failed'))}")
                if "skipped" not in res:
                    res["estimate"] = estimates(entry, res, a.batch_size)
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
    print(f"| editor | editor's own {kind} | train peak {kind} (above start) | train steps/s | s/edit | "
          f"edit peak {kind} (above start) | eval samples/s | eval peak {kind} (above start) | "
          f"at full depth: train (bs 8) / state @1,000 edits / eval @1,000 edits {kind} |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in entry["editors"]:
        if "skipped" in r:
            continue
        tm, em, vm, est = r.get("train_memory"), r.get("edit_memory"), r.get("eval_memory"), r.get("estimate", {})
        fmt = lambda m: "-" if m is None else f"{gib(m['peak'])} ({gib(m['above_start'])})"
        own = r.get("setup_memory", {}).get("retained")
        print(f"| {r['editor']} | {gib(own)} | {fmt(tm)} | {r.get('train_steps_per_s', float('nan')):.3g} | "
              f"{r.get('s_per_edit', float('nan')):.3g} | {fmt(em)} | {r.get('eval_samples_per_s', float('nan')):.3g} | "
              f"{fmt(vm)} | {gib(est.get('train'))} ({gib(est.get('train_bs8'))}) / {gib(est.get('state_1000'))} / "
              f"{gib(est.get('eval_1000'))} |")


if __name__ == "__main__":
    return_freed_memory()
    main()
