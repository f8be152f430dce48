"""T-Patcher (Huang et al., ICLR 2023, "Transformer-Patcher: one mistake worth one neuron"), on a
VLLM: each edit adds one neuron (a *patch*) to the FFN of decoder layer ``layer`` and trains only it.

A patch ``(k, b, v)`` adds ``relu(k . x + b) * v`` to the FFN output at every real token, where ``x``
is the FFN's input there (the named sites ``mlp_input`` / ``mlp_output`` of that layer). All patches
act together, each on each sample's own tokens; padding positions get no patch output. A patch is
trained once, on its edit, then frozen.

Training one patch (``steps`` Adam steps, the layers below ``layer`` run once per edit):

- key initialised as in the paper, ``k = h / |h|^2`` with ``h`` the mean FFN input over the edit's
  *predicting positions* (the last prompt token and the target tokens but the last: where the target
  is read off), so the patch starts with activation 1 there; bias 0; value 0;
- loss = NLL(target) + ``lambda_act`` * margin(a_e >= ``margin_edit``) + ``lambda_memory`` *
  [margin(a_m <= ``margin_memory``) + margin(a_m <= a_e - ``margin_gap``)], where a = k . x + b is the
  pre-activation, a_e on the edit's predicting positions, a_m on every real token of a fixed *memory*
  of training-split samples (edit, text-locality and image-locality samples of the first
  ``memory_records`` train records of each of ``memory_datasets``), and margin(z >= c) is the mean of
  the violations ``c - z > 0`` (0 when none), as in the authors' T-Patcher code. The memory's FFN
  inputs are computed once (patches only change what comes after them).

``reference_behaviour: true`` keeps the LiveEdit repository's ``tp_vl`` instead (BASELINES.md section
4): zero-initialised key and value, ``lambda_act * mean(exp(-a_e))`` over all positions of the edit
input, ``lambda_memory * mean(exp(relu(a_m)))`` on one random text-only memory sample per step, and
its input overwrite (from step 2 on, the "edit" input is the previous step's memory text followed by
the edit target).

Patches live in preallocated fp32 storage that grows by doubling; ``restore()`` empties it.
"""
from dataclasses import dataclass
from pathlib import Path

import torch

from backbones.sites import MLP_INPUT, MLP_OUTPUT, Site
from editors import EDITORS
from editors.base import BaseEditor
from editors.common import (Capture, GrowingRows, batched, check_config, load_state_file, require,
                            resolve_layer, save_state_file, training_pool)
from utils.losses import IGNORE, masked_nll
from vl_datasets.records import Sample

STATE_FILE = "tp_patches.safetensors"


@dataclass
class TPConfig:
    layer: int                  # decoder layer whose FFN gets the patches (negative counts from the top)
    steps: int                  # Adam steps per edit
    lr: float                   # Adam learning rate
    early_stop_loss: float      # stop an edit once its whole loss is below this (0: never)
    lambda_act: float           # weight of the edit-activation margin loss
    lambda_memory: float        # weight of the memory margin losses
    margin_edit: float          # wanted: pre-activation on the edit's predicting positions >= this
    margin_memory: float        # wanted: pre-activation on every memory token <= this
    margin_gap: float           # wanted: memory pre-activation <= edit pre-activation - this
    memory_datasets: list[str]  # datasets whose *train* split gives the memory samples
    memory_records: int         # records taken from each (their edit, text-loc and image-loc samples)
    memory_data_dir: str | None  # data folder of those datasets (null: the project's data/)
    reference_behaviour: bool   # true: the LiveEdit repo's tp_vl losses, init and input overwrite
    seed: int = 0               # reference_behaviour's random memory sample per step

    def __post_init__(self):
        check_config(self, "tp")
        require(self.steps >= 1, "tp.steps", "an integer >= 1", self.steps)
        require(self.lr > 0, "tp.lr", "> 0", self.lr)
        for name in ("early_stop_loss", "lambda_act", "lambda_memory"):
            require(getattr(self, name) >= 0, f"tp.{name}", ">= 0", getattr(self, name))
        require(self.margin_gap >= 0, "tp.margin_gap", ">= 0", self.margin_gap)
        require(len(self.memory_datasets) >= 1, "tp.memory_datasets", "at least one dataset", self.memory_datasets)
        require(self.memory_records >= 1, "tp.memory_records", "an integer >= 1", self.memory_records)


def margin_loss(violation: torch.Tensor) -> torch.Tensor:
    """Mean of the positive entries (0 when there is none): the T-Patcher code's 'margin' loss."""
    pos = violation[violation > 0]
    return pos.mean() if pos.numel() else violation.new_zeros(())


def predicting_positions(batch, b: int = 0) -> torch.Tensor:
    """Positions of sample ``b`` whose next token is a target token."""
    return (batch.labels[b, 1:] != IGNORE).nonzero().flatten()


@EDITORS.register("tp")
class TPEditor(BaseEditor):
    name = "tp"
    config_class = TPConfig

    def __init__(self, backbone, config: TPConfig, pool=None):
        """``pool``: the records whose samples form the memory (default: read as the config says)."""
        super().__init__(backbone, config)
        self.layer_index = resolve_layer("tp", config.layer, backbone)
        d = backbone.hidden_size
        self.patches = GrowingRows({"key": (d,), "bias": (), "value": (d,)}, device=backbone.device)
        self.generator = torch.Generator().manual_seed(config.seed)
        if pool is None:
            pool = training_pool(config.memory_datasets, config.memory_records, config.memory_data_dir)
        self._build_memory(pool)

    # ---- the memory: FFN inputs of training-split samples, computed once ------------------------
    def _build_memory(self, records) -> None:
        bb = self.backbone
        samples = [s for r in records for s in (r.edit, r.text_loc, r.image_loc)]
        self.memory_text = [s for s in samples if s.image is None]   # reference_behaviour's draws
        rows, self.memory_spans = [], {}
        with torch.no_grad():
            for part in batched(samples, 16):
                batch = bb.encode(part)
                x = self._ffn_input(batch, bb.hidden_at(batch, self.layer_index - 1))
                for b, s in enumerate(part):
                    real = x[b][batch.attention_mask[b].bool()]
                    if s.image is None:
                        self.memory_spans[s] = real
                    rows.append(real)
        self.memory = torch.cat(rows).float()   # [tokens, d], built once

    def _ffn_input(self, batch, hidden) -> torch.Tensor:
        """The FFN input of the patched layer ([B, L, d]) given the output of the layer below."""
        cap = Capture()
        self.backbone.logits_from(hidden, batch, self.layer_index - 1, {Site(MLP_INPUT, self.layer_index): cap.read})
        return cap.take()

    # ---- the patched FFN ------------------------------------------------------------------------
    @staticmethod
    def patch_output(x, batch, key, bias, value) -> torch.Tensor:
        """``sum_i relu(k_i . x + b_i) v_i`` at every real token, 0 on padding: [B, L, d] fp32."""
        act = torch.relu(x.float() @ key.T + bias) * batch.attention_mask[..., None]
        return act @ value

    @torch.no_grad()
    def activations(self, batch) -> torch.Tensor:
        """[B, L, n_patches] each patch's activation relu(k . x + b) on each token (0 on padding)."""
        x = self._ffn_input(batch, self.backbone.hidden_at(batch, self.layer_index - 1)).float()
        act = torch.relu(x @ self.patches.view("key").T + self.patches.view("bias"))
        return act * batch.attention_mask[..., None]

    def layer_edits(self) -> dict:
        if not len(self.patches):
            return {}
        key, bias, value = (self.patches.view(n) for n in ("key", "bias", "value"))
        cap = Capture()

        def add(out, batch):
            return out + self.patch_output(cap.take(), batch, key, bias, value).to(out.dtype)
        return {Site(MLP_INPUT, self.layer_index): cap.read, Site(MLP_OUTPUT, self.layer_index): add}

    # ---- lifelong editing -------------------------------------------------------------------
    def edit(self, request) -> None:
        if self.config.reference_behaviour:
            key, bias, value = self._train_reference(request)
        else:
            key, bias, value = self._train(request)
        self.patches.append(key=key, bias=bias, value=value)
        self.n_edits += 1

    def _prepare(self, sample):
        """(batch, output of the layer below, FFN input, output of the existing patches) of a sample."""
        bb = self.backbone
        batch = bb.encode([sample])
        with torch.no_grad():
            hidden = bb.hidden_at(batch, self.layer_index - 1)
            x = self._ffn_input(batch, hidden)
            old = None
            if len(self.patches):
                old = self.patch_output(x, batch, *(self.patches.view(n) for n in ("key", "bias", "value")))
        return batch, hidden, x, old

    def _nll(self, batch, hidden, old, key, bias, value) -> torch.Tensor:
        def add(out, b):
            new = self.patch_output(cap.take(), b, key[None], bias[None], value[None])
            extra = new if old is None else new + old
            return out + extra.to(out.dtype)
        cap = Capture()
        edits = {Site(MLP_INPUT, self.layer_index): cap.read, Site(MLP_OUTPUT, self.layer_index): add}
        return masked_nll(self.backbone.logits_from(hidden, batch, self.layer_index - 1, edits), batch.labels)

    def _train(self, request):
        cfg = self.config
        batch, hidden, x, old = self._prepare(request)
        x_e = x[0, predicting_positions(batch)].float()                   # [P, d]
        h = x_e.mean(0)
        key = (h / h.pow(2).sum().clamp_min(1e-12)).clone().requires_grad_(True)
        bias = torch.zeros((), device=h.device, requires_grad=True)
        value = torch.zeros_like(h).requires_grad_(True)
        optimiser = torch.optim.Adam([key, bias, value], lr=cfg.lr)
        for _ in range(cfg.steps):
            a_e = x_e @ key + bias
            a_m = self.memory @ key + bias
            loss = self._nll(batch, hidden, old, key, bias, value)
            loss = loss + cfg.lambda_act * margin_loss(cfg.margin_edit - a_e)
            loss = loss + cfg.lambda_memory * (margin_loss(a_m - cfg.margin_memory)
                                               + margin_loss(a_m[:, None] - a_e[None, :] + cfg.margin_gap))
            if loss.item() < cfg.early_stop_loss:
                break
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        return key.detach(), bias.detach(), value.detach()

    def _train_reference(self, request):
        """The LiveEdit repository's tp_vl step loop, defects included (see the module docstring)."""
        cfg, d, dev = self.config, self.backbone.hidden_size, self.backbone.device
        key = torch.zeros(d, device=dev, requires_grad=True)
        bias = torch.zeros((), device=dev, requires_grad=True)
        value = torch.zeros(d, device=dev, requires_grad=True)
        optimiser = torch.optim.Adam([key, bias, value], lr=cfg.lr)
        current = request
        for _ in range(cfg.steps):
            batch, hidden, x, old = self._prepare(current)
            m = self.memory_text[int(torch.randint(len(self.memory_text), (1,), generator=self.generator))]
            a_e = x[0].float() @ key + bias                                # every position of the input
            a_m = self.memory_spans[m] @ key + bias
            loss = self._nll(batch, hidden, old, key, bias, value)
            loss = loss + cfg.lambda_act * torch.exp(-a_e).mean() + cfg.lambda_memory * torch.exp(torch.relu(a_m)).mean()
            if loss.item() < cfg.early_stop_loss:
                break
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            current = Sample(m.prompt, request.target, None)               # the reference's overwrite
        return key.detach(), bias.detach(), value.detach()

    def restore(self) -> None:
        self.patches.clear()
        self.n_edits = 0

    def state_bytes(self) -> int:
        """One neuron per edit: key (d) + bias + value (d), float32."""
        return self.patches.nbytes()

    # ---- edited state across processes ---------------------------------------------------------
    def _owner(self) -> dict:
        return {"editor": self.name, "backbone": self.backbone.name, "layer": self.layer_index}

    def save_state(self, directory: Path) -> None:
        tensors = {n: self.patches.view(n) for n in ("key", "bias", "value")}
        save_state_file(Path(directory) / STATE_FILE, tensors, self._owner(), n_edits=self.n_edits)

    def load_state(self, directory: Path) -> None:
        tensors, meta = load_state_file(Path(directory) / STATE_FILE, self._owner(), ["key", "bias", "value"])
        self.patches.load(tensors, f"edited state {directory}")
        self.n_edits = int(meta.get("n_edits", len(self.patches)))
