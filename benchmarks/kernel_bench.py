"""W4A16 GEMM benchmark: our sqplus kernel against its peers on the same shapes, one table per run.

  .venv/bin/python benchmarks/kernel_bench.py                      # CPU, all shapes, all M
  .venv/bin/python benchmarks/kernel_bench.py --m 1,16 --shapes 4096x4096
  python benchmarks/kernel_bench.py --device cuda                  # on a GPU machine (gpu_check.sh)

Writes benchmarks/results/<machine>/kernels_<device>.json and .md (generated: never edit them; the
analysis lives in benchmarks/results/README.md and cites them).

Shapes are N x K of a linear's weight (out x in): Llama-7B (4096x4096 q/k/v/o, 11008x4096 gate/up,
4096x11008 down) and Qwen2.5-0.5B (896x896 q/o, 1152x896 fused qkv, 4864x896 gate/up, 896x4864
down). Weights: random, INT4 asymmetric, group 128 (vllm_sqplus.quant.quantize_int4).

Peers (each checked against x @ dequant(w).T before it is timed, so every column computes the same
function): CPU: torch F.linear float32 and bfloat16, torch's INT4 CPU GEMM
aten._weight_int4pack_mm_for_cpu on the same codes, vLLM's cpu_gemm_wna16 (CPUWNA16, fed our codes
through kernels/vllm_mp.py as kernel_backend=vllm does) where the build has it, and, where our
CPU default is the AMX kernel, our AVX-512 VNNI kernel (int16 activations, sqplus_avx512vnni) forced
on the same weights, where it is AMX or VNNI, our AVX-512 FMA kernel (sqplus_avx512), and where it
is AVX2 with 16-bit activations (the int16 kernel), our AVX2 FMA kernel on the same values in
float32 (sqplus_avx2_fma).
CUDA: torch float16 F.linear (cuBLAS), torch._weight_int4pack_mm (bfloat16); besides our default
(by rows) also our two paths forced: sqplus_stream (M <= 1024) and sqplus_dequant (M >= 16).

Timing: CPU: median of many single calls in one process, the methods interleaved call by call.
CUDA: each method's calls are captured in one CUDA graph (64 calls cycling the weight copies; vLLM
replays graphs for decode too, and a torch op's ~20 us host cost would otherwise hide the kernel),
replays interleaved method by method, median per-call time. Weights are "cold" by default: each call reads
the next of several copies, enough that they exceed 3x the last-level cache (50 MiB L2 on H100),
at most 512 MiB (COLD_BYTES; a VM's sysfs reports its host's L3), so GB/s means memory, not cache (--warm:
one copy). GB/s = weight bytes the method
reads (codes + scales + zeros) / time; %BW compares it with this machine's read bandwidth, measured
here as the median time of a large-array sum. Ratios > 1 mean ours is faster.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import random
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/machine.py
import machine as results_machine  # noqa: E402

from vllm_sqplus.kernels import CpuBackend, CudaBackend
from vllm_sqplus.kernels.backends import ours
from vllm_sqplus.quant import dequantize_int4, quantize_int4

SHAPES = {"llama7b.qkvo": (4096, 4096), "llama7b.gate_up": (11008, 4096),
          "llama7b.down": (4096, 11008), "qwen0.5b.qo": (896, 896), "qwen0.5b.qkv": (1152, 896),
          "qwen0.5b.gate_up": (4864, 896), "qwen0.5b.down": (896, 4864)}
MS = (1, 2, 4, 8, 16, 32, 64, 256)
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


# ------------------------------------------------------------------------------------ machine
_cpu_model = results_machine.cpu_model


def _cpu_flags() -> list[str]:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                fl = line.split(":", 1)[1].split()
                return [f for f in ("avx2", "fma", "avx512f", "avx512bw", "avx512_bf16", "amx_tile")
                        if f in fl]
    except OSError:
        pass
    return []


def _llc_bytes(device: str) -> int:
    if device == "cuda":
        return int(getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20))
    sizes = []  # largest cache level of cpu0 (an index without a readable size is skipped)
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        entries = os.listdir(base)
    except OSError:
        entries = []
    for idx in entries:
        try:
            s = open(os.path.join(base, idx, "size")).read().strip()
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1], 1)
            sizes.append(int(s.rstrip("KMG")) * mult)
        except (OSError, ValueError, IndexError):
            continue
    return max(sizes) if sizes else 32 << 20


def machine_slug(device: str) -> str:
    """Results folder name of this machine (benchmarks/machine.py)."""
    return results_machine.slug(device)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _time_call(fn, device: str, clock=time.perf_counter) -> float:
    if device == "cuda":
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        return a.elapsed_time(b) / 1e3
    t = clock()
    fn()
    return clock() - t


def timed_medians(fns: dict, device: str, min_time: float, min_rounds: int = 10,
                  max_rounds: int = 2000, clock=time.perf_counter) -> dict:
    """Median seconds of single calls of each fn, interleaved round-robin (one call of each per
    round) so that load from other users of a shared machine hits every method alike, in an order
    shuffled each round (fixed seed): the call before a method leaves the caches and the vector
    units' state behind (measured: our kernel right after a oneDNN bfloat16 GEMM took 23 us where
    it takes 16), so no method may always follow the same one."""
    for fn in fns.values():
        for _ in range(3):
            fn()
    _sync(device)
    times: dict = {k: [] for k in fns}
    order = random.Random(0)
    start = time.perf_counter()
    rounds = 0
    # at least min_rounds, or 3 when those would take over 4x the budget (M = 256 on big shapes)
    while rounds < max_rounds:
        spent = time.perf_counter() - start
        if rounds >= min_rounds and spent >= min_time * len(fns):
            break
        if rounds >= 3 and spent >= 4 * min_time * len(fns):
            break
        names = list(fns)
        order.shuffle(names)
        for k in names:
            times[k].append(_time_call(fns[k], device, clock))
        rounds += 1
    return {k: statistics.median(v) for k, v in times.items()}


def timed_medians_graph(fns: dict, calls: int = 64, rounds: int = 10) -> dict:
    """CUDA: median per-call seconds of each fn, `calls` calls captured in one CUDA graph per fn
    (each call advances its Rotor at capture, so the graph cycles the weight copies), replays
    interleaved fn by fn."""
    graphs = {}
    for k, fn in fns.items():
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        g, s = torch.cuda.CUDAGraph(), torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(calls):  # warm on the side stream, as torch's docs advise before capture
                fn()
            torch.cuda.synchronize()
            with torch.cuda.graph(g, stream=s):
                for _ in range(calls):
                    fn()
        torch.cuda.current_stream().wait_stream(s)
        g.replay()
        graphs[k] = g
    torch.cuda.synchronize()
    times: dict = {k: [] for k in fns}
    for _ in range(rounds):
        for k, g in graphs.items():
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            g.replay()
            b.record()
            b.synchronize()
            times[k].append(a.elapsed_time(b) / 1e3 / calls)
    return {k: statistics.median(v) for k, v in times.items()}


def read_bandwidth(device: str, gib: float = 1.0, iters: int = 15, clock=time.perf_counter) -> float:
    """Memory read bandwidth in GB/s: the better median of two simple streaming reads of a `gib`
    GiB float32 array, a sum and (CPU) a matrix-vector product (torch's sum alone reads slower
    than BLAS gemv on some CPUs)."""
    n = max(1, int(gib * (1 << 30)) // 4 // 16384) * 16384  # a whole number of gemv rows
    a = torch.ones(n, dtype=torch.float32, device=device)
    fns = {"sum": lambda: a.sum()}
    if device == "cpu":
        w, v = a.view(16384, -1), torch.ones(n // 16384)
        fns["mv"] = lambda: torch.mv(w, v)
    t = min(timed_medians(fns, device, 0.0, iters, iters, clock=clock).values())
    del a
    return n * 4 / t / 1e9


# ------------------------------------------------------------------------------------ methods
# cold weights: copies of a method's weights totalling 3x the last-level cache, at most this much
# (a cyclic walk over more than the cache misses every time under LRU-like replacement). Why the
# cap and not 32 copies as before: a VM reports its host's L3 (480 MiB on the Xeon VM), and a
# streaming read there runs at 29 GB/s up to 64 MiB, 22 at 128 MiB and 15 from 256 MiB on, so 11
# copies of a 9 MiB weight (what the unreadable-L3 fallback of 32 MiB gave) were partly in cache.
DEFAULT_COLD_BYTES = 1 << 29  # 512 MiB: 4x this VM's effective L3; 8 methods' copies: 4 GiB
COLD_BYTES = DEFAULT_COLD_BYTES  # set by main() from --cold-gib, for each run


class Rotor:
    """Calls fn(copy) on copies of its weights in turn, so each call reads weights not in cache."""

    def __init__(self, make, nbytes: int, llc: int, warm: bool):
        self.n = 1 if warm else max(1, math.ceil(min(3 * llc, COLD_BYTES) / max(nbytes, 1)))
        self.copies = [make() for _ in range(self.n)]
        self.i = 0

    def next(self):
        self.i = (self.i + 1) % self.n
        return self.copies[self.i]


def _nbytes(d: dict) -> int:
    return sum(t.numel() * t.element_size() for t in d.values())


def build_methods(q, s, z, g, device, act_dtype, llc, warm):
    """{name: (fn(x) -> y, weight bytes, act dtype)} for ours and each peer that runs here.
    Also returns {name: reason} for peers that are absent."""
    n, k = q.shape
    methods, absent = {}, {}
    w32 = dequantize_int4(q, s, z, g, torch.float32)

    mine = ours(device)  # the backend object the vLLM plugin would run (CPU: best ISA)
    ok, why = mine.can_implement(n, k, g, act_dtype, device)
    if ok:
        probe = mine.pack(q, s, z, g)
        rot = Rotor(lambda: {k_: v.clone() for k_, v in probe.items()}, _nbytes(probe), llc, warm)
        variants = {"sqplus": mine}
        isa = getattr(mine, "isa", None) if device == "cpu" else None
        if isa == "amx":  # our VNNI kernel: what AMX hands the rows below kAmxMinRows to
            variants["sqplus_avx512vnni"] = CpuBackend("avx512vnni")
        if isa in ("amx", "avx512vnni"):  # the FMA kernel (the default before the VNNI one)
            variants["sqplus_avx512"] = CpuBackend("avx512")
        if device == "cuda":  # our two CUDA paths forced, beside the default (by rows)
            variants.update(sqplus_stream=CudaBackend(path="stream"),
                            sqplus_dequant=CudaBackend(path="dequant"))
        for name, b in variants.items():
            methods[name] = (lambda x, b=b: b.apply(x, rot.next(), g), _nbytes(probe), act_dtype)
        if isa == "avx2" and act_dtype != torch.float32:
            # our AVX2 FMA kernel (the 16-bit default before the int16 one) on the same values,
            # handed over as float32: the FMA kernel converts 16-bit x to float32 itself anyway
            methods["sqplus_avx2_fma"] = (lambda x, b=mine: b.apply(x, rot.next(), g), _nbytes(probe),
                                          torch.float32)
    else:
        absent["sqplus"] = f"our {device} kernel cannot run here: {why}"

    peer_dtypes = ([torch.float32, torch.bfloat16] if device == "cpu" else [torch.float16])
    for dt in peer_dtypes:
        wd = w32.to(dt)
        rot_l = Rotor(lambda wd=wd: wd.clone(), wd.numel() * wd.element_size(), llc, warm)
        name = {torch.float32: "torch_f32", torch.bfloat16: "torch_bf16", torch.float16: "torch_f16"}[dt]
        methods[name] = (lambda x, r=rot_l: F.linear(x, r.next()), wd.numel() * wd.element_size(), dt)

    # torch's own INT4 GEMM. Its dequantization is (q - 8) * scale + zero, with scales_and_zeros
    # [K/g, N, 2] = (scale, zero); ours is (q - z) * s = (q - 8) * s + (8 - z) * s, so zero = (8-z)*s.
    sz32 = torch.stack([s.float().T, ((8 - z.float()) * s.float()).T], dim=-1).contiguous()
    try:
        if device == "cpu":
            wp = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.int(), 1)  # [N, K/2] uint8
            t_dt = act_dtype
            sz = sz32.to(t_dt)
            mm = torch.ops.aten._weight_int4pack_mm_for_cpu
        else:
            packed_u8 = ((q[:, ::2] << 4) | q[:, 1::2]).contiguous()  # [N, K/2]: even k high nibble
            wp = torch.ops.aten._convert_weight_to_int4pack(packed_u8, 8)
            t_dt = torch.bfloat16  # torch's CUDA int4 mm takes bfloat16 activations
            sz = sz32.to(t_dt)
            mm = torch.ops.aten._weight_int4pack_mm
        xv = torch.randn(3, k, device=device).to(t_dt)
        err = ((mm(xv, wp, g, sz).float() - xv.float() @ w32.T).abs().max()
               / (xv.float() @ w32.T).abs().max()).item()
        if err > 2e-2:
            raise RuntimeError(f"does not compute the same function (rel. error {err:.3g})")
        nb = wp.numel() * wp.element_size() + sz.numel() * sz.element_size()
        rot_t = Rotor(lambda: (wp.clone(), sz.clone()), nb, llc, warm)

        def torch_int4(x, r=rot_t, mm=mm):
            w_, sz_ = r.next()
            return mm(x, w_, g, sz_)
        methods["torch_int4"] = (torch_int4, nb, t_dt)
    except (RuntimeError, AttributeError) as e:
        absent["torch_int4"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"

    if device == "cpu":
        try:
            _vllm_wna16(methods, absent, q, s, z, g, act_dtype, llc, warm, w32)
        except Exception as e:  # vLLM missing or its kernel refusing: the table says why
            absent["vllm_wna16"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    return methods, absent, w32


_VLLM_CONFIG_CTX = None


def _single_process_vllm() -> None:
    """vLLM's kernels ask for the current config and the tensor-parallel group while repacking: a
    default config and a world of one process."""
    from vllm.distributed import parallel_state as ps
    from vllm.config import VllmConfig, set_current_vllm_config
    global _VLLM_CONFIG_CTX
    if _VLLM_CONFIG_CTX is None:  # some kernels read the current config; one for the whole run
        _VLLM_CONFIG_CTX = set_current_vllm_config(VllmConfig())
        _VLLM_CONFIG_CTX.__enter__()
    if ps.model_parallel_is_initialized():
        return
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ps.init_distributed_environment(world_size=1, rank=0, local_rank=0,
                                    distributed_init_method=f"tcp://127.0.0.1:{port}", backend="gloo")
    ps.initialize_model_parallel(1, 1)


def _vllm_wna16(methods, absent, q, s, z, g, act_dtype, llc, warm, w32):
    """vLLM's own CPU W4A16 kernel (CPUWNA16: cpu_gemm_wna16, built only for AVX-512 CPUs), fed the
    same codes through kernels/vllm_mp.py exactly as kernel_backend=vllm does in the plugin."""
    import vllm._custom_ops  # noqa: F401  (registers torch.ops._C.*)
    from vllm_sqplus.kernels.vllm_mp import VllmMPBackend, has_cpu_gemm_wna16
    if not has_cpu_gemm_wna16():
        absent["vllm_wna16"] = "absent (this vLLM build has no cpu_gemm_wna16)"
        return
    _single_process_vllm()
    n, k = q.shape

    def make():
        b = VllmMPBackend(zero_point=True, input_size=k, output_size=n)
        ok, why = b.can_implement(n, k, g, act_dtype, "cpu")
        if not ok:
            raise RuntimeError(why)
        b.pack(q, s, z, g)
        return b
    probe = make()
    xv = torch.randn(3, k).to(act_dtype)
    err = ((probe.apply(xv, None, g).float() - xv.float() @ w32.T).abs().max()
           / (xv.float() @ w32.T).abs().max()).item()
    if err > 2e-2:
        raise RuntimeError(f"does not compute the same function (rel. error {err:.3g})")
    nb = _nbytes({n_: t.data for n_, t in probe.holder.named_parameters()})
    rot = Rotor(make, nb, llc, warm)
    methods["vllm_wna16"] = (lambda x, r=rot: r.next().apply(x, None, g), nb, act_dtype)


def check_ours(fn, w32, k, device, act_dtype):
    x = torch.randn(5, k, device=device).to(act_dtype)
    ref = x.float() @ w32.T
    err = ((fn(x).float() - ref).abs().max() / ref.abs().max()).item()
    if err > 1e-2:
        raise SystemExit(f"sqplus kernel disagrees with the reference (rel. error {err:.3g})")
    return err


# ------------------------------------------------------------------------------------ report
def render_markdown(rec: dict) -> str:
    """The JSON record as a markdown table (written beside the JSON)."""
    mach = rec["machine"]
    dev = mach["device"]
    peers = (["torch_f32", "torch_bf16", "torch_int4"] if dev == "cpu" else ["torch_f16", "torch_int4"])
    peers += [p for p in ("vllm_wna16", "sqplus_avx512vnni", "sqplus_avx512", "sqplus_avx2_fma")
              if any(p in r["methods"] for r in rec["rows"])]
    variants = [] if dev == "cpu" else ["sqplus_stream", "sqplus_dequant"]
    lines = [f"# W4A16 kernel benchmark ({dev})", "",
             f"- machine: {mach['name']}, {mach['cpus']} cpus, torch threads {mach['torch_threads']}, "
             f"flags {mach['cpu_flags']}, torch {mach['torch']}",
             f"- date: {rec['date']}; load average at start/end: {mach['loadavg_start'][0]:.2f} / "
             f"{mach['loadavg_end'][0]:.2f} (shared machine)",
             f"- command: `{rec['command']}`",
             f"- memory read bandwidth (measured, {mach['torch_threads']} thread(s)): "
             f"{rec['read_bandwidth_GBps']:.1f} GB/s; weights "
             f"{'warm' if rec['warm'] else 'cold (rotated copies > 3x LLC)'}; activations "
             f"{rec['activation_dtype'].replace('torch.', '')}; group {rec['rows'][0]['group_size']}; "
             f"clock {rec.get('clock', 'wall')}",
             *[f"- {k}: {v}" for k, v in rec["absent"].items()], "",
             "Ratios are peer time / our time (> 1: ours faster). GB/s counts the weight bytes each "
             "method reads.", "",
             "| shape | N x K | M | ours us | GB/s | % BW | " + " | ".join(f"vs {p}" for p in peers)
             + " | " + " | ".join(f"{p} us" for p in peers + variants) + " |",
             "|" + "---|" * (6 + 2 * len(peers) + len(variants))]
    for row in rec["rows"]:
        r, o = row["methods"], row["methods"].get("sqplus")
        f = lambda v, d=2: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
        lines.append(f"| {row['shape']} | {row['N']}x{row['K']} | {row['M']} | "
                     f"{f(o and o['us'], 1)} | {f(o and o['GBps'], 1)} | {f(row['pct_bw'], 1)} | "
                     + " | ".join(f(row['speedup_vs'].get(p)) for p in peers) + " | "
                     + " | ".join(f(r[p]['us'] if p in r else None, 1) for p in peers + variants) + " |")
    if rec.get("notes"):
        lines += ["", "## Notes", "", *[f"- {n}" for n in rec["notes"]]]
    return "\n".join(lines) + "\n"


def write_record(rec: dict, out: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(rec, f, indent=1)
    md = os.path.splitext(out)[0] + ".md"
    with open(md, "w") as f:
        f.write(render_markdown(rec))
    print(f"# wrote {out} and {md}")


# ------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    global COLD_BYTES
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--m", default=",".join(map(str, MS)), help="comma list of M (tokens)")
    ap.add_argument("--shapes", default="all",
                    help="comma list of NxK or names (" + ", ".join(SHAPES) + ")")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="activation dtype of ours and torch_int4 (default: bfloat16 CPU, float16 CUDA)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    ap.add_argument("--min-time", type=float, default=0.25, help="seconds per measurement")
    ap.add_argument("--warm", action="store_true", help="one weight copy (cache-resident if it fits)")
    ap.add_argument("--cold-gib", type=float, default=DEFAULT_COLD_BYTES / 2**30,
                    help="cold weights: the copies of each method total min(3x LLC, this) (default 0.5)")
    ap.add_argument("--out", default=None,
                    help="JSON path (default benchmarks/results/<machine>/kernels_<dev>.json)")
    ap.add_argument("--bandwidth-gib", type=float, default=1.0, help="array size of the bandwidth probe")
    ap.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                    help="cpu: the calling thread's CPU time (needs --threads 1; on a loaded shared "
                         "machine it leaves out the time the scheduler gives to other processes)")
    ap.add_argument("--from-json", default=None, help="only re-render the markdown of a JSON record")
    ap.add_argument("--note", action="append", default=[],
                    help="with --from-json: add a note (analysis) to the record and its markdown")
    args = ap.parse_args(argv)
    COLD_BYTES = int(args.cold_gib * 2**30)
    if args.from_json:
        rec = json.load(open(args.from_json))
        rec["notes"] = rec.get("notes", []) + args.note
        write_record(rec, args.from_json)
        return 0

    dev = args.device
    if args.clock == "cpu" and (dev != "cpu" or args.threads != 1):
        raise SystemExit("--clock cpu needs --device cpu --threads 1 (one thread's CPU time)")
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    if dev == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU visible")
    if args.threads:
        torch.set_num_threads(args.threads)
    act = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if dev == "cpu" else torch.float16)
    ms = [int(m) for m in args.m.split(",")]
    shapes = []
    for s_ in ([*SHAPES] if args.shapes == "all" else args.shapes.split(",")):
        if s_ in SHAPES:
            shapes.append((s_, *SHAPES[s_]))
        else:
            n_, k_ = map(int, s_.lower().split("x"))
            shapes.append((s_, n_, k_))
    llc = _llc_bytes(dev)
    load0 = os.getloadavg()

    bw = read_bandwidth(dev, gib=args.bandwidth_gib, clock=clock)
    machine = (torch.cuda.get_device_name(0) if dev == "cuda" else _cpu_model())
    print(f"# {machine}; {os.cpu_count()} cpus, torch threads {torch.get_num_threads()}, "
          f"flags {_cpu_flags()}; torch {torch.__version__}; load avg {load0[0]:.2f}")
    print(f"# memory read bandwidth (1 GiB sum or gemv, median): {bw:.1f} GB/s; last-level cache "
          f"{llc >> 20} MiB; weights {'warm' if args.warm else 'cold (rotated copies)'}; "
          f"group {args.group_size}; activations {str(act).replace('torch.', '')}; clock {args.clock}")

    rows, absent_all = [], {}
    hdr = (f"{'shape':>18} {'NxK':>11} {'M':>4} {'ours us':>9} {'GB/s':>6} {'%BW':>5} "
           f"{'vs f32':>7} {'vs bf16':>7} {'vs int4':>7} {'vs vllm':>7} {'vs vnni':>7} {'vs fma':>7} "
           f"{'vs fma2':>7}")
    peers_cols = (["torch_f32", "torch_bf16", "torch_int4", "vllm_wna16", "sqplus_avx512vnni", "sqplus_avx512",
                   "sqplus_avx2_fma"]
                  if dev == "cpu"
                  else ["torch_f16", "torch_int4"])
    if dev == "cuda":
        hdr = hdr.replace("vs f32", "vs f16").replace(" vs bf16", "        ")
    print(hdr)
    for name, n, k in shapes:
        torch.manual_seed(0)
        q, s, z = quantize_int4(torch.randn(n, k) * 0.02, args.group_size)
        q, s, z = q.to(dev), s.to(dev), z.to(dev)
        methods = fns = xs = None  # the previous shape's weight copies go before the next's are made
        gc.collect()
        methods, absent, w32 = build_methods(q, s, z, args.group_size, dev, act, llc, args.warm)
        absent_all.update(absent)
        err = check_ours(methods["sqplus"][0], w32, k, dev, act) if "sqplus" in methods else None
        for m in ms:
            row = {"shape": name, "N": n, "K": k, "M": m, "group_size": args.group_size,
                   "ours_rel_err": err, "methods": {}}
            xs = {meth: torch.randn(m, k, device=dev).to(dt) for meth, (_, _, dt) in methods.items()}
            fns = {meth: (lambda f=fn, x=xs[meth]: f(x)) for meth, (fn, _, _) in methods.items()
                   if not (meth == "sqplus_stream" and m > 1024 or meth == "sqplus_dequant" and m < 16)}
            timed = (timed_medians_graph(fns) if dev == "cuda"
                     else timed_medians(fns, dev, args.min_time, clock=clock))
            for meth, t in timed.items():
                nbytes, dt = methods[meth][1], methods[meth][2]
                row["methods"][meth] = {"us": t * 1e6, "GBps": nbytes / t / 1e9, "weight_bytes": nbytes,
                                        "TFLOPs": 2 * m * n * k / t / 1e12, "act_dtype": str(dt)}
            r = row["methods"]
            ours = r.get("sqplus")

            def ratio(p):
                return (r[p]["us"] / ours["us"]) if ours and p in r else None
            row["speedup_vs"] = {p: ratio(p) for p in peers_cols}
            row["pct_bw"] = 100 * ours["GBps"] / bw if ours else None
            rows.append(row)
            fmt = lambda v: f"{v:7.2f}" if v is not None else "      -"  # noqa: E731
            cols = " ".join(fmt(row["speedup_vs"][p]) for p in peers_cols)
            if dev == "cuda":
                cols += " " * 16
            us = f"{ours['us']:9.1f} {ours['GBps']:6.1f} {row['pct_bw']:5.1f}" if ours else f"{'absent':>22}"
            if not ours:  # no ratios to show: the peers' own times instead
                cols = "  " + ", ".join(f"{p} {v['us']:.1f} us" for p, v in r.items())
            print(f"{name:>18} {f'{n}x{k}':>11} {m:>4} {us} {cols}", flush=True)
    for k_, v in absent_all.items():
        print(f"# {k_}: {v}")

    load1 = os.getloadavg()
    record = {"machine": {"device": dev, "name": machine, "cpus": os.cpu_count(),
                          "torch_threads": torch.get_num_threads(), "cpu_flags": _cpu_flags(),
                          "llc_bytes": llc, "torch": torch.__version__, "python": sys.version.split()[0],
                          "loadavg_start": load0, "loadavg_end": load1},
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join([os.path.relpath(sys.argv[0])] + (argv or sys.argv[1:])),
              "read_bandwidth_GBps": bw, "warm": args.warm, "cold_bytes": COLD_BYTES, "clock": args.clock, "activation_dtype": str(act),
              "absent": absent_all, "rows": rows}
    record["machine"]["slug"] = machine_slug(dev)
    write_record(record, args.out or os.path.join(RESULTS, record["machine"]["slug"], f"kernels_{dev}.json"))
    print(f"# load avg at end {load1[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
