#!/usr/bin/env bash
# Train a mask-guided ControlNet on top of a trained LDM.
# Data: $DATA_ROOT/images/* and $DATA_ROOT/masks/* paired by stem, or by prefix mapping
# (IMAGE_PREFIX=Img_ MASK_PREFIX=seg_ pairs Img_001.png with seg_001.png).
# Every variable can be overridden from the environment: DATA_ROOT=/data bash scripts/train.sh
# Extra arguments are passed on to train.py: bash scripts/train.sh --resume latest
# The images' bit depth is found by scanning them; override it with e.g. --bit_depth 12, or give float
# TIFFs their value range with --intensity_range -1000 1000.
set -euo pipefail

DATA_ROOT="${DATA_ROOT:-/path/to/data}"
LDM_CHECKPOINT="${LDM_CHECKPOINT:-../ldm/ldm_checkpoints/checkpoint_best.pt}"
OUTPUT_DIR="${OUTPUT_DIR:-./controlnet_checkpoints}"
IMAGE_PREFIX="${IMAGE_PREFIX:-}"
MASK_PREFIX="${MASK_PREFIX:-}"
BATCH_SIZE="${BATCH_SIZE:-8}"                 # per process
NUM_EPOCHS="${NUM_EPOCHS:-100}"
LEARNING_RATE="${LEARNING_RATE:-1e-5}"
MASK_CHANNELS="${MASK_CHANNELS:-1}"           # 1: grayscale or label-map masks, 3: RGB masks
MIXED_PRECISION="${MIXED_PRECISION:-fp16}"    # no | fp16 | bf16 (CPU falls back to fp32)
NUM_GPUS="${NUM_GPUS:-1}"                     # more than 1: one process per GPU via torchrun
PYTHON="${PYTHON:-python}"

HERE="$(cd "$(dirname "$0")/.." && pwd)"
ARGS=(--data_root "$DATA_ROOT" --images_folder images --masks_folder masks
      --image_prefix "$IMAGE_PREFIX" --mask_prefix "$MASK_PREFIX"
      --ldm_checkpoint "$LDM_CHECKPOINT" --output_dir "$OUTPUT_DIR"
      --batch_size "$BATCH_SIZE" --num_epochs "$NUM_EPOCHS" --learning_rate "$LEARNING_RATE"
      --mask_channels "$MASK_CHANNELS" --freeze_unet --mixed_precision "$MIXED_PRECISION")

if [ "$NUM_GPUS" -gt 1 ]; then
    "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NUM_GPUS" "$HERE/train.py" "${ARGS[@]}" "$@"
else
    "$PYTHON" "$HERE/train.py" "${ARGS[@]}" "$@"
fi
