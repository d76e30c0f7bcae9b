"""`sqplus quantize MODEL --out Q_DIR [--format packed|compressed-tensors]`: write a pre-quantized
INT4 checkpoint that loads without requantizing.

Input: a smoothed checkpoint (`sqplus smooth`) or a plain FP16/BF16/FP32 one (plain RTN then).
Read one tensor at a time from the safetensors shards (the model is never built), so memory stays
near one shard's output. Output format ("format": "packed" in quantization_config):
  <linear>.qweight  uint8 [N, K/2]   two INT4 codes per byte along K: low nibble = even k,
                                     high nibble = odd k (k = 2j -> byte j & 0xF, 2j+1 -> byte j >> 4)
  <linear>.scales   [N, K/g]         the checkpoint's dtype (quant.py's scales, as computed)
  <linear>.zeros    uint8 [N, K/g]   zero points 0..15 (8 for symmetric)
  w_hat = (code - zeros) * scales, exactly quant.py's quantize_int4 -> dequantize_int4.
  Loaded by the vLLM plugin and by transformers after `import vllm_sqplus` (hf.py).
--format compressed-tensors: the same codes, scales and zero points in compressed-tensors'
  `pack-quantized` W4A16 layout (names and offsets: formats.py), with its quantization_config
  (quant_method "compressed-tensors", ignore lm_head): vanilla vLLM, transformers (with the
  compressed-tensors library) and llm-compressor load it; dequantized weights are bit-identical.
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
from vllm_sqplus.formats import ct_pack_linear, ct_quantization_config
from vllm_sqplus.quant import QuantError, quantize_int4

FORMATS = ("packed", "compressed-tensors")


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


def _is_linear(name: str, layers: str, linears: list[str]) -> bool:
    if not (name.startswith(layers + ".") and name.endswith(".weight")):
        return False
    rest = name[len(layers) + 1: -len(".weight")].split(".", 1)  # ["<i>", "self_attn.q_proj"]
    return len(rest) == 2 and rest[1] in linears


def _is_quantized(name: str, layers: str, linears: list[str], cfg) -> bool:
    return _is_linear(name, layers, linears) and not cfg.skip(name[: -len(".weight")])


def quantize_checkpoint(model_dir: str, out_dir: str, group_size: int | None = None,
                        zero_point: bool | None = None, overwrite: bool = False,
                        fmt: str = "packed") -> Path:
    """Quantize every decoder linear of model_dir into out_dir in format `fmt` (see FORMATS)."""
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
    if fmt not in FORMATS:
        raise SqplusError(f"--format must be one of {list(FORMATS)}, got {fmt!r}")
    cfg = parse_config(qc, env={})
    shards = sorted(src.glob("*.safetensors"))
    if not shards:
        raise SqplusError(f"{src} has no *.safetensors weights (convert .bin checkpoints first)")
    layers, linears = linear_weight_names(raw)
    out = check_output_dir(src, out_dir, overwrite)

    def write(tmp: Path) -> None:
        weight_map, n_quant, kept_linears = {}, 0, []
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
                        if fmt == "packed":
                            tensors[f"{module}.qweight"] = pack_nibbles(q)
                            tensors[f"{module}.scales"] = s.contiguous()
                            tensors[f"{module}.zeros"] = z.contiguous()
                        else:
                            for k, v in ct_pack_linear(q, s, z, cfg.zero_point).items():
                                tensors[f"{module}.{k}"] = v
                        n_quant += 1
                    else:
                        if _is_linear(name, layers, linears):
                            kept_linears.append(name[: -len(".weight")])
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
        if fmt == "packed":
            new_cfg["quantization_config"] = replace(cfg, format="packed").to_dict(extra=qc_in)
        else:  # lm_head (and any decoder linear kept by modules_to_not_convert) stays dense
            new_cfg["quantization_config"] = ct_quantization_config(
                cfg.group_size, cfg.zero_point, ["lm_head"] + sorted(set(kept_linears)))
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
    p.add_argument("--format", choices=FORMATS, default="packed",
                   help="packed: ours (vLLM plugin, transformers after `import vllm_sqplus`); "
                        "compressed-tensors: pack-quantized W4A16 (vanilla vLLM, transformers, "
                        "llm-compressor)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=_run)


def _run(args) -> int:
    out = quantize_checkpoint(args.model, args.out, args.group_size, args.zero_point, args.overwrite,
                              fmt=args.format)
    print(f"wrote pre-quantized {args.format} checkpoint {out}")
    return 0
