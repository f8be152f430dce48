"""LTE (editors/lte): exact restore with either locality reference, the aligned weights kept out of
the shared backbone (LoRA per call, full fine-tune swapped in and out), per-sample retrieval that
never reads the target, the memory across processes, training (losses fall, an edit then lifts Rel)
and exact resume through train_vllm_editor.py."""
import dataclasses
import re
from pathlib import Path

import pytest
import torch

from editors import EDITORS
from editors.lte import LTE, LteConfig, LteLossWeights, LteTrain
from editors.lte.editor import prefix_sample
from editors.recipe.batching import prompt_texts
from test_recipe import (QUESTION, assert_batch_equals_single, check_checkpointed_rows_give_the_same_step,  # noqa: F401
                         check_foreign_checkpoint_is_refused,
                         check_resume_is_exact, check_state_reloads_in_new_process, distinct_records, encoder_dir,
                         evqa_train, force_retrieval, log_entries, midpoint, logits_of, queries, rel_after_one_edit,
                         requests, run_training, steerable_backbone, train_config_file, train_steps)
from utils.config import load_config
from utils.errors import UserError
from vl_datasets.records import Sample

ROOT = Path(__file__).resolve().parent.parent
FAMILIES = ["blip2", "llava", "minigpt4"]


def make_config(encoder_dir, **over) -> LteConfig:
    kw = dict(finetune="lora", lora_rank=4, lora_alpha=8.0, lora_layers=None, retriever=str(encoder_dir),
              retriever_pooling="mean", max_text_tokens=32, train_retriever=True, retriever_temperature=0.1,
              threshold=0.3, locality_reference="original", checkpoint_rows=False, sample_rows=False,
              train=LteTrain(lr=3e-3, lr_cut_step=None))
    kw.update(over)
    return LteConfig(**kw)


def perturb(ed: LTE, seed=0, scale=0.5) -> None:
    """Make the aligned model differ from the original (a fresh LoRA is exactly the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ed.adapter.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def test_registered_and_reference_configs_load():
    assert EDITORS.get("lte") is LTE
    for name in ("blip2-opt-2.7b", "llava-v1.5-7b", "minigpt-4-vicuna-7b"):
        cfg = load_config(LteConfig, "lte", name)
        assert (cfg.retriever, cfg.threshold, cfg.train_retriever, cfg.locality_reference) == (
            "lte-retriever-mpnet", 0.3, False, "original")
        assert cfg.finetune == ("full" if name.startswith("blip2") else "lora")
        assert cfg.train.lr == (5e-6 if cfg.finetune == "full" else 1e-4)
    for name in ("tiny-blip2", "tiny-llava", "tiny-minigpt4"):
        cfg = load_config(LteConfig, "lte", name)
        assert cfg.retriever == "tiny-text-encoder" and cfg.train_retriever and cfg.train.max_steps is not None


def test_config_is_strict(tmp_path):
    good = (ROOT / "configs" / "lte" / "tiny-blip2.yaml").read_text()
    cases = {"unknown key 'treshold'": good.replace("threshold:", "treshold:"),
             "missing key 'finetune'": good.replace("finetune:", "# finetune:"),
             "lte.finetune: expected one of lora, full, got 'half'": re.sub(r"finetune: \w+", "finetune: half", good),
             "lte.locality_reference: expected one of original, aligned": good.replace(
                 "locality_reference: original", "locality_reference: edited"),
             r"lte.lora_rank: expected > 0, got -2": re.sub(r"lora_rank: \d+", "lora_rank: -2", good),
             r"lte.threshold: expected a cosine": re.sub(r"threshold: \S+", "threshold: 1.5", good),
             r"train\.lr: expected float": re.sub(r"\blr: \S+", "lr: 1e-3", good)}
    for message, text in cases.items():
        path = tmp_path / "c.yaml"
        path.write_text(text)
        with pytest.raises(UserError, match=message):
            load_config(LteConfig, "lte", "tiny-blip2", path)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_restore_gives_the_unedited_logits_and_the_backbone_is_never_changed(family, finetune, load_tiny, images,
                                                                              encoder_dir):
    bb = load_tiny(family)
    before = {k: v.clone() for k, v in bb.model.state_dict().items()}
    params = {k: id(p) for k, p in bb.model.named_parameters()}
    ed = LTE(bb, make_config(encoder_dir, finetune=finetune))
    samples = queries(images)
    with torch.no_grad():
        plain = bb.logits(bb.encode(samples))
        torch.testing.assert_close(ed.aligned_logits(bb.encode(samples)), plain, rtol=1e-5, atol=1e-5)   # fresh
    perturb(ed)
    assert torch.equal(logits_of(ed, samples), plain)          # empty memory: the original backbone
    for r in requests(images):
        ed.edit(r)
    force_retrieval(ed, hit=False)                             # edits, nothing retrieved: the aligned model
    with torch.no_grad():
        assert torch.equal(logits_of(ed, samples), ed.aligned_logits(bb.encode(samples)))
    assert not torch.allclose(logits_of(ed, samples), plain)
    force_retrieval(ed, hit=True)
    retrieved = logits_of(ed, samples)
    with torch.no_grad():
        assert not torch.allclose(retrieved, ed.aligned_logits(bb.encode(samples)))
    del ed.retrieve
    ed.restore()
    assert len(ed.memory) == 0 and ed.state_bytes() == 0
    assert torch.equal(logits_of(ed, samples), plain)
    # the shared backbone is what it was: same tensors, same values
    assert {k: id(p) for k, p in bb.model.named_parameters()} == params
    assert all(torch.equal(v, before[k]) for k, v in bb.model.state_dict().items())
    # the aligned reference: with no edit, the editor is the aligned model
    aligned = LTE(bb, make_config(encoder_dir, finetune=finetune, locality_reference="aligned"))
    aligned.load_trainable_state_dict(ed.trainable_state_dict())
    with torch.no_grad():
        assert torch.equal(logits_of(aligned, samples), aligned.aligned_logits(bb.encode(samples)))


def test_full_finetune_puts_the_backbone_weights_back_after_an_error(load_tiny, images, encoder_dir):
    bb = load_tiny("llava")
    ed = LTE(bb, make_config(encoder_dir, finetune="full"))
    params = {k: p for k, p in bb.model.named_parameters()}
    batch = bb.encode(queries(images)[:2])
    with pytest.raises(RuntimeError, match="boom"):
        with ed.adapter.swapped(bb):
            assert bb.mlp_output_projection(0).weight is ed.adapter.layers[0].mlp.down_proj.weight
            raise RuntimeError("boom")
    assert all(p is params[k] for k, p in bb.model.named_parameters())
    assert not any(p.requires_grad for p in bb.model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(ed.aligned_logits(batch), bb.logits(batch), rtol=1e-5, atol=1e-5)


def test_prefix_text_marks_the_update_and_the_query():
    s = prefix_sample(Sample("What color is the shape? The answer is:", "red", "x.png"))
    assert s.prompt == "[Updated Information]What color is the shape? The answer is: red\n[Query]"
    assert s.image == "x.png"


@pytest.mark.parametrize("family", ["blip2", "llava"])
def test_batch_of_eight_equals_one_by_one(family, load_tiny, images, encoder_dir):
    ed = LTE(load_tiny(family), make_config(encoder_dir, seed=3))
    perturb(ed, scale=0.2)
    for r in requests(images):
        ed.edit(r)
    batch = ed.backbone.encode(queries(images))
    q = ed._embed(ed.retriever.tokenize(prompt_texts(ed.backbone, batch)))
    ed.config = dataclasses.replace(ed.config, threshold=midpoint((q @ ed.memory.tensor("key").T).max(1).values))
    hit = assert_batch_equals_single(ed, queries(images))
    assert 0 < int(hit.sum()) < len(hit)


def test_retrieval_ignores_the_target(load_tiny, images, encoder_dir):
    bb = load_tiny("minigpt4")
    ed = LTE(bb, make_config(encoder_dir, threshold=-1.0))
    for r in requests(images):
        ed.edit(r)
    a, b = Sample(QUESTION, "red", images[0]), Sample(QUESTION, "green circle", images[0])
    ra, rb = ed.retrieve(bb.encode([a])), ed.retrieve(bb.encode([b]))
    assert torch.equal(ra[0], rb[0]) and torch.equal(ra[1], rb[1]) and bool(ra[0][0])
    assert torch.equal(ed.retrieve(bb.encode([a], with_targets=False))[1], ra[1])


def test_saved_memory_reloads_in_a_new_process_and_foreign_is_refused(load_tiny, tiny_dirs, images, encoder_dir,
                                                                       tmp_path):
    ed = LTE(load_tiny("blip2"), make_config(encoder_dir, seed=5, threshold=-1.0))
    perturb(ed, scale=0.2)
    for r in requests(images):
        ed.edit(r)
    check_state_reloads_in_new_process(ed, tiny_dirs, queries(images), tmp_path)
    assert ed.state_bytes() > 3 * ed.memory.tensor("key").shape[1] * 4
    other = LTE(load_tiny("blip2"), make_config(encoder_dir))
    with torch.no_grad():
        next(other.retriever.parameters()).add_(1.0)
    with pytest.raises(UserError, match="weights: saved .*load the same trained checkpoint"):
        other.load_state(tmp_path / "state")
    with pytest.raises(UserError, match="backbone: saved 'tiny-blip2', this editor has 'tiny-llava'"):
        LTE(load_tiny("llava"), make_config(encoder_dir)).load_state(tmp_path / "state")


def test_checkpoint_weights_round_trip_and_mismatch(load_tiny, encoder_dir):
    bb = load_tiny("llava")
    a, b = LTE(bb, make_config(encoder_dir)), LTE(bb, make_config(encoder_dir, seed=4))
    perturb(a)
    b.load_trainable_state_dict(a.trainable_state_dict())
    assert all(torch.equal(v, b.trainable_state_dict()[k]) for k, v in a.trainable_state_dict().items())
    with pytest.raises(UserError, match="finetune='full'"):
        LTE(bb, make_config(encoder_dir, finetune="full")).load_trainable_state_dict(a.trainable_state_dict())
    with pytest.raises(UserError, match="expects"):
        LTE(bb, make_config(encoder_dir, lora_rank=2)).load_trainable_state_dict(a.trainable_state_dict())
    with pytest.raises(UserError, match="lora_layers: layer 7 is out of range"):
        LTE(bb, make_config(encoder_dir, lora_layers=[1, 7]))


def test_training_lowers_the_losses_and_an_edit_lifts_rel(tiny_dirs, encoder_dir, distinct_records):
    ed = LTE(steerable_backbone(tiny_dirs), make_config(encoder_dir, threshold=0.0, finetune="full"))
    history = train_steps(ed, distinct_records, steps=20, lr=3e-3)
    first, last = history[0], history[-1]
    assert last["rel"] < 0.5 * first["rel"] and last["gen"] < 0.5 * first["gen"]
    assert last["retriever"] < 0.5 * first["retriever"]
    after, before = rel_after_one_edit(ed, distinct_records)
    assert before == 0.0 and after >= 0.5, (after, before)


def test_checkpoint_rows_gives_the_same_training_step(load_tiny, encoder_dir, distinct_records):
    bb = load_tiny("minigpt4")

    def make(flag):
        ed = LTE(bb, make_config(encoder_dir, checkpoint_rows=flag))
        perturb(ed, scale=0.1)
        return ed
    check_checkpointed_rows_give_the_same_step(make, distinct_records[:3])


def test_sampled_rows_estimate_the_full_loss(load_tiny, encoder_dir, distinct_records):
    """sample_rows: each record's gen / loc term is twice the term of one of its two samples."""
    bb = load_tiny("blip2")
    full = LTE(bb, make_config(encoder_dir))
    perturb(full, scale=0.1)
    sampled = LTE(bb, make_config(encoder_dir, sample_rows=True))
    sampled.load_trainable_state_dict(full.trainable_state_dict())
    sampled.draws.manual_seed(0)
    seen = set()
    for _ in range(4):
        record = [distinct_records[0]]
        with torch.no_grad():
            s = {k: float(v) for k, v in sampled.training_losses(record).items()}
            parts = {}
            for kind, term in (("text_rephrase", "gen"), ("image_rephrase", "gen"), ("text_loc", "loc"),
                               ("image_loc", "loc")):
                one = dataclasses.replace(record[0], text_rephrase=getattr(record[0], kind),
                                          image_rephrase=getattr(record[0], kind),
                                          text_loc=getattr(record[0], kind), image_loc=getattr(record[0], kind))
                parts[kind] = float(full.training_losses([one])[term])   # the sum of two equal terms
        gen = [k for k in ("text_rephrase", "image_rephrase") if abs(parts[k] - s["gen"]) < 1e-4 * (1 + s["gen"])]
        loc = [k for k in ("text_loc", "image_loc") if abs(parts[k] - s["loc"]) < 1e-4 * (1 + s["loc"]) + 1e-6]
        assert gen and loc, (s, parts)
        seen.add(gen[0])
    assert len(seen) == 2                                    # both rephrases get drawn


@pytest.fixture(scope="module")
def short_run(tiny_dirs, evqa_train, encoder_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lte_run")
    cfg = train_config_file(tmp / "cfg.yaml", "lte", (ROOT / "configs" / "lte" / "tiny-blip2.yaml").read_text(),
                            retriever=str(encoder_dir), finetune="lora", max_text_tokens=32,
                            train={"lr": 3e-3, "lr_cut_step": 2, "lr_cut_factor": 10.0, "max_steps": 4})
    return run_training(tiny_dirs, evqa_train, tmp / "records", "lte", cfg, "-sci", 2)


def test_resume_continues_exactly(short_run, tmp_path):
    assert short_run.step == 4
    assert sorted(log_entries(short_run.run_dir)[0]["terms"]) == sorted(dataclasses.asdict(LteLossWeights()))
    check_resume_is_exact(short_run, tmp_path)


def test_checkpoint_of_another_editor_or_backbone_is_refused(short_run, evqa_train, capsys):
    check_foreign_checkpoint_is_refused(short_run.final_checkpoint, "lte", "recipe", evqa_train, capsys)
