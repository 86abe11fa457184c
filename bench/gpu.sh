#!/usr/bin/env bash
# The real-size KD step on a CUDA GPU in bf16 (bf16 teacher weights, student under bf16 autocast with float32 master
# weights), with MFU: model FLOPs over the GPU's peak dense bf16 FLOP/s (known for H100/H200/A100/L40S/A10/L4; pass
# --peak-tflops N otherwise). Extra arguments go to bench/real_size.py.
#     bash bench/gpu.sh [--peak-tflops 989] [--length 2048]
# Not run by the tests: the suite never needs a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
"$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU visible to torch')"
"$PYTHON" bench/real_size.py --device cuda --dtype bfloat16 --repeats 3 "$@"
