"""RECIPE (Chen et al., "Lifelong Knowledge Editing for LLMs with Retrieval-Augmented Continuous
Prompt Learning"; the LiveEdit authors' own earlier method), on a frozen VLLM. BASELINES.md section 6.

- A knowledge encoder (RoBERTa; ``text_encoder.py``) reads a text and gives features
  concat(pooler, mean, max, min); a *knowledge head* maps them to a key, a *query head* to a query.
- An edit encodes its knowledge text ``prompt + " " + target`` (the image is not read): the key, and
  ``n_prompt_tokens`` continuous prompt tokens from the key (a residual MLP to ``k x d``). Both are
  appended to a growing memory.
- A learned *sentinel* (``n_sentinel_tokens`` token embeddings through the encoder and the knowledge
  head) stands for "no relevant knowledge". A query retrieves the top-1 memory entry if its
  similarity beats the sentinel's, and that entry's prompt tokens are inserted into the LLM input
  right before the prompt text; otherwise the input is unchanged.
- Retrieval reads only the query's prompt (its prompt range, never the teacher-forced target), and
  the image reaches the backbone. The authors' code retrieves on prompt + target and drops the image
  at inference: ``retrieve_on_target`` / ``drop_image`` keep that behaviour.

Training (the backbone frozen; trained: the encoder, both heads, the sentinel tokens, the prompt
generator), for a batch of records: retrieval losses against the global batch's keys
(``utils.distributed.gather_rows``) and LM losses with each record's own prompt tokens inserted.
"""
import hashlib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from backbones.base import VLBackbone, VLBatch
from editors import EDITORS
from editors.base import BaseEditor
from editors.common import check_trained_state
from editors.recipe.batching import (back_to_original, greedy_generate, insert_embeddings, logits_by_row,
                                     prompt_texts)
from editors.recipe.config import RECIPE_LOSS_TERMS, RecipeConfig
from editors.recipe.memory import GrowingMemory
from editors.recipe.text_encoder import TextEncoder, resolve_text_encoder
from utils.distributed import gather_rows, local_rows
from utils.errors import UserError
from utils.losses import masked_kl, masked_nll
from vl_datasets.records import EditRecord, Sample


def select_rows(batch: VLBatch, rows) -> VLBatch:
    return replace(batch, **{f.name: getattr(batch, f.name)[rows] for f in fields(batch)})


def knowledge_text(sample: Sample) -> str:
    return f"{sample.prompt.strip()} {sample.target.strip()}"


class ResidualHead(nn.Module):
    """Linear to ``d_out``, plus a residual Linear + ReLU."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.proj = nn.Linear(d_in, d_out)
        self.res = nn.Linear(d_out, d_out)

    def forward(self, x):
        h = self.proj(x)
        return h + torch.relu(self.res(h))


class RecipeNet(nn.Module):
    """Every trainable part: the knowledge encoder, the knowledge / query heads, the sentinel tokens
    and the prompt generator."""

    def __init__(self, encoder_path, d: int, emb_scale: float, cfg: RecipeConfig):
        super().__init__()
        self.encoder = TextEncoder(encoder_path, cfg.max_text_tokens)
        f, rep, h = self.encoder.feature_size("recipe"), cfg.rep_dim, self.encoder.hidden_size
        self.knowledge_head = ResidualHead(f, rep)
        self.query_head = ResidualHead(f, rep)
        word = self.encoder.model.get_input_embeddings().weight
        self.sentinel_tokens = nn.Parameter(torch.randn(cfg.n_sentinel_tokens, h) * float(word.detach().std()))
        self.prompt_hidden = nn.Linear(rep, rep)
        self.prompt_out = nn.Linear(rep, cfg.n_prompt_tokens * d)
        self.k, self.d, self.rep = cfg.n_prompt_tokens, d, rep
        self.emb_scale = emb_scale     # prompt_scale x the std of the LLM's input embeddings

    def prompts(self, keys: torch.Tensor) -> torch.Tensor:
        """[n, rep] knowledge keys -> [n, k, d] continuous prompt tokens."""
        h = keys + torch.relu(self.prompt_hidden(keys))
        return self.emb_scale * self.prompt_out(h).view(-1, self.k, self.d)

    def sentinel(self) -> torch.Tensor:
        """[rep]: the sentinel tokens through the encoder and the knowledge head."""
        emb = self.sentinel_tokens[None]
        mask = torch.ones(emb.shape[:2], dtype=torch.long, device=emb.device)
        return self.knowledge_head(self.encoder.features(pooling="recipe", inputs_embeds=emb, attention_mask=mask))[0]


@dataclass
class RecipeBatch:
    """``prepare_training_batch``'s result. ``batch`` rows: R edits, R text rephrases, R image
    rephrases, R text-loc, R image-loc samples; ``tokens`` rows: R knowledge texts, then the prompts
    of those 5R samples in the same order."""

    n_records: int
    batch: VLBatch
    tokens: dict


@EDITORS.register("recipe")
class Recipe(BaseEditor):
    name = "recipe"
    config_class = RecipeConfig
    trainable = True

    def __init__(self, backbone: VLBackbone, config: RecipeConfig):
        super().__init__(backbone, config)
        path = resolve_text_encoder(config.encoder)
        d = backbone.hidden_size
        emb_scale = config.prompt_scale * float(backbone.model.get_input_embeddings().weight.float().std())
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.net = RecipeNet(path, d, emb_scale, config)
        self.net.to(backbone.device).eval()
        # Random draws of training are made for the global batch and sliced to this process's rows,
        # from a generator seeded the same on every process (from the global RNG, which the training
        # loop seeds with -rs before building the editor): data parallel draws what one process would.
        self.draws = torch.Generator().manual_seed(int(torch.randint(0, 2 ** 62, (1,))))
        self.memory = GrowingMemory({"key": (config.rep_dim,), "prompt": (config.n_prompt_tokens, d)},
                                    device=backbone.device)
        self._sentinel = None

    # ---- representations ----------------------------------------------------------------------
    def _features(self, tokens: dict) -> torch.Tensor:
        return self.net.encoder.features(tokens, pooling="recipe")

    def _similarity(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return q @ k.T / (self.config.rep_dim ** 0.5 * self.config.temperature)

    def sentinel_key(self) -> torch.Tensor:
        """The sentinel's key with the current weights (cached at inference; recomputed after
        ``restore()``, a weight load and ``train()``/``eval()``)."""
        if self._sentinel is None:
            with torch.no_grad():
                self._sentinel = self.net.sentinel().detach()
        return self._sentinel

    # ---- lifelong editing ---------------------------------------------------------------------
    @torch.no_grad()
    def edit_batch(self, requests: Sequence[Sample]) -> None:
        """Append one entry per request (independent of each other: the same as ``edit`` in order)."""
        if not requests:
            return
        tokens = self.net.encoder.tokenize([knowledge_text(r) for r in requests])
        keys = self.net.knowledge_head(self._features(tokens))
        self.memory.append({"key": keys, "prompt": self.net.prompts(keys)},
                           [{"prompt": r.prompt, "target": r.target, "image": r.image} for r in requests])
        self.n_edits += len(requests)

    def edit(self, request: Sample) -> None:
        self.edit_batch([request])

    def restore(self) -> None:
        self.memory.clear()
        self.n_edits = 0
        self._sentinel = None

    @torch.no_grad()
    def retrieve(self, batch: VLBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Per sample: (hit [B] bool, index [B] of the top-1 entry). Reads the prompt range only
        (with ``retrieve_on_target``, also the target range, as the authors' code did)."""
        B = batch.input_ids.shape[0]
        dev = batch.input_ids.device
        if len(self.memory) == 0:
            return torch.zeros(B, dtype=torch.bool, device=dev), torch.zeros(B, dtype=torch.long, device=dev)
        texts = prompt_texts(self.backbone, batch, with_target=self.config.retrieve_on_target)
        q = self.net.query_head(self._features(self.net.encoder.tokenize(texts)))
        sims = self._similarity(q, self.memory.tensor("key"))                     # [B, N]
        sentinel = self._similarity(q, self.sentinel_key()[None])[:, 0]            # [B]
        best, index = sims.max(1)
        return (best > sentinel).to(dev), index.to(dev)

    def logits(self, batch: VLBatch, retrieved=None) -> torch.Tensor:
        """Logits laid out as ``batch``: samples that retrieve an entry get its prompt tokens inserted
        before their prompt text; the others run unchanged (bit for bit when no sample retrieves)."""
        hit, index = self.retrieve(batch) if retrieved is None else retrieved
        if not bool(hit.any()) and not self.config.drop_image:
            return self.backbone.logits(batch)
        prompts = self.memory.tensor("prompt") if len(self.memory) else None
        extras = [prompts[index[b]] if hit[b] else None for b in range(len(hit))]
        new, where = insert_embeddings(batch, batch.prompt_range[:, 0], extras, self.backbone.pad_token_id,
                                       drop_vision=self.config.drop_image)
        return back_to_original(self.backbone.logits(new), where)

    def generate(self, samples: Sequence[Sample], max_new_tokens: int) -> list[list[int]]:
        """Greedy decoding; retrieval reads only the prompt, so it is done once for all steps (with
        ``retrieve_on_target`` the query also reads what was generated so far: again at each step)."""
        if self.config.retrieve_on_target:
            return greedy_generate(self.logits, self.backbone, samples, max_new_tokens)
        first = {}

        def logits(batch):
            if "retrieved" not in first:
                first["retrieved"] = self.retrieve(batch)
            return self.logits(batch, first["retrieved"])
        return greedy_generate(logits, self.backbone, samples, max_new_tokens)

    def state_bytes(self) -> int:
        """Bytes of the memory's keys and prompt tokens (the request texts are kept only to save them)."""
        return self.memory.nbytes()

    # ---- training ----------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.net.parameters())

    def train(self, mode: bool = True) -> "Recipe":
        self.net.train(mode)
        self._sentinel = None
        return self

    def eval(self) -> "Recipe":
        return self.train(False)

    def rng_state(self) -> torch.Tensor:
        return self.draws.get_state()

    def set_rng_state(self, state: torch.Tensor) -> None:
        self.draws.set_state(state)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.net.state_dict().items()}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        check_trained_state(state, self.net.state_dict(), "RECIPE",
                            f"backbone {self.backbone.name!r}, encoder {self.config.encoder!r}, "
                            f"rep_dim={self.config.rep_dim}")
        self.net.load_state_dict(state)
        self._sentinel = None          # the sentinel is a function of the weights: recompute it

    def prepare_training_batch(self, records: Sequence[EditRecord]) -> RecipeBatch:
        """Encode every sample of the records for the backbone and every text for the encoder (no
        randomness: may run in the loader thread)."""
        if not records:
            raise UserError("RECIPE training needs at least one record per batch")
        samples = [getattr(r, kind) for kind in ("edit", "text_rephrase", "image_rephrase", "text_loc", "image_loc")
                   for r in records]
        texts = [knowledge_text(r.edit) for r in records] + [s.prompt.strip() for s in samples]
        return RecipeBatch(len(records), self.backbone.encode(samples), self.net.encoder.tokenize(texts))

    def _hinge_nll(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-row NLL of ``target``, counted only while p_target < hinge * (best other p); mean over rows."""
        logp = logits.log_softmax(-1)
        lp_t = logp.gather(1, target[:, None])[:, 0]
        other = logp.scatter(1, target[:, None], float("-inf")).amax(1)
        active = (lp_t < other + torch.log(torch.tensor(self.config.hinge))).detach()
        return (-lp_t * active).sum() / max(len(target), 1)

    def training_losses(self, records) -> dict[str, torch.Tensor]:
        """Weighted loss terms (``RECIPE_LOSS_TERMS``) for a batch of records or of
        ``prepare_training_batch(records)``. Random choices (which prompt each retrieval loss reads,
        which rephrase / locality sample the LM losses use) come from ``self.draws``."""
        prep = records if isinstance(records, RecipeBatch) else self.prepare_training_batch(records)
        R, batch, tokens = prep.n_records, prep.batch, prep.tokens
        dev, bb = self.backbone.device, self.backbone
        offset, n_all = local_rows(R, dev)
        ar = torch.arange(R)

        def draw(low: int, high: int) -> torch.Tensor:
            """A kind per record of the global batch, this process's rows."""
            return torch.randint(low, high, (n_all,), generator=self.draws)[offset:offset + R] * R + ar
        q1, q2 = draw(0, 3), draw(0, 3)             # rel / text-gen / image-gen prompt
        q3 = draw(3, 5)                             # text-loc / image-loc prompt
        gen_rows, loc_rows = draw(1, 3), draw(3, 5)

        # ---- retrieval: the knowledge of the whole (global) batch, the sentinel in the last column
        rows = torch.cat([ar, R + q1, R + q2, R + q3])
        feats = self._features({k: v[rows] for k, v in tokens.items()})
        keys = self.net.knowledge_head(feats[:R])
        q = self.net.query_head(feats[R:]).view(3, R, -1)
        sentinel = self.net.sentinel()
        all_keys = gather_rows(keys)
        own = torch.arange(R, device=keys.device) + offset
        s_sent = [self._similarity(q[i], sentinel[None]) for i in range(3)]         # [R, 1] each
        l1 = torch.cat([self._similarity(q[0], all_keys), s_sent[0]], 1)
        l2 = self._similarity(q[1], all_keys)
        l2 = l2.scatter(1, own[:, None], s_sent[1])                                  # sentinel in its own slot
        l3 = torch.cat([self._similarity(q[2], all_keys), s_sent[2]], 1)
        losses = {"retrieve_own": F.cross_entropy(l1, own),
                  "retrieve_absent": self._hinge_nll(l2, own),
                  "retrieve_loc": self._hinge_nll(l3, torch.full_like(own, n_all))}

        # ---- LM losses with each record's own prompt tokens inserted before the prompt text
        prompts = self.net.prompts(keys)                                            # [R, k, d]
        lm_rows = torch.cat([ar, gen_rows, loc_rows]).to(dev)
        sub = select_rows(batch, lm_rows)
        extras = [prompts[i % R] for i in range(3 * R)]
        new, where = insert_embeddings(sub, sub.prompt_range[:, 0], extras, bb.pad_token_id)
        logits = back_to_original(logits_by_row(bb.logits, new, self.config.checkpoint_rows), where)
        nll = masked_nll(logits[:2 * R], sub.labels[:2 * R], per_sample=True)
        losses["rel"], losses["gen"] = nll[:R].mean(), nll[R:].mean()
        loc = select_rows(batch, loc_rows.to(dev))
        with torch.no_grad():
            pre = bb.logits(loc)
        losses["loc"] = masked_kl(pre, logits[2 * R:], loc.labels, per_sample=True).mean()  # KL(new || pre)
        w = self.config.loss_weights
        return {name: losses[name] * getattr(w, name) for name in RECIPE_LOSS_TERMS}

    # ---- edited state across processes ---------------------------------------------------------
    def weights_digest(self) -> str:
        h = hashlib.sha256()
        for k, v in sorted(self.net.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def fingerprint(self) -> dict:
        bb = self.backbone
        return {"editor": self.name, "backbone": bb.name, "hidden_size": bb.hidden_size,
                "config": self.config.architecture(), "weights": self.weights_digest()}

    def save_state(self, directory: Path) -> None:
        self.memory.save(directory, self.fingerprint())

    def load_state(self, directory: Path) -> None:
        self.memory.load(directory, self.fingerprint(), what="RECIPE memory")
        self.n_edits = len(self.memory)
