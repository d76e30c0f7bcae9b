"""Every vLLM import of vllm-sqplus lives here: the `smoothquant_plus` quantization method.

What vLLM sees
  SmoothQuantPlusConfig  (register_quantization_config("smoothquant_plus"))
      from_config(config.json's quantization_config)   smoothed or pre-quantized checkpoints
      SmoothQuantPlusConfig()                           `--quantization smoothquant_plus` on a plain
                                                        checkpoint: RTN INT4, one warning
      get_quant_method(layer, prefix)                   SqplusLinearMethod for every LinearBase not
                                                        in modules_to_not_convert; embeddings get
                                                        nothing from us (full precision); lm_head
                                                        (ParallelLMHead) gets SqplusLmHeadMethod
                                                        when the config's lm_head is int8 / int4
  SqplusLmHeadMethod
      the logits matmul (LogitsProcessor calls lm_head.quant_method.apply) on an int8 (per row) or
      int4 (our W4A16 backends) copy, quantized in process_weights_after_loading from the loaded
      full-precision weight, which lm_head then drops. Tied embeddings: tie_weights shares
      embed_tokens' weight as vLLM's default does, so the checkpoint loads into it once; dropping
      lm_head's reference leaves the embedding's lookup on the full-precision weight.
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
      The kernel: create_weights chooses a backend object once per layer
      (vllm_sqplus.kernels.choose_backend: our CPU/CUDA kernel, vLLM's own mixed-precision kernel
      (kernels/vllm_mp.py), or the reference dequantize + matmul; auto = the first that can
      implement the layer, one log line when it falls back; an explicit kernel_backend that cannot
      fails there with the reason). process_weights_after_loading calls backend.pack once on the
      unpacked (q uint8 [N, K], scales [N, K/g], zeros uint8 [N, K/g]); apply calls backend.apply.

Foreign INT4 checkpoints (AWQ GEMM, GPTQ v1/v2 sym/asym/desc_act, compressed-tensors W4A16
pack-quantized): served only when the user asks, `--quantization smoothquant_plus` (then
override_quantization_method claims them; without the flag vLLM's own methods keep them).
formats.py holds their layouts (ForeignFormat: parameters to register, unpack to our q/scales/
zeros, pure torch); here they become vLLM parameters with the same sharded loaders vLLM's own
AWQ/GPTQ/compressed-tensors methods use, then go through backend.pack like the rest. GPTQ
act-order: the codes are permuted along K at load, the activations at every forward (x[..., perm]).

Tensor parallelism: vLLM gives each rank its slice (column parallel: rows of N; row parallel:
columns of K). K per rank must be a multiple of the group (checked in create_weights, one clear
error at load). group_size -1 under row parallelism quantizes each rank's K slice per channel.
"""
from __future__ import annotations

import logging

import torch

from vllm_sqplus import QUANT_METHOD
from vllm_sqplus.config import SqplusConfig, group_size_supported, parse_config
from vllm_sqplus.errors import SqplusError
from vllm_sqplus.export import unpack_nibbles
from vllm_sqplus.formats import FOREIGN_METHODS, ForeignFormat, parse_foreign_config
from vllm_sqplus.kernels.backends import choose_backend
from vllm_sqplus.kernels.vllm_mp import VllmMPBackend
from vllm_sqplus.lm_head import INT8, quantize_int8
from vllm_sqplus.quant import quantize_int4

from vllm.logger import init_logger
from vllm.model_executor.layers.linear import LinearBase, LinearMethodBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
from vllm.model_executor.parameter import (BasevLLMParameter, ChannelQuantScaleParameter,
                                           GroupQuantScaleParameter, ModelWeightParameter,
                                           PackedColumnParameter, PackedvLLMParameter,
                                           RowvLLMParameter)

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

    def __init__(self, cfg: SqplusConfig | None = None, foreign: ForeignFormat | None = None):
        super().__init__()
        self.cfg = cfg if cfg is not None else parse_config(None)
        self.foreign = foreign  # an AWQ / GPTQ / compressed-tensors checkpoint (formats.py)
        if not self.cfg.smoothed and foreign is None:
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
        # sm_60+: below sm_80 our CUDA kernel's can_implement says no (mma.sync) and auto falls back
        # to vLLM's own kernels or the reference path (tests/test_kernels.py fakes an sm_75 GPU);
        # the CPU ignores it
        return 60

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # the config lives in config.json; none at all means plain RTN

    @classmethod
    def from_config(cls, config: dict) -> "SmoothQuantPlusConfig":
        if str(config.get("quant_method", "")).lower() in FOREIGN_METHODS:
            ff = parse_foreign_config(config)
            cfg = parse_config({"group_size": ff.group_size, "zero_point": ff.zero_point,
                                "format": "packed", "modules_to_not_convert": []})
            _warn_once("foreign", "smoothquant_plus: serving the %s checkpoint on our W4A16 kernels "
                       "(%s)", ff.kind, ff, level=logging.INFO)
            return cls(cfg, foreign=ff)
        return cls(parse_config(config))

    @classmethod
    def override_quantization_method(cls, hf_quant_cfg, user_quant, hf_config=None, **kw):
        """Claim smoothquant_plus checkpoints (with no flag too), and AWQ / GPTQ /
        compressed-tensors W4A16 ones only when the user asked for smoothquant_plus."""
        method = str(hf_quant_cfg.get("quant_method", "")).lower()
        if method == QUANT_METHOD and user_quant in (None, QUANT_METHOD):
            return QUANT_METHOD
        if method in FOREIGN_METHODS and user_quant == QUANT_METHOD:
            parse_foreign_config(hf_quant_cfg)  # one clear error now for what we cannot serve
            return QUANT_METHOD
        return None

    def get_checkpoint_weight_mapper(self):
        """vLLM drops every `.g_idx` by default (its kernels dropped act-order); GPTQ act-order
        checkpoints need theirs."""
        if self.foreign is not None and self.foreign.act_order:
            from vllm.model_executor.models.utils import WeightsMapper
            return WeightsMapper()
        return super().get_checkpoint_weight_mapper()

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        if isinstance(layer, ParallelLMHead):
            return None if self.cfg.lm_head == "none" else SqplusLmHeadMethod(self.cfg, prefix)
        if not isinstance(layer, LinearBase):
            return None  # embeddings, attention: full precision
        if self.foreign is not None:
            if self.foreign.skips(prefix, getattr(self, "packed_modules_mapping", None)):
                return UnquantizedLinearMethod()
        elif self.cfg.skip(prefix):
            return UnquantizedLinearMethod()
        return SqplusLinearMethod(self.cfg, prefix, self.foreign)


class SqplusLinearMethod(LinearMethodBase):
    """W4A16 linear: quantize-at-load (meta weight + online processing) or pre-quantized."""

    uses_meta_device: bool = True

    def __init__(self, cfg: SqplusConfig, prefix: str = "", foreign: ForeignFormat | None = None):
        self.cfg = cfg
        self.prefix = prefix
        self.foreign = foreign
        if cfg.prequantized or foreign is not None:
            self.uses_meta_device = False  # real tensors come from the checkpoint
        elif initialize_online_processing is None:  # pragma: no cover - old vLLM
            raise SqplusError("this vLLM has no online weight processing "
                              "(model_loader.reload.layerwise); quantize with `sqplus quantize` "
                              "and load the pre-quantized checkpoint")
        self.backend = None  # a backend object, chosen in create_weights once the shape is known

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
        self.backend = self._choose_backend(k, n, input_size, output_size, params_dtype)
        if self.foreign is not None:
            self._create_foreign_weights(layer, list(output_partition_sizes), k, input_size,
                                         params_dtype, weight_loader)
            return
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

    def _create_foreign_weights(self, layer, sizes, k, input_size, params_dtype, weight_loader):
        """Register the checkpoint's own tensors (formats.ForeignFormat.params) as vLLM parameters
        of the kinds vLLM's AWQ/GPTQ/compressed-tensors methods use, so its loaders shard them."""
        self.foreign.check_layer(sizes, k, input_size, self.prefix)
        for p in self.foreign.params(sum(sizes), k):
            data = (torch.empty(p.shape, dtype=p.dtype or params_dtype) if p.fill is None
                    else torch.full(p.shape, p.fill, dtype=p.dtype or params_dtype))
            kw = dict(data=data, weight_loader=weight_loader)
            if p.input_dim is not None and p.output_dim is not None:
                param = (PackedvLLMParameter(input_dim=p.input_dim, output_dim=p.output_dim,
                                             packed_dim=p.packed_dim, packed_factor=8, **kw)
                         if p.packed_dim is not None else
                         GroupQuantScaleParameter(input_dim=p.input_dim, output_dim=p.output_dim, **kw))
            elif p.output_dim is not None:
                param = (PackedColumnParameter(output_dim=p.output_dim, packed_dim=p.packed_dim,
                                               packed_factor=8, **kw)
                         if p.packed_dim is not None else ChannelQuantScaleParameter(output_dim=p.output_dim, **kw))
            elif p.input_dim is not None:
                param = RowvLLMParameter(input_dim=p.input_dim, **kw)
            else:
                param = BasevLLMParameter(**kw)
            layer.register_parameter(p.name, param)
        layer.sqplus_foreign_names = [p.name for p in self.foreign.params(sum(sizes), k)]

    def _check_shape(self, k: int, input_size: int) -> int:
        g = self.cfg.group_size
        what = "in_features"
        if k != input_size:
            tp = input_size // k if k and input_size % k == 0 else "?"
            what = f"K per tensor-parallel rank = {input_size} / {tp} ="
        ok, why = group_size_supported(k, g, what)
        if not ok:
            if k != input_size and "use group_size -1" in why:
                why += " or another tensor_parallel_size"
            raise SqplusError(f"smoothquant_plus: layer {self.prefix}: {why}")
        if k % 2:
            raise SqplusError(f"smoothquant_plus: layer {self.prefix}: in_features {k} is odd")
        return k if g == -1 else g

    def _choose_backend(self, k, n, input_size, output_size, params_dtype):
        device = torch.get_default_device() if hasattr(torch, "get_default_device") else torch.device("cpu")
        if device.type == "meta":
            device = torch.device("cpu")
        vllm = VllmMPBackend(zero_point=self.cfg.zero_point, input_size=input_size,
                             output_size=output_size)
        choice = choose_backend(self.cfg.kernel_backend, n=n, k=k, group=self.cfg.group_size,
                                act_dtype=params_dtype, device=device, vllm=vllm,
                                what=f"layer {self.prefix}")
        b = choice.backend
        if choice.fallbacks:
            _warn_once(f"fallback {b.name} {choice.reason()}", "smoothquant_plus: %s: kernel_backend "
                       "auto uses %s (%s)", self.prefix, b.name, choice.reason())
        if b.name == "reference":
            _warn_once("slow", "smoothquant_plus: W4A16 runs the slow reference path "
                       "(dequantize + matmul) on %s; build the vllm_sqplus extension for the fast "
                       "kernel", device.type)
        _warn_once(f"backend {b!r}", "smoothquant_plus: W4A16 kernel %r (first layer: %s)", b,
                   self.prefix, level=logging.INFO)
        return b

    def process_weights_after_loading(self, layer) -> None:
        if getattr(layer, "_already_called_process_weights_after_loading", False):
            return
        g = layer.sqplus_group
        layer.sqplus_perm = None
        if self.foreign is not None:
            tensors = {name: getattr(layer, name).data for name in layer.sqplus_foreign_names}
            q, scales, zeros, layer.sqplus_perm = self.foreign.unpack(
                tensors, layer.output_size_per_partition, layer.input_size_per_partition, self.prefix)
            for name in layer.sqplus_foreign_names:
                delattr(layer, name)
            del tensors
        elif self.cfg.prequantized:
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
        packed = self.backend.pack(q, scales, zeros, g)
        layer.sqplus_keys = tuple(packed)
        for name, t in packed.items():
            layer.register_parameter(f"sq_{name}", torch.nn.Parameter(t, requires_grad=False))
        layer._already_called_process_weights_after_loading = True

    # ---- forward -------------------------------------------------------------------------
    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        packed = {name: getattr(layer, f"sq_{name}") for name in layer.sqplus_keys}
        if getattr(layer, "sqplus_perm", None) is not None:  # GPTQ act-order: K in group order
            x = x.index_select(-1, layer.sqplus_perm)
        return self.backend.apply(x, packed, layer.sqplus_group, bias)


class SqplusLmHeadMethod(QuantizeMethodBase):
    """lm_head = "int8" | "int4": logits from a quantized copy of the output projection.

    The weight is created and loaded in full precision like vLLM's UnquantizedEmbeddingMethod
    (rows = this rank's padded vocabulary shard; each row, and each K-group, quantizes on its own,
    so a tensor-parallel shard quantizes as the full matrix would), quantized once after loading."""

    def __init__(self, cfg: SqplusConfig, prefix: str = "lm_head"):
        self.cfg, self.prefix, self.mode = cfg, prefix, cfg.lm_head
        self.backend = None

    def create_weights(self, layer, input_size_per_partition: int, output_partition_sizes: list[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype, **extra):
        n, k = sum(output_partition_sizes), input_size_per_partition
        if self.mode == "int4":
            ok, why = group_size_supported(k, self.cfg.group_size, "hidden size")
            if not ok:
                raise SqplusError(f"smoothquant_plus: lm_head int4: {why} (or use lm_head int8)")
            self.backend = self._choose_int4_backend(n, k, input_size, output_size, params_dtype)
        weight = torch.nn.Parameter(torch.empty(n, k, dtype=params_dtype), requires_grad=False)
        from vllm.model_executor.utils import set_weight_attrs
        set_weight_attrs(weight, {"input_dim": 1, "output_dim": 0, **extra})
        layer.register_parameter("weight", weight)
        _warn_once(f"lm_head {self.mode}", "smoothquant_plus: lm_head %s (%s); the embedding stays "
                   "full precision", self.mode, self.backend or INT8, level=logging.INFO)

    def _choose_int4_backend(self, n, k, input_size, output_size, params_dtype):
        device = torch.get_default_device() if hasattr(torch, "get_default_device") else torch.device("cpu")
        if device.type == "meta":
            device = torch.device("cpu")
        vllm = VllmMPBackend(zero_point=self.cfg.zero_point, input_size=input_size, output_size=output_size)
        choice = choose_backend(self.cfg.kernel_backend, n=n, k=k, group=self.cfg.group_size,
                                act_dtype=params_dtype, device=device, vllm=vllm, what=self.prefix)
        if choice.fallbacks:
            _warn_once(f"fallback lm_head {choice.backend.name}", "smoothquant_plus: %s: kernel_backend "
                       "auto uses %s (%s)", self.prefix, choice.backend.name, choice.reason())
        return choice.backend

    def tie_weights(self, layer, embed_tokens):
        layer.weight = embed_tokens.weight  # vLLM's default: the checkpoint loads it once
        return layer

    def process_weights_after_loading(self, layer) -> None:
        if getattr(layer, "_already_called_process_weights_after_loading", False):
            return
        w = layer.weight.data
        if self.mode == "int8":
            q, scales = quantize_int8(w, name=self.prefix)
            packed, layer.sqplus_group = INT8.pack(q, scales), None
        else:
            q, scales, zeros = quantize_int4(w, self.cfg.group_size, self.cfg.zero_point, name=self.prefix)
            layer.sqplus_group = w.shape[1] if self.cfg.group_size == -1 else self.cfg.group_size
            packed = self.backend.pack(q, scales, zeros, layer.sqplus_group)
        layer.sqplus_keys = tuple(packed)
        for name, t in packed.items():
            layer.register_parameter(f"sq_{name}", torch.nn.Parameter(t, requires_grad=False))
        # lm_head's reference only: a tied embedding keeps its full-precision weight for the lookup
        freed = w.numel() * w.element_size() if w.device.type == "cpu" else 0  # untied: really freed
        delattr(layer, "weight")
        del w
        _release_freed_cpu_memory(freed)
        layer._already_called_process_weights_after_loading = True

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        packed = {name: getattr(layer, f"sq_{name}") for name in layer.sqplus_keys}
        if self.mode == "int8":
            return INT8.apply(x, packed, bias)
        return self.backend.apply(x, packed, layer.sqplus_group, bias)

    def embedding(self, layer, input_):  # pragma: no cover - vLLM never looks tokens up in lm_head
        raise SqplusError("smoothquant_plus: lm_head holds quantized logits weights, not an embedding")


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
