"""Time and memory of one decoder layer's GPTQ stage: GPTQ's usual order, true-sequential order, and
true-sequential with act-order (the default of `sqplus gptq` and the search's stage since session 6).

The search's GPTQ stage (vllm_sqplus.search._pass_gptq -> vllm_sqplus.gptq.gptq_layer) costs per layer:
the Hessians (a forward of the layer on the statistics samples), GPTQ itself, and the quantized layer's
output for the next layer (a second forward in the usual order, none in true-sequential order). This
runs gptq_layer on one real decoder layer (its input: the statistics samples through the layers before
it in full precision), once per order, and records wall seconds and the process's peak resident memory
during each (VmHWM, reset before each through /proc/self/clear_refs), plus how much the two orders'
codes differ. Each order runs --repeats times, alternating; the minimum counts. Multiply by the number of layers for
the stage.

usage: OMP_NUM_THREADS=2 python benchmarks/gptq_layer_time.py --model .models/qwen2.5-coder-1.5b-instruct
           [--layer 1] [--samples 32] [--seq-len 512] [--threads 2] [--out benchmarks/results/<machine>/gptq_layer_time_<name>.json]
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

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import RESULTS, cpu_model, slug  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--layer", type=int, default=1)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2, help="runs per order, alternating (the first run warms up)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from transformers import AutoTokenizer
    from vllm_sqplus.calib import calibration_ids
    from vllm_sqplus.calibrate import LayerwiseModel
    from vllm_sqplus.checkpoint import load_model, proc_status_kib, reset_peak_rss
    from vllm_sqplus.gptq import gptq_layer

    from vllm_sqplus.errors import SqplusError
    load_avg = os.getloadavg()
    try:  # a wrong path, architecture or non-finite weights: one line, no traceback
        model, arch = load_model(a.model, "auto")
    except SqplusError as e:
        raise SystemExit(f"error: {e}") from None
    tok = AutoTokenizer.from_pretrained(a.model)
    ids, _ = calibration_ids(tok, "stdlib", a.samples, 4, a.seq_len)
    store = next(model.parameters()).dtype
    runner = LayerwiseModel(model, arch)
    if not 0 <= a.layer < len(runner.layers):
        raise SystemExit(f"error: --layer {a.layer} is not a layer of {a.model} (0..{len(runner.layers) - 1})")
    with torch.no_grad():
        hs = runner.embed(ids)
        for i in range(a.layer):
            hs = runner.run_layer(runner.layer_on_device(i), hs)
    orders = (("usual", False, False), ("true-sequential", True, False), ("true-sequential act-order", True, True))
    runs: dict = {o[0]: [] for o in orders}
    codes = {}
    for _ in range(a.repeats):
        for order, seq, act in orders:
            layer = runner.layer_on_device(a.layer)
            reset = reset_peak_rss()
            before = proc_status_kib("VmRSS")
            t = time.perf_counter()
            qs, _ = gptq_layer(layer, arch, runner, hs, a.group_size, True, store, reproducible=True,
                               true_sequential=seq, act_order=act)
            secs = time.perf_counter() - t
            runs[order].append({"seconds": round(secs, 2), "rss_before_gib": round(before / 2**20, 3),
                                "peak_rss_gib": round(proc_status_kib("VmHWM") / 2**20, 3) if reset else None})
            codes[order] = qs
            print(order, json.dumps(runs[order][-1]), flush=True)
            del layer
    rows = {k: {"seconds": min(r["seconds"] for r in v), "runs": v} for k, v in runs.items()}
    diff = {n: float((codes["usual"][n][0] != codes["true-sequential"][n][0]).float().mean()) for n in arch.linears}
    try:
        git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent).stdout.strip()
    except OSError:
        git = None
    rec = {"model": a.model, "layer": a.layer, "layers": len(runner.layers),
           "tokens": int(ids.numel()), "group_size": a.group_size, "threads": torch.get_num_threads(),
           "orders": rows, "codes_differing_share": diff,
           "stage_estimate_min": {k: round(v["seconds"] * len(runner.layers) / 60, 1) for k, v in rows.items()},
           "machine": f"{slug()} ({cpu_model()}, {os.cpu_count()} cpus, {platform.node()})",
           "load_average_at_start": [round(x, 2) for x in load_avg],
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": " ".join(["python", "benchmarks/gptq_layer_time.py", *(argv or sys.argv[1:])]),
           "git": git}
    name = Path(a.model).name
    out = Path(a.out) if a.out else RESULTS / slug() / f"gptq_layer_time_{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(rec, indent=1) + "\n")
    os.replace(tmp, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
