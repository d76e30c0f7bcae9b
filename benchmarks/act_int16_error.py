"""What the VNNI kernel's int16 activations cost on a real model's linears, against the output's own
bfloat16 rounding.

The CPU kernel's avx512vnni path (csrc/cpu/w4a16_vnni.cpp; the default for 1-4 rows of bfloat16 or
float16 activations on AVX-512 VNNI and AMX CPUs) multiplies activations quantized per row and
group to int16 (vllm_sqplus.kernels.cpu_layout.quantize_act_int16, the twin of its quantizer, bit
for bit). This captures the inputs of every decoder linear of a model (transformers, bfloat16) on
held-out code (vllm_sqplus.corpora.eval_code_text: never calibration), and per linear type reports,
per token, max_n |y~ - y| / max_n |y| where y = x @ W.T in float32 from the bfloat16 x and
y~ = x~ @ W.T from its int16 version x~, beside the same figure for rounding y to bfloat16 (what
every bfloat16 GEMM output carries anyway): median and maximum over tokens and layers.

  .venv/bin/python benchmarks/act_int16_error.py --model .models/qwen2.5-coder-0.5b-instruct
writes benchmarks/results/<machine>/act_int16_error_<model>.{json,md}.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine as results_machine  # noqa: E402

from vllm_sqplus.corpora import eval_code_text  # noqa: E402
from vllm_sqplus.kernels.cpu_layout import dequantize_act_int16, quantize_act_int16  # noqa: E402


def int16_roundtrip(x: torch.Tensor, group: int) -> torch.Tensor:
    """x [T, K] bfloat16 -> the float32 values the VNNI kernel multiplies."""
    return dequantize_act_int16(*quantize_act_int16(x, group), group)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--tokens", type=int, default=512, help="held-out tokens in one window")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--out", default=None, help="JSON path (default: results/<machine>/act_int16_error_<model>.json)")
    args = ap.parse_args(argv)
    if not (Path(args.model) / "config.json").is_file():
        sys.exit(f"error: --model {args.model}: no config.json there (a transformers checkpoint folder is needed)")
    if args.group_size <= 0 or args.group_size % 8:
        sys.exit(f"error: --group-size must be a positive multiple of 8, got {args.group_size}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).eval()
    ids = tok(eval_code_text(), return_tensors="pt").input_ids[:, :args.tokens]
    inputs: dict[str, torch.Tensor] = {}

    def hook(name):
        def f(_mod, inp):
            inputs[name] = inp[0].detach().reshape(-1, inp[0].shape[-1])
        return f

    linears = {n: m for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and "lm_head" not in n}
    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()

    per_type = collections.defaultdict(lambda: {"int16": [], "bf16_out": [], "max_abs_x": 0.0})
    skipped = []  # linears whose in_features the group size does not divide
    for name, lin in linears.items():
        x = inputs[name]
        if x.shape[1] % args.group_size:
            skipped.append(f"{name} (K={x.shape[1]})")
            continue
        w = lin.weight.float()
        y = x.float() @ w.T
        ymax = y.abs().amax(-1).clamp_min(1e-30)
        e16 = ((int16_roundtrip(x, args.group_size) @ w.T - y).abs().amax(-1) / ymax)
        eb = ((y.bfloat16().float() - y).abs().amax(-1) / ymax)
        d = per_type[name.split(".")[-1]]
        d["int16"].append(e16)
        d["bf16_out"].append(eb)
        d["max_abs_x"] = max(d["max_abs_x"], x.float().abs().max().item())

    if not per_type:
        sys.exit(f"error: group size {args.group_size} divides no decoder linear's in_features: {skipped[:3]}")
    if skipped:
        print(f"# skipped {len(skipped)} linears the group size does not divide, e.g. {skipped[:3]}")
    rows = []
    for t, d in per_type.items():
        a, b = torch.cat(d["int16"]), torch.cat(d["bf16_out"])
        rows.append({"linear": t, "layers": len(d["int16"]), "tokens": int(ids.shape[1]),
                     "int16_median": a.median().item(), "int16_max": a.max().item(),
                     "bf16_out_median": b.median().item(), "bf16_out_max": b.max().item(),
                     "int16_over_bf16_median": (a / b.clamp_min(1e-30)).median().item(),
                     "max_abs_x": d["max_abs_x"]})
    model_name = Path(args.model).name
    out = Path(args.out) if args.out else (results_machine.RESULTS / results_machine.slug("cpu")
                                           / f"act_int16_error_{model_name}.json")
    rec = {"model": model_name, "group_size": args.group_size, "text": "corpora.eval_code_text (held out)",
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": results_machine.cpu_model(), "torch": torch.__version__,
           "command": " ".join([os.path.relpath(sys.argv[0])] + (argv if argv is not None else sys.argv[1:])),
           "rows": rows, "skipped_linears": skipped}
    lines = [f"# int16 activations of the VNNI kernel vs bfloat16 output rounding: {model_name}", "",
             f"- date: {rec['date']}; machine: {rec['machine']}; torch {rec['torch']}",
             f"- command: `{rec['command']}`",
             f"- {rows[0]['tokens'] if rows else 0} tokens of held-out code, group {args.group_size}; per token "
             "max_n |error| / max_n |y|, median and max over tokens and layers", "",
             "| linear | layers | int16 x: median | int16 x: max | bf16 output rounding: median | max | "
             "median ratio int16 / bf16 | max abs x |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['linear']} | {r['layers']} | {r['int16_median']:.2e} | {r['int16_max']:.2e} | "
                     f"{r['bf16_out_median']:.2e} | {r['bf16_out_max']:.2e} | {r['int16_over_bf16_median']:.3f} | "
                     f"{r['max_abs_x']:.0f} |")
    out.parent.mkdir(parents=True, exist_ok=True)
    for path, text in ((out, json.dumps(rec, indent=1)), (out.with_suffix(".md"), "\n".join(lines) + "\n")):
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    print("\n".join(lines))
    print(f"# wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
