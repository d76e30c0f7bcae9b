"""A/B of the CPU kernel: this working tree's build against the CPU sources of a git revision, in one
process, calls interleaved (so a noisy VM's drift hits both sides alike).

  .venv/bin/python benchmarks/kernel_ab.py --rev HEAD [--m 1,2,4] [--cold] [--shapes 4096x4096,896x896]
  SQPLUS_CPU_ISA=avx512vnni .venv/bin/python benchmarks/kernel_ab.py --rev HEAD~1   # one path forced

"new" is torch.ops.sqplus (the installed editable build: rebuild it first); "old" is csrc/ at --rev,
compiled here into its own op namespace (sqplus_ab) with the same flags as setup.py (-O3, OpenMP),
cached under ~/.cache/sqplus-kernel-ab/<commit>. Both must compute the same bits on the same packed
weights (checked before timing; a layout change between the two cannot be A/B'd this way).
Prints one line per shape and M (median us of each, old / new > 1: the new one is faster) and, with
--out, writes them as JSON with the machine, date and command. A developer's tool: the records of
the kernel's speed are kernel_bench.py's.
"""
from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import machine  # noqa: E402

NS = "sqplus_ab"


def build_old(rev: str) -> Path:
    """csrc/ (ops.cpp and cpu/) at `rev`, its torch library and C++ namespace renamed, built once."""
    import torch.utils.cpp_extension as ce
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", rev], capture_output=True, text=True)
    if commit.returncode:
        sys.exit(f"error: --rev {rev!r} is not a revision of {ROOT}: {commit.stderr.strip()}")
    sha = commit.stdout.strip()
    d = Path(os.environ.get("SQPLUS_AB_CACHE", Path.home() / ".cache" / "sqplus-kernel-ab")) / sha[:12]
    so = d / f"{NS}.so"
    if so.exists():
        return so
    (d / "cpu").mkdir(parents=True, exist_ok=True)
    files = subprocess.run(["git", "-C", str(ROOT), "ls-tree", "--name-only", sha, "csrc/", "csrc/cpu/"],
                           capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if not (f.endswith(".cpp") or f.endswith(".h")):
            continue
        src = subprocess.run(["git", "-C", str(ROOT), "show", f"{sha}:{f}"], capture_output=True,
                             text=True, check=True).stdout
        for a, b in (("TORCH_LIBRARY(sqplus,", f"TORCH_LIBRARY({NS},"),
                     ("TORCH_LIBRARY_FRAGMENT(sqplus,", f"TORCH_LIBRARY_FRAGMENT({NS},"),
                     ("TORCH_LIBRARY_IMPL(sqplus,", f"TORCH_LIBRARY_IMPL({NS},"),
                     ("sqplus_cpu", f"{NS}_cpu")):
            src = src.replace(a, b)
        (d / f.removeprefix("csrc/")).write_text(src)
    ce.load(name=NS, sources=sorted(glob.glob(str(d / "*.cpp")) + glob.glob(str(d / "cpu" / "*.cpp"))),
            extra_cflags=["-O3", "-std=c++17", "-fopenmp"], extra_ldflags=["-fopenmp"],
            build_directory=str(d), is_python_module=False, verbose=False)
    return so


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rev", required=True, help="git revision whose csrc/ is the 'old' side")
    ap.add_argument("--m", default="1,2,4")
    ap.add_argument("--shapes", default="4096x4096,896x896,4864x896,896x4864")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--cold", action="store_true", help="rotate copies of the weights (160 MiB)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", help="JSON path for the lines (optional)")
    a = ap.parse_args()
    shapes = []
    for shape in a.shapes.split(","):
        try:
            n, k = (int(v) for v in shape.lower().split("x"))
        except ValueError:
            sys.exit(f"error: --shapes: {shape!r} is not NxK (e.g. 4096x4096)")
        if n <= 0 or k <= 0 or (a.group_size != -1 and (a.group_size <= 0 or k % a.group_size)):
            sys.exit(f"error: --shapes {shape}: K = {k} is not a positive multiple of --group-size {a.group_size}")
        shapes.append((shape, n, k))
    import vllm_sqplus.kernels.ops  # noqa: F401  (the new side: torch.ops.sqplus)
    from vllm_sqplus.quant import quantize_int4
    torch.ops.load_library(str(build_old(a.rev)))
    torch.set_num_threads(a.threads)
    fa, fb = torch.ops.sqplus.w4a16_gemm, getattr(torch.ops, NS).w4a16_gemm
    torch.manual_seed(0)
    rows = []
    for shape, n, k in shapes:
        q, s, z = quantize_int4(torch.randn(n, k), a.group_size)[:3]
        first = torch.ops.sqplus.w4a16_pack(q, s, z, a.group_size)
        nb = sum(t.numel() * t.element_size() for t in first)
        nc = max(1, (160 << 20) // nb) if a.cold else 1
        copies = [first] + [torch.ops.sqplus.w4a16_pack(q, s, z, a.group_size) for _ in range(nc - 1)]
        for m in (int(v) for v in a.m.split(",")):
            x = torch.randn(m, k).bfloat16()
            if not torch.equal(fa(x, *first, a.group_size), fb(x, *first, a.group_size)):
                sys.exit(f"error: {shape} M={m}: the two builds compute different outputs")
            ta, tb = [], []
            for it in range(max(200, 40000 // max(1, n * k // 200000))):
                c = copies[it % nc]
                for f, t in ((fa, ta), (fb, tb)) if it % 2 else ((fb, tb), (fa, ta)):
                    t0 = time.perf_counter()
                    f(x, *c, a.group_size)
                    t.append(time.perf_counter() - t0)
            new, old = statistics.median(ta) * 1e6, statistics.median(tb) * 1e6
            rows.append({"shape": shape, "m": m, "new_us": round(new, 2), "old_us": round(old, 2),
                         "old_over_new": round(old / new, 3)})
            print(f"{shape} M={m} {'cold' if a.cold else 'warm'}: new {new:8.1f} us  old {old:8.1f} us"
                  f"  old/new {old / new:5.2f}", flush=True)
    if a.out:
        rec = {"machine": machine.cpu_model(), "slug": machine.slug("cpu"), "cpus": os.cpu_count(),
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "command": "python " + " ".join([os.path.relpath(__file__, ROOT)] + sys.argv[1:]),
               "isa_env": os.environ.get("SQPLUS_CPU_ISA"), "rows": rows}
        tmp = Path(a.out).with_suffix(".tmp")
        tmp.write_text(json.dumps(rec, indent=1) + "\n")
        tmp.replace(a.out)


if __name__ == "__main__":
    main()
