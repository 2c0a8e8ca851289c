#!/usr/bin/env bash
# Every GPU check of the engine in one go, most wanted figures first, each step's output kept
# in LOG_DIR whatever the later steps do:
#   1. ResNet-50 dense vs DST (images/s, DST/dense ratio, topology update cost, memory),
#      and a profile of one topology update at batch 256,
#   2. the CUDA tests (fused masked update, no per-step host sync, fast options),
#   3. the per-step DST overhead of large-MLP on the GPU,
#   4. the loader vs the tensor data path on CIFAR-10-format data.
#
#   benchmarks/gpu.sh [LOG_DIR]          PYTHON="uv run python" by default
set -u
PY=${PYTHON:-uv run python}
LOG=${1:-gpu-logs}
mkdir -p "$LOG"
export PYTHONUNBUFFERED=1

step() {  # step NAME COMMAND...: run, keep its output in LOG/NAME.txt, say how long it took
    local name=$1
    shift
    local start=$SECONDS
    echo "== $name: $*"
    "$@" 2>&1 | tee "$LOG/$name.txt"
    echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - start)) s"
}

step device nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
step torch $PY -c 'import torch; print("torch", torch.__version__, torch.version.cuda)'
step resnet50 $PY -m benchmarks.resnet50 --device cuda --batches 64 128 256 --rounds 5
step update_profile $PY -m benchmarks.resnet50 --device cuda --batches 256 --profile-update
step test_cuda $PY -m pytest tests/dst/test_cuda.py -q -p no:cacheprovider
step step_overhead $PY -m benchmarks.step_overhead --device cuda --rounds 30
step data_path $PY -m benchmarks.data_path --device cuda --rounds 2
