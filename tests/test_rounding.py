"""Learned rounding (vllm_sqplus.rounding) against plain-PyTorch references."""
import copy

import pytest
import torch
import torch.nn.functional as F

from tiny import tiny_model
from vllm_sqplus.arch import get_arch, get_module
from vllm_sqplus.calibrate import LayerwiseModel
from vllm_sqplus.quant import dequantize_int4, pseudo_quantize_int4, quantize_int4
from vllm_sqplus.rounding import RoundingOptions, _LearnedQuant, learned_rounding_layer, output_error


def _weights(n=48, k=256, seed=0, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    w[torch.rand(n, k, generator=g) < 0.01] *= 8   # outliers, as in LLM weights
    w[0, :64] = w[0, :64].abs()                    # groups of one sign (their range ends at 0)
    w[1, 64:128] = -w[1, 64:128].abs()
    return w.to(dtype)


def test_untrained_state_is_plain_rtn():
    """V = 0 and range factors 1: the differentiable weight is quant.py's RTN (float32 math, 1e-6),
    and the stored form has RTN's zeros, RTN's scales but where the RTN-reproducible form moves one
    by an ulp or two (measured: 9% of the groups, at most 0.6% of the scale, in bfloat16), and all
    but a few codes."""
    w = _weights()
    lq = _LearnedQuant(w, 64, torch.bfloat16)
    rtn = dequantize_int4(*quantize_int4(w, 64), 64, dtype=torch.float32)
    torch.testing.assert_close(lq.weight().detach(), rtn, rtol=0, atol=1e-6)
    q, s, z = lq.final()
    q0, s0, z0 = quantize_int4(w, 64)
    assert torch.equal(z, z0) and (s != s0).float().mean() < 0.15
    torch.testing.assert_close(s.float(), s0.float(), rtol=0.01, atol=0)
    assert (q != q0).float().mean() < 0.002


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_any_learned_state_survives_storage_and_rtn_at_load_bit_for_bit(dtype):
    """Whatever the offsets and range factors, the result dequantized and stored in the checkpoint
    dtype is quantized back by plain RTN (the plugin at load) to the same codes, scales and zeros,
    every one, and the stored weight is what the trained state computes but for the pinned codes
    and the groups whose scale the RTN-reproducible form moves by an ulp."""
    w = _weights(dtype=dtype)
    lq = _LearnedQuant(w, 64, dtype)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        lq.V.copy_(torch.rand(lq.V.shape, generator=g) - 0.5)
        lq.a_lo.copy_(0.5 + 0.5 * torch.rand(lq.a_lo.shape, generator=g))
        lq.a_hi.copy_(0.5 + 0.5 * torch.rand(lq.a_hi.shape, generator=g))
        lq.a_hi[2] = 1.0  # groups keeping their full range, where the pins matter
    q, s, z = lq.final()
    assert q.dtype == torch.uint8 and int(q.max()) <= 15 and s.dtype == dtype and s.shape == (48, 4)
    stored = dequantize_int4(q, s, z, 64, dtype=dtype)
    q2, s2, z2 = quantize_int4(stored, 64)
    assert torch.equal(s2, s) and torch.equal(z2, z) and torch.equal(q2, q)
    trained = lq.weight().detach()
    assert (dequantize_int4(q, s, z, 64, dtype=torch.float32) == trained).float().mean() > 0.9


def _layer_setup(arch_name="qwen2"):
    model = tiny_model(arch_name, kv_heads=2).eval()
    arch = get_arch(model.config)
    runner = LayerwiseModel(model, arch, batch_size=2)
    ids = torch.randint(0, model.config.vocab_size, (8, 32), generator=torch.Generator().manual_seed(0))
    hs = runner.embed(ids)
    return model, arch, runner, hs


def _upstream_error(hs, scale, seed):
    """The stream into the layer as the quantized model would hand it: hs plus a small error."""
    return hs + scale * torch.randn(hs.shape, generator=torch.Generator().manual_seed(seed))


def _work_and_rtn(arch, ref):
    """(a copy of ref to fit, a copy with every linear plain-RTN quantized: the reference error)."""
    work, rtn = copy.deepcopy(ref), copy.deepcopy(ref)
    with torch.no_grad():
        for name in arch.linears:
            get_module(rtn, name).weight.copy_(pseudo_quantize_int4(get_module(ref, name).weight, 64))
    return work, rtn


def _mse(layer, runner, hs, tgt):
    return float(F.mse_loss(runner.run_layer(layer, hs), tgt))


@pytest.mark.parametrize("arch_name", ["llama", "qwen2"])
def test_learned_layer_beats_rtn_and_returns_what_it_stores(arch_name):
    """Reference: the full-precision layer's output on the full-precision stream (the target), the
    RTN layer's error on the quantized stream. The learned layer's codes are what its linears hold
    (dequantized) and what RTN at load gives back; its output stream is that layer's; its error
    on all samples is well below RTN's (samples the fit saw: the stage's own objective)."""
    model, arch, runner, hs = _layer_setup(arch_name)
    ref = runner.layer_on_device(0)
    hs_q = _upstream_error(hs, 0.01, seed=2)
    work, rtn = _work_and_rtn(arch, ref)
    qs, hs_next, tgt, log = learned_rounding_layer(work, ref, arch, runner, hs_q, hs, 64, torch.float32,
                                                   RoundingOptions(iters=40, batch=2, val_samples=4))
    assert torch.equal(tgt, runner.run_layer(ref, hs))
    for name, (q, s, z) in qs.items():
        stored = get_module(work, name).weight.detach()
        assert torch.equal(stored, dequantize_int4(q, s, z, 64, dtype=torch.float32))
        q2, s2, z2 = quantize_int4(stored, 64)
        assert torch.equal(q2, q) and torch.equal(s2, s) and torch.equal(z2, z)
    assert torch.equal(hs_next, runner.run_layer(work, hs_q))
    assert log["val_mse"] <= log["start_val_mse"]
    assert _mse(work, runner, hs_q, tgt) < 0.8 * _mse(rtn, runner, hs_q, tgt)


def test_normed_error_is_the_error_after_rms_normalisation():
    """output_error "normed", against plain PyTorch: each token's error over its target's RMS,
    weighted by gamma; the error of the RMS-normalised outputs where out and tgt share their RMS
    per token (a tangent error); blind to a token's scale where mse is ruled by the largest."""
    g = torch.Generator().manual_seed(0)
    tgt = torch.randn(2, 5, 16, generator=g)
    tgt[0, 0] *= 300.0                                  # a massive-activation token
    d = torch.randn(tgt.shape, generator=g) * 0.01
    gamma = torch.rand(16, generator=g) + 0.5
    rms = tgt.pow(2).mean(-1, keepdim=True).sqrt()
    ref = ((d * gamma / rms) ** 2).mean()
    torch.testing.assert_close(output_error(tgt + d, tgt, "normed", gamma), ref, rtol=1e-5, atol=0)
    # tangent error (out's RMS = tgt's RMS per token): equals the RMSNorm outputs' MSE
    d_t = d - tgt * (d * tgt).sum(-1, keepdim=True) / tgt.pow(2).sum(-1, keepdim=True)
    out = tgt + d_t
    out = out * rms / out.pow(2).mean(-1, keepdim=True).sqrt()
    rmsnorm = lambda x: x * x.pow(2).mean(-1, keepdim=True).rsqrt() * gamma
    torch.testing.assert_close(output_error(out, tgt, "normed", gamma), F.mse_loss(rmsnorm(out), rmsnorm(tgt)),
                               rtol=1e-4, atol=0)
    # scaling one token scales its mse share, not its normed one
    big = tgt.clone(); big[1, 2] *= 1000.0
    dd = d.clone(); dd[1, 2] *= 1000.0
    torch.testing.assert_close(output_error(big + dd, big, "normed"), output_error(tgt + d, tgt, "normed"),
                               rtol=1e-4, atol=0)
    assert output_error(big + dd, big) > 1e4 * output_error(tgt + d, tgt)
    torch.testing.assert_close(output_error(tgt + d, tgt), F.mse_loss(tgt + d, tgt))
    with pytest.raises(ValueError, match="unknown rounding loss"):
        output_error(tgt, tgt, "kl")


def test_normed_fit_beats_rtn_on_its_own_error():
    """opts.loss "normed" with the next norm's gamma: the learned layer's normed error is well below
    RTN's, and its codes are still what RTN at load gives back."""
    model, arch, runner, hs = _layer_setup("qwen2")
    ref = runner.layer_on_device(0)
    hs_q = _upstream_error(hs, 0.01, seed=2)
    work, rtn = _work_and_rtn(arch, ref)
    gamma = get_module(runner.layers[1], arch.input_norm).weight.detach()
    qs, _, tgt, log = learned_rounding_layer(work, ref, arch, runner, hs_q, hs, 64, torch.float32,
                                             RoundingOptions(iters=40, batch=2, val_samples=4, loss="normed"),
                                             gamma=gamma)
    assert log["loss"] == "normed" and log["val_mse"] <= log["start_val_mse"]
    err = lambda layer: float(output_error(runner.run_layer(layer, hs_q), tgt, "normed", gamma))
    assert err(work) < 0.8 * err(rtn)
    for name, (q, s, z) in qs.items():
        q2, s2, z2 = quantize_int4(get_module(work, name).weight.detach(), 64)
        assert torch.equal(q2, q) and torch.equal(s2, s) and torch.equal(z2, z)


def test_layer_target_fits_the_fp_layer_on_the_quantized_stream():
    """opts.target "layer": the fit is against the full-precision layer on the same quantized stream
    (GPTQ's target): its error there is well below RTN's; the stream it hands on as the
    full-precision one is still the full-precision layer on the full-precision stream."""
    model, arch, runner, hs = _layer_setup("llama")
    ref = runner.layer_on_device(0)
    hs_q = _upstream_error(hs, 0.05, seed=3)
    work, rtn = _work_and_rtn(arch, ref)
    _, _, fp_out, log = learned_rounding_layer(work, ref, arch, runner, hs_q, hs, 64, torch.float32,
                                               RoundingOptions(iters=40, batch=2, val_samples=4, target="layer"))
    assert torch.equal(fp_out, runner.run_layer(ref, hs)) and log["target"] == "layer"
    tgt = runner.run_layer(ref, hs_q)
    assert _mse(work, runner, hs_q, tgt) < 0.8 * _mse(rtn, runner, hs_q, tgt)
    with pytest.raises(ValueError, match="unknown rounding target"):
        learned_rounding_layer(copy.deepcopy(ref), ref, arch, runner, hs_q, hs, 64, torch.float32,
                               RoundingOptions(target="model"))


def test_no_step_that_helps_keeps_rtn():
    """With a step too small to move any code (lr 1e-9), the iterate kept is the first, plain RTN
    (in the RTN-reproducible form: RTN at load of the stored weights)."""
    model, arch, runner, hs = _layer_setup("llama")
    ref = runner.layer_on_device(0)
    work = copy.deepcopy(ref)
    qs, _, _, log = learned_rounding_layer(work, ref, arch, runner, hs, hs, 64, torch.float32,
                                           RoundingOptions(iters=3, lr=1e-9, check_every=1))
    for name, (q, s, z) in qs.items():
        q0, s0, z0 = quantize_int4(get_module(ref, name).weight.detach(), 64)
        assert torch.equal(z, z0) and (q != q0).float().mean() < 0.002
        torch.testing.assert_close(s, s0, rtol=1e-5, atol=0)
    assert log["val_mse"] <= log["start_val_mse"] * (1 + 1e-6)


def test_search_learned_stage_row_and_checkpoint_form():
    """SearchOptions(rounding="learned"): the last stage is the learned one, a row "<base>+learned"
    with its per-layer log and no value RTN at load would change; its codes replace the base where
    keep_gptq_stage says so."""
    from vllm_sqplus.search import QuantSpec, SearchOptions, choose, keep_gptq_stage, search
    model = tiny_model("qwen2", kv_heads=2).to(torch.bfloat16).eval()
    arch = get_arch(model.config)
    ids = torch.randint(0, model.config.vocab_size, (6, 32), generator=torch.Generator().manual_seed(2))
    q = QuantSpec(64, True, torch.bfloat16)
    res = search(model, arch, ids[:4], ids[4:], q,
                 SearchOptions(fit_samples=2, batch_size=2, gptq=True, rounding="learned", refine=False,
                               alphas=(0.5,), rounding_opts=RoundingOptions(iters=8, val_samples=2)))
    rows = {r["name"]: r for r in res.table}
    stage = [r for r in res.table if r.get("stage")]
    assert len(stage) == 1 and stage[0]["stage"] == "learned" and not stage[0]["gptq"]
    base = choose([n for n in res.finals if not rows[n].get("stage")], rows)
    assert stage[0]["name"] == base + "+learned" and stage[0]["rtn_at_load_mismatches"] == 0
    assert len(stage[0]["layer_log"]) == model.config.num_hidden_layers and "learned" in res.seconds
    assert res.best == (stage[0]["name"] if keep_gptq_stage(stage[0], rows[base]) else base)
    assert (res.gptq is not None) == (res.best == stage[0]["name"])


def test_started_from_gptq_without_a_step_is_gptq_exactly():
    """"gptq+learned" starts the learned rounding from GPTQ's result (the layer's linears holding
    GPTQ's grid values, in the RTN-reproducible form): with a step too small to move a code, the
    stage gives back GPTQ's codes, scales and zeros bit for bit."""
    from vllm_sqplus.gptq import gptq_layer
    model, arch, runner, hs = _layer_setup("qwen2")
    ref = runner.layer_on_device(0)
    work = copy.deepcopy(ref)
    with torch.no_grad():
        for name in arch.linears:  # the stored dtype's values, as prepare_layer leaves them
            w = get_module(work, name).weight
            w.copy_(w.to(torch.bfloat16).float())
        gq, _ = gptq_layer(work, arch, runner, hs, 64, True, torch.bfloat16, reproducible=True, act_order=True,
                           true_sequential=True)
    qs, _, _, log = learned_rounding_layer(work, ref, arch, runner, hs, hs, 64, torch.bfloat16,
                                           RoundingOptions(iters=3, lr=1e-9, check_every=1))
    for name, (q, s, z) in qs.items():
        q0, s0, z0 = gq[name]
        assert torch.equal(q, q0) and torch.equal(s, s0) and torch.equal(z, z0), name
    assert log["val_mse"] <= log["start_val_mse"] * (1 + 1e-6)
