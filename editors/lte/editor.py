"""LTE (Jiang et al., "Learning to Edit: Aligning LLMs with Knowledge Editing"), on a VLLM, as in the
LiveEdit authors' ``lte_vl``. BASELINES.md section 5.

- **Alignment**: the LLM is fine-tuned to use an edit given in context. The prefix of an edit e is
  the input embedding sequence of (e's image, ``"[Updated Information]" + prompt + " " + target +
  "\\n[Query]"``), placed before a query's own embeddings. Loss per record: NLL(e | P) + sum over
  the rephrases g of NLL(g | P) + sum over the locality samples l of 1/2 [KL(p_pre || p(l)) +
  KL(p_pre || p(l | P))], where p_pre is the frozen original backbone. The aligned weights are this
  editor's trainable parameters, never written into the shared backbone: ``finetune: lora`` adds
  LoRA adapters to the FFN output projection (``mlp_output_projection``) of the chosen layers,
  applied per call through activation sites (``mlp_activation`` -> ``mlp_output``); ``finetune:
  full`` holds a float32 copy of every decoder layer and swaps those tensors in for the duration of
  a forward only (the backbone's own parameters are put back, also on an error).
- **Edit**: store the request (prompt, target, image path) and the retriever's key of
  ``prompt + " " + target``; the prefix is re-embedded from the request when it is used.
- **Inference**: the retriever embeds the query's prompt text only (its prompt range; never the
  target); the top-1 edit by cosine similarity is used if above ``threshold``: its prefix goes
  before that sample, and the prefix positions are dropped from the logits. Every other sample runs
  through the aligned model as it is.
- **Locality reference**: with no edit in memory the editor is the *original* backbone (default), so
  the evaluation's pre-edit outputs, and ``restore()``, are the original model's, and LTE's locality
  pays for the alignment; ``locality_reference: aligned`` makes the unedited model the aligned one,
  as the authors' evaluation did.
- The tiny default's retriever is the project's tiny text encoder, trained here (``train_retriever``)
  with an in-batch contrastive loss plus a loss that puts own-edit similarities above ``threshold``
  and locality prompts below it; the real backbones use a frozen sentence encoder, as the authors.
"""
import contextlib
import copy
import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from backbones.base import VLBackbone, VLBatch
from backbones.sites import MLP_ACTIVATION, MLP_OUTPUT, Site
from editors import EDITORS
from editors.base import BaseEditor
from editors.common import check_trained_state
from editors.lte.config import LTE_LOSS_TERMS, LteConfig
from editors.recipe.batching import (back_to_original, greedy_generate, insert_embeddings, logits_by_row,
                                     prompt_texts)
from editors.recipe.editor import knowledge_text, select_rows
from editors.recipe.memory import GrowingMemory
from editors.recipe.text_encoder import TextEncoder, resolve_text_encoder
from utils.distributed import gather_rows, local_rows
from utils.errors import UserError
from utils.losses import masked_kl, masked_nll
from vl_datasets.records import EditRecord, Sample

EDIT_SIGN, QUERY_SIGN = "[Updated Information]", "\n[Query]"
PREFIX_CACHE_BYTES = 256 << 20     # re-embedded prefixes kept for reuse (not part of the edited state)


def prefix_sample(request: Sample) -> Sample:
    """The edit's prefix as a sample (its image, the marked prompt + target, no target of its own)."""
    sep = "" if request.prompt.endswith(" ") or request.target.startswith(" ") else " "
    return Sample(f"{EDIT_SIGN}{request.prompt}{sep}{request.target}{QUERY_SIGN}", "", request.image)


class LoRAAdapters(nn.Module):
    """LoRA on the FFN output projection of each chosen layer: out += scale * a A^T B^T, where ``a`` is
    the projection's input (the ``mlp_activation`` site). B starts at zero: the untrained adapters
    leave the model exactly as it is."""

    def __init__(self, backbone: VLBackbone, layers: list[int], rank: int, alpha: float):
        super().__init__()
        self.layers = list(layers)
        projs = [backbone.mlp_output_projection(l) for l in self.layers]
        self.A = nn.ParameterList([nn.Parameter(torch.randn(rank, p.in_features) / p.in_features ** 0.5)
                                   for p in projs])
        self.B = nn.ParameterList([nn.Parameter(torch.zeros(p.out_features, rank)) for p in projs])
        self.scale = alpha / rank

    def layer_edits(self) -> dict:
        edits = {}
        for j, layer in enumerate(self.layers):
            box = {}                      # this call's activation of layer ``layer``

            def capture(a, batch, box=box):
                box["a"] = a
                return a

            def add(out, batch, box=box, j=j):
                delta = (box.pop("a").float() @ self.A[j].T) @ self.B[j].T
                return out + (self.scale * delta).to(out.dtype)
            edits[Site(MLP_ACTIVATION, layer)] = capture
            edits[Site(MLP_OUTPUT, layer)] = add
        return edits


class FullCopy(nn.Module):
    """A float32 copy of every decoder layer; ``swapped`` puts its tensors in place of the backbone
    layers' parameters for one forward (cast to the backbone's dtype) and puts the originals back."""

    def __init__(self, backbone: VLBackbone):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(backbone.layer(i)).float() for i in range(backbone.num_layers))
        self.layers.requires_grad_(True)

    @contextlib.contextmanager
    def swapped(self, backbone: VLBackbone):
        saved = []
        try:
            for i, own in enumerate(self.layers):
                for (_, target), (_, source) in zip(backbone.layer(i).named_modules(), own.named_modules()):
                    for name, p in list(target._parameters.items()):
                        if p is None:
                            continue
                        saved.append((target, name, p))
                        new = source._parameters[name]
                        target._parameters[name] = new if new.dtype == p.dtype else new.to(p.dtype)
            yield
        finally:
            for module, name, p in reversed(saved):
                module._parameters[name] = p


@dataclass
class LteBatch:
    """``prepare_training_batch``'s result: the records' prefixes (R rows, no targets), their samples
    (R edits, R text rephrases, R image rephrases, R text-loc, R image-loc) and, when the retriever
    trains, its tokens (R knowledge texts, then the prompts of the edit, text rephrase, text-loc and
    image-loc samples)."""

    n_records: int
    prefixes: VLBatch
    queries: VLBatch
    tokens: dict | None


@EDITORS.register("lte")
class LTE(BaseEditor):
    name = "lte"
    config_class = LteConfig
    trainable = True

    def __init__(self, backbone: VLBackbone, config: LteConfig):
        super().__init__(backbone, config)
        n = backbone.num_layers
        layers = list(range(n)) if config.lora_layers is None else config.lora_layers
        if max(layers) >= n:
            raise UserError(f"lte.lora_layers: layer {max(layers)} is out of range for backbone {backbone.name!r} "
                            f"with {n} decoder layers (0..{n - 1})")
        path = resolve_text_encoder(config.retriever)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.retriever = TextEncoder(path, config.max_text_tokens)
            self.adapter = (LoRAAdapters(backbone, layers, config.lora_rank, config.lora_alpha)
                            if config.finetune == "lora" else FullCopy(backbone))
        self.retriever.to(backbone.device).eval().requires_grad_(config.train_retriever)
        self.adapter.to(backbone.device).eval()
        # sample_rows draws for the global batch from a generator seeded alike on every process (from
        # the global RNG, which the training loop seeds with -rs before building the editor)
        self.draws = torch.Generator().manual_seed(int(torch.randint(0, 2 ** 62, (1,))))
        self.memory = GrowingMemory({"key": (self.retriever.feature_size(config.retriever_pooling),)},
                                    device=backbone.device)
        self._prefixes: OrderedDict[int, torch.Tensor] = OrderedDict()

    # ---- the aligned model ---------------------------------------------------------------------
    def aligned_logits(self, batch: VLBatch) -> torch.Tensor:
        if self.config.finetune == "full":
            with self.adapter.swapped(self.backbone):
                return self.backbone.logits(batch)
        return self.backbone.logits(batch, self.adapter.layer_edits())

    def _embed(self, tokens: dict) -> torch.Tensor:
        return F.normalize(self.retriever.features(tokens, pooling=self.config.retriever_pooling).float(), dim=-1)

    def _prefix(self, i: int) -> torch.Tensor:
        """[n, D] prefix embeddings of memory entry i (re-embedded from its request, then cached)."""
        if i in self._prefixes:
            self._prefixes.move_to_end(i)
            return self._prefixes[i]
        r = self.memory.requests[i]
        one = self.backbone.encode([prefix_sample(Sample(r["prompt"], r["target"], r["image"]))], with_targets=False)
        emb = one.inputs_embeds[0, :int(one.lengths[0])].detach()
        self._prefixes[i] = emb
        budget = max(1, PREFIX_CACHE_BYTES // max(1, emb.numel() * emb.element_size()))
        while len(self._prefixes) > budget:
            self._prefixes.popitem(last=False)
        return emb

    # ---- lifelong editing ---------------------------------------------------------------------
    @torch.no_grad()
    def edit_batch(self, requests: Sequence[Sample]) -> None:
        if not requests:
            return
        keys = self._embed(self.retriever.tokenize([knowledge_text(r) for r in requests]))
        self.memory.append({"key": keys}, [{"prompt": r.prompt, "target": r.target, "image": r.image}
                                           for r in requests])
        self.n_edits += len(requests)

    def edit(self, request: Sample) -> None:
        self.edit_batch([request])

    def restore(self) -> None:
        self.memory.clear()
        self._prefixes.clear()
        self.n_edits = 0

    @torch.no_grad()
    def retrieve(self, batch: VLBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Per sample: (hit [B] bool, top-1 index [B]), from the prompt text only."""
        B, dev = batch.input_ids.shape[0], batch.input_ids.device
        if len(self.memory) == 0:
            return torch.zeros(B, dtype=torch.bool, device=dev), torch.zeros(B, dtype=torch.long, device=dev)
        q = self._embed(self.retriever.tokenize(prompt_texts(self.backbone, batch)))
        best, index = (q @ self.memory.tensor("key").T).max(1)
        return (best > self.config.threshold).to(dev), index.to(dev)

    @torch.no_grad()
    def logits(self, batch: VLBatch, retrieved=None) -> torch.Tensor:
        if len(self.memory) == 0:
            if self.config.locality_reference == "original":
                return self.backbone.logits(batch)
            return self.aligned_logits(batch)
        hit, index = self.retrieve(batch) if retrieved is None else retrieved
        if not bool(hit.any()):
            return self.aligned_logits(batch)
        extras = [self._prefix(int(index[b])) if hit[b] else None for b in range(len(hit))]
        zeros = torch.zeros(len(hit), dtype=torch.long, device=batch.input_ids.device)
        new, where = insert_embeddings(batch, zeros, extras, self.backbone.pad_token_id)
        return back_to_original(self.aligned_logits(new), where)

    def generate(self, samples: Sequence[Sample], max_new_tokens: int) -> list[list[int]]:
        """Greedy decoding; retrieval reads only the prompt, so it is done once for all steps."""
        first = {}

        def logits(batch):
            if "retrieved" not in first:
                first["retrieved"] = self.retrieve(batch)
            return self.logits(batch, first["retrieved"])
        return greedy_generate(logits, self.backbone, samples, max_new_tokens)

    def state_bytes(self) -> int:
        """Retrieval keys plus the stored requests' text (the prefixes are re-embedded from them)."""
        text = sum(len(json.dumps(r, ensure_ascii=False).encode()) for r in self.memory.requests)
        return self.memory.nbytes() + text

    # ---- training ----------------------------------------------------------------------------
    def _modules(self) -> list[nn.Module]:
        return [self.adapter] + ([self.retriever] if self.config.train_retriever else [])

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for m in self._modules() for p in m.parameters()]

    def train(self, mode: bool = True) -> "LTE":
        for m in self._modules():
            m.train(mode)
        return self

    def eval(self) -> "LTE":
        return self.train(False)

    def rng_state(self) -> torch.Tensor:
        return self.draws.get_state()

    def set_rng_state(self, state: torch.Tensor) -> None:
        self.draws.set_state(state)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"adapter.{k}": v for k, v in self.adapter.state_dict().items()}
        if self.config.train_retriever:
            state.update({f"retriever.{k}": v for k, v in self.retriever.model.state_dict().items()})
        return {k: v.detach().clone() for k, v in state.items()}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        check_trained_state(state, self.trainable_state_dict(), "LTE",
                            f"backbone {self.backbone.name!r}, lora_rank={self.config.lora_rank}",
                            f" (finetune={self.config.finetune!r}, train_retriever={self.config.train_retriever})")
        split = lambda prefix: {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        self.adapter.load_state_dict(split("adapter."))
        if self.config.train_retriever:
            self.retriever.model.load_state_dict(split("retriever."))

    def prepare_training_batch(self, records: Sequence[EditRecord]) -> LteBatch:
        if not records:
            raise UserError("LTE training needs at least one record per batch")
        samples = [getattr(r, kind) for kind in ("edit", "text_rephrase", "image_rephrase", "text_loc", "image_loc")
                   for r in records]
        tokens = None
        if self.config.train_retriever:
            texts = ([knowledge_text(r.edit) for r in records]
                     + [getattr(r, kind).prompt.strip() for kind in ("edit", "text_rephrase", "text_loc", "image_loc")
                        for r in records])
            tokens = self.retriever.tokenize(texts)
        prefixes = self.backbone.encode([prefix_sample(r.edit) for r in records], with_targets=False)
        return LteBatch(len(records), prefixes, self.backbone.encode(samples), tokens)

    def _retriever_loss(self, tokens: dict, R: int) -> torch.Tensor:
        """In-batch contrastive loss of the rel / text-rephrase prompts against the global batch's
        knowledge keys, plus a logistic loss putting (similarity - threshold) / temperature above 0
        for a prompt and its own edit, below 0 for the locality prompts against every edit."""
        e = self._embed(tokens)
        keys, q = e[:R], e[R:].view(4, R, -1)
        all_keys = gather_rows(keys)
        offset, _ = local_rows(R, keys.device)
        own = torch.arange(R, device=keys.device) + offset
        t, thr = self.config.retriever_temperature, self.config.threshold
        pos = q[:2].reshape(2 * R, -1)
        sims = pos @ all_keys.T                                              # [2R, R_all]
        nce = F.cross_entropy(sims / t, own.repeat(2))
        own_sims = sims.gather(1, own.repeat(2)[:, None])[:, 0]
        above = F.softplus(-(own_sims - thr) / t).view(2, R).mean(0)
        below = F.softplus((q[2:] @ all_keys.T - thr) / t).mean(-1).mean(0)  # [R]
        return nce + (above + below).mean()

    def training_losses(self, records) -> dict[str, torch.Tensor]:
        """Weighted loss terms (``LTE_LOSS_TERMS``) of a batch of records or of
        ``prepare_training_batch(records)``; every term is a mean over records. With ``sample_rows``
        each record uses one of its two rephrases and one of its two locality samples (drawn for the
        global batch), counted twice: the same expected loss from 4 sequences per record instead of 7."""
        prep = records if isinstance(records, LteBatch) else self.prepare_training_batch(records)
        R, P, Q, bb = prep.n_records, prep.prefixes, prep.queries, self.backbone
        dev = Q.input_ids.device
        ar = torch.arange(R)
        if self.config.sample_rows:
            offset, n_all = local_rows(R, dev)
            draw = lambda low, high: torch.randint(low, high, (n_all,), generator=self.draws)[offset:offset + R]
            gen, loc_rows = draw(1, 3) * R + ar, draw(3, 5) * R + ar
        else:
            gen, loc_rows = torch.arange(R, 3 * R), torch.arange(3 * R, 5 * R)
        n_gen, n_loc = len(gen) // R, len(loc_rows) // R
        # the edit, its rephrases and locality samples with the record's prefix, the locality samples
        # also without it (a row of Q is kind * R + record)
        rows = torch.cat([ar, gen, loc_rows, loc_rows]).to(dev)
        n_prefixed = (1 + n_gen + n_loc) * R
        plens = P.lengths.tolist()
        extras = [P.inputs_embeds[r, :plens[r]] for r in (rows[:n_prefixed] % R).tolist()]
        sub = select_rows(Q, rows)
        new, where = insert_embeddings(sub, torch.zeros(len(rows), dtype=torch.long, device=dev),
                                       extras + [None] * (n_loc * R), bb.pad_token_id)
        logits = back_to_original(logits_by_row(self.aligned_logits, new, self.config.checkpoint_rows), where)
        nll = masked_nll(logits[:(1 + n_gen) * R], sub.labels[:(1 + n_gen) * R], per_sample=True)
        loc = select_rows(Q, loc_rows.to(dev))
        with torch.no_grad():
            pre = bb.logits(loc)                                             # the frozen original
        # KL(p_pre || p(l | P)) and KL(p_pre || p(l))
        kl_with = masked_kl(logits[(1 + n_gen) * R:n_prefixed], pre, loc.labels, per_sample=True)
        kl_without = masked_kl(logits[n_prefixed:], pre, loc.labels, per_sample=True)
        losses = {"rel": nll[:R].mean(), "gen": nll[R:].view(n_gen, R).sum(0).mean() * (2 / n_gen),
                  "loc": (0.5 * (kl_with + kl_without)).view(n_loc, R).sum(0).mean() * (2 / n_loc)}
        losses["retriever"] = (self._retriever_loss(prep.tokens, R) if prep.tokens is not None
                               else logits.new_zeros(()))
        w = self.config.loss_weights
        return {name: losses[name] * getattr(w, name) for name in LTE_LOSS_TERMS}

    # ---- edited state across processes ---------------------------------------------------------
    def retriever_digest(self) -> str:
        h = hashlib.sha256()
        for k, v in sorted(self.retriever.model.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def fingerprint(self) -> dict:
        return {"editor": self.name, "backbone": self.backbone.name, "retriever": self.config.retriever,
                "retriever_pooling": self.config.retriever_pooling, "weights": self.retriever_digest()}

    def save_state(self, directory: Path) -> None:
        self.memory.save(directory, self.fingerprint())

    def load_state(self, directory: Path) -> None:
        self.memory.load(directory, self.fingerprint(), what="LTE memory")
        self._prefixes.clear()
        self.n_edits = len(self.memory)
