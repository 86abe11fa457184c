#!/usr/bin/env bash
# The speed benches on a CUDA GPU in bf16, each printing MFU: model FLOPs over the GPU's peak dense bf16 FLOP/s (known
# for H100/H200/A100/L40S/A10/L4; pass --peak-tflops N otherwise).
#   1. the KD loss at V = 151,936 (bench/loss_memory.py): bf16 hidden states and heads, peak allocated memory
#   2. the KD step vs TRL's GKDTrainer (bench/step_throughput.py; TRL rows only where trl is importable, see its --help)
#   3. the real-size step, Qwen2.5-0.5B-shaped student and 1.5B-shaped teacher (bench/real_size.py)
# bf16 there: bf16 teacher weights, the student under bf16 autocast with float32 master weights.
#     bash bench/gpu.sh [--peak-tflops 989]
# Not run by the tests: the suite never needs a GPU. Takes a few minutes on an H100.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
"$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU visible to torch')"
export PYTHONPATH=".venv/trl${PYTHONPATH:+:$PYTHONPATH}"  # trl, when installed beside the venv (step_throughput.py)
echo "== KD loss, V=151,936, bf16"
"$PYTHON" bench/loss_memory.py --device cuda --dtype bfloat16 --tokens 4096 16384 --repeats 3 "$@"
echo "== KD step vs TRL, bf16"
"$PYTHON" bench/step_throughput.py --device cuda --dtype bfloat16 --batch 8 --length 512 --repeats 10 "$@"
echo "== real-size KD step, bf16"
"$PYTHON" bench/real_size.py --device cuda --dtype bfloat16 --length 2048 --repeats 5 "$@"
