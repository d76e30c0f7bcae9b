"""Smoothing (SmoothQuant / SmoothQuant+): move activation outliers into the weights, exactly.

For a pair prev -> linears with shared input channels j:
    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)
where max|X_j| is the calibration statistic of the linears' input and max|W_j| the max over all the
pair's linears' column j (both clamped at 1e-5). s is normalised by sqrt(max(s) * min(s)) (AWQ's
normalisation: a constant factor changes nothing for group-wise RTN, but it keeps the folded norm
weights in a sane range for FP16/BF16 storage). Then prev's output channel j is divided by s_j and
each linear's input column j multiplied by s_j: the full-precision function is unchanged.
"""
from __future__ import annotations

import torch
from torch import nn

from vllm_sqplus.arch import SmoothPair, get_module

_CLAMP = 1e-5


def compute_smooth_scales(act_max: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """s [K] in float32 for input statistic act_max [K] and the pair's weights [N_i, K]."""
    w_max = torch.stack([w.detach().abs().float().amax(dim=0) for w in weights]).amax(dim=0)
    x = act_max.float().clamp(min=_CLAMP)
    w = w_max.clamp(min=_CLAMP)
    s = x.pow(alpha) / w.pow(1.0 - alpha)
    s = s / torch.sqrt(s.max() * s.min())
    if not torch.isfinite(s).all():
        raise FloatingPointError("smoothing scales are not finite (check the statistics)")
    return s


@torch.no_grad()
def apply_smooth(prev: nn.Module | None, linears: list[nn.Linear], s: torch.Tensor, kind: str) -> None:
    """Divide prev's output channels by s, multiply the linears' input columns by s (in place).
    prev None: only the linears' half of the fold (the search rebuilds modules one at a time)."""
    if prev is None:
        pass
    elif kind == "norm":
        s = s.to(prev.weight.device)
        prev.weight.copy_((prev.weight.float() / s).to(prev.weight.dtype))
    else:  # a linear: its output rows (and bias) feed our input columns
        s = s.to(prev.weight.device)
        prev.weight.copy_((prev.weight.float() / s[:, None]).to(prev.weight.dtype))
        if getattr(prev, "bias", None) is not None:
            prev.bias.copy_((prev.bias.float() / s).to(prev.bias.dtype))
    for fc in linears:
        fc.weight.copy_((fc.weight.float() * s.to(fc.weight.device)[None, :]).to(fc.weight.dtype))


@torch.no_grad()
def smooth_layer(layer: nn.Module, pairs: list[SmoothPair], act_max: dict[str, torch.Tensor],
                 alpha: float | None) -> dict[str, torch.Tensor]:
    """Smooth one decoder layer in place; alpha None is the identity. Returns the scales used.

    act_max maps a linear's path inside the layer to its input statistic max|x| [K]; a pair reads
    the statistic of its first linear (they share their input).
    """
    scales = {}
    if alpha is None:
        return scales
    for pair in pairs:
        fcs = [get_module(layer, name) for name in pair.linears]
        s = compute_smooth_scales(act_max[pair.linears[0]], [fc.weight for fc in fcs], alpha)
        apply_smooth(get_module(layer, pair.prev), fcs, s, pair.kind)
        scales[pair.prev] = s
    return scales
