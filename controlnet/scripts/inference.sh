#!/usr/bin/env bash
# Generate images that follow masks with a trained ControlNet; writes mask | image comparisons
# and prints timing and mask faithfulness (Dice/IoU of the Otsu-segmented images).
# Comparisons go beside the samples, to ${OUTPUT_DIR}_comparison (or --comparison_dir DIR).
# Every variable can be overridden from the environment: MASK_FOLDER=/masks bash scripts/inference.sh
# Extra arguments are passed on to inference.py: bash scripts/inference.sh --class_name tumour
set -euo pipefail

CHECKPOINT="${CHECKPOINT:-./controlnet_checkpoints/checkpoint_best.pt}"
LDM_CHECKPOINT="${LDM_CHECKPOINT:-../ldm/ldm_checkpoints/checkpoint_best.pt}"
MASK_FOLDER="${MASK_FOLDER:-/path/to/masks}"
OUTPUT_DIR="${OUTPUT_DIR:-./generated}"
NUM_IMAGES="${NUM_IMAGES:-1}"                 # images per mask
BATCH_SIZE="${BATCH_SIZE:-16}"
CONTROLNET_SCALE="${CONTROLNET_SCALE:-1.0}"   # 0 ignores the mask, 1 normal, 1.5+ strict
SCHEDULER="${SCHEDULER:-unipc}"               # unipc | dpm++ | ddim
STEPS="${STEPS:-25}"
SEED="${SEED:-42}"
PYTHON="${PYTHON:-python}"

HERE="$(cd "$(dirname "$0")/.." && pwd)"
"$PYTHON" "$HERE/inference.py" \
    --checkpoint "$CHECKPOINT" \
    --ldm_checkpoint "$LDM_CHECKPOINT" \
    --mask_folder "$MASK_FOLDER" \
    --output_dir "$OUTPUT_DIR" \
    --num_images "$NUM_IMAGES" \
    --batch_size "$BATCH_SIZE" \
    --controlnet_scale "$CONTROLNET_SCALE" \
    --scheduler "$SCHEDULER" \
    --num_inference_steps "$STEPS" \
    --seed "$SEED" \
    --save_comparison \
    --eval_masks \
    "$@"
