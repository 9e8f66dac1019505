#!/usr/bin/env bash
# Train the class-conditional LDM. Edit the variables, then run: bash scripts/train.sh
# NUM_GPUS > 1 launches one process per GPU with accelerate (DDP).
set -euo pipefail
cd "$(dirname "$0")/.."

DATA_ROOT=/path/to/data                 # data_root/<class_name>/*.png
OUTPUT_DIR=./ldm_checkpoints
VAE=stabilityai/sd-vae-ft-mse           # or a local folder, e.g. ./vae_checkpoints/best
IMAGE_SIZE=256
BATCH_SIZE=8                            # per GPU
NUM_EPOCHS=200
LEARNING_RATE=1e-4
UNET_PRESET=base                        # tiny | small | base | large
MIXED_PRECISION=fp16                    # no | fp16 | bf16 (CPU falls back to fp32)
NUM_GPUS=1

ARGS=(--data_root "$DATA_ROOT" --output_dir "$OUTPUT_DIR" --vae_pretrained "$VAE"
      --image_size "$IMAGE_SIZE" --batch_size "$BATCH_SIZE" --num_epochs "$NUM_EPOCHS"
      --learning_rate "$LEARNING_RATE" --unet_preset "$UNET_PRESET" --cfg_dropout 0.1
      --mixed_precision "$MIXED_PRECISION" "$@")

if [ "$NUM_GPUS" -gt 1 ]; then
    accelerate launch --multi_gpu --num_processes "$NUM_GPUS" train.py "${ARGS[@]}"
else
    python train.py "${ARGS[@]}"
fi
