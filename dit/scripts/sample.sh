#!/usr/bin/env bash
# Sample a few images per class, then an exact FID set with all GPUs (PNG class folders + .npz).
# Edit the variables, then run from anywhere: bash dit/scripts/sample.sh
set -euo pipefail
CKPT="./results/000-DiT-B-2/checkpoints/0050000.pt"   # or pretrained_models/DiT-XL-2-256x256.pt
OUT="./samples"
NUM_SAMPLES=8             # sample.py: total images, spread evenly over the classes
CFG=4.0                   # sample.py guidance; 1 = none
FID_SAMPLES=50000         # sample_ddp.py: exact total
FID_CFG=1.5
STEPS=250
GPUS=4

cd "$(dirname "$0")/.."
python sample.py --ckpt "$CKPT" --num-samples "$NUM_SAMPLES" --cfg-scale "$CFG" \
    --num-sampling-steps "$STEPS" --output-dir "$OUT/preview"
torchrun --nnodes=1 --nproc_per_node="$GPUS" sample_ddp.py --ckpt "$CKPT" \
    --num-fid-samples "$FID_SAMPLES" --cfg-scale "$FID_CFG" --num-sampling-steps "$STEPS" --output-dir "$OUT/fid"
