"""`sqplus quantize` (vllm_sqplus/export.py): the packed INT4 checkpoint, its exact codes, and its
quantization_config written by SqplusConfig.to_dict."""
from __future__ import annotations

import json

import pytest
import torch

from vllm_sqplus.config import parse_config
from vllm_sqplus.errors import SqplusError
from vllm_sqplus.export import pack_nibbles, quantize_checkpoint, unpack_nibbles
from vllm_sqplus.quant import quantize_int4


def test_pack_nibbles_round_trip_and_layout():
    q = torch.randint(0, 16, (5, 12), dtype=torch.uint8)
    p = pack_nibbles(q)
    assert p.shape == (5, 6) and p.dtype == torch.uint8
    assert int(p[0, 0]) == int(q[0, 0]) | (int(q[0, 1]) << 4)  # low nibble = even k
    assert torch.equal(unpack_nibbles(p), q)


def test_export_writes_exact_codes_and_leaves_input_alone(tmp_path):
    from safetensors.torch import load_file
    from tiny import save_tiny
    src = save_tiny(tmp_path / "m", "qwen2", hidden=128, intermediate=256, heads=4, kv_heads=2)
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    out = quantize_checkpoint(str(src), str(tmp_path / "q"), group_size=64)
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before  # input untouched
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "packed" and qc["group_size"] == 64 and qc["quant_method"] == "smoothquant_plus"
    assert qc == parse_config(qc, env={}).to_dict()  # written by SqplusConfig.to_dict, nothing else
    w_in, w_out = load_file(str(src / "model.safetensors")), load_file(str(out / "model.safetensors"))
    name = "model.layers.1.self_attn.k_proj"
    q, s, z = quantize_int4(w_in[name + ".weight"], 64, True)
    assert torch.equal(unpack_nibbles(w_out[name + ".qweight"]), q)
    assert torch.equal(w_out[name + ".scales"], s) and torch.equal(w_out[name + ".zeros"], z)
    assert name + ".weight" not in w_out
    for keep in ("lm_head.weight", "model.embed_tokens.weight", "model.layers.1.self_attn.k_proj.bias"):
        assert torch.equal(w_out[keep], w_in[keep])
    assert (out / "tokenizer.json").exists()
    with pytest.raises(SqplusError, match="already a pre-quantized"):
        quantize_checkpoint(str(out), str(tmp_path / "q2"))
    with pytest.raises(SqplusError, match="exists and is not empty"):
        quantize_checkpoint(str(src), str(out))


def test_export_shape_error_names_the_layer(tmp_path):
    from tiny import save_tiny
    src = save_tiny(tmp_path / "m", "llama", hidden=96, intermediate=192, heads=4)
    with pytest.raises(SqplusError, match=r"layers\.0\.\S+_proj: in_features 96 is not divisible by group_size 64"):
        quantize_checkpoint(str(src), str(tmp_path / "q"), group_size=64)
    assert not (tmp_path / "q").exists()  # nothing half-written
