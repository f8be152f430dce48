"""Run train_vllm_editor.main with the test editors registered, under `accelerate launch`.

    PYTHONPATH=<repo> python -m accelerate.commands.launch ... tests/dp_launcher.py OUT_DIR [train flags...]

Each process also writes, for the test to compare, OUT_DIR/rank<i>.safetensors (its final trainable
weights) and OUT_DIR/rank<i>.json (the record indices of every batch it trained on)."""
import json
import sys
from pathlib import Path

from safetensors.torch import save_file

import dummy_editor  # tests/ is this script's folder, hence on sys.path
import train_vllm_editor  # the repository root is on PYTHONPATH (set by the test)

if __name__ == "__main__":
    out = Path(sys.argv[1])
    dummy_editor.register()
    result = train_vllm_editor.main(sys.argv[2:])
    from accelerate.state import PartialState
    rank = PartialState().process_index
    save_file(result.editor.trainable_state_dict(), str(out / f"rank{rank}.safetensors"))
    (out / f"rank{rank}.json").write_text(json.dumps({"seen": result.editor.seen,
                                                      "checkpoint": str(result.final_checkpoint)}))
