"""FT-M, T-Patcher and GRACE: an edited state saved here and loaded in a new process gives the same
logits, bit for bit (one child process for the three, to keep the suite fast)."""
from editor_checks import assert_states_reload_in_new_process, mixed_samples
from editors import EDITORS
from fixtures import write_evqa
from test_ft_m import cfg as ftm_cfg
from test_grace import cfg as grace_cfg
from test_tp import cfg as tp_cfg
from vl_datasets import load_dataset


def test_states_reload_in_a_new_process(load_tiny, tiny_dirs, tmp_path):
    data_dir = write_evqa(tmp_path / "evqa", n=6, seed=1)
    records = load_dataset("EVQA", "eval", data_dir)
    bb, model = load_tiny("blip2"), tiny_dirs["blip2"]
    requests, samples = [r.edit for r in records[:2]], mixed_samples(records)
    cases = [(EDITORS.get("ft-m")(bb, ftm_cfg()), requests, samples, model, None),
             (EDITORS.get("tp")(bb, tp_cfg(), pool=records[2:]), requests, samples, model, data_dir),
             (EDITORS.get("grace")(bb, grace_cfg(epsilon_factor=3.0), pool=records[2:]), requests, samples, model,
              data_dir)]
    assert_states_reload_in_new_process(cases, tmp_path)
