"""Alpha search: one smoothing setting for the whole model, scored by the whole quantized model's loss.

One pass over the decoder layers does everything, with a single layer on the device at a time:

    layer i on device
      |- statistics samples  -> FP layer (hooks: max|x| and mean|x| per linear input) -> stats_i
      |- held-out samples    -> FP layer                                   -> reference stream
      '- held-out samples    -> smooth(candidate c, stats_i) + fake INT4, for every candidate c
                                                                          -> candidate streams
    after the last layer: final norm + lm_head on every stream;
    loss(c) = mean KL(P_fp || P_c) over held-out tokens (and the next-token NLL, for the record).

A candidate is (alpha, activation statistic, pair set). The paper's form is stat "max" with one
alpha for the whole model; the statistic (AWQ's mean|x|) and the pair set are there because for
weight-only INT4 the textbook scales can be worse than no smoothing at all (measured on
Qwen2.5-Coder-0.5B, see benchmarks/results/accuracy.md). The identity ("none": plain RTN) is
always a candidate, so the search never returns something worse than RTN on its own loss.
Statistics come from the statistics samples only; the loss from the held-out ones.
A refinement (best alpha +/- step/2) runs a second, shorter pass over the layers.

granularity "layer" (AWQ-style, for comparison): each layer takes the candidate that minimises the
MSE of its own output, on the already-quantized stream; its whole-model loss is reported too.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from vllm_sqplus.arch import PAIR_SETS, ArchSpec, get_module
from vllm_sqplus.calibrate import LayerwiseModel, collect_act_stats
from vllm_sqplus.quant import pseudo_quantize_int4
from vllm_sqplus.smooth import smooth_layer


@dataclass(frozen=True)
class Candidate:
    alpha: float | None          # None: no smoothing (plain RTN)
    stat: str = "max"            # activation statistic: "max" (SmoothQuant+) or "mean" (AWQ)
    pairs: str = "all"           # key of arch.PAIR_SETS

    @property
    def label(self) -> str:
        return "none (RTN)" if self.alpha is None else f"{self.stat}/{self.pairs}/{self.alpha:g}"


IDENTITY = Candidate(None)


def alpha_grid(step: float = 0.05) -> list[float]:
    n = int(round(1.0 / step))
    return [round(i * step, 6) for i in range(n + 1)]


def candidate_grid(step: float = 0.05, stats=("max",), pair_sets=("all",)) -> list[Candidate]:
    return [IDENTITY] + [Candidate(a, s, p) for s in stats for p in pair_sets for a in alpha_grid(step)]


@dataclass
class QuantSpec:
    group_size: int = 128
    zero_point: bool = True
    store_dtype: torch.dtype = torch.bfloat16   # the smoothed checkpoint's dtype: searched as stored


@dataclass
class SearchResult:
    best: Candidate                               # chosen whole-model setting
    table: list[dict]                             # one row per candidate: alpha, stat, pairs, kl, nll, ppl
    act_stats: list[dict[str, dict[str, torch.Tensor]]]  # per layer: {"max"|"mean": {linear: [K]}}
    layer_choice: list[Candidate] | None = None   # granularity "layer": the per-layer choice
    layer_row: dict | None = None                 # its whole-model loss
    fp_row: dict | None = None                    # the full-precision model on the same tokens
    seconds: float = 0.0
    n_stat_tokens: int = 0
    n_heldout_tokens: int = 0


@torch.no_grad()
def prepare_candidate(work: nn.Module, src: nn.Module, arch: ArchSpec, config, stats, cand: Candidate,
                      q: QuantSpec, layer_name: str = "layer") -> nn.Module:
    """work <- src smoothed with cand, rounded to the storage dtype, linears fake-quantized."""
    for pw, ps in zip(work.parameters(), src.parameters()):
        pw.copy_(ps)
    if cand.alpha is not None:
        pairs = arch.active_pairs(config, PAIR_SETS[cand.pairs])
        smooth_layer(work, pairs, stats[cand.stat], cand.alpha)
    for p in work.parameters():  # what the checkpoint will hold
        p.copy_(p.to(q.store_dtype).to(p.dtype))
    for name in arch.linears:
        w = get_module(work, name).weight
        w.copy_(pseudo_quantize_int4(w, q.group_size, q.zero_point, f"{layer_name}.{name}"))
    return work


def _kl_nll(runner: LayerwiseModel, head, ref_logp: list[torch.Tensor], hs: torch.Tensor,
            labels: torch.Tensor) -> tuple[float, float]:
    """Mean KL(ref || candidate) over all held-out tokens, and mean next-token NLL."""
    kl_sum, nll_sum, off = 0.0, 0.0, 0
    for ref, logits in zip(ref_logp, runner.iter_logits(head, hs)):
        logp = torch.log_softmax(logits, dim=-1)
        r = ref.float()
        kl_sum += float((r.exp() * (r - logp)).sum())
        nll_sum += _nll_sum(logp, labels[off: off + logits.shape[0]])
        off += logits.shape[0]
    return kl_sum / off, nll_sum / int((labels >= 0).sum())


def _nll_sum(logp: torch.Tensor, labels: torch.Tensor) -> float:
    ok = labels >= 0
    return float(-logp[ok].float().gather(1, labels[ok, None]).sum())


def _next_token_labels(ids: torch.Tensor) -> torch.Tensor:
    lab = torch.full_like(ids, -1)
    lab[:, :-1] = ids[:, 1:]
    return lab.reshape(-1)


@torch.no_grad()
def _walk(runner: LayerwiseModel, arch: ArchSpec, q: QuantSpec, heldout: torch.Tensor,
          cands: list[Candidate], stat_ids: torch.Tensor | None, act_stats: list | None,
          want_ref: bool, layer_granularity: bool, progress: bool):
    """One pass over the layers -> (act_stats, stream per candidate, ref stream, layer stream, layer choice)."""
    config = runner.model.config
    hs_stat = runner.embed(stat_ids) if stat_ids is not None else None
    hs_ref = runner.embed(heldout)
    streams = [hs_ref.clone() for _ in cands]
    hs_layer = hs_ref.clone() if layer_granularity else None
    layer_choice: list[Candidate] = []
    act_stats = list(act_stats) if act_stats is not None else []
    it = range(len(runner.layers))
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc="calibrate+search" if hs_stat is not None else "refine", unit="layer")
    for i in it:
        name = f"layers.{i}"
        layer = runner.layer_on_device(i)
        if hs_stat is not None:
            stats, hs_stat = collect_act_stats(layer, arch, runner, hs_stat, name)
            act_stats.append({s: {k: v.cpu() for k, v in d.items()} for s, d in stats.items()})
        stats = {s: {k: v.to(runner.device) for k, v in d.items()} for s, d in act_stats[i].items()}
        work = copy.deepcopy(layer)
        for c, cand in enumerate(cands):
            prepare_candidate(work, layer, arch, config, stats, cand, q, name)
            streams[c] = runner.run_layer(work, streams[c])
        if layer_granularity:
            target = runner.run_layer(layer, hs_layer)
            best = (math.inf, None, None)
            for cand in cands:
                out = runner.run_layer(prepare_candidate(work, layer, arch, config, stats, cand, q, name), hs_layer)
                mse = float((out - target).pow(2).mean())
                if mse < best[0]:
                    best = (mse, cand, out)
            layer_choice.append(best[1])
            hs_layer = best[2]
        if want_ref:
            hs_ref = runner.run_layer(layer, hs_ref)
        del layer, work
    return act_stats, streams, hs_ref, hs_layer, layer_choice


def _row(cand: Candidate | str, kl: float, nll: float) -> dict:
    head = asdict(cand) if isinstance(cand, Candidate) else {"alpha": cand}
    return {**head, "kl": kl, "nll": nll, "ppl": math.exp(nll)}


@torch.no_grad()
def search_alpha(model: nn.Module, arch: ArchSpec, stat_ids: torch.Tensor, heldout: torch.Tensor,
                 q: QuantSpec, candidates: list[Candidate] | None = None, refine: bool = True,
                 granularity: str = "model", device="cpu", batch_size: int = 4,
                 progress: bool = False) -> SearchResult:
    """Collect statistics on stat_ids and pick the candidate minimising the whole model's KL on heldout."""
    t0 = time.perf_counter()
    cands = candidate_grid() if candidates is None else list(dict.fromkeys(candidates))
    if IDENTITY not in cands:
        cands.insert(0, IDENTITY)
    runner = LayerwiseModel(model, arch, device, batch_size=batch_size)
    act_stats, streams, hs_ref, hs_layer, layer_choice = _walk(
        runner, arch, q, heldout, cands, stat_ids, None, True, granularity == "layer", progress)
    head = runner.head_on_device()
    ref_logp = [torch.log_softmax(l, dim=-1).to(torch.bfloat16) for l in runner.iter_logits(head, hs_ref)]
    del hs_ref
    labels = _next_token_labels(heldout).to(runner.device)
    ref_nll = sum(_nll_sum(r, l) for r, l in zip(ref_logp, labels.split([r.shape[0] for r in ref_logp])))
    ref_nll /= int((labels >= 0).sum())
    scored = {cand: _kl_nll(runner, head, ref_logp, hs, labels) for cand, hs in zip(cands, streams)}
    del streams
    layer_row = _row("per-layer", *_kl_nll(runner, head, ref_logp, hs_layer, labels)) if hs_layer is not None else None

    if refine:
        best = min(scored, key=lambda c: scored[c][0])
        same = sorted(c.alpha for c in scored if c.alpha is not None and (c.stat, c.pairs) == (best.stat, best.pairs))
        if best.alpha is not None and len(same) > 1:
            step = min(b - a for a, b in zip(same, same[1:]))
            extra = [Candidate(round(best.alpha + d, 6), best.stat, best.pairs) for d in (-step / 2, step / 2)
                     if 0.0 <= best.alpha + d <= 1.0]
            extra = [c for c in extra if c not in scored]
            if extra:
                _, more, _, _, _ = _walk(runner, arch, q, heldout, extra, None, act_stats, False, False, progress)
                for cand, hs in zip(extra, more):
                    scored[cand] = _kl_nll(runner, head, ref_logp, hs, labels)
    best = min(scored, key=lambda c: scored[c][0])
    return SearchResult(best=best, table=[_row(c, *v) for c, v in scored.items()], act_stats=act_stats,
                        layer_choice=layer_choice or None, layer_row=layer_row,
                        fp_row=_row("full precision", 0.0, ref_nll), seconds=time.perf_counter() - t0,
                        n_stat_tokens=stat_ids.numel(), n_heldout_tokens=heldout.numel())


@torch.no_grad()
def apply_smoothing(model: nn.Module, arch: ArchSpec, act_stats: list[dict],
                    choice: Candidate | list[Candidate]) -> None:
    """Smooth the stored model in place (its own dtype): one candidate for all layers, or one per layer.

    act_stats[i] is {"max"|"mean": {linear: [K]}} (from the search) or {linear: [K]} (max only).
    """
    layers = get_module(model, arch.layers)
    for i, layer in enumerate(layers):
        cand = choice[i] if isinstance(choice, list) else choice
        if cand.alpha is None:
            continue
        stats = act_stats[i][cand.stat] if cand.stat in act_stats[i] else act_stats[i]
        smooth_layer(layer, arch.active_pairs(model.config, PAIR_SETS[cand.pairs]), stats, cand.alpha)
