"""Regenerate benchmarks/results/accuracy.md from the accuracy JSONs (one command, never hand-edited).

Reads benchmarks/results/accuracy_<model>.json (written by benchmarks/accuracy.py; older files without
"variants" are skipped) and HumanEval results: benchmarks/results/humaneval/<model>/<variant>.json
(the summary.json that `sqplus eval humaneval --out DIR` writes, copied there) and, for the runs that
predate that convention, the FP and RTN rows of benchmarks/results/humaneval.json (Qwen-0.5B).
Hand-written analysis lives in benchmarks/results/accuracy_notes.md, which the table links to.

usage: python benchmarks/accuracy_table.py [--results benchmarks/results] [--out benchmarks/results/accuracy.md]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

_RESULTS = Path(__file__).resolve().parent / "results"
ROLES = ["FP", "RTN", "SQ+ paper", "SQ+ default", "GPTQ", "AWQ"]
ROLE_DOC = {"FP": "the checkpoint in float32", "RTN": "round-to-nearest INT4 of every decoder linear",
            "SQ+ paper": "`sqplus smooth`, whole-model alpha (the paper's form), RTN at load",
            "SQ+ default": "`sqplus smooth` default settings (the new method), RTN at load",
            "GPTQ": "llm-compressor 0.14 GPTQ, same scheme and calibration tokens",
            "AWQ": "llm-compressor 0.14 AWQ, same scheme and calibration tokens"}
MODEL_ORDER = ["qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b", "smollm2-135m"]
# HumanEval runs made before results/humaneval/<model>/<variant>.json existed: (model, role) -> run name
LEGACY_HUMANEVAL = {("qwen2.5-coder-0.5b", "FP"): "fp32", ("qwen2.5-coder-0.5b", "RTN"): "rtn_int4"}


def load_results(results: Path) -> list[dict]:
    out = []
    for f in sorted(results.glob("accuracy_*.json")):
        try:
            r = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise SystemExit(f"error: {f} is not valid JSON ({e.msg})") from None
        if isinstance(r, dict) and isinstance(r.get("variants"), dict) and r.get("model"):
            r["_file"] = f.name
            out.append(r)
    rank = {m: i for i, m in enumerate(MODEL_ORDER)}
    return sorted(out, key=lambda r: (rank.get(r["model"], len(rank)), r["model"]))


def load_humaneval(results: Path) -> dict:
    """{(model, variant): {"passed", "n", "source", "date", "command"}}."""
    he = {}
    legacy = results / "humaneval.json"
    if legacy.is_file():
        runs = {r.get("name"): r for r in json.loads(legacy.read_text()).get("runs", [])}
        for key, name in LEGACY_HUMANEVAL.items():
            r = runs.get(name)
            if r and r.get("n_problems"):
                he[key] = {"passed": r["passed"], "n": r["n_problems"], "source": f"humaneval.json run {name}",
                           "date": r.get("date"), "command": "; ".join(r.get("commands", [])),
                           "machine": r.get("machine")}
    for f in sorted((results / "humaneval").glob("*/*.json")):
        r = json.loads(f.read_text())
        n = r.get("n_problems") or r.get("problems") or r.get("n")
        if n is None and isinstance(r.get("pass@1"), float) and r.get("pass@1"):
            n = round(r["passed"] / r["pass@1"])
        he[(f.parent.name, f.stem)] = {"passed": r.get("passed"), "n": n, "source": str(f.relative_to(results)),
                                       "date": r.get("date"), "command": r.get("command"),
                                       "machine": r.get("machine")}
    return he


BOOTSTRAP = 2000


def share_se(x: list, fp: list, rtn: list, n_boot: int = BOOTSTRAP, seed: int = 0) -> float | None:
    """Standard error of the share (ppl(x) - ppl(fp)) / (ppl(rtn) - ppl(fp)) from per-window mean
    NLLs (equal-length windows, the same windows in each list): the standard deviation of the share
    over bootstrap resamples of the windows, one index draw for all three rows (paired). None
    where the windows are missing, unequal in number or fewer than 2, or where a resample has
    RTN no worse than FP (the share is then undefined)."""
    if not (x and fp and rtn) or not len(x) == len(fp) == len(rtn) or len(x) < 2:
        return None
    import torch
    g = torch.Generator().manual_seed(seed)
    w = torch.tensor([x, fp, rtn], dtype=torch.float64)
    idx = torch.randint(0, w.shape[1], (n_boot, w.shape[1]), generator=g)
    ppl = w[:, idx].mean(-1).exp()  # [3, n_boot]
    den = ppl[2] - ppl[1]
    if bool((den <= 0).any()):
        return None
    return float(((ppl[0] - ppl[1]) / den).std())


def _share(x: float, fp: float, rtn: float, se: float | None = None) -> str:
    if rtn == fp:
        return "n/a"
    return f"{100 * (x - fp) / (rtn - fp):.0f}%" + (f" ± {100 * se:.0f}" if se is not None else "")


def _minutes(s) -> str:
    return "" if s is None else f"{s / 60:.1f} min"


def _rss(p: dict | None) -> str:
    if not p:
        return ""
    if p.get("peak_rss_gib") is not None:
        return f"{p['peak_rss_gib']:.2f} GiB"
    if p.get("peak_rss_mib") is not None:
        return f"{p['peak_rss_mib'] / 1024:.2f} GiB"
    if p.get("peak_rss_bytes") is not None:
        return f"{p['peak_rss_bytes'] / 2**30:.2f} GiB"
    return ""


def _machine(m) -> str:
    if isinstance(m, dict):
        cpu = m.get("cpu", "?")
        s = f"{cpu}, {m.get('cores', '?')} cores"
        if m.get("load_avg_at_start"):
            s += f", load {m['load_avg_at_start'][0]}"
        return s
    return str(m) if m else "?"


def render(records: list[dict], humaneval: dict) -> str:
    lines = ["<!-- GENERATED by `python benchmarks/accuracy_table.py` from benchmarks/results/accuracy_*.json;"
             " do not edit by hand (analysis: accuracy_notes.md) -->",
             "# Accuracy: FP, RTN, SmoothQuant+, GPTQ, AWQ on the same tokens", "",
             "Scheme for every quantized row: INT4 asymmetric with zero point, group-wise along in_features, "
             "every decoder-layer linear, lm_head and embeddings kept. Calibration: one token stream for every "
             "method (`vllm_sqplus.calib.calibration_ids(tok, \"stdlib\")`, 24 stdlib modules, 512-token "
             "samples). `sqplus smooth` (default) takes its statistics from the first 32 samples and scores its "
             "choices on the next 4; its GPTQ stage (since session 13) calibrates on the first 32 and samples "
             "37-68, 64 in all (rows made before say 32). GPTQ and AWQ are given the first 64 samples (a row "
             "says where a peer used a shorter prefix, or our GPTQ stage's 64 instead). Evaluation (benchmarks/accuracy.py, float32, one code path for every row): "
             "held-out code = 12 other stdlib modules, held-out English = the reference-manual topics of "
             "pydoc_data; neither is calibrated on. *Share* = (variant - FP) / (RTN - FP) of the perplexity: "
             "0% is lossless, 100% is RTN; \"± x\" is its standard error over the evaluation windows "
             f"(the windows resampled {BOOTSTRAP} times, the same draw for the row, FP and RTN), shown where all "
             "three rows recorded their per-window NLL (evaluations since session 20). KL = mean over tokens of KL(FP || variant), nats. "
             "Time / RSS = the search or quantization that made the checkpoint (RTN needs none).",
             "", "Hand-written analysis and session history: [accuracy_notes.md](accuracy_notes.md).", ""]
    for rec in records:
        v, model = rec["variants"], rec["model"]
        w = rec.get("windows", {})
        wdesc = ", ".join(f"{t} {d.get('n')} x {d.get('seq_len')}" for t, d in w.items())
        lines += [f"## {model} (group {rec.get('group_size')}; windows: {wdesc})", "",
                  "| variant | code ppl | share of RTN's code increase | English ppl | share (English) | "
                  "KL code | KL English | HumanEval pass@1 | search / quantize time | peak RSS |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        fp, rtn = v.get("FP"), v.get("RTN")
        names = ROLES + [n for n in v if n not in ROLES]
        for name in names:
            r = v.get(name)
            he = humaneval.get((model, name))
            he_s = f"{he['passed']}/{he['n']} ({100 * he['passed'] / he['n']:.1f}%)" if he and he.get("n") else "not run"
            if r is None:  # (a HumanEval run of that name belongs to the checkpoint of another table)
                lines.append(f"| {name} | missing (not evaluated yet) | | | | | | | | |")
                continue
            cs, es = ("", "") if not (fp and rtn) else (
                _share(r[f"{t}_ppl"], fp[f"{t}_ppl"], rtn[f"{t}_ppl"],
                       share_se(r.get(f"{t}_window_nll"), fp.get(f"{t}_window_nll"), rtn.get(f"{t}_window_nll")))
                for t in ("code", "english"))
            if name in ("FP", "RTN"):
                cs, es = ("0%", "0%") if name == "FP" else ("100%", "100%")
            p = r.get("producer") or {}
            t = _minutes(p.get("seconds")) or ("at load" if r.get("kind") == "rtn" else "")
            label = name
            if p.get("calib_samples") and p.get("calib_of_samples") and p["calib_samples"] != p["calib_of_samples"]:
                label += f" (first {p['calib_samples']} of the {p['calib_of_samples']} calibration samples)"
            lines.append(f"| {label} | {r['code_ppl']:.3f} | {cs} | {r['english_ppl']:.3f} | {es} | "
                         f"{r['code_kl']:.4f} | {r['english_kl']:.4f} | {he_s} | {t} | {_rss(p)} |")
        lines += ["", "<details><summary>commands, machines, dates</summary>", ""]
        for name in names:
            r = v.get(name)
            if r is None:
                continue
            lines.append(f"- **{name}** ({ROLE_DOC.get(name, r.get('kind'))}): `{r.get('path')}`; evaluated "
                         f"{r.get('date')} on {_machine(r.get('machine'))} in {r.get('seconds')} s: "
                         f"`{r.get('command')}`")
            p = r.get("producer")
            if p:
                lines.append(f"  - made {p.get('date')} on {_machine(p.get('machine'))}: `{p.get('command')}` "
                             f"({p.get('file')})")
            he = humaneval.get((model, name))
            if he:
                lines.append(f"  - HumanEval: {he['source']}, {he.get('date')}, {he.get('machine') or '?'}: "
                             f"`{he.get('command')}`")
        lines += ["", "</details>", ""]
    done = {r["model"] for r in records}
    for model in MODEL_ORDER:
        if model not in done:
            lines += [f"## {model}", "", "Not evaluated yet (no accuracy_{model}.json): see accuracy_notes.md.", ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default=str(_RESULTS))
    ap.add_argument("--out", default=None, help="default RESULTS/accuracy.md")
    a = ap.parse_args(argv)
    results = Path(a.results)
    out = Path(a.out) if a.out else results / "accuracy.md"
    md = render(load_results(results), load_humaneval(results))
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=out.name + ".")
    with os.fdopen(fd, "w") as f:
        f.write(md)
    os.replace(tmp, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
