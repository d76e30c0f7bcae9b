"""The CPU packed layout in plain PyTorch: a twin of csrc/cpu's w4a16_pack, for exact tests.

qweight int32 [ceil(N/64), ceil(K/8), 64]; qweight[t, c, l] bits 4j..4j+3 = q[t*64 + l, c*8 + o]
with o = (0, 2, 4, 6, 1, 3, 5, 7)[j]: even k's of the chunk in the low half-word, odd ones in the
high (padding: code 0). Why this interleave and this nibble order: csrc/cpu/w4a16_cpu.h.
"""
from __future__ import annotations

import torch

from vllm_sqplus.kernels.ops import CHUNK_K, TILE_N

__all__ = ["pack_cpu_reference", "unpack_cpu", "quantize_act_int16", "dequantize_act_int16"]

# bit offset of the code of k offset o (0..7) in its int32: nibble j = (0, 4, 1, 5, 2, 6, 3, 7)[o]
_SHIFTS = 4 * torch.tensor([0, 4, 1, 5, 2, 6, 3, 7], dtype=torch.int64)


def pack_cpu_reference(q: torch.Tensor) -> torch.Tensor:
    """q uint8 [N, K] in 0..15 -> qweight int32 [ceil(N/64), ceil(K/8), 64]."""
    n, k = q.shape
    nt, kc = -(-n // TILE_N), -(-k // CHUNK_K)
    qp = torch.zeros(nt * TILE_N, kc * CHUNK_K, dtype=torch.int64)
    qp[:n, :k] = q.to(torch.int64)                                    # [Nt*64, K8] zero-padded
    qp = qp.view(nt, TILE_N, kc, CHUNK_K).permute(0, 2, 1, 3)         # [Nt, K8/8, 64, 8]
    words = (qp << _SHIFTS).sum(-1)                                    # [Nt, K8/8, 64] in 0..2^32-1
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # same bits as uint32


def unpack_cpu(qweight: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """qweight int32 [ceil(N/64), ceil(K/8), 64] -> q uint8 [N, K] (the inverse of packing)."""
    nt, kc, _ = qweight.shape
    words = qweight.to(torch.int64) & 0xFFFFFFFF                      # [Nt, K8/8, 64] unsigned
    nib = (words.unsqueeze(-1) >> _SHIFTS) & 0xF                       # [Nt, K8/8, 64, 8]
    q = nib.permute(0, 2, 1, 3).reshape(nt * TILE_N, kc * CHUNK_K)     # [Nt*64, K8]
    return q[:n, :k].to(torch.uint8)


def quantize_act_int16(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The int16 kernels' activations (VNNI and AVX2: csrc/cpu/w4a16_cpu.cpp, quantize_rows_int16),
    bit for bit.

    x [M, K] (bfloat16/float16) and the kernel's group length (`group`, or K rounded up to 8 for
    per-channel) -> (xq int16 [M, K], xscale float32 [M, G]) with xq = round_half_even(x * (qmax /
    amax)) in float32 and xscale = amax / qmax per row and group, amax = max|x| over the group,
    qmax = min(32767, (2^31 - 1) // (15 * group)); an all-zero group has scale 0 and codes 0, a
    group with a NaN or an infinity scale NaN and codes 0; the factor qmax / amax is clamped to
    float32's max (tiny groups). x is approximated by xscale * xq.
    """
    m, k = x.shape
    qmax = float(min(32767, (2**31 - 1) // (15 * group)))
    g = -(-k // group)
    xp = torch.zeros(m, g * group, dtype=torch.float32)
    xp[:, :k] = x.float()
    xg = xp.view(m, g, group)
    bad = ~torch.isfinite(xg).all(-1)                      # a NaN or an infinity in the group
    xg = torch.where(bad.unsqueeze(-1), torch.zeros_like(xg), xg)
    amax = xg.abs().amax(-1)
    inv = torch.where(amax > 0, (torch.tensor(qmax, dtype=torch.float32) / amax).clamp(
        max=torch.finfo(torch.float32).max), torch.zeros_like(amax))
    xq = (xg * inv.unsqueeze(-1)).round().to(torch.int16).view(m, -1)[:, :k]
    scale = torch.where(bad, torch.full_like(amax, float("nan")), amax / qmax)
    return xq, scale


def dequantize_act_int16(xq: torch.Tensor, xscale: torch.Tensor, group: int,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """xscale * xq per group (quantize_act_int16's outputs and group) -> [M, K] in dtype: the
    activations the VNNI kernel multiplies."""
    m, k = xq.shape
    g = xscale.shape[1]
    xp = torch.zeros(m, g * group, dtype=dtype)
    xp[:, :k] = xq.to(dtype)
    return (xp.view(m, g, group) * xscale.to(dtype).unsqueeze(-1)).view(m, -1)[:, :k]
