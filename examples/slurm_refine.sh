#!/usr/bin/env bash
# Multi-node `mimcli refine` under Slurm: one torchrun per node, joined by torchrun's c10d
# rendezvous on the first node of the allocation. Submit with `sbatch examples/slurm_refine.sh`;
# adapt the #SBATCH lines, MODEL, DATA and OUT. RUN_DIR (OUT) must be on a filesystem every
# node sees: rank 0 writes config.json, metrics.jsonl, checkpoints and the export there.
#SBATCH --job-name=mimcli-refine
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
set -euo pipefail

MODEL=${MODEL:-vit_large_patch16_224.mae}
DATA=${DATA:-/datasets/imagenet/train}
OUT=${OUT:-runs/mae-l-refined}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}

HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
PORT=${PORT:-29500}

# `--resume` after a pre-emption: requeue the job with RESUME=1 (same options, same node count).
RESUME_FLAG=()
if [ "${RESUME:-0}" = 1 ]; then RESUME_FLAG=(--resume); fi

srun torchrun \
    --nnodes "$SLURM_JOB_NUM_NODES" --nproc-per-node "$GPUS_PER_NODE" \
    --rdzv-backend c10d --rdzv-endpoint "$HEAD_NODE:$PORT" --rdzv-id "$SLURM_JOB_ID" \
    -m mimcli.cli.app refine "$MODEL" --data "$DATA" --out "$OUT" \
    --blocks 17-24 --head-epochs 20 --epochs 20 --batch-size 1024 \
    --num-workers "$((SLURM_CPUS_PER_TASK / GPUS_PER_NODE))" "${RESUME_FLAG[@]}"
