"""transformers integration: `AutoModelForCausalLM.from_pretrained(DIR)` gives an INT4 model on our kernels.

After `import vllm_sqplus` (hf_hook.py registers this module's classes with transformers' public
`register_quantization_config` / `register_quantizer`), a checkpoint whose config.json says
`quantization_config.quant_method: "smoothquant_plus"` loads as follows:

  format "smoothed" (`sqplus smooth`: full-precision weights)
      transformers builds the model on the meta device; every decoder nn.Linear that is not in
      modules_to_not_convert (lm_head, embeddings, tied and fp32-kept modules) is a target.
      quantization_config lm_head int8 / int4 (or env SQPLUS_LM_HEAD): after loading, the output
      nn.Linear becomes a vllm_sqplus.lm_head.QuantizedLmHead (the embedding keeps its weight). Its
      weight goes through SqplusQuantize (a transformers ConversionOps) the moment it is read
      from the checkpoint: quantize_int4, pack for the device it landed on, swap the nn.Linear
      for a W4A16Linear, drop the full-precision tensor. transformers reads tensors lazily and
      one at a time when a quantizer quantizes on the fly, so one linear's full-precision weight
      exists at a time (never the whole model plus its INT4 copy).
  format "packed" (`sqplus quantize`, names in export.py)
      targets become placeholders holding the checkpoint's qweight / scales / zeros; after
      loading, each is unpacked and repacked into a W4A16Linear, one at a time. Nothing is
      requantized.
  no quantization_config
      `from_pretrained(plain_dir, quantization_config=SmoothQuantPlusConfig())` quantizes a plain
      checkpoint with round-to-nearest INT4 the same way as "smoothed".

The W4A16Linear backend is chosen once per layer by vllm_sqplus.kernels.resolve_backend on the
device the weight lands on (device_map): our CPU or CUDA kernel, else the reference path with
one warning. kernel_backend "vllm" exists only inside vLLM; here it means "auto" (one warning).
The loaded model cannot be saved back (save_pretrained): re-export with `sqplus quantize`.

This module imports transformers and registers itself; only hf_hook.py (standard library only) is imported by
`import vllm_sqplus`.
"""
from __future__ import annotations

import ctypes
import logging

from vllm_sqplus import hf_hook

hf_hook.uninstall()  # importing transformers below must not re-enter this half-imported module

import torch  # noqa: E402
from torch import nn  # noqa: E402
from transformers.quantizers.base import HfQuantizer  # noqa: E402
from transformers.utils.quantization_config import QuantizationConfigMixin  # noqa: E402

from vllm_sqplus import QUANT_METHOD  # noqa: E402
from vllm_sqplus.config import SqplusConfig, parse_config  # noqa: E402
from vllm_sqplus.errors import SqplusError  # noqa: E402

__all__ = ["SmoothQuantPlusConfig", "SmoothQuantPlusHfQuantizer", "register", "quantized_linears"]

logger = logging.getLogger("vllm_sqplus.hf")


class SmoothQuantPlusConfig(QuantizationConfigMixin):
    """config.json's quantization_config for transformers; validated by vllm_sqplus.config.parse_config.

    Every key is kept (alpha, search results, ...) so that the config round-trips unchanged.
    """

    def __init__(self, bits: int = 4, group_size: int = 128, zero_point: bool = True,
                 modules_to_not_convert: list[str] | None = None, kernel_backend: str = "auto",
                 format: str = "smoothed", **kwargs):
        kwargs.pop("quant_method", None)
        self.quant_method = QUANT_METHOD
        self.bits, self.group_size, self.zero_point = bits, group_size, zero_point
        if modules_to_not_convert is not None:
            self.modules_to_not_convert = list(modules_to_not_convert)
        self.kernel_backend, self.format = kernel_backend, format
        self.__dict__.update(kwargs)
        self.sqplus_config()  # one clear error now, not halfway through loading

    def sqplus_config(self) -> SqplusConfig:
        return parse_config(self.to_dict())


def _trim_heap() -> None:
    """Give freed full-precision weights back to the OS (glibc keeps freed heap pages mapped)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


_TRIM_EVERY_BYTES = 16 << 20  # a trim walks the heap once (milliseconds)


@torch.no_grad()
def _unmap_checkpoint(model: nn.Module) -> None:
    """Copy the kept CPU tensors (embeddings, norms, lm_head, biases) out of the checkpoint's mmap.

    why: transformers loads them as zero-copy views of the safetensors mapping, and the quantized
    weights were read through that same mapping, so while any view lives, the pages of every
    full-precision weight stay resident (measured: RSS + the FP linears' size, 221 MiB on a 226 MiB
    model). Copies let the file be unmapped; the packed INT4 buffers are fresh tensors already."""
    from vllm_sqplus.kernels import W4A16Linear
    for mod in model.modules():
        names = ["bias"] if isinstance(mod, W4A16Linear) else list(mod._parameters) + list(mod._buffers)
        for name in names:
            t = getattr(mod, name, None)
            if isinstance(t, torch.Tensor) and t.device.type == "cpu" and not t.is_meta:
                t.data = t.data.clone()


class _PackedInt4(nn.Module):
    """A pre-quantized linear's checkpoint tensors (export.py's names) until loading ends."""

    def __init__(self, linear: nn.Linear, group_size: int):
        super().__init__()
        n, k = linear.out_features, linear.in_features
        g = k if group_size == -1 else group_size
        self.in_features, self.out_features, self.group_size = k, n, g
        dt = linear.weight.dtype

        def meta(*shape, dtype):
            return nn.Parameter(torch.empty(*shape, dtype=dtype, device="meta"), requires_grad=False)
        self.qweight = meta(n, k // 2, dtype=torch.uint8)  # two codes per byte along K
        self.scales = meta(n, k // g, dtype=dt)
        self.zeros = meta(n, k // g, dtype=torch.uint8)
        self.bias = meta(n, dtype=dt) if linear.bias is not None else None

    def forward(self, x):  # pragma: no cover - replaced before the model can run
        raise SqplusError("smoothquant_plus: a pre-quantized layer was not converted after loading")


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


class SmoothQuantPlusHfQuantizer(HfQuantizer):
    """Quantize-while-loading (format smoothed) or repack-after-loading (format packed)."""

    requires_calibration = False

    def __init__(self, quantization_config: SmoothQuantPlusConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.cfg = quantization_config.sqplus_config()
        # transformers calls every checkpoint with a quantization_config "pre-quantized"; ours
        # holds full-precision weights unless its format is "packed", so quantize on the fly
        self.pre_quantized = self.cfg.prequantized
        self.backend = self.cfg.kernel_backend
        if self.backend == "vllm":
            logger.warning("smoothquant_plus: kernel_backend 'vllm' applies inside vLLM only; "
                           "transformers uses 'auto'")
            self.backend = "auto"
        self.targets: set[str] = set()  # module names of the linears we quantize
        self._freed = 0

    # ---- before loading --------------------------------------------------------------------
    def validate_environment(self, *args, device_map=None, **kwargs):
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise SqplusError("smoothquant_plus: disk offload (device_map with 'disk') is not "
                              "supported; give every layer a cpu or cuda device")

    def _process_model_before_weight_loading(self, model, **kwargs):
        from vllm_sqplus.quant import QuantError, check_group_size
        keep = set(self.get_modules_to_not_convert(model, list(self.cfg.modules_to_not_convert),
                                                   getattr(model, "_keep_in_fp32_modules", None),
                                                   add_default_skips=True))
        for name, module in list(model.named_modules()):
            if not isinstance(module, nn.Linear) or name in keep or self.cfg.skip(name):
                continue
            try:
                check_group_size(module.in_features, self.cfg.group_size, name)
            except QuantError as e:
                raise SqplusError(f"smoothquant_plus: {e}") from None
            if module.in_features % 2:
                raise SqplusError(f"smoothquant_plus: {name}: in_features {module.in_features} is odd")
            self.targets.add(name)
            if self.pre_quantized:
                _swap(model, name, _PackedInt4(module, self.cfg.group_size))
        if not self.targets:
            raise SqplusError("smoothquant_plus: the model has no nn.Linear outside "
                              f"modules_to_not_convert {sorted(keep | set(self.cfg.modules_to_not_convert))}")
        return model

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        module, _, leaf = param_name.rpartition(".")
        return not self.pre_quantized and leaf == "weight" and module in self.targets

    def param_element_size(self, model, param_name: str, param: torch.Tensor) -> float:
        if self.param_needs_quantization(model, param_name):
            return 0.5 + 8 / max(self.cfg.group_size, 1)  # codes + fp32 scale & zero per group
        return super().param_element_size(model, param_name, param)

    def get_quantize_ops(self):
        return _quantize_op_class()(self)

    # ---- while loading (format smoothed) ---------------------------------------------------
    @torch.no_grad()
    def quantize_linear(self, model, key: str, w: torch.Tensor) -> None:
        """Quantize the weight `key` (module.weight) and put a W4A16Linear in its module's place."""
        from vllm_sqplus.kernels import W4A16Linear
        from vllm_sqplus.quant import QuantError, quantize_int4
        name = key[: -len(".weight")]
        old = model.get_submodule(name)
        if tuple(w.shape) != (old.out_features, old.in_features):
            raise SqplusError(f"smoothquant_plus: {key} has shape {tuple(w.shape)}, the model expects "
                              f"{(old.out_features, old.in_features)}")
        try:
            q, scales, zeros = quantize_int4(w, self.cfg.group_size, self.cfg.zero_point, name=name)
        except QuantError as e:
            raise SqplusError(f"smoothquant_plus: {e}") from None
        # a bias read before the weight is real already; one read later fills this (meta) buffer
        bias = None if old.bias is None else old.bias.data
        new = W4A16Linear.from_quantized(q, scales, zeros, self.cfg.group_size, bias=bias,
                                         backend=self.backend)
        _swap(model, name, new)
        self._freed += w.numel() * w.element_size() if w.device.type == "cpu" else 0
        if self._freed >= _TRIM_EVERY_BYTES:
            self._freed = 0
            _trim_heap()

    # ---- after loading ---------------------------------------------------------------------
    @torch.no_grad()
    def _process_model_after_weight_loading(self, model, **kwargs):
        from vllm_sqplus.export import unpack_nibbles
        from vllm_sqplus.kernels import W4A16Linear
        for name in sorted(self.targets):
            m = model.get_submodule(name)
            if isinstance(m, _PackedInt4):
                missing = [t for t in ("qweight", "scales", "zeros", "bias")
                           if getattr(m, t) is not None and getattr(m, t).is_meta]
                if missing:
                    raise SqplusError(f"smoothquant_plus: the pre-quantized checkpoint has no "
                                      f"{', '.join(name + '.' + t for t in missing)}")
                new = W4A16Linear.from_quantized(
                    unpack_nibbles(m.qweight.data), m.scales.data, m.zeros.data, m.group_size,
                    bias=None if m.bias is None else m.bias.data, backend=self.backend)
                _swap(model, name, new)
                del m
            elif not isinstance(m, W4A16Linear):
                raise SqplusError(f"smoothquant_plus: the checkpoint has no weight for {name}")
            elif m.bias is not None and m.bias.is_meta:
                raise SqplusError(f"smoothquant_plus: the checkpoint has no bias for {name}")
        if self.cfg.lm_head != "none":
            self._quantize_lm_head(model)
        _unmap_checkpoint(model)
        _trim_heap()
        return model

    @torch.no_grad()
    def _quantize_lm_head(self, model) -> None:
        """quantization_config lm_head int8 / int4: the output nn.Linear becomes a QuantizedLmHead;
        a tied input embedding keeps the full-precision weight (only the logits are quantized)."""
        from vllm_sqplus.lm_head import QuantizedLmHead
        head = model.get_output_embeddings()
        if not isinstance(head, nn.Linear):
            raise SqplusError(f"smoothquant_plus: lm_head {self.cfg.lm_head}: the output layer is "
                              f"{type(head).__name__}, not an nn.Linear")
        name = next(n for n, m in model.named_modules() if m is head)
        _swap(model, name, QuantizedLmHead.from_linear(head, self.cfg.lm_head, self.cfg.group_size,
                                                       self.cfg.zero_point, self.backend, name))

    def is_serializable(self, **kwargs) -> bool:
        return False  # the buffers are the kernel's layout; `sqplus quantize` writes checkpoints

    @property
    def is_trainable(self) -> bool:
        return False


_OP_CLASS = None


def _quantize_op_class():
    """SqplusQuantize, built on first use: transformers.core_model_loading imports modeling code,
    which may still be importing when this module is (hf_hook registers mid-import)."""
    global _OP_CLASS
    if _OP_CLASS is None:
        from transformers.core_model_loading import ConversionOps

        class SqplusQuantize(ConversionOps):
            """{"<linear>.weight": w} -> {} after swapping the linear for a W4A16Linear."""

            def __init__(self, quantizer: SmoothQuantPlusHfQuantizer):
                self.quantizer = quantizer

            def convert(self, input_dict, source_patterns=None, target_patterns=None,
                        model=None, missing_keys=None, **kwargs):
                for key, value in input_dict.items():
                    w = value[0] if isinstance(value, list) else value
                    self.quantizer.quantize_linear(model, key, w)
                    if missing_keys is not None:
                        missing_keys.discard(key)  # consumed: the module that owned it is gone
                    del w
                return {}

        _OP_CLASS = SqplusQuantize
    return _OP_CLASS


def quantized_linears(model: nn.Module) -> dict[str, nn.Module]:
    """name -> W4A16Linear of a loaded model (tests, reports)."""
    from vllm_sqplus.kernels import W4A16Linear
    return {n: m for n, m in model.named_modules() if isinstance(m, W4A16Linear)}


def register() -> None:
    """Add smoothquant_plus to transformers' registries (idempotent; keeps another's entry)."""
    from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING,
                                              register_quantization_config, register_quantizer)
    if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is SmoothQuantPlusHfQuantizer:
        return
    if QUANT_METHOD in AUTO_QUANTIZER_MAPPING or QUANT_METHOD in AUTO_QUANTIZATION_CONFIG_MAPPING:
        logger.warning("smoothquant_plus is already registered with transformers by %s; keeping it",
                       AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD))
        return
    register_quantization_config(QUANT_METHOD)(SmoothQuantPlusConfig)
    register_quantizer(QUANT_METHOD)(SmoothQuantPlusHfQuantizer)


register()  # importing this module (directly or through hf_hook) registers it
