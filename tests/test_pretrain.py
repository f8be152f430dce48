"""The tiny-backbone pretrainer: a quick reduced pretrain learns above chance, and the saved
backbone reloads through the path map with the same logits as the trained model."""
import json

import pytest
import torch
from safetensors.torch import load_file

from backbones import load_backbone
from backbones.tiny import TinySize
from synthetic import pretrain
from synthetic.pretrain import (ImageCache, PretrainConfig, _batch, encode_frozen, features_from_encoded,
                                heldout_accuracy, pretrain_loss, pretrain_tiny, tokenizer_texts)
from synthetic.world import ensure_world, load_pretrain
from utils.errors import UserError
from utils.losses import IGNORE, masked_nll
from vl_datasets.records import Sample, open_image


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    return ensure_world(tmp_path_factory.mktemp("world"), seed=3, n_train=40, n_eval=20, n_loc=20,
                        pretrain_renders=2, extra_entities=300, n_heldout_renders=40, progress=False)


def test_quick_pretrain_learns_and_reloads_through_the_path_map(small_world, tmp_path, monkeypatch):
    import utils.GLOBAL as G
    size = TinySize(hidden=64, layers=2, heads=4, vision_layers=2, qformer_layers=1, num_query_tokens=4)
    cfg = lambda steps: PretrainConfig(steps=steps, batch_size=24, lr=3e-3, warmup=10, vocab_size=512, size=size)
    untrained = pretrain_tiny("tiny-blip2", tmp_path / "untrained", small_world, cfg(0), progress=False)
    out = tmp_path / "tiny-blip2"
    report = pretrain_tiny("tiny-blip2", out, small_world, cfg(200), progress=False)
    acc, acc0 = report["heldout_token_accuracy"], untrained["heldout_token_accuracy"]
    # A quick pretrain at reduced size learns far above the untrained model (chance level) on
    # held-out renders and paraphrases of captions and entity questions. Reading colours from pixels
    # (VQA) takes the full-size pretraining: its figures are in the README.
    for kind in ("caption", "vlkeb"):
        assert acc[kind] > acc0[kind] + 20, (kind, acc, acc0)
    assert (out / "pretrain_report.json").is_file() and not (tmp_path / ".tiny-blip2.tmp").exists()
    # BLIP-2 recipe: the ViT stays at its (shared, seeded) random init; the Q-Former learns
    before, after = (load_file(str(d / "model.safetensors")) for d in (tmp_path / "untrained", out))
    vit = [k for k in before if "vision_model." in k]
    qformer = [k for k in before if "qformer." in k and k.endswith("weight")]
    assert vit and all(torch.equal(before[k], after[k]) for k in vit)
    assert any(not torch.equal(before[k], after[k]) for k in qformer)

    monkeypatch.setitem(G.model_path_map, "tiny-blip2", str(out))
    monkeypatch.setattr(pretrain, "SYNTHETIC_DIR", small_world)  # the world it learned is the default
    a, b = load_backbone("tiny-blip2"), load_backbone("tiny-blip2")
    held = load_pretrain(small_world, "heldout")[:48]
    cache = ImageCache(a, small_world, held)
    batch_a, batch_b = _batch(a, small_world, held, cache), _batch(b, small_world, held, cache)
    with torch.no_grad():
        assert torch.equal(a.logits(batch_a), b.logits(batch_b))
    # the reloaded weights are the trained ones: same held-out accuracy as measured in training
    full = load_pretrain(small_world, "heldout")
    assert heldout_accuracy(a, small_world, full, ImageCache(a, small_world, full)) == acc


def test_backbone_of_another_world_is_rebuilt(small_world, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(pretrain, "SYNTHETIC_DIR", small_world)
    monkeypatch.setattr(pretrain, "pretrain_tiny", lambda name, path, **kw: calls.append(name) or {
        "heldout_token_accuracy": {}})
    path = tmp_path / "tiny-llava"
    pretrain.ensure_tiny_backbone("tiny-llava", path, progress=False)
    assert calls == ["tiny-llava"]  # not built yet
    path.mkdir()
    (path / "config.json").write_text("{}")
    report = {"built_from": pretrain.build_identity(small_world)}
    (path / "pretrain_report.json").write_text(json.dumps(report))
    pretrain.ensure_tiny_backbone("tiny-llava", path, progress=False)
    assert calls == ["tiny-llava"]  # built on the current world: kept
    report["built_from"]["pretrain_corpus_sha256"] = "0" * 16
    (path / "pretrain_report.json").write_text(json.dumps(report))
    pretrain.ensure_tiny_backbone("tiny-llava", path, progress=False)
    assert calls == ["tiny-llava"] * 2  # learned another world: rebuilt
    report["built_from"] = {**pretrain.build_identity(small_world), "recipe": pretrain.RECIPE_VERSION - 1}
    (path / "pretrain_report.json").write_text(json.dumps(report))
    pretrain.ensure_tiny_backbone("tiny-llava", path, progress=False)
    assert calls == ["tiny-llava"] * 3  # built by an older recipe: rebuilt
    from dataclasses import asdict
    report = {"built_from": pretrain.build_identity(small_world), "config": asdict(pretrain.default_config("tiny-llava"))}
    (path / "pretrain_report.json").write_text(json.dumps(report))
    pretrain.ensure_tiny_backbone("tiny-llava", path, progress=False)
    assert calls == ["tiny-llava"] * 3  # the default config: kept
    report["config"]["seed"] += 1
    (path / "pretrain_report.json").write_text(json.dumps(report))
    pretrain.ensure_tiny_backbone("tiny-llava", path, progress=False)
    assert calls == ["tiny-llava"] * 4  # the default config changed since: rebuilt
    report["config"]["seed"] -= 1
    del report["config"]["threads"]     # built before builds pinned their threads: weights unknown
    (path / "pretrain_report.json").write_text(json.dumps(report))
    pretrain.ensure_tiny_backbone("tiny-llava", path, progress=False)
    assert calls == ["tiny-llava"] * 5


def test_non_default_build_needs_its_own_folder(capsys):
    # the default folder holds the default build; another one there would be replaced on first use
    with pytest.raises(SystemExit) as e:
        pretrain.main(["--backbone", "tiny-blip2", "--seed", "0"])
    assert e.value.code == 2
    assert "goes to --out FOLDER" in capsys.readouterr().err


def test_build_runs_on_its_own_thread_count(small_world, tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(pretrain, "_pretrain_into", lambda *a: seen.append(torch.get_num_threads()) or {})
    before = torch.get_num_threads()
    pretrain_tiny("tiny-blip2", tmp_path / "b", small_world, PretrainConfig(threads=3), progress=False)
    assert seen == [3] and torch.get_num_threads() == before


def test_unknown_tiny_backbone(tmp_path):
    with pytest.raises(UserError, match="unknown tiny backbone 'tiny-gpt'"):
        pretrain_tiny("tiny-gpt", tmp_path / "x")


@pytest.mark.parametrize("family", ["blip2", "llava"])
def test_prompt_lm_labels_cover_the_prompt_text_only(load_tiny, images, family):
    bb = load_tiny(family)
    samples = [Sample("What color is the shape? The answer is:", "red", images[0]),
               Sample("nq question: who rules zorbia?", "Queen Quell", None)]
    batch = bb.encode(samples)
    labels = pretrain.prompt_lm_labels(batch)
    for b in range(len(samples)):
        start, end = batch.prompt_range[b].tolist()
        inside = torch.zeros_like(labels[b], dtype=torch.bool)
        inside[start + 1:end] = True
        # the prompt's own tokens (after its first) are labels; vision, answer and padding are not
        assert torch.equal(labels[b][inside], batch.input_ids[b][inside])
        assert bool((labels[b][~inside] == IGNORE).all())
        assert end - start > 3


@pytest.mark.parametrize("family", ["blip2", "llava", "minigpt4"])
def test_cached_encoder_output_and_target_only_loss_are_the_full_path(family, load_tiny, images):
    """Pretraining's two shortcuts compute what the wrapper's own path computes: image features from
    the cached frozen-encoder output, and the loss with the head run only where targets are predicted
    (same value, same gradients)."""
    bb = load_tiny(family)
    model = bb.model
    pixels = bb.pixel_values([open_image(p) for p in images])
    with torch.no_grad():
        encoded = encode_frozen(model, pixels)
    assert torch.allclose(features_from_encoded(model, encoded), bb.image_features(pixels), atol=1e-6)

    samples = [Sample("What color is the shape? The answer is:", "red", images[0]),
               Sample("nq question: who rules zorbia?", "Queen Quell", None),
               Sample("a photo of a long prompt with more words in it", "blue circle", images[1])]
    rows = [bb.tokenize(s.prompt, s.image is not None, s.target) for s in samples]
    cached = bb.collate(samples, rows, image_features=features_from_encoded(model, encoded[[0, 1]]))
    full = bb.encode(samples)
    assert torch.allclose(cached.inputs_embeds, full.inputs_embeds, atol=1e-6)
    params = [p for p in model.parameters() if p.is_floating_point()]
    try:
        for p in params:
            p.requires_grad_(True)
        for w in (0.0, 0.5):   # answers only, and with the next-token loss on the prompt text
            fast = pretrain_loss(bb, full, w)
            g_fast = torch.autograd.grad(fast, params, allow_unused=True)
            logits = bb.logits(full)
            ref = masked_nll(logits, full.labels, per_sample=True).mean()
            if w:
                ref = ref + w * masked_nll(logits, pretrain.prompt_lm_labels(full))
            g_ref = torch.autograd.grad(ref, params, allow_unused=True)
            assert torch.allclose(fast, ref, atol=1e-6)
            for a, b in zip(g_fast, g_ref):
                assert (a is None) == (b is None) and (a is None or torch.allclose(a, b, atol=1e-6))
    finally:
        for p in params:
            p.requires_grad_(False)


@pytest.mark.parametrize("family", ["blip2", "minigpt4"])
def test_cached_encoder_path_under_a_half_precision_model_with_a_float32_qformer(family, load_tiny, images):
    """A bfloat16 BLIP-2 / MiniGPT-4 keeps its Q-Former in float32 (``_keep_in_fp32_modules``, as
    ``from_pretrained`` loads it): the cached path (FT-M's edits) gives get_image_features' result."""
    import copy
    model = copy.deepcopy(load_tiny(family).model).to(torch.bfloat16)
    model.qformer.float()
    model.query_tokens.data = model.query_tokens.data.float()
    pixels = load_tiny(family).pixel_values([open_image(p) for p in images]).to(torch.bfloat16)
    with torch.no_grad():
        got = features_from_encoded(model, encode_frozen(model, pixels))
        want = model.get_image_features(pixel_values=pixels, return_dict=True).pooler_output
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)


def test_tokenizer_learns_the_prompt_template(small_world):
    """The Llama families' templates are in the tokenizer's training texts, so they are whole words."""
    from backbones.tiny import train_tokenizer
    assert tokenizer_texts("tiny-blip2", small_world) == pretrain.text_corpus(small_world)
    tok = train_tokenizer(tokenizer_texts("tiny-llava", small_world), 512)
    assert tok.tokenize("USER: ASSISTANT:") == ["USER", ":", "ĠASSISTANT", ":"]
    tok = train_tokenizer(tokenizer_texts("tiny-minigpt4", small_world), 512)
    assert tok.tokenize("###Human: <Img><image></Img> ###Assistant:") == [
        "###", "Human", ":", "Ġ<", "Img", ">", "<image>", "</", "Img", ">", "Ġ###", "Assistant", ":"]
