"""SERAC (Mitchell et al., ICML 2022) on a frozen VLLM, as in BASELINES.md section 3.

An edit is stored, not trained: its scope key (the classifier's key of the edit's image + prompt +
target) and what it takes to embed it again (``memory.py``). At inference every sample of a batch
retrieves for itself: its query key is computed from its image + prompt positions only (never the
teacher-forced target, so the key is the same with or without targets), scored against every stored
key; if the top-1 score is >= ``threshold`` the sample's logits are the counterfactual model's, given
that edit, else the frozen backbone's, bit for bit. ``restore()`` empties the memory.

Training (the shared loop), per batch of R records (BASELINES "Losses per batch", all weights 1):
``nll`` (counterfactual NLL of the edit and both rephrases given their edit), ``scope`` (InfoNCE of
those queries against the batch's edit keys; ``anchor_in_scope`` adds the threshold as a negative),
``loc_kl`` (KL(p_cf || p_base) on both locality samples given their record's edit) and ``loc_scope``
(locality queries: softmax over [scores to the batch's edits, threshold], target the threshold). The
batch's edit keys are gathered from every process (``utils/distributed.py``), so a data-parallel
run contrasts against the global batch.
"""
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from backbones.base import IGNORE, VLBackbone, VLBatch
from editors import EDITORS
from editors.base import BaseEditor
from editors.common import check_trained_state
from editors.liveedit.editor import select_rows
from editors.serac.config import LOSS_TERMS, SeracConfig
from editors.serac.memory import EditMemory
from editors.serac.modules import SeracNet
from editors.base import owner_metadata
from utils.distributed import gather_rows, local_rows
from utils.errors import UserError
from utils.io import atomic_path, read_json, write_json
from utils.losses import masked_kl, masked_nll
from vl_datasets.records import EditRecord, Sample

KEYS_FILE = "serac_keys.safetensors"
MEMORY_FILE = "serac_memory.json"
KINDS = ("edit", "text_rephrase", "image_rephrase", "text_loc", "image_loc")


@dataclass
class TrainingBatch:
    """``prepare_training_batch``'s result: R rows of each kind of ``KINDS``, in that order."""

    n_records: int
    batch: VLBatch


class _Routed:
    """The backbone as ``VLBackbone.generate`` sees it, with SERAC's per-sample routed logits."""

    def __init__(self, editor: "Serac"):
        self._editor = editor

    def __getattr__(self, name):
        return getattr(self._editor.backbone, name)

    def logits(self, batch, layer_edits=None):
        return self._editor.logits(batch)


@EDITORS.register("serac")
class Serac(BaseEditor):
    name = "serac"
    config_class = SeracConfig
    trainable = True

    def __init__(self, backbone: VLBackbone, config: SeracConfig):
        super().__init__(backbone, config)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.net = SeracNet(backbone.hidden_size, backbone.tokenizer, config)
        self.net.to(backbone.device).eval()
        self.unused = self.net.unused_names()
        self.memory = EditMemory(self.net.key_width, device=backbone.device)

    @classmethod
    def from_backbone(cls, backbone, config_path=None) -> "Serac":
        from utils.config import load_config
        return cls(backbone, load_config(SeracConfig, cls.name, backbone.name, config_path))

    # ---- keys and retrieval -------------------------------------------------------------------
    def query_keys(self, batch: VLBatch) -> torch.Tensor:
        """Keys [B, 3H] of each sample's image + prompt (positions before its target)."""
        return self.net.keys(batch.inputs_embeds, batch.prompt_range[:, 1])

    def edit_keys(self, batch: VLBatch) -> torch.Tensor:
        """Keys [B, 3H] of whole edit samples (image + prompt + target)."""
        return self.net.keys(batch.inputs_embeds, batch.lengths)

    @torch.no_grad()
    def retrieve(self, batch: VLBatch):
        """Per sample: (top-1 score [B], its edit index [B], hit [B] = score >= the inference threshold)."""
        scores = self.net.scores(self.query_keys(batch), self.memory.keys)
        best, index = scores.max(1)
        cut = self.config.inference_threshold
        return best, index, best >= (self.config.threshold if cut is None else cut)

    def _counterfactual_logits(self, edits: list[torch.Tensor], batch: VLBatch) -> torch.Tensor:
        h = self.net.counterfactual_hidden(edits, batch.inputs_embeds, batch.lengths)
        return self.backbone.stack.head(h.to(self.backbone.dtype))

    def _head_at_targets(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """[B, L, V] logits with the backbone's head applied only where a target token is predicted
        (zeros elsewhere, which the masked losses never read): training needs no more."""
        at = F.pad(labels[:, 1:] != IGNORE, (0, 1))
        picked = self.backbone.stack.head(hidden[at].to(self.backbone.dtype))
        out = picked.new_zeros(hidden.shape[:2] + picked.shape[-1:])
        return out.index_put((at,), picked)

    # ---- lifelong editing ----------------------------------------------------------------------
    @torch.no_grad()
    def edit(self, request: Sample) -> None:
        bb = self.backbone
        ids, n_context = bb.tokenize(request.prompt, request.image is not None, request.target)
        batch = bb.encode([request])
        self.memory.append(self.edit_keys(batch)[0], ids, n_context, request.image)
        self.n_edits += 1

    def restore(self) -> None:
        self.memory.clear()
        self.n_edits = 0

    @torch.no_grad()
    def logits(self, batch: VLBatch) -> torch.Tensor:
        base = self.backbone.logits(batch)
        if len(self.memory) == 0:
            return base
        _, index, hit = self.retrieve(batch)
        rows = hit.nonzero().flatten()
        if rows.numel() == 0:
            return base
        edits = self.memory.embeddings(self.backbone, index[rows].tolist())
        out = base.clone()
        out[rows] = self._counterfactual_logits(edits, select_rows(batch, rows)).to(base.dtype)
        return out

    def generate(self, samples: Sequence[Sample], max_new_tokens: int) -> list[list[int]]:
        """Greedy decoding through the routed logits (retrieval from the image + prompt, every step)."""
        return VLBackbone.generate(_Routed(self), samples, max_new_tokens)

    def state_bytes(self) -> int:
        return self.memory.state_bytes()

    # ---- training --------------------------------------------------------------------------
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for k, p in self.net.named_parameters() if k not in self.unused]

    def train(self, mode: bool = True) -> "Serac":
        self.net.train(mode)
        return self

    def eval(self) -> "Serac":
        return self.train(False)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Every weight but the unused word embeddings (rebuilt from the seed or the pretrained folder)."""
        return {k: v.detach().clone() for k, v in self.net.state_dict().items() if k not in self.unused}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        own = {k: v for k, v in self.net.state_dict().items() if k not in self.unused}
        check_trained_state(state, own, "serac", f"backbone {self.backbone.name!r}")
        self.net.load_state_dict(state, strict=False)

    def prepare_training_batch(self, records: Sequence[EditRecord]) -> TrainingBatch:
        """One encoded batch of every sample of the records (no randomness: runs in the loader thread)."""
        if not records:
            raise UserError("serac training needs at least one record per batch")
        samples = [getattr(r, kind) for kind in KINDS for r in records]
        return TrainingBatch(len(records), self.backbone.encode(samples))

    def training_losses(self, records) -> dict[str, torch.Tensor]:
        prepared = records if isinstance(records, TrainingBatch) else self.prepare_training_batch(records)
        R, batch = prepared.n_records, prepared.batch
        dev, n_in = self.backbone.device, 3 * R
        cfg = self.config

        # scope: every query against the edit keys of the whole (global) batch
        edit_keys = self.edit_keys(select_rows(batch, torch.arange(R, device=dev)))
        offset, n_global = local_rows(R, dev)
        scores = self.net.scores(self.query_keys(batch), gather_rows(edit_keys))      # [5R, n_global]
        threshold = scores.new_full((scores.shape[0], 1), cfg.threshold)
        own = offset + torch.arange(n_in, device=dev) % R
        in_scope = scores[:n_in]
        if cfg.anchor_in_scope:
            in_scope = torch.cat([in_scope, threshold[:n_in]], 1)
        scope = F.cross_entropy(in_scope, own, reduction="none").view(3, R).mean(1).sum()
        loc_scores = torch.cat([scores[n_in:], threshold[n_in:]], 1)
        loc_scope = F.cross_entropy(loc_scores, torch.full((2 * R,), n_global, device=dev),
                                    reduction="none").view(2, R).mean(1).sum()

        # the counterfactual model: every sample given its own record's edit
        lengths = batch.lengths
        edits = [batch.inputs_embeds[r, :int(lengths[r])] for r in range(R)]
        hidden = self.net.counterfactual_hidden([edits[i % R] for i in range(5 * R)], batch.inputs_embeds, lengths)
        logits = self._head_at_targets(hidden, batch.labels)
        nll = masked_nll(logits[:n_in], batch.labels[:n_in], per_sample=True).view(3, R).mean(1).sum()
        loc_rows = torch.arange(n_in, 5 * R, device=dev)
        loc = select_rows(batch, loc_rows)
        with torch.no_grad():
            base = self._head_at_targets(self.backbone.hidden_at(loc, self.backbone.num_layers - 1), loc.labels)
        # KL(p_cf || p_base): masked_kl(a, b) is KL(b || a)
        kl = masked_kl(base, logits[n_in:], batch.labels[n_in:], per_sample=True).view(2, R).mean(1).sum()
        losses = {"nll": nll, "scope": scope, "loc_kl": kl, "loc_scope": loc_scope}
        w = cfg.loss_weights
        return {k: losses[k] * getattr(w, k) for k in LOSS_TERMS}

    # ---- edited state across processes ---------------------------------------------------------
    def weights_digest(self) -> str:
        h = hashlib.sha256()
        for k, v in sorted(self.trainable_state_dict().items()):
            h.update(k.encode())
            h.update(v.to("cpu", torch.float32).contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def fingerprint(self) -> dict:
        return {"editor": self.name, "backbone": self.backbone.name, "key_width": self.net.key_width,
                "weights": self.weights_digest()}

    def save_state(self, directory: Path) -> None:
        from safetensors.torch import save_file

        directory = Path(directory)
        fp = self.fingerprint()
        meta = owner_metadata(self.name, self.backbone.name, fingerprint=json.dumps(fp, sort_keys=True),
                                   size=len(self.memory))
        with atomic_path(directory / KEYS_FILE) as tmp:
            save_file({"keys": self.memory.keys.detach().cpu().contiguous()}, str(tmp), metadata=meta)
        write_json(directory / MEMORY_FILE, {"fingerprint": fp, "edits": self.memory.entries}, indent=None)

    def load_state(self, directory: Path) -> None:
        from safetensors import safe_open

        directory = Path(directory)
        path = directory / KEYS_FILE
        if not path.is_file() or not (directory / MEMORY_FILE).is_file():
            raise UserError(f"serac: no edited state at {directory} ({KEYS_FILE} / {MEMORY_FILE} missing)")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            keys = f.get_tensor("keys")
        saved = json.loads(meta.get("fingerprint", "{}"))
        want = self.fingerprint()
        diff = [k for k in sorted(set(saved) | set(want)) if saved.get(k) != want.get(k)]
        if diff:
            k = diff[0]
            hint = " (load the same trained checkpoint first)" if k == "weights" else ""
            raise UserError(f"serac edited state {directory} was made with {k} {saved.get(k)!r}, this editor has "
                            f"{want.get(k)!r}{hint}")
        memory = read_json(directory / MEMORY_FILE)
        if memory.get("fingerprint") != saved:
            raise UserError(f"serac edited state {directory}: {MEMORY_FILE} does not belong to {KEYS_FILE}")
        self.memory.load(keys.to(self.backbone.device), memory["edits"])
        self.n_edits = len(self.memory)
