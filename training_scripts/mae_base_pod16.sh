#!/usr/bin/env bash
# MAE ViT-B/16, the published recipe (config mae_base_pod16: 64 images x 16 accelerators x 4 accumulated = 4096).
#
#   training_scripts/mae_base_pod16.sh --hosts HOST1[,HOST2...] [--rdzv HOST[:PORT]] [main_pretrain_mae.py flags]
#
# GPUs (default) or Gaudi HPUs (DEVICE=hpu; LAUNCHER=launch for torch.distributed.launch): 2 nodes x 8,
#   torchrun on each listed host, meeting at --rdzv (default: the first host).
# IPUs: MAE has no IPU training step here (DEVICE=ipu stops with an error).
# Flags not listed in training_scripts/pod.sh go to main_pretrain_mae.py (e.g. --data_path, --output_dir). Run again
# with the same --output_dir to resume from its checkpoint.pth. DRY_RUN=1 prints the command instead of running it.
set -euo pipefail
source "$(dirname "$0")/pod.sh"
pod_launch main_pretrain_mae.py mae_base_pod16 16 0 "$@"
