"""lm_head quantization (vllm_sqplus/lm_head.py): "int8" per row and "int4" W4A16, in vLLM and transformers.

Ground truth: the plain-PyTorch references quantize_int8 / pseudo_quantize_lm_head (int4 =
vllm_sqplus.quant.pseudo_quantize_int4), i.e. logits = h @ w_hat.T with w_hat in float32.
Tolerances (float32 both sides unless stated; only the summation order differs):
  Int8Backend float32        max|y - ref| <= 1e-5 * max|ref|
  Int8Backend bfloat16       8e-3 relative (the output is rounded to bfloat16, 2^-8 per element)
  logits from the engine     max|got - ref| <= 1e-4 * max|ref|   and the full-precision logits
  / transformers             differ from ref by more than 20x that (so the test sees the quantized
                             path, not the original weight)
  greedy tokens (vLLM)       first 16 of 48 equal, >= 95% equal, vs transformers with the same
                             fake-quantized linears and lm_head (a near-tie may flip a late token)
  the embedding              rows looked up by the engine equal the checkpoint's exactly (tied
                             and untied: only the logits are quantized)
vLLM runs in one subprocess (this file is the worker: `python test_lm_head.py SPEC OUT`), two
engines in it: a tied Qwen2 with lm_head int8 from config.json, an untied Llama with int4 from
the env SQPLUS_LM_HEAD on a plain checkpoint.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve()
N_NEW = 48
PROMPTS = ["def add(a, b):\n", "class Stack:\n    def push(self, x):\n"]
HIDDEN_ROWS = 5  # random hidden states fed to compute_logits (seed 0, both sides)
LOOKUP_IDS = [0, 1, 7, 300]


def _probe(model) -> dict:
    """Inside the engine: logits for seeded random hidden states, embedding rows, lm_head's tensors."""
    hidden = model.config.hidden_size
    g = torch.Generator().manual_seed(0)
    h = torch.randn(HIDDEN_ROWS, hidden, generator=g)
    logits = model.compute_logits(h)
    emb = model.model.embed_tokens(torch.tensor(LOOKUP_IDS))
    head = model.lm_head
    return {"logits": logits.tolist(), "emb": emb.tolist(),
            "head_params": {n: [str(p.dtype), list(p.shape)] for n, p in head.named_parameters()},
            "method": type(head.quant_method).__name__}


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    from vllm_jobs import worker
    worker(sys.argv[1], sys.argv[2], n_new=N_NEW, max_num_seqs=2, probes={"probe": _probe})
    sys.exit(0)


sys.path.insert(0, str(HERE.parent))
from tiny import fake_quantize_model, greedy_tokens, save_tiny  # noqa: E402

from vllm_sqplus.config import ENV_LM_HEAD, SqplusConfig, parse_config  # noqa: E402
from vllm_sqplus.errors import SqplusError  # noqa: E402
from vllm_sqplus.lm_head import (INT8, QuantizedLmHead, dequantize_int8,  # noqa: E402
                                 pseudo_quantize_lm_head, quantize_int8)
from vllm_sqplus.quant import pseudo_quantize_int4, sqnr_db  # noqa: E402

LOGIT_TOL = 1e-4


def _rel_max(y, ref) -> float:
    return float((y.float() - ref.float()).abs().max() / ref.float().abs().max())


# ---- the reference quantizer ----------------------------------------------------------------------
def test_int8_reference_per_row_symmetric():
    torch.manual_seed(0)
    w = torch.randn(37, 96) * torch.logspace(-3, 1, 37)[:, None]  # rows of very different ranges
    w[5] = 0.0                                                     # a padding row
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and s.shape == (37,) and s.dtype == w.dtype
    assert int(q.min()) >= -127 and int(q.max()) <= 127
    nonzero = [i for i in range(37) if i != 5]
    assert (q[nonzero].abs().amax(1) == 127).all()              # every row uses its full range
    assert (q[5] == 0).all() and torch.isfinite(s).all()
    err = (dequantize_int8(q, s) - w).abs()
    assert (err <= s[:, None] / 2 + 1e-12).all()                   # round to nearest
    assert 38 < sqnr_db(w[nonzero], dequantize_int8(q, s)[nonzero]) < 48  # ~40 dB on Gaussian rows


def test_int8_zero_row_float16_has_no_nan():
    w = torch.zeros(4, 64, dtype=torch.float16)
    w[1] = torch.linspace(-1, 1, 64, dtype=torch.float16)
    q, s = quantize_int8(w)
    assert (q[0] == 0).all() and torch.isfinite(dequantize_int8(q, s).float()).all()


def test_pseudo_quantize_lm_head_modes_and_bad_mode():
    torch.manual_seed(1)
    w = torch.randn(64, 256)
    assert pseudo_quantize_lm_head(w, "none") is w
    assert torch.equal(pseudo_quantize_lm_head(w, "int4", 64, True), pseudo_quantize_int4(w, 64, True))
    q, s = quantize_int8(w)
    assert torch.equal(pseudo_quantize_lm_head(w, "int8"), dequantize_int8(q, s))
    assert sqnr_db(w, pseudo_quantize_lm_head(w, "int8")) > sqnr_db(w, pseudo_quantize_lm_head(w, "int4")) + 15
    with pytest.raises(SqplusError, match=r"lm_head must be one of \['none', 'int8', 'int4'\], got 'int2'"):
        pseudo_quantize_lm_head(w, "int2")


# ---- the int8 GEMM ------------------------------------------------------------------------------
@pytest.mark.parametrize("m", [1, 3, 7, 16])  # both block sizes (M <= 4 and M > 4)
def test_int8_backend_float32_matches_reference(m):
    torch.manual_seed(m)
    n, k = 1100, 96  # N not a multiple of either block
    w, x, bias = torch.randn(n, k), torch.randn(2, m, k), torch.randn(n)
    q, s = quantize_int8(w)
    ref = x @ dequantize_int8(q, s, torch.float32).T + bias
    y = INT8.apply(x, INT8.pack(q, s), bias)
    assert y.shape == (2, m, n) and y.dtype == torch.float32
    assert _rel_max(y, ref) <= 1e-5
    assert _rel_max(x @ w.T + bias, ref) > 1e-3  # the quantization is visible at this tolerance


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_int8_backend_half_precision(dtype):
    torch.manual_seed(2)
    w, x = torch.randn(300, 128), torch.randn(5, 128).to(dtype)
    q, s = quantize_int8(w.to(dtype))
    ref = x.float() @ dequantize_int8(q, s, torch.float32).T
    y = INT8.apply(x, INT8.pack(q, s))
    assert y.dtype == dtype and _rel_max(y, ref) <= 8e-3


# ---- the config option ----------------------------------------------------------------------------
def test_config_lm_head_default_roundtrip_and_env():
    assert parse_config(None, env={}).lm_head == "none"
    assert "lm_head" not in SqplusConfig().to_dict()         # old checkpoints unchanged
    c = parse_config({"lm_head": "int8"}, env={})
    assert c.lm_head == "int8" and c.to_dict()["lm_head"] == "int8"
    assert parse_config(c.to_dict(), env={}) == c
    assert parse_config({"lm_head": "int8"}, env={ENV_LM_HEAD: "int4"}).lm_head == "int4"
    assert parse_config(None, env={ENV_LM_HEAD: "int8"}).lm_head == "int8"


@pytest.mark.parametrize("raw, env, match", [
    ({"lm_head": "fp8"}, {}, r"lm_head must be one of \['none', 'int8', 'int4'\], got 'fp8'"),
    ({"lm_head": True}, {}, r"lm_head must be one of .*got True"),
    ({}, {ENV_LM_HEAD: "int2"}, r"env SQPLUS_LM_HEAD must be one of .*got 'int2'"),
])
def test_config_bad_lm_head_is_one_clear_error(raw, env, match):
    with pytest.raises(SqplusError, match=match):
        parse_config(raw, env=env)


# ---- vLLM: the method on its own, then two engines ---------------------------------------------
@pytest.fixture
def no_tp_group(monkeypatch):
    import vllm.model_executor.parameter as vparam
    monkeypatch.setattr(vparam, "get_tensor_model_parallel_rank", lambda: 0)
    monkeypatch.setattr(vparam, "get_tensor_model_parallel_world_size", lambda: 1)


def _vllm_config(**qc):
    pytest.importorskip("vllm")
    from vllm_sqplus.vllm_compat import SmoothQuantPlusConfig
    return SmoothQuantPlusConfig.from_config({"quant_method": "smoothquant_plus", **qc})


def test_vllm_get_quant_method_for_lm_head_and_bad_value(monkeypatch):
    monkeypatch.delenv(ENV_LM_HEAD, raising=False)
    cfg = _vllm_config()
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
    head = ParallelLMHead.__new__(ParallelLMHead)  # only its type matters to get_quant_method
    emb = VocabParallelEmbedding.__new__(VocabParallelEmbedding)
    assert cfg.get_quant_method(head, "lm_head") is None     # none: vLLM's own full-precision head
    m = _vllm_config(lm_head="int8").get_quant_method(head, "lm_head")
    assert type(m).__name__ == "SqplusLmHeadMethod" and m.mode == "int8"
    assert _vllm_config(lm_head="int4").get_quant_method(emb, "model.embed_tokens") is None
    with pytest.raises(SqplusError, match=r"lm_head must be one of \['none', 'int8', 'int4'\], got 'q8_0'"):
        _vllm_config(lm_head="q8_0")


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_vllm_method_tied_keeps_embedding_full_precision(mode, no_tp_group):
    """SqplusLmHeadMethod on bare modules: tie, load, quantize; the embedding's weight untouched,
    lm_head holds only quantized tensors, logits = h @ pseudo_quantize_lm_head(w).T."""
    torch.manual_seed(3)
    n, k = 320, 256
    cfg = _vllm_config(lm_head=mode, group_size=64)
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
    method = cfg.get_quant_method(ParallelLMHead.__new__(ParallelLMHead), "lm_head")
    head, emb = torch.nn.Module(), torch.nn.Module()
    w = torch.randn(n, k)
    emb.weight = torch.nn.Parameter(w.clone(), requires_grad=False)
    method.create_weights(head, k, [n], k, n, torch.float32, weight_loader=None)
    assert head.weight.shape == (n, k)
    assert method.tie_weights(head, emb) is head and head.weight is emb.weight
    method.process_weights_after_loading(head)
    assert not hasattr(head, "weight") and torch.equal(emb.weight, w)   # lookup keeps FP rows
    assert all(p.dtype in (torch.int8, torch.int32, torch.float32) for p in head.parameters())
    assert all(p.dtype != torch.float32 or p.dim() < 2 or p.numel() < n * k // 4 for p in head.parameters())
    h = torch.randn(6, k)
    ref = h @ pseudo_quantize_lm_head(w, mode, 64, True).T
    got = method.apply(head, h)
    assert _rel_max(got, ref) <= LOGIT_TOL and _rel_max(h @ w.T, ref) > 20 * LOGIT_TOL


def test_vllm_int4_group_must_divide_hidden(no_tp_group):
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
    method = _vllm_config(lm_head="int4", group_size=128).get_quant_method(
        ParallelLMHead.__new__(ParallelLMHead), "lm_head")
    with pytest.raises(SqplusError, match=r"lm_head int4: hidden size 576 is not a multiple of group_size 128"):
        method.create_weights(torch.nn.Module(), 576, [320], 576, 320, torch.float32, weight_loader=None)


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    pytest.importorskip("vllm")
    root = tmp_path_factory.mktemp("lm_head")
    qwen = save_tiny(root / "qwen_tied", "qwen2", seed=4, hidden=256, intermediate=512, heads=4, kv_heads=2,
                     tie=True)
    cfg = json.loads((qwen / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "smoothquant_plus", "bits": 4, "group_size": 64,
                                  "zero_point": True, "lm_head": "int8"}
    (qwen / "config.json").write_text(json.dumps(cfg, indent=2))
    llama = save_tiny(root / "llama_untied", "llama", seed=5, hidden=256, intermediate=512, heads=4, kv_heads=2)
    from transformers import AutoTokenizer
    prompts = [AutoTokenizer.from_pretrained(llama)(p)["input_ids"] for p in PROMPTS]
    jobs = [{"name": "qwen_tied_int8", "model": str(qwen), "probes": ["probe"]},
            {"name": "llama_untied_int4", "model": str(llama), "quantization": "smoothquant_plus",
             "env": {ENV_LM_HEAD: "int4"}, "probes": ["probe"]}]
    from vllm_jobs import run
    runs = run(HERE, root, [(jobs, {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"})], prompts, timeout=900,
               drop_env=(ENV_LM_HEAD,))
    return {"results": runs["results"], "log": runs["log"], "qwen": qwen, "llama": llama,
            "prompts": prompts}


def _result(engines, name):
    r = engines["results"].get(name)
    assert r is not None, f"job {name} did not run:\n{engines['log'][-3000:]}"
    assert "error" not in r, f"job {name} failed: {r['error']}"
    return r


@torch.no_grad()
def _reference(model_dir: Path, mode: str, group_size: int):
    """transformers float32: decoder linears fake-quantized (INT4, zero point), lm_head
    pseudo-quantized in an untied copy, the embedding as stored."""
    from vllm_sqplus.checkpoint import load_full_precision
    model = load_full_precision(model_dir, torch.float32)
    fp_head = model.get_output_embeddings().weight.detach().clone()
    fake_quantize_model(model, group_size, True)
    model.lm_head.weight = torch.nn.Parameter(pseudo_quantize_lm_head(fp_head, mode, group_size, True),
                                              requires_grad=False)
    return model, fp_head


@pytest.mark.parametrize("name, key, mode, group, tied", [
    ("qwen_tied_int8", "qwen", "int8", 64, True),
    ("llama_untied_int4", "llama", "int4", 128, False),
])
def test_vllm_engine_logits_tokens_and_embedding(engines, name, key, mode, group, tied):
    r = _result(engines, name)
    from vllm_jobs import first
    probe = first(r["probe"])
    assert probe["method"] == "SqplusLmHeadMethod"
    assert "weight" not in probe["head_params"], probe["head_params"]  # no full-precision copy left
    want_dtype = "torch.int8" if mode == "int8" else "torch.int32"
    assert probe["head_params"]["sq_qweight"][0] == want_dtype
    model, fp_head = _reference(engines[key], mode, group)
    assert bool(model.config.tie_word_embeddings) is tied
    # logits of the engine's lm_head on seeded hidden states
    h = torch.randn(HIDDEN_ROWS, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    ref = h @ model.lm_head.weight.T
    got = torch.tensor(probe["logits"])
    assert got.shape == ref.shape
    assert _rel_max(got, ref) <= LOGIT_TOL, f"{name}: logits off by {_rel_max(got, ref):.2e}"
    assert _rel_max(h @ fp_head.T, ref) > 20 * LOGIT_TOL          # full precision would fail
    # the embedding lookup: the stored rows exactly (with tying, the very tensor lm_head was built from)
    emb = model.get_input_embeddings().weight[LOOKUP_IDS]
    assert torch.equal(torch.tensor(probe["emb"]), emb)
    if tied:
        assert torch.equal(emb, fp_head[LOOKUP_IDS])
    # greedy decoding end to end
    for g, w in zip(r["tokens"], greedy_tokens(model, engines["prompts"], N_NEW)):
        assert g[:16] == w[:16], f"{name}: first 16 tokens differ\n got {g[:16]}\nwant {w[:16]}"
        assert sum(a == b for a, b in zip(g, w)) / N_NEW >= 0.95


# ---- transformers ------------------------------------------------------------------------------
@pytest.mark.parametrize("mode, tied", [("int8", True), ("int4", False)])
def test_transformers_lm_head_matches_reference(tmp_path, monkeypatch, mode, tied):
    monkeypatch.delenv(ENV_LM_HEAD, raising=False)
    import vllm_sqplus  # noqa: F401  (registers the transformers quantizer)
    from transformers import AutoModelForCausalLM
    d = save_tiny(tmp_path / "m", "qwen2" if tied else "llama", seed=6, hidden=256, intermediate=512,
                  heads=4, kv_heads=2, tie=tied)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "smoothquant_plus", "group_size": 64, "lm_head": mode}
    (d / "config.json").write_text(json.dumps(cfg, indent=2))
    got_model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    head = got_model.get_output_embeddings()
    assert isinstance(head, QuantizedLmHead) and head.mode == mode
    assert not any(b.is_floating_point() and b.dim() == 2 and b.shape[0] == 320 for b in head.buffers())
    ref_model, fp_head = _reference(d, mode, 64)
    assert torch.equal(got_model.get_input_embeddings().weight, ref_model.get_input_embeddings().weight)
    ids = torch.tensor([engines_prompt_ids(d)])
    with torch.no_grad():
        got, want = got_model(ids).logits, ref_model(ids).logits
        assert _rel_max(got, want) <= LOGIT_TOL
        h = torch.randn(3, 256)
        assert _rel_max(head(h), h @ ref_model.lm_head.weight.T) <= LOGIT_TOL
        assert _rel_max(h @ fp_head.T, h @ ref_model.lm_head.weight.T) > 20 * LOGIT_TOL


def engines_prompt_ids(model_dir: Path) -> list[int]:
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(model_dir)(PROMPTS[0] + PROMPTS[1])["input_ids"]
