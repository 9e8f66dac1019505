#!/usr/bin/env bash
# Train the noise-aware latent classifier that guides a trained LDM (classifier guidance, ADM).
# Edit the variables, then run: bash scripts/train_classifier.sh ; sample with
#   python inference.py --checkpoint "$LDM" --classifier "$OUTPUT_DIR/checkpoint_best.pt" --classifier_scale 3
# NUM_GPUS > 1 launches one process per GPU with accelerate (DDP).
set -euo pipefail
cd "$(dirname "$0")/.."

DATA_ROOT=/path/to/data                 # data_root/<class_name>/*.png, the LDM's classes
LDM=./ldm_checkpoints/checkpoint_best.pt  # supplies the VAE, noise schedule, latent shape and classes
OUTPUT_DIR=./ldm_classifier
BATCH_SIZE=64                           # per GPU
NUM_EPOCHS=50
LEARNING_RATE=3e-4
BASE_CHANNELS=64                        # width of the encoder
DEPTH=2                                 # residual blocks per level
MIXED_PRECISION=fp16                    # no | fp16 | bf16 (CPU falls back to fp32)
NUM_GPUS=1

ARGS=(--data_root "$DATA_ROOT" --ldm_checkpoint "$LDM" --output_dir "$OUTPUT_DIR"
      --batch_size "$BATCH_SIZE" --num_epochs "$NUM_EPOCHS" --learning_rate "$LEARNING_RATE"
      --base_channels "$BASE_CHANNELS" --depth "$DEPTH" --cache_latents
      --mixed_precision "$MIXED_PRECISION" "$@")

if [ "$NUM_GPUS" -gt 1 ]; then
    accelerate launch --multi_gpu --num_processes "$NUM_GPUS" train_classifier.py "${ARGS[@]}"
else
    python train_classifier.py "${ARGS[@]}"
fi
