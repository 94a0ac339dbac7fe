#!/usr/bin/env bash
# The demo: DINO (`--config demo`, k-NN monitor every epoch) on the embedded generated data, then k-NN on that data's
# held-out val split with the trained teacher and with a randomly initialised backbone of the same architecture, a
# table of both, and the run's curves (loss, k-NN top-1, learning rate) as a PNG.
#
#   training_scripts/demo.sh [OUTPUT_DIR]        # default runs/demo; the python comes from $PYTHON (python3)
set -euo pipefail

PYTHON=${PYTHON:-python3}
OUT=${1:-runs/demo}
REPO=$(cd "$(dirname "$0")/.." && pwd)
CKPT="$OUT/dino/checkpoint.pth"

"$PYTHON" "$REPO/main_dino.py" --config demo --output_dir "$OUT/dino"

# Evaluate at the training resolution, with the architecture the checkpoint was trained with, resized and cropped as
# the k-NN monitor does, so the teacher's 20-NN top-1 below is the monitor's last value.
read -r ARCH PATCH SIZE RESIZE < <("$PYTHON" -c "
import sys
sys.path.insert(0, sys.argv[1])
from core.augment import eval_resize
from core.checkpoint import load_file
args = load_file(sys.argv[2])['args']
print(args['arch'], args['patch_size'], args['global_crops_size'], eval_resize(args['global_crops_size']))" \
    "$REPO" "$CKPT")

KNN=(--resize "$RESIZE" --crop "$SIZE" --num_workers 2)
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
records = [json.loads(line) for line in (out / "dino" / "log.txt").read_text().splitlines()]
print("\n20-NN top-1 (%) of the teacher after each epoch (the k-NN monitor): "
      + ", ".join(f"{r['knn_top1']:.1f}" for r in records if "knn_top1" in r))
print(f"\noutputs: {out.resolve()}")
PY

"$PYTHON" "$REPO/plot_logs.py" "$OUT/dino" --output "$OUT/curves.png"
