#!/usr/bin/env bash
# The GPU speed grid of issue 16, in one run on one GPU (about 5-8 minutes on an H200; stops starting new
# cells after --budget seconds so it ends within 10 minutes):
#   resnet50, convnext_tiny, vit_small_patch16_224, efficientnet_b0 at 224 px, S = 2 and 4;
#   training step (bf16 autocast, channels-last, SGD, co-training loss) at batch 256;
#   inference at batch 256, and at batch 1 with both sides replayed from CUDA graphs;
#   the original and each strategy interleaved in one run, medians, ratios to the original;
#   every strategy that misses its target is profiled (top kernels) into the JSON.
# Writes $OUT/gpu_speed.json (records) and $OUT/gpu_speed.md (the docs table), and first checks on the GPU
# that the packed members give the loop's outputs and gradients (tests/test_packing.py, under 80 s).
#
#   OUT=/tmp/out bash benchmarks/gpu_speed.sh             # on the GPU machine
#   bash benchmarks/gpu_speed.sh --dry-run                # tiny sizes on the CPU: checks the script runs
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
mkdir -p "$OUT"
MODELS="resnet50 convnext_tiny vit_small_patch16_224 efficientnet_b0"

if [[ "${1:-}" == "--dry-run" ]]; then
  # the same code paths at a tiny size on the CPU (no CUDA graphs there): nothing here is a timing
  exec python benchmarks/speed.py --device cpu --model $MODELS --split 2 --mode train infer \
    --train-batch 2 --batch 2 1 --img-size 32 --dtype bfloat16 --channels-last --strategy loop packed \
    --warmup 1 --repeats 2 --threads 1 --budget 300 --json "$OUT/gpu_speed_dry.json" \
    --markdown-out "$OUT/gpu_speed_dry.md"
fi

python - <<'EOF'
import torch
assert torch.cuda.is_available(), "no CUDA device: run with --dry-run on a CPU"
print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())
EOF
nvidia-smi --query-gpu=name,memory.used,memory.total,utilization.gpu --format=csv || true

# exactness on the GPU first (packed vs loop, fp32, eval and training): the families test
PACKING_DEVICE=cuda timeout 80 python -m pytest -q -p no:cacheprovider tests/test_packing.py -k "families" \
  -x 2>&1 | tail -3 | tee "$OUT/gpu_exactness.txt" || true

timeout 470 python benchmarks/speed.py --device cuda --model $MODELS --split 2 4 --mode train infer \
  --train-batch 256 --batch 256 1 --img-size 224 --dtype bfloat16 --channels-last --cudnn-benchmark \
  --cuda-graphs-max-batch 1 --strategy loop packed --warmup 3 --repeats 10 --profile-misses --budget 380 \
  --json "$OUT/gpu_speed.json" --markdown-out "$OUT/gpu_speed.md" 2>&1 | tee "$OUT/gpu_speed.log"
cat "$OUT/gpu_speed.md"
