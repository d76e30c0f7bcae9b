"""Write another scored row of a `sqplus smooth` run as its own checkpoint, without searching again.

`sqplus smooth` writes the chosen setting; its sqplus_search.json scores the others (plain RTN, the
paper's whole-model alpha, with and without clipping, the per-layer plan). For the accuracy table
the paper form (SmoothQuant+ as published: one alpha for the model, no clipping) is needed as a
checkpoint too. This re-applies it from the run's saved statistics (sqplus_stats/) to the original
full-precision model, through the same code the search scored it with (search.apply_plans).

usage: python benchmarks/sq_variant.py --model FP_DIR --run SMOOTHED_DIR --out OUT_DIR [--row paper|best-alpha]

  --row paper        the search's paper_alpha: the lowest held-out KL among the whole-model alphas
                     *and the identity* (on both Qwen2.5-Coder models the identity, i.e. plain RTN)
  --row best-alpha   the lowest held-out KL among the smoothed whole-model alphas only (no
                     identity: SmoothQuant+ as published always smooths); the grid and its
                     refinement as that run scored them (a pruned run scored the coarse grid only)
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--run", required=True, help="a sqplus smooth output folder")
    ap.add_argument("--out", required=True)
    ap.add_argument("--row", default="paper", choices=["paper", "best-alpha"])
    a = ap.parse_args()
    from safetensors.torch import load_file
    from vllm_sqplus.arch import PAIR_SETS
    from vllm_sqplus.checkpoint import check_output_dir, load_model, save_model, write_checkpoint_atomic
    from vllm_sqplus.config import SqplusConfig
    from vllm_sqplus.search import Candidate, LayerPlan, QuantSpec, apply_plans
    run = Path(a.run)
    table = json.loads((run / "sqplus_search.json").read_text())
    qc_run = json.loads((run / "config.json").read_text())["quantization_config"]
    if a.row == "paper":
        alpha = table["paper_alpha"]
    else:
        smoothed = [r for r in table["rows"] if r.get("kind") == "whole-model" and not r.get("clip")
                    and not r.get("gptq") and r.get("alpha") is not None]
        if not smoothed:
            raise SystemExit(f"error: {run / 'sqplus_search.json'} scored no smoothed whole-model alpha")
        alpha = min(smoothed, key=lambda r: r["kl"])["alpha"]
    out = check_output_dir(a.model, a.out, overwrite=True)
    model, arch = load_model(a.model)
    flat = load_file(str(run / "sqplus_stats" / "act_scales.safetensors"))
    n = len(table["layers"])
    stats = [{s: {} for s in ("max", "mean")} for _ in range(n)]
    for key, v in flat.items():
        stat, _, i, name = key.split(".", 3)
        stats[int(i)][stat][name] = v
    cand = Candidate(alpha, table["act_stat"], table["pairs"])
    plans = [LayerPlan.uniform(cand, arch.active_pairs(model.config, PAIR_SETS[cand.pairs])) for _ in range(n)]
    q = QuantSpec(table["group_size"], table["zero_point"], next(model.parameters()).dtype)
    apply_plans(model, arch, stats, plans, q)
    row = next(r for r in table["rows"] if r["name"] == ("rtn" if alpha is None else f"alpha={alpha:g}"))
    extra = {"alpha": alpha, "alpha_granularity": "model", "clipped": False, "choice": a.row,
             "act_stat": table["act_stat"], "calibration": qc_run.get("calibration"),
             "search": {**qc_run["search"], "kl": row["kl"]}, "derived_from": str(run)}
    qcfg = SqplusConfig(group_size=q.group_size, zero_point=q.zero_point).to_dict(extra=extra)

    # the paper form's own search cost: the statistics pass and the whole-model alpha grid, and the
    # run's peak over those phases (its load, the statistics + grid pass and the refinement)
    secs = table["seconds"]
    phases = table.get("peak_rss_gib_by_phase") or {}
    own = [phases[k] for k in ("before", "calibrate_and_alpha_grid", "alpha_refine") if k in phases]
    table = {**table, "chosen": a.row, "chosen_alpha": alpha,
             "seconds": {**secs, "total": secs.get("calibrate_and_alpha_grid", 0) + secs.get("alpha_refine", 0),
                         "total_of_the_full_run": secs.get("total")},
             "peak_rss_gib": max(own) if own else None, "peak_rss_gib_of_the_full_run": table.get("peak_rss_gib")}

    def files(tmp: Path) -> None:
        save_model(model, a.model, tmp, qcfg)
        (tmp / "sqplus_search.json").write_text(json.dumps(table, indent=2) + "\n")

    write_checkpoint_atomic(out, True, files)
    print(f"wrote {out} ({a.row}: alpha {alpha}, search KL {row['kl']:.5f})")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
