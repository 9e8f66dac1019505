#!/usr/bin/env bash
# Generate TOTAL_SAMPLES images split evenly over the classes, for FID (resumable).
# NUM_GPUS > 1 shares the batches out over one process per GPU. Run: bash scripts/inference_per_class.sh
# --npz writes ${OUTPUT_DIR}_<N>x<H>x<W>x3.npz beside the sample folder.
set -euo pipefail
cd "$(dirname "$0")/.."

CHECKPOINT=./ldm_checkpoints/checkpoint_best.pt
OUTPUT_DIR=./generated_per_class
TOTAL_SAMPLES=8000
BATCH_SIZE=16
CFG_SCALE=3.0
SCHEDULER=ddim
STEPS=50
NUM_GPUS=1

ARGS=(--checkpoint "$CHECKPOINT" --output_dir "$OUTPUT_DIR" --total_samples "$TOTAL_SAMPLES"
      --batch_size "$BATCH_SIZE" --cfg_scale "$CFG_SCALE" --scheduler "$SCHEDULER"
      --num_inference_steps "$STEPS" --npz "$@")

if [ "$NUM_GPUS" -gt 1 ]; then
    accelerate launch --multi_gpu --num_processes "$NUM_GPUS" inference_per_class.py "${ARGS[@]}"
else
    python inference_per_class.py "${ARGS[@]}"
fi
