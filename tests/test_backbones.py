import json
import shutil

import pytest
import torch
from PIL import Image

from backbones import IGNORE, load_backbone, resolve_backbone_name
from utils.errors import UserError
from vl_datasets.records import Sample

FAMILIES = ["blip2", "llava", "minigpt4"]


def mixed_samples(images):
    return [Sample("What color is the shape? The answer is:", "red", images[0]),
            Sample("nq question: who rules zorbia?", "Queen Quell", None),
            Sample("a photo of a long prompt with more words in it", "blue circle", images[1])]


@pytest.mark.parametrize("family", FAMILIES)
def test_vision_range_holds_image_embeddings(family, load_tiny, images):
    bb = load_tiny(family)
    samples = mixed_samples(images)
    batch = bb.encode(samples)
    # Placement: the same computation as encode's (the batch's two images through the encoder at
    # once), so the vision range must hold those features exactly.
    pixels = bb.pixel_values([Image.open(s.image).convert("RGB") for s in samples if s.image])
    feats = bb.image_features(pixels)
    for b, i in ((0, 0), (2, 1)):
        s, e = batch.vision_range[b].tolist()
        assert e - s == bb.n_vision_tokens
        assert torch.equal(batch.inputs_embeds[b, s:e], feats[i])
        assert (batch.input_ids[b, s:e] == bb.image_token_id).all()
    # Batch-size invariance is a different computation (another batch shape, other kernels): equal
    # up to float rounding, not bit for bit, on every CPU.
    alone = bb.image_features(bb.pixel_values([Image.open(images[0]).convert("RGB")]))
    torch.testing.assert_close(alone[0], feats[0], rtol=1e-4, atol=1e-5)
    # outside the range there are text embeddings, not image features
    s, e = batch.vision_range[0].tolist()
    text = bb.model.get_input_embeddings()(batch.input_ids[0])
    assert torch.equal(batch.inputs_embeds[0, :s], text[:s]) and torch.equal(batch.inputs_embeds[0, e:], text[e:])
    assert batch.vision_range[1].tolist() == [0, 0]


@pytest.mark.parametrize("family", FAMILIES)
def test_labels_cover_exactly_the_target(family, load_tiny, images):
    bb = load_tiny(family)
    samples = mixed_samples(images)
    batch = bb.encode(samples)
    for b, s in enumerate(samples):
        start, end = batch.target_range[b].tolist()
        mask = batch.labels[b] != IGNORE
        assert mask.nonzero().flatten().tolist() == list(range(start, end))
        assert torch.equal(batch.labels[b][mask], batch.input_ids[b, start:end])
        # Leading-space rule: the target follows the prompt after one space; when the templated prompt
        # already ends in whitespace (MiniGPT-4) no second space is added and that space is carried
        # by the first target token, exactly as the model generates it.
        assert bb.tokenizer.decode(batch.labels[b][mask]) == " " + s.target
        templated = bb.prompt_text(s.prompt, s.image is not None)
        decoded = bb.tokenizer.decode(batch.input_ids[b, batch.prompt_range[b, 0]:end], skip_special_tokens=True)
        assert (templated.rstrip() + " " + s.target).endswith(decoded)
        assert "  " not in decoded
        assert batch.prompt_range[b, 1] == start


@pytest.mark.parametrize("family", FAMILIES)
def test_layerwise_run_matches_hf_forward_and_resumes_from_any_layer(family, load_tiny, images):
    bb = load_tiny(family)
    samples = mixed_samples(images)
    with torch.no_grad():
        for b, s in enumerate(samples):
            one = bb.encode([s])
            full = bb.logits(one)
            kwargs = dict(input_ids=one.input_ids, attention_mask=one.attention_mask)
            if s.image:
                kwargs["pixel_values"] = bb.pixel_values([Image.open(s.image).convert("RGB")])
            # BLIP-2's own forward needs an image; a text-only input goes straight to its LLM
            model = bb.model if s.image or bb.family == "llava" else bb.model.language_model
            ref = model(**kwargs).logits
            torch.testing.assert_close(full, ref, rtol=1e-4, atol=1e-4)
        batch = bb.encode(samples)
        full = bb.logits(batch)
        for i in range(bb.num_layers):
            hidden = bb.hidden_at(batch, i)
            torch.testing.assert_close(bb.logits_from(hidden, batch, i), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_padded_batch_equals_one_at_a_time(family, load_tiny, images):
    bb = load_tiny(family)
    samples = mixed_samples(images)
    with torch.no_grad():
        batch = bb.encode(samples)
        assert len(set(batch.lengths.tolist())) > 1  # the batch really is padded
        logits = bb.logits(batch)
        for b, s in enumerate(samples):
            one = bb.logits(bb.encode([s]))[0]
            n = int(batch.lengths[b])
            torch.testing.assert_close(logits[b, :n], one, rtol=1e-4, atol=1e-5)
            assert torch.equal(logits[b, :n].argmax(-1), one.argmax(-1))   # the decisions scores are made of


@pytest.mark.parametrize("family", FAMILIES)
def test_text_only_input_and_generation(family, load_tiny):
    bb = load_tiny(family)
    s = Sample("nq question: who rules zorbia?", "Queen Quell", None)
    batch = bb.encode([s])
    assert not batch.has_image.any()
    assert not (batch.input_ids == bb.image_token_id).any()
    with torch.no_grad():
        logits = bb.logits(batch)
    assert torch.isfinite(logits).all()
    gen = bb.generate([s, s], max_new_tokens=3)
    assert len(gen) == 2 and gen[0] == gen[1] and 1 <= len(gen[0]) <= 3
    # greedy decoding agrees with teacher-forced argmax on its own output
    first = logits[0, int(batch.target_range[0, 0]) - 1].argmax().item()
    assert gen[0][0] == first


@pytest.mark.parametrize("family", FAMILIES)
def test_no_hook_left_on_model(family, load_tiny, images):
    bb = load_tiny(family)
    samples = mixed_samples(images)
    edits = {1: lambda h, batch: h + 1.0}
    bb.logits(bb.encode(samples))  # transformers installs its own hooks lazily on a first call
    before = hook_handles(bb.model)
    with torch.no_grad():
        batch = bb.encode(samples)
        plain = bb.logits(batch)
        edited = bb.logits(batch, layer_edits=edits)
        bb.generate(samples, 2, layer_edits=edits)
        bb.logits_from(bb.hidden_at(batch, 1), batch, 1)
    assert not torch.allclose(plain, edited)  # the layer edit was applied ...
    torch.testing.assert_close(bb.logits(batch), plain)  # ... and left nothing behind
    assert hook_handles(bb.model) == before  # transformers' own output-capturing hooks only


def hook_handles(model):
    return {(name, kind, key) for name, m in model.named_modules()
            for kind in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks")
            for key in getattr(m, kind)}


def test_aliases_and_unknown_names(tiny_dirs):
    assert resolve_backbone_name("blip2") == "blip2-opt-2.7b"
    assert resolve_backbone_name("llava") == "llava-v1.5-7b"
    assert resolve_backbone_name("minigpt4") == "minigpt-4-vicuna-7b"
    with pytest.raises(UserError, match="unknown backbone 'gpt5'.*blip2"):
        resolve_backbone_name("gpt5")
    with pytest.raises(UserError, match="no model at"):
        load_backbone("blip2", model_path="/nonexistent/blip2")
    bb = load_backbone("tiny-llava", model_path=tiny_dirs["llava"])
    assert bb.family == "llava" and bb.num_layers == 4


def test_old_blip2_processor_without_num_query_tokens_still_loads(tiny_dirs, tmp_path, images):
    old = tmp_path / "old-blip2"
    shutil.copytree(tiny_dirs["blip2"], old)
    for f in old.glob("*.json"):
        cfg = json.loads(f.read_text())
        if isinstance(cfg, dict) and "num_query_tokens" in cfg and "model_type" not in cfg:
            del cfg["num_query_tokens"]
            f.write_text(json.dumps(cfg))
        elif isinstance(cfg, dict) and isinstance(cfg.get("processor"), dict):
            cfg["processor"].pop("num_query_tokens", None)
            f.write_text(json.dumps(cfg))
    bb = load_backbone("tiny-blip2", model_path=old)
    assert bb.processor.num_query_tokens == 4
    out = bb.processor(images=Image.open(images[0]), text="hi")
    assert out["input_ids"][0].count(bb.image_token_id) == 4
