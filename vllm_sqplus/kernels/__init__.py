"""W4A16 kernels: the Python API every caller uses (tests, benchmarks, the vLLM linear method).

  available_backends() -> ["reference"] + ["sqplus"] when the compiled ops load
  resolve_backend(backend, device)      "auto" -> "sqplus" where compiled for that device, else
                                        "reference" (one warning per process and device type)
  pack_weights(q, scales, zeros, group_size, backend) -> dict of tensors, on q's device
  w4a16_matmul(x, packed, group_size, backend, bias=None) -> x @ ((q - zeros) * scales).T + bias
  W4A16Linear.from_quantized(q, scales, zeros, group_size, bias=None, backend="auto")

q, scales, zeros are what vllm_sqplus.quant.quantize_int4 returns. Backends:
  reference  dequantize_int4 then matmul in float32, output cast to x.dtype (the ground truth)
  sqplus     torch.ops.sqplus.w4a16_pack / w4a16_gemm; the dispatcher picks the CPU or CUDA kernel
             by tensor device, and the packed layout is that device's (CPU: csrc/cpu/w4a16_cpu.h).
"""
from vllm_sqplus.kernels.w4a16 import (BACKENDS, W4A16Linear, available_backends, pack_weights,
                                       resolve_backend, w4a16_matmul)

__all__ = ["BACKENDS", "W4A16Linear", "available_backends", "pack_weights", "resolve_backend",
           "w4a16_matmul"]
