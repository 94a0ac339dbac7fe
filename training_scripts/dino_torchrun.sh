#!/usr/bin/env bash
# DINO on one or more nodes with torchrun. Run this on every node.
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 CONFIG=vit_small_pod16 DATA=/data/imagenet/train OUT=runs/s16 \
#       training_scripts/dino_torchrun.sh [extra main_dino.py flags]
set -euo pipefail
cd "$(dirname "$0")/.."
exec torchrun --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" --nproc_per_node "${GPUS_PER_NODE:-8}" \
    --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
    main_dino.py --config "${CONFIG:-vit_small_pod16}" --data_path "${DATA:?set DATA to the image folder}" \
    --output_dir "${OUT:-runs/dino}" "$@"
