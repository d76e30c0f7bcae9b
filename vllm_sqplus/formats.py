"""INT4 checkpoint formats of other tools <-> our reference form (q, scales, zeros); pure torch.

Our reference form (quant.py): q uint8 [N, K] codes 0..15, scales [N, K/g], zeros uint8 [N, K/g],
w_hat = (q - zeros) * scales; symmetric = zeros 8. Every format below stores exactly that
arithmetic with other names, packing and offsets:

compressed-tensors "pack-quantized" (llm-compressor W4A16; vLLM, transformers load it)
  <linear>.weight_packed      int32 [N, ceil(K/8)]   8 codes per word along K, k = 8j + i at bits 4i
  <linear>.weight_scale       [N, K/g]  (channel strategy, group_size -1: [N, 1])
  <linear>.weight_zero_point  int32 [ceil(N/8), K/g] asymmetric only; 8 zeros per word along N
  <linear>.weight_shape       int64 [2] = (N, K)
  compressed-tensors' integers are signed: code_ct = q - 8 in -8..7, zero_ct = zeros - 8; its
  pack_to_int32 adds the offset 8 back before packing, so the stored nibbles are our q and zeros
  unchanged. Dequantization (q_ct - zero_ct) * scale = (q - zeros) * scale; symmetric stores no
  zero point (q_ct * scale, our zeros = 8). Zero points round alike: compressed-tensors'
  qmin - round(min / scale) = -8 + round(-min / scale) = ours - 8 (torch.round is symmetric).

Words hold nibbles as unsigned 32-bit patterns; torch has no uint32 arithmetic, so packing goes
through int64 and wraps into int32 (the same bits).
"""
from __future__ import annotations

import torch

from vllm_sqplus.errors import SqplusError

__all__ = ["pack_int4_words", "unpack_int4_words", "ct_pack_linear", "ct_unpack_linear",
           "ct_quantization_config", "CT_FORMAT", "CT_QUANT_METHOD"]

CT_QUANT_METHOD = "compressed-tensors"
CT_FORMAT = "pack-quantized"
_SHIFTS = 4 * torch.arange(8, dtype=torch.int64)


def pack_int4_words(v: torch.Tensor, dim: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """uint8 codes 0..15, 2-D -> int32 with 8 codes per word along `dim` (zero-padded to 8).

    Word j holds element 8j + order[i] at bits 4i (order None: 0..7, i.e. plain ascending)."""
    if v.dim() != 2:
        raise SqplusError(f"pack_int4_words: expected a 2-D tensor, got shape {tuple(v.shape)}")
    x = v.to(torch.int64) & 0xF
    if dim == 0:
        x = x.T
    rows, cols = x.shape
    pad = -cols % 8
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    x = x.reshape(rows, -1, 8)                                    # [rows, words, 8]
    if order is not None:
        x = x[:, :, list(order)]
    words = (x << _SHIFTS).sum(-1)                                # [rows, words] in 0..2^32-1
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return (words.T if dim == 0 else words).contiguous()


def unpack_int4_words(w: torch.Tensor, dim: int, size: int,
                      order: tuple[int, ...] | None = None) -> torch.Tensor:
    """Inverse of pack_int4_words: int32 words -> uint8 codes, `size` elements along `dim`."""
    if w.dtype != torch.int32 or w.dim() != 2:
        raise SqplusError(f"unpack_int4_words: expected int32 2-D words, got {w.dtype} {tuple(w.shape)}")
    x = w.T if dim == 0 else w
    rows, nwords = x.shape
    if not (nwords - 1) * 8 < size <= nwords * 8:
        raise SqplusError(f"unpack_int4_words: {nwords} words along dim {dim} cannot hold {size} values")
    nib = ((x.to(torch.int64) & 0xFFFFFFFF).unsqueeze(-1) >> _SHIFTS) & 0xF   # [rows, words, 8]
    if order is not None:  # nibble i holds element order[i]: put it back in place
        inv = [0] * 8
        for i, o in enumerate(order):
            inv[o] = i
        nib = nib[:, :, inv]
    out = nib.reshape(rows, nwords * 8)[:, :size].to(torch.uint8)
    return (out.T if dim == 0 else out).contiguous()


# ---- compressed-tensors pack-quantized ----------------------------------------------------------
def ct_pack_linear(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                   zero_point: bool) -> dict[str, torch.Tensor]:
    """Our (q, scales, zeros) -> a linear's compressed-tensors tensors (names without the prefix)."""
    n, k = q.shape
    out = {"weight_packed": pack_int4_words(q, dim=1),
           "weight_scale": scales.contiguous(),
           "weight_shape": torch.tensor([n, k], dtype=torch.int64)}
    if zero_point:
        out["weight_zero_point"] = pack_int4_words(zeros, dim=0)
    return out


def ct_unpack_linear(t: dict[str, torch.Tensor], name: str = "linear"
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """A linear's compressed-tensors tensors -> (q, scales, zeros, group_size) in our form."""
    for key in ("weight_packed", "weight_scale"):
        if key not in t:
            raise SqplusError(f"compressed-tensors checkpoint: {name} has no {key}")
    scales = t["weight_scale"]
    if "weight_shape" in t:
        n, k = (int(x) for x in t["weight_shape"].tolist())
    else:
        n, k = t["weight_packed"].shape[0], t["weight_packed"].shape[1] * 8
    if scales.dim() != 2 or scales.shape[0] != n or k % scales.shape[1]:
        raise SqplusError(f"compressed-tensors checkpoint: {name}: weight_scale {tuple(scales.shape)} "
                          f"does not fit weight_shape ({n}, {k})")
    q = unpack_int4_words(t["weight_packed"], dim=1, size=k)
    if q.shape[0] != n:
        raise SqplusError(f"compressed-tensors checkpoint: {name}: weight_packed has {q.shape[0]} rows, "
                          f"weight_shape says {n}")
    zp = t.get("weight_zero_point")
    zeros = (torch.full(scales.shape, 8, dtype=torch.uint8) if zp is None
             else unpack_int4_words(zp, dim=0, size=n))
    if tuple(zeros.shape) != tuple(scales.shape):
        raise SqplusError(f"compressed-tensors checkpoint: {name}: weight_zero_point unpacks to "
                          f"{tuple(zeros.shape)}, weight_scale is {tuple(scales.shape)}")
    group = k // scales.shape[1]
    return q, scales, zeros, (-1 if group == k else group)


def ct_quantization_config(group_size: int, zero_point: bool, ignore: list[str],
                           version: str | None = None) -> dict:
    """config.json's quantization_config for a W4A16 pack-quantized checkpoint, the way
    compressed-tensors' ModelCompressor.update_config writes it (QuantizationConfig.model_dump)."""
    if version is None:
        try:
            import compressed_tensors
            version = compressed_tensors.__version__
        except ImportError:
            version = "0.17.0"
    weights = {"num_bits": 4, "type": "int", "symmetric": not zero_point,
               "group_size": None if group_size == -1 else group_size,
               "strategy": "channel" if group_size == -1 else "group",
               "block_structure": None, "dynamic": False, "actorder": None, "scale_dtype": None,
               "zp_dtype": "torch.int8" if zero_point else None,
               "observer": "minmax", "observer_kwargs": {}}
    return {"config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                          "input_activations": None, "output_activations": None,
                                          "format": CT_FORMAT}},
            "format": CT_FORMAT, "global_compression_ratio": None, "ignore": list(ignore),
            "kv_cache_scheme": None, "quant_method": CT_QUANT_METHOD,
            "quantization_status": "compressed", "sparsity_config": {}, "transform_config": {},
            "version": version}
