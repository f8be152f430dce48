"""The lifelong (sequential) editing protocol, as a plan of stages run by one loop.

A *stage* applies some new edits, then tests some records; a *stream* is a run of stages between two
``restore()`` calls. Two plans:

- ``plan_chunks(N, T)`` (DESIGN section 4): the N records, cut into chunks of T edits (the last chunk
  holds the remainder); each chunk is its own stream: record the unedited outputs of its records,
  apply its T edits one at a time, test its records, restore.
- ``plan_points(points)`` (``--eval_at``): one stream of ``max(points)`` edits; at each point n, after
  the first n edits, test records 0..n-1 (everything edited so far). The point n = T tests the same
  thing as the first chunk of a chunked run with that T.

Pre-edit outputs (the "before" predictions and the locality reference) are taken with the unedited
model at the start of each stream. Finished stages are persisted one by one; a resumed run skips
them (within a partly finished stream their edits are applied again, untimed, to rebuild the state).
"""
import time
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError, safe_open

from backbones.fingerprint import check_same_backbone
from evaluation.results import RunStore, summarise
from evaluation.scoring import LOCALITY, METRICS, PORT, run_samples, sample_scores
from utils.errors import UserError
from utils.io import read_json, write_json

EDIT_META = "edit_meta.json"


@dataclass(frozen=True)
class Stage:
    name: str                   # file / state folder name
    index: int
    stream: int
    edit_positions: tuple       # positions (in run order) edited in this stage
    test_positions: tuple       # positions tested after this stage's edits


def plan_chunks(n_records: int, T: int) -> list[Stage]:
    stages = []
    for c, start in enumerate(range(0, n_records, T)):
        pos = tuple(range(start, min(start + T, n_records)))
        stages.append(Stage(f"chunk_{c:05d}", c, c, pos, pos))
    return stages


def plan_points(points: list[int]) -> list[Stage]:
    stages, prev = [], 0
    for i, n in enumerate(points):
        stages.append(Stage(f"edits_{n:06d}", i, 0, tuple(range(prev, n)), tuple(range(n))))
        prev = n
    return stages


def edited_so_far(stage: Stage, stages: list[Stage]) -> list[int]:
    """Positions edited in ``stage``'s stream up to and including ``stage``, in edit order."""
    return [p for s in stages if s.stream == stage.stream and s.index <= stage.index for p in s.edit_positions]


def check_saved_states(load_dir: Path, stages: list[Stage], records, editor_name: str, backbone: str,
                       fingerprint: str | None = None):
    """Before a run with --load_edited_state: every stage has a saved state made by this editor and
    backbone (the same build: ``fingerprint``) for exactly the records this run edits up to that stage."""
    for s in stages:
        meta_path = Path(load_dir) / s.name / EDIT_META
        if not meta_path.is_file():
            raise UserError(f"--load_edited_state: no saved state {meta_path} for {s.name}")
        meta = read_json(meta_path, "--load_edited_state meta")
        want = [records[p].index for p in edited_so_far(s, stages)]
        if (meta.get("editor"), meta.get("backbone")) != (editor_name, backbone):
            raise UserError(f"--load_edited_state: {meta_path} was saved by editor {meta.get('editor')!r} on "
                            f"{meta.get('backbone')!r}, not {editor_name!r} on {backbone!r}")
        check_same_backbone(f"--load_edited_state: {meta_path}", meta.get("backbone_fingerprint"), fingerprint)
        if meta.get("record_indices") != want:
            raise UserError(f"--load_edited_state: {meta_path} holds edits of other records than this run's "
                            f"{s.name} (check -sen/--eval_at, -dsn, --shuffle/--seed)")
        for weights in sorted((Path(load_dir) / s.name).glob("*.safetensors")):   # headers: found before any write
            try:
                with safe_open(str(weights), framework="pt"):
                    pass
            except (SafetensorError, OSError) as e:
                raise UserError(f"--load_edited_state: {weights} is not a readable safetensors file ({e})") from None


def _samples(records, positions):
    """Samples of ``positions``, metric-major (text-only T-Loc samples batch together), then the
    records' portability samples (keyed ``("port", j)``)."""
    return ([(p, m, records[p].samples()[m]) for m in METRICS for p in positions]
            + [(p, (PORT, j), s) for p in positions for j, s in enumerate(records[p].portability)])


def _outputs(editor, records, positions, batch_size, progress, pre: dict | None = None, verify: bool = True) -> dict:
    """Outputs of the samples of ``positions``; with ``pre`` (the unedited outputs), a locality
    sample's generation is first checked against its unedited generation (see ``run_samples``)."""
    items = _samples(records, positions)
    expected = None if pre is None else [pre[(p, m)].gen if m in LOCALITY else None for p, m, _ in items]
    outs = run_samples(editor, [s for _, _, s in items], batch_size, progress, expected, verify=verify)
    return {(p, m): o for (p, m, _), o in zip(items, outs)}


def _record_entry(editor, record, position, edit_time, pre: dict, post: dict) -> dict:
    decode = editor.backbone.decode
    samples = {}
    for m, s in record.samples().items():
        b, a = pre[(position, m)], post[(position, m)]
        samples[m] = {"prompt": s.prompt, "image": s.image, "target": s.target,
                      "pred_before": decode(b.gen), "pred_after": decode(a.gen),
                      "tf_before": decode(b.tf), "tf_after": decode(a.tf), **sample_scores(m, a, b)}
    out = {"record": record.index, "position": position, "edit_time": edit_time, "samples": samples}
    if record.portability:  # Port: one entry per portability question, scored like Rel
        out["portability"] = []
        for j, s in enumerate(record.portability):
            b, a = pre[(position, (PORT, j))], post[(position, (PORT, j))]
            out["portability"].append({"prompt": s.prompt, "image": s.image, "target": s.target,
                                       "pred_before": decode(b.gen), "pred_after": decode(a.gen),
                                       "tf_before": decode(b.tf), "tf_after": decode(a.tf),
                                       **sample_scores(PORT, a, b)})
    return out


def apply_edits(editor, requests, edit_batch: int = 1, progress=None) -> list[float]:
    """Apply ``requests`` in order; returns each edit's seconds. With ``edit_batch`` > 1 and an editor
    that has ``edit_batch`` (one call for several independent edits, the same state as editing them one
    at a time), they go in groups of that size, and each edit of a group is given the group's time
    divided by its size."""
    times = []
    batched = edit_batch > 1 and hasattr(editor, "edit_batch")
    step = edit_batch if batched else 1
    for start in range(0, len(requests), step):
        group = requests[start:start + step]
        t0 = time.perf_counter()
        if batched:
            editor.edit_batch(group)
        else:
            editor.edit(group[0])
        times += [(time.perf_counter() - t0) / len(group)] * len(group)
        if progress is not None:
            progress.update(len(group))
    return times


def run_protocol(editor, records, stages: list[Stage], store: RunStore, *, batch_size: int,
                 load_dir=None, save_dir=None, progress=None, after_stage=None, edit_batch: int = 1,
                 verify_generations: bool = True) -> list[dict]:
    """Run (or finish) ``stages``; returns every stage's result in order. ``records`` are in run order.
    The editor is put in evaluation mode first (no dropout or other train-time randomness).
    ``edit_batch``: see ``apply_edits``. ``verify_generations`` false decodes every sample step by step
    (``run_samples``; the same generations, slower: benchmarks).
    ``after_stage(editor, stage) -> dict``, if given, is called on the edited model after each stage's
    tests and its entries are added to the stage's means (e.g. the General score)."""
    editor.eval()
    done = store.done_stages([s.name for s in stages])
    streams: dict[int, list[Stage]] = {}
    for s in stages:
        streams.setdefault(s.stream, []).append(s)
    for stream in streams.values():
        todo = [s for s in stream if s.name not in done]
        if not todo:
            continue
        editor.restore()
        need = sorted({p for s in todo for p in s.test_positions})
        pre = _outputs(editor, records, need, batch_size, progress, verify=verify_generations)
        times: dict[int, float] = {}
        for s in stream:
            if s.name in done:  # finished before an interruption: rebuild the state, keep its timings
                times.update(zip(s.edit_positions, done[s.name]["edit_times"]))
                if load_dir is None:
                    apply_edits(editor, [records[p].edit for p in s.edit_positions], edit_batch)
                continue
            if load_dir is not None:
                editor.restore()
                try:
                    editor.load_state(Path(load_dir) / s.name)
                except SafetensorError as e:   # a damaged state file: one line, as for every bad input
                    raise UserError(f"--load_edited_state: {Path(load_dir) / s.name} holds an unreadable "
                                    f"safetensors file ({e})") from None
                saved = read_json(Path(load_dir) / s.name / EDIT_META, "--load_edited_state meta")["edit_times"]
                new_times = saved[len(saved) - len(s.edit_positions):] if s.edit_positions else []
                if progress is not None:
                    progress.update(len(s.edit_positions))
            else:
                new_times = apply_edits(editor, [records[p].edit for p in s.edit_positions], edit_batch, progress)
            times.update(zip(s.edit_positions, new_times))
            edited = edited_so_far(s, stages)
            if save_dir is not None:
                folder = Path(save_dir) / s.name
                editor.save_state(folder)
                write_json(folder / EDIT_META, {
                    "editor": editor.name, "backbone": editor.backbone.name,
                    "backbone_fingerprint": editor.backbone.fingerprint, "stage": s.name,
                    "record_indices": [records[p].index for p in edited], "edit_times": [times[p] for p in edited]})
            post = _outputs(editor, records, s.test_positions, batch_size, progress, pre, verify_generations)
            entries = [_record_entry(editor, records[p], p, times.get(p), pre, post) for p in s.test_positions]
            stream_times = [times[p] for p in edited]
            means = summarise(entries, stream_times)
            state_bytes = getattr(editor, "state_bytes", lambda: None)()
            if state_bytes is not None:  # size of what the edits produced (editors/base.py)
                means["state_bytes"] = int(state_bytes)
            if after_stage is not None:
                extra = after_stage(editor, s) or {}
                for key, value in extra.items():
                    if isinstance(value, dict) and isinstance(means.get(key), dict):
                        means[key].update(value)
                    else:
                        means[key] = value
            result = {"name": s.name, "index": s.index, "n_edits": len(edited),
                      "edit_positions": list(s.edit_positions), "edit_times": new_times,
                      "means": means, "records": entries}
            store.save_stage(result)
            done[s.name] = result
        editor.restore()
    return [done[s.name] for s in stages]
