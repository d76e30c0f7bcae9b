"""Batch-1 latency: time to first token (TTFT) and per-token decode latency, BF16 vs smoothquant_plus vs
vLLM's own W4A16 kernel, each engine in its own subprocess (engine list and machinery: throughput.py).

Per iteration, a fresh random prompt (so prefix caching cannot serve it): generate 1 token -> TTFT;
then generate OUTPUT_LEN tokens with ignore_eos -> total. Per-token latency = (total - TTFT) / (OUTPUT_LEN - 1).
Medians over --iters iterations after one warm-up (timings on a shared machine are noisy).

usage: python benchmarks/latency.py --model DIR [--engines bf16,sqplus,vllm-w4a16] [--input-len 128]
           [--output-len 64] [--iters 5] [--tag NAME]
Writes benchmarks/results/<machine>/latency[_TAG].json and .png; prints a table.
"""
from __future__ import annotations

import statistics
import sys
import time

from throughput import checked_engines, common_parser, make_llm, random_prompts, report, run_engines, worker_main


def run_latency(spec: dict) -> dict:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    li, lo, iters = spec["input_len"], spec["output_len"], spec["iters"]
    t0 = time.perf_counter()
    llm = make_llm(spec, li + lo + 8)
    load_s = time.perf_counter() - t0
    vocab = llm.get_tokenizer().vocab_size
    prompts = [TokensPrompt(prompt_token_ids=p) for p in random_prompts(2 * iters + 2, li, vocab, seed=1)]
    one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    full = SamplingParams(temperature=0.0, max_tokens=lo, ignore_eos=True)
    llm.generate([prompts[-1]], full, use_tqdm=False)  # warm-up
    ttft, total = [], []
    for i in range(iters):
        t = time.perf_counter()
        llm.generate([prompts[2 * i]], one, use_tqdm=False)
        ttft.append(time.perf_counter() - t)
        t = time.perf_counter()
        out = llm.generate([prompts[2 * i + 1]], full, use_tqdm=False)
        total.append(time.perf_counter() - t)
        assert len(out[0].outputs[0].token_ids) == lo
    med_ttft, med_total = statistics.median(ttft), statistics.median(total)
    tpot = (med_total - med_ttft) / (lo - 1)
    return {"load_s": round(load_s, 2), "ttft_ms": med_ttft * 1e3, "tpot_ms": tpot * 1e3,
            "decode_tok_per_s": 1.0 / tpot, "total_ms": med_total * 1e3,
            "ttft_ms_all": [round(x * 1e3, 2) for x in ttft], "total_ms_all": [round(x * 1e3, 2) for x in total]}


def main(argv=None) -> int:
    ap = common_parser(__doc__, output_len=64, kv_cache_bytes=256 << 20)
    ap.add_argument("--iters", type=int, default=5)
    args = ap.parse_args(argv)
    if args.worker:
        return worker_main(args.worker)
    engines, model = checked_engines(ap, args)
    if args.output_len < 2:
        ap.error("--output-len must be at least 2")
    common = {"model": model, "input_len": args.input_len, "output_len": args.output_len,
              "iters": args.iters, "dtype": args.dtype, "kv_cache_bytes": args.kv_cache_bytes}
    rows = run_engines(__file__, "run_latency", "latency", engines, common, args.timeout)
    cols = [("tpot_ms", "ms/token", ".1f"), ("decode_tok_per_s", "tok/s", ".1f"), ("ttft_ms", "TTFT ms", ".1f"),
            ("load_s", "load s", ".1f")]
    return report("latency", args, common, rows, cols, "decode_tok_per_s",
                  f"latency (batch 1): in {args.input_len}, out {args.output_len}, median of {args.iters}, {args.model}",
                  "ms per output token (batch 1)", f"batch-1 decode latency, in {args.input_len}, out {args.output_len}",
                  plot_metric="tpot_ms")

if __name__ == "__main__":
    sys.exit(main())
