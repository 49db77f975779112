#!/usr/bin/env bash
# The GPU checks of the decode kernels in one command (at most 9.5 minutes on an H100): the Gluon kernel's tests,
# one decode-attention layer per kernel and pair (Gluon with plain loads and with its cp.async ring, Triton,
# bf16 SDPA), whole CUDA-graph decode steps beside the strong bf16 baseline, and a launch sweep of the ring.
#
#     bash benchmarks/gpu_decode_checks.sh OUT_DIR     (from the repository root; needs optuna for the plans)
set -uo pipefail
out=${1:?usage: bash benchmarks/gpu_decode_checks.sh OUT_DIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=src
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/device.txt"
git rev-parse --short HEAD 2>/dev/null | tee -a "$out/device.txt"
timeout 150 python benchmarks/ab_gluon_decode.py --out "$out/gluon_ab.md" 2>&1 | tail -30
timeout 110 python -m pytest -q -p no:cacheprovider -n 8 tests/test_gluon_decode.py 2>&1 | tee "$out/gluon_tests.log" | tail -8
timeout 240 python benchmarks/ab_decode_kernels.py --repeats 1 --configs C3.25,KV4 --max-batch-configs C3.25 \
    --out "$out/decode_steps.md" 2>&1 | tail -25
timeout 60 python benchmarks/sweep_gluon_launch.py --pairs 42,22,44,43 --shapes 64x4096 \
    --launches none/4/0,168/9/0,168/3/3,168/9/3,none/9/2,168/9/4 2>&1 | tee "$out/sweep.txt"
