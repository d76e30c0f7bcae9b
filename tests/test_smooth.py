"""Smoothing is exact in full precision; the layer-by-layer runner equals the model's forward."""
import pytest
import torch

from tiny import tiny_model
from vllm_sqplus.arch import get_arch, get_module
from vllm_sqplus.calibrate import LayerwiseModel, get_act_scales
from vllm_sqplus.errors import SqplusError
from vllm_sqplus.search import Candidate, apply_smoothing
from vllm_sqplus.smooth import compute_smooth_scales

CASES = [("llama", {}), ("mistral", {"kv_heads": 2}), ("qwen2", {"kv_heads": 2}),
         ("llama", {"tie": True}), ("qwen2", {})]


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("arch_name,kw", CASES)
@pytest.mark.parametrize("alpha", [0.15, 0.5, 0.85])
def test_smoothed_logits_equal_original(arch_name, kw, alpha):
    model = tiny_model(arch_name, **kw)
    arch = get_arch(model.config)
    ids = torch.randint(0, 320, (3, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = get_act_scales(model, arch, ids)
    apply_smoothing(model, arch, stats, Candidate(alpha))
    with torch.no_grad():
        out = model(ids).logits
    assert _rel(out, ref) <= 1e-4
    # the weights did change (otherwise this test proves nothing)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert any("input_layernorm" in k for k in changed) and any("gate_proj" in k for k in changed)
    assert any("down_proj" in k for k in changed)  # up -> down pair
    gqa = kw.get("kv_heads", 4) != 4
    assert any("o_proj" in k for k in changed) != gqa  # v -> o only without GQA


def test_alpha_none_is_identity():
    model = tiny_model("llama")
    arch = get_arch(model.config)
    ids = torch.randint(0, 320, (2, 32))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_smoothing(model, arch, get_act_scales(model, arch, ids), Candidate(None))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_scales_follow_the_formula():
    x = torch.tensor([1.0, 4.0, 100.0, 0.0])
    w1 = torch.tensor([[0.5, -2.0, 0.1, 1e-7]])
    w2 = torch.tensor([[-1.0, 1.0, 0.2, 0.0]])
    s = compute_smooth_scales(x, [w1, w2], 0.5)
    wmax = torch.tensor([1.0, 2.0, 0.2, 1e-5])
    raw = x.clamp(min=1e-5).sqrt() / wmax.sqrt()
    torch.testing.assert_close(s, raw / torch.sqrt(raw.max() * raw.min()))
    assert float(s.max() * s.min()) == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize("arch_name,kw", CASES[:3])
def test_layerwise_forward_equals_model(arch_name, kw):
    model = tiny_model(arch_name, **kw)
    ids = torch.randint(0, 320, (5, 40))
    with torch.no_grad():
        ref = model(ids).logits
    out = LayerwiseModel(model, get_arch(model.config), batch_size=2).forward(ids)
    assert _rel(out, ref) <= 1e-5


def test_layerwise_statistics_are_max_abs_inputs():
    model = tiny_model("llama")
    arch = get_arch(model.config)
    ids = torch.randint(0, 320, (3, 16))
    seen = {}
    fc = get_module(model, "model.layers.1.mlp.down_proj")
    h = fc.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0].detach().clone()))
    with torch.no_grad():
        model(ids)
    h.remove()
    stats = get_act_scales(model, arch, ids, batch_size=2)
    torch.testing.assert_close(stats[1]["mlp.down_proj"], seen["x"].abs().amax(dim=(0, 1)), rtol=1e-5, atol=1e-6)


def test_unknown_architecture_is_named():
    from transformers import GPT2Config
    cfg = GPT2Config()
    cfg.architectures = ["GPT2LMHeadModel"]
    with pytest.raises(SqplusError, match="unsupported architecture GPT2LMHeadModel"):
        get_arch(cfg)


@pytest.mark.parametrize("stat,pairs", [("mean", "all"), ("mean", "norm"), ("max", "norm")])
def test_other_statistics_and_pair_sets_are_exact(stat, pairs):
    model = tiny_model("qwen2")
    arch = get_arch(model.config)
    ids = torch.randint(0, 320, (3, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
    down = model.model.layers[0].mlp.down_proj.weight.clone()
    apply_smoothing(model, arch, get_act_scales(model, arch, ids, stat=stat), Candidate(0.5, stat, pairs))
    with torch.no_grad():
        assert _rel(model(ids).logits, ref) <= 1e-4
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, down) == (pairs == "norm")
