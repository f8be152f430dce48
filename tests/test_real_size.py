"""scripts/real_size.py at full width and 2 decoder layers, for the three families, with LiveEdit: the
published shapes, l_e clamped to the cut depth, one training step and one edit without error. These
tests cut the vision encoder to 1 layer (``--vision_layers``, a test shortcut: its width, patches and
token count stay real) and run in bfloat16 to keep to seconds on a 2-core CPU; the batched evaluation
runs on BLIP-2 (its sequences are the shortest). One real-size model is alive at a time (peak RSS up
to about 4.5 GB, LLaVA)."""
from dataclasses import dataclass

import pytest

from backbones.real_configs import REAL_SPECS, padded_tokenizer
from scripts import real_size

# name -> (hidden size, vision tokens, vocabulary, parameters at the published depth, in billions)
EXPECTED = {"blip2-opt-2.7b": (2560, 32, 50304, 3.74),             # 3.74B, as published (LM head tied)
            "llava-v1.5-7b": (4096, 576, 32064, 7.06),           # LLaVA-1.5-7B: 7.06B, as published
            "minigpt-4-vicuna-7b": (4096, 32, 32001, 7.83)}       # ViT-g 1.0B + Q-Former 0.1B + Vicuna-7B 6.74B


@pytest.mark.parametrize("name", list(EXPECTED))
def test_full_width_two_layers_trains_and_edits(name, capsys):
    hidden, n_vision, vocab, billions = EXPECTED[name]
    args = ["--backbones", name, "--editors", "liveedit", "--layers", "2", "--vision_layers", "1",
            "--dtype", "bf16", "--mixed_precision", "bf16", "--train_steps", "1", "--batch_size", "1",
            "--edits", "1", "--eval_records", "1" if name == "blip2-opt-2.7b" else "0", "--raise_errors"]
    entry = real_size.main(args)["backbones"][0]
    assert (entry["hidden_size"], entry["n_vision_tokens"], entry["vocab_size"]) == (hidden, n_vision, vocab)
    assert entry["num_layers"] == 2 and entry["full_layers"] == 32
    assert abs(entry["full_parameters"] / 1e9 - billions) < 0.01
    le = entry["editors"][0]
    assert "failed" not in le and "skipped" not in le
    assert le["layer"] == 1 and "edit_layer 21 -> 1 (the LLM has 2 decoder layers here)" in le["notes"]
    assert le["trainable_parameters"] > 0 and len(le["train_step_s"]) == 1 and len(le["edit_s"]) == 1
    assert le["train_memory"]["peak"] > 0 and le["estimate"]["train"] > entry["full_parameter_bytes"]
    assert entry["probe"]["train_batch_shape"][2] == hidden
    out = capsys.readouterr().out
    assert f"hidden {hidden}, 2 of 32 decoder layers, {n_vision} vision tokens" in out and "| liveedit |" in out


def test_padded_tokenizer_spans_the_real_vocabulary():
    tok = padded_tokenizer(["What color is the shape? The answer is: red"] * 10, 32064, trained_size=300)
    first = tok.convert_tokens_to_ids("<unused0>")          # the trained entries end before it (<= 300)
    assert len(tok) == 32064 and first <= 300
    assert tok.decode([32063]) == f"<unused{32063 - first}>"
    assert max(tok("What color is the shape? <image>")["input_ids"]) < first


def test_editor_layers_are_clamped_to_the_cut_depth():
    @dataclass
    class Cfg:
        layer: int
        layers: tuple = (3, 21, -40)
        lr: float = 1.0
    notes = []
    cfg = real_size.clamp_layers(Cfg(layer=21), 4, None, notes)
    assert (cfg.layer, cfg.layers) == (3, (3, 3, -4)) and len(notes) == 2
    assert real_size.clamp_layers(Cfg(layer=21), 4, 0, []).layer == 0      # --edit_layer
    assert set(REAL_SPECS) == set(EXPECTED)
