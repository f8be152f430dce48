"""Convert the original MiniGPT-4 (Vicuna-7B) release into ONE Hugging Face folder.

MiniGPT-4 is BLIP-2's frozen EVA ViT-g + Q-Former, one linear layer (``llama_proj``) and a Vicuna
decoder. This script assembles the three original pieces into a single
``Blip2ForConditionalGeneration`` whose text config is the Vicuna (Llama) config, and saves it with
a ``Blip2Processor`` so that ``backbones/minigpt4.py`` loads it with ``from_pretrained``.

Inputs (all local, nothing is downloaded):

  --blip2_ckpt     the LAVIS BLIP-2 checkpoint MiniGPT-4 takes its vision encoder and Q-Former from
                   (``blip2_pretrained_flant5xxl.pth``; a ``.pth`` holding ``{"model": state_dict}``
                   or a bare state dict, or a ``.safetensors`` file)
  --minigpt4_ckpt  the MiniGPT-4 checkpoint (``pretrained_minigpt4.pth``, ``{"model": {"llama_proj.weight",
                   "llama_proj.bias", ...}}``)
  --vicuna_dir     the Hugging Face Vicuna folder (config, weights, tokenizer) MiniGPT-4 was trained on
  --out            the folder to write (written to a temporary sibling folder, renamed at the end)

Usage::

    python -m scripts.convert_minigpt4 \\
        --blip2_ckpt  ~/weights/blip2_pretrained_flant5xxl.pth \\
        --minigpt4_ckpt ~/weights/pretrained_minigpt4.pth \\
        --vicuna_dir  ~/weights/vicuna-7b \\
        --out hugging_cache/minigpt-4-vicuna-7b-hf

then either point ``utils/GLOBAL.py`` ``model_path_map['minigpt-4-vicuna-7b']`` at the output folder
(the default entry already is ``hugging_cache/minigpt-4-vicuna-7b-hf``) or pass
``--model_path <out>`` to any script that takes a backbone.

Options: ``--vision_heads`` (16, EVA ViT-g), ``--qformer_heads`` (12, BERT-base),
``--cross_attention_frequency`` (2), ``--image_size`` (default: from ``pos_embed``; another size
interpolates the patch position embeddings bicubically, as LAVIS does), ``--dtype`` (float16,
the precision MiniGPT-4 runs in; float32 / bfloat16), ``--overwrite`` (replace an existing ``--out``),
``--unsafe_pickle`` (allow arbitrary pickled objects in the ``.pth`` files; only for trusted files).

Everything else is read off the tensors: the vision width (``patch_embed``), patch size, image size
(``pos_embed``), MLP width (``fc1``), layer counts, Q-Former width and number of queries
(``query_tokens``), Q-Former MLP width (``intermediate_query``). Key mapping (original -> HF):

  visual_encoder.cls_token / pos_embed        -> vision_model.embeddings.class_embedding / position_embedding
  visual_encoder.patch_embed.proj             -> vision_model.embeddings.patch_embedding
  visual_encoder.blocks.i.norm1 / norm2       -> vision_model.encoder.layers.i.layer_norm1 / layer_norm2
  visual_encoder.blocks.i.attn.qkv.weight     -> ...layers.i.self_attn.qkv.weight
  visual_encoder.blocks.i.attn.q_bias, v_bias -> ...layers.i.self_attn.qkv.bias = cat(q_bias, 0, v_bias)
  visual_encoder.blocks.i.attn.proj           -> ...layers.i.self_attn.projection
  visual_encoder.blocks.i.mlp.fc1 / fc2       -> ...layers.i.mlp.fc1 / fc2
  ln_vision                                   -> vision_model.post_layernorm
  query_tokens                                -> query_tokens
  Qformer.bert.embeddings.LayerNorm           -> qformer.layernorm
  Qformer.bert.encoder.layer.i.{attention,crossattention}.self   -> qformer.encoder.layer.i.{...}.attention
  Qformer.bert.encoder.layer.i.{attention,crossattention}.output -> (same name)
  Qformer.bert.encoder.layer.i.{intermediate_query,output_query} -> (same name)
  llama_proj (MiniGPT-4 ckpt)                 -> language_projection
  Vicuna weights                              -> language_model.*

The Q-Former's text branch (word/position embeddings, ``intermediate``/``output``, ``Qformer.cls``)
and BLIP-2's retrieval heads are unused by MiniGPT-4 and ignored. ``<image>`` is added to the
tokenizer as a vocabulary token if Vicuna lacks it (its new embedding and output rows are the mean of
the old ones) and becomes the config's ``image_token_index``. Note: LAVIS applies ``ln_vision`` with
eps 1e-5, HF uses the vision config's 1e-6 for it (as the official HF BLIP-2 conversion does).

Any missing input file, missing key or mis-shaped key is reported on one line and exits with code 2.
"""
from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

from utils.errors import CliParser, UserError, cli_main
from utils.io import atomic_dir

IMAGE_TOKEN = "<image>"
# Normalisation of BLIP-2's EVA ViT (Blip2ImageEvalProcessor): the OpenAI CLIP statistics.
EVA_MEAN = (0.48145466, 0.4578275, 0.40821073)
EVA_STD = (0.26862954, 0.26130258, 0.27577711)
DTYPES = ("float32", "float16", "bfloat16")  # torch is imported only once the inputs are checked

VISION_PREFIXES = ("visual_encoder.", "ln_vision.")
QFORMER_PREFIX = "Qformer."
# Keys of the BLIP-2 checkpoint inside the used prefixes that MiniGPT-4 never uses.
IGNORED = [re.compile(p) for p in (
    r"^Qformer\.cls\.",
    r"^Qformer\.bert\.pooler\.",
    r"^Qformer\.bert\.embeddings\.(word_embeddings|position_embeddings)\.",
    r"^Qformer\.bert\.embeddings\.position_ids$",
    r"^Qformer\.bert\.encoder\.layer\.\d+\.(intermediate|output)\.",  # text-branch feed-forward
    r"^visual_encoder\.(norm|fc_norm|head)\.",                        # not built by LAVIS' EVA ViT-g
)]


def shape_str(shape) -> str:
    return str(tuple(int(s) for s in shape))


# ---- reading the original files -------------------------------------------------------------------
def load_state_dict_file(path: Path, what: str, unsafe_pickle: bool = False) -> dict:
    """A ``.pth`` (``{"model": sd}`` or bare sd) or ``.safetensors`` file -> {key: tensor}."""
    import torch

    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return dict(load_file(str(path)))
        except Exception as e:  # noqa: BLE001 - any corrupt-file error becomes one line
            raise UserError(f"cannot read {what} {path}: {e}") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not unsafe_pickle, mmap=False)
    except Exception as e:  # noqa: BLE001
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = "" if unsafe_pickle else " (if the file is trusted and holds pickled objects, pass --unsafe_pickle)"
        raise UserError(f"cannot read {what} {path}: {first}{hint}") from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict):
        raise UserError(f"{what} {path} holds a {type(obj).__name__}, expected a state dict or {{'model': state dict}}")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


class Source:
    """One original state dict, its file name for messages, and which keys were used."""

    def __init__(self, sd: dict, path: Path, what: str):
        self.sd, self.path, self.what = sd, path, what
        self.used: set[str] = set()

    def missing(self, key) -> UserError:
        hint = " (check --cross_attention_frequency)" if ".crossattention." in key else ""
        return UserError(f"{self.what} {self.path}: missing key {key!r}{hint}")

    def get(self, key: str) -> torch.Tensor:
        if key not in self.sd:
            raise self.missing(key)
        return self.sd[key]

    def take(self, key: str, shape) -> torch.Tensor:
        t = self.get(key)
        if tuple(t.shape) != tuple(shape):
            raise UserError(f"{self.what} {self.path}: key {key!r} has shape {shape_str(t.shape)}, "
                            f"expected {shape_str(shape)}")
        self.used.add(key)
        return t

    def layer_count(self, prefix: str) -> int:
        pat = re.compile(re.escape(prefix) + r"(\d+)\.")
        idx = {int(m.group(1)) for k in self.sd for m in [pat.match(k)] if m}
        return max(idx) + 1 if idx else 0


# ---- configs from shapes --------------------------------------------------------------------------
def infer_configs(blip: Source, args):
    from transformers import Blip2QFormerConfig, Blip2VisionConfig

    patch = blip.get("visual_encoder.patch_embed.proj.weight")
    if patch.ndim != 4 or patch.shape[1] != 3 or patch.shape[2] != patch.shape[3]:
        raise UserError(f"{blip.what} {blip.path}: key 'visual_encoder.patch_embed.proj.weight' has shape "
                        f"{shape_str(patch.shape)}, expected (hidden, 3, patch, patch)")
    width, patch_size = patch.shape[0], patch.shape[2]
    pos = blip.get("visual_encoder.pos_embed")
    n_patches = pos.shape[1] - 1 if pos.ndim == 3 else -1
    grid = math.isqrt(max(n_patches, 0))
    if pos.ndim != 3 or pos.shape[0] != 1 or pos.shape[2] != width or grid * grid != n_patches or grid == 0:
        raise UserError(f"{blip.what} {blip.path}: key 'visual_encoder.pos_embed' has shape {shape_str(pos.shape)}, "
                        f"expected (1, 1 + grid*grid, {width})")
    image_size = args.image_size or grid * patch_size
    if image_size % patch_size:
        raise UserError(f"--image_size {image_size} is not a multiple of the patch size {patch_size}")
    vision_layers = blip.layer_count("visual_encoder.blocks.")
    if vision_layers == 0:
        raise blip.missing("visual_encoder.blocks.0.*")
    fc1 = blip.get("visual_encoder.blocks.0.mlp.fc1.weight")
    if width % args.vision_heads:
        raise UserError(f"--vision_heads {args.vision_heads} does not divide the vision width {width}")
    vision = Blip2VisionConfig(hidden_size=width, intermediate_size=fc1.shape[0], num_hidden_layers=vision_layers,
                               num_attention_heads=args.vision_heads, image_size=image_size, patch_size=patch_size,
                               hidden_act="gelu", layer_norm_eps=1e-6, qkv_bias=True, attention_dropout=0.0)

    queries = blip.get("query_tokens")
    if queries.ndim != 3 or queries.shape[0] != 1:
        raise UserError(f"{blip.what} {blip.path}: key 'query_tokens' has shape {shape_str(queries.shape)}, "
                        f"expected (1, num_query_tokens, hidden)")
    q_width = queries.shape[2]
    q_layers = blip.layer_count("Qformer.bert.encoder.layer.")
    if q_layers == 0:
        raise blip.missing("Qformer.bert.encoder.layer.0.*")
    inter = blip.get("Qformer.bert.encoder.layer.0.intermediate_query.dense.weight")
    if q_width % args.qformer_heads:
        raise UserError(f"--qformer_heads {args.qformer_heads} does not divide the Q-Former width {q_width}")
    qformer = Blip2QFormerConfig(hidden_size=q_width, intermediate_size=inter.shape[0], num_hidden_layers=q_layers,
                                 num_attention_heads=args.qformer_heads, encoder_hidden_size=width,
                                 cross_attention_frequency=args.cross_attention_frequency, hidden_act="gelu",
                                 layer_norm_eps=1e-12)
    return vision, qformer, queries.shape[1], grid


# ---- key mapping ----------------------------------------------------------------------------------
def interpolate_pos_embed(pos: torch.Tensor, new_grid: int) -> torch.Tensor:
    """(1, 1 + g*g, D) -> (1, 1 + n*n, D): the class position kept, the patch grid resized bicubically."""
    import torch

    cls, patches = pos[:, :1], pos[:, 1:]
    g, d = math.isqrt(patches.shape[1]), pos.shape[2]
    grid = patches.reshape(1, g, g, d).permute(0, 3, 1, 2).float()
    grid = torch.nn.functional.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    patches = grid.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, d).to(pos.dtype)
    return torch.cat([cls, patches], 1)


def map_vision(blip: Source, expected: dict, grid: int) -> dict:
    import torch

    out = {}

    def copy(hf, orig):
        out[hf] = blip.take(orig, expected[hf])

    e, v = "vision_model.embeddings.", "visual_encoder."
    copy(e + "class_embedding", v + "cls_token")
    pos_shape = expected[e + "position_embedding"]
    new_grid = math.isqrt(pos_shape[1] - 1)
    pos = blip.take(v + "pos_embed", (1, 1 + grid * grid, pos_shape[2]))
    out[e + "position_embedding"] = pos if new_grid == grid else interpolate_pos_embed(pos, new_grid)
    for p in ("weight", "bias"):
        copy(e + f"patch_embedding.{p}", v + f"patch_embed.proj.{p}")
        copy(f"vision_model.post_layernorm.{p}", f"ln_vision.{p}")
    layers = 1 + max(int(k.split(".")[3]) for k in expected if k.startswith("vision_model.encoder.layers."))
    for i in range(layers):
        h, o = f"vision_model.encoder.layers.{i}.", f"visual_encoder.blocks.{i}."
        for p in ("weight", "bias"):
            copy(h + f"layer_norm1.{p}", o + f"norm1.{p}")
            copy(h + f"layer_norm2.{p}", o + f"norm2.{p}")
            copy(h + f"self_attn.projection.{p}", o + f"attn.proj.{p}")
            copy(h + f"mlp.fc1.{p}", o + f"mlp.fc1.{p}")
            copy(h + f"mlp.fc2.{p}", o + f"mlp.fc2.{p}")
        copy(h + "self_attn.qkv.weight", o + "attn.qkv.weight")
        width = expected[h + "self_attn.qkv.bias"][0] // 3
        q_bias = blip.take(o + "attn.q_bias", (width,))
        v_bias = blip.take(o + "attn.v_bias", (width,))
        out[h + "self_attn.qkv.bias"] = torch.cat([q_bias, torch.zeros_like(q_bias), v_bias])  # EVA: no key bias
    return out


def map_qformer(blip: Source, expected: dict) -> dict:
    out = {"query_tokens": blip.take("query_tokens", expected["query_tokens"])}
    for p in ("weight", "bias"):
        out[f"qformer.layernorm.{p}"] = blip.take(f"Qformer.bert.embeddings.LayerNorm.{p}",
                                                  expected[f"qformer.layernorm.{p}"])
    for hf, shape in expected.items():
        if not hf.startswith("qformer.encoder.layer."):
            continue
        orig = "Qformer.bert." + hf[len("qformer."):]
        orig = re.sub(r"\.(attention|crossattention)\.attention\.", r".\1.self.", orig)
        out[hf] = blip.take(orig, shape)
    return out


def leftover_problems(blip: Source):
    """(unexpected keys inside the vision / Q-Former query branch, number of ignored keys)."""
    unexpected, ignored = [], 0
    for k in blip.sd:
        if k in blip.used:
            continue
        if any(p.search(k) for p in IGNORED) or not (k.startswith(VISION_PREFIXES) or k.startswith(QFORMER_PREFIX)):
            ignored += 1
        else:
            unexpected.append(k)
    return sorted(unexpected), ignored


# ---- language model and tokenizer -----------------------------------------------------------------
def vicuna_width(vicuna_dir: Path) -> int:
    from transformers import AutoConfig

    if not (vicuna_dir / "config.json").is_file():
        raise UserError(f"Vicuna folder not found or has no config.json: {vicuna_dir}")
    try:
        config = AutoConfig.from_pretrained(vicuna_dir)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the Vicuna config in {vicuna_dir}: {e}") from None
    width = getattr(config.get_text_config(), "hidden_size", None)
    if not width:
        raise UserError(f"Vicuna config in {vicuna_dir} has no hidden_size")
    return width


def load_vicuna(vicuna_dir: Path, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(vicuna_dir)
        llm, info = AutoModelForCausalLM.from_pretrained(vicuna_dir, dtype=dtype, output_loading_info=True)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the Vicuna model/tokenizer from {vicuna_dir}: {e}") from None
    bad = list(info.get("missing_keys", ())) + [str(m) for m in info.get("mismatched_keys", ())]
    if bad:
        raise UserError(f"Vicuna weights in {vicuna_dir} are incomplete: missing or mis-shaped {bad[0]!r}"
                        f"{f' (+{len(bad) - 1} more)' if len(bad) > 1 else ''}")
    return llm.eval(), tokenizer


def add_image_token(llm, tokenizer):
    """Ensure ``<image>`` is one vocabulary token with an embedding row; returns (id, added?)."""
    import torch
    from transformers import AddedToken

    added = IMAGE_TOKEN not in tokenizer.get_vocab()
    if added:  # the same kind of token Blip2Processor would add; no tokenizer ``image_token`` attribute
        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, normalized=False, special=True)], special_tokens=True)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    rows = llm.get_input_embeddings().weight.shape[0]
    if image_id >= rows:
        llm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            embeddings = [llm.get_input_embeddings().weight]
            head = llm.get_output_embeddings()
            if head is not None and head.weight is not embeddings[0]:
                embeddings.append(head.weight)
            for w in embeddings:  # deterministic: new rows = mean of the old ones
                w[rows:] = w[:rows].float().mean(0).to(w.dtype)
    return image_id, added


# ---- assembling ------------------------------------------------------------------------------------
def build_model(config, state_dict: dict, llm):
    """The HF model with every parameter taken from ``state_dict`` exactly once (strict)."""
    import torch
    from transformers import Blip2ForConditionalGeneration

    with torch.device("meta"):
        model = Blip2ForConditionalGeneration(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    shapes = [k for k in expected if k in state_dict and tuple(state_dict[k].shape) != expected[k]]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} HF parameter(s) not filled, e.g. {missing[0]!r}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected, e.g. {unexpected[0]!r}")
        if shapes:
            k = shapes[0]
            parts.append(f"{k!r} has shape {shape_str(state_dict[k].shape)}, expected {shape_str(expected[k])}")
        raise UserError("converted weights do not match Blip2ForConditionalGeneration: " + "; ".join(parts))
    model.load_state_dict(state_dict, strict=True, assign=True)
    # Non-persistent buffers (rotary frequencies) are not in any state dict: take the loaded LLM's.
    llm_buffers = dict(llm.named_buffers())
    for name, buf in list(model.named_buffers()):
        if buf.is_meta:
            key = name.removeprefix("language_model.")
            if key not in llm_buffers:
                raise UserError(f"converter bug: buffer {name!r} has no value")
            module_name, _, leaf = name.rpartition(".")
            model.get_submodule(module_name)._buffers[leaf] = llm_buffers[key]
    return model.eval()


def count(model, prefix) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefix))


def parse_args(argv):
    ap = CliParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blip2_ckpt", required=True, type=Path, help="LAVIS BLIP-2 checkpoint (.pth / .safetensors)")
    ap.add_argument("--minigpt4_ckpt", required=True, type=Path, help="MiniGPT-4 checkpoint holding llama_proj")
    ap.add_argument("--vicuna_dir", required=True, type=Path, help="Hugging Face Vicuna folder")
    ap.add_argument("--out", required=True, type=Path, help="output folder")
    ap.add_argument("--vision_heads", type=int, default=16)
    ap.add_argument("--qformer_heads", type=int, default=12)
    ap.add_argument("--cross_attention_frequency", type=int, default=2)
    ap.add_argument("--image_size", type=int, default=None, help="default: from visual_encoder.pos_embed")
    ap.add_argument("--dtype", choices=DTYPES, default="float16")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    ap.add_argument("--unsafe_pickle", action="store_true",
                    help="allow arbitrary pickled objects in the .pth files (trusted files only)")
    args = ap.parse_args(argv)
    for flag in ("vision_heads", "qformer_heads", "cross_attention_frequency", "image_size"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise UserError(f"--{flag} must be positive, got {value}")
    return args


@cli_main
def main(argv=None):
    args = parse_args(argv)
    out = args.out.resolve()
    if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not args.overwrite:
        raise UserError(f"output folder {out} already exists and is not empty; pass --overwrite to replace it")
    for path, what in ((args.blip2_ckpt, "BLIP-2 checkpoint"), (args.minigpt4_ckpt, "MiniGPT-4 checkpoint")):
        if not path.is_file():
            raise UserError(f"{what} not found: {path}")
    if not args.vicuna_dir.is_dir():
        raise UserError(f"Vicuna folder not found: {args.vicuna_dir}")

    import logging

    import torch
    from transformers import Blip2Config, Blip2Processor, Blip2QFormerModel, Blip2VisionModel
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil
    logging.getLogger("transformers").setLevel(logging.ERROR)
    dtype = getattr(torch, args.dtype)

    blip = Source(load_state_dict_file(args.blip2_ckpt, "BLIP-2 checkpoint", args.unsafe_pickle),
                  args.blip2_ckpt, "BLIP-2 checkpoint")
    mini = Source(load_state_dict_file(args.minigpt4_ckpt, "MiniGPT-4 checkpoint", args.unsafe_pickle),
                  args.minigpt4_ckpt, "MiniGPT-4 checkpoint")
    vision, qformer, n_query, grid = infer_configs(blip, args)
    # Shapes of the vision / Q-Former parameters, from the real HF modules (no text model needed).
    with torch.device("meta"):
        vis_sd = Blip2VisionModel(vision).state_dict()
        q_sd = Blip2QFormerModel(qformer).state_dict()
    expected = {f"vision_model.{k}": tuple(v.shape) for k, v in vis_sd.items()}
    expected.update({f"qformer.{k}": tuple(v.shape) for k, v in q_sd.items()})
    expected["query_tokens"] = (1, n_query, qformer.hidden_size)
    state = map_vision(blip, expected, grid)
    state.update(map_qformer(blip, expected))
    unexpected, ignored = leftover_problems(blip)
    if unexpected:
        more = f" (+{len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise UserError(f"{blip.what} {blip.path}: unexpected key {unexpected[0]!r}{more}; it is not part of "
                        f"BLIP-2's EVA ViT-g / Q-Former layout (check --cross_attention_frequency)")

    text_width = vicuna_width(args.vicuna_dir)  # checked before the (large) Vicuna weights are read
    state["language_projection.weight"] = mini.take("llama_proj.weight", (text_width, qformer.hidden_size))
    state["language_projection.bias"] = mini.take("llama_proj.bias", (text_width,))
    llm, tokenizer = load_vicuna(args.vicuna_dir, dtype)
    if llm.get_input_embeddings().weight.shape[1] != text_width:
        raise UserError(f"Vicuna in {args.vicuna_dir}: embedding width "
                        f"{llm.get_input_embeddings().weight.shape[1]} differs from hidden_size {text_width}")
    image_id, added = add_image_token(llm, tokenizer)
    state = {k: v.to(dtype) for k, v in state.items()}
    state.update({f"language_model.{k}": v for k, v in llm.state_dict().items()})

    config = Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(),
                         text_config=llm.config.to_dict(), num_query_tokens=n_query, image_token_index=image_id)
    model = build_model(config, state, llm)
    if getattr(llm, "generation_config", None) is not None:  # Vicuna's bos/eos/pad and sampling defaults
        model.generation_config = llm.generation_config
    image_processor = BlipImageProcessorPil(size={"height": vision.image_size, "width": vision.image_size},
                                            image_mean=list(EVA_MEAN), image_std=list(EVA_STD))
    processor = Blip2Processor(image_processor=image_processor, tokenizer=tokenizer, num_query_tokens=n_query)

    with atomic_dir(out) as tmp:   # out holds the old folder or the complete new one, never a partial one
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)

    total = count(model, "")
    lines = [
        f"MiniGPT-4 converted -> {out}",
        f"  vision   {count(model, 'vision_model.'):>13,} params  EVA ViT: {vision.num_hidden_layers} layers, "
        f"width {vision.hidden_size}, patch {vision.patch_size}, image {vision.image_size}",
        f"  Q-Former {count(model, 'qformer.') + count(model, 'query_tokens'):>13,} params  "
        f"{qformer.num_hidden_layers} layers, width {qformer.hidden_size}, {n_query} queries",
        f"  llama_proj {count(model, 'language_projection.'):>11,} params  {qformer.hidden_size} -> {text_width}",
        f"  LLM      {count(model, 'language_model.'):>13,} params  {type(llm).__name__}, "
        f"{config.text_config.num_hidden_layers} layers, vocab {config.text_config.vocab_size}",
        f"  total    {total:>13,} params  ({args.dtype}); {IMAGE_TOKEN} = token {image_id}"
        f"{' (added to the tokenizer)' if added else ''}",
        f"  ignored: {ignored} unused BLIP-2 keys (Q-Former text branch, retrieval heads), "
        f"{len(mini.sd) - len(mini.used)} MiniGPT-4 keys other than llama_proj",
        f"use it: model_path_map['minigpt-4-vicuna-7b'] in utils/GLOBAL.py, or --model_path {out}",
    ]
    print("\n".join(lines))
    return out


if __name__ == "__main__":
    main()
