"""Benchmark LiveEdit's expert repository and routing (prints figures; asserts nothing).

    python -m scripts.bench_liveedit [--family blip2] [--sizes 1000,10000,100000]
    python -m scripts.bench_liveedit --backbone tiny-llava --model_path PATH [--checkpoint trainable.safetensors]

Figures:
- time to append the 1st, 1,000th, 10,000th and 100,000th expert: a full ``edit()`` (encode, frozen
  model to l_e, edit-side features and generators, append) and the repository append alone, plus the
  worst single append (the one that doubles the storage) and the amortised append time;
- per-query inference time (one query, and per query in a batch of 8) with 0, 1k, 10k and 100k experts
  in the repository, against the unedited model, with how many experts hard filtering kept;
- bytes per expert (here and for the reference backbones).

By default the backbone is a tiny random model of the real class (hidden 128, 6 decoder layers, as the
embedded tiny backbones) built with ``backbones.tiny``, and the editor has its initial (untrained)
weights; ``--model_path`` loads a backbone folder instead and ``--checkpoint`` trained editor weights.
Beyond the few real edits, the repository is filled with random experts of the same scale (cheap to
make; an unrelated edit's expert), so how many are kept depends on the editor's weights.

**Real edits** (``--dataset``): a trained editor on its backbone, e.g.

    python -m scripts.bench_liveedit --backbone tiny-blip2 --checkpoint CKPT --dataset SYNTH-EVQA

Every record of the dataset's train, val and eval splits is edited once (``edit_batch``), and the
repository is filled to each size by cycling through those real experts (at 100k, each of ~3,500
distinct experts appears ~29 times); the queries are eval records' unrelated images (M-Loc) and
rephrased edit images (M-Gen) with their questions, so the kept counts are those of real traffic.
Without ``--model_path``, an embedded tiny backbone is built first if needed.
"""
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from backbones import BACKBONES, load_backbone
from backbones.tiny import TinySize, build_tiny_model, save_tiny, train_tokenizer
from editors.liveedit import LiveEdit, LiveEditConfig
from utils.config import load_config
from utils.errors import CliParser, cli_main
from vl_datasets.records import Sample

FAMILY_BACKBONE = {"blip2": "tiny-blip2", "llava": "tiny-llava", "minigpt4": "tiny-minigpt4"}
WORDS = ["red", "green", "blue", "yellow", "circle", "square", "triangle", "star", "small", "large"]
REFERENCE_HIDDEN = {"blip2-opt-2.7b": 2560, "llava-v1.5-7b": 4096, "minigpt-4-vicuna-7b": 4096}


def timed(fn, repeat: int) -> float:
    """Median wall seconds of ``repeat`` calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def random_backbone(family: str, workdir: Path):
    corpus = [f"What {a} is the {b}? The answer is: {c}" for a in WORDS for b in WORDS for c in WORDS[:3]]
    corpus += ["a photo of a", "###Human: USER: ASSISTANT: ###Assistant: <Img></Img>"] * 20
    tok = train_tokenizer(corpus, vocab_size=600)
    size = TinySize()
    name = FAMILY_BACKBONE[family]
    path = save_tiny(build_tiny_model(family, tok, size, seed=0), family, tok, size, workdir / family)
    return BACKBONES.get(name).load(name, path)


def make_samples(workdir: Path, n: int):
    samples = []
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        colour = tuple(int(c) for c in torch.randint(0, 256, (3,), generator=g))
        im = Image.new("RGB", (32, 32), colour)
        x0, y0 = (int(v) for v in torch.randint(0, 20, (2,), generator=g))
        for x in range(x0, x0 + 10):
            for y in range(y0, y0 + 10):
                im.putpixel((x, y), tuple(255 - c for c in colour))
        path = workdir / f"img{i}.png"
        im.save(path)
        prompt = f"What {WORDS[i % 4]} is the {WORDS[4 + i % 4]}? The answer is:"
        samples.append(Sample(prompt, WORDS[i % 10], str(path)))
    return samples


def fill(editor: LiveEdit, target_size: int, like: dict, gen: torch.Generator, chunk: int = 4096) -> float:
    """Append random experts (scaled like the real ones) until the repository holds ``target_size``;
    returns the wall time spent appending."""
    repo, spent = editor.repository, 0.0
    while len(repo) < target_size:
        n = min(chunk, target_size - len(repo))
        parts = [torch.randn((n,) + t.shape[1:], generator=gen) * t.std() + t.mean() for t in like.values()]
        reqs = [{"prompt": "filler", "target": "x", "image": None}] * n
        t = time.perf_counter()
        repo.append(*parts, reqs)
        spent += time.perf_counter() - t
    return spent


def real_experts(editor: LiveEdit, dataset: str, chunk: int = 64) -> dict:
    """The experts of one edit per record of ``dataset``'s train, val and eval splits (``edit_batch``),
    taken out of the repository: {phi, psi, U, V: [n, ...]}."""
    from vl_datasets import load_dataset
    records = [r for split in ("train", "val", "eval") for r in load_dataset(dataset, split)]
    for i in range(0, len(records), chunk):
        editor.edit_batch([r.edit for r in records[i:i + chunk]])
    pool = {n: editor.repository.tensor(n).clone() for n in ("phi", "psi", "U", "V")}
    editor.restore()
    return pool


def fill_real(editor: LiveEdit, target_size: int, pool: dict, chunk: int = 4096) -> float:
    """Append real experts from ``pool`` (cycling) until the repository holds ``target_size``; returns
    the wall time spent appending."""
    repo, spent, n_pool = editor.repository, 0.0, len(pool["phi"])
    while len(repo) < target_size:
        n = min(chunk, target_size - len(repo))
        idx = torch.arange(len(repo), len(repo) + n) % n_pool
        reqs = [{"prompt": "real edit (repeated)", "target": "x", "image": None}] * n
        t = time.perf_counter()
        repo.append(*(pool[k][idx] for k in ("phi", "psi", "U", "V")), reqs)
        spent += time.perf_counter() - t
    return spent


def one_append_time(editor: LiveEdit, like: dict, gen: torch.Generator) -> float:
    parts = [torch.randn((1,) + t.shape[1:], generator=gen) for t in like.values()]
    t = time.perf_counter()
    editor.repository.append(*parts, [{"prompt": "p", "target": "t", "image": None}])
    return time.perf_counter() - t


@cli_main
def main(argv=None):
    ap = CliParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", choices=sorted(FAMILY_BACKBONE), default="blip2",
                    help="tiny random backbone to build (ignored with --model_path)")
    ap.add_argument("--backbone", default=None, help="backbone name for --model_path (e.g. tiny-llava)")
    ap.add_argument("--model_path", default=None, help="load this backbone folder instead of a random one")
    ap.add_argument("--checkpoint", default=None, help="trained LiveEdit weights (trainable.safetensors)")
    ap.add_argument("--config", default=None, help="LiveEdit YAML (default: configs/liveedit/<backbone>.yaml)")
    ap.add_argument("--sizes", default="1000,10000,100000", help="repository sizes to measure")
    ap.add_argument("--repeat", type=int, default=10, help="timed repetitions (median reported)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dataset", default=None,
                    help="fill the repository with real edits of this dataset and query with its eval records")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",") if s]

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.model_path or args.dataset:
            name = args.backbone or FAMILY_BACKBONE[args.family]
            if not args.model_path:
                from synthetic.embedded import prepare_backbone, prepare_dataset
                prepare_backbone(name)
                prepare_dataset(args.dataset)
            bb = load_backbone(name, args.device, args.model_path)
        else:
            bb = random_backbone(args.family, tmp)
            bb.model.to(args.device)
        cfg = load_config(LiveEditConfig, "liveedit", bb.name, args.config)
        editor = LiveEdit(bb, cfg)
        if args.checkpoint:
            from training.checkpoint import load_trained_weights
            load_trained_weights(editor, args.checkpoint)
        editor.eval()
        pool = None
        if args.dataset:
            from vl_datasets import load_dataset
            t = time.perf_counter()
            pool = real_experts(editor, args.dataset)
            print(f"{len(pool['phi']):,} real experts (one edit per record of {args.dataset} train/val/eval) "
                  f"in {time.perf_counter() - t:.1f} s")
            ev = load_dataset(args.dataset, "eval", limit=24)
            queries = [r.image_loc for r in ev[:4]] + [r.image_rephrase for r in ev[:4]]   # real traffic
            requests = [r.edit for r in ev]
        else:
            queries = requests = make_samples(tmp, 24)
        single, batch8 = bb.encode(queries[:1], with_targets=False), bb.encode(queries[:8], with_targets=False)

        print(f"backbone {bb.name} ({'loaded' if args.model_path or args.dataset else 'random tiny'}): hidden {bb.hidden_size}, "
              f"{bb.num_layers} layers, {bb.n_vision_tokens} vision tokens; LiveEdit l_e={cfg.edit_layer} "
              f"d_m={cfg.d_m} heads={cfg.heads} r={cfg.rank} k={cfg.n_queries}; "
              f"weights {'trained' if args.checkpoint else 'initial (untrained)'}; "
              f"torch threads {torch.get_num_threads()}")

        def inference_row(label):
            with torch.no_grad():
                base1 = timed(lambda: bb.logits(single), args.repeat)
                base8 = timed(lambda: bb.logits(batch8), args.repeat)
                ed1 = timed(lambda: editor.logits(single), args.repeat)
                ed8 = timed(lambda: editor.logits(batch8), args.repeat)
                kept = 0
                if len(editor.repository):
                    kept = editor.route(bb.hidden_at(batch8, cfg.edit_layer), batch8)[2].sum(1).float().mean()
            print(f"  {label:>8} experts | 1 query: {ed1 * 1e3:8.2f} ms (unedited {base1 * 1e3:6.2f} ms, "
                  f"x{ed1 / base1:5.2f}) | batch of 8: {ed8 / 8 * 1e3:8.2f} ms/query (unedited "
                  f"{base8 / 8 * 1e3:6.2f}, x{ed8 / base8:5.2f}) | kept per query {float(kept):.1f}")

        print("\nper-query inference time (median of %d)" % args.repeat)
        inference_row("0")

        gen = torch.Generator().manual_seed(0)
        appends = []
        t = time.perf_counter()
        editor.edit(requests[0])
        appends.append(("1st", time.perf_counter() - t, None))
        for s in requests[1:16]:        # real experts: the scale of the random fillers
            editor.edit(s)
        like = {n: editor.repository.tensor(n).clone() for n in ("phi", "psi", "U", "V")}
        fill_time = 0.0
        for size in sizes:
            fill_time += fill_real(editor, size - 1, pool) if pool else fill(editor, size - 1, like, gen)
            before = len(editor.repository)
            t = time.perf_counter()
            editor.edit(requests[16 + len(appends) % 8])
            full = time.perf_counter() - t
            raws = []
            for _ in range(5):                              # the append alone, at the same size
                editor.repository.truncate(before)
                raws.append(one_append_time(editor, like, gen))
            raw = statistics.median(raws)
            appends.append((f"{size:,}th", full, raw))
            inference_row(f"{len(editor.repository):,}")
        # the worst single append: the one that doubles the storage
        repo = editor.repository
        fill_time += fill(editor, repo.capacity, like, gen)
        t = time.perf_counter()
        one_append_time(editor, like, gen)
        worst = time.perf_counter() - t
        grown_to = repo.capacity

        print("\ntime to append an expert")
        for label, full, raw in appends:
            extra = f", repository append alone {raw * 1e6:7.1f} us" if raw is not None else ""
            print(f"  {label:>9} expert: edit() {full * 1e3:7.2f} ms{extra}")
        print(f"  worst single append (storage doubles to {grown_to:,} experts): {worst * 1e3:.1f} ms; "
              f"amortised over {len(repo):,} appends in chunks: {fill_time / len(repo) * 1e6:.2f} us/expert")

        print("\nbytes per expert")
        per = repo.bytes_per_expert()
        print(f"  {bb.name}: {per:,} B (phi, psi: {cfg.n_queries}x{cfg.d_m}, U, V: {cfg.rank}x{bb.hidden_size}, "
              f"{repo.dtype}); storage now {repo.capacity:,} slots = {repo.capacity * per / 2**20:.1f} MiB "
              f"for {len(repo):,} experts; plus the request text in requests.json")
        for name, d in REFERENCE_HIDDEN.items():
            ref = load_config(LiveEditConfig, "liveedit", name)
            b = (2 * ref.n_queries * ref.d_m + 2 * ref.rank * d) * 4
            print(f"  {name}: {b:,} B per expert (float32) -> {b * 1e5 / 2**30:.1f} GiB for 100k experts")


if __name__ == "__main__":
    main()
