#!/usr/bin/env bash
# The GPU checks, on a machine with a CUDA GPU and PyTorch (with Triton) installed: the GPU tests
# and the GPU step-time benchmark. Usage: bash scripts/gpu_check.sh [OUT_DIR]
set -uo pipefail
out="${1:-benchmarks/results/gpu_step_time}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
# The CPU side of the comparisons takes the rules' PyTorch forward (the same math as the fused
# CPU kernels, without compiling them).
LEARNED_OPT_NO_EXT=1 timeout 300 python3 -m pytest -q -p no:cacheprovider \
    tests/test_gpu_step.py tests/test_optim.py -k "cuda or triton" 2>&1 | tee "$out/tests.log"
tests=$?
timeout 300 python3 benchmarks/gpu_step_time.py --out "$out" 2>&1 | tee "$out/bench.log"
bench=$?
echo "tests rc=$tests benchmark rc=$bench"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]
