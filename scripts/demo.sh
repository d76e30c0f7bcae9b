#!/usr/bin/env bash
# The demo (README): set-up + real models, then the whole SmoothQuant+ path on Qwen2.5-Coder-0.5B:
#   1. sqplus smooth   calibrate on stdlib code (the default), search, clip, GPTQ stage, write a smoothed
#                      BF16 checkpoint (Qwen-0.5B: 7.9 min, smollm2-135m-instruct: 5.5 min at one thread, on
#                      a quiet 2-core Xeon VM, 2026-12-04; about twice that on the 2-core AMD VMs)
#   2. vLLM            LLM(model=..., quantization="smoothquant_plus"): INT4 while loading, generate
#   3. sqplus serve    the OpenAI server on 127.0.0.1, queried once with curl, then stopped
# usage: bash scripts/demo.sh [MODEL_NAME]   (qwen2.5-coder-0.5b-instruct | smollm2-135m-instruct)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
bash scripts/setup.sh --models
PY="${SQPLUS_VENV:-$ROOT/.venv}/bin/python"
MODELS=${SQPLUS_MODELS:-$ROOT/.models}
NAME=${1:-qwen2.5-coder-0.5b-instruct}
GROUP=128; [ "$NAME" = smollm2-135m-instruct ] && GROUP=64   # 128 does not divide SmolLM2's 576
OUT="$ROOT/.demo/$NAME-sqplus"
if [ ! -f "$OUT/config.json" ]; then
  "$PY" -m vllm_sqplus.cli smooth "$MODELS/$NAME" --out "$OUT" --group-size $GROUP
fi
"$PY" -c "import json; q=json.load(open('$OUT/config.json'))['quantization_config']; print('smoothed checkpoint:', '$OUT', 'choice =', q.get('choice'), 'alpha =', q['alpha'])"
"$PY" examples/quantize_and_generate.py --model "$OUT"
PORT=${SQPLUS_DEMO_PORT:-8765}
"$PY" -m vllm_sqplus.cli serve "$OUT" --host 127.0.0.1 --port $PORT --max-model-len 2048 --enforce-eager \
    > "$ROOT/.demo/serve.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 1 180); do
  curl -sf "http://127.0.0.1:$PORT/v1/models" > /dev/null && break
  kill -0 $SERVER 2>/dev/null || { echo "server died; see .demo/serve.log" >&2; tail -20 "$ROOT/.demo/serve.log" >&2; exit 1; }
  sleep 2
done
echo "--- curl /v1/completions (smoothquant_plus INT4, served by vLLM)"
curl -s "http://127.0.0.1:$PORT/v1/completions" -H 'Content-Type: application/json' \
  -d "{\"model\": \"$OUT\", \"prompt\": \"def fibonacci(n):\", \"max_tokens\": 48, \"temperature\": 0}"
echo
