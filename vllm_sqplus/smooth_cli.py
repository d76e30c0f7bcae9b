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
import platform
import sys
import time
from pathlib import Path

import torch

from vllm_sqplus import __version__
from vllm_sqplus.arch import PAIR_SETS
from vllm_sqplus.calib import DEFAULT_CALIB, DEFAULT_GPTQ_SAMPLES, DEFAULT_HELDOUT, DEFAULT_STAT_SAMPLES
from vllm_sqplus.errors import SqplusError
from vllm_sqplus.rounding import RoundingOptions

STAGE_SUFFIXES = ("+gptq", "+learned")  # rows of the search's last stage (SearchOptions.rounding)
GPTQ_SUFFIXES = ("+gptq", "+gptq+learned")  # those of its rows that ran GPTQ

STATS_DIR = "sqplus_stats"

def add_parser(sub) -> None:
    p = sub.add_parser("smooth", help="calibrate + search + write a smoothed checkpoint",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir")
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--calib", default=DEFAULT_CALIB,
                   help="stdlib (default: 24 Python standard-library modules, disjoint from every evaluation "
                        "text and from HumanEval; see vllm_sqplus/corpora.py) | stdlib+prose (the same with a quarter "
                        "of English prose blocks from IDLE's docs, not the held-out English) | humaneval | "
                        "FILE.jsonl | FILE.txt")
    p.add_argument("--samples", type=int, default=DEFAULT_STAT_SAMPLES,
                   help="calibration samples for statistics (default 32 x 512 tokens)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--heldout", type=int, default=DEFAULT_HELDOUT,
                   help="samples held back from the statistics to score the search (default 4)")
    p.add_argument("--alpha", default="auto", help="auto (search) or a fixed value in [0, 1]")
    p.add_argument("--alpha-step", type=float, default=None,
                   help="whole-model alpha grid step over [0, 1] (default: grid 0.2..0.8, refined to 0.05)")
    p.add_argument("--no-refine", action="store_true", help="skip the whole-model alpha refinement")
    p.add_argument("--alpha-granularity", choices=["model", "layer"], default="layer",
                   help="model: one alpha for the whole model (the paper's form); layer (default): then "
                        "refine each layer's pair types against the whole model's loss")
    p.add_argument("--layer-loss", choices=["fisher", "mse"], default="fisher",
                   help="per-layer refinement: layer-output error weighted by the loss gradient (fisher) or plain")
    p.add_argument("--fit-samples", type=int, default=4,
                   help="statistics samples the per-layer refinement fits on (default 4)")
    p.add_argument("--no-gptq", action="store_true",
                   help="skip the last stage (GPTQ, or what --rounding names) on the smoothed weights, stored so that RTN at load "
                        "reproduces it exactly (kept only where it beats the rest on the held-out loss; "
                        "off with --no-clip, --alpha X and --no-zero-point)")
    p.add_argument("--gptq-samples", type=int, default=DEFAULT_GPTQ_SAMPLES,
                   help="calibration samples of the GPTQ stage: the statistics samples, then the ones after "
                        "the held-out samples (never those); 64 by default: on Qwen2.5-Coder-0.5B the stage on "
                        "64 samples left 57%% of RTN's perplexity increase on held-out code where 32 left 81-88%%")
    p.add_argument("--rounding", choices=["gptq", "learned", "gptq+learned"], default="gptq",
                   help="what the last stage does: gptq (default); learned: SignRound-style learned "
                        "rounding and group ranges per layer, fitted to the full-precision layer's output "
                        "(vllm_sqplus/rounding.py; slower: about 70 s per layer of a 0.5B model on one core); "
                        "gptq+learned: GPTQ, then the learned rounding started from its result")
    p.add_argument("--rounding-iters", type=int, default=RoundingOptions.iters,
                   help="learned rounding: signed-gradient steps per layer (default %(default)s)")
    p.add_argument("--rounding-loss", choices=["mse", "normed"], default=RoundingOptions.loss,
                   help="learned rounding: the layer-output error it fits: mse (default), or normed: each "
                        "token's error over its RMS, times the next RMSNorm's weight (what the next layer reads)")
    p.add_argument("--rounding-target", choices=["fp", "layer"], default=RoundingOptions.target,
                   help="learned rounding: what the layer's output is fitted to: fp (default), the full-precision "
                        "model's own stream (AutoRound's target); layer, the full-precision layer on the quantized "
                        "stream (GPTQ's target)")
    from vllm_sqplus.gptq import add_order_args
    add_order_args(p, prefix="gptq-")  # the GPTQ stage's options
    p.add_argument("--thorough", action="store_true",
                   help="run every smoothed phase (alpha refinement, the best alpha clipped, the per-layer "
                        "descent) even when no alpha of the coarse grid beats plain RTN's held-out NLL "
                        "(by default they are then skipped: about a third of the time on Qwen2.5-Coder-1.5B)")
    p.add_argument("--no-clip", action="store_true", help="no clipping search (plain min-max ranges)")
    p.add_argument("--pairs", choices=["norm", "all"], default="all",
                   help="norm: norm->linears only; all: also v->o (no GQA) and up->down")
    p.add_argument("--act-stat", choices=["max", "mean"], default="max",
                   help="activation statistic in s = stat|X|^a / max|W|^(1-a): max (SmoothQuant+) or mean (AWQ)")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--no-zero-point", action="store_true", help="symmetric INT4 (zero point 8)")
    p.add_argument("--lm-head", choices=["none", "int8", "int4"], default="none",
                   help="written into quantization_config: how the plugin computes the logits (int8 per "
                        "row, int4 with --group-size; the embedding stays full precision). Serving can "
                        "override it with the env var SQPLUS_LM_HEAD")
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


def validate(args):
    """Every cheap check before any heavy work -> (alpha, output folder, calibration texts)."""
    from vllm_sqplus.calib import load_calibration_texts
    from vllm_sqplus.checkpoint import check_group_size_for_config, check_output_dir, read_config
    alpha = _parse_alpha(args.alpha)
    if min(args.samples, args.heldout, args.fit_samples, args.gptq_samples, args.rounding_iters) < 1 or args.seq_len < 8:
        raise SqplusError("--samples, --heldout, --fit-samples, --rounding-iters and --gptq-samples must be >= 1 "
                          "and --seq-len >= 8")
    if args.alpha_step is not None and not 0 < args.alpha_step <= 0.5:
        raise SqplusError(f"--alpha-step must lie in (0, 0.5], got {args.alpha_step}")
    if args.rounding != "gptq":
        off = [o for o, on in (("--no-gptq", args.no_gptq), ("--no-clip", args.no_clip),
                                ("--alpha X", alpha != "auto"), ("--no-zero-point", args.no_zero_point)) if on]
        if off:
            raise SqplusError(f"--rounding {args.rounding} is the search's last stage, which {' and '.join(off)} "
                              "turn(s) off; drop one or the other")
    for flag, value, default in (("--rounding-loss", args.rounding_loss, RoundingOptions.loss),
                                 ("--rounding-target", args.rounding_target, RoundingOptions.target)):
        if args.rounding == "gptq" and value != default:
            raise SqplusError(f"{flag} {value} sets the learned rounding's fit; "
                              "it goes with --rounding learned or gptq+learned")
    if args.gptq_range_search and not args.gptq_act_order:
        raise SqplusError("--gptq-range-search goes with act-order (drop --no-gptq-act-order)")
    if args.gptq_asymmetric and not args.gptq_true_sequential:
        raise SqplusError("--gptq-asymmetric goes with the true-sequential order (drop --no-gptq-true-sequential)")
    # (also covers --lm-head int4: the lm_head's in_features are hidden_size, like q_proj's)
    check_group_size_for_config(read_config(args.model_dir), args.group_size)  # folder, config.json
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SqplusError(f"--device {args.device}: no CUDA device is available")
    out = check_output_dir(args.model_dir, args.out, args.overwrite)
    return alpha, out, load_calibration_texts(args.calib)


def asymmetric_stage(args) -> bool:
    """Whether the GPTQ stage is fitted to the full-precision stream (--gptq-asymmetric): only the
    plain GPTQ stage is; the learned-rounding stages start from the plain (symmetric) GPTQ. Decided
    here once, for the search (search_options) and for the record (write)."""
    return bool(args.gptq_asymmetric) and args.rounding == "gptq"


def search_options(args, alpha, out: Path | None = None):
    """The search's options from the command line; with `out`, the GPTQ stage keeps its codes in
    files beside the output folder until they are applied (checkpoint.LayerSpill)."""
    from vllm_sqplus.gptq import range_ratios_of
    from vllm_sqplus.search import SearchOptions
    fixed = alpha != "auto"
    grid = None
    if fixed:
        grid = (alpha,)
    elif args.alpha_step is not None:
        n = int(round(1.0 / args.alpha_step))
        grid = tuple(round(i * args.alpha_step, 6) for i in range(n + 1))
    return SearchOptions(granularity="model" if fixed else args.alpha_granularity, clip=not args.no_clip,
                         stat=args.act_stat, pairs=args.pairs, alphas=grid,
                         refine=not args.no_refine and not fixed, fit_samples=args.fit_samples,
                         fisher=args.layer_loss == "fisher", batch_size=args.batch_size, progress=True,
                         gptq=not (args.no_gptq or args.no_clip or fixed or args.no_zero_point),
                         gptq_act_order=args.gptq_act_order, gptq_true_sequential=args.gptq_true_sequential,
                         gptq_range_ratios=range_ratios_of(args.gptq_range_search),
                         gptq_asymmetric=asymmetric_stage(args),
                         prune=not args.thorough,
                         rounding=args.rounding,
                         rounding_opts=RoundingOptions(iters=args.rounding_iters, loss=args.rounding_loss,
                                                       target=args.rounding_target),
                         gptq_spill=out is not None, spill_dir=str(out.parent) if out is not None else None)


def run(args) -> int:
    from vllm_sqplus.calib import split_calibration, tokenize_samples
    from vllm_sqplus.checkpoint import PhasePeaks, check_group_sizes, load_model
    from vllm_sqplus.search import QuantSpec, apply_plans, search

    t0 = time.perf_counter()
    alpha, out, texts = validate(args)
    _log(f"loading {args.model_dir}")
    model, arch = load_model(args.model_dir, args.dtype)
    check_group_sizes(model, arch, args.group_size)
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(args.model_dir)
    except Exception as e:  # noqa: BLE001
        raise SqplusError(f"cannot load the tokenizer of {args.model_dir}: {e}") from None
    out.parent.mkdir(parents=True, exist_ok=True)  # the GPTQ stage's codes wait there (LayerSpill)
    opts = search_options(args, alpha, out)
    n_gptq = args.gptq_samples if opts.gptq else args.samples
    samples = tokenize_samples(tok, texts, args.samples + args.heldout + max(0, n_gptq - args.samples), args.seq_len)
    stat_ids, heldout, gptq_ids = split_calibration(samples, args.samples, args.heldout, n_gptq)
    _log(f"calibration: {stat_ids.shape[0]} x {args.seq_len} tokens for statistics, "
         f"{heldout.shape[0]} x {args.seq_len} held out for the search"
         + (f", {gptq_ids.shape[0]} x {args.seq_len} for the GPTQ stage" if opts.gptq else "") + f" ({args.calib})")

    q = QuantSpec(args.group_size, not args.no_zero_point, next(model.parameters()).dtype)
    res = search(model, arch, stat_ids, heldout, q, opts, device=args.device, gptq_ids=gptq_ids)
    if alpha != "auto":  # the user's alpha, as asked (clipped unless --no-clip)
        chosen = f"alpha={alpha:g}" + ("" if args.no_clip else "+clip")
    else:
        chosen = res.best
    rows = {r["name"]: r for r in res.table}
    best, rtn = rows[chosen], rows["rtn"]
    for phase, why in (res.pruned or {}).items():
        _log(f"skipped {phase}: {why}")
    _log(f"search: {len(res.table)} settings scored in {res.seconds['total']:.0f}s; chosen {chosen} "
         f"(held-out KL {best['kl']:.5f} vs plain RTN {rtn['kl']:.5f})")
    plans = res.finals[chosen]
    peaks = PhasePeaks(res.peak_rss_gib)
    apply_plans(model, arch, res.act_stats, plans, q)
    if chosen.endswith(STAGE_SUFFIXES):
        apply_gptq(model, arch, res.gptq, q)
    peaks.mark("apply")
    write(args, out, model, res, chosen, plans, stat_ids, heldout, peaks)
    _log(f"wrote {out} in {time.perf_counter() - t0:.0f}s")
    return 0


def apply_gptq(model, arch, per_layer: list, q) -> None:
    """The GPTQ stage's weights into the smoothed model (each linear: its dequantized INT4 in the
    model's dtype), checked: plain RTN of what is stored gives back GPTQ's codes, scales and zeros.
    Consumes per_layer: each layer's packed codes are let go once applied (0.65 GB on Qwen2.5-1.5B
    that the write would otherwise hold beside the model)."""
    from vllm_sqplus.arch import get_module
    from vllm_sqplus.checkpoint import release_file_pages
    from vllm_sqplus.export import unpack_nibbles
    from vllm_sqplus.quant import dequantize_int4, quantize_int4
    layers = get_module(model, arch.layers)
    if len(per_layer) != len(layers):
        raise SqplusError(f"GPTQ stage: {len(per_layer)} layers of results for a model of {len(layers)}")
    for i, layer in enumerate(layers):
        qs, per_layer[i] = per_layer[i], None
        for name, (packed, s, z) in qs.items():
            w = get_module(layer, name).weight
            codes = unpack_nibbles(packed)
            old = w.data  # replaced, not written into: a mapped checkpoint's pages are let go
            w.data = dequantize_int4(codes, s, z, q.group_size, dtype=w.dtype).to(w.device)
            release_file_pages(old)
            del old
            q2, s2, z2 = quantize_int4(w.detach(), q.group_size, q.zero_point, f"layers.{i}.{name}")
            if not (torch.equal(q2, codes) and torch.equal(s2, s) and torch.equal(z2, z)):
                raise SqplusError(f"layers.{i}.{name}: the stored weights of the last stage do not quantize "
                                  "back to its result (use --no-gptq and report this)")
    if hasattr(per_layer, "close"):  # a checkpoint.LayerSpill: its folder goes now
        per_layer.close()


def write(args, out: Path, model, res, chosen: str, plans, stat_ids, heldout, peaks=None) -> None:
    """The smoothed checkpoint, its quantization_config, the search table, plot and statistics."""
    from vllm_sqplus.arch import get_arch
    from vllm_sqplus.checkpoint import peak_rss_gib, save_model, write_checkpoint_atomic
    from vllm_sqplus.config import SqplusConfig
    from vllm_sqplus.gptq import ASYM_DAMP
    arch = get_arch(model.config)
    rows = {r["name"]: r for r in res.table}
    best, rtn = rows[chosen], rows["rtn"]
    per_layer_kind = best.get("kind") == "per-layer"
    per_layer = [p.describe() for p in plans]
    extra = {
        "alpha": None if per_layer_kind else best.get("alpha"),
        "act_stat": args.act_stat, "alpha_granularity": "layer" if per_layer_kind else "model",
        "clipped": any(p.clip is not None for p in plans),
        "gptq": chosen.endswith(GPTQ_SUFFIXES),
        "learned_rounding": chosen.endswith("+learned"),
        **({"rounding_iters": args.rounding_iters, "rounding_loss": args.rounding_loss,
            "rounding_target": args.rounding_target}
           if chosen.endswith("+learned") else {}),
        **({"gptq_act_order": bool(args.gptq_act_order), "gptq_true_sequential": bool(args.gptq_true_sequential),
            "gptq_range_search": bool(args.gptq_range_search), "gptq_asymmetric": asymmetric_stage(args),
            **({"gptq_asymmetric_ridge": ASYM_DAMP} if asymmetric_stage(args) else {})}
           if chosen.endswith(GPTQ_SUFFIXES) else {}),
        "choice": chosen,
        **({"layer_alphas": [p.alphas for p in plans]} if per_layer_kind else {}),
        "smoothed_pairs": [f"{p.prev}->{','.join(p.linears)}"
                           for p in arch.active_pairs(model.config, PAIR_SETS[args.pairs])],
        "calibration": {"data": args.calib, "samples": int(stat_ids.shape[0]),
                        "heldout_samples": int(heldout.shape[0]), "seq_len": args.seq_len,
                        **({"gptq_samples": res.n_gptq_tokens // args.seq_len} if chosen.endswith(STAGE_SUFFIXES)
                           else {})},
        "search": {"loss": "mean KL(full precision || smoothed + fake INT4) on held-out tokens",
                   "kl": best["kl"], "rtn_kl": rtn["kl"], "seconds": round(res.seconds["total"], 1),
                   "table": "sqplus_search.json"},
        "sqplus_version": __version__,
    }
    qcfg = SqplusConfig(group_size=args.group_size, zero_point=not args.no_zero_point,
                        lm_head=args.lm_head).to_dict(extra=extra)
    table = {"model": str(args.model_dir), "group_size": args.group_size, "zero_point": not args.no_zero_point,
             "pairs": args.pairs, "act_stat": args.act_stat, "chosen": chosen,
             "chosen_alpha": extra["alpha"], "paper_alpha": res.paper.alpha,
             "fp": res.fp_row, "rows": res.table, "layers": per_layer, "layer_log": res.layer_log,
             "stat_tokens": res.n_stat_tokens, "heldout_tokens": res.n_heldout_tokens,
             "gptq_tokens": res.n_gptq_tokens,
             "seconds": res.seconds, "pruned": res.pruned, "peak_rss_gib": round(peak_rss_gib(), 3),
             "peak_rss_gib_by_phase": peaks.gib if peaks is not None else res.peak_rss_gib,
             "command": " ".join(["sqplus", *sys.argv[1:]]) if sys.argv and "sqplus" in sys.argv[0] else None,
             "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": platform.node(),
             "threads": torch.get_num_threads()}

    def files(tmp: Path) -> None:
        save_model(model, args.model_dir, tmp, qcfg)
        if peaks is not None:
            peaks.mark("save_model")
            table["peak_rss_gib"] = round(peak_rss_gib(), 3)
        (tmp / "sqplus_search.json").write_text(json.dumps(table, indent=2) + "\n")
        from safetensors.torch import save_file
        # in a subfolder: vLLM (and transformers' sharded loaders) read every top-level *.safetensors
        (tmp / STATS_DIR).mkdir()
        save_file({f"{stat}.layers.{i}.{k}": v.contiguous() for i, per in enumerate(res.act_stats)
                   for stat, d in per.items() for k, v in d.items()},
                  str(tmp / STATS_DIR / "act_scales.safetensors"))
        try:
            plot_search(table, tmp / "sqplus_search.png")
        except Exception as e:  # noqa: BLE001 - a figure must never cost the search's result
            _log(f"warning: the search plot was not written ({type(e).__name__}: {e})")

    write_checkpoint_atomic(out, args.overwrite, files)


def plot_search(table: dict, path: Path) -> None:
    """Loss vs alpha (PNG); skipped quietly when matplotlib is absent."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = sorted((r for r in table["rows"] if r.get("kind") == "whole-model" and not r.get("clip")
                   and not r.get("stage") and not r.get("gptq") and r.get("alpha") is not None),
                  key=lambda r: r["alpha"])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["alpha"] for r in rows], [r["kl"] for r in rows], "o-", label="whole-model alpha + INT4")
    styles = iter(["--", ":", "-.", (0, (5, 1)), (0, (1, 3))])
    for r in table["rows"]:
        if r["name"] == "rtn" or r.get("clip") or r.get("stage") or r.get("gptq") or r.get("kind") == "per-layer":
            ax.axhline(r["kl"], ls=next(styles, "--"), color="gray" if r["name"] == "rtn" else None,
                       label=r["name"] if r["name"] != "rtn" else "no smoothing (RTN)")
    ax.set_xlabel("alpha")
    ax.set_ylabel("KL(FP || quantized), held-out tokens")
    ax.set_title(f"search (g{table['group_size']}): chosen {table['chosen']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
