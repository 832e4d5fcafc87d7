#!/usr/bin/env bash
# The accelerator check, in one call (about 2.5 minutes on an H200, start-up not counted):
#   1. train-step throughput, ours vs bench/reference_loops.py's plain JAX and PyTorch loop, small and large;
#   2. the attention tests on the GPU backend (the decoding tests passed there earlier);
#   3. bfloat16 matmuls (configs/gpu.py's dtype) on the large config against the plain-JAX
#      reference in float32 (issue 9 point 7; not yet run: add about 1.5 minutes).
# Usage on the device machine (carry .whl: ml_collections, tensorboardX wheels):
#   bench/gpu_check.sh OUTDIR
set -u
out=${1:-bench/results}; mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 100 python3 bench/train_speed.py --configs small,large --steps 10 --out "$out/train_speed_gpu.json"
timeout 45 python3 -m pytest -q -x -p no:cacheprovider tests/test_attention.py 2>&1 | tail -3
timeout 100 python3 bench/train_speed.py --configs large --steps 10 --references jax --output-chunks 512 --dtype bfloat16 --out "$out/train_speed_gpu_bf16.json"
