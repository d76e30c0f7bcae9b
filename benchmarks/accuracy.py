"""Perplexity on Python code that calibration never saw: full precision vs RTN INT4 vs smoothed INT4.

Quantization is simulated with the reference quantizer (vllm_sqplus.quant.pseudo_quantize_int4) on
every decoder-layer linear (lm_head and embeddings kept), exactly what the plugin computes at load,
so this measures the method, not a kernel. The text is the running Python's own standard library
(a fixed list of modules), so the same numbers come out on any machine with the same Python.

usage: python benchmarks/accuracy.py --model FP_DIR [--smoothed NAME=DIR ...] [--group-size 128]
           [--windows 16] [--seq-len 512] [--out benchmarks/results/accuracy_NAME.json]
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
import sysconfig
import time
from pathlib import Path

import torch

from vllm_sqplus.arch import get_arch, get_module
from vllm_sqplus.quant import pseudo_quantize_int4

STDLIB_FILES = ["argparse.py", "textwrap.py", "difflib.py", "heapq.py", "functools.py", "fractions.py",
                "shlex.py", "string.py", "calendar.py", "csv.py", "json/decoder.py", "statistics.py"]


def code_text() -> str:
    lib = Path(sysconfig.get_paths()["stdlib"])
    return "\n\n".join((lib / f).read_text(encoding="utf-8") for f in STDLIB_FILES)


def load(path, fake_quant: bool, group_size: int):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()
    if fake_quant:
        arch = get_arch(model.config)
        with torch.no_grad():
            for i, layer in enumerate(get_module(model, arch.layers)):
                for name in arch.linears:
                    w = get_module(layer, name).weight
                    w.copy_(pseudo_quantize_int4(w, group_size, True, f"layers.{i}.{name}"))
    return model


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, batch: int = 4) -> float:
    nll, n = 0.0, 0
    for chunk in ids.split(batch):
        logits = model(chunk).logits[:, :-1].float()
        lp = torch.log_softmax(logits, -1).gather(-1, chunk[:, 1:, None])
        nll -= float(lp.sum())
        n += lp.numel()
    return math.exp(nll / n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="the full-precision checkpoint")
    ap.add_argument("--smoothed", action="append", default=[], help="NAME=DIR of a smoothed checkpoint")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(args.model)
    ids = tok(code_text(), add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    n = min(args.windows, ids.numel() // args.seq_len)
    ids = ids[: n * args.seq_len].reshape(n, args.seq_len)
    runs = [("full precision", args.model, False), ("RTN INT4", args.model, True)]
    runs += [(f"{name} INT4", path, True) for name, path in (s.rsplit("=", 1) for s in args.smoothed)]
    rows = []
    for name, path, fq in runs:
        t = time.perf_counter()
        ppl = perplexity(load(path, fq, args.group_size), ids)
        alpha = None
        qc = json.loads((Path(path) / "config.json").read_text()).get("quantization_config") or {}
        if fq and qc:
            alpha = qc.get("layer_alphas") or qc.get("alpha")
        rows.append({"variant": name, "path": str(path), "ppl": ppl, "alpha": alpha,
                     "seconds": round(time.perf_counter() - t, 1)})
        print(f"{name:28s} ppl {ppl:8.4f}  ({rows[-1]['seconds']}s)", flush=True)
    fp, rtn = rows[0]["ppl"], rows[1]["ppl"]
    for r in rows:
        r["increase_vs_fp"] = r["ppl"] / fp - 1
        r["share_of_rtn_increase"] = (r["ppl"] - fp) / (rtn - fp) if rtn != fp else None
    print(f"\n{'variant':28s} {'ppl':>9s} {'vs FP':>8s} {'of RTN loss':>12s}")
    for r in rows:
        share = "" if r["share_of_rtn_increase"] is None else f"{100 * r['share_of_rtn_increase']:.0f}%"
        print(f"{r['variant']:28s} {r['ppl']:9.4f} {100 * r['increase_vs_fp']:+7.2f}% {share:>12s}")
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": f"{platform.node()} {platform.processor() or platform.machine()}",
              "command": " ".join([Path(sys.executable).name, *sys.argv]),
              "text": {"source": f"Python {platform.python_version()} stdlib", "files": STDLIB_FILES,
                       "windows": n, "seq_len": args.seq_len},
              "group_size": args.group_size, "rows": rows}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
