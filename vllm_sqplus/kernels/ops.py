"""Loading of the compiled ops (vllm_sqplus._C) and their fake (meta) implementations.

The shared ops are declared in csrc/ops.cpp (schemas) and implemented per device (csrc/cpu,
csrc/cuda):
  torch.ops.sqplus.w4a16_pack(q, scales, zeros, group_size) -> [qweight, scales_p, zeros_p]
  torch.ops.sqplus.w4a16_gemm(x, qweight, scales_p, zeros_p, group_size, bias=None, kernel=0) -> y
  torch.ops.sqplus.w4a16_cpu_isa() -> int   (CPU build: best `kernel` code this CPU supports)
Importing this module never fails: when the extension cannot be loaded, `LOAD_ERROR` says why;
the backends (backends.py) then report themselves unavailable and "auto" falls back to the
reference path with one warning.

The fake implementations let torch.compile / CUDA graphs trace the ops without running them. The
gemm's output shape needs no layout knowledge (scales_p is [K/g, N] on every device); the pack's
output shapes are each device's layout, looked up in PACKED_SHAPES (CPU and CUDA are declared
below; `register_packed_shape(device, fn)` declares a new device's).
"""
from __future__ import annotations

from typing import Callable

import torch

__all__ = ["LOADED", "LOAD_ERROR", "has_kernel", "register_packed_shape",
           "cpu_packed_shape", "PACKED_SHAPES", "TILE_N", "CHUNK_K"]

try:
    import vllm_sqplus._C  # noqa: F401  (loading the library runs the TORCH_LIBRARY registrations)
    LOADED, LOAD_ERROR = True, None
except Exception as e:  # ImportError, or an undefined symbol from a torch version mismatch
    LOADED, LOAD_ERROR = False, f"{type(e).__name__}: {e}"

TILE_N, CHUNK_K = 64, 8  # CPU layout constants (csrc/cpu/w4a16_cpu.h)

def has_kernel(device_type: str) -> bool:
    """True when sqplus::w4a16_gemm and w4a16_pack have an implementation for this device type."""
    if not LOADED:
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    if key is None:
        return False
    return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"sqplus::{op}", key)
               for op in ("w4a16_pack", "w4a16_gemm"))


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def cpu_packed_shape(n: int, k: int, groups: int,
                     scales_dtype: torch.dtype) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """CPU layout (csrc/cpu/w4a16_cpu.h): qweight int32 [ceil(N/64), ceil(K/8), 64],
    scales_p and zeros_p (= -zeros*scales) float32 [K/g, N]."""
    return [((_ceil_div(n, TILE_N), _ceil_div(k, CHUNK_K), TILE_N), torch.int32),
            ((groups, n), torch.float32), ((groups, n), torch.float32)]


def cuda_packed_shape(n: int, k: int, groups: int,
                      scales_dtype: torch.dtype) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """CUDA layout (csrc/cuda/w4a16.cu): qweight int32 [N/64, K/16, 128], scales_p [K/g, N] in the
    scales' dtype, zeros_p uint8 [K/g, N]."""
    return [((n // 64, k // 16, 128), torch.int32), ((groups, n), scales_dtype), ((groups, n), torch.uint8)]


# device type -> fn(N, K, K/g, scales dtype) -> [(shape, dtype)] for [qweight, scales_p, zeros_p]
PACKED_SHAPES: dict[str, Callable[..., list]] = {"cpu": cpu_packed_shape, "cuda": cuda_packed_shape}


def register_packed_shape(device_type: str, fn: Callable[..., list]) -> None:
    """Declare a device's packed shapes for the fake w4a16_pack (used under torch.compile)."""
    PACKED_SHAPES[device_type] = fn


def _register_fakes() -> None:
    @torch.library.register_fake("sqplus::w4a16_pack")
    def _pack_fake(q, scales, zeros, group_size):
        n, k = q.shape
        fn = PACKED_SHAPES.get(q.device.type)
        if fn is None:
            raise NotImplementedError(f"sqplus::w4a16_pack: no packed layout declared for device "
                                      f"'{q.device.type}' (ops.register_packed_shape)")
        return [q.new_empty(shape, dtype=dtype) for shape, dtype in fn(n, k, scales.shape[1], scales.dtype)]

    @torch.library.register_fake("sqplus::w4a16_gemm")
    def _gemm_fake(x, qweight, scales, zeros, group_size, bias=None, kernel=0):
        torch._check(x.dtype in (torch.float32, torch.bfloat16, torch.float16),
                     lambda: f"w4a16_gemm: x must be float32/bfloat16/float16, got {x.dtype}")
        return x.new_empty((*x.shape[:-1], scales.shape[1]))


if LOADED:
    try:
        _register_fakes()
    except RuntimeError as e:  # already registered (module reloaded): keep the first
        if "already" not in str(e):
            raise
