"""LiveEdit's config: one YAML per backbone under ``configs/liveedit/<backbone>.yaml``, loaded strictly
by ``utils.config.load_config`` (keys and value types checked there). Backbone facts (hidden size,
number of vision tokens, number of layers) come from the backbone object, never from here."""
import math
from dataclasses import dataclass, field
from typing import ClassVar

from utils.errors import UserError

LOSS_TERMS = ("rel", "gen", "loc", "soft_relative", "soft_absolute", "hard_neighbour", "hard_sentinel")


@dataclass
class LiveEditTrain:
    """Read by the shared training loop as ``editor.config.train.<key>``."""

    lr: float                    # Adam learning rate
    lr_cut_step: int | None      # optimiser step from which lr is divided by lr_cut_factor (null: never)
    lr_cut_factor: float = 10.0
    max_steps: int | None = None  # training length the config is tuned for (null: -eps epochs); --max_steps overrides

    def __post_init__(self):
        if self.max_steps is not None and self.max_steps < 1:
            raise UserError(f"liveedit.train.max_steps: expected a positive integer or null, got {self.max_steps}")
        if self.lr <= 0 or (self.lr_cut_step is not None and self.lr_cut_step < 0) or self.lr_cut_factor <= 0:
            raise UserError(f"liveedit.train: expected lr > 0, lr_cut_step >= 0, lr_cut_factor > 0; got "
                            f"lr={self.lr}, lr_cut_step={self.lr_cut_step}, lr_cut_factor={self.lr_cut_factor}")


@dataclass
class LiveEditLossWeights:
    """Weight of each loss term returned by ``LiveEdit.training_losses`` (same names)."""

    rel: float = 1.0
    gen: float = 1.0
    loc: float = 1.0
    soft_relative: float = 1.0
    soft_absolute: float = 1.0
    hard_neighbour: float = 1.0
    hard_sentinel: float = 1.0

    def __post_init__(self):
        bad = [n for n in LOSS_TERMS if getattr(self, n) < 0]
        if bad:
            raise UserError(f"liveedit.loss_weights.{bad[0]}: expected >= 0, got {getattr(self, bad[0])}")


@dataclass
class LiveEditConfig:
    # keys read only at inference: a checkpoint trained with other values is the same training
    # (scripts/compare.py reuses it and evaluates with the shipped values)
    inference_only: ClassVar[tuple[str, ...]] = ("max_kept", "max_kept_by", "filter_margin", "filter_index_rank",
                                                 "filter_index_min")
    edit_layer: int      # l_e: the editor acts on the output of this decoder layer (0-based)
    d_m: int             # module width of the extractors and generators
    heads: int           # attention heads of every cross-attention
    rank: int            # r: expert rank
    n_queries: int       # k: learned feature queries
    scale: float         # experts are scaled by 1 / (scale * sqrt(r))
    train: LiveEditTrain
    loss_weights: LiveEditLossWeights = field(default_factory=LiveEditLossWeights)
    seed: int = 0        # initialisation of the trainable modules (training: replaced by -rs)
    # The training objective and module details. Defaults: the authors' code (DESIGN section 3,
    # "routing pairs, as the authors' code draws them"); the other values keep this project's
    # first objective and modules, for side-by-side measurements.
    routing_pairs: str = "neighbourhood"   # "neighbourhood": routing contrasts pair two samples of one
                                           # record's neighbourhood (rel/gen, or its loc sample), the
                                           # edit-side extractor reads the second; "edit_requests":
                                           # rel/gen samples against the batch's edit requests only
    expert_sets: str = "prefix"            # "prefix": own expert(s) + the batch's first n, n ~ U{0..B};
                                           # "random": own + a random subset (loc: non-empty)
    attention_out_proj: bool = False       # an output projection after the attention heads
    sentinel_init: str = "kaiming"         # "kaiming" (std sqrt(2/(n_v d))) or "normal" (std 1)
    zero_init_v: bool = False              # V's generator output starts at zero (experts add nothing)
    # This project's addition (0: off, the authors' objective). At inference hard filtering faces every
    # expert of the repository, in training only the batch's: the edit requests of the last
    # ``negative_pool`` training samples (their frozen layer-l_e states kept, features recomputed
    # with the current weights at each step) join both hard-routing contrasts as extra columns.
    negative_pool: int = 0
    # Inference only, not in the paper (null: off): of the experts that pass hard filtering, keep at most
    # this many, the most visually similar. Bounds the residual's cost when a query passes many experts.
    max_kept: int | None = None
    negative_pool_rows: str = "locality"   # which samples are contrasted with the pool: "locality" (the
                                           # unrelated images, which must reject every edit) or "all" (rel
                                           # and gen samples too, against other records' edits)
    # How max_kept ranks the experts that pass: "visual" (similarity of the image features: session 6's
    # rule) or "text" (the textual similarity that soft routing weighs them by). Several experts of
    # one image (an entity asked three questions) are visual ties that only the text tells apart.
    max_kept_by: str = "visual"
    # Inference only, not in the paper (0: off): hard filtering keeps an expert only if its visual
    # similarity beats the sentinel's by this margin, sim(phi, phi_hat_i) > sim(phi, phi_S) + margin.
    filter_margin: float = 0.0
    # Inference speed only, exact (the same routing as a scan of every expert): from
    # ``filter_index_min`` experts on, hard filtering scores only the experts that a rank-
    # ``filter_index_rank`` bound cannot rule out (editors/liveedit/index.py). null: always scan all.
    # Measured (tiny-blip2, 100,000 real experts, a batch of 8 queries, one thread; routing alone):
    # scan 69 ms; rank 16: 23 ms (14,909 experts scored), 32: 12 ms (5,450), 64: 7 ms (2,285),
    # 96: 15 ms (1,771), 128: 20 ms (1,570); two other jobs shared the two cores.
    filter_index_rank: int | None = 64
    filter_index_min: int = 4096

    def __post_init__(self):
        for name, allowed in (("routing_pairs", ("neighbourhood", "edit_requests")),
                              ("expert_sets", ("prefix", "random")), ("sentinel_init", ("kaiming", "normal")),
                              ("negative_pool_rows", ("locality", "all")), ("max_kept_by", ("visual", "text"))):
            if getattr(self, name) not in allowed:
                raise UserError(f"liveedit.{name}: expected one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        for name in ("attention_out_proj", "zero_init_v"):
            if not isinstance(getattr(self, name), bool):
                raise UserError(f"liveedit.{name}: expected true or false, got {getattr(self, name)!r}")
        if self.max_kept is not None and (isinstance(self.max_kept, bool) or self.max_kept < 1):
            raise UserError(f"liveedit.max_kept: expected a positive integer or null, got {self.max_kept!r}")
        if self.filter_index_rank is not None and (isinstance(self.filter_index_rank, bool) or self.filter_index_rank < 1):
            raise UserError(f"liveedit.filter_index_rank: expected a positive integer or null, got {self.filter_index_rank!r}")
        if isinstance(self.filter_margin, bool) or not isinstance(self.filter_margin, (int, float)) \
                or not math.isfinite(self.filter_margin):
            raise UserError(f"liveedit.filter_margin: expected a finite number, got {self.filter_margin!r}")
        if isinstance(self.filter_index_min, bool) or self.filter_index_min < 1:
            raise UserError(f"liveedit.filter_index_min: expected a positive integer, got {self.filter_index_min!r}")
        if isinstance(self.negative_pool, bool) or self.negative_pool < 0:
            raise UserError(f"liveedit.negative_pool: expected an integer >= 0, got {self.negative_pool!r}")
        for name in ("d_m", "heads", "rank", "n_queries"):
            if getattr(self, name) < 1:
                raise UserError(f"liveedit.{name}: expected a positive integer, got {getattr(self, name)}")
        if self.d_m % self.heads:
            raise UserError(f"liveedit: d_m={self.d_m} is not divisible by heads={self.heads}")
        if self.scale <= 0:
            raise UserError(f"liveedit.scale: expected > 0, got {self.scale}")
        if self.edit_layer < 0:
            raise UserError(f"liveedit.edit_layer: expected >= 0, got {self.edit_layer}")

    def architecture(self) -> dict:
        """What an expert repository depends on (its fingerprint)."""
        return {k: getattr(self, k) for k in ("edit_layer", "d_m", "heads", "rank", "n_queries", "scale",
                                              "attention_out_proj")}
