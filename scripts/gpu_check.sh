#!/usr/bin/env bash
# On a GPU machine (H100/H200, torch with CUDA, nvcc): build the extension with the CUDA kernels,
# run the CUDA tests, then the CUDA benchmark. Logs and results go to $OUT (default /tmp/sqplus_gpu).
#   scripts/gpu_check.sh [all|build|test|bench|sanitize]...   (default: build test bench)
# Exit status: non-zero when the build or the tests fail.
set -o pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/sqplus_gpu}"; mkdir -p "$OUT"
PY="${PYTHON:-python3}"
steps=("$@"); [ ${#steps[@]} -eq 0 ] && steps=(build test bench)
rc=0
for step in "${steps[@]}"; do
  case "$step" in
    build)
      nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
      # sm_90 for Hopper; 8.0 too where an A100 runs it (TORCH_CUDA_ARCH_LIST overrides)
      # the image's default g++ wrapper (/opt/gcc) built an extension that segfaulted whenever an op
      # raised an error (TORCH_CHECK); the system compiler does not
      [ -x /usr/bin/g++ ] && export CXX=/usr/bin/g++ CC=/usr/bin/gcc
      SQPLUS_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}" MAX_JOBS="${MAX_JOBS:-16}" \
        "$PY" setup.py build_ext --inplace > "$OUT/build.log" 2>&1 \
        || { tail -40 "$OUT/build.log"; echo "BUILD FAILED"; exit 1; }
      tail -2 "$OUT/build.log"
      "$PY" -c "import torch, vllm_sqplus._C; print('CUDA kernel registered:', torch._C._dispatch_has_kernel_for_dispatch_key('sqplus::w4a16_gemm', 'CUDA'))" ;;
    test)
      "$PY" -m pytest -q -p no:cacheprovider --maxfail=30 tests/test_kernels_cuda.py 2>&1 | tee "$OUT/pytest.log" | tail -40
      [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1 ;;
    sanitize)  # memcheck + racecheck on a few small cases (slow under the sanitizer)
      for tool in memcheck racecheck; do
        compute-sanitizer --tool $tool --error-exitcode 9 "$PY" -m pytest -q -p no:cacheprovider \
          tests/test_kernels_cuda.py -k "split_k_counters or dequant_matches or float32_activations" \
          > "$OUT/sanitize_$tool.log" 2>&1; s=$?
        echo "compute-sanitizer $tool: exit $s"; tail -3 "$OUT/sanitize_$tool.log"; [ $s -eq 0 ] || rc=1
      done ;;
    bench)
      PYTHONUNBUFFERED=1 "$PY" benchmarks/kernel_bench.py --device cuda --out "$OUT/kernels_cuda.json" \
        ${BENCH_ARGS:-} > "$OUT/bench.log" 2>&1 || { tail -30 "$OUT/bench.log"; rc=1; }
      grep -vE "^#" "$OUT/bench.log" | head -80 ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
done
exit $rc
