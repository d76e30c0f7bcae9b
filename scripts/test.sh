#!/usr/bin/env bash
# The test command (README; .ci/run calls it): set-up if needed, then the unit and vLLM tests.
# Tiny random models built in the tests (no real model, no download). The CUDA tests (marker `cuda`,
# tests/test_kernels_cuda.py) run where a GPU is and skip cleanly elsewhere. Extra arguments go to
# pytest (e.g. -m "not cuda").
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
bash scripts/setup.sh
PY="${SQPLUS_VENV:-$ROOT/.venv}/bin/python"
"$PY" -m pytest -q -p no:cacheprovider "$@" tests
