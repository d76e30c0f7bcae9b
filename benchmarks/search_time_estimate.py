"""usage: OMP_NUM_THREADS=2 python benchmarks/search_time_estimate.py 2 > LOG   (repo root)
Estimate the default sqplus smooth time on Qwen2.5-Coder-1.5B from truncated-depth searches.
Runs the real search (default options incl. GPTQ stage) on the first L decoder layers for L in (1, 2);
per phase: per-layer cost = T(2) - T(1); estimate = T(1) + (layers - 1) * per-layer (the fixed costs:
embedding, lm_head scoring, Fisher head, stay in T(1)). Memory is that of the full model loaded."""
import json, sys, time, resource, torch
from vllm_sqplus.checkpoint import load_model
from vllm_sqplus.calib import calibration_ids
from vllm_sqplus.search import search, QuantSpec, SearchOptions
from transformers import AutoTokenizer
torch.set_num_threads(int(sys.argv[1]))
path = ".models/qwen2.5-coder-1.5b-instruct"
t = time.perf_counter()
model, arch = load_model(path, "auto")
tok = AutoTokenizer.from_pretrained(path)
stat, held = calibration_ids(tok, "stdlib", 32, 4, 512)
print("load+tokenize", round(time.perf_counter() - t, 1), flush=True)
layers = model.model.layers
full = len(layers)
out = {"threads": torch.get_num_threads(), "full_layers": full, "runs": {}}
for L in (1, 2):
    model.model.layers = layers[:L]
    model.config.num_hidden_layers = L
    t = time.perf_counter()
    res = search(model, arch, stat, held, QuantSpec(128, True, torch.bfloat16), SearchOptions(gptq=True))
    out["runs"][L] = {"seconds": res.seconds, "wall": time.perf_counter() - t, "chosen": res.best}
    print(L, json.dumps(out["runs"][L]), flush=True)
r1, r2 = out["runs"][1]["seconds"], out["runs"][2]["seconds"]
est = {}
for k in r2:
    per = r2[k] - r1.get(k, 0.0)
    est[k] = r1.get(k, 0.0) + per * (full - 1)
out["estimate_full_seconds"] = est
out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
print(json.dumps(out, indent=1))
