"""Run train_vllm_editor.main with the test editors registered, under `accelerate launch`.

    python -m accelerate.commands.launch ... tests/dp_launcher.py OUT_DIR [train flags...]

Each process also writes, for the test to compare, OUT_DIR/rank<i>.safetensors (its final trainable
weights) and OUT_DIR/rank<i>.json (the record indices of every batch it trained on)."""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from safetensors.torch import save_file  # noqa: E402

import dummy_editor  # noqa: E402
import train_vllm_editor  # noqa: E402

if __name__ == "__main__":
    out = Path(sys.argv[1])
    dummy_editor.register()
    result = train_vllm_editor.main(sys.argv[2:])
    from accelerate.state import PartialState
    rank = PartialState().process_index
    save_file(result.editor.trainable_state_dict(), str(out / f"rank{rank}.safetensors"))
    (out / f"rank{rank}.json").write_text(json.dumps({"seen": result.editor.seen,
                                                      "checkpoint": str(result.final_checkpoint)}))
