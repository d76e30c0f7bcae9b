"""Where a decoded token's time goes in vLLM + smoothquant_plus on CPU (issue 12, first bullet).

One engine per (dtype, lm_head) configuration, each in its own subprocess with the model in that
process (VLLM_ENABLE_V1_MULTIPROCESSING=0, distributed_executor_backend "uni", async_scheduling off
so that one LLMEngine.step() is one model step), VLLM_CPU_OMP_THREADS_BIND=0 (one compute thread),
enforce_eager. Wall-clock timers (time.perf_counter_ns; on CPU every op is synchronous) wrap:

  engine step       LLMEngine.step (what LLM.generate loops over)
  model forward     the model's forward (the decoder: embedding, 24 layers, final norm)
  w4a16_linears     SqplusLinearMethod.apply: our W4A16 op (torch.ops.sqplus.w4a16_gemm), the
                    decoder's qkv / o / gate_up / down linears
  attention         vLLM's Attention layer forward (CPU attention op, KV-cache write included)
  lm_head           the model's compute_logits (LogitsProcessor: the lm_head matmul, dense or
                    SQPLUS_LM_HEAD=int4/int8 through SqplusLmHeadMethod)
  sampling          vLLM's Sampler forward

Times are exclusive (a timer's children are subtracted), so the categories add up to the step:
  model_other     = forward - w4a16_linears - attention   (norms, rotary, activation, embedding)
  engine_overhead = step - forward - lm_head - sampling    (scheduler, input prep, output processing)
Only decode steps count: a step whose forward saw exactly `batch` tokens (the prefill step sees
batch * prompt tokens and is left out). The timers' own cost is measured (an empty wrapped call)
and reported as an estimate per step; it is inside the reported step times.

  python benchmarks/decode_breakdown.py [--model DIR] [--dtypes float32[,bfloat16]]
         [--lm-heads none,int4] [--batches 1,16] [--steps 48] [--out NAME]
Writes benchmarks/results/<machine>/NAME.json and NAME.md (default decode_breakdown).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # benchmarks/machine.py
from machine import cpu_model, pin_to_bound_cores, results_dir  # noqa: E402

DEFAULT_MODEL = HERE.parent / ".models" / "qwen2.5-coder-0.5b-instruct"
PROMPT_LEN = 32
KV_CACHE_BYTES = 256 << 20
# categories in report order; the timer categories plus the two exclusive remainders
TIMED = ("w4a16_linears", "attention", "lm_head", "sampling")
CATEGORIES = ("w4a16_linears", "lm_head", "attention", "model_other", "sampling", "engine_overhead")
LM_HEADS = ("none", "int8", "int4")


# ------------------------------------------------------------------ timers (worker process)

class Recorder:
    """Nested wall-clock timers: each category gets its exclusive time, per engine step."""

    def __init__(self):
        self.steps: list[dict] = []
        self.step: dict | None = None
        self.stack: list[list] = []  # [category, child ns]
        self.on = False

    def _enter(self, cat: str) -> int:
        self.stack.append([cat, 0])
        return time.perf_counter_ns()

    def _exit(self, t0: int) -> None:
        el = time.perf_counter_ns() - t0
        cat, child = self.stack.pop()
        st = self.step
        st["excl_ns"][cat] = st["excl_ns"].get(cat, 0) + el - child
        st["calls"][cat] = st["calls"].get(cat, 0) + 1
        if self.stack:
            self.stack[-1][1] += el

    def wrap(self, cat: str, fn, tokens_of=None):
        rec = self

        def timed(*args, **kwargs):
            if rec.step is None:
                return fn(*args, **kwargs)
            if tokens_of is not None:
                rec.step["tokens"] = tokens_of(args, kwargs)
            t0 = rec._enter(cat)
            try:
                return fn(*args, **kwargs)
            finally:
                rec._exit(t0)
        return timed

    def wrap_step(self, fn):
        rec = self

        def step(*args, **kwargs):
            if not rec.on:
                return fn(*args, **kwargs)
            rec.step = {"excl_ns": {}, "calls": {}, "tokens": None}
            t0 = rec._enter("step")
            try:
                return fn(*args, **kwargs)
            finally:
                el = time.perf_counter_ns() - t0
                rec._exit(t0)
                rec.step["wall_ns"] = el
                rec.steps.append(rec.step)
                rec.step = None
        return step


def _forward_tokens(args, kwargs) -> int | None:
    ids = kwargs.get("input_ids", args[0] if args else None)
    if ids is None:
        ids = kwargs.get("positions", args[1] if len(args) > 1 else None)
    return None if ids is None else int(ids.shape[0])


def summarize(steps: list[dict], batch: int) -> dict:
    """Decode steps only (forward saw `batch` tokens): ms per step and % of the step per category.

    steps: [{"wall_ns", "tokens", "excl_ns": {step, forward, w4a16_linears, attention, lm_head,
    sampling}, "calls": {...}}] as Recorder writes them. The categories add up to the step's wall.
    """
    dec = [s for s in steps if s.get("tokens") == batch]
    if not dec:
        seen = sorted({s.get("tokens") for s in steps}, key=str)
        raise ValueError(f"no decode steps for batch {batch} (forward token counts seen: {seen})")

    def ms(s, k):
        return s["excl_ns"].get(k, 0) / 1e6
    per = {c: [ms(s, c) for s in dec] for c in TIMED}
    per["model_other"] = [ms(s, "forward") for s in dec]
    per["engine_overhead"] = [ms(s, "step") for s in dec]
    walls = [s["wall_ns"] / 1e6 for s in dec]
    mean_wall = statistics.fmean(walls)
    cats = {}
    for c in CATEGORIES:
        m = statistics.fmean(per[c])
        cats[c] = {"ms": round(m, 3), "pct": round(100 * m / mean_wall, 1),
                   "median_ms": round(statistics.median(per[c]), 3)}
    calls = {k: statistics.fmean(s["calls"].get(k, 0) for s in dec) for k in
             ("forward",) + TIMED}
    return {"decode_steps": len(dec), "steps_left_out": len(steps) - len(dec),
            "step_ms_mean": round(mean_wall, 3), "step_ms_median": round(statistics.median(walls), 3),
            "decode_tok_s": round(batch * 1000 / mean_wall, 2), "categories": cats,
            "calls_per_step": {k: round(v, 1) for k, v in calls.items()}}


def _timer_cost_ns(n: int = 20000) -> float:
    """The timers' own cost per wrapped call (enter + exit around an empty function)."""
    rec = Recorder()
    f = rec.wrap("x", lambda: None)
    rec.step = {"excl_ns": {}, "calls": {}, "tokens": None}
    t0 = time.perf_counter_ns()
    for _ in range(n):
        f()
    return (time.perf_counter_ns() - t0) / n - _bare_cost_ns(n)


def _bare_cost_ns(n: int) -> float:
    g = (lambda: None)
    t0 = time.perf_counter_ns()
    for _ in range(n):
        g()
    return (time.perf_counter_ns() - t0) / n


def _worker(model: str, dtype: str, batches: list[int], steps: int) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.model_executor.layers.attention.attention import Attention
    from vllm.v1.sample.sampler import Sampler
    from vllm_sqplus import vllm_compat

    # in-process (uni executor) vLLM binds no threads: torch kept its default 2 threads on a 2-core
    # VM before this, in session 11's record too (its torch_threads: 2)
    pin_to_bound_cores()
    rec = Recorder()
    vllm_compat.SqplusLinearMethod.apply = rec.wrap("w4a16_linears", vllm_compat.SqplusLinearMethod.apply)
    Attention.forward = rec.wrap("attention", Attention.forward)
    Sampler.forward = rec.wrap("sampling", Sampler.forward)
    kw = dict(model=model, dtype=dtype, quantization="smoothquant_plus", enforce_eager=True,
              max_model_len=512, kv_cache_memory_bytes=KV_CACHE_BYTES, max_num_seqs=max(batches),
              distributed_executor_backend="uni", async_scheduling=False)
    t0 = time.perf_counter()
    llm = LLM(**kw)
    load_s = time.perf_counter() - t0

    def instrument(m):  # runs in this process (uni executor, no engine subprocess)
        m.forward = rec.wrap("forward", m.forward, tokens_of=_forward_tokens)
        m.compute_logits = rec.wrap("lm_head", m.compute_logits)
        return type(m).__name__
    model_cls = llm.apply_model(instrument)[0]
    llm.llm_engine.step = rec.wrap_step(llm.llm_engine.step)

    def run(b, t):
        sp = SamplingParams(max_tokens=t, temperature=0.0, ignore_eos=True)
        prompts = [{"prompt_token_ids": list(range(1000 + PROMPT_LEN * i, 1000 + PROMPT_LEN * (i + 1)))}
                   for i in range(b)]  # distinct prompts: no prefix-cache sharing
        llm.generate(prompts, sp, use_tqdm=False)

    out = {}
    for b in batches:
        run(b, 4)  # warm-up
        rec.steps, rec.on = [], True
        t1 = time.perf_counter()
        run(b, steps + 1)  # the first token comes from the prefill step
        gen_s = time.perf_counter() - t1
        rec.on = False
        s = summarize(rec.steps, b)
        s["generate_wall_s"] = round(gen_s, 3)
        s["forward_tokens_seen"] = sorted({st["tokens"] for st in rec.steps if st["tokens"]})
        out[str(b)] = s
    cost = _timer_cost_ns()
    for s in out.values():
        n = sum(s["calls_per_step"].values()) + 1  # + the step's own timer
        s["timer_overhead_ms_est"] = round(n * cost / 1e6, 3)
    import torch
    return {"load_s": round(load_s, 1), "model_class": model_cls, "timer_cost_ns": round(cost),
            "torch_threads": torch.get_num_threads(), "affinity": sorted(os.sched_getaffinity(0)),
            "llm_kwargs": {k: v for k, v in kw.items() if k != "model"},
            "batches": out}


# ------------------------------------------------------------------ driver

def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _measure(a, dtype: str, lm_head: str) -> dict:
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_OMP_THREADS_BIND=a.cores,
               SQPLUS_LM_HEAD=lm_head)
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        res_path = f.name
    cmd = [sys.executable, __file__, "--model", str(a.model), "--worker", dtype, "--worker-out", res_path,
           "--batches", a.batches, "--steps", str(a.steps)]
    out = {"dtype": dtype, "lm_head": lm_head, "load_before": _load()}
    print(f"+ [{dtype}, SQPLUS_LM_HEAD={lm_head}]", flush=True)
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, env=env)
    out["load_after"] = _load()
    try:
        out.update(json.loads(Path(res_path).read_text()))
    except (OSError, ValueError):
        tail = (p.stderr or p.stdout)[-2000:]
        out["error"] = f"exit code {p.returncode}: {tail.strip().splitlines()[-1] if tail.strip() else ''}"[:400]
        out["error_tail"] = tail
        print(tail, flush=True)
    finally:
        Path(res_path).unlink(missing_ok=True)
    return out


def render(rec: dict) -> str:
    L = [f"# Decode time per step by category: vLLM + smoothquant_plus, {Path(rec['model']).name}", "",
         f"- machine: `{rec['machine']}` ({rec['cpu']}, {rec['cpus']} CPUs); date {rec['date']}",
         f"- command: `{rec['command']}`",
         f"- load average (1/5/15 min) at start {rec['load_start']}, at end {rec['load_end']}: the machine "
         "is shared with other jobs, so absolute times are noisy; the shares are the point",
         f"- engine: vllm {rec['vllm']}, torch {rec['torch']}, enforce_eager, in-process (uni executor, "
         f"async scheduling off), VLLM_CPU_OMP_THREADS_BIND={rec['cores']} (the worker pins itself: torch "
         f"threads {sorted({r.get('torch_threads') for r in rec['runs']}, key=str)}, on cores "
         f"{sorted({str(r.get('affinity')) for r in rec['runs']})}), OMP_NUM_THREADS="
         f"{rec['env'].get('OMP_NUM_THREADS')}; prompt {PROMPT_LEN} tokens, {rec['steps']} decode steps "
         "measured per batch (prefill step excluded), greedy, ignore_eos",
         "- categories (exclusive wall time, they add up to the step): w4a16_linears = our op in the "
         "decoder linears; lm_head = compute_logits; attention = vLLM's CPU attention layer; "
         "model_other = the rest of the forward (norms, rotary, SiLU, embedding); sampling = Sampler; "
         "engine_overhead = step - forward - lm_head - sampling", ""]
    L += ["| dtype | lm_head | batch | step ms | tok/s | " + " | ".join(CATEGORIES) + " | timers ms (est.) |",
          "|---|---|---|---|---|" + "---|" * len(CATEGORIES) + "---|"]
    for r in rec["runs"]:
        if "error" in r:
            L.append(f"| {r['dtype']} | {r['lm_head']} | - | error: {r['error']} |")
            continue
        for b, s in r["batches"].items():
            cells = [f"{s['categories'][c]['ms']:.2f} ({s['categories'][c]['pct']:.0f}%)" for c in CATEGORIES]
            L.append(f"| {r['dtype']} | {r['lm_head']} | {b} | {s['step_ms_mean']:.2f} | {s['decode_tok_s']:.1f} | "
                     + " | ".join(cells) + f" | {s['timer_overhead_ms_est']:.2f} |")
    L += ["", "Cells: mean ms per decode step (share of the step). tok/s = batch / mean step time "
          "(timers included). Per-run load averages and call counts per step are in the JSON."]
    return "\n".join(L) + "\n"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--dtypes", default="float32", help="comma list of float32, bfloat16")
    ap.add_argument("--lm-heads", default="none,int4", help=f"comma list of {', '.join(LM_HEADS)}")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--steps", type=int, default=48, help="decode steps measured per batch")
    ap.add_argument("--cores", default="0", help="VLLM_CPU_OMP_THREADS_BIND (default one core: 0)")
    ap.add_argument("--out", default="decode_breakdown")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    try:
        batches = [int(x) for x in a.batches.split(",")]
    except ValueError:
        ap.error(f"--batches: comma list of integers, got {a.batches!r}")
    if a.worker:
        res = _worker(str(a.model), a.worker, batches, a.steps)
        _atomic_write(Path(a.worker_out), json.dumps(res))
        return
    dtypes, heads = a.dtypes.split(","), a.lm_heads.split(",")
    bad = [d for d in dtypes if d not in ("float32", "bfloat16")] + [h for h in heads if h not in LM_HEADS]
    if bad:
        ap.error(f"unknown --dtypes / --lm-heads value(s): {bad}")
    if a.steps < 1 or min(batches) < 1:
        ap.error("--steps and --batches must be positive")
    if not (a.model / "config.json").is_file():
        ap.error(f"--model {a.model}: no config.json there")
    import torch
    import vllm
    from machine import slug
    rec = {"model": str(a.model), "machine": slug(), "cpu": cpu_model(), "cpus": os.cpu_count(),
           "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "command": "python benchmarks/decode_breakdown.py " + " ".join(sys.argv[1:]),
           "vllm": vllm.__version__, "torch": torch.__version__, "cores": a.cores, "steps": a.steps,
           "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS",)}, "load_start": _load()}
    rec["runs"] = [_measure(a, d, h) for d in dtypes for h in heads]
    rec["load_end"] = _load()
    out = results_dir()
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / f"{a.out}.json", json.dumps(rec, indent=1) + "\n")
    md = render(rec)
    _atomic_write(out / f"{a.out}.md", md)
    print(md)


if __name__ == "__main__":
    main()
