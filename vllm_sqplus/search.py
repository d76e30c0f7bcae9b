"""Alpha search: one alpha for the whole model, scored by the whole quantized model's loss.

One pass over the decoder layers does everything, with a single layer on the device at a time:

    layer i on device
      |- statistics samples  -> FP layer (hooks: max|x| per linear input)  -> stats_i
      |- held-out samples    -> FP layer                                   -> reference stream
      '- held-out samples    -> smooth(alpha_c, stats_i) + fake INT4, for every candidate c
                                                                          -> candidate streams
    after the last layer: final norm + lm_head on every stream;
    loss(c) = mean KL(P_fp || P_c) over held-out tokens (and the next-token NLL, for the record).

The candidate set always holds the identity ("none": plain RTN), since for weight-only INT4 the
textbook scales can make things worse than no smoothing (measured here, see ANCHORS.md). Statistics
come from the statistics samples only; the loss from the held-out ones.
A finer refinement (best +/- step/2) runs a second, shorter pass over the layers.

granularity "layer" (AWQ-style, for comparison): each layer takes the alpha that minimises the
MSE of its own output, on the already-quantized stream; its whole-model loss is reported too.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from vllm_sqplus.arch import ArchSpec, get_module
from vllm_sqplus.calibrate import LayerwiseModel, collect_act_max
from vllm_sqplus.quant import pseudo_quantize_int4
from vllm_sqplus.smooth import smooth_layer

Alpha = float | None  # None: no smoothing (plain RTN)


def alpha_grid(step: float = 0.05) -> list[Alpha]:
    n = int(round(1.0 / step))
    return [None] + [round(i * step, 6) for i in range(n + 1)]


@dataclass
class QuantSpec:
    group_size: int = 128
    zero_point: bool = True
    store_dtype: torch.dtype = torch.bfloat16   # the smoothed checkpoint's dtype: searched as stored


@dataclass
class SearchResult:
    alpha: Alpha                                  # chosen whole-model alpha (None: identity)
    table: list[dict]                             # one row per candidate: alpha, kl, nll, ppl
    act_max: list[dict[str, torch.Tensor]]        # per layer, per linear: max|x| [K]
    layer_alphas: list[Alpha] | None = None       # granularity "layer": the per-layer choice
    layer_row: dict | None = None                 # its whole-model loss
    fp_row: dict | None = None                    # the full-precision model on the same tokens
    seconds: float = 0.0
    n_stat_tokens: int = 0
    n_heldout_tokens: int = 0
    notes: list[str] = field(default_factory=list)


@torch.no_grad()
def prepare_candidate(work: nn.Module, src: nn.Module, arch: ArchSpec, pairs, stats, alpha: Alpha,
                      q: QuantSpec, layer_name: str = "layer") -> nn.Module:
    """work <- src smoothed with alpha, rounded to the storage dtype, linears fake-quantized."""
    for pw, ps in zip(work.parameters(), src.parameters()):
        pw.copy_(ps)
    smooth_layer(work, pairs, stats, alpha)
    for p in work.parameters():  # what the checkpoint will hold
        p.copy_(p.to(q.store_dtype).to(p.dtype))
    for name in arch.linears:
        w = get_module(work, name).weight
        w.copy_(pseudo_quantize_int4(w, q.group_size, q.zero_point, f"{layer_name}.{name}"))
    return work


def _kl_nll(runner: LayerwiseModel, head, ref_logp: list[torch.Tensor], hs: torch.Tensor,
            labels: torch.Tensor) -> tuple[float, float]:
    """Mean KL(ref || candidate) over all held-out tokens, and mean next-token NLL."""
    kl_sum, nll_sum, n_nll, off = 0.0, 0.0, 0, 0
    for ref, logits in zip(ref_logp, runner.iter_logits(head, hs)):
        logp = torch.log_softmax(logits, dim=-1)
        r = ref.float()
        kl_sum += float((r.exp() * (r - logp)).sum())
        lab = labels[off: off + logits.shape[0]]
        ok = lab >= 0
        nll_sum += float(-logp[ok].gather(1, lab[ok, None]).sum())
        n_nll += int(ok.sum())
        off += logits.shape[0]
    return kl_sum / off, nll_sum / max(n_nll, 1)


def _next_token_labels(ids: torch.Tensor) -> torch.Tensor:
    lab = torch.full_like(ids, -1)
    lab[:, :-1] = ids[:, 1:]
    return lab.reshape(-1)


@torch.no_grad()
def _walk(runner: LayerwiseModel, arch: ArchSpec, pairs, q: QuantSpec, heldout: torch.Tensor,
          alphas: list[Alpha], stat_ids: torch.Tensor | None, act_max: list | None,
          want_ref: bool, layer_granularity: bool, progress: bool):
    """One pass over the layers. Returns (act_max, streams per alpha, ref stream, layer stream, layer alphas)."""
    n_layers = len(runner.layers)
    hs_stat = runner.embed(stat_ids) if stat_ids is not None else None
    hs_ref = runner.embed(heldout)
    streams = [hs_ref.clone() for _ in alphas]
    hs_layer = hs_ref.clone() if layer_granularity else None
    layer_alphas: list[Alpha] = []
    act_max = list(act_max) if act_max is not None else []
    it = range(n_layers)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc="calibrate+search", unit="layer")
    for i in it:
        name = f"layers.{i}"
        layer = runner.layer_on_device(i)
        if hs_stat is not None:
            stats, hs_stat = collect_act_max(layer, arch, runner, hs_stat, name)
            act_max.append({k: v.cpu() for k, v in stats.items()})
        stats = {k: v.to(runner.device) for k, v in act_max[i].items()}
        work = copy.deepcopy(layer)
        for c, a in enumerate(alphas):
            prepare_candidate(work, layer, arch, pairs, stats, a, q, name)
            streams[c] = runner.run_layer(work, streams[c])
        if layer_granularity:
            target = runner.run_layer(layer, hs_layer)
            best = (math.inf, None, None)
            for a in alphas:
                out = runner.run_layer(prepare_candidate(work, layer, arch, pairs, stats, a, q, name), hs_layer)
                mse = float((out - target).pow(2).mean())
                if mse < best[0]:
                    best = (mse, a, out)
            layer_alphas.append(best[1])
            hs_layer = best[2]
        if want_ref:
            hs_ref = runner.run_layer(layer, hs_ref)
        del layer, work
    return act_max, streams, hs_ref, hs_layer, layer_alphas


def _row(alpha: Alpha, kl: float, nll: float) -> dict:
    return {"alpha": alpha, "kl": kl, "nll": nll, "ppl": math.exp(nll)}


@torch.no_grad()
def search_alpha(model: nn.Module, arch: ArchSpec, stat_ids: torch.Tensor, heldout: torch.Tensor,
                 q: QuantSpec, alphas: list[Alpha] | None = None, refine: bool = True,
                 granularity: str = "model", pair_kinds=("norm", "linear"), device="cpu",
                 batch_size: int = 4, progress: bool = False) -> SearchResult:
    """Collect statistics on stat_ids and pick the alpha minimising the whole model's KL on heldout."""
    t0 = time.perf_counter()
    alphas = alpha_grid() if alphas is None else list(alphas)
    pairs = arch.active_pairs(model.config, tuple(pair_kinds))
    runner = LayerwiseModel(model, arch, device, batch_size=batch_size)
    act_max, streams, hs_ref, hs_layer, layer_alphas = _walk(
        runner, arch, pairs, q, heldout, alphas, stat_ids, None, True, granularity == "layer", progress)
    head = runner.head_on_device()
    ref_logp = [torch.log_softmax(l, dim=-1).to(torch.bfloat16) for l in runner.iter_logits(head, hs_ref)]
    del hs_ref
    labels = _next_token_labels(heldout).to(runner.device)
    ref_nll = sum(float(-r.float()[l >= 0].gather(1, l[l >= 0, None]).sum())
                  for r, l in zip(ref_logp, labels.split([r.shape[0] for r in ref_logp]))) / int((labels >= 0).sum())
    table = []
    for a, hs in zip(alphas, streams):
        table.append(_row(a, *_kl_nll(runner, head, ref_logp, hs, labels)))
    del streams
    layer_row = None
    if hs_layer is not None:
        layer_row = _row("per-layer", *_kl_nll(runner, head, ref_logp, hs_layer, labels))

    if refine:
        numeric = sorted(a for a in alphas if a is not None)
        best = min(table, key=lambda r: r["kl"])["alpha"]
        if best is not None and len(numeric) > 1:
            step = min(b - a for a, b in zip(numeric, numeric[1:]))
            extra = [round(best + d, 6) for d in (-step / 2, step / 2)
                     if 0.0 <= best + d <= 1.0 and round(best + d, 6) not in numeric]
            if extra:
                _, more, _, _, _ = _walk(runner, arch, pairs, q, heldout, extra, None, act_max,
                                         False, False, progress)
                for a, hs in zip(extra, more):
                    table.append(_row(a, *_kl_nll(runner, head, ref_logp, hs, labels)))
    best_row = min(table, key=lambda r: r["kl"])
    return SearchResult(alpha=best_row["alpha"], table=table, act_max=act_max,
                        fp_row=_row("full precision", 0.0, ref_nll),
                        layer_alphas=layer_alphas or None, layer_row=layer_row,
                        seconds=time.perf_counter() - t0,
                        n_stat_tokens=stat_ids.numel(), n_heldout_tokens=heldout.numel())


@torch.no_grad()
def apply_smoothing(model: nn.Module, arch: ArchSpec, act_max: list[dict[str, torch.Tensor]],
                    alpha: Alpha | list[Alpha], pair_kinds=("norm", "linear")) -> None:
    """Smooth the stored model in place (its own dtype), one alpha or one per layer."""
    pairs = arch.active_pairs(model.config, tuple(pair_kinds))
    layers = get_module(model, arch.layers)
    for i, layer in enumerate(layers):
        a = alpha[i] if isinstance(alpha, list) else alpha
        smooth_layer(layer, pairs, act_max[i], a)
