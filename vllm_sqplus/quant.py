"""Reference group-wise INT4 quantization in plain PyTorch: the ground truth for every kernel.

Layout of the reference (unpacked) form, shared by the whole project:
  w      [N, K]      a linear's weight (out_features x in_features); groups run along K.
  q      [N, K]      uint8 codes in 0..15.
  scales [N, K//g]   one scale per (row, group), in w's dtype (float32 math inside).
  zeros  [N, K//g]   uint8 integer zero point per (row, group), in 0..15; the symmetric form
                     stores the constant 8, so one formula serves both:
  w_hat = (q - zeros) * scales.
group_size -1 means one group spanning all of K (per-channel).

Asymmetric (zero_point=True) is min-max round-to-nearest as in AWQ / SmoothQuant+, with the range
widened to include 0 (GPTQ's quantizer does the same): lo = min(min(w), 0), hi = max(max(w), 0),
  scale = max(hi - lo, 1e-5) / 15,  zero = round(-lo / scale) in 0..15 without clamping.
Weight groups nearly always straddle 0, so this changes nothing there; a group of one sign (a
constant group, say) would otherwise get its zero point clamped and collapse (AWQ's formula maps a
group of all 3.0 to 1e-5).
Symmetric (zero_point=False): scale = max(|w|) / 7 (clamped at 1e-5 / 7), zero = 8, codes -8..7 + 8.
"""
from __future__ import annotations

import torch

from vllm_sqplus.errors import SqplusError

__all__ = ["quantize_int4", "dequantize_int4", "pseudo_quantize_int4", "check_group_size",
           "sqnr_db", "QuantError"]

_MIN_RANGE = 1e-5


class QuantError(SqplusError, ValueError):
    """A weight cannot be quantized as asked (shape, group size or non-finite values)."""


def check_group_size(k: int, group_size: int, name: str = "weight") -> int:
    """Return the effective group size for in_features k, or raise naming the layer and a fit."""
    if group_size == -1:
        return k
    if group_size <= 0:
        raise QuantError(f"group_size must be positive or -1, got {group_size}")
    if k % group_size:
        fits = [g for g in (128, 64, 32) if k % g == 0]
        hint = f"; group sizes that divide it: {fits}" if fits else "; use --group-size -1 (per-channel)"
        raise QuantError(f"{name}: in_features {k} is not divisible by group_size {group_size}{hint}")
    return group_size


def _grouped(w: torch.Tensor, group_size: int, name: str) -> tuple[torch.Tensor, int]:
    if w.dim() != 2:
        raise QuantError(f"{name}: expected a 2-D weight [N, K], got shape {tuple(w.shape)}")
    n, k = w.shape
    g = check_group_size(k, group_size, name)
    if not torch.isfinite(w).all():
        raise QuantError(f"{name}: weight contains NaN or Inf")
    return w.float().reshape(n, k // g, g), g  # [N, K/g, g]


@torch.no_grad()
def quantize_int4(w: torch.Tensor, group_size: int = 128, zero_point: bool = True,
                  name: str = "weight") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize w [N, K] group-wise along K -> (q uint8 [N,K], scales [N,K/g], zeros uint8 [N,K/g])."""
    wg, g = _grouped(w, group_size, name)
    n, k = w.shape
    if zero_point:
        wmax, wmin = wg.amax(dim=-1).clamp(min=0), wg.amin(dim=-1).clamp(max=0)
        scales = ((wmax - wmin).clamp(min=_MIN_RANGE) / 15).to(w.dtype)
        s32 = scales.float()
        zeros = torch.round(-wmin / s32).clamp(0, 15)
    else:
        scales = (wg.abs().amax(dim=-1).clamp(min=_MIN_RANGE) / 7).to(w.dtype)
        s32 = scales.float()
        zeros = torch.full_like(s32, 8.0)
    # codes from the scale as stored (w's dtype), so dequantization is as close as it can be
    q = torch.round(wg / s32.unsqueeze(-1)) + zeros.unsqueeze(-1)
    q = q.clamp(0, 15).to(torch.uint8).reshape(n, k)
    return q, scales, zeros.to(torch.uint8)


def dequantize_int4(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    group_size: int = 128, dtype: torch.dtype | None = None) -> torch.Tensor:
    """(q - zeros) * scales, back to [N, K] in `dtype` (default: scales' dtype), float32 math."""
    n, k = q.shape
    g = k if group_size == -1 else group_size
    w = (q.float().reshape(n, k // g, g) - zeros.float().unsqueeze(-1)) * scales.float().unsqueeze(-1)
    return w.reshape(n, k).to(dtype or scales.dtype)


@torch.no_grad()
def pseudo_quantize_int4(w: torch.Tensor, group_size: int = 128, zero_point: bool = True,
                         name: str = "weight") -> torch.Tensor:
    """Simulated quantization: quantize then dequantize, same shape and dtype as w."""
    q, s, z = quantize_int4(w, group_size, zero_point, name)
    return dequantize_int4(q, s, z, group_size, dtype=w.dtype)


def sqnr_db(x: torch.Tensor, y: torch.Tensor) -> float:
    """Signal to quantization-noise ratio 20*log10(|x| / |x - y|) in dB (torchao's metric)."""
    x, y = x.float(), y.float()
    return float(20 * torch.log10(x.norm() / (x - y).norm().clamp(min=1e-30)))
