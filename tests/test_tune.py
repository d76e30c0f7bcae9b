"""sqplus tune: end-to-end tuning of norms, biases and group scales with the INT4 codes frozen.

References are plain PyTorch: quantize_int4 / dequantize_int4 (what the plugin's RTN at load does)
and a KL written out from log_softmax. Tolerances: the parametrization at its start and the scores
recomputed from the written checkpoint agree to float32 rounding (1e-6 relative); the stored
scales to the stored dtype's rounding (bfloat16: 2^-8 relative).
"""
from __future__ import annotations

import hashlib
import json

import pytest
import torch

from tiny import save_tiny
from vllm_sqplus.quant import dequantize_int4, quantize_int4

CALIB = "def f(x):\n    return [i * x for i in range(10)]\n\nclass A:\n    pass\n" * 300


def _smoothed(tmp_path, arch="qwen2", group=64):
    """A tiny full-precision checkpoint and its 'smoothed' twin (identity smoothing: the same
    weights with a smoothquant_plus quantization_config), bfloat16 like the real ones."""
    from vllm_sqplus.config import SqplusConfig
    fp = save_tiny(tmp_path / "fp", arch, dtype=torch.bfloat16)
    sm = tmp_path / "sm"
    sm.mkdir()
    for p in fp.iterdir():
        sm.joinpath(p.name).write_bytes(p.read_bytes())
    cfg = json.loads((fp / "config.json").read_text())
    cfg["quantization_config"] = SqplusConfig(group_size=group).to_dict(
        extra={"calibration": {"data": "x", "samples": 4, "heldout_samples": 2, "seq_len": 32, "gptq_samples": 6}})
    (sm / "config.json").write_text(json.dumps(cfg))
    calib = tmp_path / "c.txt"
    calib.write_text(CALIB)
    return fp, sm, calib


def _hashes(d):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in d.iterdir() if p.is_file()}


def test_group_scales_start_at_rtn_and_scale_each_group():
    from vllm_sqplus.tune import GroupScales
    torch.manual_seed(0)
    w = torch.randn(48, 256) * 0.05
    q, s, z = quantize_int4(w, 64)
    gs = GroupScales(w, 64, "w")
    assert torch.allclose(gs.weight(), dequantize_int4(q, s, z, 64, torch.float32), rtol=1e-6, atol=0)
    c = torch.rand(48, 4) + 0.5
    with torch.no_grad():
        gs.log_scale.copy_(c.log())
    c[~gs.free] = 1.0  # groups short of 15 steps keep their scale
    assert torch.allclose(gs.weight(), dequantize_int4(q, s.float() * c, z, 64, torch.float32), rtol=1e-6, atol=1e-9)


def test_codes_linear_matches_plain_autograd_through_the_dequantized_weight():
    """_CodesLinear rebuilds the weight in its backward; its gradients must be plain autograd's."""
    from vllm_sqplus.tune import GroupScales
    torch.manual_seed(0)
    w = torch.randn(24, 128) * 0.05
    gs = GroupScales(w, 64, "w")
    with torch.no_grad():
        gs.log_scale.uniform_(-0.2, 0.2)
    x = torch.randn(2, 5, 128, requires_grad=True)
    b = torch.randn(24, requires_grad=True)
    y = gs.linear(x, b)
    dy = torch.randn_like(y)
    gx, gl, gb = torch.autograd.grad(y, (x, gs.log_scale, b), dy)
    ref = torch.nn.functional.linear(x, (gs.qz.float() * gs.scales()[..., None]).reshape(24, 128), b)
    rx, rl, rb = torch.autograd.grad(ref, (x, gs.log_scale, b), dy)
    assert torch.allclose(y, ref, rtol=1e-6, atol=1e-7)
    for a, r in ((gx, rx), (gl, rl), (gb, rb)):
        assert torch.allclose(a, r, rtol=1e-5, atol=1e-6)
    assert (gl[~gs.free] == 0).all() and gl[gs.free].abs().sum() > 0


def test_mean_kl_is_the_textbook_kl():
    from vllm_sqplus.tune import mean_kl
    torch.manual_seed(0)
    a, b = torch.randn(5, 11), torch.randn(5, 11)
    p, lq = a.softmax(-1), b.log_softmax(-1)
    ref = (p * (p.log() - lq)).sum(-1).mean()
    assert torch.allclose(mean_kl(a, b), ref, rtol=1e-6)
    assert float(mean_kl(a, a)) == pytest.approx(0.0, abs=1e-7)


def test_topk_kl_is_the_kl_of_the_merged_distributions():
    from vllm_sqplus.tune import mean_kl, topk_kl
    torch.manual_seed(0)
    a, b = torch.randn(7, 50) * 3, torch.randn(7, 50) * 3
    t = torch.log_softmax(a, -1)
    # k = the whole vocabulary: the full KL
    top = torch.topk(t, 50)
    assert torch.allclose(topk_kl(top.values, top.indices.int(), b), mean_kl(a, b), rtol=1e-5)
    # k < vocabulary: the textbook KL of the (k tokens, one bucket) distributions, below the full KL
    k = 5
    top = torch.topk(t, k)
    p, q = t.exp(), torch.softmax(b, -1)

    def merged(d):
        head = d.gather(-1, top.indices)
        return torch.cat([head, 1 - head.sum(-1, keepdim=True)], -1).double()
    pm, qm = merged(p), merged(q)
    ref = (pm * (pm.log() - qm.log())).sum(-1).mean()
    got = topk_kl(top.values, top.indices.int(), b)
    assert float(got) == pytest.approx(float(ref), rel=1e-4)
    assert 0 < float(got) < float(mean_kl(a, b))
    assert float(topk_kl(top.values, top.indices.int(), a)) == pytest.approx(0.0, abs=1e-6)
    # its gradient flows to the student's logits
    b.requires_grad_(True)
    topk_kl(top.values, top.indices, b).backward()
    assert torch.isfinite(b.grad).all() and b.grad.abs().sum() > 0


def test_sqplus_tune_is_exact_under_rtn_at_load_and_lowers_the_served_kl(tmp_path):
    from safetensors.torch import load_file
    from vllm_sqplus.cli import main
    from vllm_sqplus.checkpoint import load_full_precision
    from vllm_sqplus.tune import heldout_kl, rtn_in_place, teacher_logprobs
    from vllm_sqplus.arch import get_arch
    fp, sm, calib = _smoothed(tmp_path)
    before = _hashes(sm)
    out = tmp_path / "out"
    assert main(["tune", str(sm), "--fp", str(fp), "--out", str(out), "--calib", str(calib), "--epochs", "3",
                 "--lr", "0.02", "--scale-lr", "0.01", "--topk", "64"]) == 0
    assert _hashes(sm) == before  # the input is never modified
    rec = json.loads((out / "sqplus_tune.json").read_text())
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "smoothquant_plus" and qc["tuned"]["kept"] is True
    assert rec["heldout_kl"] < 0.95 * rec["heldout_kl_start"]
    assert rec["rtn_at_load_code_mismatches"] == 0
    a, b = load_file(sm / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys()
    moved = {k for k in a if not torch.equal(a[k], b[k])}
    assert moved == set(rec["changed"]) and moved
    # only norms, biases and decoder linears move; embeddings (and lm_head) stay bit for bit
    assert all(k.endswith(("norm.weight", "proj.bias", "proj.weight")) for k in moved)
    assert any(k.endswith("norm.weight") for k in moved) and any(k.endswith("proj.bias") for k in moved)
    lin = "model.layers.1.mlp.down_proj.weight"
    assert lin in moved and b[lin].dtype == torch.bfloat16
    # RTN at load of the stored weights: the input's codes and zero points, new scales
    q1, s1, z1 = quantize_int4(a[lin], 64)
    q2, s2, z2 = quantize_int4(b[lin], 64)
    assert torch.equal(q1, q2) and torch.equal(z1, z2) and not torch.equal(s1, s2)
    # the recorded score is the served model's: recompute it from the written checkpoint
    from transformers import AutoTokenizer
    from vllm_sqplus.calib import load_calibration_texts, split_calibration, tokenize_samples
    tok = AutoTokenizer.from_pretrained(out)
    # the search's held-out samples: statistics 4, held-out 2, then the GPTQ stage's 2 extra
    _, held, ids = split_calibration(tokenize_samples(tok, load_calibration_texts(str(calib)), 8, 32), 4, 2, 6)
    assert rec["samples"] == ids.shape[0] == 6 and rec["heldout_samples"] == 2
    teacher_logp = teacher_logprobs(load_full_precision(fp, torch.float32), held)
    for path, key in ((out, "heldout_kl"), (sm, "heldout_kl_start")):
        m = load_full_precision(path, torch.float32)
        rtn_in_place(m, get_arch(m.config), 64, torch.bfloat16)
        assert heldout_kl(teacher_logp, m, held) == pytest.approx(rec[key], rel=1e-5)
    # the top 64 of 320 tokens hold at least a fifth of any distribution, and not all of it here
    assert 64 / 320 <= rec["teacher_topk_mass"] < 1.0 and rec["options"]["topk"] == 64


def test_tune_without_scales_keeps_every_linear_weight(tmp_path):
    from safetensors.torch import load_file
    from vllm_sqplus.cli import main
    fp, sm, calib = _smoothed(tmp_path, "llama")
    out = tmp_path / "out"
    assert main(["tune", str(sm), "--fp", str(fp), "--out", str(out), "--calib", str(calib), "--epochs", "2",
                 "--lr", "0.02", "--no-scales"]) == 0
    a, b = load_file(sm / "model.safetensors"), load_file(out / "model.safetensors")
    moved = {k for k in a if not torch.equal(a[k], b[k])}
    rec = json.loads((out / "sqplus_tune.json").read_text())
    assert rec["kept"] and moved and all(k.endswith("norm.weight") for k in moved)
    # the default k (1024) is more than this vocabulary: every token kept, the loss is the full KL
    assert rec["options"]["topk"] == 320 and rec["teacher_topk_mass"] == pytest.approx(1.0, abs=1e-5)


def test_a_tuning_that_does_not_lower_the_served_kl_is_not_kept(tmp_path):
    from safetensors.torch import load_file
    from vllm_sqplus.cli import main
    fp, sm, calib = _smoothed(tmp_path, "llama")
    out = tmp_path / "out"
    # a learning rate this large throws the norms and scales far off: worse on held-out samples
    assert main(["tune", str(sm), "--fp", str(fp), "--out", str(out), "--calib", str(calib), "--epochs", "1",
                 "--lr", "50", "--scale-lr", "5"]) == 0
    rec = json.loads((out / "sqplus_tune.json").read_text())
    assert rec["kept"] is False and rec["heldout_kl"] == rec["heldout_kl_start"] and rec["changed"] == []
    assert rec["heldout_kl_tuned"] > rec["heldout_kl_start"]
    a, b = load_file(sm / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def _fails(capsys, argv, needle):
    from vllm_sqplus.cli import main
    assert main(["tune", *argv]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("error:") == 1, err


def test_tune_bad_input_one_clear_error(tmp_path, capsys):
    fp, sm, calib = _smoothed(tmp_path)
    o = str(tmp_path / "o")
    before = {d: _hashes(d) for d in (fp, sm)}
    _fails(capsys, [str(tmp_path / "nope"), "--fp", str(fp), "--out", o], "model folder not found")
    _fails(capsys, [str(sm), "--fp", str(tmp_path / "nope"), "--out", o], "model folder not found")
    _fails(capsys, [str(fp), "--fp", str(fp), "--out", o], "is not a smoothed checkpoint")
    _fails(capsys, [str(sm), "--fp", str(sm), "--out", o], "is quantized; give the full-precision checkpoint")
    other = save_tiny(tmp_path / "other", "qwen2", dtype=torch.bfloat16, vocab=256)
    _fails(capsys, [str(sm), "--fp", str(other), "--out", o], "vocab_size 256 against 320")
    _fails(capsys, [str(sm), "--fp", str(fp), "--out", str(sm)], "--out must differ from the input")
    _fails(capsys, [str(sm), "--fp", str(fp), "--out", o, "--epochs", "0"], "--epochs must be >= 1, got 0")
    _fails(capsys, [str(sm), "--fp", str(fp), "--out", o, "--topk", "0"], "--topk must be >= 1, got 0")
    _fails(capsys, [str(sm), "--fp", str(fp), "--out", o, "--calib", str(tmp_path / "none.txt")], "none.txt")
    assert {d: _hashes(d) for d in (fp, sm)} == before
    (sm / "model.safetensors").rename(sm / "weights.bin")
    _fails(capsys, [str(sm), "--fp", str(fp), "--out", o], "has no *.safetensors weights")
    assert not (tmp_path / "o").exists()


def test_tune_bad_checkpoints_one_clear_error_before_training_and_inputs_untouched(tmp_path, capsys):
    """Unsupported architecture and a group size that does not divide a width: from config.json,
    before anything loads; NaN weights in either model: after loading, before any training."""
    from safetensors.torch import load_file, save_file
    o = str(tmp_path / "o")
    fp, sm, calib = _smoothed(tmp_path / "a")
    for d in (fp, sm):
        cfg = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**cfg, "architectures": ["FalconForCausalLM"]}))
    _fails(capsys, [str(sm), "--fp", str(fp), "--out", o], "unsupported architecture")
    fp, sm, calib = _smoothed(tmp_path / "b", group=128)  # hidden 128, intermediate 256: fits
    cfg = json.loads((sm / "config.json").read_text())
    cfg["quantization_config"]["group_size"] = 64
    for d, h in ((fp, 96), (sm, 96)):  # hidden 96 is not a multiple of 64
        c = json.loads((d / "config.json").read_text()) if d == fp else dict(cfg)
        (d / "config.json").write_text(json.dumps({**c, "hidden_size": h}))
    _fails(capsys, [str(sm), "--fp", str(fp), "--out", o], "not a multiple of group_size 64")
    for which in ("sm", "fp"):
        fp, sm, calib = _smoothed(tmp_path / f"nan-{which}")
        d = sm if which == "sm" else fp
        t = load_file(d / "model.safetensors")
        t["model.layers.0.mlp.up_proj.weight"][0, 0] = float("nan")
        save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})
        before = {x: _hashes(x) for x in (fp, sm)}
        _fails(capsys, [str(sm), "--fp", str(fp), "--out", o, "--calib", str(calib)], "NaN")
        assert {x: _hashes(x) for x in (fp, sm)} == before
    assert not (tmp_path / "o").exists()
