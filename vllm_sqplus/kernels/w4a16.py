"""The W4A16 API: backend choice, packing, matmul and the W4A16Linear module (see __init__)."""
from __future__ import annotations

import torch
from torch import nn

from vllm_sqplus.errors import SqplusError
from vllm_sqplus.kernels import ops
from vllm_sqplus.quant import check_group_size, dequantize_int4

__all__ = ["BACKENDS", "available_backends", "resolve_backend", "pack_weights", "w4a16_matmul",
           "W4A16Linear"]

BACKENDS = ("reference", "sqplus")
_ACT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# keys of the packed dict per backend (the same three tensors, named for what they hold)
_KEYS = {"reference": ("q", "scales", "zeros"), "sqplus": ("qweight", "scales", "zeros")}


def available_backends(device: str | torch.device | None = None) -> list[str]:
    """Backends that can run: "reference" always; "sqplus" when the compiled ops load (and, when a
    device is given, have a kernel for that device type)."""
    dev = None if device is None else torch.device(device).type
    ok = ops.LOADED if dev is None else ops.has_kernel(dev)
    return ["reference", "sqplus"] if ok else ["reference"]


def resolve_backend(backend: str, device: str | torch.device) -> str:
    """"auto" -> "sqplus" when compiled for `device`, else "reference" (warning once per process and
    device type); an explicit backend is checked and returned; "sqplus" unavailable raises."""
    dev = torch.device(device).type
    if backend == "auto":
        if ops.has_kernel(dev):
            return "sqplus"
        ops.warn_missing_once(dev, ops.LOAD_ERROR or f"the extension was built without a {dev} kernel")
        return "reference"
    if backend not in BACKENDS:
        raise SqplusError(f"unknown W4A16 backend '{backend}'; choose auto, {', '.join(BACKENDS)}")
    if backend == "sqplus" and not ops.has_kernel(dev):
        why = ops.LOAD_ERROR or f"the extension has no {dev} kernel"
        raise SqplusError(f"W4A16 backend 'sqplus' is not available on device '{dev}': {why}")
    return backend


def _check_quantized(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                     group_size: int) -> None:
    if q.dim() != 2 or q.dtype != torch.uint8:
        raise SqplusError(f"pack_weights: q must be uint8 [N, K], got {q.dtype} {tuple(q.shape)}")
    n, k = q.shape
    g = check_group_size(k, group_size, "pack_weights")
    want = (n, k // g)
    if tuple(scales.shape) != want or not scales.is_floating_point():
        raise SqplusError(f"pack_weights: scales must be floating {list(want)} for q {list(q.shape)} "
                          f"and group_size {group_size}, got {scales.dtype} {tuple(scales.shape)}")
    if tuple(zeros.shape) != want or zeros.dtype != torch.uint8:
        raise SqplusError(f"pack_weights: zeros must be uint8 {list(want)}, got {zeros.dtype} "
                          f"{tuple(zeros.shape)}")
    if len({q.device, scales.device, zeros.device}) != 1:
        raise SqplusError(f"pack_weights: q, scales, zeros on different devices: "
                          f"{q.device}, {scales.device}, {zeros.device}")


def pack_weights(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                 backend: str = "auto") -> dict[str, torch.Tensor]:
    """Pack quantize_int4's (q, scales, zeros) for `backend`, on q's device.

    reference -> {"q", "scales", "zeros"} unchanged; sqplus -> {"qweight", "scales", "zeros"} in
    the device's packed layout (CPU: csrc/cpu/w4a16_cpu.h; scales/zeros there are [K/g, N]).
    """
    _check_quantized(q, scales, zeros, group_size)
    backend = resolve_backend(backend, q.device)
    if backend == "reference":
        return {"q": q, "scales": scales, "zeros": zeros}
    qweight, scales_p, zeros_p = torch.ops.sqplus.w4a16_pack(q, scales, zeros, group_size)
    return {"qweight": qweight, "scales": scales_p, "zeros": zeros_p}


def _backend_of(packed: dict[str, torch.Tensor]) -> str:
    for name, keys in _KEYS.items():
        if set(keys) <= set(packed):
            return name
    raise SqplusError(f"w4a16_matmul: packed dict has keys {sorted(packed)}; expected "
                      f"{_KEYS['reference']} or {_KEYS['sqplus']} (from pack_weights)")


def w4a16_matmul(x: torch.Tensor, packed: dict[str, torch.Tensor], group_size: int,
                 backend: str = "auto", bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ ((q - zeros) * scales).T + bias -> [..., N] in x.dtype, fp32 accumulation.

    `packed` comes from pack_weights with the same backend ("auto": the backend it was packed for).
    """
    kind = _backend_of(packed)
    if backend not in ("auto", kind):
        raise SqplusError(f"w4a16_matmul: weights were packed for '{kind}', asked to run '{backend}'")
    if x.dtype not in _ACT_DTYPES:
        raise SqplusError(f"w4a16_matmul: x must be float32, bfloat16 or float16, got {x.dtype} "
                          f"{tuple(x.shape)}")
    scales = packed["scales"]
    if kind == "reference":
        q = packed["q"]
        if x.shape[-1] != q.shape[1]:
            raise SqplusError(f"w4a16_matmul: x {tuple(x.shape)} has K = {x.shape[-1]}, weight is "
                              f"[N, K] = {tuple(q.shape)}")
        w = dequantize_int4(q, scales, packed["zeros"], group_size, torch.float32)  # [N, K]
        y = x.float() @ w.T
        if bias is not None:
            y = y + bias.float()
        return y.to(x.dtype)
    n = scales.shape[1]  # [K/g, N] on every device
    if bias is not None and tuple(bias.shape) != (n,):
        raise SqplusError(f"w4a16_matmul: bias must be [N] = [{n}], got {tuple(bias.shape)}")
    return torch.ops.sqplus.w4a16_gemm(x, packed["qweight"], scales, packed["zeros"], group_size,
                                       bias)


class W4A16Linear(nn.Module):
    """A linear layer with INT4 group-wise weights: y = x @ ((q - zeros) * scales).T + bias.

    The packed tensors are buffers in the backend's layout for the device they were packed on:
    build the module on its final device (from_quantized with tensors already there).
    """

    def __init__(self, packed: dict[str, torch.Tensor], in_features: int, out_features: int,
                 group_size: int, backend: str, bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.group_size, self.backend = group_size, backend
        self._keys = tuple(packed)
        for name, t in packed.items():
            self.register_buffer(name, t)
        self.register_buffer("bias", bias)

    @classmethod
    def from_quantized(cls, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                       group_size: int, bias: torch.Tensor | None = None,
                       backend: str = "auto") -> "W4A16Linear":
        """Pack quantize_int4's output (q uint8 [N, K], scales [N, K/g], zeros uint8 [N, K/g])."""
        backend = resolve_backend(backend, q.device)
        packed = pack_weights(q, scales, zeros, group_size, backend)
        n, k = q.shape
        if bias is not None and tuple(bias.shape) != (n,):
            raise SqplusError(f"W4A16Linear: bias must be [N] = [{n}], got {tuple(bias.shape)}")
        return cls(packed, k, n, group_size, backend, bias)

    def _apply(self, fn, recurse=True):
        # why: model.to(torch.bfloat16) / .half() would cast the packed tensors too (float32 scales,
        # int32 codes) and break the layout; they keep their dtype and follow only device moves
        keep = {id(getattr(self, k)) for k in self._keys}

        def fn_keep_dtype(t):
            if id(t) not in keep:
                return fn(t)
            r = fn(t)
            return r if r.dtype == t.dtype else t.to(device=r.device)
        return super()._apply(fn_keep_dtype, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = {name: getattr(self, name) for name in self._keys}
        return w4a16_matmul(x, packed, self.group_size, self.backend, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.group_size}, backend={self.backend}, bias={self.bias is not None}")
