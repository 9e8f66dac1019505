#!/usr/bin/env bash
# Sample class folders from a trained DDPM. Edit the variables, then run: bash scripts/sample.sh
# NPROC>1 splits the images over processes with torchrun; existing images are kept and skipped.
set -euo pipefail

CKPT=${CKPT:-./models/DDPM_conditional/ckpt.pt}   # ckpt.pt, ckpt_best.pt or ema_ckpt.pt
OUTPUT_DIR=${OUTPUT_DIR:-./samples}                     # OUTPUT_DIR/<class_name>/<index:06d>.png (.tif: float data)
NUM_SAMPLES=${NUM_SAMPLES:-100}                          # in total, balanced over CLASS_LABELS
CLASS_LABELS=${CLASS_LABELS:-}                          # e.g. "0 1 2 3" or folder names; empty: all classes
CFG_SCALE=${CFG_SCALE:-3}
SAMPLER=${SAMPLER:-ddim}                             # ddim (fast) or ddpm (1000 ancestral steps)
STEPS=${STEPS:-50}
BATCH_SIZE=${BATCH_SIZE:-16}                            # per process
EMA_FLAG=${EMA_FLAG:---use-ema}                     # EMA weights (the default); --no-ema: raw weights
NPROC=${NPROC:-1}
PYTHON=${PYTHON:-python}
EXTRA_ARGS=${EXTRA_ARGS:-}                # any other flags, e.g. "--seed 1"

DDPM_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ARGS=(--ckpt "$CKPT" $EMA_FLAG --output-dir "$OUTPUT_DIR" --num-samples "$NUM_SAMPLES" --cfg-scale "$CFG_SCALE"
      --sampler "$SAMPLER" --steps "$STEPS" --batch-size "$BATCH_SIZE" --npz)
if [ -n "$CLASS_LABELS" ]; then ARGS+=(--class-labels $CLASS_LABELS); fi
ARGS+=($EXTRA_ARGS)

if [ "$NPROC" -gt 1 ]; then
    "$PYTHON" -m torch.distributed.run --nnodes=1 --nproc_per_node="$NPROC" "$DDPM_DIR/ddpm_conditional_ddp.py" --mode sample_ddp "${ARGS[@]}"
else
    "$PYTHON" "$DDPM_DIR/ddpm_conditional_ddp.py" --mode sample "${ARGS[@]}"
fi
