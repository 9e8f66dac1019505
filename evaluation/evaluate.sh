#!/usr/bin/env bash
# FID + precision/recall (and optionally sFID, density/coverage, KID, IS, FD-DINOv2, FRD) of generated images.
# Edit the variables below, or set them in the environment: REAL_DIR=... GEN_DIR=... bash evaluate.sh
# Extra flags after the script name are passed on too:  bash evaluate.sh --max-samples 10000
set -euo pipefail

PYTHON="${PYTHON:-python}"
REAL_DIR="${REAL_DIR:-/path/to/real/images}"          # folder (searched recursively) or .npz with arr_0
GEN_DIR="${GEN_DIR:-/path/to/generated/images}"      # e.g. the sampler's <out> folder with <class_name>/ sub-folders
METRICS="${METRICS:-fid,precision/recall}"           # any of fid, sfid, pr, dc, kid, isc, fd-dinov2, frd
BATCH_SIZE="${BATCH_SIZE:-32}"
DEVICE="${DEVICE:-}"                                 # empty: cuda when available, else cpu
NUM_WORKERS="${NUM_WORKERS:-4}"
PR_FEATURES="${PR_FEATURES:-vgg16}"                  # vgg16 (Kynkaanniemi et al.) or inception (ADM tables)
PER_CLASS="${PER_CLASS:-0}"                          # 1: also report every metric per class sub-folder
JSON_OUT="${JSON_OUT:-}"                             # e.g. results/eval.json
CACHE_DIR="${CACHE_DIR:-}"                           # empty: $TORCH_HOME/fidelity_cache
INCEPTION_WEIGHTS="${INCEPTION_WEIGHTS:-}"           # offline: path to weights-inception-2015-12-05-6726825d.pth
VGG_WEIGHTS="${VGG_WEIGHTS:-}"                       # offline: path to vgg16-397923af.pth
DINOV2_MODEL="${DINOV2_MODEL:-dinov2-vit-l-14}"       # FD-DINOv2 backbone: dinov2-vit-{s,b,l,g}-14
DINOV2_WEIGHTS="${DINOV2_WEIGHTS:-}"                 # offline: path to dinov2_vitl14_pretrain.pth (of that model)
BIT_DEPTH="${BIT_DEPTH:-}"                           # empty: found per side by one scan; e.g. 12 for CT in 16-bit files

args=(--real "$REAL_DIR" --gen "$GEN_DIR" --metrics "$METRICS" --batch-size "$BATCH_SIZE"
      --num-workers "$NUM_WORKERS" --pr-features "$PR_FEATURES" --dinov2-model "$DINOV2_MODEL")
[[ -n "$DEVICE" ]] && args+=(--device "$DEVICE")
[[ "$PER_CLASS" == 1 ]] && args+=(--per-class)
[[ -n "$JSON_OUT" ]] && args+=(--json "$JSON_OUT")
[[ -n "$CACHE_DIR" ]] && args+=(--cache-dir "$CACHE_DIR")
[[ -n "$INCEPTION_WEIGHTS" ]] && args+=(--inception-weights "$INCEPTION_WEIGHTS")
[[ -n "$VGG_WEIGHTS" ]] && args+=(--vgg-weights "$VGG_WEIGHTS")
[[ -n "$DINOV2_WEIGHTS" ]] && args+=(--dinov2-weights "$DINOV2_WEIGHTS")
[[ -n "$BIT_DEPTH" ]] && args+=(--bit-depth "$BIT_DEPTH")

exec "$PYTHON" "$(dirname "$0")/precision_recall.py" "${args[@]}" "$@"
