#!/usr/bin/env bash
# Real-size figures measured on a GPU (issue 16, item 5), in one go (about 10 minutes on one H200):
#   1. BLIP-2 OPT-2.7B and LLaVA-1.5-7B at full depth in bfloat16 on cuda:0: every editor's training
#      steps, 10 edits and the batched evaluation, with torch's peak memory per phase;
#   2. LLaVA-1.5-7B spread by accelerate with --max_memory 8GiB per GPU (on one GPU: the layers that do
#      not fit are offloaded to the CPU and run on the GPU), LiveEdit and FT-L; then a check that its
#      logits fingerprint equals run 1's (same seed: same weights).
# --max_memory 24GiB does not split a 7B model in bfloat16 (13.2 GiB of weights; accelerate's map counts
# weights only): 8GiB forces the split. On a machine with several GPUs, 24GiB mimics 24 GB cards.
# Usage: bash scripts/gpu_real_size.sh [OUT_DIR]      (default: $OUT, else records/real_size)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-records/real_size}}
mkdir -p "$OUT_DIR"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT_DIR/gpu.txt"
python -m scripts.real_size --backbones blip2,llava -dvc cuda:0 --dtype bf16 --fingerprint \
    --json "$OUT_DIR/full_depth.json" 2>&1 | tee "$OUT_DIR/full_depth.log"
python -m scripts.real_size --backbones llava --editors liveedit,ft-l -dvc auto --max_memory "${MAX_MEMORY:-8GiB}" \
    --dtype bf16 --fingerprint --json "$OUT_DIR/split.json" 2>&1 | tee "$OUT_DIR/split.log"
python - "$OUT_DIR" <<'PY'
import json, sys
out = sys.argv[1]
one = {b["backbone"]: b for b in json.load(open(f"{out}/full_depth.json"))["backbones"]}
split = json.load(open(f"{out}/split.json"))["backbones"][0]
a, b = one[split["backbone"]]["logits_fingerprint"], split["logits_fingerprint"]
rel = abs(a["sum"] - b["sum"]) / max(abs(a["sum"]), 1e-9)
ok = a["last_argmax"] == b["last_argmax"] and rel < 1e-3 and b["finite"]
print(f"split over {split['devices']} ({len(set(split['device_map'].values()))} placements): "
      f"logits fingerprint {b} vs one device {a}: {'SAME' if ok else 'DIFFERENT'}")
sys.exit(0 if ok else 1)
PY
