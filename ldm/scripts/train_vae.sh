#!/usr/bin/env bash
# Train a domain VAE (or fine-tune the SD VAE) for the LDM. Run: bash scripts/train_vae.sh
# Then train the LDM with: --vae_pretrained "$OUTPUT_DIR/best"
set -euo pipefail
cd "$(dirname "$0")/.."

DATA_ROOT=/path/to/data                 # same layout as train.py: data_root/<class_name>/*
OUTPUT_DIR=./vae_checkpoints
IMAGE_SIZE=256
BATCH_SIZE=8
NUM_EPOCHS=50
LEARNING_RATE=1e-4
FINETUNE_FROM=""                        # e.g. stabilityai/sd-vae-ft-mse; empty = from scratch
MIXED_PRECISION=bf16

ARGS=(--data_root "$DATA_ROOT" --output_dir "$OUTPUT_DIR" --image_size "$IMAGE_SIZE"
      --batch_size "$BATCH_SIZE" --num_epochs "$NUM_EPOCHS" --learning_rate "$LEARNING_RATE"
      --mixed_precision "$MIXED_PRECISION")
if [ -n "$FINETUNE_FROM" ]; then
    ARGS+=(--vae_pretrained "$FINETUNE_FROM")
fi
python train_vae.py "${ARGS[@]}" "$@"
