#!/usr/bin/env bash
# GPU supplement of docs/results.md: WRN-16-8 on a 10,000-image class-balanced Fashion-MNIST subset (1,000 per
# class), single x 5 seeds and S=2 x 5 seeds, the seed's views, bf16 autocast, channels-last, data on the GPU,
# JOBS processes at once. Sized for one H200 in under 10 minutes (EPOCHS=30: a --measure pass prints the real
# cost first; rerun with another EPOCHS if it says so).
#
# Data: the four Fashion-MNIST IDX files under runs/fashion-mnist/ (runs/ is git-ignored):
#     mkdir -p runs/fashion-mnist && cp /usr/share/datasets/fashion-mnist/*-ubyte.gz runs/fashion-mnist/
# On a device machine, carry that folder with the working tree (the run tool's carry=["runs/fashion-mnist"]).
# Records go to $OUT/science when $OUT is set (so they come back from the device), else to docs/science; the
# report is written next to them (results_gpu.md). Merge the records into docs/science and run
# `python benchmarks/science.py --report` to put the table in docs/results.md.
#
# CPU dry run at a tiny size:
#     DEVICE=cpu WIDTH=1 PER_CLASS=10 EPOCHS=1 SEEDS="0 1" JOBS=2 RECORDS=/tmp/sci_gpu_dry bash benchmarks/science_gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."

DATA=${DATA:-runs/fashion-mnist}
DEVICE=${DEVICE:-cuda}
WIDTH=${WIDTH:-8}
PER_CLASS=${PER_CLASS:-1000}
EPOCHS=${EPOCHS:-30}
SEEDS=${SEEDS:-0 1 2 3 4}
JOBS=${JOBS:-5}
RECORDS=${RECORDS:-${OUT:-docs}/science}

for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
    if [ ! -f "$DATA/$f.gz" ] && [ ! -f "$DATA/$f" ]; then
        echo "missing $DATA/$f[.gz]: mkdir -p $DATA && cp /usr/share/datasets/fashion-mnist/*-ubyte.gz $DATA/" >&2
        exit 2
    fi
done
[ "$DEVICE" = cpu ] || nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader || true

# shellcheck disable=SC2086
ARGS=(--stage grid --tag gpu_wrn16_w${WIDTH} --arch wrn16 --width "$WIDTH" --per-class "$PER_CLASS"
      --epochs "$EPOCHS" --batch-size 128 --arms single s2 --seeds $SEEDS --device "$DEVICE" --amp
      --channels-last --data-dir "$DATA" --jobs "$JOBS" --records "$RECORDS")
start=$(date +%s)
python benchmarks/science.py "${ARGS[@]}" --measure
python benchmarks/science.py "${ARGS[@]}"
python benchmarks/science.py --report --records "$RECORDS" --results-md "$RECORDS/results_gpu.md" --data-dir "$DATA"
echo "science_gpu.sh: $(( $(date +%s) - start )) s in all; records in $RECORDS"
