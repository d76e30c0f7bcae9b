"""lm_head quantization (the output projection hidden -> vocab), independent of the decoder linears.

Why: at batch-1 decode every token streams all weights once; Qwen2.5-Coder-0.5B's INT4 linears are
192 MiB but its lm_head (151936 x 896) is 545 MB in FP32, the largest single read per token.
llama.cpp reads a Q8_0 output layer. The embedding lookup stays as it is (full precision, a gather
of one row per token costs nothing); only the logits matmul uses the quantized copy.

Modes (config.json quantization_config "lm_head", env SQPLUS_LM_HEAD; vllm_sqplus.config):
  none   full precision (the default, as before)
  int8   per output channel (row), symmetric: w_hat[n, :] = q[n, :] * scale[n], q int8 in
         -127..127, scale = max|w[n, :]| / 127 stored in w's dtype (codes from the stored scale).
  int4   the decoder linears' own W4A16 scheme (vllm_sqplus.quant.quantize_int4 with the
         checkpoint's group_size and zero_point) run by the same kernel backends.

The plain-PyTorch references here (quantize_int8 / dequantize_int8 / pseudo_quantize_lm_head) are
the ground truth for the vLLM plugin (vllm_compat.SqplusLmHeadMethod), the transformers path and
benchmarks/accuracy.py. Int8Backend is the CPU/any-device int8 GEMM. No vLLM import here.

Int8 kernel choice (measured 2026-12-01, this 2-core AVX2 EPYC VM, 1 thread, loaded machine,
N=151936 K=896, ms per call, M=1 / M=16): F.linear fp32 57 / 321; torch._weight_int8pack_mm fp32
229 / 4300 (no fast fp32 path on AVX2), bf16 51 / 285 (F.linear bf16 48 / 553); row blocks of
int8 -> activation dtype + mm, scale on the output: 44 (1024 rows) / 266 (256 rows). Our INT4
kernel on the same shape: 16 / 120. So int8 here is the blocked path for float32 activations and
_weight_int8pack_mm for bf16/fp16; int4 is the fast option on this CPU (an int8 C++ kernel would be
needed for int8 to pay off).
"""
from __future__ import annotations

import torch

from vllm_sqplus.config import ENV_LM_HEAD, LM_HEAD_MODES, group_size_supported
from vllm_sqplus.errors import SqplusError
from vllm_sqplus.quant import QuantError, pseudo_quantize_int4

__all__ = ["LM_HEAD_MODES", "ENV_LM_HEAD", "quantize_int8", "dequantize_int8", "QuantizedLmHead",
           "pseudo_quantize_lm_head", "Int8Backend", "INT8"]

_MIN_ABS = 1e-8  # an all-zero row (vocab padding) gets a tiny positive scale, codes 0


@torch.no_grad()
def quantize_int8(w: torch.Tensor, name: str = "lm_head") -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (q int8 [N, K] in -127..127, scales [N] in w's dtype), per row, symmetric."""
    if w.dim() != 2:
        raise QuantError(f"{name}: expected a 2-D weight [N, K], got shape {tuple(w.shape)}")
    if not torch.isfinite(w).all():
        raise QuantError(f"{name}: weight contains NaN or Inf")
    scales = (w.float().abs().amax(dim=1).clamp(min=_MIN_ABS) / 127).to(w.dtype)  # [N]
    # codes from the scale as stored; a zero row's scale may underflow to 0 in float16 (codes 0)
    q = torch.round(w.float() / scales.float().clamp(min=1e-30).unsqueeze(1)).clamp(-127, 127).to(torch.int8)
    return q, scales


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """q * scales[:, None] in `dtype` (default: scales' dtype), float32 math."""
    return (q.float() * scales.float().unsqueeze(1)).to(dtype or scales.dtype)


@torch.no_grad()
def pseudo_quantize_lm_head(w: torch.Tensor, mode: str, group_size: int = 128,
                            zero_point: bool = True, name: str = "lm_head") -> torch.Tensor:
    """Simulated lm_head quantization: what the plugin's logits matmul multiplies by (same shape and
    dtype as w). mode "none" returns w itself."""
    if mode == "none":
        return w
    if mode == "int8":
        q, s = quantize_int8(w, name)
        return dequantize_int8(q, s, w.dtype)
    if mode == "int4":
        return pseudo_quantize_int4(w, group_size, zero_point, name)
    raise SqplusError(f"lm_head must be one of {list(LM_HEAD_MODES)}, got {mode!r}")


class Int8Backend:
    """W8A16 GEMM, per-row scales: y = (x @ q.T) * scales + bias, in x.dtype (fp32 accumulation on
    the float32 path). pack/apply shaped like the W4A16 backends (kernels/backends.py)."""

    name = config_name = "int8"
    keys = ("qweight", "scales")
    ROWS_FEW, ROWS_MANY = 1024, 256  # rows per block for M <= 4 / M > 4 (measured, see module doc)

    def can_implement(self, n, k, act_dtype, device) -> tuple[bool, str]:
        if act_dtype is not None and act_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return False, f"activations must be float32, bfloat16 or float16, got {act_dtype}"
        return True, ""

    def pack(self, q: torch.Tensor, scales: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"qweight": q.contiguous(), "scales": scales.contiguous()}

    def apply(self, x: torch.Tensor, packed: dict[str, torch.Tensor],
              bias: torch.Tensor | None = None) -> torch.Tensor:
        q, s = packed["qweight"], packed["scales"]
        lead, k = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, k)
        m = x2.shape[0]
        if x.dtype != torch.float32 and x.device.type == "cpu" and hasattr(torch, "_weight_int8pack_mm"):
            y = torch._weight_int8pack_mm(x2, q, s.to(x.dtype))
        else:
            # why blocks: converting the whole int8 matrix would materialise a full-precision copy
            # (the very bytes we avoid); a block of rows stays in cache between convert and mm
            rows = self.ROWS_FEW if m <= 4 else self.ROWS_MANY
            y = torch.empty(m, q.shape[0], dtype=torch.float32 if x.dtype == torch.float32 else x.dtype,
                            device=x.device)
            for i in range(0, q.shape[0], rows):
                torch.mm(x2, q[i:i + rows].to(x.dtype).T, out=y[:, i:i + rows])
            y.mul_(s.to(y.dtype))
        if bias is not None:
            y = y + bias.to(y.dtype)
        return y.to(x.dtype).reshape(*lead, q.shape[0])

    def __repr__(self) -> str:
        return "int8"


INT8 = Int8Backend()


class QuantizedLmHead(torch.nn.Module):
    """The transformers-path lm_head: nn.Linear(hidden, vocab, bias) -> int8 / int4 logits
    (the embedding, tied or not, keeps its full-precision weight). Built by from_linear."""

    def __init__(self, mode: str, inner: torch.nn.Module | None = None,
                 packed: dict[str, torch.Tensor] | None = None, bias: torch.Tensor | None = None,
                 in_features: int = 0, out_features: int = 0):
        super().__init__()
        self.mode, self.in_features, self.out_features = mode, in_features, out_features
        self.inner = inner  # int4: a W4A16Linear
        for name, t in (packed or {}).items():  # int8: qweight, scales
            self.register_buffer(name, t)
        self.register_buffer("bias", bias)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: torch.nn.Linear, mode: str, group_size: int = 128,
                    zero_point: bool = True, backend="auto", name: str = "lm_head") -> "QuantizedLmHead":
        w = linear.weight.data
        n, k = w.shape
        bias = None if linear.bias is None else linear.bias.data.clone()
        if mode == "int8":
            return cls(mode, packed=INT8.pack(*quantize_int8(w, name)), bias=bias, in_features=k,
                       out_features=n)
        if mode == "int4":
            from vllm_sqplus.kernels import W4A16Linear
            from vllm_sqplus.quant import quantize_int4
            ok, why = group_size_supported(k, group_size, "hidden size")
            if not ok:
                raise SqplusError(f"smoothquant_plus: lm_head int4: {why} (or use lm_head int8)")
            q, s, z = quantize_int4(w, group_size, zero_point, name=name)
            return cls(mode, inner=W4A16Linear.from_quantized(q, s, z, group_size, bias=bias, backend=backend),
                       in_features=k, out_features=n)
        raise SqplusError(f"lm_head must be int8 or int4 here, got {mode!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inner is not None:
            return self.inner(x)
        return INT8.apply(x, {"qweight": self.qweight, "scales": self.scales}, self.bias)

    def extra_repr(self) -> str:
        return f"mode={self.mode}, in_features={self.in_features}, out_features={self.out_features}"

