#!/usr/bin/env bash
# Train a DiT on DATA/<class_name>/<images> with torchrun (one process per GPU; gloo on CPU).
# Edit the variables, then run from anywhere: bash dit/scripts/train.sh
set -euo pipefail
MODEL="DiT-B/2"              # DiT-S/2 ... DiT-XL/8
DATA="/path/to/data"         # DATA/<class_name>/*.png
RESULTS="./results"          # runs go to RESULTS/NNN-<model>/
IMAGE_SIZE=256               # multiple of 8 x patch size
GLOBAL_BATCH=256             # over all processes
EPOCHS=1400
GPUS=4
VAE="ema"                    # ema, mse or a local diffusers folder (offline machines)
EXTRA=(--cache-latents)      # e.g. --compile --grad-checkpointing --bit-depth 12 --resume RESULTS/000-DiT-B-2

cd "$(dirname "$0")/.."
torchrun --nnodes=1 --nproc_per_node="$GPUS" train.py \
    --model "$MODEL" --data-path "$DATA" --results-dir "$RESULTS" --image-size "$IMAGE_SIZE" \
    --global-batch-size "$GLOBAL_BATCH" --epochs "$EPOCHS" --vae "$VAE" "${EXTRA[@]}"
