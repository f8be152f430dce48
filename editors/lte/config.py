"""LTE's config (``configs/lte/<backbone>.yaml``), loaded strictly by ``utils.config.load_config``."""
from dataclasses import dataclass, field

from editors.recipe.config import check_types, choice, positive, train_section
from utils.errors import UserError

LteTrain = train_section("lte")
LTE_LOSS_TERMS = ("rel", "gen", "loc", "retriever")
FINETUNE = ("lora", "full")
REFERENCES = ("original", "aligned")


@dataclass
class LteLossWeights:
    rel: float = 1.0         # NLL(e | P(e))
    gen: float = 1.0         # sum over the text and image rephrase of NLL(g | P(e))
    loc: float = 1.0         # sum over text / image locality of 1/2 [KL(p_pre || p(l)) + KL(p_pre || p(l | P(e)))]
    retriever: float = 1.0   # contrastive + threshold loss of the retriever (train_retriever only)

    def __post_init__(self):
        check_types(self, "lte.loss_weights")
        positive(self, "lte.loss_weights", LTE_LOSS_TERMS, allow_zero=True)


@dataclass
class LteConfig:
    finetune: str                  # lora: LoRA adapters on every FFN output projection; full: all LLM layers
    lora_rank: int                 # r of each adapter (finetune: lora)
    lora_alpha: float              # adapters are scaled by lora_alpha / lora_rank
    lora_layers: list[int] | None  # decoder layers that get an adapter (null: all)
    retriever: str                 # sentence encoder: a model_path_map name (utils/GLOBAL.py) or a folder
    retriever_pooling: str         # mean | cls (how the encoder's token states become one vector)
    max_text_tokens: int           # the retriever reads at most this many tokens of a text
    train_retriever: bool          # train the retriever with LTE (the tiny default has no pretrained one)
    retriever_temperature: float   # temperature of the retriever's contrastive / threshold losses
    threshold: float               # retrieve the top-1 edit when its cosine similarity is above this
    locality_reference: str        # original: with no edit the model is the original backbone (the
                                   # locality reference); aligned: the aligned model (the authors')
    checkpoint_rows: bool          # training: one sequence at a time under activation checkpointing (memory)
    sample_rows: bool              # training: one random rephrase and one random locality sample per record
                                   # and step, counted twice (the authors' loss in expectation, 4 sequences
                                   # instead of 7); false: all of them, as the authors
    train: LteTrain
    loss_weights: LteLossWeights = field(default_factory=LteLossWeights)
    seed: int = 0                  # initialisation of the adapters

    def __post_init__(self):
        check_types(self, "lte")
        choice(self, "lte", "finetune", FINETUNE)
        choice(self, "lte", "retriever_pooling", ("mean", "cls"))
        choice(self, "lte", "locality_reference", REFERENCES)
        positive(self, "lte", ("lora_rank", "lora_alpha", "max_text_tokens", "retriever_temperature"))
        if not -1.0 <= self.threshold <= 1.0:
            raise UserError(f"lte.threshold: expected a cosine similarity in [-1, 1], got {self.threshold}")
        if self.lora_layers is not None and (not self.lora_layers or min(self.lora_layers) < 0):
            raise UserError(f"lte.lora_layers: expected null or a non-empty list of layer indices >= 0, "
                            f"got {self.lora_layers}")
