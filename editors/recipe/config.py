"""RECIPE's config (``configs/recipe/<backbone>.yaml``), loaded strictly by ``utils.config.load_config``,
plus the small typed checks RECIPE and LTE share (``check_types``, ``positive``, ``TrainSection``)."""
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field

from utils.errors import UserError


def _ok(value, tp) -> bool:
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        return any(_ok(value, t) for t in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if tp is str:
        return isinstance(value, str)
    if origin is list:
        (inner,) = typing.get_args(tp)
        return isinstance(value, list) and all(_ok(v, inner) for v in value)
    return True     # nested dataclasses are checked by their own __post_init__


def check_types(obj, where: str) -> None:
    """Every field of dataclass ``obj`` has its annotated type; the error names ``where.key``."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, tp = getattr(obj, f.name), hints[f.name]
        if dataclasses.is_dataclass(tp) or _ok(value, tp):
            continue
        hint = " (write floats with a dot, e.g. 1.0e-4)" if isinstance(value, str) and tp in (float, int) else ""
        name = getattr(tp, "__name__", str(tp).replace("typing.", ""))
        raise UserError(f"{where}.{f.name}: expected {name}, got {value!r}{hint}")


def positive(obj, where: str, names, allow_zero: bool = False) -> None:
    for n in names:
        v = getattr(obj, n)
        if v is not None and (v < 0 if allow_zero else v <= 0):
            raise UserError(f"{where}.{n}: expected {'>= 0' if allow_zero else '> 0'}, got {v}")


def choice(obj, where: str, name: str, options) -> None:
    if getattr(obj, name) not in options:
        raise UserError(f"{where}.{name}: expected one of {', '.join(options)}, got {getattr(obj, name)!r}")


def train_section(editor: str):
    """The ``train`` section the shared loop reads, with checks that name ``<editor>.train.<key>``."""

    @dataclass
    class TrainSection:
        lr: float                      # Adam learning rate
        lr_cut_step: int | None        # lr divided by lr_cut_factor after this many steps (null: never)
        lr_cut_factor: float = 10.0
        max_steps: int | None = None   # training length the config is tuned for (--max_steps overrides)

        def __post_init__(self):
            where = f"{editor}.train"
            check_types(self, where)
            positive(self, where, ("lr", "lr_cut_factor", "max_steps"))
            positive(self, where, ("lr_cut_step",), allow_zero=True)
    TrainSection.__name__ = TrainSection.__qualname__ = f"{editor.capitalize()}Train"
    return TrainSection


RecipeTrain = train_section("recipe")
RECIPE_LOSS_TERMS = ("retrieve_own", "retrieve_absent", "retrieve_loc", "rel", "gen", "loc")


@dataclass
class RecipeLossWeights:
    retrieve_own: float = 1.0      # q1: a rel/gen prompt retrieves its own knowledge against the batch + sentinel
    retrieve_absent: float = 1.0   # q2: with its own knowledge left out, the sentinel wins (hinge)
    retrieve_loc: float = 1.0      # q3: a locality prompt retrieves the sentinel (hinge)
    rel: float = 1.0               # NLL of the edit's target with its own prompt tokens inserted
    gen: float = 1.0               # NLL of a random rephrase (text or image) with the edit's tokens
    loc: float = 1.0               # KL(p_new || p_pre) of a random locality sample with the edit's tokens

    def __post_init__(self):
        check_types(self, "recipe.loss_weights")
        positive(self, "recipe.loss_weights", RECIPE_LOSS_TERMS, allow_zero=True)


@dataclass
class RecipeConfig:
    encoder: str                 # knowledge encoder: a model_path_map name (utils/GLOBAL.py) or a folder
    rep_dim: int                 # width of knowledge / query representations (RECIPE: 4096)
    n_prompt_tokens: int         # continuous prompt tokens generated per edit (RECIPE: 3)
    n_sentinel_tokens: int       # learned token embeddings the sentinel is encoded from (RECIPE: 10)
    prompt_scale: float          # the prompt generator's output is multiplied by this x the std of the LLM's
                                 # input embeddings (a fixed factor; the generator learns the rest)
    max_text_tokens: int         # the encoder reads at most this many tokens of a text
    temperature: float           # tau: sim = <q, k> / sqrt(rep_dim) / tau
    hinge: float                 # sentinel losses count a sample only while p_target < hinge * p_second
    retrieve_on_target: bool     # authors' defect: the retrieval query is prompt + (teacher-forced) target
    drop_image: bool             # authors' defect: the backbone sees no image at inference (pre and post)
    checkpoint_rows: bool        # training: one sequence at a time under activation checkpointing (memory)
    train: RecipeTrain
    loss_weights: RecipeLossWeights = field(default_factory=RecipeLossWeights)
    seed: int = 0                # initialisation of the heads, sentinel and generator; training RNG

    def __post_init__(self):
        check_types(self, "recipe")
        positive(self, "recipe", ("rep_dim", "n_prompt_tokens", "n_sentinel_tokens", "max_text_tokens",
                                  "temperature", "hinge", "prompt_scale"))

    def architecture(self) -> dict:
        """What a saved memory depends on besides the weights."""
        return {k: getattr(self, k) for k in ("encoder", "rep_dim", "n_prompt_tokens", "n_sentinel_tokens",
                                              "prompt_scale", "max_text_tokens")}
