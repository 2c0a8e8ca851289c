#!/usr/bin/env bash
# Every GPU check of the engine in one go, most wanted first, each step's output kept in
# LOG_DIR whatever the later steps do, each step cut off after its time limit:
#   1. the CUDA tests (the fused masked update: one launch, no host sync, the CPU's result;
#      no host sync per step or per update, fast options, two ranks sharing the GPU),
#   2. ResNet-50 at batch 64, where the host paces an H200: DST/dense with auto's kernel
#      (fused); a dense and a DST step profiled side by side at bf16 (channels-last and not);
#      DST/dense with the compiled and foreach kernels,
#   3. the host's time in a MaskedSGD step per kernel,
#   4. ResNet-50 dense vs DST at batch 64 and 256 (images/s, DST/dense ratio, topology update
#      cost, memory),
#   5. one ResNet-50 topology update at batch 256, all layers at once and layer by layer:
#      its time, host synchronizations and profile,
#   6. the per-step DST overhead of large-MLP on the GPU,
#   7. the loader vs the tensor data path on CIFAR-10-format data.
#
#   benchmarks/gpu.sh [LOG_DIR]          PYTHON="uv run python" by default
#   ONLY="test_cuda resnet50_b64" benchmarks/gpu.sh LOG_DIR     only the steps named
set -u
PY=${PYTHON:-uv run python}
LOG=${1:-gpu-logs}
mkdir -p "$LOG"
export PYTHONUNBUFFERED=1

step() {  # step NAME SECONDS COMMAND...: run, keep its output in LOG/NAME.txt, say how long
    local name=$1 limit=$2
    shift 2
    if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then
        return
    fi
    local start=$SECONDS
    echo "== $name: $*"
    timeout "$limit" "$@" 2>&1 | tee "$LOG/$name.txt"
    echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - start)) s"
}

B64=(-m benchmarks.resnet50 --device cuda --batches 64 --rounds 8 --steps 15)
step device 20 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
step torch 60 $PY -c 'import torch, triton; print("torch", torch.__version__, torch.version.cuda, "triton", triton.__version__)'
step test_cuda 240 $PY -m pytest tests/dst/test_cuda.py -q -p no:cacheprovider
step resnet50_b64 120 $PY "${B64[@]}"
step profile_b64 150 $PY "${B64[@]}" --precision bf16 --profile-steps
step resnet50_b64_compiled 120 $PY "${B64[@]}" --kernel compiled
step resnet50_b64_foreach 120 $PY "${B64[@]}" --kernel foreach
step optimizer_overhead 60 $PY -m benchmarks.optimizer_overhead --device cuda
step resnet50 240 $PY -m benchmarks.resnet50 --device cuda --batches 64 256 --rounds 5
step update_profile 120 $PY -m benchmarks.resnet50 --device cuda --batches 256 --profile-update --rounds 5
step step_overhead 90 $PY -m benchmarks.step_overhead --device cuda --rounds 10
step data_path 120 $PY -m benchmarks.data_path --device cuda --rounds 2
