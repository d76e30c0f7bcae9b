"""`sqplus quantize MODEL --out Q_DIR`: write a pre-quantized INT4 checkpoint the vLLM plugin loads
without requantizing.

Input: a smoothed checkpoint (`sqplus smooth`) or a plain FP16/BF16/FP32 one (plain RTN then).
Read one tensor at a time from the safetensors shards (the model is never built), so memory stays
near one shard's output. Output format ("format": "packed" in quantization_config):
  <linear>.qweight  uint8 [N, K/2]   two INT4 codes per byte along K: low nibble = even k,
                                     high nibble = odd k (k = 2j -> byte j & 0xF, 2j+1 -> byte j >> 4)
  <linear>.scales   [N, K/g]         the checkpoint's dtype (quant.py's scales, as computed)
  <linear>.zeros    uint8 [N, K/g]   zero points 0..15 (8 for symmetric)
  w_hat = (code - zeros) * scales, exactly quant.py's quantize_int4 -> dequantize_int4.
Every other tensor (embeddings, norms, lm_head, biases) is copied unchanged. Same shard names as
the input (plus a rebuilt index when there is one). The input folder is never modified; the
output is written to a temporary sibling and renamed into place.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import torch

from vllm_sqplus import QUANT_METHOD
from vllm_sqplus.checkpoint import check_output_dir, copy_side_files, read_config, write_checkpoint_atomic
from vllm_sqplus.config import parse_config
from vllm_sqplus.errors import SqplusError
from vllm_sqplus.quant import QuantError, quantize_int4


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """uint8 codes [N, K] (K even) -> uint8 [N, K/2], low nibble = even k."""
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] -> uint8 codes [N, K] (inverse of pack_nibbles)."""
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(packed.shape[0], -1)


def linear_weight_names(raw_cfg: dict) -> tuple[str, list[str]]:
    """(layers prefix, linear paths inside a decoder layer) for the checkpoint's architecture."""
    from vllm_sqplus.arch import get_arch
    arch = get_arch(SimpleNamespace(architectures=raw_cfg.get("architectures"),
                                    model_type=raw_cfg.get("model_type")))
    return arch.layers, list(arch.linears)


def _is_quantized(name: str, layers: str, linears: list[str], cfg) -> bool:
    if not (name.startswith(layers + ".") and name.endswith(".weight")):
        return False
    module = name[: -len(".weight")]
    rest = module[len(layers) + 1:].split(".", 1)  # ["<i>", "self_attn.q_proj"]
    return len(rest) == 2 and rest[1] in linears and not cfg.skip(module)


def quantize_checkpoint(model_dir: str, out_dir: str, group_size: int | None = None,
                        zero_point: bool | None = None, overwrite: bool = False) -> Path:
    from safetensors import safe_open
    from safetensors.torch import save_file
    src = Path(model_dir)
    raw = read_config(src)
    qc_in = raw.get("quantization_config")
    if qc_in is not None and qc_in.get("quant_method") != QUANT_METHOD:
        raise SqplusError(f"{src} is already quantized ({qc_in.get('quant_method')}); start from a "
                          f"full-precision or smoothed checkpoint")
    if qc_in is not None and qc_in.get("format") == "packed":
        raise SqplusError(f"{src} is already a pre-quantized (packed) checkpoint")
    qc = dict(qc_in or {})
    if group_size is not None:
        qc["group_size"] = group_size
    if zero_point is not None:
        qc["zero_point"] = zero_point
    cfg = parse_config(qc, env={})
    shards = sorted(src.glob("*.safetensors"))
    if not shards:
        raise SqplusError(f"{src} has no *.safetensors weights (convert .bin checkpoints first)")
    layers, linears = linear_weight_names(raw)
    out = check_output_dir(src, out_dir, overwrite)

    def write(tmp: Path) -> None:
        weight_map, n_quant = {}, 0
        for shard in shards:
            tensors = {}
            with safe_open(str(shard), framework="pt") as f:
                for name in f.keys():
                    t = f.get_tensor(name)
                    if _is_quantized(name, layers, linears, cfg):
                        module = name[: -len(".weight")]
                        try:
                            q, s, z = quantize_int4(t, cfg.group_size, cfg.zero_point, name=module)
                        except QuantError as e:
                            raise SqplusError(str(e)) from None
                        if q.shape[1] % 2:
                            raise SqplusError(f"{module}: in_features {q.shape[1]} is odd")
                        tensors[f"{module}.qweight"] = pack_nibbles(q)
                        tensors[f"{module}.scales"] = s.contiguous()
                        tensors[f"{module}.zeros"] = z.contiguous()
                        n_quant += 1
                    else:
                        tensors[name] = t.contiguous()
            save_file(tensors, str(tmp / shard.name), metadata={"format": "pt"})
            weight_map.update({k: shard.name for k in tensors})
        if n_quant == 0:
            raise SqplusError(f"{src}: found no decoder linear weights under '{layers}.' to quantize")
        if (src / "model.safetensors.index.json").exists():
            (tmp / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
        copy_side_files(src, tmp)
        new_cfg = dict(raw)
        new_cfg["quantization_config"] = replace(cfg, format="packed").to_dict(extra=qc_in)
        (tmp / "config.json").write_text(json.dumps(new_cfg, indent=2) + "\n")

    write_checkpoint_atomic(out, overwrite, write)
    return out


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("quantize", help="write a pre-quantized INT4 checkpoint for vLLM",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="smoothed (sqplus smooth) or plain Hugging Face checkpoint folder")
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    p.add_argument("--group-size", type=int, default=None,
                   help="32, 64, 128 or -1; default: the input's quantization_config, else 128")
    zp = p.add_mutually_exclusive_group()
    zp.add_argument("--zero-point", dest="zero_point", action="store_true", default=None)
    zp.add_argument("--symmetric", dest="zero_point", action="store_false")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=_run)


def _run(args) -> int:
    out = quantize_checkpoint(args.model, args.out, args.group_size, args.zero_point, args.overwrite)
    print(f"wrote pre-quantized checkpoint {out}")
    return 0
