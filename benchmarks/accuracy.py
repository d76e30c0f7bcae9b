"""One evaluation for every variant of a model: perplexity on held-out code and English, and KL to FP.

Variants (all evaluated in float32 on the same token windows):
  FP            the checkpoint as given;
  RTN           the same checkpoint, every decoder-layer linear fake-quantized with the reference
                quantizer (vllm_sqplus.quant.pseudo_quantize_int4, zero point), lm_head and
                embeddings kept: exactly what the plugin computes at load;
  --smoothed    NAME=DIR: a `sqplus smooth` checkpoint (quant_method smoothquant_plus), fake-quantized
                at eval time the same way as RTN;
  --prequantized NAME=DIR: a dense checkpoint whose linears already hold dequantized INT4 weights
                (GPTQ / AWQ from benchmarks/peers): evaluated as stored, never re-quantized (checked:
                at most 16 distinct values per group of the first linear).
  --lm-head MODE  (int8 | int4, repeatable) adds "RTN+lm_head MODE": RTN plus the lm_head
                fake-quantized as the plugin's lm_head option does (vllm_sqplus.lm_head.
                pseudo_quantize_lm_head; int4 with --group-size), the embedding untied and kept.
Metrics: perplexity on vllm_sqplus.corpora.eval_code_text() and eval_english_text() (never part of
any calibration), and the mean over those tokens of KL(FP || variant) of the next-token distribution.
Each row also keeps every window's mean NLL ({text}_window_nll), from which accuracy_table.py
gives the share of RTN's increase a standard error (windows resampled, paired across rows); an FP
row recorded without them is evaluated again.
FP log-probabilities are computed once per text and cached on disk in float16 (--cache DIR), one
file per window, so only one model is in memory at a time; the variant's log-probs are rounded to
float16 the same way before the difference, so FP against its own cache is exactly 0.

Results are merged into --out by variant name (a re-run adds or replaces variants; --skip-existing
keeps those already there with the same path and windows).

usage: python benchmarks/accuracy.py --model FP_DIR --name smollm2-135m [--group-size 128]
           [--smoothed NAME=DIR ...] [--prequantized NAME=DIR ...] [--no-rtn] [--windows 16]
           [--seq-len 512] [--threads 1] [--cache DIR] [--out benchmarks/results/accuracy_NAME.json]
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import platform
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch

from vllm_sqplus.arch import get_arch, get_module
from vllm_sqplus.checkpoint import peak_rss_gib
from vllm_sqplus.corpora import EVAL_CODE_FILES, EVAL_ENGLISH_FILE, eval_code_text, eval_english_text
from vllm_sqplus.quant import pseudo_quantize_int4

TEXTS = {"code": eval_code_text, "english": eval_english_text}
_REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/machine.py
from machine import cpu_model  # noqa: E402


class EvalError(SystemExit):
    def __init__(self, msg: str):
        super().__init__(f"error: {msg}")


def machine() -> dict:
    return {"host": socket.gethostname(), "cpu": cpu_model(), "cores": os.cpu_count(),
            "load_avg_at_start": [round(x, 2) for x in os.getloadavg()]}


def windows(tokenizer, text: str, n: int, seq_len: int) -> torch.Tensor:
    """[n', seq_len] consecutive token windows from the start of text, n' = min(n, what fits)."""
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    k = min(n, ids.numel() // seq_len)
    if k == 0:
        raise EvalError(f"text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    return ids[: k * seq_len].reshape(k, seq_len)


def decoder_linears(model):
    arch = get_arch(model.config)
    for i, layer in enumerate(get_module(model, arch.layers)):
        for name in arch.linears:
            yield f"layers.{i}.{name}", get_module(layer, name)


@torch.no_grad()
def fake_quantize_model(model, group_size: int) -> int:
    """RTN INT4 (zero point) of every decoder-layer linear in place; returns how many."""
    n = 0
    for name, lin in decoder_linears(model):
        lin.weight.copy_(pseudo_quantize_int4(lin.weight, group_size, True, name))
        n += 1
    return n


def max_levels_per_group(w: torch.Tensor, group_size: int, rows: int = 64) -> int:
    """Most distinct values in one group over the first `rows` rows of w (INT4 grid: <= 16)."""
    g = w[:rows].float().reshape(-1, group_size)
    return max(int(torch.unique(r).numel()) for r in g)


def check_prequantized(model, group_size: int, path) -> int:
    _, lin = next(decoder_linears(model))
    levels = max_levels_per_group(lin.weight, group_size)
    if levels > 16:
        raise EvalError(f"--prequantized {path}: its first decoder linear has {levels} distinct values in "
                        f"a group of {group_size}; not an INT4 checkpoint (use --smoothed for one that "
                        f"the plugin quantizes at load)")
    return levels


@torch.no_grad()
def fake_quantize_lm_head(model, mode: str, group_size: int) -> None:
    """lm_head's weight -> pseudo_quantize_lm_head(w, mode), in a new tensor: with tied embeddings
    the input embedding keeps the full-precision weight (as the plugin serves it)."""
    from vllm_sqplus.lm_head import pseudo_quantize_lm_head
    head = model.get_output_embeddings()
    head.weight = torch.nn.Parameter(pseudo_quantize_lm_head(head.weight.detach().clone(), mode, group_size,
                                                             True), requires_grad=False)


def load_variant(kind: str, path, group_size: int, lm_head: str = "none"):
    """(model in float32, info) for kind fp | rtn | smoothed | prequantized."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise EvalError(f"{path}: no config.json (not a checkpoint folder)")
    cfg = json.loads((path / "config.json").read_text())
    qc = cfg.get("quantization_config") or {}
    method = qc.get("quant_method")
    if kind == "smoothed" and method != "smoothquant_plus":
        raise EvalError(f"--smoothed {path}: config.json quant_method is {method!r}, not smoothquant_plus")
    if kind in ("fp", "rtn", "prequantized") and method not in (None, "smoothquant_plus"):
        raise EvalError(f"{path}: quant_method {method!r} (a packed checkpoint); give its dense "
                        f"dequantized form (benchmarks/peers writes OUT/dense)")
    # the stored weights themselves: `import vllm_sqplus` registers our transformers quantizer, which
    # would turn a smoothed checkpoint's linears into W4A16Linear; here they are fake-quantized instead
    from vllm_sqplus.checkpoint import load_full_precision
    model = load_full_precision(path, torch.float32, attn_implementation="sdpa")
    info = {"stored_dtype": cfg.get("dtype") or cfg.get("torch_dtype")}
    if kind in ("rtn", "smoothed"):
        info["fake_quantized_linears"] = fake_quantize_model(model, group_size)
        if method == "smoothquant_plus":
            info["smoothing"] = {k: qc[k] for k in ("alpha", "alpha_granularity", "act_stat", "pairs",
                                                   "group_size", "clip", "method") if k in qc}
    elif kind == "prequantized":
        info["max_levels_per_group"] = check_prequantized(model, group_size, path)
    if lm_head != "none":
        fake_quantize_lm_head(model, lm_head, group_size)
        info["lm_head"] = lm_head
    return model, info


def producer_record(kind: str, path) -> dict | None:
    """How the variant's checkpoint was made (time, peak RSS, command), where its maker wrote it down:
    peer_run.json beside a peer's dense folder, sqplus_search.json inside a smoothed one."""
    path = Path(path)
    for f in (path / "peer_run.json", path.parent / "peer_run.json"):
        if kind == "prequantized" and f.is_file():
            r = json.loads(f.read_text())
            return {"file": str(f), "method": r.get("method"), "seconds": r.get("seconds_total"),
                    "peak_rss_gib": r.get("peak_rss_gib"), "command": r.get("command"),
                    "date": r.get("date"), "machine": r.get("machine"), "versions": r.get("versions"),
                    "calib_samples": (r.get("calibration") or {}).get("samples"),
                    "calib_of_samples": (r.get("calibration") or {}).get("of_samples")}
    f = path / "sqplus_search.json"
    if kind == "smoothed" and f.is_file():
        r = json.loads(f.read_text())
        keep = ("peak_rss_gib", "peak_rss_mib", "peak_rss_bytes", "command", "date", "machine",
                "chosen", "chosen_alpha", "paper_alpha")
        rec = {"file": str(f), **{k: r[k] for k in keep if k in r}}
        secs = r.get("seconds")
        rec["seconds"] = secs.get("total") if isinstance(secs, dict) else secs
        rec["seconds_by_phase"] = secs if isinstance(secs, dict) else None
        # a separate `sqplus gptq --format smoothed` stage on the searched checkpoint: its time counts
        cfg = path / "config.json"
        g = (json.loads(cfg.read_text()).get("quantization_config") or {}).get("gptq") if cfg.is_file() else None
        if isinstance(g, dict) and g.get("seconds") is not None and rec["seconds"] is not None:
            rec["seconds"] += g["seconds"]
            rec["seconds_by_phase"] = dict(rec["seconds_by_phase"] or {}, sqplus_gptq=g["seconds"])
        # a `sqplus tune` of the searched checkpoint: its time counts too, its peak RSS if larger
        t = path / "sqplus_tune.json"
        if t.is_file():
            tr = json.loads(t.read_text())
            if rec["seconds"] is not None and tr.get("seconds") is not None:
                rec["seconds"] += tr["seconds"]
                rec["seconds_by_phase"] = dict(rec["seconds_by_phase"] or {}, sqplus_tune=tr["seconds"])
            if tr.get("peak_rss_gib") is not None:
                rec["peak_rss_gib"] = max(rec.get("peak_rss_gib") or 0.0, tr["peak_rss_gib"])
            rec["tune"] = {k: tr.get(k) for k in ("command", "date", "machine", "threads", "heldout_kl_start",
                                                  "heldout_kl", "kept", "best_epoch", "seconds", "peak_rss_gib")}
            rec["command"] = f"{rec.get('command')}; then {tr.get('command')}"
        if "date" not in rec:  # the search table has none: the file's time stands for it
            rec["date"] = datetime.datetime.fromtimestamp(f.stat().st_mtime, datetime.timezone.utc).isoformat(
                timespec="seconds") + " (file mtime)"
        return rec
    # `sqplus gptq --format smoothed` straight on a full-precision checkpoint: its own record
    cfg = path / "config.json"
    g = (json.loads(cfg.read_text()).get("quantization_config") or {}).get("gptq") if (
        kind == "smoothed" and cfg.is_file()) else None
    if isinstance(g, dict) and g.get("seconds") is not None:
        return {"file": str(cfg), "method": "sqplus gptq", "seconds": g["seconds"],
                "peak_rss_gib": g.get("peak_rss_gib"), "gptq": g,
                "date": datetime.datetime.fromtimestamp(cfg.stat().st_mtime, datetime.timezone.utc).isoformat(
                    timespec="seconds") + " (file mtime)"}
    return None


def _key(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:16]


@torch.no_grad()
def window_logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    """[seq_len-1, vocab] float32 next-token log-probs of one window."""
    return torch.log_softmax(model(ids[None]).logits[0, :-1].float(), -1)


@torch.no_grad()
def evaluate(model, ids: torch.Tensor, cache_dir: Path, write_cache: bool) -> dict:
    """Perplexity and mean KL(FP || model) over the windows ids [n, seq_len].

    write_cache: this model IS the FP reference; its float16 log-probs are written to cache_dir.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    nll, kl, n = 0.0, 0.0, 0
    window_nll = []  # mean NLL of each window (nats/token): the unit of the table's standard errors
    for w in range(ids.shape[0]):
        lp = window_logprobs(model, ids[w])
        wn = -float(lp.gather(-1, ids[w, 1:, None]).sum())
        nll += wn
        window_nll.append(round(wn / lp.shape[0], 7))
        lp16 = lp.half()
        f = cache_dir / f"w{w}.pt"
        if write_cache:
            fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=f.name + ".")
            os.close(fd)
            torch.save(lp16, tmp)
            os.replace(tmp, f)
        if not f.is_file():
            raise EvalError(f"FP log-prob cache {f} missing: evaluate FP first (it is always run "
                            f"unless cached)")
        ref = torch.load(f)
        p = ref.float().exp()
        kl += float((p * (ref.float() - lp16.float())).sum())
        n += lp.shape[0]
    return {"ppl": math.exp(nll / n), "kl": kl / n, "tokens": n, "window_nll": window_nll}


def _atomic_write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def versions() -> dict:
    import transformers
    try:
        import vllm_sqplus
        sq = getattr(vllm_sqplus, "__version__", "?")
    except Exception:  # pragma: no cover
        sq = "?"
    try:
        import subprocess
        rev = subprocess.run(["git", "-C", str(_REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip() or None
    except Exception:  # pragma: no cover
        rev = None
    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "vllm_sqplus": sq, "git": rev}


def parse_named(specs: list[str], flag: str) -> list[tuple[str, str]]:
    out = []
    for s in specs:
        if "=" not in s:
            raise EvalError(f"{flag} {s!r}: expected NAME=DIR")
        name, path = s.split("=", 1)
        if not name or not path:
            raise EvalError(f"{flag} {s!r}: expected NAME=DIR")
        out.append((name, path))
    return out


def run(model_path, name: str, variants: list[tuple[str, str, str]], group_size: int, n_windows: int,
        seq_len: int, cache_root: Path, out: Path | None, skip_existing: bool = False,
        command: str | None = None, texts: dict | None = None) -> dict:
    """Evaluate [(variant name, kind, path)] (FP first, always) and merge into out; returns the record."""
    from transformers import AutoTokenizer
    texts = texts or {k: f() for k, f in TEXTS.items()}
    tok = AutoTokenizer.from_pretrained(model_path)
    ids = {t: windows(tok, s, n_windows, seq_len) for t, s in texts.items()}
    record = json.loads(out.read_text()) if out and out.is_file() else {}
    same_windows = record.get("windows") == {t: {"n": int(v.shape[0]), "seq_len": seq_len, "sha256": _key(v)}
                                             for t, v in ids.items()}
    if not same_windows:
        record["variants"] = {}  # other windows: the old numbers are not comparable
    record.update({
        "model": name, "model_path": str(Path(model_path).resolve()), "group_size": group_size,
        "scheme": "INT4 asymmetric (zero point), group-wise, every decoder-layer linear; lm_head kept",
        "texts": {"code": {"source": f"Python {platform.python_version()} stdlib", "files": list(EVAL_CODE_FILES)},
                  "english": {"source": f"Python {platform.python_version()} stdlib", "files": [EVAL_ENGLISH_FILE]}},
        "windows": {t: {"n": int(v.shape[0]), "seq_len": seq_len, "sha256": _key(v)} for t, v in ids.items()},
        "kl_note": "mean over next-token positions of KL(FP || variant), both log-probs rounded to float16",
    })
    record.setdefault("variants", {})
    cache = {t: cache_root / name / f"{t}_{_key(v)}" for t, v in ids.items()}
    fp_cached = all((cache[t] / f"w{ids[t].shape[0] - 1}.pt").is_file() for t in ids)
    order = [("FP", "fp", str(model_path))] + [v for v in variants if v[1] != "fp"]
    for vname, kind, path, *lm_head in order:
        old = record["variants"].get(vname)
        if (kind == "fp" and fp_cached and old and old.get("path") == str(Path(path).resolve())
                and all(f"{t}_window_nll" in old for t in ids)):
            print(f"{vname}: FP cache present, kept", flush=True)
            continue
        if skip_existing and old and old.get("path") == str(Path(path).resolve()) and kind != "fp":
            print(f"{vname}: already in {out}, skipped", flush=True)
            continue
        t0 = time.perf_counter()
        model, info = load_variant(kind, path, group_size, *lm_head)
        t_load = time.perf_counter() - t0
        row = {"kind": kind, "path": str(Path(path).resolve()), **info}
        for t, v in ids.items():
            r = evaluate(model, v, cache[t], write_cache=(kind == "fp"))
            row[f"{t}_ppl"], row[f"{t}_kl"], row[f"{t}_tokens"] = r["ppl"], r["kl"], r["tokens"]
            row[f"{t}_window_nll"] = r["window_nll"]
        del model
        row.update({"seconds_load": round(t_load, 1), "seconds": round(time.perf_counter() - t0, 1),
                    "producer": producer_record(kind, path),
                    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "command": command, "machine": machine(), "versions": versions(),
                    "eval_peak_rss_gib": round(peak_rss_gib(), 3)})
        record["variants"][vname] = row
        print(f"{vname:16s} code ppl {row['code_ppl']:8.4f} kl {row['code_kl']:.5f} | english ppl "
              f"{row['english_ppl']:8.4f} kl {row['english_kl']:.5f}  ({row['seconds']}s)", flush=True)
        if out:
            _atomic_write_json(out, record)
    return record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="the full-precision checkpoint")
    ap.add_argument("--name", required=True, help="short model name (the JSON and the table use it)")
    ap.add_argument("--smoothed", action="append", default=[], help="NAME=DIR, fake-quantized at eval")
    ap.add_argument("--prequantized", action="append", default=[], help="NAME=DIR, evaluated as stored")
    ap.add_argument("--no-rtn", action="store_true", help="skip the RTN variant")
    ap.add_argument("--lm-head", action="append", default=[], choices=["int8", "int4"],
                    help="add the variant 'RTN+lm_head MODE' (repeatable)")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache", default=os.environ.get("SQPLUS_EVAL_CACHE",
                                                      str(Path.home() / ".cache" / "sqplus-eval")))
    ap.add_argument("--skip-existing", action="store_true")
    ap.add_argument("--out", default=None, help="default benchmarks/results/accuracy_NAME.json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    variants = [] if a.no_rtn else [("RTN", "rtn", a.model)]
    variants += [(n, "smoothed", p) for n, p in parse_named(a.smoothed, "--smoothed")]
    variants += [(n, "prequantized", p) for n, p in parse_named(a.prequantized, "--prequantized")]
    variants += [(f"RTN+lm_head {m}", "rtn", a.model, m) for m in a.lm_head]
    out = Path(a.out) if a.out else _REPO / "benchmarks" / "results" / f"accuracy_{a.name}.json"
    command = " ".join(["python", *[os.path.relpath(sys.argv[0], _REPO) if i == 0 else x
                                    for i, x in enumerate(sys.argv)]])
    run(a.model, a.name, variants, a.group_size, a.windows, a.seq_len, Path(a.cache), out,
        a.skip_existing, command)


if __name__ == "__main__":
    main()
