"""Architecture support as data: where the decoder layers are and which (prev -> linears) pairs smooth.

A pair folds the smoothing factor s of its linears' shared input channels into `prev`:
  kind "norm":   prev is an RMSNorm; its weight is divided by s (input_layernorm -> q, k, v).
  kind "linear": prev is a linear whose output rows feed the linears' input columns; its rows
                 (and bias) are divided by s (v_proj -> o_proj, up_proj -> down_proj).
A pair is used only when its `requires` condition holds for the config (v_proj -> o_proj needs
as many kv heads as heads: under GQA v's rows do not map one-to-one onto o's columns).
Adding an architecture is adding an entry to ARCHITECTURES; anything else is a clear error.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from vllm_sqplus.errors import SqplusError


@dataclass(frozen=True)
class SmoothPair:
    prev: str                      # module path inside a decoder layer
    linears: tuple[str, ...]       # linears whose input columns get multiplied by s
    kind: str                      # "norm" or "linear"
    requires: Callable[[object], bool] = lambda cfg: True


@dataclass(frozen=True)
class ArchSpec:
    name: str
    layers: str                    # path of the ModuleList of decoder layers in the *ForCausalLM
    final_norm: str
    linears: tuple[str, ...]       # every linear of a decoder layer (quantized)
    pairs: tuple[SmoothPair, ...] = field(default_factory=tuple)
    input_norm: str = "input_layernorm"  # the RMSNorm a decoder layer's input passes first

    def active_pairs(self, config, kinds: tuple[str, ...] = ("norm", "linear")) -> list[SmoothPair]:
        return [p for p in self.pairs if p.kind in kinds and p.requires(config)]


# named pair sets a user (or the search) chooses from
PAIR_SETS: dict[str, tuple[str, ...]] = {"norm": ("norm",), "all": ("norm", "linear")}


def _no_gqa(cfg) -> bool:
    return getattr(cfg, "num_key_value_heads", cfg.num_attention_heads) == cfg.num_attention_heads


_LLAMA_LIKE = ArchSpec(
    name="llama",
    layers="model.layers",
    final_norm="model.norm",
    linears=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
    pairs=(
        SmoothPair("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "norm"),
        SmoothPair("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "norm"),
        SmoothPair("self_attn.v_proj", ("self_attn.o_proj",), "linear", _no_gqa),
        SmoothPair("mlp.up_proj", ("mlp.down_proj",), "linear"),
    ),
)

# Qwen2 differs from Llama by q/k/v biases only; smoothing the norm leaves biases alone, and the
# v_proj -> o_proj fold divides v's bias with its rows.
ARCHITECTURES: dict[str, ArchSpec] = {
    "LlamaForCausalLM": _LLAMA_LIKE,
    "MistralForCausalLM": _LLAMA_LIKE,
    "Qwen2ForCausalLM": _LLAMA_LIKE,
}


def get_arch(config) -> ArchSpec:
    archs = list(getattr(config, "architectures", None) or [])
    for a in archs:
        if a in ARCHITECTURES:
            return ARCHITECTURES[a]
    shown = ", ".join(archs) or f"model_type={getattr(config, 'model_type', '?')}"
    raise SqplusError(f"unsupported architecture {shown}; supported: {', '.join(sorted(ARCHITECTURES))}")


def get_module(root, path: str):
    for part in path.split("."):
        root = getattr(root, part)
    return root
