#!/usr/bin/env bash
# The accelerator check, in one call (about 4 minutes on an H200, start-up not counted):
#   1. train-step throughput, ours vs bench/reference_loops.py's plain JAX and PyTorch loop, small
#      and large, float32 (the GPU's default matmul precision; PyTorch's TF32 likewise);
#   2. the large config with bfloat16 matmuls (configs/gpu.py's dtype) against the same references;
#   3. decoding at JoeyNMT's size (bench/decode_speed.py --model=joeynmt: greedy and beam 5), in
#      float32 and with bfloat16 matmuls (config.eval.decode_dtype);
#   4. the attention and decoding tests on the GPU backend.
# Usage on the device machine (carry .whl: the ml_collections and tensorboardX wheels):
#   bench/gpu_check.sh OUTDIR
set -u
out=${1:-bench/results}; mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 120 python3 bench/train_speed.py --configs small,large --steps 10 --out "$out/train_speed_gpu.json"
timeout 120 python3 bench/train_speed.py --configs large --steps 10 --output-chunks 512 --dtype bfloat16 \
  --out "$out/train_speed_gpu_bf16.json"
timeout 120 python3 bench/decode_speed.py --model=joeynmt && cp bench/results/decode_speed_joeynmt.json "$out/decode_speed_gpu.json"
timeout 120 python3 bench/decode_speed.py --model=joeynmt --decode_dtype=bfloat16 \
  && cp bench/results/decode_speed_joeynmt.json "$out/decode_speed_gpu_bf16.json"
timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/test_attention.py tests/test_decoding.py 2>&1 | tail -3
