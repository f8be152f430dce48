"""Batches with extra input embeddings, for editors that change the LLM's *input* rather than a layer:
RECIPE inserts its continuous prompt tokens right before the prompt text, LTE puts the retrieved
edit's prefix before the whole query. Used by ``editors/recipe`` and ``editors/lte``.

- ``insert_embeddings(batch, positions, extras)``: a new right-padded ``VLBatch`` in which row ``b``
  holds ``extras[b]`` (``[n_b, D]``, possibly empty) inserted before its position ``positions[b]``,
  optionally without its vision tokens; vision / prompt / target ranges and labels are shifted, the
  inserted positions carry the pad id and no label. It also returns, for every original position,
  where it now sits, so ``back_to_original`` gives logits laid out as the original batch.
- ``prompt_texts(backbone, batch)``: each sample's prompt text read back from the batch (the prompt
  range only, so never the teacher-forced target), without the backbone's chat template.
- ``greedy_generate(logits_fn, backbone, samples, n)``: greedy decoding through an editor's own
  ``logits`` (``VLBackbone.generate`` calls the backbone's).
"""
from dataclasses import replace
from typing import Callable, Sequence

import torch

from backbones.base import IGNORE, VLBackbone, VLBatch
from vl_datasets.records import Sample


def insert_embeddings(batch: VLBatch, positions: torch.Tensor, extras: Sequence[torch.Tensor | None],
                      pad_token_id: int, drop_vision: bool = False) -> tuple[VLBatch, torch.Tensor]:
    """-> (new batch, index [B, L]: the new position of each original position; positions that were
    dropped or padding point at 0). ``positions[b]`` is an original position: the extras of row b go
    before it (``extras[b]`` None or with 0 rows: nothing is inserted). Gradients flow into the
    extras and into ``batch.inputs_embeds``."""
    B, L, D = batch.inputs_embeds.shape
    dev = batch.inputs_embeds.device
    lengths = batch.attention_mask.sum(1).tolist()
    vision = batch.vision_range.tolist()
    pos_list = [int(p) for p in positions.tolist()]
    rows, index = [], torch.zeros(B, L, dtype=torch.long, device=dev)
    new_ranges = {"vision_range": [], "prompt_range": [], "target_range": []}
    for b in range(B):
        n, (vs, ve), at = lengths[b], vision[b], pos_list[b]
        extra = extras[b] if extras[b] is not None else batch.inputs_embeds.new_zeros(0, D)
        k = extra.shape[0]
        keep = [p for p in range(n) if not (drop_vision and vs <= p < ve)]
        before = [p for p in keep if p < at]
        after = [p for p in keep if p >= at]
        new_pos = {p: i for i, p in enumerate(before)}
        new_pos.update({p: len(before) + k + i for i, p in enumerate(after)})
        idx = torch.tensor(before + after, dtype=torch.long, device=dev)
        emb = batch.inputs_embeds[b, idx]
        emb = torch.cat([emb[:len(before)], extra.to(emb.dtype), emb[len(before):]], 0)
        ids = torch.cat([batch.input_ids[b, idx[:len(before)]],
                         torch.full((k,), pad_token_id, dtype=torch.long, device=dev),
                         batch.input_ids[b, idx[len(before):]]])
        labels = torch.cat([batch.labels[b, idx[:len(before)]],
                            torch.full((k,), IGNORE, dtype=torch.long, device=dev),
                            batch.labels[b, idx[len(before):]]])
        rows.append((emb, ids, labels))
        for p, q in new_pos.items():
            index[b, p] = q

        def boundary(q: int, end: bool) -> int:
            """New position of a range boundary at original position q: the kept positions before
            it, plus the extras when they sit before it (extras inserted at a range's start go
            before the range, at its end after it)."""
            return sum(1 for p in keep if p < q) + (k if q > at or (q == at and not end) else 0)
        new_ranges["vision_range"].append((0, 0) if drop_vision or ve <= vs
                                          else (boundary(vs, False), boundary(ve, True)))
        for name in ("prompt_range", "target_range"):
            s, e = getattr(batch, name)[b].tolist()
            new_ranges[name].append((boundary(s, False), boundary(e, s == e)))
    L_new = max(r[0].shape[0] for r in rows)
    input_ids = torch.full((B, L_new), pad_token_id, dtype=torch.long, device=dev)
    labels = torch.full((B, L_new), IGNORE, dtype=torch.long, device=dev)
    mask = torch.zeros(B, L_new, dtype=batch.attention_mask.dtype, device=dev)
    embeds = torch.stack([torch.cat([e, e.new_zeros(L_new - e.shape[0], D)]) for e, _, _ in rows])
    for b, (e, ids, lab) in enumerate(rows):
        n = e.shape[0]
        input_ids[b, :n], labels[b, :n], mask[b, :n] = ids, lab, 1
    as_tensor = lambda v: torch.tensor(v, dtype=torch.long, device=dev).view(B, 2)
    new = VLBatch(input_ids, embeds, mask, labels, **{k: as_tensor(v) for k, v in new_ranges.items()})
    return new, index


def back_to_original(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Logits of a batch built by ``insert_embeddings``, laid out as the original batch ([B, L, V])."""
    return logits.gather(1, index[..., None].expand(-1, -1, logits.shape[-1]))


def _template_pieces(backbone: VLBackbone, has_image: bool) -> tuple[str, str]:
    """The chat template's text around the prompt, as ``prompt_texts`` sees it: (the part between the
    image and the prompt, the part after the prompt), both stripped."""
    marker = "\u2063PROMPT\u2063"
    text = backbone.prompt_text(marker, has_image)
    before, after = text.split(marker)
    if has_image:
        before = before.split(backbone.image_token)[-1]
    return before.strip(), after.strip()


def prompt_texts(backbone: VLBackbone, batch: VLBatch, with_target: bool = False) -> list[str]:
    """Each sample's prompt text, read from its prompt range (after the vision tokens) and stripped of
    the backbone's template. ``with_target`` appends the decoded target range (the teacher-forced
    target, or what was generated so far): the authors' RECIPE retrieval, which leaks the target."""
    tok = backbone.tokenizer
    out = []
    for b in range(batch.input_ids.shape[0]):
        s, e = batch.prompt_range[b].tolist()
        text = tok.decode(batch.input_ids[b, s:e].tolist(), skip_special_tokens=True).strip()
        before, after = _template_pieces(backbone, bool(batch.has_image[b]))
        if before and text.startswith(before):
            text = text[len(before):].strip()
        if after and text.endswith(after):
            text = text[:-len(after)].strip()
        if with_target:
            ts, te = batch.target_range[b].tolist()
            target = tok.decode(batch.input_ids[b, ts:te].tolist(), skip_special_tokens=True).strip()
            text = f"{text} {target}" if target else text
        out.append(text)
    return out


@torch.no_grad()
def greedy_generate(logits_fn: Callable[[VLBatch], torch.Tensor], backbone: VLBackbone,
                    samples: Sequence[Sample], max_new_tokens: int) -> list[list[int]]:
    """Greedy decoding as ``VLBackbone.generate`` (full forward per step, right-padded batch, stops at
    EOS per sample), with the logits of ``logits_fn``; the target range grows with what was generated."""
    batch = backbone.encode(samples, with_targets=False)
    B = batch.inputs_embeds.shape[0]
    grow = lambda t, v: torch.cat([t, t.new_full((B, max_new_tokens) + t.shape[2:], v)], 1)
    batch = replace(batch, input_ids=grow(batch.input_ids, backbone.pad_token_id),
                    inputs_embeds=grow(batch.inputs_embeds, 0), attention_mask=grow(batch.attention_mask, 0),
                    labels=grow(batch.labels, IGNORE), target_range=batch.target_range.clone())
    out = [[] for _ in range(B)]
    alive = torch.ones(B, dtype=torch.bool, device=batch.input_ids.device)
    rows = torch.arange(B, device=batch.input_ids.device)
    embed = backbone.model.get_input_embeddings()
    for _ in range(max_new_tokens):
        lengths = batch.lengths
        nxt = logits_fn(batch)[rows, lengths - 1].argmax(-1)
        for b in alive.nonzero().flatten().tolist():
            out[b].append(int(nxt[b]))
        alive &= nxt != backbone.tokenizer.eos_token_id
        if not alive.any():
            break
        idx = rows[alive]
        batch.input_ids[idx, lengths[idx]] = nxt[idx]
        batch.inputs_embeds[idx, lengths[idx]] = embed(nxt[idx]).to(batch.inputs_embeds.dtype)
        batch.attention_mask[idx, lengths[idx]] = 1
        batch.target_range[idx, 1] = lengths[idx] + 1
    return out


def logits_by_row(logits_fn: Callable[[VLBatch], torch.Tensor], batch: VLBatch, checkpointed: bool) -> torch.Tensor:
    """``logits_fn(batch)``; with ``checkpointed``, one row at a time under activation checkpointing
    (``torch.utils.checkpoint``): the backward recomputes each row's forward, so a training step holds
    the activations of one sequence instead of the whole batch (the same values: no dropout in the
    frozen backbone)."""
    if not checkpointed:
        return logits_fn(batch)
    from torch.utils.checkpoint import checkpoint
    out = []
    for b in range(batch.input_ids.shape[0]):
        row = replace(batch, **{f: getattr(batch, f)[b:b + 1] for f in
                                ("input_ids", "attention_mask", "labels", "vision_range", "prompt_range",
                                 "target_range")})
        run = lambda emb, row=row: logits_fn(replace(row, inputs_embeds=emb))
        out.append(checkpoint(run, batch.inputs_embeds[b:b + 1], use_reentrant=False))
    return torch.cat(out)
