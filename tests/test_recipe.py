"""RECIPE (editors/recipe): exact restore, per-sample retrieval that never reads the target, the
authors' behaviour behind its flags, the memory across processes, the sentinel after a weight load,
training (losses fall, an edit then lifts Rel) and exact resume through train_vllm_editor.py.

Also holds helpers that tests/test_lte.py imports (no test functions are imported there)."""
import dataclasses
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file

import test_vllm_edit
import train_vllm_editor
from backbones import BACKBONES
from conftest import CORPUS
from editors import EDITORS
from editors.recipe import Recipe, RecipeConfig, RecipeLossWeights, RecipeTrain
from editors.recipe.batching import insert_embeddings, prompt_texts
from editors.recipe.memory import GrowingMemory
from editors.recipe.text_encoder import build_tiny_text_encoder
from fixtures import write_evqa
from utils.config import load_config
from utils.errors import UserError, cli_main
from utils.losses import token_accuracy
from vl_datasets import DATASETS
from vl_datasets.records import EditRecord, Sample

ROOT = Path(__file__).resolve().parent.parent
FAMILIES = ["blip2", "llava", "minigpt4"]
QUESTION = "What color is the shape? The answer is:"
BACKBONE_NAMES = ("tiny-blip2", "tiny-llava", "tiny-minigpt4", "blip2-opt-2.7b", "llava-v1.5-7b",
                  "minigpt-4-vicuna-7b")


# ---- helpers shared with test_lte.py ------------------------------------------------------------
@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    """A tiny text encoder (tokenizer trained on the test corpus, random RoBERTa) for both editors."""
    return build_tiny_text_encoder(tmp_path_factory.mktemp("enc") / "enc", CORPUS, hidden=32, layers=1,
                                   heads=2, vocab_size=300)


@pytest.fixture(scope="module")
def evqa_train(tmp_path_factory):
    """A 7-record E-VQA-format data dir, with EVQA's val slice switched off (its train file is tiny)."""
    data = write_evqa(tmp_path_factory.mktemp("data"), n=7)
    mp = pytest.MonkeyPatch()
    mp.setitem(DATASETS._entries, "EVQA", dataclasses.replace(DATASETS.get("EVQA"), val_slice=0))
    yield data
    mp.undo()


def queries(images):
    """Eight queries: images and text-only, several prompts, different lengths."""
    return [Sample(QUESTION, "red", images[0]),
            Sample("nq question: who rules zorbia?", "Queen Quell"),
            Sample("a photo of a long prompt with more words in it", "blue circle", images[1]),
            Sample("What shape is it? The answer is:", "circle", images[2]),
            Sample("describe the image", "a photo", images[0]),
            Sample("nq question: what color is a photo?", "blue"),
            Sample(QUESTION, "green", images[2]),
            Sample("What is in the image? The answer is:", "shape", images[1])]


def requests(images):
    return [Sample(QUESTION, "blue", images[0]), Sample("What shape is it? The answer is:", "red", images[1]),
            Sample("describe the image", "circle", images[2])]


@torch.no_grad()
def logits_of(editor, samples):
    return editor.logits(editor.backbone.encode(samples))


def assert_batch_equals_single(editor, samples):
    """Per-sample retrieval: a batch gives every sample the decision and logits it gets alone, and
    the same greedy generations."""
    bb = editor.backbone
    batch = bb.encode(samples)
    hit, index = editor.retrieve(batch)
    with torch.no_grad():
        logits = editor.logits(batch)
    for b, s in enumerate(samples):
        one = bb.encode([s])
        h1, i1 = editor.retrieve(one)
        assert bool(h1[0]) == bool(hit[b]) and (not hit[b] or int(i1[0]) == int(index[b]))
        n = int(batch.lengths[b])
        with torch.no_grad():
            single = editor.logits(one)[0]
        torch.testing.assert_close(logits[b, :n], single, rtol=1e-4, atol=1e-5)
        assert torch.equal(logits[b, :n].argmax(-1), single.argmax(-1))
    assert editor.generate(samples, 3) == [editor.generate([s], 3)[0] for s in samples]
    return hit


def picture(path, colour, offset=0):
    im = Image.new("RGB", (32, 32), tuple(255 - c for c in colour))
    for x in range(4 + offset, 20 + offset):
        for y in range(6, 26):
            im.putpixel((x, y), colour)
    im.save(path)
    return str(path)


@pytest.fixture(scope="module")
def distinct_records(tmp_path_factory):
    """Four training records with distinct prompts (the fixture data repeats prompts)."""
    root = tmp_path_factory.mktemp("records")
    colours = [(220, 30, 30), (30, 200, 40), (40, 60, 230), (230, 220, 30)]
    prompts = [(QUESTION, "What color is it? The answer is:"), ("What shape is it? The answer is:", "What shape?"),
               ("describe the image", "a photo of"), ("nq question: who rules the image", "who rules it?")]
    answers = ["red", "circle", "blue", "photo"]
    out = []
    for i, ((p, rp), a) in enumerate(zip(prompts, answers)):
        img, rimg = picture(root / f"e{i}.png", colours[i]), picture(root / f"r{i}.png", colours[i], 2)
        out.append(EditRecord(i, edit=Sample(p, a, img), text_rephrase=Sample(rp, a, img),
                              image_rephrase=Sample(p, a, rimg),
                              text_loc=Sample("nq question: who rules zorbia?", "Queen Quell"),
                              image_loc=Sample("a photo of a", "shape",
                                               picture(root / f"l{i}.png", colours[3 - i], 8))))
    return out


def steerable_backbone(tiny_dirs, family="blip2"):
    """A private copy of a fixture backbone whose LLM is re-initialised variance-preserving: the
    fixtures' std-0.02 LLMs give almost the same output whatever their input, so no prompt (soft
    or in context) can steer them."""
    name = f"tiny-{family}"
    bb = BACKBONES.get(name).load(name, tiny_dirs[family])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in bb.stack.decoder.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.normal_(0.0, m.in_features ** -0.5, generator=g)
            elif isinstance(m, torch.nn.Embedding):
                m.weight.normal_(0.0, 1.0, generator=g)
    return bb


def train_steps(editor, records, steps, lr):
    opt = torch.optim.Adam(editor.trainable_parameters(), lr=lr)
    editor.train()
    history = []
    for _ in range(steps):
        losses = editor.training_losses(records)
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
        history.append({k: float(v.detach()) for k, v in losses.items()})
    editor.eval()
    return history


def rel_after_one_edit(editor, records):
    """Mean teacher-forced Rel of each record's edit after that one edit alone, and before it."""
    after, before = [], []
    bb = editor.backbone
    for r in records:
        editor.restore()
        batch = bb.encode([r.edit])
        with torch.no_grad():
            before.append(float(token_accuracy(editor.logits(batch), batch.labels)[0]))
            editor.edit(r.edit)
            after.append(float(token_accuracy(editor.logits(batch), batch.labels)[0]))
    editor.restore()
    return sum(after) / len(after), sum(before) / len(before)


def train_config_file(path: Path, editor: str, text: str, **over) -> Path:
    data = yaml.safe_load(text)
    for k, v in over.items():
        data[k] = v
    path.write_text(yaml.safe_dump(data))
    return path


def run_training(tiny_dirs, data_dir, records_dir, editor, config, *extra):
    return train_vllm_editor.main(["-en", editor, "-mn", "tiny-blip2", "--model_path", str(tiny_dirs["blip2"]),
                                   "-dna", "EVQA", "--data_dir", str(data_dir), "-bs", "3", "--config", str(config),
                                   "--records_dir", str(records_dir), "-rs", "1", *map(str, extra)])


def log_entries(run_dir: Path):
    return [{k: v for k, v in json.loads(ln).items() if k != "elapsed_s"}
            for ln in (run_dir / "logs" / "train.jsonl").read_text().splitlines()]


def check_checkpointed_rows_give_the_same_step(make_editor, records):
    """``checkpoint_rows`` (activation checkpointing, one row at a time) changes memory, not the step:
    the same losses and gradients."""
    out = []
    for flag in (False, True):
        torch.manual_seed(0)                  # RECIPE seeds its training draws from the global RNG
        ed = make_editor(flag)
        ed.train()
        losses = ed.training_losses(records)
        sum(losses.values()).backward()
        grads = [p.grad.clone() for p in ed.trainable_parameters() if p.grad is not None]
        out.append(({k: float(v.detach()) for k, v in losses.items()}, grads))
    (l0, g0), (l1, g1) = out
    assert l0.keys() == l1.keys() and all(abs(l0[k] - l1[k]) < 1e-5 * (1 + abs(l0[k])) for k in l0)
    assert len(g0) == len(g1) > 0
    for a, b in zip(g0, g1):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def check_resume_is_exact(result, tmp_path):
    """Resuming from step 2 of a 4-step run gives the same steps, lrs, losses and weights."""
    copy = tmp_path / "copy"
    import shutil
    shutil.copytree(result.run_dir, copy)
    shutil.rmtree(copy / "checkpoints" / f"step_{result.step}")
    resumed = train_vllm_editor.main(["-lkpt", str(copy / "checkpoints" / "step_2")])
    assert resumed.step == result.step and len(resumed.step_seconds) == result.step - 2
    assert log_entries(copy) == log_entries(result.run_dir)
    a, b = (load_file(str(r.final_checkpoint / "trainable.safetensors")) for r in (result, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def check_foreign_checkpoint_is_refused(ckpt, editor, other_editor, data_dir, capsys):
    """test_vllm_edit.py refuses a checkpoint of another editor or backbone: one line, exit 2."""
    for args in (["-en", other_editor, "-mn", "tiny-blip2"], ["-en", editor, "-mn", "tiny-llava"]):
        with pytest.raises(SystemExit) as e:
            cli_main(test_vllm_edit.main)(args + ["-dn", "EVQA", "--data_dir", str(data_dir), "-sen", "1",
                                                  "-ckpt", str(ckpt), "--records_dir", str(data_dir / "rec")])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: checkpoint") and "\n" not in err and f"belongs to editor {editor!r}" in err, err


CHILD = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {root!r})
    from safetensors.torch import load_file, save_file
    from backbones import BACKBONES
    from editors import EDITORS
    from utils.config import from_dict
    from vl_datasets.records import Sample
    bb = BACKBONES.get("tiny-blip2").load("tiny-blip2", {model!r})
    cls = EDITORS.get({editor!r})
    ed = cls(bb, from_dict(cls.config_class, {config!r}, "test"))
    ed.load_trainable_state_dict(load_file({weights!r}))
    ed.load_state({state!r})
    samples = [Sample(*s) for s in {samples!r}]
    with torch.no_grad():
        save_file({{"logits": ed.logits(bb.encode(samples))}}, {out!r})
    print(len(ed.memory))
""")


def check_state_reloads_in_new_process(editor, tiny_dirs, samples, tmp_path):
    expected = logits_of(editor, samples)
    save_file(editor.trainable_state_dict(), str(tmp_path / "weights.safetensors"))
    editor.save_state(tmp_path / "state")
    script = CHILD.format(root=str(ROOT), model=str(tiny_dirs["blip2"]), editor=editor.name,
                          config=dataclasses.asdict(editor.config), weights=str(tmp_path / "weights.safetensors"),
                          state=str(tmp_path / "state"), samples=[(s.prompt, s.target, s.image) for s in samples],
                          out=str(tmp_path / "out.st"))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-1] == str(len(editor.memory))
    assert torch.equal(load_file(str(tmp_path / "out.st"))["logits"], expected)
    n = len(editor.memory)
    editor.restore()
    editor.load_state(tmp_path / "state")                     # and in this process
    assert editor.n_edits == n and torch.equal(logits_of(editor, samples), expected)


# ---- RECIPE ------------------------------------------------------------------------------------
def make_config(encoder_dir, **over) -> RecipeConfig:
    kw = dict(encoder=str(encoder_dir), rep_dim=32, n_prompt_tokens=3, n_sentinel_tokens=4, prompt_scale=1.0,
              max_text_tokens=32,
              temperature=1.0, hinge=1.2, retrieve_on_target=False, drop_image=False, checkpoint_rows=False,
              train=RecipeTrain(lr=3e-3, lr_cut_step=None))
    kw.update(over)
    return RecipeConfig(**kw)


def force_retrieval(editor, hit: bool) -> None:
    """Every query retrieves entry 0 (hit) or nothing, whatever the retrieval weights say."""
    def retrieve(batch):
        B = batch.input_ids.shape[0]
        return torch.full((B,), hit, dtype=torch.bool), torch.zeros(B, dtype=torch.long)
    editor.retrieve = retrieve


def midpoint(values: torch.Tensor) -> float:
    """Halfway between the two middle values: half of them above, none on the boundary."""
    v = values.detach().flatten().sort().values
    return float(v[len(v) // 2 - 1] + v[len(v) // 2]) / 2


@torch.no_grad()
def mixed_sentinel(ed: Recipe, samples) -> None:
    """A sentinel along the mean query, scaled so that about half of ``samples`` beat it."""
    bb = ed.backbone
    q = ed.net.query_head(ed._features(ed.net.encoder.tokenize(prompt_texts(bb, bb.encode(samples)))))
    best = ed._similarity(q, ed.memory.tensor("key")).max(1).values
    direction = q.mean(0)
    along = ed._similarity(q, direction[None])[:, 0]
    assert (along > 0).all()
    ed._sentinel = direction * midpoint(best / along)


def test_registered_and_reference_configs_load():
    assert EDITORS.get("recipe") is Recipe
    for name in BACKBONE_NAMES:
        cfg = load_config(RecipeConfig, "recipe", name)
        assert (cfg.n_prompt_tokens, cfg.n_sentinel_tokens, cfg.hinge) == (3, 10, 1.2)
        assert not cfg.retrieve_on_target and not cfg.drop_image
        if not name.startswith("tiny-"):
            assert (cfg.encoder, cfg.rep_dim, cfg.train.lr, cfg.temperature) == (
                "recipe-encoder-roberta-base", 4096, 1e-5, 1.0)
        else:
            assert cfg.encoder == "tiny-text-encoder" and cfg.train.max_steps is not None


def test_config_is_strict(tmp_path):
    good = (ROOT / "configs" / "recipe" / "tiny-blip2.yaml").read_text()
    cases = {"unknown key 'rep_dmi'": good.replace("rep_dim:", "rep_dmi:"),
             "missing key 'hinge'": good.replace("hinge:", "# hinge:"),
             r"train\.lr: expected float, got '1e-3'": re.sub(r"\blr: \S+", "lr: 1e-3", good),
             r"recipe.rep_dim: expected > 0, got -4": re.sub(r"rep_dim: \d+", "rep_dim: -4", good),
             r"\.drop_image: expected bool": good.replace("drop_image: false", "drop_image: 'no'"),
             r"recipe.loss_weights.loc: expected >= 0": good.replace("  loc: 1.0", "  loc: -1.0")}
    for message, text in cases.items():
        path = tmp_path / "c.yaml"
        path.write_text(text)
        with pytest.raises(UserError, match=message):
            load_config(RecipeConfig, "recipe", "tiny-blip2", path)


@pytest.mark.parametrize("family", FAMILIES)
def test_restore_and_no_retrieval_give_the_unedited_logits(family, load_tiny, images, encoder_dir):
    bb = load_tiny(family)
    ed = Recipe(bb, make_config(encoder_dir))
    samples = queries(images)
    with torch.no_grad():
        plain = bb.logits(bb.encode(samples))
    assert torch.equal(logits_of(ed, samples), plain)          # empty memory
    for r in requests(images):
        ed.edit(r)
    assert len(ed.memory) == 3 and ed.n_edits == 3 and ed.state_bytes() == 3 * (32 + 3 * bb.hidden_size) * 4
    force_retrieval(ed, hit=False)
    assert torch.equal(logits_of(ed, samples), plain)          # nothing retrieved: bit for bit
    force_retrieval(ed, hit=True)
    edited = logits_of(ed, samples)
    batch = bb.encode(samples)
    for b in range(len(samples)):                              # every sample changes
        n = int(batch.lengths[b])
        assert not torch.allclose(edited[b, :n], plain[b, :n])
    del ed.retrieve
    ed.restore()
    assert len(ed.memory) == 0 and ed.n_edits == 0 and ed.state_bytes() == 0
    assert torch.equal(logits_of(ed, samples), plain)


def test_prompt_texts_read_the_prompt_without_template_or_target(load_tiny, images):
    for family in FAMILIES:
        bb = load_tiny(family)
        samples = queries(images)
        for with_targets in (True, False):
            assert prompt_texts(bb, bb.encode(samples, with_targets)) == [s.prompt.strip() for s in samples]
        assert prompt_texts(bb, bb.encode(samples), with_target=True) == [f"{s.prompt} {s.target}" for s in samples]


def test_inserted_embeddings_shift_ranges_and_labels(load_tiny, images):
    bb = load_tiny("llava")
    batch = bb.encode(queries(images)[:3])
    extras = [torch.randn(2, bb.hidden_size), None, torch.randn(3, bb.hidden_size)]
    new, where = insert_embeddings(batch, batch.prompt_range[:, 0], extras, bb.pad_token_id)
    for b, k in enumerate((2, 0, 3)):
        n, at = int(batch.lengths[b]), int(batch.prompt_range[b, 0])
        assert int(new.lengths[b]) == n + k
        assert torch.equal(new.prompt_range[b], batch.prompt_range[b] + k)
        assert torch.equal(new.target_range[b], batch.target_range[b] + k)
        assert torch.equal(new.vision_range[b], batch.vision_range[b])           # before the insertion
        if k:
            assert torch.equal(new.inputs_embeds[b, at:at + k], extras[b])
        assert torch.equal(new.labels[b, where[b, :n]], batch.labels[b, :n])
        assert torch.equal(new.inputs_embeds[b, where[b, :n]], batch.inputs_embeds[b, :n])
    dropped, _ = insert_embeddings(batch, batch.prompt_range[:, 0], [None] * 3, bb.pad_token_id, drop_vision=True)
    assert not dropped.has_image.any() and int(dropped.lengths[0]) == int(batch.lengths[0]) - bb.n_vision_tokens


@pytest.mark.parametrize("family", ["blip2", "minigpt4"])
def test_batch_of_eight_equals_one_by_one(family, load_tiny, images, encoder_dir):
    ed = Recipe(load_tiny(family), make_config(encoder_dir, seed=3))
    for r in requests(images):
        ed.edit(r)
    mixed_sentinel(ed, queries(images))
    hit = assert_batch_equals_single(ed, queries(images))
    assert 0 < int(hit.sum()) < len(hit)


def test_retrieval_ignores_the_target_unless_the_authors_flag(load_tiny, images, encoder_dir):
    bb = load_tiny("blip2")
    a, b = Sample(QUESTION, "red", images[0]), Sample(QUESTION, "green circle", images[0])
    for flag in (False, True):
        ed = Recipe(bb, make_config(encoder_dir, retrieve_on_target=flag))
        for r in requests(images):
            ed.edit(r)
        texts = [prompt_texts(bb, bb.encode([s]), with_target=flag)[0] for s in (a, b)]
        q = [ed.net.query_head(ed._features(ed.net.encoder.tokenize([t]))) for t in texts]
        assert torch.equal(q[0], q[1]) != flag                 # the query reads the target only with the flag
        if not flag:
            assert [tuple(t.tolist()) for t in ed.retrieve(bb.encode([a]))] == \
                   [tuple(t.tolist()) for t in ed.retrieve(bb.encode([b]))]


def test_drop_image_flag_makes_inference_image_blind(load_tiny, images, encoder_dir):
    bb = load_tiny("blip2")                                   # BLIP-2: the image tokens come before BOS
    ed = Recipe(bb, make_config(encoder_dir, drop_image=True))
    with_image = [Sample(QUESTION, "red", images[0]), Sample(QUESTION, "red", images[1])]
    text_only = [Sample(QUESTION, "red")] * 2
    with torch.no_grad():
        blind = bb.logits(bb.encode(text_only))
    got = logits_of(ed, with_image)
    n, v = int(bb.encode(text_only).lengths[0]), bb.n_vision_tokens
    torch.testing.assert_close(got[:, v:v + n], blind[:, :n], rtol=1e-5, atol=1e-5)   # pre-edit too
    assert not torch.allclose(logits_of(Recipe(bb, make_config(encoder_dir)), with_image)[0, -1],
                              logits_of(Recipe(bb, make_config(encoder_dir)), with_image)[1, -1])


def test_memory_grows_by_doubling():
    mem = GrowingMemory({"key": (4,), "prompt": (2, 3)}, initial_capacity=4)
    chunks = []
    for i, n in enumerate([1, 1, 3, 7, 20, 1]):
        t = {"key": torch.full((n, 4), float(i)), "prompt": torch.full((n, 2, 3), float(-i))}
        mem.append(t, [{"i": i}] * n)
        chunks.append(t)
    assert len(mem) == 33 and mem.capacity == 64
    assert torch.equal(mem.tensor("key"), torch.cat([c["key"] for c in chunks]))
    assert mem.nbytes() == 33 * (4 + 6) * 4
    with pytest.raises(ValueError, match="shape"):
        mem.append({"key": torch.zeros(1, 5), "prompt": torch.zeros(1, 2, 3)}, [{}])
    mem.clear()
    assert len(mem) == 0 and mem.capacity == 4


def test_saved_memory_reloads_in_a_new_process_and_foreign_is_refused(load_tiny, tiny_dirs, images, encoder_dir,
                                                                       tmp_path):
    ed = Recipe(load_tiny("blip2"), make_config(encoder_dir, seed=5))
    for r in requests(images):
        ed.edit(r)
    check_state_reloads_in_new_process(ed, tiny_dirs, queries(images), tmp_path)
    with pytest.raises(UserError, match="weights: saved .*load the same trained checkpoint"):
        Recipe(load_tiny("blip2"), make_config(encoder_dir, seed=9)).load_state(tmp_path / "state")
    with pytest.raises(UserError, match="backbone: saved 'tiny-blip2', this editor has 'tiny-llava'"):
        Recipe(load_tiny("llava"), make_config(encoder_dir, seed=5)).load_state(tmp_path / "state")


def test_sentinel_is_recomputed_after_loading_weights(load_tiny, encoder_dir):
    bb = load_tiny("llava")
    a, b = Recipe(bb, make_config(encoder_dir, seed=1)), Recipe(bb, make_config(encoder_dir, seed=2))
    stale = b.sentinel_key().clone()                          # cached before the load
    b.load_trainable_state_dict(a.trainable_state_dict())
    assert not torch.equal(b.sentinel_key(), stale)
    assert torch.equal(b.sentinel_key(), a.sentinel_key())
    with pytest.raises(UserError, match="expects"):
        Recipe(bb, make_config(encoder_dir, rep_dim=16)).load_trainable_state_dict(a.trainable_state_dict())


def test_training_lowers_the_losses_and_an_edit_lifts_rel(tiny_dirs, encoder_dir, distinct_records):
    ed = Recipe(steerable_backbone(tiny_dirs), make_config(encoder_dir))
    history = train_steps(ed, distinct_records, steps=50, lr=3e-3)
    first, last = history[0], history[-1]
    assert last["rel"] < 0.6 * first["rel"] and last["gen"] < 0.6 * first["gen"]
    assert last["retrieve_own"] < first["retrieve_own"]
    after, before = rel_after_one_edit(ed, distinct_records)
    assert before == 0.0 and after >= 0.5, (after, before)


def test_checkpoint_rows_gives_the_same_training_step(load_tiny, encoder_dir, distinct_records):
    bb = load_tiny("blip2")
    check_checkpointed_rows_give_the_same_step(
        lambda flag: Recipe(bb, make_config(encoder_dir, checkpoint_rows=flag)), distinct_records[:3])


@pytest.fixture(scope="module")
def short_run(tiny_dirs, evqa_train, encoder_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("recipe_run")
    cfg = train_config_file(tmp / "cfg.yaml", "recipe", (ROOT / "configs" / "recipe" / "tiny-blip2.yaml").read_text(),
                            encoder=str(encoder_dir), rep_dim=32, n_sentinel_tokens=4, max_text_tokens=32,
                            train={"lr": 3e-3, "lr_cut_step": 2, "lr_cut_factor": 10.0, "max_steps": 4})
    return run_training(tiny_dirs, evqa_train, tmp / "records", "recipe", cfg, "-sci", 2)


def test_resume_continues_exactly(short_run, tmp_path):
    assert short_run.step == 4 and sorted(log_entries(short_run.run_dir)[0]["terms"]) == sorted(
        dataclasses.asdict(RecipeLossWeights()))
    check_resume_is_exact(short_run, tmp_path)


def test_checkpoint_of_another_editor_or_backbone_is_refused(short_run, evqa_train, capsys):
    check_foreign_checkpoint_is_refused(short_run.final_checkpoint, "recipe", "lte", evqa_train, capsys)
