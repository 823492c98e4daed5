#!/usr/bin/env bash
# GPU supplement of docs/results.md: WRN-16-8 on a 10,000-image class-balanced Fashion-MNIST subset (1,000 per
# class), single x 5 seeds and S=2 x 5 seeds, the seed's views, bf16 autocast, channels-last, data on the GPU,
# JOBS processes at once. Sized for one H200 in under 10 minutes (EPOCHS=30: a --measure pass prints the real
# cost first; rerun with another EPOCHS if it says so).
#
# Prepare here (runs/ is git-ignored; 30 MB of IDX files and 115 kB of pure-Python packages):
#     mkdir -p runs/fashion-mnist && cp /usr/share/datasets/fashion-mnist/*-ubyte.gz runs/fashion-mnist/
#     python -m pip download --no-deps -d runs/wheels fvcore iopath yacs termcolor   # count() needs fvcore
# and carry both folders to the device machine (the run tool: carry=["runs/fashion-mnist", "runs/wheels"];
# command: bash benchmarks/science_gpu.sh, timeout_s 600). The packages are installed to /tmp/site only where
# fvcore is missing. Records go to runs/science_gpu/ and, when $OUT is set, are packed into
# $OUT/science_gpu_records.tar with the log and results_gpu.md (the device returns at most 8 files), also when
# the run is stopped. Unpack into docs/science/ and run `python benchmarks/science.py --report` to put the table
# in docs/results.md:  tar -xf science_gpu_records.tar -C docs/science
#
# CPU dry run at a tiny size:
#     DEVICE=cpu WIDTH=1 PER_CLASS=10 EPOCHS=1 SEEDS="0 1" JOBS=2 RECORDS=/tmp/sci_gpu_dry OUT=/tmp/sci_gpu_out \
#         bash benchmarks/science_gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."

DATA=${DATA:-runs/fashion-mnist}
DEVICE=${DEVICE:-cuda}
WIDTH=${WIDTH:-8}
PER_CLASS=${PER_CLASS:-1000}
EPOCHS=${EPOCHS:-30}
SEEDS=${SEEDS:-0 1 2 3 4}
JOBS=${JOBS:-5}
RECORDS=${RECORDS:-runs/science_gpu}
WHEELS=${WHEELS:-runs/wheels}
PY=${PY:-python3}
export PYTHONUNBUFFERED=1
if [ -n "${OUT:-}" ]; then
    exec > >(tee -a "$OUT/science_gpu.log") 2>&1
    pack() { [ -d "$RECORDS" ] && tar -cf "$OUT/science_gpu_records.tar" -C "$RECORDS" . || true; }
    trap pack EXIT
    trap "exit 143" TERM INT
fi
if ! "$PY" -c "import fvcore" 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target /tmp/site \
        "$WHEELS"/* && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

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
"$PY" benchmarks/science.py "${ARGS[@]}" --measure
"$PY" benchmarks/science.py "${ARGS[@]}"
"$PY" benchmarks/science.py --report --records "$RECORDS" --results-md "$RECORDS/results_gpu.md" --data-dir "$DATA"
echo "science_gpu.sh: $(( $(date +%s) - start )) s in all; records in $RECORDS"
