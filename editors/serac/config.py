"""SERAC's config: one YAML per backbone under ``configs/serac/<backbone>.yaml``, loaded strictly by
``utils.config.load_config`` (BASELINES.md section 3)."""
from dataclasses import dataclass, field
from typing import ClassVar

from editors.mend.config import TrainSection, check_bool, check_weights
from utils.errors import UserError

LOSS_TERMS = ("nll", "scope", "loc_kl", "loc_scope")


@dataclass
class SeracModel:
    """The scope classifier (a BertModel) or the counterfactual model (an OPTForCausalLM)."""

    pretrained: str | None     # name in utils/GLOBAL.py model_path_map of a local folder; null: a tiny
                               # model of the same class built here from the sizes below (no download)
    hidden: int | None = None  # tiny model only (null with pretrained): width, layers, heads
    layers: int | None = None
    heads: int | None = None
    max_positions: int | None = None   # tiny model only: position embeddings

    def check(self, where: str) -> None:
        sizes = ("hidden", "layers", "heads", "max_positions")
        if self.pretrained is not None:
            if not isinstance(self.pretrained, str) or not self.pretrained:
                raise UserError(f"{where}.pretrained: expected a model_path_map name or null, got {self.pretrained!r}")
            given = [k for k in sizes if getattr(self, k) is not None]
            if given:
                raise UserError(f"{where}.{given[0]}: the pretrained model {self.pretrained!r} fixes it; "
                                f"leave it null")
            return
        for k in sizes:
            value = getattr(self, k)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"{where}.{k}: expected a positive integer for a tiny model, got {value!r}")
        if self.hidden % self.heads:
            raise UserError(f"{where}: hidden={self.hidden} is not divisible by heads={self.heads}")


@dataclass
class SeracTrain(TrainSection):
    where = "serac.train"


@dataclass
class SeracLossWeights:
    nll: float = 1.0        # counterfactual NLL of the edit and its two rephrases, given the edit
    scope: float = 1.0      # InfoNCE of the edit and rephrase queries against the batch's edit keys
    loc_kl: float = 1.0     # KL(p_cf || p_base) on the locality samples given their record's edit
    loc_scope: float = 1.0  # locality queries: softmax over [scores to the batch's edits, threshold] -> threshold

    def __post_init__(self):
        check_weights(self, LOSS_TERMS, "serac.loss_weights")


@dataclass
class SeracConfig:
    # keys read only at inference (see editors/liveedit/config.py)
    inference_only: ClassVar[tuple[str, ...]] = ("inference_threshold",)
    classifier: SeracModel
    counterfactual: SeracModel
    threshold: float        # a query uses the counterfactual model iff its top-1 score >= threshold
    anchor_in_scope: bool   # the scope loss of in-scope queries also has the threshold as a negative
                            # (their scores are pushed above it); false: the authors' loss (batch edits only)
    train: SeracTrain
    loss_weights: SeracLossWeights = field(default_factory=SeracLossWeights)
    seed: int = 0           # initialisation of the projections and of the tiny models
    inference_threshold: float | None = None   # the scope decision at evaluation (null: threshold). Training
                            # anchors the scores at ``threshold``; where the trained classifier's in- and
                            # out-of-scope scores separate best is found on val afterwards (--set)

    def __post_init__(self):
        self.classifier.check("serac.classifier")
        self.counterfactual.check("serac.counterfactual")
        check_bool(self.anchor_in_scope, "serac.anchor_in_scope")
