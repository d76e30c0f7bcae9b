"""The W4A16 API: packing, matmul and the W4A16Linear module (see __init__); the backends
themselves, and the choice among them, are in backends.py."""
from __future__ import annotations

import torch
from torch import nn

from vllm_sqplus.errors import SqplusError
from vllm_sqplus.kernels import ops
from vllm_sqplus.config import check_group_size_supported
from vllm_sqplus.kernels.backends import (ACT_DTYPES, REFERENCE, W4A16Backend, choose_backend,
                                          get_backend, warn_fallback_once)

__all__ = ["BACKENDS", "available_backends", "resolve_backend", "pack_weights", "w4a16_matmul",
           "W4A16Linear"]

BACKENDS = ("reference", "sqplus")


def available_backends(device: str | torch.device | None = None) -> list[str]:
    """Backends that can run: "reference" always; "sqplus" when the compiled ops load (and, when a
    device is given, have a kernel for that device type)."""
    dev = None if device is None else torch.device(device).type
    ok = ops.LOADED if dev is None else ops.has_kernel(dev)
    return ["reference", "sqplus"] if ok else ["reference"]


def resolve_backend(backend: str, device: str | torch.device) -> str:
    """"auto" -> "sqplus" when compiled for `device`, else "reference" (warning once per process and
    device type); an explicit backend is checked and returned; "sqplus" unavailable raises.
    (The name of get_backend's object; callers that run kernels should keep the object.)"""
    return get_backend(backend, device).config_name


def _check_quantized(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                     group_size: int) -> None:
    if q.dim() != 2 or q.dtype != torch.uint8:
        raise SqplusError(f"pack_weights: q must be uint8 [N, K], got {q.dtype} {tuple(q.shape)}")
    n, k = q.shape
    g = check_group_size_supported(k, group_size, "pack_weights")
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
                 backend: str | W4A16Backend = "auto") -> dict[str, torch.Tensor]:
    """Pack quantize_int4's (q, scales, zeros) for `backend` (a name or a backend object), on q's
    device. reference -> {"q", "scales", "zeros"} unchanged; sqplus -> {"qweight", "scales",
    "zeros"} in the device's packed layout (CPU: csrc/cpu/w4a16_cpu.h; scales/zeros there are
    [K/g, N])."""
    _check_quantized(q, scales, zeros, group_size)
    return get_backend(backend, q.device).pack(q, scales, zeros, group_size)


def w4a16_matmul(x: torch.Tensor, packed: dict[str, torch.Tensor], group_size: int,
                 backend: str | W4A16Backend = "auto", bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ ((q - zeros) * scales).T + bias -> [..., N] in x.dtype, fp32 accumulation.

    `packed` comes from pack_weights with the same backend: the same object, or the same name on
    the same device type ("auto" means the same choice there as in pack_weights).
    """
    b = get_backend(backend, x.device)
    if x.dtype not in ACT_DTYPES:
        raise SqplusError(f"w4a16_matmul: x must be float32, bfloat16 or float16, got {x.dtype} "
                          f"{tuple(x.shape)}")
    if not set(b.keys) <= set(packed):
        raise SqplusError(f"w4a16_matmul: packed holds {sorted(packed)}, but backend '{b.name}' "
                          f"runs on {list(b.keys)}: pack and run with the same backend")
    if b is REFERENCE:
        if x.shape[-1] != packed["q"].shape[1]:
            raise SqplusError(f"w4a16_matmul: x {tuple(x.shape)} has K = {x.shape[-1]}, weight is "
                              f"[N, K] = {tuple(packed['q'].shape)}")
    else:
        n = packed["scales"].shape[1]  # [K/g, N] on every device
        if bias is not None and tuple(bias.shape) != (n,):
            raise SqplusError(f"w4a16_matmul: bias must be [N] = [{n}], got {tuple(bias.shape)}")
    return b.apply(x, packed, group_size, bias)


class W4A16Linear(nn.Module):
    """A linear layer with INT4 group-wise weights: y = x @ ((q - zeros) * scales).T + bias.

    The packed tensors are buffers in the backend's layout for the device they were packed on:
    build the module on its final device (from_quantized with tensors already there).
    `backend` is the backend object that packed them (a name is resolved with get_backend).
    """

    def __init__(self, packed: dict[str, torch.Tensor], in_features: int, out_features: int,
                 group_size: int, backend: str | W4A16Backend, bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        device = next(iter(packed.values())).device if packed else "cpu"
        self.group_size, self.backend = group_size, get_backend(backend, device)
        self._keys = tuple(packed)
        for name, t in packed.items():
            self.register_buffer(name, t)
        self.register_buffer("bias", bias)

    @classmethod
    def from_quantized(cls, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                       group_size: int, bias: torch.Tensor | None = None,
                       backend: str | W4A16Backend = "auto") -> "W4A16Linear":
        """Pack quantize_int4's output (q uint8 [N, K], scales [N, K/g], zeros uint8 [N, K/g]) for
        the backend chosen for this shape (choose_backend; "auto" warns once when it falls back)."""
        _check_quantized(q, scales, zeros, group_size)
        n, k = q.shape
        choice = choose_backend(backend, n=n, k=k, group=group_size, act_dtype=None,
                                device=q.device, what="W4A16Linear")
        warn_fallback_once(choice, q.device.type)
        backend = choice.backend
        packed = backend.pack(q, scales, zeros, group_size)
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
                f"group_size={self.group_size}, backend={self.backend!r}, bias={self.bias is not None}")
