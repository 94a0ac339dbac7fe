#!/usr/bin/env bash
# DINO ViT-B/16, the published recipe on 64 accelerators (config vit_base_pod64: 16 images x 64 = 1024).
#
#   training_scripts/vit_base_pod64.sh --hosts HOST1[,HOST2...] [--rdzv HOST[:PORT]] [main_dino.py flags]
#
# GPUs (default) or Gaudi HPUs (DEVICE=hpu; LAUNCHER=launch for torch.distributed.launch): 8 nodes x 8,
#   torchrun on each listed host, meeting at --rdzv (default: the first host).
# IPUs (DEVICE=ipu): poprun over an IPU-POD64, 8 replicas x 8 IPUs (config vit_base_pod64_ipu).
# Flags not listed in training_scripts/pod.sh go to main_dino.py (e.g. --data_path, --output_dir). Run again with the
# same --output_dir to resume from its checkpoint.pth. DRY_RUN=1 prints the command instead of running it.
set -euo pipefail
source "$(dirname "$0")/pod.sh"
pod_launch main_dino.py vit_base_pod64 64 8 "$@"
