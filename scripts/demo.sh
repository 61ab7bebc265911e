#!/usr/bin/env bash
# `make demo`: MAL end to end on a CPU in a few minutes, using the synthetic shapes dataset.
#   1. write data/synthetic (COCO boxes + masks, also as .tar.gz archives)
#   2. train MAL (configs/mal/demo.yaml: tiny ViT, 64 px crops)
#   3. evaluate the last checkpoint (mIoU + mask AP against the synthetic ground truth)
#   4. write pseudo-label COCO JSON + overlay PNGs for every box of the val split
# Run from the repository root with .venv/bin on PATH (the Makefile does both).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
SPEC=configs/mal/demo.yaml
RESULTS=results/mal_demo
DATA=data/synthetic

if command -v tao >/dev/null 2>&1; then
    TAO=(tao)
else
    TAO=(python -m tao_cli)
fi

echo "== 1/4 synthetic dataset -> ${DATA}"
if ! "${TAO[@]}" dataset synthetic --out "${DATA}" --seed 0 --num-train 96 --num-val 32 >/dev/null; then
    echo "'tao dataset synthetic' failed; generating with networks.common.synthetic directly"
    python -c "from networks.common.synthetic import generate; generate('${DATA}', seed=0, num_train=96, num_val=32)"
fi

# A fresh run every time: re-running train on an existing results dir would resume (TAO behaviour).
rm -rf "${RESULTS}"

echo "== 2/4 train"
"${TAO[@]}" model mal train -e "${SPEC}"

CKPT="${RESULTS}/train/mal_model_latest.pth"
echo "== 3/4 evaluate ${CKPT}"
"${TAO[@]}" model mal evaluate -e "${SPEC}" evaluate.checkpoint="${CKPT}"

echo "== 4/4 inference (pseudo-labels)"
"${TAO[@]}" model mal inference -e "${SPEC}" inference.checkpoint="${CKPT}"

echo
echo "MAL demo finished."
echo "  checkpoints   : ${RESULTS}/train/ (latest: ${CKPT})"
echo "  metrics       : ${RESULTS}/evaluate/metrics.json"
if [ -f "${RESULTS}/evaluate/metrics.json" ]; then
    python - "${RESULTS}/evaluate/metrics.json" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
print("                  " + ", ".join(f"{k}={v:.3f}" for k, v in m.items() if isinstance(v, (int, float))))
PY
fi
echo "  pseudo-labels : ${RESULTS}/inference/pseudo_labels.json"
echo "  overlays      : ${RESULTS}/inference/overlays/"
