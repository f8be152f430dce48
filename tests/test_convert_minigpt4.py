"""scripts/convert_minigpt4.py: a fake original MiniGPT-4 release (LAVIS BLIP-2 .pth, MiniGPT-4 .pth
with llama_proj, a Vicuna folder) is written from a tiny random model in the original key layout;
the converted folder must load through the project's backbone loader and give identical logits."""
import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer
from transformers import Blip2ForConditionalGeneration, PreTrainedTokenizerFast

import scripts.convert_minigpt4 as convert
from backbones import load_backbone
from backbones.tiny import IMAGE_TOKEN, TinySize, build_tiny_model, save_tiny, train_tokenizer
from vl_datasets.records import Sample

ROOT = Path(__file__).resolve().parent.parent

CORPUS = ["###Human: <Img></Img> What color is the shape? ###Assistant: red",
          "describe the image: a blue circle on a green background", "What shape is it? The answer is: circle"] * 20
SIZE = TinySize(hidden=64, layers=2, heads=4, vision_layers=2, qformer_layers=3, num_query_tokens=4,
                image_size=32, patch_size=8, qformer_cross_every=2)   # as in the real release
# Distinct widths and head counts for the three parts, so that a confused dimension or head count
# cannot go unnoticed (the tiny builder uses one width for all).
VISION = dict(hidden_size=48, intermediate_size=80, num_attention_heads=6)
QFORMER = dict(hidden_size=32, intermediate_size=72, num_attention_heads=2, encoder_hidden_size=48)
HEAD_FLAGS = ["--vision_heads", "6", "--qformer_heads", "2"]


def build_original(tok):
    """A tiny random MiniGPT-4-shaped Blip2ForConditionalGeneration with a Llama decoder."""
    base = build_tiny_model("minigpt4", tok, SIZE, seed=0)
    config = copy.deepcopy(base.config)
    for k, v in VISION.items():
        setattr(config.vision_config, k, v)
    for k, v in QFORMER.items():
        setattr(config.qformer_config, k, v)
    torch.manual_seed(1)
    model = Blip2ForConditionalGeneration(config).eval()
    model.language_model.load_state_dict(base.language_model.state_dict())
    with torch.no_grad():  # every weight random (LayerNorms around 1), so any misplaced tensor shows
        for name, p in model.named_parameters():
            if name.startswith("language_model."):
                continue
            if ("norm" in name.lower()) and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.05 * torch.randn_like(p))
        for layer in model.vision_model.encoder.layers:  # EVA has no key bias
            w = VISION["hidden_size"]
            layer.self_attn.qkv.bias[w:2 * w] = 0
    return model


def to_original_layout(model):
    """The inverse mapping: (BLIP-2 state dict in LAVIS layout, MiniGPT-4 state dict)."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    w = VISION["hidden_size"]
    blip = {"visual_encoder.cls_token": sd["vision_model.embeddings.class_embedding"],
            "visual_encoder.pos_embed": sd["vision_model.embeddings.position_embedding"],
            "query_tokens": sd["query_tokens"]}
    for p in ("weight", "bias"):
        blip[f"visual_encoder.patch_embed.proj.{p}"] = sd[f"vision_model.embeddings.patch_embedding.{p}"]
        blip[f"ln_vision.{p}"] = sd[f"vision_model.post_layernorm.{p}"]
        blip[f"Qformer.bert.embeddings.LayerNorm.{p}"] = sd[f"qformer.layernorm.{p}"]
    renames = {"layer_norm1.": "norm1.", "layer_norm2.": "norm2.", "self_attn.qkv.weight": "attn.qkv.weight",
               "self_attn.projection.": "attn.proj.", "mlp.fc1.": "mlp.fc1.", "mlp.fc2.": "mlp.fc2."}
    for i in range(SIZE.vision_layers):
        hf, orig = f"vision_model.encoder.layers.{i}.", f"visual_encoder.blocks.{i}."
        for k, v in sd.items():
            for a, b in renames.items():
                if k.startswith(hf + a):
                    blip[orig + b + k[len(hf + a):]] = v
        q, kb, vb = sd[hf + "self_attn.qkv.bias"].split(w)
        assert not kb.any()
        blip[orig + "attn.q_bias"], blip[orig + "attn.v_bias"] = q, vb
    for k, v in sd.items():
        if k.startswith("qformer.encoder.layer."):
            k = ("Qformer.bert." + k[len("qformer."):]).replace(".attention.attention.", ".attention.self.")
            blip[k.replace(".crossattention.attention.", ".crossattention.self.")] = v
    # Unused parts of the real checkpoint: the Q-Former's text branch and BLIP-2's retrieval heads.
    g = torch.Generator().manual_seed(3)
    q = QFORMER["hidden_size"]
    extra = {"Qformer.bert.embeddings.word_embeddings.weight": (50, q),
             "Qformer.bert.embeddings.position_embeddings.weight": (20, q),
             "Qformer.cls.predictions.bias": (50,), "vision_proj.weight": (16, q), "text_proj.weight": (16, q),
             "itm_head.weight": (2, q), "temp": ()}
    for i in range(SIZE.qformer_layers):
        p = f"Qformer.bert.encoder.layer.{i}."
        extra.update({p + "intermediate.dense.weight": (72, q), p + "intermediate.dense.bias": (72,),
                      p + "output.dense.weight": (q, 72), p + "output.dense.bias": (q,),
                      p + "output.LayerNorm.weight": (q,), p + "output.LayerNorm.bias": (q,)})
    blip.update({k: torch.randn(s, generator=g) for k, s in extra.items()})
    blip["Qformer.bert.embeddings.position_ids"] = torch.arange(20)[None]
    mini = {"llama_proj.weight": sd["language_projection.weight"], "llama_proj.bias": sd["language_projection.bias"]}
    return blip, mini


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("minigpt4_release")
    tok = train_tokenizer(CORPUS, vocab_size=320)
    model = build_original(tok)
    blip, mini = to_original_layout(model)
    torch.save({"model": blip, "epoch": 3}, root / "blip2_pretrained.pth")
    torch.save({"model": mini}, root / "pretrained_minigpt4.pth")
    model.language_model.save_pretrained(root / "vicuna")
    tok.save_pretrained(root / "vicuna")
    save_tiny(model, "minigpt4", tok, SIZE, root / "original_hf")  # the reference, loaded the same way
    return dict(root=root, model=model, tok=tok, blip=blip, mini=mini)


def argv(release, out, blip2=None, minigpt4=None, vicuna=None, extra=()):
    r = release["root"]
    return ["--blip2_ckpt", str(blip2 or r / "blip2_pretrained.pth"),
            "--minigpt4_ckpt", str(minigpt4 or r / "pretrained_minigpt4.pth"),
            "--vicuna_dir", str(vicuna or r / "vicuna"), "--out", str(out), "--dtype", "float32",
            *HEAD_FLAGS, *extra]


def samples(images):
    return [Sample("What color is the shape?", "red", images[0]),
            Sample("describe the image", "a blue circle", images[1])]


def test_converted_release_loads_and_matches_original_logits(release, tmp_path, images, capsys):
    out = tmp_path / "minigpt4-hf"
    assert convert.main(argv(release, out)) == out.resolve()
    assert "minigpt-4-vicuna-7b" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["minigpt4-hf"]  # no temporary folder left

    bb = load_backbone("tiny-minigpt4", model_path=out)
    ref = load_backbone("tiny-minigpt4", model_path=release["root"] / "original_hf")
    cfg = bb.model.config
    assert (cfg.vision_config.hidden_size, cfg.vision_config.intermediate_size, cfg.vision_config.num_hidden_layers,
            cfg.vision_config.patch_size, cfg.vision_config.image_size) == (48, 80, 2, 8, 32)
    assert (cfg.qformer_config.hidden_size, cfg.qformer_config.intermediate_size,
            cfg.qformer_config.num_hidden_layers, cfg.qformer_config.encoder_hidden_size) == (32, 72, 3, 48)
    assert cfg.num_query_tokens == SIZE.num_query_tokens and bb.n_vision_tokens == SIZE.num_query_tokens
    assert cfg.image_token_id == release["tok"].convert_tokens_to_ids(IMAGE_TOKEN)
    assert not hasattr(bb.tokenizer, "image_token")
    got, want = bb.model.state_dict(), release["model"].state_dict()
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k

    with torch.no_grad():
        batch, ref_batch = bb.encode(samples(images)), ref.encode(samples(images))
        assert torch.equal(batch.input_ids, ref_batch.input_ids)
        logits = bb.logits(batch)
        assert torch.equal(logits, ref.logits(ref_batch))
        pv = bb.pixel_values([Image.open(images[0]).convert("RGB")])
        hf = bb.model(input_ids=batch.input_ids[:1], attention_mask=batch.attention_mask[:1], pixel_values=pv).logits
        hf_ref = release["model"](input_ids=batch.input_ids[:1], attention_mask=batch.attention_mask[:1],
                                  pixel_values=pv).logits
        torch.testing.assert_close(hf, hf_ref, rtol=0, atol=1e-6)
        # the image really reaches the logits (so a wrong vision mapping could not pass unseen)
        other = bb.encode([Sample("What color is the shape?", "red", images[2])])
        assert not torch.allclose(bb.logits(other)[0], logits[0, :other.input_ids.shape[1]], atol=1e-4)

    # an existing output folder is not replaced without --overwrite
    with pytest.raises(SystemExit) as e:
        convert.main(argv(release, out))
    assert e.value.code == 2 and "--overwrite" in capsys.readouterr().err


def run_failing(args, capsys):
    with pytest.raises(SystemExit) as e:
        convert.main(args)
    lines = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    assert e.value.code == 2
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def _mutated(release, tmp_path, part, drop=None, reshape=None):
    sds = {"blip": dict(release["blip"]), "mini": dict(release["mini"])}
    sd = sds[part]
    if drop:
        del sd[drop]
    if reshape:
        sd[reshape] = sd[reshape].t().contiguous() if sd[reshape].ndim == 2 else sd[reshape][:-1].clone()
    paths = {"blip2": tmp_path / "blip2.pth", "minigpt4": tmp_path / "minigpt4.pth"}
    torch.save({"model": sds["blip"]}, paths["blip2"])
    torch.save({"model": sds["mini"]}, paths["minigpt4"])
    return paths


@pytest.mark.parametrize("part,key", [
    ("blip", "visual_encoder.blocks.1.attn.v_bias"),
    ("blip", "Qformer.bert.encoder.layer.2.crossattention.self.value.bias"),
    ("blip", "Qformer.bert.embeddings.LayerNorm.weight"),
    ("mini", "llama_proj.bias"),
])
def test_missing_key_exits_2_naming_it(release, tmp_path, capsys, part, key):
    paths = _mutated(release, tmp_path, part, drop=key)
    out = tmp_path / "out"
    err = run_failing(argv(release, out, **paths), capsys)
    assert repr(key) in err and "missing" in err
    assert str(paths["blip2" if part == "blip" else "minigpt4"]) in err
    assert not out.exists()


@pytest.mark.parametrize("part,key,found,expected", [
    ("blip", "Qformer.bert.encoder.layer.2.crossattention.self.key.weight", "(48, 32)", "(32, 48)"),
    ("blip", "visual_encoder.blocks.0.attn.q_bias", "(47,)", "(48,)"),
    ("blip", "visual_encoder.blocks.1.mlp.fc2.weight", "(80, 48)", "(48, 80)"),
    ("mini", "llama_proj.weight", "(32, 64)", "(64, 32)"),
])
def test_misshaped_key_exits_2_naming_it(release, tmp_path, capsys, part, key, found, expected):
    paths = _mutated(release, tmp_path, part, reshape=key)
    out = tmp_path / "out"
    err = run_failing(argv(release, out, **paths), capsys)
    assert repr(key) in err and f"shape {found}, expected {expected}" in err
    assert not out.exists()


def test_wrong_cross_attention_frequency_is_reported(release, tmp_path, capsys):
    err = run_failing(argv(release, tmp_path / "out", extra=["--cross_attention_frequency", "1"]), capsys)
    assert "'Qformer.bert.encoder.layer.1.crossattention.self.query.weight'" in err
    err = run_failing(argv(release, tmp_path / "out", extra=["--cross_attention_frequency", "3"]), capsys)
    assert "unexpected key 'Qformer.bert.encoder.layer.2.crossattention." in err


def test_missing_files_exit_2_naming_them(release, tmp_path, capsys):
    missing = tmp_path / "no_such_minigpt4.pth"
    err = run_failing(argv(release, tmp_path / "out", minigpt4=missing), capsys)
    assert str(missing) in err and "not found" in err
    err = run_failing(argv(release, tmp_path / "out", vicuna=tmp_path / "no_vicuna"), capsys)
    assert str(tmp_path / "no_vicuna") in err
    # the script itself, as a user runs it
    missing = tmp_path / "no_such_blip2.pth"
    proc = subprocess.run([sys.executable, "-m", "scripts.convert_minigpt4", *argv(release, tmp_path / "out", blip2=missing)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: BLIP-2 checkpoint not found: {missing}"]
    assert not (tmp_path / "out").exists()


def test_image_token_added_when_vicuna_lacks_it(release, tmp_path, images):
    """A Vicuna tokenizer without <image>: it is appended, the embeddings grow by one mean row."""
    data = json.loads(release["tok"].backend_tokenizer.to_str())
    renamed = Tokenizer.from_str(json.dumps(data).replace('"<image>"', '"<imgx>"'))
    tok = PreTrainedTokenizerFast(tokenizer_object=renamed, pad_token="<pad>", bos_token="<s>",
                                  eos_token="</s>", unk_token="<unk>")
    assert IMAGE_TOKEN not in tok.get_vocab()
    vicuna = tmp_path / "vicuna"
    release["model"].language_model.save_pretrained(vicuna)
    tok.save_pretrained(vicuna)
    out = tmp_path / "hf"
    convert.main(argv(release, out, vicuna=vicuna))

    bb = load_backbone("tiny-minigpt4", model_path=out)
    V = len(tok)
    assert bb.image_token_id == V == bb.model.config.image_token_id
    assert bb.model.config.text_config.vocab_size == V + 1
    assert not hasattr(bb.tokenizer, "image_token")
    orig = release["model"].language_model
    for new, old in ((bb.model.get_input_embeddings().weight, orig.get_input_embeddings().weight),
                     (bb.model.get_output_embeddings().weight, orig.get_output_embeddings().weight)):
        assert new.shape[0] == V + 1
        assert torch.equal(new[:V], old)
        torch.testing.assert_close(new[V], old.mean(0))
    with torch.no_grad():
        batch = bb.encode(samples(images))
        got = bb.model.language_model(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask).logits
        want = orig(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask).logits
        torch.testing.assert_close(got[..., :V], want, rtol=0, atol=1e-6)


def test_image_size_override_interpolates_position_embeddings(release, tmp_path, images):
    pos = release["blip"]["visual_encoder.pos_embed"]
    torch.testing.assert_close(convert.interpolate_pos_embed(pos, 4), pos)  # same grid: unchanged
    out = tmp_path / "hf48"
    convert.main(argv(release, out, extra=["--image_size", "48"]))
    bb = load_backbone("tiny-minigpt4", model_path=out)
    assert bb.model.config.vision_config.image_size == 48
    new_pos = bb.model.vision_model.embeddings.position_embedding
    assert new_pos.shape == (1, 1 + 6 * 6, VISION["hidden_size"])
    assert torch.equal(new_pos[:, 0], pos[:, 0])
    # LAVIS' interpolate_pos_embed: the 4x4 patch grid resized to 6x6 bicubically (align_corners=False)
    d = VISION["hidden_size"]
    grid = pos[:, 1:].reshape(1, 4, 4, d).permute(0, 3, 1, 2)
    want = torch.nn.functional.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False)
    torch.testing.assert_close(new_pos[:, 1:], want.permute(0, 2, 3, 1).reshape(1, 36, d))
    assert bb.pixel_values([Image.open(images[0]).convert("RGB")]).shape[-2:] == (48, 48)
    with torch.no_grad():
        assert torch.isfinite(bb.logits(bb.encode(samples(images)))).all()
