"""Collect the lm_head HumanEval runs beside RTN / FP on the same 40 problems -> a generated JSON.

Reads out/humaneval_rtn_lmhead_{int4,int8}_40 (each made by `SQPLUS_LM_HEAD=MODE sqplus eval humaneval
.models/qwen2.5-coder-0.5b-instruct --quantization smoothquant_plus --dtype float32 --max-tokens 512
--limit 40 --out out/humaneval_rtn_lmhead_MODE_40`) and the FP / RTN runs of
benchmarks/results/humaneval.json; writes benchmarks/results/lm_head_humaneval_qwen2.5-coder-0.5b.json.
usage (repo root): python benchmarks/lm_head_humaneval.py
"""
import json, os, tempfile
from pathlib import Path
legacy = {r["name"]: r for r in json.loads(Path("benchmarks/results/humaneval.json").read_text())["runs"]}
ids = [f"HumanEval/{i}" for i in range(40)]
out = {"benchmark": "HumanEval first 40 problems, greedy, max 512 new tokens, float32, vLLM CPU",
       "model": "qwen2.5-coder-0.5b-instruct",
       "made_by": "python benchmarks/lm_head_humaneval.py (copies each run's summary.json and per-task pass/fail)",
       "runs": {}}
for name in ("fp32", "rtn_int4"):
    r = legacy[name]
    out["runs"][name] = {"source": f"humaneval.json run {name} (all 164; its first 40 here)",
                         "passed": sum(r["per_task"][i] for i in ids), "n": 40,
                         "per_task": {i: r["per_task"][i] for i in ids}, "date": r.get("date")}
for mode in ("int4", "int8"):
    d = Path(f"out/humaneval_rtn_lmhead_{mode}_40")
    if not (d / "summary.json").is_file():
        continue
    s = json.loads((d / "summary.json").read_text())
    per = {}
    for line in (d / "samples.jsonl_results.jsonl").read_text().splitlines():
        r = json.loads(line)
        per[r["task_id"]] = bool(r.get("passed"))
    out["runs"][f"rtn_int4_lm_head_{mode}"] = {"env": {"SQPLUS_LM_HEAD": mode}, "summary": s,
                                               "passed": s["passed"], "n": s["n_problems"], "per_task": per}
rtn = out["runs"]["rtn_int4"]["per_task"]
for k, r in out["runs"].items():
    if "lm_head" in k:
        r["vs_rtn"] = {"lost": [i for i in ids if rtn[i] and not r["per_task"].get(i)],
                       "gained": [i for i in ids if r["per_task"].get(i) and not rtn[i]]}
p = Path("benchmarks/results/lm_head_humaneval_qwen2.5-coder-0.5b.json")
fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=p.name + ".")
with os.fdopen(fd, "w") as f:
    f.write(json.dumps(out, indent=2) + "\n")
os.replace(tmp, p)
for k, r in out["runs"].items():
    print(k, r["passed"], "/", r["n"], r.get("vs_rtn", ""))
