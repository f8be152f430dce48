"""SERAC's trainable pieces (BASELINES.md section 3, the authors' design): a scope classifier and a
counterfactual model that both read the VLLM's *input embeddings* (text embeddings with the image
features the backbone's connector put in), so the image reaches both through the backbone's own
vision path.

- Scope classifier: ``ResBlock(d -> H)``, LayerNorm, a ``BertModel`` encoder over the last
  ``max_positions`` positions, then ``concat(mean, max, min)`` over the real positions: a key of width
  3H. Score of query q against key k: ``q . k / sqrt(3H)``.
- Counterfactual model: ``ResBlock(d -> H)`` of ``concat(edit embeddings, query embeddings)`` into an
  ``OPTForCausalLM`` decoder (causal, so the query attends to the whole edit), ``ResBlock(H -> d)`` of
  its outputs at the query positions, then the frozen backbone's final norm and LM head.

Real backbones load BERT-base-cased and OPT-125m from local folders named in ``utils/GLOBAL.py``;
the embedded default builds tiny models of the same classes from a seed. Their word embeddings (and
OPT's tied LM head) are never used: they are frozen and left out of the trained state."""
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from editors.serac.config import SeracConfig, SeracModel
from utils.errors import UserError


class ResBlock(nn.Module):
    """``y = W x``, then ``y + W2 gelu(W1 LN(y))``."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.proj = nn.Linear(d_in, d_out)
        self.norm = nn.LayerNorm(d_out)
        self.fc1 = nn.Linear(d_out, d_out)
        self.fc2 = nn.Linear(d_out, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.proj(x)
        return y + self.fc2(F.gelu(self.fc1(self.norm(y))))


def _pretrained_path(name: str) -> Path:
    from utils.GLOBAL import model_path_map
    if name not in model_path_map:
        raise UserError(f"serac: {name!r} is not in utils/GLOBAL.py model_path_map; known: "
                        f"{', '.join(sorted(model_path_map))}")
    path = Path(model_path_map[name])
    if not (path / "config.json").is_file():
        raise UserError(f"serac: no Hugging Face model folder at {path} for {name!r} (config.json missing); "
                        f"put a local copy there or edit utils/GLOBAL.py")
    return path


def build_classifier(spec: SeracModel, vocab_size: int):
    from transformers import BertConfig, BertModel
    if spec.pretrained:
        return BertModel.from_pretrained(str(_pretrained_path(spec.pretrained)), add_pooling_layer=False)
    cfg = BertConfig(vocab_size=vocab_size, hidden_size=spec.hidden, num_hidden_layers=spec.layers,
                     num_attention_heads=spec.heads, intermediate_size=4 * spec.hidden,
                     max_position_embeddings=spec.max_positions, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    return BertModel(cfg, add_pooling_layer=False)


def build_counterfactual(spec: SeracModel, tokenizer):
    from transformers import OPTConfig, OPTForCausalLM
    if spec.pretrained:
        return OPTForCausalLM.from_pretrained(str(_pretrained_path(spec.pretrained)))
    cfg = OPTConfig(vocab_size=len(tokenizer), hidden_size=spec.hidden, ffn_dim=4 * spec.hidden,
                    num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
                    max_position_embeddings=spec.max_positions, word_embed_proj_dim=spec.hidden,
                    dropout=0.0, attention_dropout=0.0, pad_token_id=tokenizer.pad_token_id,
                    bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return OPTForCausalLM(cfg)


def window(embeds: torch.Tensor, ends: torch.Tensor, size: int):
    """Per row b, the positions ``[max(0, ends[b] - size), ends[b])`` of ``embeds`` [B, L, d],
    left-aligned: -> (x [B, T, d], mask [B, T] bool), T = the longest window."""
    starts = (ends - size).clamp(min=0)
    n = ends - starts
    T = max(int(n.max()), 1)
    t = torch.arange(T, device=embeds.device)[None]
    mask = t < n[:, None]
    idx = (starts[:, None] + t).clamp(max=embeds.shape[1] - 1)
    x = embeds.gather(1, idx[..., None].expand(-1, -1, embeds.shape[2]))
    return x * mask[..., None].to(x.dtype), mask


class SeracNet(nn.Module):
    def __init__(self, d: int, tokenizer, cfg: SeracConfig):
        super().__init__()
        self.classifier = build_classifier(cfg.classifier, len(tokenizer))
        self.counterfactual = build_counterfactual(cfg.counterfactual, tokenizer)
        hc, hf = self.classifier.config.hidden_size, self.counterfactual.config.word_embed_proj_dim
        self.key_in = ResBlock(d, hc)
        self.key_norm = nn.LayerNorm(hc)
        # OPT's decoder takes and returns word_embed_proj_dim (project_in / project_out when it differs)
        self.cf_in = ResBlock(d, hf)
        self.cf_out = ResBlock(hf, d)
        self.key_width = 3 * hc
        self.classifier_positions = self.classifier.config.max_position_embeddings
        self.cf_positions = self.counterfactual.config.max_position_embeddings
        for p in self.unused_parameters():
            p.requires_grad_(False)

    def unused_parameters(self) -> list[nn.Parameter]:
        """Word embeddings (and OPT's LM head, tied to them): inputs are embeddings, outputs go
        through the backbone's head."""
        out = [self.classifier.get_input_embeddings().weight, self.counterfactual.get_input_embeddings().weight,
               self.counterfactual.get_output_embeddings().weight]
        unique = []
        for p in out:
            if all(p is not q for q in unique):
                unique.append(p)
        return unique

    def unused_names(self) -> set[str]:
        ids = {id(p) for p in self.unused_parameters()}
        return {k for k, p in self.named_parameters(remove_duplicate=False) if id(p) in ids}

    # ---- scope classifier ------------------------------------------------------------------
    def keys(self, embeds: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
        """Keys [B, 3H] of positions ``[0, ends[b])`` of the input embeddings [B, L, d] (the last
        ``max_positions`` of them)."""
        x, mask = window(embeds.float(), ends, self.classifier_positions)
        x = self.key_norm(self.key_in(x))
        h = self.classifier(inputs_embeds=x, attention_mask=mask.long()).last_hidden_state
        m = mask[..., None]
        mean = (h * m).sum(1) / m.sum(1).clamp(min=1)
        big = torch.finfo(h.dtype).max
        top = h.masked_fill(~m, -big).amax(1)
        bottom = h.masked_fill(~m, big).amin(1)
        return torch.cat([mean, top, bottom], -1)

    def scores(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        return queries @ keys.T / self.key_width ** 0.5

    # ---- counterfactual model --------------------------------------------------------------
    def counterfactual_hidden(self, edits: list[torch.Tensor], queries: torch.Tensor,
                              query_lengths: torch.Tensor) -> torch.Tensor:
        """Edit embeddings (one [l_e, d] each), query embeddings [n, L, d] with their lengths ->
        the decoder's outputs at the query positions, mapped back to width d: [n, L, d]."""
        n, L, d = queries.shape
        lens_e = [e.shape[0] for e in edits]
        total = [le + int(lq) for le, lq in zip(lens_e, query_lengths.tolist())]
        T = max(total)
        if T > self.cf_positions:
            raise UserError(f"serac: edit + query of {T} tokens exceed the counterfactual model's "
                            f"{self.cf_positions} positions")
        x = queries.new_zeros((n, T, d), dtype=torch.float32)
        mask = torch.zeros(n, T, dtype=torch.long, device=queries.device)
        for i, (e, le, tot) in enumerate(zip(edits, lens_e, total)):
            x[i, :le] = e.float()
            x[i, le:tot] = queries[i, :tot - le].float()
            mask[i, :tot] = 1
        h = self.counterfactual.model.decoder(inputs_embeds=self.cf_in(x), attention_mask=mask).last_hidden_state
        start = torch.tensor(lens_e, device=queries.device)
        idx = (start[:, None] + torch.arange(L, device=queries.device)[None]).clamp(max=T - 1)
        h = h.gather(1, idx[..., None].expand(-1, -1, h.shape[2]))
        return self.cf_out(h)
