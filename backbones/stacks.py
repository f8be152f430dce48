"""Decoder stacks, run layer by layer: what an LLM does before its first layer (``prepare``), its
layers, and what it does after the last one (``head``). Checked against the models' own forward in
the tests (identical logits)."""
import torch
from transformers.masking_utils import create_causal_mask

from backbones.devices import module_device


def _into(module, x):
    """``module(x)`` with ``x`` moved to the module's device first (a split model's head)."""
    return module(x.to(module_device(module)))


class DecoderStack:
    def __init__(self, decoder, lm_head, layer_path_template: str, hidden_size: int):
        self.decoder = decoder
        self.lm_head = lm_head
        self.layers = decoder.layers
        self.layer_path_template = layer_path_template
        self.hidden_size = hidden_size

    def prepare(self, inputs_embeds, attention_mask):
        """-> (hidden states entering layer 0, keyword arguments every layer takes)."""
        raise NotImplementedError

    def head(self, hidden):
        raise NotImplementedError


class OPTStack(DecoderStack):
    """OPT (BLIP-2 OPT-2.7B): learned positions added to the embeddings, final LayerNorm, head."""

    def prepare(self, inputs_embeds, attention_mask):
        d = self.decoder
        position_ids = (torch.cumsum(attention_mask, 1) * attention_mask - 1).long()
        causal_mask = create_causal_mask(config=d.config, inputs_embeds=inputs_embeds,
                                         attention_mask=attention_mask, past_key_values=None)
        pos = d.embed_positions(attention_mask, 0, position_ids=position_ids)
        h = d.project_in(inputs_embeds) if d.project_in is not None else inputs_embeds
        return h + pos.to(h.device), dict(attention_mask=causal_mask, position_ids=position_ids)

    def head(self, hidden):
        d = self.decoder
        if d.final_layer_norm is not None:
            hidden = _into(d.final_layer_norm, hidden)
        if d.project_out is not None:
            hidden = _into(d.project_out, hidden)
        return _into(self.lm_head, hidden)


class LlamaStack(DecoderStack):
    """Llama / Vicuna (LLaVA-1.5, MiniGPT-4): rotary positions, final RMSNorm, head."""

    def prepare(self, inputs_embeds, attention_mask):
        d = self.decoder
        # Right padding: real tokens sit at 0..len-1, so plain positions match an unpadded run.
        position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device)[None]
        causal_mask = create_causal_mask(config=d.config, inputs_embeds=inputs_embeds,
                                         attention_mask=attention_mask, past_key_values=None,
                                         position_ids=position_ids)
        rotary = d.rotary_emb(inputs_embeds, position_ids=position_ids)
        return inputs_embeds, dict(attention_mask=causal_mask, position_embeddings=rotary,
                                   position_ids=position_ids)

    def head(self, hidden):
        return _into(self.lm_head, _into(self.decoder.norm, hidden))


def stack_for_causal_lm(lm, prefix: str) -> DecoderStack:
    """The stack of an ``*ForCausalLM`` held at module path ``prefix`` (e.g. 'language_model')."""
    kind = lm.config.model_type
    if kind == "opt":
        return OPTStack(lm.model.decoder, lm.lm_head, f"{prefix}.model.decoder.layers.{{}}",
                        lm.config.hidden_size)
    if kind == "llama":
        return LlamaStack(lm.model, lm.lm_head, f"{prefix}.model.layers.{{}}", lm.config.hidden_size)
    raise ValueError(f"unsupported language model type {kind!r}; supported: opt, llama")
