"""Quantize while loading and generate, in Python.

    python examples/quantize_and_generate.py --model /path/to/Qwen2.5-Coder-0.5B-Instruct

MODEL may be a plain FP16/BF16 checkpoint (plain RTN INT4, one warning) or a SmoothQuant+ checkpoint
written by `sqplus smooth MODEL --out SMOOTHED` (smoothing folded into the weights; the method is
then also detected from its config.json, so `quantization=` may be left out). No import of
vllm_sqplus is needed: vLLM finds the plugin through its `vllm.general_plugins` entry point.
"""
import argparse

from vllm import LLM, SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--quantization", default="smoothquant_plus", help="'none' for the full-precision model")
    ap.add_argument("--max-tokens", type=int, default=128)
    args = ap.parse_args()

    llm = LLM(model=args.model,
              quantization=None if args.quantization == "none" else args.quantization,
              max_model_len=2048,
              kv_cache_memory_bytes=512 << 20,  # CPU builds: a fixed KV budget instead of a share of RAM
              enforce_eager=True)               # CPU builds: skip the long torch.compile warm-up
    messages = [{"role": "user", "content": "Write a Python function that returns the n-th Fibonacci number."}]
    out = llm.chat(messages, SamplingParams(temperature=0.0, max_tokens=args.max_tokens))
    print(out[0].outputs[0].text)


if __name__ == "__main__":  # vLLM starts worker processes: keep LLM creation under this guard
    main()
