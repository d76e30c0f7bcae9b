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

AutoAWQ "gemm" (quant_method "awq", version "gemm")
  qweight  int32 [K, N/8]   8 codes per word along N in AWQ's interleave: word j holds column
                            8j + AWQ_ORDER[i] at bits 4i, AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
  qzeros   int32 [K/g, N/8] zero points 0..15, same interleave
  scales   [K/g, N]         float16 usually
  w_hat = (q - zeros) * scales: our convention as is (transposed).
AutoGPTQ / GPTQModel (quant_method "gptq")
  qweight  int32 [K/8, N]   8 codes per word along K, k = 8j + i at bits 4i
  qzeros   int32 [K/g, N/8] 8 zero points per word along N, plain order
  scales   [K/g, N]
  g_idx    int32 [K]        group of input channel k (k // g unless desc_act reordered them)
  checkpoint_format "gptq" (v1, AutoGPTQ's default): the stored zero is zero - 1, so the zero
  used is stored + 1 (a true zero 0 was stored as -1, which overflows: such a checkpoint is
  refused); "gptq_v2" (GPTQModel) stores the zero itself. sym=True: the zero is 8 whatever is
  stored (vLLM's uint4b8). desc_act with a g_idx that is not k // g: the input channels are
  sorted by group (a permutation `perm`, each group exactly g channels), the codes are permuted
  along K once at load and the activations x[..., perm] at every forward (what Marlin does).

Words hold nibbles as unsigned 32-bit patterns; torch has no uint32 arithmetic, so packing goes
through int64 and wraps into int32 (the same bits).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from vllm_sqplus.errors import SqplusError

__all__ = ["pack_int4_words", "unpack_int4_words", "ct_pack_linear", "ct_unpack_linear",
           "ct_quantization_config", "CT_FORMAT", "CT_QUANT_METHOD", "AWQ_ORDER", "FOREIGN_METHODS",
           "ForeignFormat", "ParamSpec", "parse_foreign_config", "awq_pack_linear", "gptq_pack_linear"]

CT_QUANT_METHOD = "compressed-tensors"
CT_FORMAT = "pack-quantized"
_SHIFTS = 4 * torch.arange(8, dtype=torch.int64)
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
FOREIGN_METHODS = ("awq", "gptq", CT_QUANT_METHOD)


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
    words = (x << _SHIFTS.to(x.device)).sum(-1)                  # [rows, words] in 0..2^32-1
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
    nib = ((x.to(torch.int64) & 0xFFFFFFFF).unsqueeze(-1) >> _SHIFTS.to(x.device)) & 0xF  # [rows, words, 8]
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
    zeros = (torch.full(scales.shape, 8, dtype=torch.uint8, device=scales.device) if zp is None
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


# ---- AWQ / GPTQ packing (writers for tests and conversions; the readers are ForeignFormat.unpack) --
def awq_pack_linear(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> dict[str, torch.Tensor]:
    """Our (q [N, K], scales [N, K/g], zeros [N, K/g]) -> AutoAWQ GEMM's qweight, qzeros, scales."""
    return {"qweight": pack_int4_words(q.T, dim=1, order=AWQ_ORDER),
            "qzeros": pack_int4_words(zeros.T, dim=1, order=AWQ_ORDER),
            "scales": scales.T.contiguous()}


def gptq_pack_linear(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, *, v1: bool = True,
                     g_idx: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Our form -> AutoGPTQ's qweight [K/8, N], qzeros [K/g, N/8] (v1: zero - 1), scales, g_idx.

    g_idx given: q is in the checkpoint's channel order and scales/zeros are per group id."""
    n, k = q.shape
    z = zeros.to(torch.int16) - (1 if v1 else 0)
    if v1 and (z < 0).any():
        raise SqplusError("gptq v1 cannot store a zero point of 0 (it would be -1)")
    g = k // scales.shape[1]
    return {"qweight": pack_int4_words(q.T, dim=0),
            "qzeros": pack_int4_words(z.to(torch.uint8).T, dim=1),
            "scales": scales.T.contiguous(),
            "g_idx": (torch.arange(k, dtype=torch.int32) // g) if g_idx is None else g_idx.to(torch.int32)}


# ---- foreign checkpoints in the vLLM plugin ---------------------------------------------------------
@dataclass(frozen=True)
class ParamSpec:
    """One checkpoint tensor of a quantized linear, for vLLM's sharded loaders.

    shape: the partition's shape; dtype None = the model's dtype; dims index into shape (None: not
    split); packed_dim: the dim holding 8 codes per int32 (shard offsets are divided by 8 there);
    fill: initial value (a sentinel telling "not in the checkpoint")."""
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype | None
    input_dim: int | None
    output_dim: int | None
    packed_dim: int | None = None
    fill: int | None = None


def _bad(kind: str, what: str) -> SqplusError:
    return SqplusError(f"smoothquant_plus cannot serve this {kind} checkpoint: {what}")


@dataclass(frozen=True)
class ForeignFormat:
    """An AWQ / GPTQ / compressed-tensors W4A16 checkpoint our kernels can run (parse_foreign_config)."""
    kind: str                    # "awq" | "gptq" | "compressed-tensors"
    group_size: int              # -1: per channel
    zero_point: bool             # asymmetric
    gptq_v1: bool = False        # GPTQ zeros stored minus one
    act_order: bool = False      # GPTQ desc_act / compressed-tensors actorder "group": a g_idx
    skip: tuple[str, ...] = field(default_factory=tuple)

    def skips(self, prefix: str, fused: dict[str, list[str]] | None = None) -> bool:
        """True when the vLLM layer `prefix` stays in full precision (AWQ modules_to_not_convert:
        name fragments; compressed-tensors ignore: names or "re:" regexes, fused layers by shard)."""
        if self.kind == "awq":
            return any(m in prefix for m in self.skip)
        names = [prefix]
        leaf = prefix.rsplit(".", 1)[-1]
        if fused and leaf in fused:
            names = [prefix[: -len(leaf)] + s for s in fused[leaf]]

        def hit(name: str) -> bool:
            return any(re.match(e[3:], name) if e.startswith("re:") else e == name for e in self.skip)
        hits = [hit(n) for n in names]
        if any(hits) and not all(hits):
            raise _bad(self.kind, f"{prefix} fuses {names}, of which only some are in 'ignore'")
        return all(hits)

    def group(self, k: int) -> int:
        return k if self.group_size == -1 else self.group_size

    def params(self, n: int, k: int) -> list[ParamSpec]:
        """The partition's checkpoint tensors (N = sum of fused output shards, K = its input)."""
        ng = k // self.group(k)
        # per-channel scales / zeros (one group) are the same on every K slice: not split along K
        gk0 = None if self.group_size == -1 else 0
        gk1 = None if self.group_size == -1 else 1
        if self.kind == "awq":
            return [ParamSpec("qweight", (k, n // 8), torch.int32, 0, 1, 1),
                    ParamSpec("qzeros", (ng, n // 8), torch.int32, gk0, 1, 1),
                    ParamSpec("scales", (ng, n), None, gk0, 1)]
        if self.kind == "gptq":
            return [ParamSpec("qweight", (k // 8, n), torch.int32, 0, 1, 0),
                    ParamSpec("qzeros", (ng, n // 8), torch.int32, gk0, 1, 1),
                    ParamSpec("scales", (ng, n), None, gk0, 1),
                    ParamSpec("g_idx", (k,), torch.int32, 0, None, fill=-1)]
        specs = [ParamSpec("weight_packed", (n, -(-k // 8)), torch.int32, 1, 0, 1),
                 ParamSpec("weight_scale", (n, ng), None, gk1, 0),
                 ParamSpec("weight_shape", (2,), torch.int64, None, None)]
        if self.zero_point:
            specs.append(ParamSpec("weight_zero_point", (-(-n // 8), ng), torch.int32, gk1, 0, 0, fill=0))
        if self.act_order:
            specs.append(ParamSpec("weight_g_idx", (k,), torch.int32, 0, None, fill=-1))
        return specs

    def check_layer(self, n_shards: list[int], k: int, input_size: int, prefix: str) -> None:
        """Refuse, with the reason, a layer whose shards cannot be unpacked from this layout."""
        if any(s % 8 for s in n_shards):
            raise _bad(self.kind, f"layer {prefix}: output sizes {n_shards} are not multiples of 8 "
                                  f"(8 codes or zero points share an int32 along N)")
        if self.kind == "gptq" and k % 8:
            raise _bad(self.kind, f"layer {prefix}: in_features {k} is not a multiple of 8")
        if self.act_order and k != input_size:
            raise _bad(self.kind, f"layer {prefix}: act-order (desc_act / g_idx) with the input "
                                  f"dimension split across tensor-parallel ranks")

    @torch.no_grad()
    def unpack(self, t: dict[str, torch.Tensor], n: int, k: int, name: str = "linear"
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The layer's loaded tensors -> (q uint8 [N, K], scales [N, K/g], zeros uint8 [N, K/g],
        perm int64 [K] or None). With perm, q's columns are already in perm's order and the
        layer must compute x[..., perm] @ w_hat.T."""
        g = self.group(k)
        if self.kind == "compressed-tensors":
            t = dict(t)
            if self.zero_point is False:
                t.pop("weight_zero_point", None)
            t["weight_shape"] = torch.tensor([n, k], device="cpu")  # fused shards each stored their own shape
            q, scales, zeros, _ = ct_unpack_linear(t, name)
            g_idx = t.get("weight_g_idx")
        elif self.kind == "awq":
            q = unpack_int4_words(t["qweight"], dim=1, size=n, order=AWQ_ORDER).T
            zeros = unpack_int4_words(t["qzeros"], dim=1, size=n, order=AWQ_ORDER).T
            scales, g_idx = t["scales"].T, None
        else:
            q = unpack_int4_words(t["qweight"], dim=0, size=k).T
            scales, g_idx = t["scales"].T, t.get("g_idx")
            if self.zero_point:
                zeros = unpack_int4_words(t["qzeros"], dim=1, size=n).T
                if self.gptq_v1:
                    zeros = zeros + 1
                    if (zeros > 15).any():
                        raise _bad(self.kind, f"layer {name}: a zero point stored as 15 in a "
                                              f"checkpoint_format 'gptq' (v1) checkpoint means the "
                                              f"true zero 0 was written as -1, which corrupts the "
                                              f"packed zeros; convert it to gptq_v2 (GPTQModel)")
            else:
                zeros = torch.full(scales.shape, 8, dtype=torch.uint8, device=scales.device)
        perm = None
        if g_idx is not None and not bool((g_idx == -1).all()):
            g_idx = g_idx.to(torch.int64)
            if not torch.equal(g_idx, torch.arange(k, device=g_idx.device) // g):
                counts = torch.bincount(g_idx, minlength=k // g)
                if g_idx.min() < 0 or len(counts) != k // g or bool((counts != g).any()):
                    raise _bad(self.kind, f"layer {name}: its g_idx does not put exactly {g} input "
                                          f"channels in each of {k // g} groups")
                perm = torch.argsort(g_idx, stable=True)  # channels of group 0, then group 1, ...
                q = q[:, perm]
        return q.contiguous(), scales.contiguous(), zeros.to(torch.uint8).contiguous(), perm


def _ct_weights(qc: dict) -> dict:
    groups = qc.get("config_groups") or {}
    if not groups:
        raise _bad(CT_QUANT_METHOD, "no config_groups")
    schemes = list(groups.values())
    weights = [s.get("weights") for s in schemes]
    if any(w is None for w in weights) or any(w != weights[0] for w in weights):
        raise _bad(CT_QUANT_METHOD, "config_groups with different weight schemes (mixed precision)")
    for s in schemes:
        if s.get("input_activations") or s.get("output_activations"):
            raise _bad(CT_QUANT_METHOD, "quantized activations (only W4A16 weight-only is served)")
        fmt = s.get("format") or qc.get("format")
        if fmt != CT_FORMAT:
            raise _bad(CT_QUANT_METHOD, f"format {fmt!r} (only {CT_FORMAT!r})")
    return weights[0]


def parse_foreign_config(qc: dict) -> ForeignFormat:
    """config.json's quantization_config of an AWQ / GPTQ / compressed-tensors checkpoint ->
    ForeignFormat, or one SqplusError naming what this plugin cannot serve."""
    method = str(qc.get("quant_method", "")).lower()
    if method not in FOREIGN_METHODS:
        raise SqplusError(f"quant_method {method!r} is none of {list(FOREIGN_METHODS)}")
    if method == CT_QUANT_METHOD:
        w = _ct_weights(qc)
        bits, sym, strategy = w.get("num_bits"), w.get("symmetric", True), w.get("strategy")
        if w.get("type", "int") != "int":
            raise _bad(method, f"weights of type {w.get('type')!r} (only int)")
        if w.get("dynamic"):
            raise _bad(method, "dynamic weight quantization")
        if strategy not in ("group", "channel"):
            raise _bad(method, f"weight strategy {strategy!r} (group or channel)")
        g = -1 if strategy == "channel" else w.get("group_size")
        actorder = w.get("actorder")
        if actorder not in (None, "weight", "group", "static", "dynamic"):
            raise _bad(method, f"actorder {actorder!r}")
        fmt = ForeignFormat(method, g, zero_point=not sym, act_order=actorder in ("group", "dynamic"),
                            skip=tuple(qc.get("ignore") or ()))
    elif method == "awq":
        bits = qc.get("bits", qc.get("w_bit"))
        version = str(qc.get("version", "gemm")).lower()
        if version != "gemm":
            raise _bad(method, f"version {version!r} (only the GEMM packing)")
        if not qc.get("zero_point", True):
            raise _bad(method, "zero_point false")
        fmt = ForeignFormat(method, qc.get("group_size", qc.get("q_group_size")), zero_point=True,
                            skip=tuple(qc.get("modules_to_not_convert") or ()))
    else:
        bits = qc.get("bits")
        cf = str(qc.get("checkpoint_format", "gptq")).lower()
        if cf not in ("gptq", "gptq_v2"):
            raise _bad(method, f"checkpoint_format {cf!r} (gptq or gptq_v2)")
        if qc.get("dynamic"):
            raise _bad(method, "per-module 'dynamic' overrides")
        if qc.get("lm_head"):
            raise _bad(method, "a quantized lm_head")
        g = qc.get("group_size")
        fmt = ForeignFormat(method, g, zero_point=not qc.get("sym", True), gptq_v1=cf == "gptq",
                            act_order=bool(qc.get("desc_act")) and g != -1)
    if bits != 4:
        raise _bad(method, f"{bits}-bit weights (only 4-bit)")
    if isinstance(fmt.group_size, bool) or fmt.group_size not in (32, 64, 128, -1):
        raise _bad(method, f"group_size {fmt.group_size!r} (32, 64, 128 or -1)")
    return fmt
