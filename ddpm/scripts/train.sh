#!/usr/bin/env bash
# Train the class-conditional DDPM. Edit the variables, then run from anywhere: bash scripts/train.sh
# NPROC=1 trains in one process; NPROC>1 uses torchrun (one process per GPU). RESUME=1 continues the run.
set -euo pipefail

DATASET_PATH=${DATASET_PATH:-/path/to/dataset}    # DATASET_PATH/<class_name>/<image>.png
RUN_NAME=${RUN_NAME:-DDPM_conditional}        # writes models/, results/, runs/ <RUN_NAME> under WORKDIR
WORKDIR=${WORKDIR:-.}
IMAGE_SIZE=${IMAGE_SIZE:-64}                    # multiple of 8, >= 16
BATCH_SIZE=${BATCH_SIZE:-8}                     # per process
EPOCHS=${EPOCHS:-100}
LR=${LR:-3e-4}
SAVE_INTERVAL=${SAVE_INTERVAL:-10}                 # epochs between checkpoints and sample grids
NPROC=${NPROC:-1}
PYTHON=${PYTHON:-python}
EXTRA_ARGS=${EXTRA_ARGS:-}                # any other flags, e.g. "--base-channels 32"
RESUME=${RESUME:-0}

DDPM_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ARGS=(--dataset-path "$DATASET_PATH" --run-name "$RUN_NAME" --workdir "$WORKDIR" --image-size "$IMAGE_SIZE"
      --batch-size "$BATCH_SIZE" --epochs "$EPOCHS" --lr "$LR" --save-interval "$SAVE_INTERVAL")
if [ "$RESUME" = 1 ]; then ARGS+=(--resume); fi
ARGS+=($EXTRA_ARGS)

if [ "$NPROC" -gt 1 ]; then
    "$PYTHON" -m torch.distributed.run --nnodes=1 --nproc_per_node="$NPROC" "$DDPM_DIR/ddpm_conditional_ddp.py" --mode train_ddp "${ARGS[@]}"
else
    "$PYTHON" "$DDPM_DIR/ddpm_conditional_ddp.py" --mode train "${ARGS[@]}"
fi
