#!/usr/bin/env bash
# Proves csrc/cuda/*.cu compile without a GPU: nvcc -> object files for sm_80 and sm_90a, with
# torch's headers. Exit 0 when every file compiles for every target, 1 otherwise (or when nvcc or
# torch is missing: that is a failure to prove, not a pass). Usage: scripts/check_cuda_compile.sh [-v]
set -u
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"; [ -x "$PY" ] || PY=python3
NVCC="${NVCC:-$(command -v nvcc || echo /usr/local/bin/nvcc)}"
[ -x "$NVCC" ] || { echo "check_cuda_compile: nvcc not found" >&2; exit 1; }
INC=$("$PY" -c 'from torch.utils.cpp_extension import include_paths; print(" ".join("-I"+p for p in include_paths()))') \
  || { echo "check_cuda_compile: torch not importable with $PY" >&2; exit 1; }
PYINC=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
# A CPU-only torch wheel ships c10/cuda headers without their generated cuda_cmake_macros.h.
EXTRA=""; [ -e "$("$PY" -c "import torch,os;print(os.path.dirname(torch.__file__))")/include/c10/cuda/impl/cuda_cmake_macros.h" ] || EXTRA="-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE"
ABI=$("$PY" -c 'import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))')
VERBOSE=""; [ "${1:-}" = "-v" ] && VERBOSE="-Xptxas -v"
TMP=$(mktemp -d); trap 'rm -rf "$TMP"' EXIT
status=0
for f in "$ROOT"/csrc/cuda/*.cu; do
  [ -e "$f" ] || { echo "check_cuda_compile: no .cu files" >&2; exit 1; }
  # one nvcc call per file, both device targets (the host pass, the slow part, runs once)
  gen="-gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90a,code=sm_90a"
  for once in 1; do
    if timeout 600 "$NVCC" -c "$f" -o "$TMP/$(basename "$f").o" -std=c++17 -O3 \
        $gen $INC -I"$PYINC" -DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H $EXTRA \
        -D_GLIBCXX_USE_CXX11_ABI=$ABI --use_fast_math -Xcompiler -fPIC \
        -U__CUDA_NO_HALF_OPERATORS__ -U__CUDA_NO_HALF_CONVERSIONS__ \
        -U__CUDA_NO_BFLOAT16_OPERATORS__ -U__CUDA_NO_BFLOAT16_CONVERSIONS__ $VERBOSE; then
      echo "ok   $(basename "$f") sm_80 sm_90a"
    else
      echo "FAIL $(basename "$f")"; status=1
    fi
  done
done
exit $status
