#!/usr/bin/env bash
# Classifier guidance of the LDM on real data (about 5 minutes on 2 CPU cores): scikit-learn's digits as
# 16 px class folders, a small VAE (train_vae.py), a tiny LDM sampled without classifier-free guidance
# (--cfg_scale 0, so the class comes from the classifier alone), a latent classifier (train_classifier.py),
# and 20 samples per digit at each classifier scale, read by demo/recognise.py (a classifier of the real
# 8x8 digits, independent of the guiding one). At scale 0 the share read as the asked digit is chance.
#   bash ldm/scripts/classifier_guidance_digits.sh [OUT_DIR] [SCALE ...]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
OUT=${1:-guided_ldm_digits}
shift || true
SCALES=("${@:-0 4 10}")
PY=${PYTHON:-$ROOT/.venv/bin/python}
LDM=$ROOT/ldm
export HF_HUB_OFFLINE=1
mkdir -p "$OUT" && cd "$OUT"
OUT=$(pwd)

"$PY" "$ROOT/demo/build_digits.py" --out-dir digits --size 16 > /dev/null
"$PY" "$LDM/train_vae.py" --data_root digits --output_dir vae --image_size 16 --block_out_channels 32 64 \
    --norm_num_groups 16 --layers_per_block 1 --batch_size 64 --num_epochs 15 --learning_rate 1e-3 \
    --lr_warmup_steps 20 --num_workers 0 --perceptual_weight 0
"$PY" "$LDM/train.py" --data_root digits --output_dir ldm --vae_pretrained vae/best --image_size 16 \
    --unet_preset tiny --batch_size 64 --num_epochs 40 --learning_rate 1e-3 --lr_warmup_steps 50 \
    --ema_decay 0.999 --num_workers 0 --cache_latents --sample_every 10 --save_every 100 --val_every 10
"$PY" "$LDM/train_classifier.py" --data_root digits --ldm_checkpoint ldm/checkpoint_final.pt --output_dir cls \
    --base_channels 32 --depth 1 --batch_size 64 --num_epochs 20 --learning_rate 1e-3 --lr_warmup_steps 20 \
    --ema_decay 0.99 --num_workers 0 --cache_latents --save_every 100 --val_every 5
for S in ${SCALES[*]}; do
    "$PY" "$LDM/inference.py" --checkpoint ldm/checkpoint_final.pt --output_dir "scale_$S" --num_samples 20 \
        --cfg_scale 0 --classifier cls/checkpoint_best.pt --classifier_scale "$S" --save_grid --batch_size 20
    echo "classifier_scale $S:"
    (cd "$ROOT/demo" && "$PY" recognise.py "$OUT/scale_$S")
done
