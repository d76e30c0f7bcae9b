"""W4A16 kernels: the Python API every caller uses (tests, benchmarks, the vLLM linear method).

Backends (backends.py; one object per kernel, vLLM's MPLinearKernel shape):
  ReferenceBackend / CpuBackend / CudaBackend (+ VllmMPBackend in vllm_mp.py, built by the plugin)
  each with can_implement(n, k, group, act_dtype, device) -> (ok, why), pack(...), apply(...)
  choose_backend(want, n=, k=, group=, act_dtype=, device=) -> Choice   per layer shape
  get_backend(want, device)                                            per device (no shape)

The functional API on top of them (stable):
  available_backends() -> ["reference"] + ["sqplus"] when the compiled ops load
  resolve_backend(backend, device)      "auto" -> "sqplus" where compiled for that device, else
                                        "reference" (one warning per process and device type)
  pack_weights(q, scales, zeros, group_size, backend) -> dict of tensors, on q's device
  w4a16_matmul(x, packed, group_size, backend, bias=None) -> x @ ((q - zeros) * scales).T + bias
  W4A16Linear.from_quantized(q, scales, zeros, group_size, bias=None, backend="auto")

q, scales, zeros are what vllm_sqplus.quant.quantize_int4 returns. Backend names:
  reference  dequantize_int4 then matmul in float32, output cast to x.dtype (the ground truth)
  sqplus     torch.ops.sqplus.w4a16_pack / w4a16_gemm: CpuBackend or CudaBackend by tensor device,
             in that device's packed layout (CPU: csrc/cpu/w4a16_cpu.h; CUDA: csrc/cuda/w4a16.cu)
"""
from vllm_sqplus.kernels.backends import (CpuBackend, CudaBackend, ReferenceBackend, W4A16Backend,
                                          choose_backend, get_backend)
from vllm_sqplus.kernels.w4a16 import (BACKENDS, W4A16Linear, available_backends, pack_weights,
                                       resolve_backend, w4a16_matmul)

__all__ = ["BACKENDS", "W4A16Linear", "available_backends", "pack_weights", "resolve_backend",
           "w4a16_matmul", "W4A16Backend", "ReferenceBackend", "CpuBackend", "CudaBackend",
           "choose_backend", "get_backend"]
