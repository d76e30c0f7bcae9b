#!/usr/bin/env bash
# The peers for one model, one after another: dump our calibration tokens (our venv), then GPTQ and
# AWQ (the peers' venv), each into $PEERS_OUT/<name>-<method>/ with its log in $PEERS_OUT/logs/.
#   usage: bash benchmarks/peers/run_all.sh MODEL_DIR NAME GROUP_SIZE [gptq] [awq]
# A method whose output folder exists is skipped (delete the folder to redo it). Env
# PEERS_MAX_SAMPLES_AWQ=N / PEERS_MAX_SAMPLES_GPTQ=N calibrate on the first N statistics samples only.
# PEERS_THREADS=N: compute threads of the peer runs (default 1; 2 on a quiet 2-core machine).
# PEERS_GPTQ_STAGE_SAMPLES=N: GPTQ calibrates on exactly our GPTQ stage's N samples (the first 32
# statistics samples + the N - 32 after the held-out ones: dump_calib.py --gptq-samples N), into
# $PEERS_OUT/<name>-gptq-stage<N>/.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/../.." && pwd)"
MODEL="$(cd "$1" && pwd)"; NAME="$2"; GS="$3"; shift 3
METHODS=("$@"); [[ $# -eq 0 ]] && METHODS=(gptq awq)
OUT="${PEERS_OUT:-/work/peers_out}"
THREADS="${PEERS_THREADS:-1}"
VENV="${SQPLUS_PEERS_VENV:-$HOME/.cache/sqplus-peers/venv}"
mkdir -p "$OUT/logs" "$OUT/calib"
bash "$REPO/benchmarks/peers/setup_peers.sh"
CALIB="$OUT/calib/$NAME.safetensors"
[[ -f "$CALIB" ]] || OMP_NUM_THREADS=1 "$REPO/.venv/bin/python" "$REPO/benchmarks/peers/dump_calib.py" "$MODEL" --out "$CALIB"
for m in "${METHODS[@]}"; do
  calib="$CALIB"; run="$NAME-$m"
  if [[ "$m" == gptq && -n "${PEERS_GPTQ_STAGE_SAMPLES:-}" ]]; then
    N="$PEERS_GPTQ_STAGE_SAMPLES"; calib="$OUT/calib/$NAME-gptq-stage$N.safetensors"; run="$NAME-gptq-stage$N"
    [[ -f "$calib" ]] || OMP_NUM_THREADS=1 "$REPO/.venv/bin/python" "$REPO/benchmarks/peers/dump_calib.py" "$MODEL" \
      --gptq-samples "$N" --out "$calib"
  fi
  if [[ -d "$OUT/$run" ]]; then echo "skip $run (exists)"; continue; fi
  echo "$(date -u +%FT%TZ) start $run"
  var="PEERS_MAX_SAMPLES_${m^^}"; extra=(); [[ -n "${!var:-}" ]] && extra=(--max-samples "${!var}")
  OMP_NUM_THREADS="$THREADS" TOKENIZERS_PARALLELISM=false "$VENV/bin/python" "$REPO/benchmarks/peers/run_peer.py" \
    --model "$MODEL" --method "$m" --calib "$calib" --group-size "$GS" --out "$OUT/$run" --threads "$THREADS" \
    "${extra[@]}" > "$OUT/logs/$run.log" 2>&1
  echo "$(date -u +%FT%TZ) done $run: $(tail -1 "$OUT/logs/$run.log")"
  "$VENV/bin/python" "$REPO/benchmarks/peers/verify_dense.py" "$OUT/$run" | tee "$OUT/$run/verify_dense.json"
done
