"""LiveEdit (editors/liveedit): exactness of the unedited paths, batched routing, the growing expert
repository, persistence across processes, and that a short training makes routing work."""
import json
import os
import random
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from editors import EDITORS
from editors.liveedit import ExpertRepository, LiveEdit, LiveEditConfig, LiveEditLossWeights, LiveEditTrain
from editors.liveedit.editor import span_masks
from editors.liveedit.modules import similarity
from utils.config import load_config
from utils.errors import UserError
from utils.losses import masked_nll
from vl_datasets.records import EditRecord, Sample

ROOT = Path(__file__).resolve().parent.parent
FAMILIES = ["blip2", "llava", "minigpt4"]
LAYER = 2                       # the conftest tiny models have 4 decoder layers
QUESTION = "What color is the shape? The answer is:"


def make_config(**over) -> LiveEditConfig:
    kw = dict(edit_layer=LAYER, d_m=32, heads=4, rank=4, n_queries=4, scale=5.0,
              train=LiveEditTrain(lr=3e-3, lr_cut_step=None))
    kw.update(over)
    return LiveEditConfig(**kw)


def last_linear(attn):
    """The layer that makes a cross-attention's output: its output projection, or without one (the
    default) its value projection."""
    return attn.out if isinstance(attn.out, torch.nn.Linear) else attn.v


def randomize_experts(ed: LiveEdit, seed: int = 0) -> None:
    """Make the experts large, so that routed experts visibly change the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        last_linear(ed.net.gen_v.attn).weight.normal_(0.0, 1.0, generator=g)
        last_linear(ed.net.gen_v.attn).bias.normal_(0.0, 1.0, generator=g)


def force_routing(ed: LiveEdit, keep: bool) -> None:
    """Make hard filtering keep every expert (or none) for every image input: all visual features
    become constant vectors, phi_bar = phi_S = c and phi_hat = 2c (keep) or 0 (none)."""
    with torch.no_grad():
        for ext, value in ((ed.net.input_extractor, 1.0), (ed.net.edit_extractor, 2.0 if keep else 0.0)):
            last_linear(ext.attn_vision).weight.zero_()
            last_linear(ext.attn_vision).bias.fill_(value)


def queries(images):
    return [Sample(QUESTION, "red", images[0]),
            Sample("nq question: who rules zorbia?", "Queen Quell", None),
            Sample("a photo of a long prompt with more words in it", "blue circle", images[1]),
            Sample("What shape is it? The answer is:", "circle", images[2])]


def requests(images):
    return [Sample(QUESTION, "blue", images[0]), Sample("What shape is it? The answer is:", "red", images[1])]


@torch.no_grad()
def logits_of(ed, samples):
    return ed.logits(ed.backbone.encode(samples))


# ---- config ------------------------------------------------------------------------------------
def test_registered_and_reference_configs_load():
    assert EDITORS.get("liveedit") is LiveEdit
    for name in ("blip2-opt-2.7b", "llava-v1.5-7b", "minigpt-4-vicuna-7b"):
        cfg = load_config(LiveEditConfig, "liveedit", name)
        assert (cfg.edit_layer, cfg.d_m, cfg.heads, cfg.rank, cfg.n_queries, cfg.scale) == (21, 1024, 8, 4, 4, 5.0)
        assert cfg.train.lr == 1e-4 and cfg.train.lr_cut_factor == 10.0
    for name in ("tiny-blip2", "tiny-llava", "tiny-minigpt4"):
        cfg = load_config(LiveEditConfig, "liveedit", name)
        assert cfg.edit_layer < 6 and cfg.d_m % cfg.heads == 0


def test_config_is_strict(tmp_path):
    good = (ROOT / "configs" / "liveedit" / "tiny-blip2.yaml").read_text()
    cases = {"unknown key 'rnak'": good.replace("rank:", "rnak:"),
             "missing key 'd_m'": good.replace("d_m:", "# d_m:"),
             "expected float": re.sub(r"\blr: \S+", "lr: 1e-3", good),  # YAML reads 1e-3 as a string
             "not divisible": re.sub(r"\bheads: \d+", "heads: 3", good)}
    for message, text in cases.items():
        path = tmp_path / "c.yaml"
        path.write_text(text)
        with pytest.raises(UserError, match=message):
            load_config(LiveEditConfig, "liveedit", "tiny-blip2", path)


def test_edit_layer_out_of_range_is_refused(load_tiny):
    with pytest.raises(UserError, match="edit_layer=4 is out of range"):
        LiveEdit(load_tiny("blip2"), make_config(edit_layer=4))


# ---- exactness of the unedited paths -------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_no_expert_and_restore_give_the_unedited_logits(family, load_tiny, images):
    bb = load_tiny(family)
    ed = LiveEdit(bb, make_config())
    randomize_experts(ed)
    force_routing(ed, keep=True)
    samples = queries(images)
    with torch.no_grad():
        plain = bb.logits(bb.encode(samples))
    assert ed.layer_edits() == {}
    assert torch.equal(logits_of(ed, samples), plain)        # empty repository
    for r in requests(images):
        ed.edit(r)
    assert len(ed.repository) == 2 and ed.n_edits == 2
    edited = logits_of(ed, samples)
    assert not torch.equal(edited, plain)                    # the edits do act
    ed.restore()
    assert len(ed.repository) == 0 and ed.n_edits == 0
    assert torch.equal(logits_of(ed, samples), plain)


@pytest.mark.parametrize("family", FAMILIES)
def test_no_kept_expert_leaves_logits_identical(family, load_tiny, images):
    bb = load_tiny(family)
    ed = LiveEdit(bb, make_config())
    randomize_experts(ed)
    force_routing(ed, keep=False)
    for r in requests(images):
        ed.edit(r)
    samples = queries(images)
    batch = bb.encode(samples)
    with torch.no_grad():
        hidden = bb.hidden_at(batch, LAYER)
        _, weights, kept = ed.route(hidden, batch)
        assert not kept.any() and not weights.any()
        assert ed._intervene(hidden, batch) is hidden
        assert torch.equal(ed.logits(batch), bb.logits(batch))


@pytest.mark.parametrize("family", FAMILIES)
def test_text_only_inputs_pass_unchanged(family, load_tiny, images):
    bb = load_tiny(family)
    ed = LiveEdit(bb, make_config())
    randomize_experts(ed)
    force_routing(ed, keep=True)
    for r in requests(images):
        ed.edit(r)
    samples = queries(images)
    batch = bb.encode(samples)
    with torch.no_grad():
        plain, edited = bb.logits(batch), ed.logits(batch)
        text_only = bb.encode([samples[1]])
        assert torch.equal(ed.logits(text_only), bb.logits(text_only))
    assert not batch.has_image[1]
    assert torch.equal(edited[1], plain[1])                   # inside a mixed batch too
    for b in (0, 2, 3):
        assert not torch.equal(edited[b], plain[b])


def test_edit_needs_an_image(load_tiny):
    ed = LiveEdit(load_tiny("blip2"), make_config())
    with pytest.raises(UserError, match="need an image"):
        ed.edit(Sample("nq question: who rules zorbia?", "Queen Quell", None))
    assert len(ed.repository) == 0


# ---- batched routing ---------------------------------------------------------------------------
def check_batched_equals_single(ed, samples, atol=1e-5):
    bb = ed.backbone
    with torch.no_grad():
        batch = bb.encode(samples)
        hidden = bb.hidden_at(batch, LAYER)
        rows, weights, kept = ed.route(hidden, batch)
        assert rows.tolist() == [i for i, s in enumerate(samples) if s.image is not None]
        logits = ed.logits(batch)
        for b, s in enumerate(samples):
            one = bb.encode([s])
            r1, w1, k1 = ed.route(bb.hidden_at(one, LAYER), one)
            if s.image is None:
                assert len(r1) == 0
            else:
                i = rows.tolist().index(b)
                assert torch.equal(k1[0], kept[i])
                torch.testing.assert_close(w1[0], weights[i], rtol=1e-4, atol=atol)
            n = int(batch.lengths[b])
            torch.testing.assert_close(logits[b, :n], ed.logits(one)[0], rtol=1e-4, atol=atol)
    return kept, weights


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_routing_equals_per_sample_routing(family, load_tiny, images):
    ed = LiveEdit(load_tiny(family), make_config(seed=3))
    randomize_experts(ed)
    with torch.no_grad():   # visual features c + noise on the input side, 2c + noise on the edit side
        last_linear(ed.net.input_extractor.attn_vision).bias.fill_(3.0)
        last_linear(ed.net.edit_extractor.attn_vision).bias.fill_(6.0)
    for r in requests(images) + [Sample("a photo of a", "green", images[2])]:
        ed.edit(r)
    kept, weights = check_batched_equals_single(ed, queries(images))
    assert kept.all()                        # (the trained editor checks a mix of kept and filtered)
    assert (weights > 0).all() and len(set(weights.argmax(1).tolist())) > 1 or weights.std(0).max() > 1e-3
    assert (weights.sum(1) <= 1 + 1e-6).all()


# ---- repository --------------------------------------------------------------------------------
def random_experts(n, k=4, d_m=8, r=2, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = lambda *s: torch.randn(n, *s, generator=g)
    return t(k, d_m), t(k, d_m), t(r, d), t(r, d), [{"prompt": f"p{seed}-{i}", "target": "t", "image": None}
                                                    for i in range(n)]


def test_repository_grows_by_doubling_and_keeps_its_contents():
    repo = ExpertRepository(4, 8, 2, 6, initial_capacity=4)
    appended, growths = [], 0
    sizes = [1] * 40 + [3, 7, 1, 16, 33, 1, 100, 2]
    for seed, n in enumerate(sizes):
        cap_before, ptr_before = repo.capacity, repo.tensor("U").untyped_storage().data_ptr()
        chunk = random_experts(n, seed=seed)
        repo.append(*chunk)
        appended.append(chunk)
        cap = repo.capacity
        assert cap >= len(repo) and cap % 4 == 0 and (cap // 4) & (cap // 4 - 1) == 0   # 4 * 2^j
        assert cap < 2 * len(repo) or cap == 4                                           # tight
        if cap == cap_before:                          # no reallocation while there is room
            assert repo.tensor("U").untyped_storage().data_ptr() == ptr_before
        else:
            growths += 1
    total = sum(sizes)
    assert len(repo) == total and repo.capacity == 256 and growths == 6     # 4 -> 256 by doubling
    for i, name in enumerate(("phi", "psi", "U", "V")):
        assert torch.equal(repo.tensor(name), torch.cat([c[i] for c in appended]))
    assert repo.requests == [r for c in appended for r in c[4]]
    with pytest.raises(ValueError, match="shape"):
        repo.append(*random_experts(2, d=5))
    repo.clear()
    assert len(repo) == 0 and repo.capacity == 4 and repo.requests == []


def test_repository_routing_rule():
    """Hard filter against the sentinel, then softmax * sigmoid over the kept experts, per row."""
    repo = ExpertRepository(2, 4, 1, 3)
    phi_hat = torch.tensor([[[1.0, 0, 0, 0]] * 2, [[0, 1.0, 0, 0]] * 2, [[1.0, 1.0, 0, 0]] * 2])
    psi_hat = torch.randn(3, 2, 4, generator=torch.Generator().manual_seed(0))
    repo.append(phi_hat, psi_hat, torch.randn(3, 1, 3), torch.randn(3, 1, 3), [{}] * 3)
    phi = torch.tensor([[[2.0, 0, 0, 0]] * 2, [[0, 0, 3.0, 0]] * 2])
    sentinel = torch.tensor([[[1.5, 0, 0, 0]] * 2, [[0, 0, 1.0, 0]] * 2])
    psi = torch.randn(2, 2, 4, generator=torch.Generator().manual_seed(1))
    weights, kept = repo.route(phi, psi, sentinel)
    # sim = <flat a, flat b> / (k sqrt(d_m)): row 0 has sims 1, 0, 1 against a sentinel sim of 1.5,
    # row 1 sims 0, 0, 0 against 1.5: nothing kept (and weights exactly 0)
    assert not weights.any()
    assert kept.tolist() == [[False, False, False], [False, False, False]]
    sentinel[0] = torch.tensor([[0.5, 0, 0, 0]] * 2)          # sentinel sim 0.5 < 1: experts 0 and 2 kept
    weights, kept = repo.route(phi, psi, sentinel)
    assert kept.tolist() == [[True, False, True], [False, False, False]]
    t = (psi[0].flatten() @ psi_hat.flatten(1).T) / (2 * 2.0)
    expect = torch.softmax(t[[0, 2]], 0) * torch.sigmoid(t[[0, 2]])
    torch.testing.assert_close(weights[0, [0, 2]], expect)
    assert weights[0, 1] == 0 and not weights[1].any()
    # max_kept 1: of experts 0 and 2 (visual sims 1 and 1.5 with this query), only the more similar
    phi[0] = torch.tensor([[2.0, 1.0, 0, 0]] * 2)             # sims 1, 0.5, 1.5 against the sentinel's 0.5
    assert repo.route(phi, psi, sentinel)[1][0].tolist() == [True, False, True]
    weights, kept = repo.route(phi, psi, sentinel, max_kept=1)
    assert kept.tolist() == [[False, False, True], [False, False, False]]
    torch.testing.assert_close(weights[0, 2], torch.sigmoid(t[2]))   # softmax over the one kept expert
    assert repo.route(phi, psi, sentinel, max_kept=5)[1][0].tolist() == [True, False, True]
    # margin m: kept iff sim > sentinel sim + m (sims 1, 0.5, 1.5 against 0.5)
    assert repo.route(phi, psi, sentinel, margin=0.25)[1][0].tolist() == [True, False, True]
    assert repo.route(phi, psi, sentinel, margin=0.75)[1][0].tolist() == [False, False, True]
    assert repo.route(phi, psi, sentinel, margin=-0.25)[1][0].tolist() == [True, True, True]
    assert not repo.route(phi, psi, sentinel, margin=1.0)[1].any()
    # max_kept ranked by the textual similarity (the routing weight) instead: the one of experts 0
    # and 2 with the higher t
    best = 0 if t[0] > t[2] else 2
    weights, kept = repo.route(phi, psi, sentinel, max_kept=1, max_kept_by="text")
    assert kept[0].nonzero().flatten().tolist() == [best] and not kept[1].any()
    torch.testing.assert_close(weights[0, best], torch.sigmoid(t[best]))


def plain_route_of(repo, phi, psi, sentinel):
    """The kept set of ``repo`` scanning every expert."""
    index, repo.index = repo.index, None
    try:
        return repo.route(phi, psi, sentinel)[1]
    finally:
        repo.index = index


def test_filter_index_routes_exactly_like_a_full_scan():
    """The low-rank bound skips experts without changing routing: the same kept sets and weights as
    scoring every expert, across appends, a refit (at twice the fitted size) and max_kept; and on
    features with no low-rank structure, where it cannot prune, it scores everything."""
    from editors.liveedit.index import LowRankBound
    k, d_m, g = 4, 16, torch.Generator().manual_seed(0)

    def low_rank(n):   # rank-6 features plus a little noise, like the trained extractors'
        return (torch.randn(n, 6, generator=g) @ mixing + 0.05 * torch.randn(n, k * d_m, generator=g)).view(n, k, d_m)

    mixing = torch.randn(6, k * d_m, generator=g)
    plain, indexed = ExpertRepository(k, d_m, 2, 6), ExpertRepository(k, d_m, 2, 6, index=LowRankBound(8, 500))
    scored = []
    original = indexed._candidates
    indexed._candidates = lambda *a: scored.append(original(*a)) or scored[-1]
    for n in (300, 400, 700, 900):   # 300: no index; fitted at 700, again at 1,400; at 2,300 new rows projected
        phi_hat, psi_hat = low_rank(n), torch.randn(n, k, d_m, generator=g)
        UV = torch.randn(n, 2, 6, generator=g), torch.randn(n, 2, 6, generator=g)
        for repo in (plain, indexed):
            repo.append(phi_hat, psi_hat, *UV, [{}] * n)
        phi, psi = low_rank(16), torch.randn(16, k, d_m, generator=g)
        sims = similarity(phi, plain.tensor("phi"))
        fifth = sims.topk(5, dim=1).values[:, -1] - 1e-3           # about five experts pass per query
        sentinel = phi * (fifth * k * d_m ** 0.5 / phi.flatten(1).pow(2).sum(1))[:, None, None]
        for max_kept in (None, 2):
            (w0, k0), (w1, k1) = (r.route(phi, psi, sentinel, max_kept) for r in (plain, indexed))
            assert torch.equal(k0, k1) and 2 <= k0.sum(1).float().mean() <= 6
            torch.testing.assert_close(w0, w1, rtol=0, atol=1e-6)
    assert scored[0] is None                              # 300 experts: under filter_index_min
    assert all(s is not None and len(s) < len(plain) / 4 for s in scored[2:])   # a fraction is scored
    assert indexed.index.fitted_at == 1400 and len(indexed.index.rows) == 2300
    # fitted by a query under inference mode (scoring), extended by one under no_grad (a script)
    indexed.clear()
    indexed.append(*random_experts(600, k=k, d_m=d_m, r=2, d=6))
    with torch.inference_mode():
        indexed.route(phi, psi, sentinel)
    indexed.append(*random_experts(10, k=k, d_m=d_m, r=2, d=6, seed=1))
    with torch.no_grad():
        assert torch.equal(indexed.route(phi, psi, sentinel)[1], plain_route_of(indexed, phi, psi, sentinel))
    indexed.clear()
    assert indexed.index.rows is None
    unstructured = torch.randn(2000, k, d_m, generator=g)     # full rank: the bound rules out little
    indexed.append(unstructured, unstructured, torch.randn(2000, 2, 6), torch.randn(2000, 2, 6), [{}] * 2000)
    phi = torch.randn(8, k, d_m, generator=g)
    assert indexed._candidates(phi, torch.zeros(8)) is None


# ---- persistence ---------------------------------------------------------------------------------
CHILD = textwrap.dedent("""
    import sys, torch
    from safetensors.torch import load_file, save_file
    from backbones import BACKBONES
    from editors.liveedit import LiveEdit, LiveEditConfig, LiveEditTrain
    from vl_datasets.records import Sample
    bb = BACKBONES.get("tiny-blip2").load("tiny-blip2", {model!r})
    cfg = LiveEditConfig(**{cfg!r}, train=LiveEditTrain(lr=1e-3, lr_cut_step=None))
    ed = LiveEdit(bb, cfg)
    ed.load_trainable_state_dict(load_file({weights!r}))
    ed.load_state({state!r})
    samples = [Sample(*s) for s in {samples!r}]
    with torch.no_grad():
        save_file({{"logits": ed.logits(bb.encode(samples))}}, {out!r})
    print(len(ed.repository), ed.repository.requests[0]["target"])
""")


def test_saved_repository_reloads_in_a_new_process(load_tiny, tiny_dirs, images, tmp_path):
    bb = load_tiny("blip2")
    arch = dict(edit_layer=LAYER, d_m=32, heads=4, rank=4, n_queries=4, scale=5.0, seed=5)
    ed = LiveEdit(bb, make_config(**arch))
    randomize_experts(ed)
    force_routing(ed, keep=True)
    for r in requests(images):
        ed.edit(r)
    samples = queries(images)
    bb.image_cache.clear()   # the child's computation: these samples' images encoded together
    expected = logits_of(ed, samples)
    assert not torch.equal(expected, logits_of(LiveEdit(bb, make_config(seed=5)), samples))
    save_file(ed.trainable_state_dict(), str(tmp_path / "weights.safetensors"))
    ed.save_state(tmp_path / "state")
    script = CHILD.format(model=str(tiny_dirs["blip2"]), cfg=arch,
                          weights=str(tmp_path / "weights.safetensors"), state=str(tmp_path / "state"),
                          samples=[(s.prompt, s.target, s.image) for s in samples], out=str(tmp_path / "out.st"))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["2", "blue"]
    assert torch.equal(load_file(str(tmp_path / "out.st"))["logits"], expected)
    # and in this process: restore, then load
    ed.restore()
    ed.load_state(tmp_path / "state")
    assert ed.n_edits == 2 and torch.equal(logits_of(ed, samples), expected)
    meta = json.loads((tmp_path / "state" / "requests.json").read_text())
    assert [r["target"] for r in meta["requests"]] == ["blue", "red"]


def test_foreign_repository_is_refused(load_tiny, images, tmp_path):
    ed = LiveEdit(load_tiny("blip2"), make_config())
    ed.edit(requests(images)[0])
    ed.save_state(tmp_path / "s")
    other_backbone = LiveEdit(load_tiny("llava"), make_config())
    with pytest.raises(UserError, match="backbone: repository has 'tiny-blip2', this editor has 'tiny-llava'"):
        other_backbone.load_state(tmp_path / "s")
    with pytest.raises(UserError, match="config.scale: repository has 5.0, this editor has 4.0"):
        LiveEdit(load_tiny("blip2"), make_config(scale=4.0)).load_state(tmp_path / "s")
    with pytest.raises(UserError, match="config.rank"):
        LiveEdit(load_tiny("blip2"), make_config(rank=2)).load_state(tmp_path / "s")
    with pytest.raises(UserError, match="weights: .*load the same trained checkpoint"):
        LiveEdit(load_tiny("blip2"), make_config(seed=9)).load_state(tmp_path / "s")
    fp = dict(ed.fingerprint(), hidden_size=128)
    with pytest.raises(UserError, match="hidden_size: repository has 64, this editor has 128"):
        ExpertRepository(4, 32, 4, 128).load(tmp_path / "s", fp)
    with pytest.raises(UserError, match="no LiveEdit expert repository"):
        ed.load_state(tmp_path / "missing")
    assert len(other_backbone.repository) == 0
    ed.load_state(tmp_path / "s")                             # its own is accepted
    assert len(ed.repository) == 1


def test_checkpoint_weights_round_trip_and_mismatch(load_tiny):
    a, b = LiveEdit(load_tiny("llava"), make_config(seed=1)), LiveEdit(load_tiny("llava"), make_config(seed=2))
    assert a.weights_digest() != b.weights_digest()
    b.load_trainable_state_dict(a.trainable_state_dict())
    assert a.weights_digest() == b.weights_digest()
    with pytest.raises(UserError, match="expects"):
        LiveEdit(load_tiny("llava"), make_config(d_m=16)).load_trainable_state_dict(a.trainable_state_dict())


# ---- training ----------------------------------------------------------------------------------
COLOURS = [(220, 30, 30), (30, 200, 40), (40, 60, 230), (230, 220, 30), (200, 40, 220), (30, 210, 220),
           (120, 120, 120), (250, 140, 20)]
ANSWERS = ["red", "blue", "green", "circle", "shape", "photo"]


def picture(path, colour, box, shift=0):
    im = Image.new("RGB", (32, 32), colour)
    inverse = tuple(255 - c for c in colour)
    for x in range(box[0] + shift, box[2] + shift):
        for y in range(box[1], box[3]):
            im.putpixel((x, y), inverse)
    im.save(path)
    return str(path)


@pytest.fixture(scope="module")
def training_records(tmp_path_factory):
    root = tmp_path_factory.mktemp("liveedit")
    records = []
    for i, answer in enumerate(ANSWERS):
        box = (2 + 3 * i, 6, 12 + 3 * i, 20)
        image = picture(root / f"e{i}.png", COLOURS[i], box)
        rephrased = picture(root / f"r{i}.png", tuple(min(255, c + 20) for c in COLOURS[i]), box, shift=1)
        # locality images look like no edit image (grey levels): the authors' objective uses them
        # as keys of their own neighbourhood, so one that looked like another record's edit image
        # would be a contradictory target
        grey = 20 + 25 * i
        unrelated = picture(root / f"l{i}.png", (grey, grey, grey), (18, 18, 30, 30))
        records.append(EditRecord(i, edit=Sample(QUESTION, answer, image),
                                  text_rephrase=Sample("What shape is it? The answer is:", answer, image),
                                  image_rephrase=Sample(QUESTION, answer, rephrased),
                                  text_loc=Sample("nq question: who rules zorbia?", "Queen Quell"),
                                  image_loc=Sample("a photo of a", "circle", unrelated)))
    return records


def train(ed, records, steps, batch_size=4, seed=0):
    rng = random.Random(seed)
    opt = torch.optim.Adam(ed.trainable_parameters(), lr=ed.config.train.lr)
    ed.train()
    history = []
    for _ in range(steps):
        losses = ed.training_losses(rng.sample(records, batch_size))
        loss = sum(losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append({k: float(v.detach()) for k, v in losses.items()})
    ed.eval()
    return history


@pytest.fixture(scope="module")
def trained(load_tiny, training_records):
    ed = LiveEdit(load_tiny("llava"), make_config(seed=0))
    history = train(ed, training_records, steps=160)
    return ed, history


def test_training_losses_terms_and_one_pass_through_the_frozen_bottom(load_tiny, training_records, monkeypatch):
    bb = load_tiny("blip2")
    ed = LiveEdit(bb, make_config(zero_init_v=True))   # experts that add nothing: checks the captured path
    records = training_records[:3]
    calls = {"encode": 0, "hidden_at": 0, "logits_from": 0, "logits": 0}
    for name in calls:
        original = getattr(bb, name)

        def spy(*a, _name=name, _original=original, **k):
            calls[_name] += 1
            return _original(*a, **k)
        monkeypatch.setattr(bb, name, spy)
    state = ed.rng_state()
    losses = ed.training_losses(records)
    assert calls == {"encode": 1, "hidden_at": 1, "logits_from": 2, "logits": 0}
    monkeypatch.undo()
    assert set(losses) == {"rel", "gen", "loc", "soft_relative", "soft_absolute", "hard_neighbour", "hard_sentinel"}
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    # a fresh editor's experts add exactly nothing: the adapted model is the unedited one, so the
    # captured-output path must reproduce the full forward (rel = NLL of the plain model, loc = 0)
    with torch.no_grad():
        plain = torch.stack([masked_nll(bb.logits(one), one.labels)
                             for one in (bb.encode([r.edit]) for r in records)]).mean()
    torch.testing.assert_close(losses["rel"], plain, rtol=1e-5, atol=1e-5)
    assert float(losses["loc"].detach()) < 1e-6
    losses["rel"].backward()
    assert last_linear(ed.net.gen_v.attn).weight.grad.abs().sum() > 0      # V learns first, from zero
    # each term carries its config weight (same init, same random expert sets)
    other = LiveEdit(bb, make_config(zero_init_v=True, loss_weights=LiveEditLossWeights(gen=0.0, hard_sentinel=2.0)))
    other.set_rng_state(state)
    weighted = other.training_losses(records)
    assert float(weighted["gen"].detach()) == 0.0
    torch.testing.assert_close(weighted["hard_sentinel"], 2 * losses["hard_sentinel"])
    torch.testing.assert_close(weighted["soft_relative"], losses["soft_relative"])


def test_training_is_reproducible_and_resumable(load_tiny, training_records):
    bb = load_tiny("minigpt4")
    a, b = LiveEdit(bb, make_config()), LiveEdit(bb, make_config())
    ha = train(a, training_records, steps=3)
    hb = train(b, training_records, steps=2)
    c = LiveEdit(bb, make_config(seed=7))                    # other init, then the checkpoint of b
    c.load_trainable_state_dict(b.trainable_state_dict())
    c.set_rng_state(b.rng_state())
    # one more step from b's state, with the optimiser restarted in both: same losses
    pick = training_records[:4]
    lb, lc = b.training_losses(pick), c.training_losses(pick)
    assert {k: float(v.detach()) for k, v in lb.items()} == {k: float(v.detach()) for k, v in lc.items()}
    assert ha[:2] == hb


def test_training_makes_routing_work(trained, training_records):
    ed, history = trained
    mean = lambda steps, k: sum(s[k] for s in steps) / len(steps)
    first, last = history[:10], history[-10:]
    assert mean(last, "hard_neighbour") < 0.35 * mean(first, "hard_neighbour")
    assert mean(last, "soft_relative") < 0.3 * mean(first, "soft_relative")
    for r in training_records:
        ed.edit(r.edit)
    try:
        bb, n = ed.backbone, len(training_records)
        own = [r.edit for r in training_records] + [r.image_rephrase for r in training_records]
        unrelated = [r.image_loc for r in training_records]
        batch = bb.encode(own + unrelated)
        with torch.no_grad():
            rows, weights, kept = ed.route(bb.hidden_at(batch, LAYER), batch)
        expert = torch.arange(n).repeat(2)
        own_kept = kept[torch.arange(2 * n), expert]
        assert own_kept.float().mean() >= 0.9                         # own expert kept (a short training)...
        assert torch.equal(weights[:2 * n].argmax(1)[own_kept], expert[own_kept])   # ...with the top weight
        assert not kept[2 * n:].any()                                 # unrelated images: filtered out
        with torch.no_grad():                                         # so they see the unedited model
            loc = bb.encode(unrelated)
            assert torch.equal(ed.logits(loc), bb.logits(loc))
        check_batched_equals_single(ed, own[:3] + unrelated[:2] + [Sample("nq question: who?", "Quell")])
    finally:
        ed.restore()


def test_edit_batch_equals_sequential_edits(trained, training_records):
    ed, _ = trained
    reqs = [r.edit for r in training_records[:3]]
    ed.edit_batch(reqs)
    batched = {n: ed.repository.tensor(n).clone() for n in ("phi", "psi", "U", "V")}
    ed.restore()
    for r in reqs:
        ed.edit(r)
    try:
        for n, t in batched.items():
            torch.testing.assert_close(ed.repository.tensor(n), t, rtol=1e-4, atol=1e-5)
    finally:
        ed.restore()


def test_span_masks_follow_the_batch_ranges(load_tiny, images):
    bb = load_tiny("llava")
    batch = bb.encode(queries(images))
    vision, prompt, target = span_masks(batch)
    for b in range(len(batch.lengths)):
        for mask, rng in ((vision, batch.vision_range), (prompt, batch.prompt_range), (target, batch.target_range)):
            s, e = rng[b].tolist()
            assert mask[b].nonzero().flatten().tolist() == list(range(s, e))


def test_target_identity_probe(load_tiny, images):
    """scripts/probe_target_identity.py: the probe separates separable states, not random labels,
    and reads the states at the target positions of the edit requests."""
    from scripts.probe_target_identity import probe_accuracy, target_states
    g = torch.Generator().manual_seed(0)
    y = torch.arange(200) % 4
    x = torch.randn(200, 16, generator=g) + 8 * torch.eye(16)[y]
    assert probe_accuracy(x[:150], y[:150], x[150:], y[150:], 4) == (1.0, 1.0)
    noise = torch.randn(200, 64, generator=g)
    assert probe_accuracy(noise[:150], y[:150], noise[150:], y[150:], 4)[1] < 0.5

    bb = load_tiny("blip2")
    targets = ["red", "blue", "red"]
    recs = [EditRecord(i, edit=Sample("What color is the shape? The answer is:", t, images[i % len(images)]),
                       text_rephrase=None, image_rephrase=None, text_loc=None, image_loc=None)
            for i, t in enumerate(targets)]
    states = target_states(bb, recs, [0, 1])
    assert set(states) == {0, 1} and states[1].shape == (3, bb.hidden_size)
    batch = bb.encode([r.edit for r in recs])
    h = bb.hidden_at(batch, 1).float()
    start, end = batch.target_range[0].tolist()
    expected = torch.nn.functional.layer_norm(h[0, start:end].mean(0), (bb.hidden_size,))
    assert torch.allclose(states[1][0], expected, atol=1e-5)


def test_cached_decoding_generates_what_full_forwards_do(trained, training_records):
    """Generation with the key/value cache (routing once from the prompt, the residual on each new
    token) gives the tokens of a full forward per step, for routed and unrouted samples alike."""
    ed, _ = trained
    for r in training_records:
        ed.edit(r.edit)
    try:
        bb = ed.backbone
        samples = ([r.edit for r in training_records] + [r.image_rephrase for r in training_records]
                   + [r.image_loc for r in training_records] + [training_records[0].text_loc])
        with torch.no_grad():
            batch = bb.encode(samples, with_targets=False)
            assert ed._routing(bb.hidden_at(batch, LAYER), batch) is not None      # the edits do act
            full = bb.generate(samples, 4, ed.layer_edits())
            assert ed.decoding_edits() and ed.generate(samples, 4) == full
            unedited = bb.generate(samples, 4)
        assert full != unedited
    finally:
        ed.restore()
    assert ed.decoding_edits() == {}
