"""scripts/real_size.py at full width and 2 decoder layers, for the three families, with LiveEdit: the
published shapes, l_e clamped to the cut depth, one training step and one edit without error. These
tests cut the vision encoder to 1 layer (``--vision_layers``, a test shortcut: its width, patches and
token count stay real) and run in bfloat16 to keep to seconds on a 2-core CPU; the batched evaluation
runs on BLIP-2 (its sequences are the shortest). One real-size model is alive at a time (peak RSS up
to about 4.5 GB, LLaVA)."""
import dataclasses
from dataclasses import dataclass

import pytest
import torch

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
    # backpropagation starts above l_e: at the cut depth only the head, at full depth layers 22..31
    assert le["full_layer"] == 21 and le["train_grad_from"] == 2 and le["estimate"]["train_extra_layers"] == 10
    assert le["setup_memory"]["retained"] > 0 and le["edit_grad_from"] is None
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


# ---- the estimate at the published depth (a pure function of the figures the script writes) ------------
MiB = 2 ** 20
P = 10 * 2 ** 30                  # parameter bytes at full depth
PER_TOKEN, TRAIN_TOKENS, EDIT_TOKENS = 1000.0, 400, 100
ENTRY = {"full_parameter_bytes": P, "num_layers": 2, "full_layers": 32,
         "probe": {"bytes_per_token_per_layer": PER_TOKEN, "train_tokens": TRAIN_TOKENS, "edit_tokens": EDIT_TOKENS}}


@pytest.mark.parametrize("grad_from, layer, full_layer, extra", [
    (1, 1, 21, 10),          # FT-L: backprop from its layer 21 (cut depth: 1 of 2) to the top
    (2, 1, 21, 10),          # LiveEdit training: from l_e + 1 = 22 (cut depth: only the head)
    (0, None, None, 30),     # FT-M: the connector, below every layer
    (1, 1, 31, 0),           # T-Patcher: the top layer at both depths
    (None, 1, 21, 0),        # no backpropagation (LiveEdit's edits, none)
])
def test_layers_that_backpropagate_only_at_full_depth(grad_from, layer, full_layer, extra):
    assert real_size.full_depth_extra_layers(grad_from, 2, 32, layer, full_layer) == extra


def test_eval_at_1000_edits_keeps_the_editors_memory_and_its_edited_state():
    # FT-L: its snapshot of the weight is made with the editor, its float32 master copy at the first
    # edit; both stay while the evaluation runs, whichever transient is larger
    ftl = {"editor": "ft-l", "layer": 1, "full_layer": 21, "setup_memory": {"retained": 90 * MiB},
           "edit_memory": {"above_start": 500 * MiB, "retained": 180 * MiB}, "edit_grad_from": 1,
           "state_bytes": [90 * MiB] * 10, "eval_memory": {"above_start": 2000 * MiB}}
    est = real_size.estimates(ENTRY, ftl, batch_size=8)
    assert est["edit_extra_layers"] == 10 and est["state_growth"] == 0 and est["state_1000"] == 180 * MiB
    edit_transient = 320 * MiB + 10 * PER_TOKEN * EDIT_TOKENS
    assert est["eval_1000"] == P + 90 * MiB + 180 * MiB + max(edit_transient, 2000 * MiB)
    assert "train" not in est
    # the larger transient may be the edit's: its backpropagation through 10 more layers at full depth
    big = dict(ftl, edit_memory={"above_start": 500 * MiB, "retained": 180 * MiB}, eval_memory={"above_start": 0})
    assert real_size.estimates(ENTRY, big, 8)["eval_1000"] == P + 270 * MiB + edit_transient


def test_liveedit_estimate_at_full_depth_and_1000_experts():
    bpe = 163_840                                      # one LLaVA expert in float32
    le = {"editor": "liveedit", "layer": 1, "full_layer": 21, "setup_memory": {"retained": 300 * MiB},
          "trainable_bytes": 100 * MiB, "train_memory": {"above_start": 900 * MiB}, "train_grad_from": 2,
          "edit_memory": {"above_start": 40 * MiB, "retained": 2 * MiB}, "edit_grad_from": None,
          "state_bytes": [bpe * (i + 1) for i in range(10)], "bytes_per_expert": bpe, "repository_capacity": 16,
          "eval_memory": {"above_start": 100 * MiB}}
    est = real_size.estimates(ENTRY, le, batch_size=2)
    act = 600 * MiB + 10 * PER_TOKEN * TRAIN_TOKENS       # measured activations + layers 22..31
    assert est["train_extra_layers"] == 10
    assert est["train"] == P + 300 * MiB + 300 * MiB + act
    assert est["train_bs8"] == P + 300 * MiB + 300 * MiB + 4 * act     # activations scale with the batch
    # 1,000 experts sit in 1,024 slots (storage doubles from 16)
    assert est["state_growth"] == 1024 * bpe - 10 * bpe and est["state_1000"] == 2 * MiB + 1014 * bpe
    assert est["edit_extra_layers"] == 0
    assert est["eval_1000"] == P + 300 * MiB + 2 * MiB + 1014 * bpe + 100 * MiB


def test_state_that_grows_per_edit_is_extrapolated_and_unknown_state_is_said():
    res = {"state_bytes": [1000 * (i + 1) for i in range(10)]}            # 1,000 bytes per edit
    assert real_size.state_growth(res, 1000) == 990 * 1000
    assert real_size.state_growth({"state_bytes": [None] * 10}, 1000) is None


MEMORY_CHILD = """
import json, torch
from scripts import real_size
real_size.return_freed_memory()
MiB = 2 ** 20
mem = real_size.Memory(cuda=False)
mem.start()
kept = torch.ones(64 * MiB, dtype=torch.uint8)           # large: glibc maps it, frees it to the OS
gone = torch.ones(64 * MiB, dtype=torch.uint8)
del gone
print(json.dumps(mem.stop()))
"""


def test_memory_phase_reports_what_it_retained():
    # in a fresh process: the resident set of the test process moves with what earlier tests freed
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-c", MEMORY_CHILD], capture_output=True, text=True, cwd=root,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    assert abs(m["retained"] - 64 * MiB) < 16 * MiB and m["above_start"] >= m["retained"] - 16 * MiB


def test_gradient_reach_finds_where_backpropagation_starts(load_tiny, tmp_path):
    from editors.ft_l import FTLConfig, FTLEditor
    from editors.liveedit import LiveEdit, LiveEditConfig
    from utils.config import load_config
    bb = load_tiny("blip2")                                   # 4 decoder layers
    records = real_size.make_records(2, tmp_path)
    ftl = FTLEditor(bb, FTLConfig(layer=2, steps=2, lr=1e-3, early_stop_loss=0.0, norm_constraint=None))
    with real_size.gradient_reach(bb) as reach:
        ftl.edit(records[0].edit)
    ftl.restore()
    assert reach["from"] == 2                                 # its layer's output, and the layers above
    cfg = dataclasses.replace(load_config(LiveEditConfig, "liveedit", "tiny-blip2"), edit_layer=3)
    le = LiveEdit(bb, cfg)
    with real_size.gradient_reach(bb) as reach:
        le.training_losses(records)
    assert reach["from"] == 4                                 # l_e is the top layer: only the head
    with real_size.gradient_reach(bb) as reach:
        le.edit(records[0].edit)
        with torch.no_grad():
            bb.logits(bb.encode([records[1].edit]))
    assert reach["from"] is None
    assert "run_layer" not in vars(bb.stack) and "head" not in vars(bb.stack)     # the methods are back
