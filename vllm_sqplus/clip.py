"""Clipping search (AWQ's auto_clip, activation-weighted), folded into the stored weights.

For a linear W [N, K] with groups of g along K, group (n, j) is quantized from the range
[lo, hi] = [min(min w, 0), max(max w, 0)] (vllm_sqplus.quant). Clipping shrinks that range to
[r*lo, r*hi] for a ratio r in (0, 1]: the outliers of the group lose accuracy, every other weight
of the group gains it. r is chosen per (row, group) to minimise the error of the linear's *output*
on the calibration inputs,
    err(n, j) = (w_nj - q_nj) G_j (w_nj - q_nj)^T,    G_j = sum_t x_tj^T x_tj  (g x g)
with x_tj the group's slice of the input (the block diagonal of the input Gram matrix; AWQ computes
the same from sampled tokens). Groups and rows are independent, so the argmin is exact per group.

Folding: the weights are clamped to the chosen range, in the storage dtype. Plain RTN of the clamped
weights then finds exactly that range (its min/max are the clamp bounds, or the unclipped ones where
nothing was clipped), so the plugin's quantize-at-load reproduces the clipped quantization bit for
bit with no extra metadata (tests/test_clip.py checks that equality).
"""
from __future__ import annotations

import torch

from vllm_sqplus.quant import _MIN_RANGE, QuantError, check_group_size, pseudo_quantize_int4

DEFAULT_RATIOS = tuple(round(1.0 - 0.05 * i, 2) for i in range(11))  # 1.0 .. 0.5 (AWQ: 20 steps, shrink <= 0.5)


def group_gram(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """Block-diagonal Gram of inputs x [T, K]: [K/g, g, g], float32 (sum over tokens)."""
    t, k = x.shape
    g = check_group_size(k, group_size, "input")
    xg = x.float().reshape(t, k // g, g).transpose(0, 1)  # [K/g, T, g]
    return torch.bmm(xg.transpose(1, 2), xg)


def scale_gram(gram: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Gram of x / s (the smoothed input) from the Gram of x: G_ab / (s_a s_b) per group."""
    ng, g, _ = gram.shape
    inv = (1.0 / s.float()).reshape(ng, g)
    return gram * inv[:, :, None] * inv[:, None, :]


def clip_bounds(w: torch.Tensor, ratios: torch.Tensor, group_size: int,
                store_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Clamp bounds [N, K/g] for per-group ratios [N, K/g], rounded to store_dtype (default w's)
    and returned in w's dtype, so clamped weights stay representable in the checkpoint's dtype."""
    n, k = w.shape
    g = check_group_size(k, group_size)
    wg = w.float().reshape(n, k // g, g)
    lo = wg.amin(-1).clamp(max=0) * ratios.float()
    hi = wg.amax(-1).clamp(min=0) * ratios.float()
    sd = store_dtype or w.dtype
    return lo.to(sd).to(w.dtype), hi.to(sd).to(w.dtype)


def apply_clip(w: torch.Tensor, ratios: torch.Tensor, group_size: int,
               store_dtype: torch.dtype | None = None) -> torch.Tensor:
    """w clamped group-wise to the ratios' ranges; same shape and dtype. With store_dtype the bounds
    are values of that dtype, so weights that were representable in it stay representable."""
    n, k = w.shape
    g = check_group_size(k, group_size)
    lo, hi = clip_bounds(w, ratios, group_size, store_dtype)
    wg = w.reshape(n, k // g, g)
    return torch.maximum(torch.minimum(wg, hi.unsqueeze(-1)), lo.unsqueeze(-1)).reshape(n, k)


def _fake_quant_ranges(wg: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, sd: torch.dtype) -> torch.Tensor:
    """pseudo_quantize_int4 (zero point) of wg [m, G, g] clamped to [lo, hi] [m, G], without the
    clamp copy, the checks and the reshapes: wg, lo and hi hold values of sd (float32 tensors), and
    lo <= 0 <= hi are the clamped groups' own min/max (widened to 0), as quantize_int4 would find.
    Bit-identical to pseudo_quantize_int4(apply_clip(w).to(sd)).float() (tests/test_clip.py)."""
    scale = ((hi - lo).clamp(min=_MIN_RANGE) / 15).to(sd).float()
    zero = torch.round(-lo / scale).clamp_(0, 15)
    wc = torch.maximum(torch.minimum(wg, hi.unsqueeze(-1)), lo.unsqueeze(-1))
    q = torch.round_(wc.div_(scale.unsqueeze(-1))).add_(zero.unsqueeze(-1)).clamp_(0, 15)
    return q.sub_(zero.unsqueeze(-1)).mul_(scale.unsqueeze(-1)).to(sd).float()


@torch.no_grad()
def search_clip(w: torch.Tensor, gram: torch.Tensor, group_size: int, zero_point: bool = True,
                ratios=DEFAULT_RATIOS, store_dtype: torch.dtype | None = None, rows_per_chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """Best ratio per (row, group) for w [N, K] (the weights as stored) and the group Gram [K/g, g, g].

    Returns (ratios [N, K/g] float32, error reduction: err(best) / err(no clip), a scalar).
    Ratio 1.0 (no clipping) is always a candidate, so no group gets worse on this loss.
    """
    n, k = w.shape
    g = check_group_size(k, group_size)
    if not torch.isfinite(w).all():
        raise QuantError("search_clip: weight contains NaN or Inf")
    sd = store_dtype or w.dtype
    best_r = torch.ones(n, k // g)
    err0_total, best_total = 0.0, 0.0
    gram = gram.float()
    ratios = (1.0, *[r for r in ratios if r != 1.0])  # no clipping first: it wins ties
    for r0 in range(0, n, rows_per_chunk):
        wc = w[r0: r0 + rows_per_chunk]
        m = wc.shape[0]
        wg = wc.to(sd).float().reshape(m, k // g, g)
        lo0, hi0 = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
        best = torch.full((m, k // g), float("inf"))
        ratio = torch.ones(m, k // g)
        for r in ratios:
            rr = torch.full((m, k // g), float(r))
            if zero_point:
                lo, hi = ((lo0, hi0) if r == 1.0 else
                          ((lo0 * rr).to(sd).to(wc.dtype).float(), (hi0 * rr).to(sd).to(wc.dtype).float()))
                wq = _fake_quant_ranges(wg, lo, hi, sd).reshape(m, k)
            else:
                wc_r = apply_clip(wc, rr, g, store_dtype) if r < 1.0 else wc
                wq = pseudo_quantize_int4(wc_r.to(sd), g, zero_point).float()
            d = (wc.float() - wq).reshape(m, k // g, g).transpose(0, 1).contiguous()   # [K/g, m, g]
            err = (torch.bmm(d, gram) * d).sum(-1).transpose(0, 1)        # [m, K/g]
            if r == 1.0:
                err0_total += float(err.sum())
            better = err < best
            best = torch.where(better, err, best)
            ratio = torch.where(better, rr, ratio)
        best_r[r0: r0 + m] = ratio
        best_total += float(best.sum())
    return best_r, (best_total / err0_total if err0_total > 0 else 1.0)
