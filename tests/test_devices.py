"""A backbone split over devices (``-dvc auto``): training, editing and evaluation run, and give the
numbers of a single-device run. With no GPU here, the devices are simulated (``tests/sim_devices.py``):
every tensor carries a logical device and an op mixing two of them raises, as across two GPUs,
while the arithmetic runs on the CPU. The hand-made device map puts the vision side, the embeddings
and layer 0 on device 1, layers 1-2 (LiveEdit's l_e = 2 and FT-L's layer 1) on device 2, and layer 3
with the head on device 3; no accelerate hook moves anything, so every move the code needs must be
explicit."""
import pytest
import torch

from backbones.devices import model_devices, module_device
from editors.ft_l import FTLConfig, FTLEditor
from editors.liveedit import LiveEdit, LiveEditConfig, LiveEditTrain
from evaluation.scoring import run_samples
from sim_devices import DeviceMismatch, SimulatedDevices
from vl_datasets.records import EditRecord, Sample

FAMILIES = ["blip2", "llava", "minigpt4"]
D1, D2, D3 = (torch.device("cpu", k) for k in (1, 2, 3))


def split(sim: SimulatedDevices, bb) -> None:
    sim.place(bb.model, 1)
    for i in (1, 2):
        sim.place(bb.layer(i), 2)
    sim.place(bb.layer(3), 3)
    d = bb.stack.decoder
    sim.place(d.norm if hasattr(d, "norm") else d.final_layer_norm, 3)
    if bb.stack.lm_head.weight is not bb.model.get_input_embeddings().weight:   # OPT ties it to the embeddings
        sim.place(bb.stack.lm_head, 3)


def records(images):
    q = "What color is the shape? The answer is:"
    return [EditRecord(i, edit=Sample(q, ans, images[i]), text_rephrase=Sample("What color is it?", ans, images[i]),
                       image_rephrase=Sample(q, ans, images[(i + 1) % 3]),
                       text_loc=Sample("nq question: who rules zorbia?", "Queen Quell"),
                       image_loc=Sample("What shape is it? The answer is:", "circle", images[2]))
            for i, ans in enumerate(["red", "blue"])]


def liveedit(bb):
    cfg = LiveEditConfig(edit_layer=2, d_m=32, heads=4, rank=4, n_queries=4, scale=5.0,
                         train=LiveEditTrain(lr=1e-2, lr_cut_step=None))
    return LiveEdit(bb, cfg)


def run_everything(bb, recs):
    """One LiveEdit training step, two edits, a batched evaluation and generations; one FT-L edit and
    restore."""
    out = {}
    samples = [s for r in recs for s in r.samples().values()]
    out["logits"] = bb.logits(bb.encode(samples)).detach()
    ed = liveedit(bb)
    out["liveedit_device"] = ed.device
    ed.train()
    terms = ed.training_losses(recs)
    sum(terms.values()).backward()
    out["terms"] = {k: v.detach() for k, v in terms.items()}
    out["grads"] = [p.grad.clone() for p in ed.trainable_parameters()]
    torch.optim.Adam(ed.trainable_parameters(), lr=1e-2).step()
    ed.eval()
    for r in recs:
        ed.edit(r.edit)
    out["edited_logits"] = ed.logits(bb.encode(samples)).detach()
    out["eval"] = [(o.target, o.tf, o.gen) for o in run_samples(ed, samples, batch_size=4)]
    with torch.no_grad():   # greedy decoding both ways: key/value cache (LiveEdit's decoding edits), full forwards
        out["generated"] = [ed.generate(samples, 3), bb.generate(samples, 3, ed.layer_edits())]
    ft = FTLEditor(bb, FTLConfig(layer=1, steps=3, lr=1e-2, early_stop_loss=0.0, norm_constraint=None))
    ft.edit(recs[0].edit)
    out["ft_weight"] = ft.weight.detach().clone()
    out["ft_logits"] = ft.logits(bb.encode(samples)).detach()
    ft.restore()
    out["restored"] = bb.logits(bb.encode(samples)).detach()
    return out


def assert_same(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    elif isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    elif not isinstance(a, torch.device):
        assert a == b


def test_simulated_devices_catch_a_missing_move():
    """The simulator is not vacuous: what would fail across two GPUs fails here."""
    with SimulatedDevices() as sim:
        a, b = torch.zeros(3, device=D1), torch.ones(3, device=D2)
        with pytest.raises(DeviceMismatch):
            a + b
        with pytest.raises(DeviceMismatch):
            a + torch.ones(3)                    # a host tensor with a device tensor
        lin = torch.nn.Linear(3, 2)
        sim.place(lin, 2)
        assert module_device(lin) == D2 and (a + b.to(D1)).device == D1
        with pytest.raises(DeviceMismatch):
            lin(a)


@pytest.mark.parametrize("family", FAMILIES)
def test_split_model_trains_edits_and_evaluates_like_one_device(family, load_tiny, images):
    bb = load_tiny(family)
    recs = records(images)
    torch.manual_seed(0)
    ref = run_everything(bb, recs)
    with SimulatedDevices() as sim:
        split(sim, bb)
        assert set(model_devices(bb.model)) == {D1, D2, D3} and bb.device == D1
        torch.manual_seed(0)
        got = run_everything(bb, recs)
        # trainable modules and memories follow the layer they read
        assert got["liveedit_device"] == D2 == module_device(bb.layer(2))
        assert got["ft_weight"].device == D2
        assert got["logits"].device == (D1 if family == "blip2" else D3)      # the LM head's device
    assert_same(ref, got)
    assert got["generated"][0] == got["generated"][1]
    torch.testing.assert_close(got["restored"], ref["logits"], rtol=0, atol=0)


def test_the_first_device_is_wrong_for_liveedit(load_tiny, images):
    """Negative control: LiveEdit's modules on the backbone's first device (the old placement) fail
    on the split model, so the test above does check the placement."""
    bb = load_tiny("llava")
    with SimulatedDevices() as sim:
        split(sim, bb)
        ed = liveedit(bb)
        ed.net.to(bb.device)
        ed.repository = type(ed.repository)(4, 32, 4, bb.hidden_size, device=bb.device)
        with pytest.raises(DeviceMismatch):
            ed.training_losses(records(images))


def test_training_cli_takes_dvc_auto(tiny_dirs, tmp_path, monkeypatch):
    """train_vllm_editor.py -dvc auto loads the backbone with accelerate's device map (without a GPU:
    on the CPU) and trains."""
    from test_precision import train_liveedit
    result = train_liveedit(tiny_dirs, tmp_path, monkeypatch, "-dvc", "auto")
    assert result.step == 2 and result.editor.device == module_device(result.editor.backbone.layer(2))
