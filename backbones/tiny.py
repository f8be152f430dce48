"""Tiny models of the real backbone classes, built offline: a byte-level BPE tokenizer trained with
``tokenizers`` and small configs of ``Blip2ForConditionalGeneration`` (OPT or Llama decoder) and
``LlavaForConditionalGeneration`` (CLIP + Llama). Saved with ``save_pretrained`` (model, tokenizer,
processor) so they load through exactly the ``from_pretrained`` path used for real weights."""
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, Blip2QFormerConfig,
                          Blip2VisionConfig, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                          LlavaForConditionalGeneration, LlavaProcessor, OPTConfig, PreTrainedTokenizerFast)
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
IMAGE_TOKEN = "<image>"


def train_tokenizer(texts, vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 style) trained on ``texts``; BOS is prepended, ``<image>`` is a plain
    vocabulary token (a tokenizer ``image_token`` attribute breaks Blip2Processor)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS + [IMAGE_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


@dataclass
class TinySize:
    hidden: int = 128
    layers: int = 6            # decoder layers; editors act in the upper half
    heads: int = 4
    vision_layers: int = 4
    qformer_layers: int = 2
    num_query_tokens: int = 8
    image_size: int = 32
    patch_size: int = 8
    qformer_cross_every: int = 1   # cross-attention to the image in every Q-Former layer


def tiny_config(family: str, tok: PreTrainedTokenizerFast, size: TinySize):
    ids = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id)
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    h = size.hidden
    # Llama's gated MLP has three matrices: at 8/3 of the width (Llama's own ratio, 11008 / 4096) it
    # costs what OPT's two-matrix 4x MLP costs; at 4x it made a tiny-minigpt4 step 1.2x slower.
    llama = LlamaConfig(hidden_size=h, intermediate_size=8 * h // 3, num_hidden_layers=size.layers,
                        num_attention_heads=size.heads, num_key_value_heads=size.heads,
                        max_position_embeddings=512, tie_word_embeddings=False, **ids)
    if family == "llava":
        vision = CLIPVisionConfig(hidden_size=h, intermediate_size=2 * h, num_hidden_layers=size.vision_layers,
                                  num_attention_heads=size.heads, image_size=size.image_size,
                                  patch_size=size.patch_size, projection_dim=h)
        return LlavaConfig(vision_config=vision, text_config=llama, image_token_index=image_id,
                           vision_feature_layer=-2, vision_feature_select_strategy="default")
    vision = Blip2VisionConfig(hidden_size=h, intermediate_size=2 * h, num_hidden_layers=size.vision_layers,
                               num_attention_heads=size.heads, image_size=size.image_size,
                               patch_size=size.patch_size, initializer_range=0.02)  # default 1e-10
    # No dropout anywhere: pretraining is short and the world is small.
    qformer = Blip2QFormerConfig(hidden_size=h, intermediate_size=2 * h, num_hidden_layers=size.qformer_layers,
                                 num_attention_heads=size.heads, encoder_hidden_size=h,
                                 cross_attention_frequency=size.qformer_cross_every,
                                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if family == "blip2":
        text = OPTConfig(hidden_size=h, ffn_dim=4 * h, num_hidden_layers=size.layers, num_attention_heads=size.heads,
                         word_embed_proj_dim=h, max_position_embeddings=512, dropout=0.0, **ids)
    elif family == "minigpt4":
        text = llama
    else:
        raise ValueError(f"unknown tiny family {family!r}; expected blip2, llava or minigpt4")
    return Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(),
                       text_config=text.to_dict(), num_query_tokens=size.num_query_tokens,
                       image_token_index=image_id)


def tiny_processor(family: str, tok: PreTrainedTokenizerFast, size: TinySize):
    if family == "llava":
        image_processor = CLIPImageProcessorPil(size={"shortest_edge": size.image_size},
                                                crop_size={"height": size.image_size, "width": size.image_size})
        return LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=size.patch_size,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1)
    image_processor = BlipImageProcessorPil(size={"height": size.image_size, "width": size.image_size})
    return Blip2Processor(image_processor=image_processor, tokenizer=tok, num_query_tokens=size.num_query_tokens)


def build_tiny_model(family: str, tok: PreTrainedTokenizerFast, size: TinySize = TinySize(), seed: int = 0):
    """A randomly initialised tiny model of the real class for ``family``."""
    torch.manual_seed(seed)
    config = tiny_config(family, tok, size)
    model_class = LlavaForConditionalGeneration if family == "llava" else Blip2ForConditionalGeneration
    model = model_class(config)
    scratch_init(model)
    return model.eval()


def vision_encoder(model) -> torch.nn.Module:
    """The image encoder (ViT) of a BLIP-2-style or LLaVA model."""
    return model.vision_model if hasattr(model, "vision_model") else model.model.vision_tower


@torch.no_grad()
def scratch_init(model) -> None:
    """Initialisation for training a tiny model from scratch with its image encoder frozen at random
    init (``synthetic.pretrain``; real BLIP-2 and LLaVA freeze their image encoders too).

    - The ViT's position embeddings get the scale of the patch embeddings (default: 20x smaller), so
      the frozen features keep *where* each patch is: the shape sits in the centre, apart from the
      background and the frame on the border.
    - BLIP-2 families: variance-preserving Q-Former layers and unit query tokens. With the default
      (std 0.02 everywhere, zero query tokens) a narrow Q-Former passes almost nothing of the image."""
    emb = vision_encoder(model).embeddings
    pos = emb.position_embedding
    pos = pos.weight if isinstance(pos, torch.nn.Embedding) else pos
    patch = emb.patch_embedding.weight
    pos.normal_(0.0, float(patch.std()) * patch[0].numel() ** 0.5)
    if hasattr(model, "qformer"):
        model.query_tokens.normal_(0.0, 1.0)
        for module in model.qformer.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(0.0, module.in_features ** -0.5)


def save_tiny(model, family: str, tok, size: TinySize, out_dir):
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tiny_processor(family, tok, size).save_pretrained(out_dir)
    return out_dir
