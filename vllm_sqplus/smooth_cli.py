"""`sqplus smooth MODEL_DIR --out OUT_DIR`: calibrate, search alpha, write a smoothed checkpoint.

The output is an ordinary Hugging Face checkpoint (same dtype as the input unless --dtype says
otherwise) computing the same function as the input up to rounding, whose config.json names
quant_method "smoothquant_plus": vLLM with our plugin quantizes it to INT4 while loading.
Beside the weights: sqplus_search.json (loss per alpha), sqplus_search.png (its plot) and
sqplus_stats/act_scales.safetensors (the calibration statistics, reusable; in a subfolder because
vLLM loads every top-level *.safetensors as weights).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from vllm_sqplus import QUANT_METHOD, __version__
from vllm_sqplus.errors import SqplusError

STATS_DIR = "sqplus_stats"

def add_parser(sub) -> None:
    p = sub.add_parser("smooth", help="calibrate + search alpha + write a smoothed checkpoint",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir")
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--calib", default="humaneval", help="humaneval | FILE.jsonl | FILE.txt")
    p.add_argument("--samples", type=int, default=128, help="calibration samples for statistics")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--heldout", type=int, default=4,
                   help="samples held back from the statistics to score the search (default 4)")
    p.add_argument("--alpha", default="auto", help="auto (search) or a fixed value in [0, 1]")
    p.add_argument("--alpha-step", type=float, default=0.05, help="search grid step over [0, 1]")
    p.add_argument("--no-refine", action="store_true", help="skip the best +/- step/2 refinement")
    p.add_argument("--alpha-granularity", choices=["model", "layer"], default="model")
    p.add_argument("--pairs", choices=["norm", "all"], default="all",
                   help="norm: norm->linears only; all: also v->o (no GQA) and up->down")
    p.add_argument("--act-stat", choices=["max", "mean"], default="max",
                   help="activation statistic in s = stat|X|^a / max|W|^(1-a): max (SmoothQuant+) or mean (AWQ)")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--no-zero-point", action="store_true", help="symmetric INT4 (zero point 8)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (one layer there at a time)")
    p.add_argument("--dtype", choices=["auto", "float16", "bfloat16", "float32"], default="auto",
                   help="dtype of the written checkpoint (auto: the input's)")
    p.add_argument("--batch-size", type=int, default=4, help="samples per layer forward")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=run)


def _parse_alpha(text: str):
    if text == "auto":
        return "auto"
    try:
        a = float(text)
    except ValueError:
        raise SqplusError(f"--alpha must be 'auto' or a number in [0, 1], got {text!r}") from None
    if not 0.0 <= a <= 1.0 or math.isnan(a):
        raise SqplusError(f"--alpha must lie in [0, 1], got {a}")
    return a


def _log(msg: str) -> None:
    print(f"[sqplus smooth] {msg}", file=sys.stderr, flush=True)


def run(args) -> int:
    from vllm_sqplus.calib import load_calibration_texts, split_heldout, tokenize_samples
    from vllm_sqplus.checkpoint import (check_group_sizes, check_output_dir, load_model, read_config,
                                        save_model, write_checkpoint_atomic)
    from vllm_sqplus.arch import PAIR_SETS
    from vllm_sqplus.search import (IDENTITY, Candidate, QuantSpec, apply_smoothing, candidate_grid,
                                    search_alpha)

    t0 = time.perf_counter()
    alpha_arg = _parse_alpha(args.alpha)
    if args.samples < 1 or args.seq_len < 8 or args.heldout < 1:
        raise SqplusError("--samples and --heldout must be >= 1 and --seq-len >= 8")
    if not 0 < args.alpha_step <= 0.5:
        raise SqplusError(f"--alpha-step must lie in (0, 0.5], got {args.alpha_step}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SqplusError(f"--device {args.device}: no CUDA device is available")
    read_config(args.model_dir)  # cheap checks first: folder, config.json
    out = check_output_dir(args.model_dir, args.out, args.overwrite)
    texts = load_calibration_texts(args.calib)

    _log(f"loading {args.model_dir}")
    model, arch = load_model(args.model_dir, args.dtype)
    check_group_sizes(model, arch, args.group_size)
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(args.model_dir)
    except Exception as e:  # noqa: BLE001
        raise SqplusError(f"cannot load the tokenizer of {args.model_dir}: {e}") from None

    samples = tokenize_samples(tok, texts, args.samples + args.heldout, args.seq_len)
    stat_ids, heldout = split_heldout(samples, args.heldout)
    _log(f"calibration: {stat_ids.shape[0]} x {args.seq_len} tokens for statistics, "
         f"{heldout.shape[0]} x {args.seq_len} held out for the search ({args.calib})")
    store_dtype = next(model.parameters()).dtype
    q = QuantSpec(args.group_size, not args.no_zero_point, store_dtype)
    if alpha_arg == "auto":
        cands = candidate_grid(args.alpha_step, (args.act_stat,), (args.pairs,))
    else:
        cands = [IDENTITY, Candidate(alpha_arg, args.act_stat, args.pairs)]
    res = search_alpha(model, arch, stat_ids, heldout, q, cands,
                       refine=alpha_arg == "auto" and not args.no_refine, granularity=args.alpha_granularity,
                       device=args.device, batch_size=args.batch_size, progress=True)
    chosen = res.best if alpha_arg == "auto" else cands[1]
    if args.alpha_granularity == "layer":
        apply_smoothing(model, arch, res.act_stats, res.layer_choice)
    else:
        apply_smoothing(model, arch, res.act_stats, chosen)
    rows = {(r["alpha"], r["stat"], r["pairs"]): r for r in res.table}
    rtn = rows[(None, "max", "all")]
    best = rows[(chosen.alpha, chosen.stat, chosen.pairs)]
    if args.alpha_granularity == "layer":  # what was written is the per-layer choice, not `chosen`
        best = res.layer_row
        n_smoothed = sum(c.alpha is not None for c in res.layer_choice)
        _log(f"search: {len(res.table)} candidates per layer in {res.seconds:.0f}s; per-layer choice smooths "
             f"{n_smoothed} of {len(res.layer_choice)} layers (KL {best['kl']:.5f} vs plain RTN {rtn['kl']:.5f})")
    else:
        _log(f"search: {len(res.table)} candidates in {res.seconds:.0f}s; chosen {chosen.label} "
             f"(KL {best['kl']:.5f} vs plain RTN {rtn['kl']:.5f})")

    layer_alphas = [c.alpha for c in res.layer_choice] if res.layer_choice else None
    qcfg = {
        "quant_method": QUANT_METHOD, "bits": 4, "group_size": args.group_size,
        "zero_point": not args.no_zero_point, "alpha": chosen.alpha,
        "act_stat": args.act_stat, "alpha_granularity": args.alpha_granularity,
        **({"layer_alphas": layer_alphas} if layer_alphas else {}),
        "smoothed_pairs": [f"{p.prev}->{','.join(p.linears)}"
                           for p in arch.active_pairs(model.config, PAIR_SETS[args.pairs])],
        "modules_to_not_convert": ["lm_head"],
        "calibration": {"data": args.calib, "samples": int(stat_ids.shape[0]),
                        "heldout_samples": int(heldout.shape[0]), "seq_len": args.seq_len},
        "search": {"loss": "mean KL(full precision || smoothed + fake INT4) on held-out tokens",
                   "kl": best["kl"], "rtn_kl": rtn["kl"], "seconds": round(res.seconds, 1),
                   "table": "sqplus_search.json"},
        "sqplus_version": __version__,
    }
    table = {"model": str(args.model_dir), "group_size": args.group_size, "zero_point": q.zero_point,
             "pairs": args.pairs, "act_stat": args.act_stat, "chosen_alpha": chosen.alpha,
             "fp": res.fp_row, "rows": res.table,
             "per_layer": ({"alphas": layer_alphas, **res.layer_row} if res.layer_row else None),
             "stat_tokens": res.n_stat_tokens, "heldout_tokens": res.n_heldout_tokens,
             "seconds": res.seconds}

    def write(tmp: Path) -> None:
        save_model(model, args.model_dir, tmp, qcfg)
        (tmp / "sqplus_search.json").write_text(json.dumps(table, indent=2) + "\n")
        from safetensors.torch import save_file
        # in a subfolder: vLLM (and transformers' sharded loaders) read every top-level *.safetensors
        (tmp / STATS_DIR).mkdir()
        save_file({f"{stat}.layers.{i}.{k}": v.contiguous() for i, per in enumerate(res.act_stats)
                   for stat, d in per.items() for k, v in d.items()},
                  str(tmp / STATS_DIR / "act_scales.safetensors"))
        plot_search(table, tmp / "sqplus_search.png")

    write_checkpoint_atomic(out, args.overwrite, write)
    _log(f"wrote {out} in {time.perf_counter() - t0:.0f}s")
    return 0


def plot_search(table: dict, path: Path) -> None:
    """Loss vs alpha (PNG); skipped quietly when matplotlib is absent."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = sorted((r for r in table["rows"] if r["alpha"] is not None), key=lambda r: r["alpha"])
    rtn = next(r for r in table["rows"] if r["alpha"] is None)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["alpha"] for r in rows], [r["kl"] for r in rows], "o-", label="smoothed + INT4")
    ax.axhline(rtn["kl"], color="gray", ls="--", label="no smoothing (RTN)")
    ax.set_xlabel("alpha")
    ax.set_ylabel("KL(FP || quantized), held-out tokens")
    ax.set_title(f"alpha search (g{table['group_size']}): chosen {table['chosen_alpha']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
