#!/usr/bin/env bash
# DINO ViT-B/16, the published recipe on 256 accelerators (config vit_base_pod256: 4 images x 256 = 1024).
#
#   training_scripts/vit_base_pod256.sh --hosts HOST1[,HOST2...] [--rdzv HOST[:PORT]] [main_dino.py flags]
#
# GPUs (default) or Gaudi HPUs (DEVICE=hpu; LAUNCHER=launch for torch.distributed.launch): 32 nodes x 8,
#   torchrun on each listed host, meeting at --rdzv (default: the first host).
# IPUs (DEVICE=ipu): poprun over an IPU-POD256, 32 replicas x 8 IPUs (config vit_base_pod256_ipu).
# Flags not listed in training_scripts/pod.sh go to main_dino.py (e.g. --data_path, --output_dir). Run again with the
# same --output_dir to resume from its checkpoint.pth. DRY_RUN=1 prints the command instead of running it.
set -euo pipefail
source "$(dirname "$0")/pod.sh"
pod_launch main_dino.py vit_base_pod256 256 8 "$@"
