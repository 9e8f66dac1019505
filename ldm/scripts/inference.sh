#!/usr/bin/env bash
# Sample every class (or CLASS_LABEL only) from a trained LDM. Run: bash scripts/inference.sh
# Samples go to $OUTPUT_DIR/<class>/ at the data's bit depth; the preview grid to ${OUTPUT_DIR}_grid.png.
set -euo pipefail
cd "$(dirname "$0")/.."

CHECKPOINT=./ldm_checkpoints/checkpoint_best.pt
OUTPUT_DIR=./generated
CLASS_LABEL=""                          # a class name or index; empty = all classes
NUM_SAMPLES=10                          # per class
BATCH_SIZE=16
CFG_SCALE=3.0
SCHEDULER=ddim                          # ddim | dpmsolver++ | unipc
STEPS=50                                # 20-30 are enough for dpmsolver++ / unipc
SEED=42

ARGS=(--checkpoint "$CHECKPOINT" --output_dir "$OUTPUT_DIR" --num_samples "$NUM_SAMPLES"
      --batch_size "$BATCH_SIZE" --cfg_scale "$CFG_SCALE" --scheduler "$SCHEDULER"
      --num_inference_steps "$STEPS" --seed "$SEED" --save_grid)
if [ -n "$CLASS_LABEL" ]; then
    ARGS+=(--class_label "$CLASS_LABEL")
fi
python inference.py "${ARGS[@]}" "$@"
