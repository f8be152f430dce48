"""Fast evaluation: the image-feature cache, grouped edits and verified generations change the
speed of an evaluation, never its results."""
import json
import time

import pytest
import torch
from PIL import Image

from evaluation.cli import main
from evaluation.protocol import apply_edits
from fixtures import write_evqa


def uncached(bb, paths):
    with torch.no_grad():
        return bb.image_features(bb.pixel_values([Image.open(p).convert("RGB") for p in paths]))


@pytest.mark.parametrize("family", ["blip2", "llava"])
def test_cached_features_are_the_fresh_ones_until_the_vision_side_changes(family, load_tiny, images):
    bb = load_tiny(family)
    cache = bb.image_cache
    cache.clear()
    paths = [images[0], images[1], images[0]]
    with torch.inference_mode():
        first = bb.images_features(paths)
        hits, misses = cache.hits, cache.misses
        again = bb.images_features(paths[::-1])
    assert cache.hits - hits == 3 and cache.misses == misses              # all three from the cache
    assert torch.equal(again, first.flip(0))
    torch.testing.assert_close(first, uncached(bb, paths), rtol=1e-5, atol=1e-6)
    assert not any(t.is_inference() for t in cache.entries.values())   # usable by edits outside inference mode
    with torch.no_grad():
        torch.testing.assert_close(bb.images_features(paths), first, rtol=0, atol=0)

    with torch.enable_grad():                                            # autograd on: never cached
        misses = cache.misses
        bb.images_features(paths)
        assert cache.misses == misses

    weight = bb.connector_parameters()[-1]
    with torch.no_grad():
        weight.add_(0.5)                                                 # an editor changing the connector
    try:
        with torch.inference_mode():
            changed = bb.images_features(paths)
        assert not torch.allclose(changed, first)
        torch.testing.assert_close(changed, uncached(bb, paths), rtol=1e-5, atol=1e-6)
    finally:
        with torch.no_grad():
            weight.sub_(0.5)
    with torch.inference_mode():
        torch.testing.assert_close(bb.images_features(paths), first, rtol=1e-5, atol=1e-6)


def test_cache_keeps_its_budget_and_sees_rewritten_files(load_tiny, images, tmp_path):
    bb = load_tiny("blip2")
    cache = bb.image_cache
    old_budget = cache.max_bytes
    try:
        cache.clear()
        with torch.inference_mode():
            one = bb.images_features(images[:1])
        cache.max_bytes = 2 * one.numel() * one.element_size()
        cache.clear()
        with torch.inference_mode():
            bb.images_features(images[:3])
        assert len(cache.entries) == 2 and cache.bytes <= cache.max_bytes
        assert [k[0] for k in cache.entries] == images[1:3]              # the least recently used left

        cache.max_bytes = old_budget
        path = tmp_path / "x.png"
        Image.open(images[0]).save(path)
        with torch.inference_mode():
            a = bb.images_features([str(path)])
        time.sleep(0.01)
        Image.open(images[2]).save(path)                                 # same path, another picture
        with torch.inference_mode():
            b = bb.images_features([str(path)])
        torch.testing.assert_close(b, uncached(bb, [images[2]]), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(a, b)

        cache.max_bytes = 0                                              # off: nothing stored
        cache.clear()
        with torch.inference_mode():
            bb.images_features(images[:2])
        assert not cache.entries
    finally:
        cache.max_bytes = old_budget
        cache.clear()


class Recorder:
    def __init__(self, batched: bool):
        self.calls = []
        if batched:
            self.edit_batch = lambda group: self.calls.append(list(group))

    def edit(self, request):
        self.calls.append([request])


def test_edits_go_in_groups_only_to_editors_that_take_them():
    batched = Recorder(batched=True)
    times = apply_edits(batched, list("abcde"), edit_batch=2)
    assert batched.calls == [["a", "b"], ["c", "d"], ["e"]] and len(times) == 5
    assert times[0] == times[1] and all(t >= 0 for t in times)        # a group's time, shared
    single = Recorder(batched=False)
    apply_edits(single, list("abc"), edit_batch=2)
    assert single.calls == [["a"], ["b"], ["c"]]


def strip(obj):
    if isinstance(obj, dict):
        return {k: strip(v) for k, v in obj.items() if k not in ("edit_time", "edit_times", "s_per_edit", "edit_batch")}
    if isinstance(obj, list):
        return [strip(v) for v in obj]
    return obj


@pytest.mark.parametrize("editor", ["none", "ft-m"])
def test_fast_and_reference_evaluations_agree(editor, tiny_dirs, tmp_path):
    """The default evaluation (cached image features, verified generations) and the reference one
    (every image encoded at each use, every sample decoded step by step) write the same results; FT-M
    changes the connector at every edit, so its cached features must follow."""
    data = write_evqa(tmp_path / "data", n=6)
    common = ["-en", editor, "-mn", "tiny-blip2", "--model_path", str(tiny_dirs["blip2"]), "-dn", "EVQA",
              "--data_dir", str(data), "--eval_at", "1,3", "--eval_batch_size", "4"]
    fast = main(common + ["--records_dir", str(tmp_path / "fast")])
    ref = main(common + ["--records_dir", str(tmp_path / "ref"), "--decode_all", "--image_cache_mb", "0"])
    load = lambda out: strip(json.loads((out["run_dir"] / "results.json").read_text()))
    got, want = load(fast), load(ref)
    assert got == want
    if editor == "ft-m":   # the edits did move the model: the comparison is not between two no-ops
        moved = [s["tf_after"] != s["tf_before"] for r in got["points"][-1]["records"] for s in r["samples"].values()]
        assert any(moved)


@pytest.mark.parametrize("family", ["blip2", "llava"])
def test_cached_decoding_equals_full_forwards(family, load_tiny, images):
    """The key/value-cache path of generate (prompt once, then one token at a time, right-padded
    batch of mixed lengths, text-only and image samples) gives the tokens of a full forward per
    step, on the unedited model and after FT-L changed a weight (its decoding edits are empty)."""
    from editors.ft_l import FTLConfig, FTLEditor
    from vl_datasets.records import Sample
    bb = load_tiny(family)
    samples = [Sample("What color is the shape? The answer is:", "red", images[0]),
               Sample("nq question: who wrote the letter?", "Anna", None),
               Sample("Describe it.", "a blue square", images[2]),
               Sample("What is shown in this rather long picture question, please?", "cat", images[1])]
    with torch.no_grad():
        assert bb.generate(samples, 5, decoding_edits={}) == bb.generate(samples, 5)
    ed = FTLEditor(bb, FTLConfig(layer=1, steps=5, lr=3e-2, early_stop_loss=0.0, norm_constraint=None))
    before = None
    try:
        with torch.no_grad():
            before = bb.generate(samples, 5)
        ed.edit(samples[0])
        assert ed.decoding_edits() == {}
        with torch.no_grad():
            full = bb.generate(samples, 5)
            assert ed.generate(samples, 5) == full
        assert full != before
    finally:
        ed.restore()
