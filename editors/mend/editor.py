"""MEND (Mitchell et al., ICLR 2022) on a frozen VLLM, as in BASELINES.md section 2.

An edit runs the edit sample once through the current edited model and takes, at every edited FFN
projection (the backbone's module sites ``mlp_input_projections(l)`` / ``mlp_output_projection(l)``
of the configured layers), the rank-1 factors of the NLL gradient: the projection's input ``u`` per
token and the gradient ``delta`` w.r.t. its output per token. Both are captured through named
activation sites, no hooks: the inputs at ``mlp_input`` / ``mlp_activation``, the gradients as the
gradients of zero "probe" tensors that an identity edit adds to each projection's output. A trained
gradient transform (``hypernet.py``) maps them to ``(u~, delta~)`` and the update of that module is
``G = -lr_m u~^T delta~`` (``lr_m`` a learned scalar per module; ``descent: false`` flips the sign,
as the authors' code has it).

Updates accumulate over the stream (``accumulate``): ``sum`` adds every edit's ``G`` (MEND's paper),
``mean_ref`` keeps the authors' token-weighted running mean ``dW <- (n_old dW + G) / (n_old + n_new)``
(each edit ends at about 1/N of its strength after N edits). The frozen weights are never written:
inference adds ``x dW`` to each edited projection's output through the per-call site edits of
``layer_edits()``; ``restore()`` drops ``dW``.

The input projections' outputs are not a named site (only the activation after them is), so for
them the edit recomputes the FFN activation from ``mlp_input`` with the edited pre-activations:
``act(fc1(x) + x dW)`` (OPT), ``act(gate(x) + x dW_g) * (up(x) + x dW_u)`` (Llama); see
``ffn_activation``.

Training (the shared loop): per record, a single edit from the clean model (its own ``dW``, kept
factored), then ``edit`` (NLL of the edit sample), ``gen`` (NLL of the text and image rephrases) and
``loc`` (KL(p_pre || p_edited) on the two locality samples) through the edited model.
"""
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from backbones.base import VLBatch
from backbones.sites import MLP_ACTIVATION, MLP_INPUT, MLP_OUTPUT, Site
from backbones.stacks import LlamaStack, OPTStack
from editors import EDITORS
from editors.base import BaseEditor
from editors.common import check_trained_state
from editors.liveedit.editor import select_rows
from editors.mend.config import LOSS_TERMS, MendConfig
from editors.mend.hypernet import GradientTransform
from editors.base import owner_metadata
from utils.errors import UserError
from utils.io import atomic_path
from utils.losses import masked_kl, masked_nll
from vl_datasets.records import EditRecord

STATE_FILE = "mend_state.safetensors"


@dataclass(frozen=True)
class EditedModule:
    index: int    # position in the editor's module list (and in its edit learning rates)
    layer: int
    kind: str     # "input" or "output" projection
    slot: int     # which input projection of the layer (Llama: 0 gate_proj, 1 up_proj); 0 for output
    d_in: int
    d_out: int
    group: str    # the gradient transform it shares with the modules of its shape
    mode: int     # its index among the modules of that transform

    def describe(self) -> str:
        return f"layers.{self.layer}.{self.kind}{self.slot}:{self.d_in}x{self.d_out}"


def ffn_activation(backbone, layer: int):
    """``f(pre-activations of the layer's input projections, in order) -> the FFN's hidden activation``.
    The only place MEND reads a module of the layer itself: the activation function, as
    ``backbones/stacks.py`` applies it (there is no named site between a projection and it)."""
    stack, module = backbone.stack, backbone.layer(layer)
    if isinstance(stack, OPTStack):
        return lambda pre: module.activation_fn(pre[0])
    if isinstance(stack, LlamaStack):
        return lambda pre: module.mlp.act_fn(pre[0]) * pre[1]
    raise UserError(f"mend: no FFN activation known for the decoder stack of {backbone.name!r} "
                    f"({type(stack).__name__})")


class MendNet(nn.Module):
    """Every trainable piece: one gradient transform per module shape, one edit lr per module."""

    def __init__(self, modules: list[EditedModule], cfg: MendConfig, lr_scale: float):
        super().__init__()
        groups: dict[str, tuple] = {}
        for m in modules:
            groups.setdefault(m.group, (m.d_in, m.d_out, []))[2].append(m)
        self.transforms = nn.ModuleDict({
            g: GradientTransform(d_in, d_out, cfg.rank, cfg.n_hidden, len(ms), cfg.norm)
            for g, (d_in, d_out, ms) in groups.items()})
        # Stored divided by lr_scale, used multiplied by it: Adam moves this parameter by about
        # train.lr per step, so the edit lr itself moves by edit_lr_lr (one optimiser, two rates).
        self.edit_lr_raw = nn.Parameter(torch.full((len(modules),), cfg.init_edit_lr / lr_scale))


@dataclass
class TrainingBatch:
    """``prepare_training_batch``'s result: one batch of the records' edit, text-rephrase,
    image-rephrase, text-locality and image-locality samples (R rows each, in that order)."""

    n_records: int
    batch: VLBatch


class _LayerSites:
    """The activation-site edits of one decoder layer for one call. ``delta(module, x)`` gives the
    change of the module's output for input ``x`` (or None); ``probes`` (a dict, or None) receives a
    zero tensor added to each module's output, whose gradient is then that module's ``delta``;
    ``captured`` receives each module's input."""

    def __init__(self, editor: "Mend", layer: int, delta, probes, captured):
        self.editor, self.delta, self.probes, self.captured = editor, delta, probes, captured
        mods = [m for m in editor.modules if m.layer == layer]
        self.inputs = {m.slot: m for m in mods if m.kind == "input"}
        self.output = next((m for m in mods if m.kind == "output"), None)
        if self.inputs:
            self.projections = editor.backbone.mlp_input_projections(layer)
            self.activation = ffn_activation(editor.backbone, layer)
        self.x = self.a = None

    def edits(self, layer: int) -> dict:
        out = {}
        if self.inputs:
            out[Site(MLP_INPUT, layer)] = self.on_input
        if self.inputs or self.output is not None:
            out[Site(MLP_ACTIVATION, layer)] = self.on_activation
        if self.output is not None:
            out[Site(MLP_OUTPUT, layer)] = self.on_output
        return out

    def change(self, m: EditedModule, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.captured is not None:
            self.captured[m.index] = x.detach()
        d = self.delta(m, x) if self.delta is not None else None
        if d is not None:
            out = out + d.to(out.dtype)
        if self.probes is not None:
            probe = torch.zeros_like(out, requires_grad=True)
            self.probes[m.index] = probe
            out = out + probe
        return out

    def on_input(self, x, batch):
        self.x = x
        return x

    def on_activation(self, a, batch):
        if self.inputs:
            pre = []
            for slot, proj in enumerate(self.projections):
                p = proj(self.x)
                m = self.inputs.get(slot)
                pre.append(p if m is None else self.change(m, self.x, p))
            a = self.activation(pre)
        self.a = a
        return a

    def on_output(self, o, batch):
        return self.change(self.output, self.a, o)


@EDITORS.register("mend")
class Mend(BaseEditor):
    name = "mend"
    config_class = MendConfig
    trainable = True

    def __init__(self, backbone, config: MendConfig):
        super().__init__(backbone, config)
        n = backbone.num_layers
        bad = [l for l in config.layers if not -n <= l < n]
        if bad:
            raise UserError(f"mend.layers: layer {bad[0]} is out of range for {backbone.name!r} with {n} decoder "
                            f"layers (0..{n - 1}, or -{n}..-1 from the top)")
        self.layers = sorted({l % n for l in config.layers})
        if len(self.layers) != len(config.layers):
            raise UserError(f"mend.layers: {config.layers} names a layer twice")
        self.modules = self._modules(backbone, config)
        self.below = self.layers[0] - 1           # the frozen model runs once up to here per edit
        self.lr_scale = config.edit_lr_lr / config.train.lr
        self.sign = -1.0 if config.descent else 1.0
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.net = MendNet(self.modules, config, self.lr_scale)
        self.net.to(backbone.device).eval()
        self.training = False
        self.deltas: list[torch.Tensor] | None = None   # dense dW [d_in, d_out] per module, float32
        self.rows: list[float] = []                     # token rows so far per module (mean_ref)

    def _modules(self, bb, cfg: MendConfig) -> list[EditedModule]:
        found = []
        for layer in self.layers:
            if "input" in cfg.projections:
                found += [(layer, "input", s, p) for s, p in enumerate(bb.mlp_input_projections(layer))]
            if "output" in cfg.projections:
                found.append((layer, "output", 0, bb.mlp_output_projection(layer)))
        modes: dict[str, int] = {}
        modules = []
        for i, (layer, kind, slot, proj) in enumerate(found):
            group = f"{proj.in_features}x{proj.out_features}"
            modes[group] = modes.get(group, -1) + 1
            modules.append(EditedModule(i, layer, kind, slot, proj.in_features, proj.out_features, group,
                                        modes[group]))
        return modules

    @classmethod
    def from_backbone(cls, backbone, config_path=None) -> "Mend":
        from utils.config import load_config
        return cls(backbone, load_config(MendConfig, cls.name, backbone.name, config_path))

    # ---- the pieces --------------------------------------------------------------------------
    def edit_lrs(self) -> torch.Tensor:
        return self.net.edit_lr_raw * self.lr_scale

    def _site_edits(self, delta, probes=None, captured=None) -> dict:
        edits = {}
        for layer in self.layers:
            edits.update(_LayerSites(self, layer, delta, probes, captured).edits(layer))
        return edits

    def _capture(self, batch: VLBatch, hidden: torch.Tensor, delta):
        """Per module: its input ``x`` [B, L, d_in] and the gradient ``delta`` [B, L, d_out] of the
        sum over samples of each sample's mean target NLL w.r.t. its output, through the model with
        ``delta`` applied (None: the clean model); and the token rows where both are set [B, L]."""
        probes, captured = {}, {}
        with torch.enable_grad():
            logits = self.backbone.logits_from(hidden, batch, self.below, self._site_edits(delta, probes, captured))
            loss = masked_nll(logits, batch.labels, per_sample=True).sum()
            grads = torch.autograd.grad(loss, [probes[m.index] for m in self.modules])
        real = batch.attention_mask.bool()
        valid = [real & (g.detach().abs().sum(-1) > 0) for g in grads]
        return [captured[m.index] for m in self.modules], [g.detach() for g in grads], valid

    def _transform(self, m: EditedModule, x, g, valid, update_norm: bool):
        """(u~ [n, d_in], delta~ [n, d_out]) of the ``valid`` token rows."""
        return self.net.transforms[m.group](x[valid], g[valid], m.mode, update_norm=update_norm)

    def _dense_delta(self, m: EditedModule, x: torch.Tensor) -> torch.Tensor:
        return x.float() @ self.deltas[m.index]

    # ---- lifelong editing ----------------------------------------------------------------------
    def edit(self, request) -> None:
        bb = self.backbone
        batch = bb.encode([request])
        with torch.no_grad():
            hidden = bb.hidden_at(batch, self.below)
        xs, gs, valid = self._capture(batch, hidden, self._dense_delta if self.deltas is not None else None)
        with torch.no_grad():
            lrs = self.edit_lrs()
            if self.deltas is None:
                self.deltas = [torch.zeros(m.d_in, m.d_out, device=bb.device) for m in self.modules]
                self.rows = [0.0] * len(self.modules)
            for m, x, g, v in zip(self.modules, xs, gs, valid):
                u, d = self._transform(m, x, g, v, update_norm=False)
                G = (self.sign * lrs[m.index]) * (u.T @ d)
                n = float(v.sum())
                if self.config.accumulate == "sum":
                    self.deltas[m.index] += G
                else:
                    old = self.rows[m.index]
                    self.deltas[m.index] = (old * self.deltas[m.index] + G) / max(old + n, 1.0)
                self.rows[m.index] += n
        self.n_edits += 1

    def restore(self) -> None:
        self.deltas = None
        self.rows = []
        self.n_edits = 0

    def layer_edits(self) -> dict:
        return {} if self.deltas is None else self._site_edits(self._dense_delta)

    def state_bytes(self) -> int:
        """Bytes of the edited state: one dense dW per edited module once anything is edited."""
        if self.deltas is None:
            return 0
        return sum(d.numel() * d.element_size() for d in self.deltas)

    # ---- training --------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.net.parameters())

    def train(self, mode: bool = True) -> "Mend":
        self.training = mode
        self.net.train(mode)
        return self

    def eval(self) -> "Mend":
        return self.train(False)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights and the running normalisation statistics (buffers) of every transform."""
        return {k: v.detach().clone() for k, v in self.net.state_dict().items()}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        check_trained_state(state, self.net.state_dict(), "mend",
                            f"backbone {self.backbone.name!r}, rank {self.config.rank}",
                            f" (layers {self.layers}, projections {self.config.projections}, norm {self.config.norm})")
        self.net.load_state_dict(state)

    def prepare_training_batch(self, records: Sequence[EditRecord]) -> TrainingBatch:
        """One encoded batch of every sample of the records (no randomness: runs in the loader thread)."""
        if not records:
            raise UserError("mend training needs at least one record per batch")
        samples = [s for kind in ("edit", "text_rephrase", "image_rephrase", "text_loc", "image_loc")
                   for s in (getattr(r, kind) for r in records)]
        return TrainingBatch(len(records), self.backbone.encode(samples))

    def training_losses(self, records) -> dict[str, torch.Tensor]:
        """Weighted ``edit``, ``gen`` and ``loc`` for a batch of records (or of
        ``prepare_training_batch(records)``): each record is edited alone from the clean model. The
        frozen layers below the first edited one run once for all samples."""
        prepared = records if isinstance(records, TrainingBatch) else self.prepare_training_batch(records)
        R, batch = prepared.n_records, prepared.batch
        bb, dev = self.backbone, self.backbone.device
        with torch.no_grad():
            hidden = bb.hidden_at(batch, self.below)
        edit_rows = torch.arange(R, device=dev)
        xs, gs, valid = self._capture(select_rows(batch, edit_rows), hidden[:R], None)

        lrs = self.edit_lrs()
        factors = []
        for m, x, g, v in zip(self.modules, xs, gs, valid):
            u, d = self._transform(m, x, g, v, update_norm=self.training)
            U = x.new_zeros(x.shape, dtype=torch.float32).index_put((v,), u)
            D = g.new_zeros(g.shape, dtype=torch.float32).index_put((v,), d)
            coef = (self.sign * lrs[m.index]).expand(R)
            if self.config.accumulate == "mean_ref":      # a single edit: the token mean of its update
                coef = coef / v.sum(1).clamp(min=1)
            factors.append((U, D, coef))
        kinds = batch.input_ids.shape[0] // R     # rows are kind-major: row k * R + r belongs to record r

        def delta(m: EditedModule, x: torch.Tensor) -> torch.Tensor:
            """Each sample's own record's update: x (u~^T d~) = (x u~^T) d~, kept factored; the
            ``kinds`` rows of a record share one pair of matmuls."""
            U, D, coef = factors[m.index]
            S, L, _ = x.shape
            xr = x.float().view(kinds, R, L, -1).transpose(0, 1).reshape(R, kinds * L, -1)
            y = torch.bmm(torch.bmm(xr, U.transpose(1, 2)), D) * coef[:, None, None]
            return y.view(R, kinds, L, -1).transpose(0, 1).reshape(S, L, -1)

        logits = bb.logits_from(hidden, batch, self.below, self._site_edits(delta))
        labels = batch.labels
        nll = masked_nll(logits[:3 * R], labels[:3 * R], per_sample=True)
        loc_rows = torch.arange(3 * R, 5 * R, device=dev)
        with torch.no_grad():
            ref = bb.logits_from(hidden[loc_rows], select_rows(batch, loc_rows), self.below)
        kl = masked_kl(logits[3 * R:], ref, labels[3 * R:], per_sample=True)
        losses = {"edit": nll[:R].mean(), "gen": nll[R:2 * R].mean() + nll[2 * R:].mean(),
                  "loc": kl[:R].mean() + kl[R:].mean()}
        w = self.config.loss_weights
        return {k: losses[k] * getattr(w, k) for k in LOSS_TERMS}

    # ---- edited state across processes ---------------------------------------------------------
    def _owner(self) -> dict:
        return {"modules": json.dumps([m.describe() for m in self.modules]), "accumulate": self.config.accumulate}

    def save_state(self, directory: Path) -> None:
        from safetensors.torch import save_file

        tensors = {"rows": torch.tensor(self.rows or [0.0] * len(self.modules), dtype=torch.float64)}
        if self.deltas is not None:
            tensors.update({f"delta.{i}": d.detach().cpu().contiguous() for i, d in enumerate(self.deltas)})
        meta = owner_metadata(self.name, self.backbone.name, n_edits=self.n_edits, **self._owner())
        with atomic_path(Path(directory) / STATE_FILE) as tmp:
            save_file(tensors, str(tmp), metadata=meta)

    def load_state(self, directory: Path) -> None:
        from safetensors import safe_open

        path = Path(directory) / STATE_FILE
        if not path.is_file():
            raise UserError(f"mend: no edited state at {path}")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        want = {"editor": self.name, "backbone": self.backbone.name, **self._owner()}
        diff = [k for k in want if meta.get(k) != want[k]]
        if diff:
            k = diff[0]
            raise UserError(f"edited state {path} was saved with {k} {meta.get(k)!r}, this editor has {want[k]!r}")
        n_edits = int(meta.get("n_edits", 0))
        if n_edits == 0:
            self.restore()
            return
        self.deltas = [tensors[f"delta.{m.index}"].to(self.backbone.device, torch.float32) for m in self.modules]
        self.rows = tensors["rows"].tolist()
        self.n_edits = n_edits
