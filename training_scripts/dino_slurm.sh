#!/usr/bin/env bash
# DINO under SLURM, one task per GPU: the published ViT-B/16 recipe on 2 nodes x 8 GPUs (global batch 1024).
#   DATA=/data/imagenet/train OUT=runs/b16 sbatch training_scripts/dino_slurm.sh
#SBATCH --job-name=dino
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=10
#SBATCH --time=72:00:00
set -euo pipefail
export MASTER_PORT=${MASTER_PORT:-29500}
# Requeued or restarted jobs resume from $OUT/checkpoint.pth automatically.
srun python main_dino.py --config "${CONFIG:-vit_base_pod16}" --data_path "${DATA:?set DATA}" \
    --output_dir "${OUT:-runs/dino_slurm}" "$@"
