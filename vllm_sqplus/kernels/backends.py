"""W4A16 kernel backends: one object per kernel, owning its shape rules, packed layout and GEMM.

The model is vLLM's MPLinearKernel. Every backend has
  name                                          "reference" | "cpu" | "cuda" | "vllm"
  config_name                                   the kernel_backend value that selects it
                                                ("sqplus" = our compiled kernel for the device)
  can_implement(n, k, group, act_dtype, device) -> (ok, why not)   no tensors touched
  pack(q, scales, zeros, group) -> dict          the tensors a layer keeps, in the backend's layout
  apply(x, packed, group, bias=None) -> y        x @ ((q - zeros) * scales).T + bias, in x.dtype
q, scales, zeros are quantize_int4's: q uint8 [N, K], scales [N, K/g], zeros uint8 [N, K/g].

  ReferenceBackend  dequantize_int4 + matmul in float32, any device: the ground truth
  CpuBackend        csrc/cpu: AMX > AVX-512 VNNI > AVX-512 > AVX2+FMA > scalar, chosen once when the
                    object is built (env SQPLUS_CPU_ISA=scalar|avx2|avx512|avx512vnni|amx forces one,
                    read there, once)
  CudaBackend       csrc/cuda: sm_80+, N % 64 == 0, group % 32 == 0; rows decide stream kernel vs
                    dequantize + cuBLAS (env SQPLUS_CUDA_DEQUANT_M moves the threshold, read once)
  VllmMPBackend     vLLM's own mixed-precision kernels (kernels/vllm_mp.py, built by the plugin)

choose_backend is the one place a kernel_backend value becomes a backend for a layer shape; apply
never looks at strings, dict keys or the environment again. Every backend honours the group-size
rule of vllm_sqplus.config (GROUP_SIZES) before its own.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch

from vllm_sqplus.config import group_size_supported
from vllm_sqplus.errors import SqplusError
from vllm_sqplus.kernels import ops
from vllm_sqplus.quant import dequantize_int4

__all__ = ["W4A16Backend", "ReferenceBackend", "CpuBackend", "CudaBackend", "Choice",
           "choose_backend", "get_backend", "ACT_DTYPES", "CPU_ISAS", "ENV_CPU_ISA",
           "ENV_CUDA_DEQUANT_M"]

ACT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ENV_CPU_ISA = "SQPLUS_CPU_ISA"
ENV_CUDA_DEQUANT_M = "SQPLUS_CUDA_DEQUANT_M"
# the `kernel` argument of sqplus::w4a16_gemm on the CPU (csrc/ops.cpp); 0 would be "best"
# avx2: int16 activations (per row and group, as avx512vnni) times the codes with vpmaddwd for
# bfloat16/float16 x, FMA for float32 x (csrc/cpu/w4a16_avx2_int16.cpp, w4a16_avx2.cpp);
# avx512: FMA on float32 activations; avx512vnni: int16 activations (per row and group) times the
# codes with vpdpwssd for bfloat16/float16 x, FMA for float32 x (csrc/cpu/w4a16_vnni.cpp); amx:
# AMX-BF16 tiles for bfloat16 activations of 5+ rows (kAmxMinRows) whose groups are whole 32-k
# tile depths, avx512vnni for the rest (float16 at any row count) (csrc/cpu/w4a16_amx.cpp). Every CPU with one of them has all below it.
CPU_ISAS = {"scalar": 1, "avx2": 2, "avx512": 3, "avx512vnni": 4, "amx": 5}
CUDA_PATHS = {"auto": 0, "stream": 1, "dequant": 2}


def _common_rules(k: int, group: int, act_dtype) -> tuple[bool, str]:
    ok, why = group_size_supported(k, group, "K")
    if ok and act_dtype is not None and act_dtype not in ACT_DTYPES:
        return False, f"activations must be float32, bfloat16 or float16, got {act_dtype}"
    return ok, why


class W4A16Backend:
    """Interface (see the module docstring). Subclasses override all four methods."""

    name = "?"
    config_name = "?"
    keys: tuple[str, ...] = ()  # names of the tensors pack returns

    def can_implement(self, n: int, k: int, group: int, act_dtype: torch.dtype | None,
                      device: torch.device | str) -> tuple[bool, str]:
        raise NotImplementedError

    def pack(self, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
             group: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def apply(self, x: torch.Tensor, packed: dict[str, torch.Tensor], group: int,
              bias: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return self.name


class ReferenceBackend(W4A16Backend):
    """dequantize_int4 then x.float() @ W.T in float32, output cast to x.dtype (slow, exact)."""

    name = config_name = "reference"
    keys = ("q", "scales", "zeros")

    def can_implement(self, n, k, group, act_dtype, device):
        return _common_rules(k, group, act_dtype)

    def pack(self, q, scales, zeros, group):
        return {"q": q, "scales": scales, "zeros": zeros}

    def apply(self, x, packed, group, bias=None):
        w = dequantize_int4(packed["q"], packed["scales"], packed["zeros"], group, torch.float32)
        y = x.float() @ w.T  # [.., N]
        if bias is not None:
            y = y + bias.float()
        return y.to(x.dtype)


class CpuBackend(W4A16Backend):
    """sqplus::w4a16_pack / w4a16_gemm on CPU tensors (layout: csrc/cpu/w4a16_cpu.h).

    isa: "scalar" | "avx2" | "avx512" | "avx512vnni" | "amx" | "auto" (the best this CPU has); None reads SQPLUS_CPU_ISA
    (unset: auto). Checked here, once: an ISA this CPU lacks is an error now, not at the first GEMM.
    """

    name, config_name = "cpu", "sqplus"
    keys = ("qweight", "scales", "zeros")

    def __init__(self, isa: str | None = None):
        src = "isa"
        if isa is None:
            isa, src = os.environ.get(ENV_CPU_ISA) or "auto", ENV_CPU_ISA
        if isa != "auto" and isa not in CPU_ISAS:
            raise SqplusError(f"{src} must be one of {', '.join(CPU_ISAS)}, got {isa!r}")
        self.unavailable = None if ops.has_kernel("cpu") else (
            ops.LOAD_ERROR or "the extension was built without a CPU kernel")
        if self.unavailable:
            self.isa, self.code = isa, 0
            return
        best = int(torch.ops.sqplus.w4a16_cpu_isa())  # cpuid, in C++: the kernels' own test
        names = {v: k for k, v in CPU_ISAS.items()}
        if isa == "auto":
            isa = names[best]
        elif CPU_ISAS[isa] > best:
            raise SqplusError(f"{src}={isa}: this CPU has no {isa.upper()} (it has {names[best]})")
        self.isa, self.code = isa, CPU_ISAS[isa]

    def __repr__(self) -> str:
        return f"cpu({self.isa})"

    def can_implement(self, n, k, group, act_dtype, device):
        if torch.device(device).type != "cpu":
            return False, f"the CPU kernel runs on CPU tensors, not {torch.device(device).type}"
        if self.unavailable:
            return False, f"no compiled CPU kernel ({self.unavailable})"
        return _common_rules(k, group, act_dtype)

    def pack(self, q, scales, zeros, group):
        qweight, scales_p, zeros_p = torch.ops.sqplus.w4a16_pack(q, scales, zeros, group)
        return {"qweight": qweight, "scales": scales_p, "zeros": zeros_p}

    def apply(self, x, packed, group, bias=None):
        return torch.ops.sqplus.w4a16_gemm(x, packed["qweight"], packed["scales"], packed["zeros"],
                                           group, bias, self.code)


class CudaBackend(W4A16Backend):
    """sqplus::w4a16_pack / w4a16_gemm on CUDA tensors (layout: csrc/cuda/w4a16.cu).

    path: "auto" (by rows: stream kernel below `dequant_m` rows, dequantize + cuBLAS from there),
    "stream" or "dequant" (tests, benchmarks). dequant_m None reads SQPLUS_CUDA_DEQUANT_M once
    (unset: the kernel's own threshold, 17).
    """

    name, config_name = "cuda", "sqplus"
    keys = ("qweight", "scales", "zeros")
    MIN_CAPABILITY = (8, 0)  # mma.sync m16n8k16 with bf16; the kernel compiles to nothing below

    def __init__(self, path: str = "auto", dequant_m: int | None = None):
        if path not in CUDA_PATHS:
            raise SqplusError(f"CUDA path must be one of {list(CUDA_PATHS)}, got {path!r}")
        if dequant_m is None and os.environ.get(ENV_CUDA_DEQUANT_M):
            v = os.environ[ENV_CUDA_DEQUANT_M]
            if not v.isdigit() or int(v) < 1:
                raise SqplusError(f"{ENV_CUDA_DEQUANT_M} must be a positive integer, got {v!r}")
            dequant_m = int(v)
        self.path, self.code, self.dequant_m = path, CUDA_PATHS[path], dequant_m
        self.unavailable = None if ops.has_kernel("cuda") else (
            ops.LOAD_ERROR or "the extension was built without CUDA")

    def can_implement(self, n, k, group, act_dtype, device):
        dev = torch.device(device)
        if dev.type != "cuda":
            return False, f"the CUDA kernel runs on CUDA tensors, not {dev.type}"
        ok, why = _common_rules(k, group, act_dtype)
        if not ok:
            return ok, why
        g = k if group == -1 else group
        if g % 32:  # a batch of 8 k-steps of 16 must span at most 4 groups (the kernel's scale slots)
            return False, f"the CUDA kernel needs a group (K for -1) that is a multiple of 32, got {g}"
        if n % 64:
            return False, f"the CUDA kernel needs N a multiple of 64 (strips of 64 columns), got {n}"
        if self.unavailable:
            return False, f"no compiled CUDA kernel ({self.unavailable})"
        cap = tuple(torch.cuda.get_device_capability(dev))
        if cap < self.MIN_CAPABILITY:
            return False, f"the CUDA kernel needs sm_80 or newer (mma.sync), this GPU is sm_{cap[0]}{cap[1]}"
        return True, ""

    def pack(self, q, scales, zeros, group):
        qweight, scales_p, zeros_p = torch.ops.sqplus.w4a16_pack(q, scales, zeros, group)
        return {"qweight": qweight, "scales": scales_p, "zeros": zeros_p}

    def apply(self, x, packed, group, bias=None):
        code = self.code
        if code == 0 and self.dequant_m is not None:  # the env's threshold instead of the kernel's
            code = 2 if x.numel() // max(x.shape[-1], 1) >= self.dequant_m else 1
        return torch.ops.sqplus.w4a16_gemm(x, packed["qweight"], packed["scales"], packed["zeros"],
                                           group, bias, code)


REFERENCE = ReferenceBackend()
_OURS: dict[str, W4A16Backend] = {}  # device type -> our backend, built on first use


def ours(device_type: str) -> W4A16Backend | None:
    """Our compiled backend for a device type (one per process), None where we have none."""
    if device_type not in ("cpu", "cuda"):
        return None
    if device_type not in _OURS:
        _OURS[device_type] = CpuBackend() if device_type == "cpu" else CudaBackend()
    return _OURS[device_type]


@dataclass(frozen=True)
class Choice:
    """What choose_backend picked, and the (name, why not) of the backends tried before it."""
    backend: W4A16Backend
    fallbacks: tuple[tuple[str, str], ...] = ()

    def reason(self) -> str:
        return "; ".join(f"{name}: {why}" for name, why in self.fallbacks)


def choose_backend(want: str | W4A16Backend, *, n: int, k: int, group: int,
                   act_dtype: torch.dtype | None, device: torch.device | str,
                   vllm: W4A16Backend | None = None, what: str = "") -> Choice:
    """The backend for one layer (N outputs, K inputs, group size, activation dtype or None for
    any, device). want: "auto" (first that can implement it: ours for the device, `vllm` when
    given, the reference), "sqplus", "reference", "vllm" (needs `vllm`), or a backend object.
    An explicit backend that cannot implement the layer raises SqplusError with its reason."""
    device = torch.device(device)
    mine = ours(device.type)
    if isinstance(want, W4A16Backend):
        cands = [want]
    elif want == "auto":
        cands = [b for b in (mine, vllm, REFERENCE) if b is not None]
    elif want == "sqplus":
        cands = [mine]
    elif want == "reference":
        cands = [REFERENCE]
    elif want == "vllm":
        if vllm is None:
            raise SqplusError("kernel_backend=vllm: vLLM's own kernels are reached through the vLLM "
                              "plugin (LLM(..., quantization='smoothquant_plus'))")
        cands = [vllm]
    else:
        raise SqplusError(f"unknown W4A16 backend {want!r}; choose auto, sqplus, reference or vllm")
    tried: list[tuple[str, str]] = []
    for b in cands:
        if b is None:
            ok, why = False, f"vllm-sqplus has no compiled kernel for device '{device.type}'"
        else:
            ok, why = b.can_implement(n, k, group, act_dtype, device)
        if ok:
            return Choice(b, tuple(tried))
        tried.append((getattr(b, "name", "sqplus"), why))
    label = want if isinstance(want, str) else want.name
    raise SqplusError(f"kernel_backend={label} cannot run {what + ' ' if what else ''}(N={n}, K={k}, "
                      f"group {group}, {act_dtype}, {device.type}): {tried[-1][1]}"
                      + ("; use kernel_backend auto" if label != "auto" else ""))


_warned: set[str] = set()


def warn_fallback_once(choice: Choice, device_type: str) -> None:
    """One RuntimeWarning per process and reason when "auto" passed over a faster backend."""
    if not choice.fallbacks:
        return
    msg = (f"vllm_sqplus: no W4A16 kernel for device '{device_type}' can run this ({choice.reason()}); "
           f"using {choice.backend.name}" + (" (dequantize + matmul, slow)"
                                             if choice.backend is REFERENCE else ""))
    if msg not in _warned:
        _warned.add(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def get_backend(backend: str | W4A16Backend, device: torch.device | str) -> W4A16Backend:
    """For the shape-free API (pack_weights, w4a16_matmul): "auto" -> our kernel for the device
    when compiled, else the reference (one warning); "sqplus" -> ours or an error; "reference";
    a backend object is returned as it is."""
    if isinstance(backend, W4A16Backend):
        return backend
    dev = torch.device(device)
    if backend == "reference":
        return REFERENCE
    if backend not in ("auto", "sqplus"):
        raise SqplusError(f"unknown W4A16 backend '{backend}'; choose auto, reference, sqplus")
    mine = ours(dev.type)
    why = (f"vllm-sqplus has no kernel for device '{dev.type}'" if mine is None
           else mine.unavailable)
    if not why:
        return mine
    if backend == "sqplus":
        raise SqplusError(f"W4A16 backend 'sqplus' is not available on device '{dev.type}': {why}")
    warn_fallback_once(Choice(REFERENCE, ((dev.type, why),)), dev.type)
    return REFERENCE
