#!/usr/bin/env bash
# The GPU checks of the natural-images issue, as one script of under 10 minutes on one GPU:
#   1. cost of one training step, plain SimCLR vs. + robust-reg vs. ACL, step time and peak memory;
#   2. the full-size ResNet-18 on the CIFAR-10 subset for a few epochs, bf16 autocast and
#      channels-last, plain and with the regulariser, then a short evaluation of the robust one;
#   3. the demo on the GPU.
# Usage (from the repository root, the subset copied into the ignored datasets/ folder):
#   bash benchmarks/gpu_check.sh                      # on a CUDA machine
#   DEVICE=cpu EPOCHS=1 MODELS=cnn QUICK=1 bash benchmarks/gpu_check.sh   # a dry run on CPU
# Every figure goes to $OUT (default gpu-check/), with the GPU's name.
set -euo pipefail
DEVICE=${DEVICE:-cuda}
DATA=${DATA:-datasets/cifar10_subset.npz}
EPOCHS=${EPOCHS:-3}
MODELS=${MODELS:-cnn,resnet18}
OUT=${OUT:-gpu-check}
QUICK=${QUICK:-}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
log() { echo "[gpu_check $(date +%H:%M:%S)] $*"; }

python - <<PY | tee "$OUT/machine.txt"
import torch, robust_reg
print("robust-reg", robust_reg.__version__, "torch", torch.__version__)
print("device:", torch.cuda.get_device_name(0) if "$DEVICE".startswith("cuda") else "cpu")
PY

log "1. step cost (plain / robust-reg / ACL) on $MODELS"
python benchmarks/overhead.py --device "$DEVICE" --models "$MODELS" ${QUICK:+--repeats 2 --warmup 1} \
    --out "$OUT/overhead.json" 2>&1 | tee "$OUT/overhead.log"

ARCH=resnet18
[ -n "$QUICK" ] && ARCH=cnn
log "2. $ARCH on the subset, $EPOCHS epochs, bf16 + channels-last"
for weight in 0 1; do
    python examples/pretrain.py --dataset cifar10-subset --data-path "$DATA" --arch "$ARCH" \
        --epochs "$EPOCHS" --batch-size 256 --lr 2e-3 --epsilon 0.0313725 --robust-weight "$weight" \
        --device "$DEVICE" --channels-last --out "$OUT/r18_w$weight.pt" 2>&1 | tail -n 3 | tee -a "$OUT/pretrain.log"
done
robust-reg evaluate "$OUT/r18_w1.pt" --data-path "$DATA" --epsilons 0.0156863 0.0313725 \
    --aa-samples "${AA:-500}" ${QUICK:+--test-samples 100} --device "$DEVICE" --no-progress --out "$OUT/eval" 2>&1 | tail -n 25 | tee "$OUT/evaluate.log"
rm -f "$OUT"/r18_w*.pt  # checkpoints stay out of what comes back

log "3. the demo"
robust-reg demo --device "$DEVICE" --no-progress ${QUICK:+--quick} --out "$OUT/demo" 2>&1 | tail -n 20 | tee "$OUT/demo.log"
rm -rf "$OUT/demo"/*.pt "$OUT/demo"/*.png "$OUT/eval"/*.png  # figures as JSON and logs only: 8 files
log done
