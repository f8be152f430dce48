"""Text encoders of the retrieval editors: RECIPE's knowledge encoder (RoBERTa-base for the real
backbones) and LTE's retriever (a sentence encoder, multi-qa-mpnet-base-dot-v1 for the real ones),
loaded with ``transformers.AutoModel`` from a local folder named in ``utils/GLOBAL.py``'s
``model_path_map`` (or given as a path).

For the embedded default, ``tiny-text-encoder`` is a tiny ``RobertaModel`` (hidden 128, 2 layers)
with a byte-level BPE tokenizer trained on the synthetic world's texts (``backbones.tiny.
train_tokenizer``), randomly initialised from a fixed seed and saved with ``save_pretrained`` on first
use (``data/aux_models/``), so it loads through the same path as RoBERTa-base. It is not pretrained:
the editors train it (RECIPE as its knowledge encoder, LTE as its retriever)."""
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

from utils.GLOBAL import model_path_map
from utils.errors import UserError

TINY_TEXT_ENCODER = "tiny-text-encoder"
POOLINGS = ("recipe", "mean", "cls")


def build_tiny_text_encoder(out_dir, texts, hidden: int = 128, layers: int = 2, heads: int = 4,
                            vocab_size: int = 1024, max_tokens: int = 128, seed: int = 0) -> Path:
    """Train a BPE tokenizer on ``texts``, build a randomly initialised tiny ``RobertaModel`` (no
    dropout) and save both into ``out_dir`` (written to a temporary folder, then renamed)."""
    from transformers import RobertaConfig, RobertaModel

    from backbones.tiny import train_tokenizer
    out_dir = Path(out_dir)
    tok = train_tokenizer(texts, vocab_size)
    pad = tok.pad_token_id
    config = RobertaConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers,
                           num_attention_heads=heads, intermediate_size=2 * hidden,
                           max_position_embeddings=max_tokens + pad + 2, type_vocab_size=1,
                           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                           pad_token_id=pad, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = RobertaModel(config)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if (out_dir / "config.json").is_file():     # built meanwhile by another process: keep theirs
            return out_dir
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def resolve_text_encoder(name: str) -> Path:
    """A ``model_path_map`` name or a folder -> the folder of a saved encoder. The tiny default is
    built from the synthetic world's texts on first use."""
    path = Path(model_path_map.get(name, name))
    if (path / "config.json").is_file():
        return path
    if name == TINY_TEXT_ENCODER:
        from synthetic.pretrain import current_world
        from synthetic.world import text_corpus
        from utils.GLOBAL import SYNTHETIC_DIR
        from utils.locks import build_once

        def build():
            print(f"{name} is not built yet: building it at {path} (a tokenizer and a randomly initialised "
                  f"tiny RoBERTa, a few seconds)", file=sys.stderr)
            build_tiny_text_encoder(path, text_corpus(current_world(SYNTHETIC_DIR)))
        # one builder at a time (the dataset processes of compare --jobs, a multi-process launch)
        build_once(path, lambda: (path / "config.json").is_file(), build, name)
        return path
    where = f"model_path_map[{name!r}] in utils/GLOBAL.py" if name in model_path_map else "the config"
    raise UserError(f"no text encoder at {path} (config.json missing); put the weights there or change {where}")


class TextEncoder(nn.Module):
    """A Hugging Face encoder and its tokenizer; ``features`` pools the last hidden states of a batch:
    ``recipe`` = concat(pooler, mean, max, min) (RECIPE's 4h-wide features), ``mean`` or ``cls``.
    Padding never enters a pooled value."""

    def __init__(self, path, max_tokens: int):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer
        try:
            self.model = AutoModel.from_pretrained(path)
            self.tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot load a text encoder from {path}: {e}") from None
        self.max_tokens = max_tokens
        self.hidden_size = self.model.config.hidden_size

    def tokenize(self, texts) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_tokens,
                             return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def feature_size(self, pooling: str) -> int:
        return 4 * self.hidden_size if pooling == "recipe" else self.hidden_size

    def features(self, tokens: dict | None = None, pooling: str = "mean", inputs_embeds=None,
                 attention_mask=None) -> torch.Tensor:
        """[N, feature_size] from token ids (``tokens``) or from input embeddings."""
        dev = self.model.device
        if tokens is not None:
            input_ids, mask = tokens["input_ids"].to(dev), tokens["attention_mask"].to(dev)
            out = self.model(input_ids=input_ids, attention_mask=mask)
        else:
            mask = attention_mask.to(dev)
            out = self.model(inputs_embeds=inputs_embeds, attention_mask=mask)
        h = out.last_hidden_state
        m = mask[..., None].to(h.dtype)
        mean = (h * m).sum(1) / m.sum(1).clamp(min=1)
        if pooling == "mean":
            return mean
        if pooling == "cls":
            return h[:, 0]
        pooled = getattr(out, "pooler_output", None)
        pooled = h[:, 0] if pooled is None else pooled
        big = torch.finfo(h.dtype).max
        hi = h.masked_fill(m == 0, -big).amax(1)
        lo = h.masked_fill(m == 0, big).amin(1)
        return torch.cat([pooled, mean, hi, lo], -1)
