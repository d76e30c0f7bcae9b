"""The `smoothquant_plus` quantization config: the one reader (parse_config) and the one writer
(SqplusConfig.to_dict) of config.json's "quantization_config", and the one group-size rule
(GROUP_SIZES, group_size_supported / check_group_size_supported) that the CLI, the exporter and
every kernel's can_implement apply. No vLLM import here.

Where it comes from: config.json's "quantization_config" (written by `sqplus smooth` or
`sqplus quantize`), or nothing at all when a user passes `--quantization smoothquant_plus` on a
plain FP16/BF16 checkpoint (then: plain RTN INT4 with the defaults below, one warning).

Keys (anything else is kept, not checked: alpha, search results, ...):
  quant_method           "smoothquant_plus"
  bits                   4 (the only width the kernels have)
  group_size             GROUP_SIZES: 32 | 64 | 128 | -1 (per-channel)  default 128
  zero_point             true (asymmetric, AWQ-style) | false (symmetric)  default true
  modules_to_not_convert list of name fragments left in full precision   default ["lm_head", "embed_tokens"]
                         (embeddings are never linears: vLLM gives them no linear method)
  kernel_backend         auto | sqplus | vllm | reference                 default auto
                         env SQPLUS_KERNEL_BACKEND overrides the file (one run, no re-export);
                         to_dict writes it only when not auto (a serving choice, not the weights')
  format                 absent/"smoothed": full-precision weights, quantized while loading;
                         "packed": pre-quantized by `sqplus quantize` (see export.py for names)
  lm_head                none | int8 | int4                                default none
                         the output projection's logits matmul (vllm_sqplus/lm_head.py: int8 per
                         row symmetric; int4 = this group_size and zero_point); the embedding
                         lookup always stays full precision. Independent of modules_to_not_convert
                         (the decoder linears). Env SQPLUS_LM_HEAD overrides the file; to_dict
                         writes it only when not none (old checkpoints round-trip unchanged)
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from vllm_sqplus import QUANT_METHOD
from vllm_sqplus.errors import SqplusError

# why these: every kernel takes them (CPU: a multiple of 8; CUDA: a multiple of 32, so one batch of
# 8 k-steps spans at most 4 groups; vLLM's CPUWNA16/Marlin: 32/64/128/-1). -1 = one group per row.
GROUP_SIZES = (32, 64, 128, -1)
KERNEL_BACKENDS = ("auto", "sqplus", "vllm", "reference")
FORMATS = ("smoothed", "packed")
ENV_BACKEND = "SQPLUS_KERNEL_BACKEND"
ENV_LM_HEAD = "SQPLUS_LM_HEAD"
LM_HEAD_MODES = ("none", "int8", "int4")  # vllm_sqplus/lm_head.py implements them
DEFAULT_NOT_CONVERT = ("lm_head", "embed_tokens")


@dataclass
class SqplusConfig:
    bits: int = 4
    group_size: int = 128
    zero_point: bool = True
    modules_to_not_convert: list[str] = field(default_factory=lambda: list(DEFAULT_NOT_CONVERT))
    kernel_backend: str = "auto"
    format: str = "smoothed"
    # False when the checkpoint carried no quantization_config (plain RTN, no smoothing found)
    smoothed: bool = True
    lm_head: str = "none"

    @property
    def prequantized(self) -> bool:
        return self.format == "packed"

    def skip(self, prefix: str) -> bool:
        """True when the layer named `prefix` stays in full precision."""
        parts = prefix.split(".")
        return any(m == prefix or m in parts or prefix.endswith("." + m) or prefix.startswith(m + ".")
                   for m in self.modules_to_not_convert)

    def to_dict(self, extra: dict | None = None) -> dict:
        """The quantization_config to write into config.json (the only writer; parse_config reads it
        back to an equal SqplusConfig). `extra`: keys kept beside ours (alpha, search results, an
        input checkpoint's fields); our keys win over extra's."""
        out = dict(extra or {})
        out.update({"quant_method": QUANT_METHOD, "bits": self.bits, "group_size": self.group_size,
                    "zero_point": self.zero_point,
                    "modules_to_not_convert": list(self.modules_to_not_convert), "format": self.format})
        if self.kernel_backend != "auto":
            out["kernel_backend"] = self.kernel_backend
        else:
            out.pop("kernel_backend", None)
        if self.lm_head != "none":
            out["lm_head"] = self.lm_head
        else:
            out.pop("lm_head", None)
        return out


def group_size_supported(k: int, group_size, what: str = "in_features") -> tuple[bool, str]:
    """(ok, why not) for a layer with K = k input features: group_size must be one of GROUP_SIZES
    and divide k (-1: one group per row, any k). `what` names k in the reason."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size not in GROUP_SIZES:
        return False, f"group_size must be one of {list(GROUP_SIZES)}, got {group_size!r}"
    if group_size != -1 and k % group_size:
        fits = [g for g in GROUP_SIZES if g != -1 and k % g == 0]
        return False, (f"{what} {k} is not a multiple of group_size {group_size}; "
                       + (f"group sizes that fit: {fits}" if fits else "use group_size -1 (per-channel)"))
    return True, ""


def check_group_size_supported(k: int, group_size, name: str = "") -> int:
    """Raise SqplusError naming the layer unless group_size_supported; return the effective group
    (k for -1). For `sqplus smooth --group-size` before calibration, and the kernels' can_implement."""
    ok, why = group_size_supported(k, group_size)
    if not ok:
        raise SqplusError(f"{name}: {why}" if name else why)
    return k if group_size == -1 else group_size


def _as_bool(v, key: str) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in ("true", "false", "1", "0"):
        return v.lower() in ("true", "1")
    raise SqplusError(f"smoothquant_plus config: {key} must be true or false, got {v!r}")


def parse_config(raw: dict | None, env: dict | None = None) -> SqplusConfig:
    """Validate a quantization_config dict (None: plain checkpoint, RTN defaults) -> SqplusConfig."""
    env = os.environ if env is None else env
    smoothed = raw is not None
    raw = dict(raw or {})
    method = raw.get("quant_method", QUANT_METHOD)
    if method != QUANT_METHOD:
        raise SqplusError(f"quantization_config.quant_method is {method!r}, expected {QUANT_METHOD!r}")
    bits = raw.get("bits", raw.get("w_bit", 4))
    if isinstance(bits, bool) or bits != 4:
        raise SqplusError(f"smoothquant_plus config: bits must be 4 (W4A16), got {bits!r}")
    g = raw.get("group_size", raw.get("q_group_size", 128))
    ok, why = group_size_supported(0, g)  # k = 0: every group divides it, only the value is checked
    if not ok:
        raise SqplusError(f"smoothquant_plus config: {why}")
    zp = _as_bool(raw.get("zero_point", True), "zero_point")
    skip = raw.get("modules_to_not_convert")
    if skip is None:
        skip = list(DEFAULT_NOT_CONVERT)
    if not isinstance(skip, list) or not all(isinstance(s, str) and s for s in skip):
        raise SqplusError(f"smoothquant_plus config: modules_to_not_convert must be a list of "
                          f"names, got {skip!r}")
    backend = env.get(ENV_BACKEND) or raw.get("kernel_backend", "auto")
    if backend not in KERNEL_BACKENDS:
        src = f"env {ENV_BACKEND}" if env.get(ENV_BACKEND) else "kernel_backend"
        raise SqplusError(f"smoothquant_plus config: {src} must be one of {list(KERNEL_BACKENDS)}, "
                          f"got {backend!r}")
    fmt = raw.get("format", "smoothed")
    if fmt not in FORMATS:
        raise SqplusError(f"smoothquant_plus config: format must be one of {list(FORMATS)}, got {fmt!r}")
    lm_head = env.get(ENV_LM_HEAD) or raw.get("lm_head", "none")
    if lm_head not in LM_HEAD_MODES:
        src = f"env {ENV_LM_HEAD}" if env.get(ENV_LM_HEAD) else "lm_head"
        raise SqplusError(f"smoothquant_plus config: {src} must be one of {list(LM_HEAD_MODES)}, "
                          f"got {lm_head!r}")
    return SqplusConfig(bits=4, group_size=g, zero_point=zp, modules_to_not_convert=list(skip),
                        kernel_backend=backend, format=fmt, smoothed=smoothed, lm_head=lm_head)
