#!/usr/bin/env bash
# The demo: DINO (`--config demo`) on the embedded generated data, then k-NN on that data's held-out val split with
# the trained teacher and with a randomly initialised backbone of the same architecture, and a table of both.
#
#   training_scripts/demo.sh [OUTPUT_DIR]        # default runs/demo; the python comes from $PYTHON (python3)
set -euo pipefail

PYTHON=${PYTHON:-python3}
OUT=${1:-runs/demo}
REPO=$(cd "$(dirname "$0")/.." && pwd)
CKPT="$OUT/dino/checkpoint.pth"

"$PYTHON" "$REPO/main_dino.py" --config demo --output_dir "$OUT/dino"

# Evaluate at the training resolution, with the architecture the checkpoint was trained with.
read -r ARCH PATCH SIZE < <("$PYTHON" -c "
import sys
sys.path.insert(0, sys.argv[1])
from core.checkpoint import load_file
args = load_file(sys.argv[2])['args']
print(args['arch'], args['patch_size'], args['global_crops_size'])" "$REPO" "$CKPT")

KNN=(--resize "$SIZE" --crop "$SIZE" --num_workers 2)
"$PYTHON" "$REPO/eval_knn.py" --pretrained_weights "$CKPT" "${KNN[@]}" --output_dir "$OUT/knn_trained"
"$PYTHON" "$REPO/eval_knn.py" --arch "$ARCH" --patch_size "$PATCH" "${KNN[@]}" --output_dir "$OUT/knn_random"

"$PYTHON" - "$OUT" "$ARCH/$PATCH" <<'PY'
import json
import sys
from pathlib import Path

out, arch = Path(sys.argv[1]), sys.argv[2]
trained = json.loads((out / "knn_trained" / "knn.json").read_text())
random = json.loads((out / "knn_random" / "knn.json").read_text())
print(f"\nk-NN top-1 (%) on the held-out split of the embedded data, {arch}:")
print(f"{'k':>5}  {'DINO teacher':>12}  {'random init':>11}")
for k in trained:
    print(f"{k:>5}  {trained[k]['top1']:>12.2f}  {random[k]['top1']:>11.2f}")
print(f"\noutputs: {out.resolve()}")
PY
