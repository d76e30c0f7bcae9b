"""`sqplus quantize --format compressed-tensors` against the compressed-tensors library itself.

Exact tests (integers and float bit patterns equal, no tolerance):
  - our int32 packing of codes (along K) and zero points (along N, padded) equals the library's
    pack_to_int32 of the signed values (code - 8), for odd sizes too;
  - the library's PackedQuantizationCompressor.decompress of every exported linear equals our
    dequantize_int4(quantize_int4(w)) bit for bit, in bfloat16, float16 and float32, asymmetric
    group 128 (the default), symmetric group 64 and per-channel;
  - transformers (its compressed-tensors quantizer, decompressing) loads the export and holds the
    same dense weights, lm_head unchanged.
"""
from __future__ import annotations

import json

import pytest
import torch

ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor  # noqa: E402
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32  # noqa: E402
from compressed_tensors.quantization import QuantizationConfig  # noqa: E402
from tiny import save_tiny  # noqa: E402

from vllm_sqplus.cli import main  # noqa: E402
from vllm_sqplus.errors import SqplusError  # noqa: E402
from vllm_sqplus.formats import (ct_pack_linear, ct_quantization_config, ct_unpack_linear,  # noqa: E402
                                 pack_int4_words, unpack_int4_words)
from vllm_sqplus.quant import dequantize_int4, quantize_int4  # noqa: E402

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The float's bit pattern as integers (torch.equal on floats would call -0.0 == 0.0)."""
    return t.view({torch.float32: torch.int32, torch.bfloat16: torch.int16,
                   torch.float16: torch.int16}[t.dtype])


@pytest.mark.parametrize("n,k", [(16, 64), (13, 40), (24, 36), (1, 8)])
def test_packing_equals_pack_to_int32(n, k):
    g = torch.Generator().manual_seed(n * 100 + k)
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    mine = pack_int4_words(q, dim=1)
    theirs = pack_to_int32((q.to(torch.int16) - 8).to(torch.int8), 4)
    assert mine.dtype == torch.int32 and torch.equal(mine, theirs)
    assert torch.equal(unpack_int4_words(mine, 1, k), q)
    assert torch.equal(unpack_from_int32(mine, 4, torch.Size([n, k])), (q.to(torch.int16) - 8).to(torch.int8))
    # zero points pack along N (packed_dim=0), N padded to a multiple of 8
    z = torch.randint(0, 16, (n, 3), generator=g, dtype=torch.uint8)
    zm = pack_int4_words(z, dim=0)
    assert zm.shape == (-(-n // 8), 3)
    assert torch.equal(zm, pack_to_int32((z.to(torch.int16) - 8).to(torch.int8), 4, packed_dim=0))
    assert torch.equal(unpack_int4_words(zm, 0, n), z)


def test_unpack_rejects_wrong_sizes():
    with pytest.raises(SqplusError, match="cannot hold"):
        unpack_int4_words(torch.zeros(4, 2, dtype=torch.int32), 1, 17)
    with pytest.raises(SqplusError, match="int32"):
        unpack_int4_words(torch.zeros(4, 2, dtype=torch.int64), 1, 16)


def test_config_validates_with_the_library():
    for g, zp in ((128, True), (64, False), (-1, True)):
        qc = ct_quantization_config(g, zp, ["lm_head"])
        parsed = QuantizationConfig.model_validate(qc)
        w = parsed.config_groups["group_0"].weights
        assert (w.num_bits, w.symmetric, w.group_size) == (4, not zp, None if g == -1 else g)
        assert w.strategy == ("channel" if g == -1 else "group") and parsed.format == "pack-quantized"
        assert parsed.ignore == ["lm_head"] and parsed.quantization_status == "compressed"


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    root = tmp_path_factory.mktemp("ct")
    # K = 256 and 512: groups of 128 and 64 fit; N = 13 * 8 ... multiples of 8 as real models have
    return {dt: save_tiny(root / f"llama_{dt}", "llama", dtype=getattr(torch, dt), hidden=256,
                          intermediate=512, heads=4, kv_heads=2)
            for dt in ("bfloat16", "float16", "float32")}


def _export(src, out, *extra) -> dict:
    assert main(["quantize", str(src), "--out", str(out), "--format", "compressed-tensors", *extra]) == 0
    return json.loads((out / "config.json").read_text())


@pytest.mark.parametrize("dtype,extra,g,zp", [
    ("bfloat16", (), 128, True),                       # the default: asymmetric, group 128
    ("float16", ("--group-size", "64", "--symmetric"), 64, False),
    ("float32", ("--group-size", "-1",), -1, True),   # per-channel
])
def test_export_decompresses_bit_identical(plain, tmp_path, dtype, extra, g, zp):
    from safetensors.torch import load_file
    src, out = plain[dtype], tmp_path / "ct"
    cfg = _export(src, out, *extra)
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["ignore"] == ["lm_head"]
    scheme = QuantizationConfig.model_validate(qc).config_groups["group_0"]
    orig, got = load_file(src / "model.safetensors"), load_file(out / "model.safetensors")
    assert torch.equal(got["lm_head.weight"], orig["lm_head.weight"])
    for i in range(2):
        for lin in LINEARS:
            name = f"model.layers.{i}.{lin}"
            t = {k[len(name) + 1:]: v for k, v in got.items() if k.startswith(name + ".")}
            assert ("weight_zero_point" in t) == zp and "weight" not in t, sorted(t)
            assert t["weight_packed"].dtype == torch.int32 and t["weight_scale"].dtype == getattr(torch, dtype)
            dense = PackedQuantizationCompressor.decompress(t, scheme)["weight"]
            w = orig[f"{name}.weight"]
            q, s, z = quantize_int4(w, g, zp)
            want = dequantize_int4(q, s, z, g, dtype=w.dtype)
            assert dense.dtype == w.dtype and torch.equal(_bits(dense), _bits(want)), name
            # and our reader gives back exactly our codes
            q2, s2, z2, g2 = ct_unpack_linear(t, name)
            assert torch.equal(q2, q) and torch.equal(z2, z) and torch.equal(s2, s) and g2 == g


def test_pack_linear_round_trip_symmetric_has_no_zero_point():
    w = torch.randn(24, 128)
    q, s, z = quantize_int4(w, 64, zero_point=False)
    t = ct_pack_linear(q, s, z, zero_point=False)
    assert "weight_zero_point" not in t and t["weight_shape"].tolist() == [24, 128]
    q2, s2, z2, g = ct_unpack_linear(t)
    assert torch.equal(q2, q) and torch.equal(z2, z) and g == 64


def test_transformers_loads_the_export(plain, tmp_path):
    """transformers' compressed-tensors quantizer (run_compressed=False: the library decompresses)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig
    src, out = plain["bfloat16"], tmp_path / "ct"
    _export(src, out)
    model = AutoModelForCausalLM.from_pretrained(
        out, quantization_config=CompressedTensorsConfig(run_compressed=False), dtype=torch.bfloat16)
    orig = load_file(src / "model.safetensors")
    for i in range(2):
        for lin in LINEARS:
            name = f"model.layers.{i}.{lin}"
            w = orig[f"{name}.weight"]
            q, s, z = quantize_int4(w, 128, True)
            got = model.get_submodule(name).weight.data
            assert torch.equal(_bits(got), _bits(dequantize_int4(q, s, z, 128, dtype=w.dtype))), name
    assert torch.equal(model.lm_head.weight.data, orig["lm_head.weight"])
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_bad_format_is_one_clear_error(plain, tmp_path):
    from vllm_sqplus.export import quantize_checkpoint
    with pytest.raises(SqplusError, match="--format must be one of"):
        quantize_checkpoint(str(plain["float32"]), str(tmp_path / "x"), fmt="gguf")
    ct_dir = tmp_path / "ct"
    _export(plain["float32"], ct_dir)
    with pytest.raises(SqplusError, match="already quantized"):
        quantize_checkpoint(str(ct_dir), str(tmp_path / "y"))
