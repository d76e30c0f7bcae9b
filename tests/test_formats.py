"""formats.py: AWQ / GPTQ / compressed-tensors layouts <-> our (q, scales, zeros), pure torch.

Exact tests (integers equal). The writers are checked against vLLM's own reference packers
(quant_utils.awq_pack / gptq_pack / pack_quantized_values_into_int32) where vLLM is installed,
so a writer and reader sharing one misunderstanding cannot pass together.
"""
from __future__ import annotations

import pytest
import torch

from vllm_sqplus.errors import SqplusError
from vllm_sqplus.formats import (AWQ_ORDER, ForeignFormat, awq_pack_linear, gptq_pack_linear,
                                 pack_int4_words, parse_foreign_config, unpack_int4_words)
from vllm_sqplus.quant import dequantize_int4, quantize_int4

AWQ_QC = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}
GPTQ_QC = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True,
           "checkpoint_format": "gptq"}


def _q(n, k, g, zp, seed=0):
    torch.manual_seed(seed)
    w = torch.randn(n, k, dtype=torch.float16)
    return (w, *quantize_int4(w, g, zp))


def _vllm_quant_utils():
    pytest.importorskip("vllm")
    from vllm.model_executor.layers.quantization.utils import quant_utils
    return quant_utils


def test_awq_order_inverse():
    q = torch.randint(0, 16, (5, 24), dtype=torch.uint8)
    assert torch.equal(unpack_int4_words(pack_int4_words(q, 1, AWQ_ORDER), 1, 24, AWQ_ORDER), q)
    # nibble i of word 0 holds column AWQ_ORDER[i]
    row = torch.arange(8, dtype=torch.uint8).reshape(1, 8)
    word = int(pack_int4_words(row, 1, AWQ_ORDER)[0, 0]) & 0xFFFFFFFF
    assert [(word >> (4 * i)) & 0xF for i in range(8)] == list(AWQ_ORDER)


def test_awq_writer_equals_vllm_awq_pack_and_reader_inverts_it():
    qu = _vllm_quant_utils()
    w, q, s, z = _q(48, 256, 128, True)
    t = awq_pack_linear(q, s, z)
    n, k = q.shape
    assert torch.equal(t["qweight"], qu.awq_pack(q.T.to(torch.int32), 4, k, n))
    assert torch.equal(t["qzeros"], qu.awq_pack(z.T.to(torch.int32), 4, k // 128, n))
    ff = parse_foreign_config(AWQ_QC)
    q2, s2, z2, perm = ff.unpack(t, n, k)
    assert torch.equal(q2, q) and torch.equal(s2, s) and torch.equal(z2, z) and perm is None


@pytest.mark.parametrize("sym,fmt", [(True, "gptq"), (False, "gptq"), (False, "gptq_v2")])
def test_gptq_writer_equals_vllm_gptq_pack_and_reader_inverts_it(sym, fmt):
    qu = _vllm_quant_utils()
    w, q, s, z = _q(40, 256, 64, not sym, seed=1)
    z = z.clamp(min=1) if fmt == "gptq" else z  # v1 cannot store a zero of 0
    t = gptq_pack_linear(q, s, z, v1=fmt == "gptq")
    n, k = q.shape
    assert torch.equal(t["qweight"], qu.gptq_pack(q.T.to(torch.int32), 4, k, n))
    stored = z.to(torch.int32) - (1 if fmt == "gptq" else 0)
    assert torch.equal(t["qzeros"], qu.pack_quantized_values_into_int32(
        stored.T.contiguous(), qu.scalar_types.uint4, packed_dim=1))
    ff = parse_foreign_config(dict(GPTQ_QC, group_size=64, sym=sym, checkpoint_format=fmt))
    q2, s2, z2, perm = ff.unpack(t, n, k)
    assert torch.equal(q2, q) and torch.equal(s2, s) and perm is None
    assert torch.equal(z2, torch.full_like(z, 8) if sym else z)


def test_gptq_v1_zero_of_zero_is_refused():
    w, q, s, z = _q(16, 128, 128, True)
    t = gptq_pack_linear(q, s, z, v1=False)
    t["qzeros"] = pack_int4_words(torch.full((1, 16), 15, dtype=torch.uint8), dim=1)  # -1 as stored
    ff = parse_foreign_config(dict(GPTQ_QC, sym=False))
    with pytest.raises(SqplusError, match="gptq_v2"):
        ff.unpack(t, 16, 128)


def test_gptq_act_order_permutes_k_and_computes_the_same_product():
    """desc_act: group of channel order[i] is i // g; the layer computes x[..., perm] @ w_p.T."""
    n, k, g = 24, 256, 64
    torch.manual_seed(3)
    w = torch.randn(n, k)
    order = torch.randperm(k)                       # GPTQ's processing order of input channels
    q_p, s, z = quantize_int4(w[:, order], g, True)  # groups contiguous in processing order
    q_ckpt = torch.empty_like(q_p)
    q_ckpt[:, order] = q_p                           # the checkpoint keeps the original channel order
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[order] = torch.arange(k, dtype=torch.int32) // g
    t = gptq_pack_linear(q_ckpt, s, z.clamp(min=1), v1=True, g_idx=g_idx)
    ff = parse_foreign_config(dict(GPTQ_QC, group_size=g, sym=False, desc_act=True))
    assert ff.act_order
    q2, s2, z2, perm = ff.unpack(t, n, k)
    assert perm is not None
    x = torch.randn(3, k)
    w_hat_orig = torch.empty(n, k)
    w_hat_orig[:, order] = dequantize_int4(q_p, s, z.clamp(min=1), g, torch.float32)
    want = x @ w_hat_orig.T
    got = x[:, perm] @ dequantize_int4(q2, s2, z2, g, torch.float32).T
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-4)


def test_g_idx_with_uneven_groups_is_refused():
    w, q, s, z = _q(16, 128, 64, True)
    g_idx = torch.zeros(128, dtype=torch.int32)
    g_idx[100:] = 1  # 100 and 28 channels, not 64 and 64
    t = gptq_pack_linear(q, s, z.clamp(min=1), g_idx=g_idx)
    with pytest.raises(SqplusError, match="exactly 64 input channels"):
        parse_foreign_config(dict(GPTQ_QC, group_size=64, desc_act=True)).unpack(t, 16, 128)


def test_params_shapes_follow_the_layouts():
    awq = parse_foreign_config(AWQ_QC).params(384, 256)
    assert [(p.name, p.shape) for p in awq] == [("qweight", (256, 48)), ("qzeros", (2, 48)),
                                                ("scales", (2, 384))]
    gptq = parse_foreign_config(dict(GPTQ_QC, group_size=-1)).params(384, 256)
    assert [(p.name, p.shape, p.input_dim) for p in gptq] == [
        ("qweight", (32, 384), 0), ("qzeros", (1, 48), None), ("scales", (1, 384), None),
        ("g_idx", (256,), 0)]


@pytest.mark.parametrize("qc,msg", [
    (dict(AWQ_QC, bits=3), "3-bit"),
    (dict(AWQ_QC, version="gemv"), "GEMM packing"),
    (dict(AWQ_QC, zero_point=False), "zero_point false"),
    (dict(AWQ_QC, group_size=96), "group_size 96"),
    (dict(GPTQ_QC, bits=8), "8-bit"),
    (dict(GPTQ_QC, checkpoint_format="marlin"), "checkpoint_format"),
    (dict(GPTQ_QC, dynamic={"-:.*down.*": {}}), "dynamic"),
    (dict(GPTQ_QC, lm_head=True), "lm_head"),
    ({"quant_method": "compressed-tensors", "format": "float-quantized",
      "config_groups": {"g": {"weights": {"num_bits": 8, "type": "float"}}}}, "format"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized",
      "config_groups": {"g": {"weights": {"num_bits": 4, "type": "int", "strategy": "group",
                                          "group_size": 128},
                              "input_activations": {"num_bits": 8}}}}, "activations"),
])
def test_unsupported_variants_are_one_clear_error(qc, msg):
    with pytest.raises(SqplusError, match=f"cannot serve this .*{msg}"):
        parse_foreign_config(qc)


def test_ct_ignore_matches_fused_layers():
    ff = ForeignFormat("compressed-tensors", 128, True,
                       skip=("lm_head", "model.layers.0.mlp.down_proj", "re:.*layers\\.1\\.self_attn\\.[qkv]_proj"))
    fused = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    assert ff.skips("model.layers.0.mlp.down_proj", fused)
    assert not ff.skips("model.layers.1.mlp.down_proj", fused)
    assert ff.skips("model.layers.1.self_attn.qkv_proj", fused)
    assert not ff.skips("model.layers.0.self_attn.qkv_proj", fused)
    half = ForeignFormat("compressed-tensors", 128, True, skip=("model.layers.0.self_attn.q_proj",))
    with pytest.raises(SqplusError, match="only some"):
        half.skips("model.layers.0.self_attn.qkv_proj", fused)


def test_ct_group_actorder_uses_weight_g_idx():
    """compressed-tensors actorder "group": weight_g_idx like GPTQ's g_idx (same permutation path)."""
    from vllm_sqplus.formats import ct_pack_linear
    n, k, g = 16, 256, 128
    torch.manual_seed(4)
    w = torch.randn(n, k)
    order = torch.randperm(k)
    q_p, s, z = quantize_int4(w[:, order], g, True)
    q = torch.empty_like(q_p)
    q[:, order] = q_p
    t = ct_pack_linear(q, s, z, zero_point=True)
    t["weight_g_idx"] = torch.empty(k, dtype=torch.int32)
    t["weight_g_idx"][order] = torch.arange(k, dtype=torch.int32) // g
    qc = {"quant_method": "compressed-tensors", "format": "pack-quantized",
          "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
              "num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": g,
              "actorder": "group"}}}}
    ff = parse_foreign_config(qc)
    assert ff.act_order and [p.name for p in ff.params(n, k)][-1] == "weight_g_idx"
    q2, s2, z2, perm = ff.unpack(t, n, k)
    x = torch.randn(2, k)
    w_hat = torch.empty(n, k)
    w_hat[:, order] = dequantize_int4(q_p, s, z, g, torch.float32)
    got = x[:, perm] @ dequantize_int4(q2, s2, z2, g, torch.float32).T
    assert torch.allclose(got, x @ w_hat.T, rtol=1e-5, atol=1e-4)
