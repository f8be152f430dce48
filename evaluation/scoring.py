"""Batched scoring of samples through an editor, and the two per-sample scores.

One pass over a list of samples gives, per sample, the target token ids, the teacher-forced argmax at
each target position (one forward per batch) and the greedy generation of ``len(target)`` tokens
(``editor.generate``). Scores, in percent:

- teacher-forced token accuracy (the default, as in the paper's tables): for Rel / T-Gen / M-Gen the
  fraction of target positions whose argmax is the target token; for T-Loc / M-Loc the fraction whose
  post-edit argmax equals the pre-edit argmax;
- exact match: for Rel / T-Gen / M-Gen, the greedy generation of ``len(target)`` tokens equals the
  target (100 or 0); for T-Loc / M-Loc, the post-edit generation equals the pre-edit generation.
  It is computed from the real greedy generations, which are also what ``results.json`` shows.
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


@torch.no_grad()
def run_samples(editor, samples: Sequence[Sample], batch_size: int, progress=None) -> list[Outputs]:
    """Teacher-forced predictions and greedy generations of ``samples`` through ``editor``, in batches.
    Each sample's outputs do not depend on the other samples of its batch (right padding, causal
    attention), so any batch size gives the same results as batch size 1."""
    out = []
    for start in range(0, len(samples), batch_size):
        part = list(samples[start:start + batch_size])
        batch = editor.backbone.encode(part)
        logits = editor.logits(batch)
        preds = target_predictions(logits, batch.labels)
        targets = target_ids(batch.labels)
        del logits
        gens = editor.generate(part, max(len(t) for t in targets))
        for t, p, g in zip(targets, preds, gens):
            out.append(Outputs(t.tolist(), p.tolist(), list(g[:len(t)])))
        if progress is not None:
            progress.update(len(part))
    return out


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
