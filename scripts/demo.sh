#!/usr/bin/env bash
# `make demo`: MAL end to end on a CPU in a few minutes, using the synthetic shapes dataset.
#   1. write data/synthetic (COCO boxes + masks, also as .tar.gz archives)
#   2. train MAL (configs/mal/demo.yaml: tiny ViT, 64 px crops)
#   3. evaluate the best checkpoint (mIoU + mask AP against the synthetic ground truth)
#   4. write pseudo-label COCO JSON + overlay PNGs for every box of the val split
#
# Every command runs the project's own virtual environment explicitly (TAO_BIN, default .venv/bin): a fresh
# machine has neither `tao` nor a Python with the project's packages on PATH.
# DEMO_QUICK=1 runs the same commands with a shorter schedule (CI's proof that the README's command works).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
BIN="${TAO_BIN:-.venv/bin}"
if [ ! -x "${BIN}/tao" ]; then
    echo "ERROR: ${BIN}/tao not found: run 'make install' (or 'make demo', which installs first)" >&2
    exit 2
fi
TAO=("${BIN}/tao")
PY="${BIN}/python"
SPEC=configs/mal/demo.yaml
RESULTS=results/mal_demo
DATA=data/synthetic
EXTRA=()
if [ "${DEMO_QUICK:-0}" = "1" ]; then
    # Same data and commands; two epochs and one validation instead of the full schedule.
    EXTRA=(train.num_epochs=2 train.validation_interval=2 train.checkpoint_interval=2)
fi

T0=$(date +%s)
STEP_T=${T0}
STEP_TIMES=()
step_done() {  # step_done NAME: print and remember how long the step took
    local now
    now=$(date +%s)
    STEP_TIMES+=("$1: $((now - STEP_T)) s")
    echo "   ($1 took $((now - STEP_T)) s)"
    STEP_T=${now}
}

echo "== 1/4 synthetic dataset -> ${DATA}"
"${TAO[@]}" dataset synthetic --out "${DATA}" --seed 0 --num-train 96 --num-val 32 >/dev/null
step_done "dataset"

# A fresh run every time: re-running train on an existing results dir would resume (TAO behaviour).
rm -rf "${RESULTS}"

echo "== 2/4 train"
"${TAO[@]}" model mal train -e "${SPEC}" "${EXTRA[@]}"
step_done "train"

CKPT="${RESULTS}/train/mal_model_best.pth"   # the epoch with the best validation mIoU
echo "== 3/4 evaluate ${CKPT}"
"${TAO[@]}" model mal evaluate -e "${SPEC}" evaluate.checkpoint="${CKPT}"
step_done "evaluate"

echo "== 4/4 inference (pseudo-labels)"
"${TAO[@]}" model mal inference -e "${SPEC}" inference.checkpoint="${CKPT}"
step_done "inference"

METRICS="${RESULTS}/evaluate/metrics.json"
LABELS="${RESULTS}/inference/pseudo_labels.json"
echo
echo "MAL demo finished in $(( $(date +%s) - T0 )) s ($(IFS=,; echo "${STEP_TIMES[*]}" | sed 's/,/, /g'))."
echo "  checkpoints   : ${RESULTS}/train/ (best: ${CKPT})"
echo "  plots         : ${RESULTS}/train/plots/"
echo "  metrics       : ${METRICS}"
"${PY}" - "${METRICS}" "${LABELS}" <<'PY'
import json
import sys

metrics = json.load(open(sys.argv[1]))
shown = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
print("                  " + ", ".join(f"{k}={v}" if isinstance(v, int) else f"{k}={v:.3f}" for k, v in shown.items()))
labels = json.load(open(sys.argv[2]))
print(f"  pseudo-labels : {sys.argv[2]} ({len(labels['annotations'])} masks for {len(labels['images'])} images)")
PY
echo "  overlays      : ${RESULTS}/inference/overlays/"
