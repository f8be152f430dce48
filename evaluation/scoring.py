"""Batched scoring of samples through an editor, and the two per-sample scores.

One pass over a list of samples gives, per sample, the target token ids, the teacher-forced argmax at
each target position (one forward per batch) and the greedy generation of ``len(target)`` tokens
(``editor.generate``). Scores, in percent:

- teacher-forced token accuracy (the default, as in the paper's tables): for Rel / T-Gen / M-Gen the
  fraction of target positions whose argmax is the target token; for T-Loc / M-Loc the fraction whose
  post-edit argmax equals the pre-edit argmax;
- exact match: for Rel / T-Gen / M-Gen, the greedy generation of ``len(target)`` tokens equals the
  target (100 or 0); for T-Loc / M-Loc, the post-edit generation equals the pre-edit generation.
  It is computed from the real greedy generations, which are also what ``results.json`` shows
  (verified by one teacher-forced pass where possible, decoded step by step otherwise: see
  ``run_samples``).
"""
from dataclasses import dataclass
from typing import Sequence

import torch

from utils.losses import target_ids, target_predictions
from vl_datasets.records import Sample

METRICS = ("rel", "t_gen", "m_gen", "t_loc", "m_loc")
LOCALITY = ("t_loc", "m_loc")
METRIC_NAMES = {"rel": "Rel", "t_gen": "T-Gen", "m_gen": "M-Gen", "t_loc": "T-Loc", "m_loc": "M-Loc"}
# Measured where the data has them: Port (the record's portability questions, scored like Rel) and
# General (a general-capability VQA set, evaluation/general.py), beside the five metrics.
PORT, PORT_NAME, GENERAL_NAME = "port", "Port", "General"


@dataclass
class Outputs:
    """What a model does on one sample."""

    target: list[int]  # the target's token ids
    tf: list[int]      # teacher-forced argmax at each target position
    gen: list[int]     # greedy generation, at most len(target) tokens (shorter after EOS)


@torch.inference_mode()
def run_samples(editor, samples: Sequence[Sample], batch_size: int, progress=None,
                expected: Sequence[list[int] | None] | None = None, verify: bool = True) -> list[Outputs]:
    """Teacher-forced predictions and greedy generations of ``samples`` through ``editor``, in batches
    (under inference mode: scoring never needs autograd; edits run outside it). Each sample's outputs
    do not depend on the other samples of its batch (right padding, causal attention): any batch size
    gives the same argmax decisions as batch size 1, up to float rounding, which differs between
    batch shapes by about 1e-6 and could only flip an exact near-tie (see the README).

    Greedy decoding produces a token sequence c exactly when the teacher-forced argmax on the
    generation context followed by c is c at every position (each step sees the same prefix); and a
    teacher-forced pass on any candidate proves the greedy tokens up to and including its first
    wrong one. So the scoring pass itself (on the target) settles each sample's generation up to the
    first token that leaves the target, which is all of it when the model says the target; up to
    ``CANDIDATE_PASSES`` batched passes on candidates (the settled prefix, then ``expected[i]``, e.g.
    the unedited model's generation for a locality sample, or the scoring pass's argmax) settle more,
    and only what is still open is decoded step by step. ``verify`` false decodes every sample step by
    step (the same generations: ``scripts/bench_eval.py`` checks it)."""
    bb = editor.backbone
    bb.warm_image_cache([s.image for s in samples if s.image is not None])
    eos = bb.tokenizer.eos_token_id
    out = []
    for start in range(0, len(samples), batch_size):
        part = list(samples[start:start + batch_size])
        batch = bb.encode(part)
        logits = editor.logits(batch)
        preds = [p.tolist() for p in target_predictions(logits, batch.labels)]
        targets = [t.tolist() for t in target_ids(batch.labels)]
        del logits
        gens: list[list[int] | None] = [None] * len(part)
        if verify:
            wanted = [list(expected[start + i]) if expected is not None and expected[start + i] is not None
                      else targets[i] for i in range(len(part))]
            known = {}
            for i, s in enumerate(part):
                ctx, n = bb.tokenize(s.prompt, s.image is not None, None)
                full, n_tf = bb.tokenize(s.prompt, s.image is not None, s.target)
                # the teacher-forced pass saw the generation context followed by the target, so its
                # argmax is the greedy token up to and including the first one that leaves the target
                prefix = exact_prefix(preds[i], targets[i], eos) if full[:n_tf] == ctx[:n] else []
                if finished(prefix, len(targets[i]), eos):
                    gens[i] = prefix
                else:
                    known[i] = prefix
            _extend_by_candidates(editor, part, known, wanted, preds, targets, gens, eos)
        todo = [i for i in range(len(part)) if gens[i] is None]
        if todo:
            decoded = editor.generate([part[i] for i in todo], max(len(targets[i]) for i in todo))
            for i, g in zip(todo, decoded):
                gens[i] = list(g[:len(targets[i])])
        for t, p, g in zip(targets, preds, gens):
            out.append(Outputs(t, p, g))
        if progress is not None:
            progress.update(len(part))
    return out


# Candidate passes per batch before the samples still unsettled are decoded step by step: each pass
# settles at least one more token of every sample in it, but costs a full forward, where a cached
# decoding step costs one position.
CANDIDATE_PASSES = 2


def exact_prefix(tf_argmax: list[int], given: list[int], eos: int) -> list[int]:
    """The greedy tokens that a teacher-forced pass on ``given`` proves: its argmax up to and including
    the first position where it differs from ``given`` (each of those positions saw the greedy
    prefix), cut after an EOS."""
    out = []
    for a, g in zip(tf_argmax, given):
        out.append(a)
        if a != g or a == eos:
            break
    return out


def finished(prefix: list[int], length: int, eos: int) -> bool:
    """A greedy generation of at most ``length`` tokens is complete: full length, or ended by EOS."""
    return len(prefix) >= length or (bool(prefix) and prefix[-1] == eos)


def _extend_by_candidates(editor, part, known: dict, wanted, preds, targets, gens, eos) -> None:
    """Settle ``known`` greedy prefixes by teacher-forced passes on candidates: the known prefix, then
    the sample's expected generation (``wanted``) where it agrees, else the first pass's argmax. Each
    pass proves the candidate up to its first wrong token and that token itself (``exact_prefix``)."""
    bb = editor.backbone
    for _ in range(CANDIDATE_PASSES):
        if not known:
            return
        order, cands = [], []
        for i in list(known):
            k, T = known[i], len(targets[i])
            guess = wanted[i] if wanted[i][:len(k)] == k else preds[i]
            cand = (k + guess[len(k):])[:T]
            if len(cand) < T and (not cand or cand[-1] != eos):   # a short guess: fill up from the argmax
                cand += preds[i][len(cand):T]
            if bb.image_token_id in cand:   # would read as an image slot: decoded step by step instead
                continue
            order.append(i)
            cands.append(cand)
        if not order:
            return
        cont = bb.encode_continuations([part[i] for i in order], cands)
        got = target_predictions(editor.logits(cont), cont.labels)
        for i, cand, g in zip(order, cands, got):
            prefix = exact_prefix(g.tolist(), cand, eos)
            if finished(prefix, len(targets[i]), eos):   # the whole candidate, or up to EOS
                gens[i] = prefix
                del known[i]
            else:
                known[i] = prefix


def _acc(pred: list[int], ref: list[int]) -> float:
    return 100.0 * sum(a == b for a, b in zip(pred, ref)) / max(len(ref), 1)


def _em(pred: list[int], ref: list[int]) -> float:
    return 100.0 if list(pred) == list(ref) else 0.0


def sample_scores(metric: str, post: Outputs, pre: Outputs) -> dict:
    """Scores of one sample after the edits (``post``) given its unedited outputs (``pre``)."""
    if metric in LOCALITY:
        return {"acc": _acc(post.tf, pre.tf), "em": _em(post.gen, pre.gen)}
    return {"acc": _acc(post.tf, post.target), "em": _em(post.gen, post.target),
            "acc_before": _acc(pre.tf, pre.target), "em_before": _em(pre.gen, pre.target)}
