"""MEND's config: one YAML per backbone under ``configs/mend/<backbone>.yaml``, loaded strictly by
``utils.config.load_config`` (BASELINES.md section 2). Backbone facts (layer count, widths) come from
the backbone."""
from dataclasses import dataclass, field

from utils.errors import UserError

PROJECTIONS = ("input", "output")
ACCUMULATE = ("sum", "mean_ref")
LOSS_TERMS = ("edit", "gen", "loc")


def check_list(value, item_type, where: str, choices=None) -> None:
    """A non-empty list of ``item_type`` (optionally from ``choices``), else a UserError naming ``where``."""
    ok = isinstance(value, list) and value and all(
        isinstance(v, item_type) and not isinstance(v, bool) for v in value)
    if not ok or (choices is not None and any(v not in choices for v in value)):
        want = f"a non-empty list of {item_type.__name__}" + (f" from {', '.join(choices)}" if choices else "")
        raise UserError(f"{where}: expected {want}, got {value!r}")
    if len(set(value)) != len(value):
        raise UserError(f"{where}: repeated entries in {value!r}")


def check_bool(value, where: str) -> None:
    if not isinstance(value, bool):
        raise UserError(f"{where}: expected true or false, got {value!r}")


def check_train_section(train, where: str) -> None:
    """The ``train`` section the shared loop reads: lr > 0, lr_cut_factor > 0, lr_cut_step >= 0 or
    null, max_steps >= 1 or null."""
    if train.lr <= 0 or train.lr_cut_factor <= 0:
        raise UserError(f"{where}: expected lr > 0 and lr_cut_factor > 0, got lr={train.lr}, "
                        f"lr_cut_factor={train.lr_cut_factor}")
    if train.lr_cut_step is not None and train.lr_cut_step < 0:
        raise UserError(f"{where}.lr_cut_step: expected >= 0 or null, got {train.lr_cut_step}")
    if train.max_steps is not None and train.max_steps < 1:
        raise UserError(f"{where}.max_steps: expected a positive integer or null, got {train.max_steps}")


def check_weights(weights, names, where: str) -> None:
    """Loss weights: floats >= 0."""
    bad = [n for n in names if getattr(weights, n) < 0]
    if bad:
        raise UserError(f"{where}.{bad[0]}: expected >= 0, got {getattr(weights, bad[0])}")


@dataclass
class TrainSection:
    """Read by the shared training loop as ``editor.config.train.<key>``; subclasses name their section."""

    where = "train"
    lr: float                     # Adam learning rate
    lr_cut_step: int | None       # optimiser step from which lr is divided by lr_cut_factor (null: never)
    lr_cut_factor: float = 10.0
    max_steps: int | None = None  # training length the config is tuned for (null: -eps epochs)

    def __post_init__(self):
        check_train_section(self, self.where)


@dataclass
class MendTrain(TrainSection):
    where = "mend.train"


@dataclass
class MendLossWeights:
    edit: float = 0.1    # NLL of the edit sample after its edit
    gen: float = 0.1     # NLL of the text- and image-rephrased samples after the edit (summed)
    loc: float = 0.1     # KL(p_pre || p_edited) on the text and multimodal locality samples (summed)

    def __post_init__(self):
        check_weights(self, LOSS_TERMS, "mend.loss_weights")


@dataclass
class MendConfig:
    layers: list            # decoder layers whose FFN projections are edited (negative: from the top)
    projections: list       # "input" (OPT fc1; Llama gate_proj, up_proj) and/or "output" (fc2 / down_proj)
    rank: int               # rank of the hypernetwork's residual layers
    n_hidden: int           # hidden layers of the hypernetwork (it has n_hidden + 1 residual layers)
    norm: bool              # normalise (u, delta) by running mean / std, updated while training
    init_edit_lr: float     # initial edit learning rate of every edited module
    edit_lr_lr: float       # Adam learning rate of the edit learning rates
    descent: bool           # dW = -lr u~^T d~ (a descent step at init); false: +lr (the authors' sign)
    accumulate: str         # sum (MEND) | mean_ref (the authors' token-weighted running mean)
    train: MendTrain
    loss_weights: MendLossWeights = field(default_factory=MendLossWeights)
    seed: int = 0           # initialisation of the hypernetworks

    def __post_init__(self):
        check_list(self.layers, int, "mend.layers")
        check_list(self.projections, str, "mend.projections", PROJECTIONS)
        for key in ("rank", "n_hidden"):
            if getattr(self, key) < (1 if key == "rank" else 0):
                raise UserError(f"mend.{key}: expected a {'positive' if key == 'rank' else 'non-negative'} "
                                f"integer, got {getattr(self, key)}")
        for key in ("init_edit_lr", "edit_lr_lr"):
            if getattr(self, key) <= 0:
                raise UserError(f"mend.{key}: expected > 0, got {getattr(self, key)}")
        check_bool(self.norm, "mend.norm")
        check_bool(self.descent, "mend.descent")
        if self.accumulate not in ACCUMULATE:
            raise UserError(f"mend.accumulate: expected one of {', '.join(ACCUMULATE)}, got {self.accumulate!r}")
