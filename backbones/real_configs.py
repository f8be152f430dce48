"""The real backbones' published configurations, written out in full, and models of exactly those
shapes built with random weights (no download: ``scripts/real_size.py`` runs every code path at real
size with them).

Sources: the Hugging Face ``config.json`` of each checkpoint. Nothing can be downloaded on the machine
this was written on, so the values below were written from knowledge of those files, not copied
from a download; ``tests/test_real_size.py`` checks the derived facts (hidden sizes 2560 / 4096, 32 or
576 vision tokens, 32 decoder layers, parameter counts of 3.74B / 7.06B / 7.83B).

- BLIP-2 OPT-2.7B: ``Salesforce/blip2-opt-2.7b`` (the revision with ``<image>`` in the vocabulary:
  ``image_token_index`` 50265, text vocabulary padded to 50304; OPT-2.7B itself has 50272). Vision:
  EVA ViT-g/14 as BLIP-2 uses it (39 of its 40 blocks, width 1408, MLP 6144, 16 heads, 224 px).
  Q-Former: BERT-base (12 layers, 768, cross-attention every 2nd layer), 32 queries. Text:
  ``facebook/opt-2.7b`` (2560 wide, FFN 10240, 32 layers, 32 heads, learned positions 2048, ReLU,
  LM head tied to the embeddings).
- LLaVA-1.5-7B: ``llava-hf/llava-1.5-7b-hf``. Vision: CLIP ViT-L/14 at 336 px (``openai/clip-vit-
  large-patch14-336``: width 1024, MLP 4096, 24 layers, 16 heads, quick-GELU), features of the
  penultimate layer without CLS (576 tokens), a 2-layer GELU MLP projector. Text: Vicuna-7B v1.5
  (Llama: 4096 wide, MLP 11008, 32 layers, 32 heads, RMSNorm eps 1e-5, 4096 positions), vocabulary
  32064 (32000 + ``<image>`` + ``<pad>``, padded to a multiple of 64), untied LM head.
- MiniGPT-4 (Vicuna-7B), in the layout ``scripts/convert_minigpt4.py`` writes: BLIP-2's EVA ViT-g and
  Q-Former as above (from LAVIS' ``blip2_pretrained_flant5xxl.pth``: 39 blocks, 32 queries), one
  linear ``llama_proj`` 768 -> 4096, and Vicuna-7B v0 (Llama-7B shapes, 2048 positions, RMSNorm eps
  1e-6) with ``<image>`` added by the converter: vocabulary 32001.

Token ids: the models use the ids of the tokenizer built here (a byte-level BPE trained on a few
prompts, its vocabulary padded to the real size with never-produced entries), not the real
tokenizer's; every shape (embedding and LM-head rows included) is the real one.
"""
import json
import zlib
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer
from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, Blip2QFormerConfig,
                          Blip2VisionConfig, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                          LlavaProcessor, OPTConfig, PreTrainedTokenizerFast)
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from backbones.tiny import IMAGE_TOKEN, SPECIALS, train_tokenizer

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# ---- the published values ----------------------------------------------------------------------------
EVA_VIT_G = dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16,
                 image_size=224, patch_size=14, hidden_act="gelu", layer_norm_eps=1e-6, qkv_bias=True,
                 attention_dropout=0.0)
QFORMER_BERT_BASE = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                         encoder_hidden_size=1408, cross_attention_frequency=2, hidden_act="gelu",
                         layer_norm_eps=1e-12, max_position_embeddings=512, vocab_size=30522)
OPT_2_7B = dict(hidden_size=2560, ffn_dim=10240, num_hidden_layers=32, num_attention_heads=32, vocab_size=50304,
                max_position_embeddings=2048, word_embed_proj_dim=2560, do_layer_norm_before=True,
                activation_function="relu", enable_bias=True, layer_norm_elementwise_affine=True,
                dropout=0.1, attention_dropout=0.0, tie_word_embeddings=True)
CLIP_VIT_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                      image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5)
VICUNA_7B_V15 = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5,
                     rope_theta=10000.0, hidden_act="silu", attention_bias=False, mlp_bias=False,
                     tie_word_embeddings=False)
VICUNA_7B_V0 = dict(VICUNA_7B_V15, vocab_size=32001, max_position_embeddings=2048, rms_norm_eps=1e-6)
# the real special-token ids, for the record (the built models use the padded tokenizer's ids)
REAL_TOKEN_IDS = {"blip2-opt-2.7b": dict(image=50265, bos=2, eos=2, pad=1),
                  "llava-v1.5-7b": dict(image=32000, pad=32001, bos=1, eos=2),
                  "minigpt-4-vicuna-7b": dict(image=32000, bos=1, eos=2)}


@dataclass(frozen=True)
class RealSpec:
    name: str           # the backbone's full name (its configs/<editor>/<name>.yaml apply)
    family: str         # blip2 | llava | minigpt4
    source: str
    vision: dict
    text: dict
    text_type: str      # opt | llama
    qformer: dict | None = None
    num_query_tokens: int = 32

    @property
    def vocab_size(self) -> int:
        return self.text["vocab_size"]

    @property
    def model_class(self):
        return LlavaForConditionalGeneration if self.family == "llava" else Blip2ForConditionalGeneration


REAL_SPECS = {s.name: s for s in (
    RealSpec("blip2-opt-2.7b", "blip2", "Salesforce/blip2-opt-2.7b config.json", EVA_VIT_G, OPT_2_7B, "opt",
             QFORMER_BERT_BASE),
    RealSpec("llava-v1.5-7b", "llava", "llava-hf/llava-1.5-7b-hf config.json", CLIP_VIT_L_336, VICUNA_7B_V15, "llama"),
    RealSpec("minigpt-4-vicuna-7b", "minigpt4", "scripts/convert_minigpt4.py layout: LAVIS BLIP-2 ViT-g + Q-Former, "
             "MiniGPT-4 llama_proj, Vicuna-7B v0 config.json", EVA_VIT_G, VICUNA_7B_V0, "llama", QFORMER_BERT_BASE),
)}


# ---- tokenizer ---------------------------------------------------------------------------------------
def padded_tokenizer(texts, vocab_size: int, trained_size: int = 1024) -> PreTrainedTokenizerFast:
    """A byte-level BPE (``backbones.tiny.train_tokenizer``) trained on ``texts`` with ``trained_size``
    entries, its vocabulary padded to ``vocab_size`` with entries no merge ever produces, so that
    token ids span exactly the real embedding and LM-head rows."""
    tok = train_tokenizer(texts, vocab_size=trained_size)
    data = json.loads(tok.backend_tokenizer.to_str())
    vocab = data["model"]["vocab"]
    next_id = max(vocab.values()) + 1
    if next_id > vocab_size:
        raise ValueError(f"the trained vocabulary ({next_id}) exceeds the padded size {vocab_size}")
    for i in range(vocab_size - next_id):
        vocab[f"<unused{i}>"] = next_id + i
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(data)), pad_token=SPECIALS[0],
                                   bos_token=SPECIALS[1], eos_token=SPECIALS[2], unk_token=SPECIALS[3])


# ---- configs and processors --------------------------------------------------------------------------
def real_config(spec: RealSpec, tok: PreTrainedTokenizerFast, layers: int | None = None,
                vision_layers: int | None = None):
    """The model config of ``spec``; ``layers`` cuts the LLM depth, ``vision_layers`` the vision
    encoder's (a test shortcut); everything else stays real size."""
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    text = dict(spec.text, **ids)
    vision = dict(spec.vision)
    if layers is not None:
        text["num_hidden_layers"] = layers
    if vision_layers is not None:
        vision["num_hidden_layers"] = vision_layers
    if spec.family == "llava":
        return LlavaConfig(vision_config=CLIPVisionConfig(**vision), text_config=LlamaConfig(**text),
                           image_token_index=image_id, projector_hidden_act="gelu", vision_feature_layer=-2,
                           vision_feature_select_strategy="default", multimodal_projector_bias=True,
                           image_seq_length=(vision["image_size"] // vision["patch_size"]) ** 2)
    text_config = OPTConfig(**text) if spec.text_type == "opt" else LlamaConfig(**text)
    return Blip2Config(vision_config=Blip2VisionConfig(**vision).to_dict(),
                       qformer_config=Blip2QFormerConfig(**spec.qformer).to_dict(),
                       text_config=text_config.to_dict(), num_query_tokens=spec.num_query_tokens,
                       image_token_index=image_id)


def real_processor(spec: RealSpec, tok: PreTrainedTokenizerFast):
    size = spec.vision["image_size"]
    if spec.family == "llava":
        image_processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                                image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD)
        return LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=spec.vision["patch_size"],
                              vision_feature_select_strategy="default", num_additional_image_tokens=1)
    image_processor = BlipImageProcessorPil(size={"height": size, "width": size}, image_mean=OPENAI_CLIP_MEAN,
                                            image_std=OPENAI_CLIP_STD)
    return Blip2Processor(image_processor=image_processor, tokenizer=tok, num_query_tokens=spec.num_query_tokens)


# ---- random weights, placed -------------------------------------------------------------------------
PERIOD = 1_048_573   # a prime: the period of the random fill (rows of a matrix never repeat)


def empty_model(spec: RealSpec, config):
    """The model with its parameters on 'meta' (no memory; buffers such as rotary tables are real)."""
    from accelerate import init_empty_weights
    with init_empty_weights(include_buffers=False):
        model = spec.model_class(config)
    model.tie_weights()      # OPT's LM head is its embedding matrix (built on 'meta', the tie is not made)
    return model


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())   # tied weights once


def _keep_fp32(model, name: str) -> bool:
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    parts = name.split(".")
    return any(k in parts for k in keep)


def _fill(t: torch.Tensor, module, pname: str, seed: int, std: float = 0.02) -> None:
    """Biases 0, norm weights 1, every other weight N(0, std) drawn for a block of ``PERIOD``
    values and repeated (drawing billions of normals costs minutes on a CPU; a prime period keeps
    the rows of every matrix distinct). Drawn on the CPU from ``seed``, so the weights are the same
    wherever a parameter is placed (a split model and a single-device one give the same logits)."""
    if pname.endswith("bias"):
        t.zero_()
    elif "norm" in type(module).__name__.lower():
        t.fill_(1.0)
    else:
        flat = t.view(-1)
        g = torch.Generator().manual_seed(seed)
        block = torch.empty(min(flat.numel(), PERIOD), dtype=torch.float32).normal_(0.0, std, generator=g)
        block = block.to(t.device)
        for s in range(0, flat.numel(), PERIOD):
            n = min(PERIOD, flat.numel() - s)
            flat[s:s + n] = block[:n]


@torch.no_grad()
def materialise(model, placement, dtype: torch.dtype, seed: int = 0) -> None:
    """Give every 'meta' parameter random values on ``placement(name)`` (a device) in ``dtype``
    (modules the class keeps in float32, e.g. BLIP-2's Q-Former, stay float32 as in
    ``from_pretrained``); tied parameters stay tied; buffers follow their module."""
    groups = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    for names in groups.values():
        first = names[0]
        mod_name, _, pname = first.rpartition(".")
        module = model.get_submodule(mod_name)
        old = module._parameters[pname]
        device = placement(first)
        value = torch.empty(old.shape, device=device,
                            dtype=torch.float32 if _keep_fp32(model, first) or not old.is_floating_point() else dtype)
        _fill(value, module, pname, seed + zlib.crc32(first.encode()))
        new = torch.nn.Parameter(value, requires_grad=False)
        for name in names:
            m, _, pn = name.rpartition(".")
            model.get_submodule(m)._parameters[pn] = new
    for name, b in list(model.named_buffers()):
        mod_name, _, bname = name.rpartition(".")
        model.get_submodule(mod_name)._buffers[bname] = b.to(placement(name))


def prefix_placement(device_map: dict):
    """name -> device by the longest prefix in an accelerate device map ('' = everything)."""
    keys = sorted(device_map, key=len, reverse=True)

    def place(name):
        for k in keys:
            if k == "" or name == k or name.startswith(k + "."):
                return device_map[k]
        raise KeyError(f"{name} is in no entry of the device map")
    return place


def no_split_classes(model) -> list[str]:
    """Module classes a device map must keep whole: every sub-model's ``_no_split_modules`` (a BLIP-2
    with a Llama decoder: the Llama decoder layer too) and the decoder layer class."""
    from transformers import PreTrainedModel
    names = set()
    for m in model.modules():
        if isinstance(m, PreTrainedModel):
            names.update(m._no_split_modules or ())
    return sorted(names)


def parameter_bytes(model, dtype: torch.dtype) -> int:
    """Bytes of the parameters once materialised in ``dtype`` (float32-kept modules at 4 bytes)."""
    size = torch.finfo(dtype).bits // 8
    return sum(p.numel() * (4 if _keep_fp32(model, n) else size) for n, p in model.named_parameters())


@dataclass
class Built:
    backbone: object            # the VLBackbone wrapper
    spec: RealSpec
    device_map: dict | None     # accelerate device map (``-dvc auto``), else None
    parameters: int             # at the built depth
    parameter_bytes: int
    full_parameters: int        # at the published depth
    full_parameter_bytes: int
    full_layers: int


def build_real_backbone(name: str, tok: PreTrainedTokenizerFast, dtype: torch.dtype, device: str = "cpu",
                        layers: int | None = None, vision_layers: int | None = None, max_memory: str | None = None,
                        seed: int = 0) -> Built:
    """Backbone ``name`` at its published shapes (``layers`` / ``vision_layers`` cut the depths) with
    random weights, on ``device`` ('cpu', 'cuda:N') or, with 'auto', spread by accelerate's device
    map inference over the visible GPUs (each capped at ``max_memory``, e.g. '24GiB'; what does not
    fit is offloaded to the CPU) and dispatched with accelerate's hooks, as ``from_pretrained(
    device_map='auto')`` loads real weights."""
    from backbones import BACKBONES
    spec = REAL_SPECS[name]
    full = empty_model(spec, real_config(spec, tok))
    full_params, full_bytes = count_parameters(full), parameter_bytes(full, dtype)
    full_layers = spec.text["num_hidden_layers"]
    del full
    model = empty_model(spec, real_config(spec, tok, layers, vision_layers))
    device_map = None
    if device == "auto":
        from accelerate import infer_auto_device_map
        from accelerate.utils import get_max_memory
        budget = get_max_memory()
        if max_memory:
            budget = {k: (max_memory if isinstance(k, int) else v) for k, v in budget.items()}
        device_map = infer_auto_device_map(model, max_memory=budget, no_split_module_classes=no_split_classes(model),
                                           dtype=dtype)
        if "disk" in device_map.values():
            raise RuntimeError(f"{name} does not fit in GPUs + CPU memory ({budget}); nothing is offloaded to disk")
        by_prefix = prefix_placement(device_map)
        placement = lambda n: torch.device("cuda", v) if isinstance(v := by_prefix(n), int) else torch.device(v)
    else:
        placement = lambda n: torch.device(device)
    materialise(model, placement, dtype, seed)
    if device_map is not None and len(set(device_map.values())) > 1:
        from accelerate import dispatch_model
        dispatch_model(model, device_map)
    model.eval()
    backbone = BACKBONES.get(name).wrap(name, model, real_processor(spec, tok))
    return Built(backbone, spec, device_map, count_parameters(model), parameter_bytes(model, dtype),
                 full_params, full_bytes, full_layers)
