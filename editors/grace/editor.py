"""GRACE (Hartvigsen et al., NeurIPS 2023; EasyEdit ``models/grace``), on a VLLM: a codebook at the
FFN of decoder layer ``layer``. A key is the input of the FFN's output projection (the named site
``mlp_activation``, d_ff wide) at the *last prompt token* (the position that predicts the first target
token); its value replaces the FFN output (site ``mlp_output``) at that one position, whenever the
query's nearest key lies within that key's radius epsilon.

The query position is computed per input from ``prompt_range`` (``prompt_range[:, 1] - 1``), so it is
the same whether the sample was encoded with its target or not, and each sample of a batch queries at
its own position. ``reference_query_position: true`` keeps EasyEdit's behaviour instead: every query
reads position ``min(p, len - 1)`` with ``p`` the last *edit's* query position.

An edit (EasyEdit's rules, ``coverage`` expansion):

- empty codebook, or nearest key farther than ``eps_init + its radius``: a new entry (key = the query,
  radius ``eps_init``);
- nearest key within that range and the same target: its radius grows to cover the query, and its
  value is trained further on this edit;
- nearest key within that range and another target: a new entry; both radii become half their
  distance (targets are compared as strings; EasyEdit compared the means of their token ids).

The value (``value_init``: ``cold`` = uniform [0, 1) as in EasyEdit, ``warm`` = the FFN's own output
there) is trained with Adam for ``n_iter`` steps on the target NLL, the layers below ``layer`` run once
per edit.

**Radius calibration.** Distances are in raw activation units, so a fixed radius means something
else on every backbone and layer. ``eps_init`` is ``epsilon_factor`` times the median distance from a
query to its nearest other query, measured on this backbone at this layer over the edit samples of
the first ``pool_records`` train records of each of ``pool_datasets`` (never the evaluated split);
``epsilon_init`` sets it directly instead.

Codebook storage is preallocated and grows by doubling; ``restore()`` empties it.
"""
from dataclasses import dataclass
from pathlib import Path

import torch

from backbones.sites import MLP_ACTIVATION, MLP_OUTPUT, Site
from editors import EDITORS
from editors.base import BaseEditor
from editors.common import (Capture, GrowingRows, batched, check_config, dumps_list, load_state_file, require,
                            resolve_layer, save_state_file, training_pool)
from utils.errors import UserError
from utils.losses import masked_nll

STATE_FILE = "grace_codebook.safetensors"


@dataclass
class GraceConfig:
    layer: int                    # decoder layer whose FFN holds the codebook (negative counts from the top)
    n_iter: int                   # Adam steps training a value per edit
    lr: float                     # Adam learning rate of the value
    early_stop_loss: float        # stop training a value once the target NLL is below this (0: never)
    value_init: str               # cold (uniform [0, 1), EasyEdit) or warm (the FFN's own output)
    epsilon_factor: float         # eps_init = this x the median nearest-neighbour distance of pool queries
    epsilon_init: float | None    # a fixed eps_init instead of the calibration (null: calibrate)
    pool_datasets: list[str]      # datasets whose *train* split calibrates the radius
    pool_records: int             # records taken from each (their edit samples)
    pool_data_dir: str | None     # data folder of those datasets (null: the project's data/)
    reference_query_position: bool  # true: EasyEdit's stale query position (the last edit's)
    seed: int = 0                 # cold value initialisation

    def __post_init__(self):
        check_config(self, "grace")
        require(self.n_iter >= 1, "grace.n_iter", "an integer >= 1", self.n_iter)
        require(self.lr > 0, "grace.lr", "> 0", self.lr)
        require(self.early_stop_loss >= 0, "grace.early_stop_loss", ">= 0", self.early_stop_loss)
        require(self.value_init in ("cold", "warm"), "grace.value_init", "cold or warm", self.value_init)
        require(self.epsilon_factor > 0, "grace.epsilon_factor", "> 0", self.epsilon_factor)
        require(self.epsilon_init is None or self.epsilon_init > 0, "grace.epsilon_init", "> 0 or null",
                self.epsilon_init)
        require(self.pool_records >= 2, "grace.pool_records", "an integer >= 2", self.pool_records)
        require(self.epsilon_init is not None or len(self.pool_datasets) >= 1, "grace.pool_datasets",
                "at least one dataset (or set epsilon_init)", self.pool_datasets)


def query_positions(batch) -> torch.Tensor:
    """[B] the last prompt token of each sample (never a target token)."""
    return batch.prompt_range[:, 1] - 1


@EDITORS.register("grace")
class GraceEditor(BaseEditor):
    name = "grace"
    config_class = GraceConfig

    def __init__(self, backbone, config: GraceConfig, pool=None):
        """``pool``: the records that calibrate the radius (default: read as the config says)."""
        super().__init__(backbone, config)
        self.layer_index = resolve_layer("grace", config.layer, backbone)
        proj = backbone.mlp_output_projection(self.layer_index)
        self.key_dim, self.value_dim = proj.in_features, proj.out_features
        self.book = GrowingRows({"key": (self.key_dim,), "value": (self.value_dim,), "epsilon": ()},
                                device=backbone.device)
        self.labels: list[str] = []
        self.last_query_position = 0
        self.typical_distance = None
        self.generator = torch.Generator().manual_seed(config.seed)
        self.eps_init = config.epsilon_init if config.epsilon_init is not None else self._calibrate(pool)

    # ---- queries ------------------------------------------------------------------------------
    def _sites(self, batch, hidden, out_fn=None):
        """One pass from the layer below: (FFN activations [B, L, D], FFN outputs [B, L, d]) of the
        codebook layer, with ``out_fn`` (if any) applied to the FFN output; plus the logits."""
        seen = {}

        def out(o, b):
            seen["out"] = o
            return o if out_fn is None else out_fn(o, b)
        cap = Capture()
        edits = {Site(MLP_ACTIVATION, self.layer_index): cap.read, Site(MLP_OUTPUT, self.layer_index): out}
        logits = self.backbone.logits_from(hidden, batch, self.layer_index - 1, edits)
        return cap.take(), seen["out"], logits

    def _queries(self, samples) -> torch.Tensor:
        bb, rows = self.backbone, []
        with torch.no_grad():
            for part in batched(samples, 16):
                batch = bb.encode(part, with_targets=False)
                act, _, _ = self._sites(batch, bb.hidden_at(batch, self.layer_index - 1))
                rows.append(act[torch.arange(len(part)), query_positions(batch)].float())
        return torch.cat(rows)

    def _calibrate(self, records=None) -> float:
        cfg = self.config
        if records is None:
            records = training_pool(cfg.pool_datasets, cfg.pool_records, cfg.pool_data_dir)
        q = self._queries([r.edit for r in records])
        d = torch.cdist(q, q, compute_mode="donot_use_mm_for_euclid_dist")
        d.fill_diagonal_(float("inf"))
        self.typical_distance = float(d.min(1).values.median())
        if not self.typical_distance > 0:
            raise UserError(f"grace: the pool's queries at layer {self.layer_index} are all identical; "
                            f"set epsilon_init")
        return cfg.epsilon_factor * self.typical_distance

    def _positions(self, batch) -> torch.Tensor:
        if self.config.reference_query_position:
            return torch.full_like(batch.lengths, self.last_query_position).minimum(batch.lengths - 1)
        return query_positions(batch)

    def _nearest(self, q: torch.Tensor):
        """q [B, D] -> (distance [B], index [B]) of the nearest key (per row, batch-independent)."""
        d = torch.cdist(q.float(), self.book.view("key"), compute_mode="donot_use_mm_for_euclid_dist")
        return d.min(1)

    # ---- inference ----------------------------------------------------------------------------
    def _lookup(self, act, batch):
        """FFN activations [B, L, D] -> (query position [B], hit [B], entry [B]) per sample."""
        pos = self._positions(batch)
        dist, idx = self._nearest(act[torch.arange(act.shape[0], device=act.device), pos])
        return pos, dist <= self.book.view("epsilon")[idx], idx

    @torch.no_grad()
    def lookup(self, batch):
        """(query position, hit, nearest entry) of each sample of ``batch``, as inference sees them."""
        act, _, _ = self._sites(batch, self.backbone.hidden_at(batch, self.layer_index - 1))
        return self._lookup(act, batch)

    def layer_edits(self) -> dict:
        if not len(self.book):
            return {}
        cap = Capture()

        def replace(out, batch):
            pos, hit, idx = self._lookup(cap.take(), batch)
            L = out.shape[1]
            if not bool(hit.any()):
                return out
            where = (torch.arange(L, device=out.device)[None] == pos[:, None]) & hit[:, None]
            values = self.book.view("value")[idx].to(out.dtype)
            return torch.where(where[..., None], values[:, None, :], out)
        return {Site(MLP_ACTIVATION, self.layer_index): cap.read, Site(MLP_OUTPUT, self.layer_index): replace}

    # ---- lifelong editing -------------------------------------------------------------------
    def edit(self, request) -> None:
        bb, cfg = self.backbone, self.config
        batch = bb.encode([request])
        pos = int(query_positions(batch)[0])
        with torch.no_grad():
            hidden = bb.hidden_at(batch, self.layer_index - 1)
            act, out, _ = self._sites(batch, hidden)
        q, own = act[0, pos].float(), out[0, pos].float()

        index = None   # an existing entry to train further, else a new one
        radius = self.eps_init
        if len(self.book):
            dist, near = (float(t) for t in self._nearest(q[None]))
            near = int(near)
            eps_near = float(self.book.view("epsilon")[near])
            if dist <= self.eps_init + eps_near:
                if self.labels[near] == request.target:
                    self.book.set_row("epsilon", near, max(eps_near, dist))
                    index = near
                else:
                    radius = dist / 2
                    self.book.set_row("epsilon", near, dist / 2)
        if index is not None:
            start = self.book.view("value")[index].clone()
        elif cfg.value_init == "warm":
            start = own
        else:
            start = torch.rand(self.value_dim, generator=self.generator).to(own.device)
        value = self._train_value(batch, hidden, pos, start)
        if index is None:
            self.book.append(key=q, value=value, epsilon=torch.tensor(radius))
            self.labels.append(request.target)
        else:
            self.book.set_row("value", index, value)
        self.last_query_position = pos
        self.n_edits += 1

    def _train_value(self, batch, hidden, pos: int, start: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        value = start.detach().float().clone().requires_grad_(True)
        optimiser = torch.optim.Adam([value], lr=cfg.lr)
        where = (torch.arange(batch.input_ids.shape[1], device=value.device) == pos)[None, :, None]

        def put(o, b):
            return torch.where(where, value.to(o.dtype), o)
        for _ in range(cfg.n_iter):
            _, _, logits = self._sites(batch, hidden, put)
            loss = masked_nll(logits, batch.labels)
            if loss.item() < cfg.early_stop_loss:
                break
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        return value.detach()

    def restore(self) -> None:
        self.book.clear()
        self.labels = []
        self.last_query_position = 0
        self.n_edits = 0

    def state_bytes(self) -> int:
        """Keys (d_ff) + values (d) + radii, float32, plus the stored target strings."""
        return self.book.nbytes() + sum(len(t.encode("utf-8")) for t in self.labels)

    # ---- edited state across processes ---------------------------------------------------------
    def _owner(self) -> dict:
        return {"editor": self.name, "backbone": self.backbone.name, "layer": self.layer_index}

    def save_state(self, directory: Path) -> None:
        tensors = {n: self.book.view(n) for n in ("key", "value", "epsilon")}
        save_state_file(Path(directory) / STATE_FILE, tensors, self._owner(), n_edits=self.n_edits,
                        labels=dumps_list(self.labels), last_query_position=self.last_query_position,
                        eps_init=repr(self.eps_init))

    def load_state(self, directory: Path) -> None:
        import json
        tensors, meta = load_state_file(Path(directory) / STATE_FILE, self._owner(), ["key", "value", "epsilon"])
        labels = json.loads(meta.get("labels", "[]"))
        if len(labels) != tensors["key"].shape[0]:
            raise UserError(f"edited state {directory}: {len(labels)} labels for {tensors['key'].shape[0]} keys")
        self.book.load(tensors, f"edited state {directory}")
        self.labels = labels
        self.last_query_position = int(meta.get("last_query_position", 0))
        self.eps_init = float(meta.get("eps_init", self.eps_init))
        self.n_edits = int(meta.get("n_edits", len(labels)))
