"""Decoder stacks, run layer by layer: what an LLM does before its first layer (``prepare``), its
layers, and what it does after the last one (``head``). Checked against the models' own forward in
the tests (identical logits)."""
import torch
from torch import nn
from transformers.masking_utils import create_causal_mask

from backbones.sites import BLOCK_OUTPUT, MLP_ACTIVATION, MLP_INPUT, MLP_OUTPUT


def _apply(edits: dict, component: str, x, batch):
    fn = edits.get(component)
    return x if fn is None else fn(x, batch)
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

    def prepare(self, inputs_embeds, attention_mask, cache=None, position_ids=None):
        """-> (hidden states entering layer 0, keyword arguments every layer takes). With ``cache`` (a
        transformers ``Cache``), the layers read and extend it: ``inputs_embeds`` are the positions
        after the cached ones, ``attention_mask`` covers cached and new positions, and
        ``position_ids`` ([B, new]) are the new positions' (``VLBackbone.generate``)."""
        raise NotImplementedError

    @staticmethod
    def _cache_kwargs(cache) -> dict:
        return {} if cache is None else {"past_key_values": cache, "use_cache": True}

    def head(self, hidden):
        raise NotImplementedError

    def run_layer(self, i: int, hidden, kwargs: dict, edits: dict, batch):
        """Decoder layer ``i`` on ``hidden`` with the activation-site ``edits`` of this layer
        (``{component: f}``, see ``backbones/sites.py``). Without edits inside the layer the module
        runs as it is; with them, its forward is spelled out so each site can be changed."""
        inner = {c: f for c, f in edits.items() if c != BLOCK_OUTPUT}
        layer = self.layers[i]
        out = layer(hidden, **kwargs) if not inner else self._layer_forward(layer, hidden, kwargs, inner, batch)
        return _apply(edits, BLOCK_OUTPUT, out, batch)

    def _layer_forward(self, layer, hidden, kwargs, edits, batch):
        raise NotImplementedError

    # ---- module sites -------------------------------------------------------------------------
    def mlp_input_projections(self, i: int) -> list[nn.Linear]:
        raise NotImplementedError

    def mlp_output_projection(self, i: int) -> nn.Linear:
        raise NotImplementedError


class OPTStack(DecoderStack):
    """OPT (BLIP-2 OPT-2.7B): learned positions added to the embeddings, final LayerNorm, head."""

    def prepare(self, inputs_embeds, attention_mask, cache=None, position_ids=None):
        d = self.decoder
        if position_ids is None:
            position_ids = (torch.cumsum(attention_mask, 1) * attention_mask - 1).long()
        past = 0 if cache is None else cache.get_seq_length()
        causal_mask = create_causal_mask(config=d.config, inputs_embeds=inputs_embeds,
                                         attention_mask=attention_mask, past_key_values=cache)
        pos = d.embed_positions(attention_mask, past, position_ids=position_ids)
        h = d.project_in(inputs_embeds) if d.project_in is not None else inputs_embeds
        return h + pos.to(h.device), dict(attention_mask=causal_mask, position_ids=position_ids,
                                          **self._cache_kwargs(cache))

    def head(self, hidden):
        d = self.decoder
        if d.final_layer_norm is not None:
            hidden = _into(d.final_layer_norm, hidden)
        if d.project_out is not None:
            hidden = _into(d.project_out, hidden)
        return _into(self.lm_head, hidden)

    def _layer_forward(self, layer, hidden, kwargs, edits, batch):
        # OPTDecoderLayer.forward, step by step (dropout is off: the backbone is in eval mode)
        residual = hidden
        h = layer.self_attn_layer_norm(hidden) if layer.do_layer_norm_before else hidden
        h, _ = layer.self_attn(hidden_states=h, **kwargs)
        h = residual + h
        if not layer.do_layer_norm_before:
            h = layer.self_attn_layer_norm(h)
        residual = h
        x = layer.final_layer_norm(h) if layer.do_layer_norm_before else h
        x = _apply(edits, MLP_INPUT, x, batch)
        a = _apply(edits, MLP_ACTIVATION, layer.activation_fn(layer.fc1(x)), batch)
        h = residual + _apply(edits, MLP_OUTPUT, layer.fc2(a), batch)
        return h if layer.do_layer_norm_before else layer.final_layer_norm(h)

    def mlp_input_projections(self, i):
        return [self.layers[i].fc1]

    def mlp_output_projection(self, i):
        return self.layers[i].fc2


class LlamaStack(DecoderStack):
    """Llama / Vicuna (LLaVA-1.5, MiniGPT-4): rotary positions, final RMSNorm, head."""

    def prepare(self, inputs_embeds, attention_mask, cache=None, position_ids=None):
        d = self.decoder
        if position_ids is None:
            # Right padding: real tokens sit at 0..len-1, so plain positions match an unpadded run.
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device)[None]
        causal_mask = create_causal_mask(config=d.config, inputs_embeds=inputs_embeds,
                                         attention_mask=attention_mask, past_key_values=cache,
                                         position_ids=position_ids)
        rotary = d.rotary_emb(inputs_embeds, position_ids=position_ids)
        return inputs_embeds, dict(attention_mask=causal_mask, position_embeddings=rotary,
                                   position_ids=position_ids, **self._cache_kwargs(cache))

    def head(self, hidden):
        return _into(self.lm_head, _into(self.decoder.norm, hidden))

    def _layer_forward(self, layer, hidden, kwargs, edits, batch):
        # LlamaDecoderLayer.forward and LlamaMLP.forward, step by step
        residual = hidden
        h, _ = layer.self_attn(hidden_states=layer.input_layernorm(hidden), **kwargs)
        h = residual + h
        mlp = layer.mlp
        x = _apply(edits, MLP_INPUT, layer.post_attention_layernorm(h), batch)
        a = _apply(edits, MLP_ACTIVATION, mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x), batch)
        return h + _apply(edits, MLP_OUTPUT, mlp.down_proj(a), batch)

    def mlp_input_projections(self, i):
        mlp = self.layers[i].mlp
        return [mlp.gate_proj, mlp.up_proj]

    def mlp_output_projection(self, i):
        return self.layers[i].mlp.down_proj


def stack_for_causal_lm(lm, prefix: str) -> DecoderStack:
    """The stack of an ``*ForCausalLM`` held at module path ``prefix`` (e.g. 'language_model')."""
    kind = lm.config.model_type
    if kind == "opt":
        return OPTStack(lm.model.decoder, lm.lm_head, f"{prefix}.model.decoder.layers.{{}}",
                        lm.config.hidden_size)
    if kind == "llama":
        return LlamaStack(lm.model, lm.lm_head, f"{prefix}.model.layers.{{}}", lm.config.hidden_size)
    raise ValueError(f"unsupported language model type {kind!r}; supported: opt, llama")
