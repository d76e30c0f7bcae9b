"""vLLM + our plugin serves AWQ, GPTQ and compressed-tensors W4A16 checkpoints on our kernels.

The checkpoints are written here from tiny random Llama / Qwen2 models (tests/tiny.py) in the
exact layouts of AutoAWQ (GEMM), AutoGPTQ (v1, sym), GPTQModel (v2, asym, desc_act) and
compressed-tensors (`sqplus quantize --format compressed-tensors`, bit-checked against the
library in test_compressed_tensors.py); the writers are checked against vLLM's own packers in
test_formats.py. vLLM runs in a subprocess (this file is the worker: `python
test_formats_vllm.py SPEC OUT`), with quantization="smoothquant_plus".

Ground truth: transformers on the plain checkpoint with every decoder linear's weight replaced
by the dequantized INT4 weight the checkpoint encodes; greedy decoding, float32 on both sides.
Tolerance: the first 16 of 48 tokens equal and >= 95% of them (accumulation order differs).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve()
N_NEW = 48
PROMPTS = ["def add(a, b):\n", "class Stack:\n    def push(self, x):\n", "for i in range(10):\n"]


def _methods(model) -> list[str]:
    return sorted({type(m.quant_method).__name__ for m in model.modules()
                   if getattr(m, "quant_method", None) is not None})


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    from vllm_jobs import worker
    worker(sys.argv[1], sys.argv[2], n_new=N_NEW, max_num_seqs=4, probes={"methods": _methods})
    sys.exit(0)


sys.path.insert(0, str(HERE.parent))
pytest.importorskip("vllm")
from tiny import save_tiny  # noqa: E402

from vllm_sqplus.formats import awq_pack_linear, gptq_pack_linear  # noqa: E402
from vllm_sqplus.quant import dequantize_int4, quantize_int4  # noqa: E402

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _order(k: int) -> torch.Tensor:
    """GPTQ's act-order processing order of K input channels: one per K, since q/k/v (and
    gate/up) share their input and so their g_idx."""
    return torch.randperm(k, generator=torch.Generator().manual_seed(k))


def _write_foreign(plain: Path, out: Path, kind: str, g: int, qc: dict) -> dict:
    """plain checkpoint -> `kind` checkpoint in out; returns {linear: dequantized weight float32}."""
    import shutil

    from safetensors.torch import load_file, save_file
    shutil.copytree(plain, out)
    sd = load_file(out / "model.safetensors")
    ref = {}
    n_layers = json.loads((plain / "config.json").read_text())["num_hidden_layers"]
    for i in range(n_layers):
        for lin in LINEARS:
            name = f"model.layers.{i}.{lin}"
            w = sd.pop(f"{name}.weight")
            k = w.shape[1]
            if kind == "awq":
                q, s, z = quantize_int4(w, g, True)
                t = awq_pack_linear(q, s, z)
                ref[name] = dequantize_int4(q, s, z, g, torch.float32)
            elif kind == "gptq_v1_sym":
                q, s, z = quantize_int4(w, g, False)
                t = gptq_pack_linear(q, s, z, v1=True)
                ref[name] = dequantize_int4(q, s, z, g, torch.float32)
            else:  # gptq_v2 asymmetric with desc_act: groups follow a processing order
                order = _order(k)
                q_p, s, z = quantize_int4(w[:, order], g, True)
                q = torch.empty_like(q_p)
                q[:, order] = q_p
                g_idx = torch.empty(k, dtype=torch.int32)
                g_idx[order] = torch.arange(k, dtype=torch.int32) // g
                t = gptq_pack_linear(q, s, z, v1=False, g_idx=g_idx)
                w_hat = torch.empty(w.shape)
                w_hat[:, order] = dequantize_int4(q_p, s, z, g, torch.float32)
                ref[name] = w_hat
            sd.update({f"{name}.{key}": v.contiguous() for key, v in t.items()})
    save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"] = qc
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return ref


def _ct_reference(plain: Path, g: int, zp: bool) -> dict:
    from safetensors.torch import load_file
    sd = load_file(plain / "model.safetensors")
    ref = {}
    for key, w in sd.items():
        name = key[: -len(".weight")]
        if key.endswith(".weight") and any(name.endswith(lin) for lin in LINEARS):
            q, s, z = quantize_int4(w, g, zp)
            ref[name] = dequantize_int4(q, s, z, g, torch.float32)
    return ref


@torch.no_grad()
def _reference_tokens(plain: Path, weights: dict, prompts) -> list[list[int]]:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(plain, dtype=torch.float32).eval()
    for name, w in weights.items():
        model.get_submodule(name).weight.copy_(w)
    outs = []
    for p in prompts:
        ids = torch.tensor([p])
        out = model.generate(ids, max_new_tokens=N_NEW, min_new_tokens=N_NEW, do_sample=False, pad_token_id=0)
        outs.append(out[0, len(p):].tolist())
    return outs


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from transformers import AutoTokenizer

    from vllm_sqplus.export import quantize_checkpoint
    root = tmp_path_factory.mktemp("foreign")
    llama = save_tiny(root / "llama", "llama", dtype=torch.float16, hidden=256, intermediate=512,
                      heads=4, kv_heads=2)
    qwen = save_tiny(root / "qwen", "qwen2", seed=1, dtype=torch.float16, hidden=256, intermediate=512,
                     heads=4, kv_heads=2)  # qkv biases
    ckpts = {
        "awq": (llama, _write_foreign(llama, root / "awq", "awq", 128, {
            "quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm",
            "modules_to_not_convert": None})),
        "gptq_v1_sym": (llama, _write_foreign(llama, root / "gptq_v1_sym", "gptq_v1_sym", 64, {
            "quant_method": "gptq", "bits": 4, "group_size": 64, "desc_act": False, "sym": True,
            "checkpoint_format": "gptq", "damp_percent": 0.01, "true_sequential": True})),
        "gptq_v2_actorder": (qwen, _write_foreign(qwen, root / "gptq_v2_actorder", "gptq_v2_actorder", 128, {
            "quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": True, "sym": False,
            "checkpoint_format": "gptq_v2"})),
    }
    quantize_checkpoint(str(qwen), str(root / "ct"), fmt="compressed-tensors")
    ckpts["ct"] = (qwen, _ct_reference(qwen, 128, True))
    tok = AutoTokenizer.from_pretrained(llama)
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    jobs = [{"name": name, "model": str(root / name), "quantization": "smoothquant_plus", "probes": ["methods"]}
            for name in ckpts]
    jobs.append({"name": "awq_no_flag", "model": str(root / "awq"), "probes": ["methods"]})  # vLLM's own AWQ
    # tensor parallelism: column shards split N in packed words, row shards split K (and groups)
    tp_jobs = [{"name": "awq_tp2", "model": str(root / "awq"), "quantization": "smoothquant_plus", "tp": 2,
                "probes": ["methods"]}]
    ckpts["awq_tp2"] = ckpts["awq"]
    from vllm_jobs import run
    runs = run(HERE, root, [(jobs, {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}),
                            # one NUMA node here: TP ranks need the thread binding off
                            (tp_jobs, {"VLLM_CPU_OMP_THREADS_BIND": "nobind"})], prompts, timeout=900)
    results, log = runs["results"], runs["log"]
    for r in results.values():  # the union over workers; TP=2 workers may not unpickle the probe
        m = r.get("methods")
        r["methods"] = sorted(set().union(*m)) if isinstance(m, list) else None
    return {"results": results, "ckpts": ckpts, "prompts": prompts, "log": log}


@pytest.mark.parametrize("name", ["awq", "gptq_v1_sym", "gptq_v2_actorder", "ct", "awq_tp2"])
def test_vllm_serves_foreign_checkpoint_on_our_kernels(served, name):
    r = served["results"].get(name)
    assert r is not None, served["log"][-3000:]
    assert "error" not in r, r["error"]
    # TP=2 workers may not report their methods; vLLM's own AWQ refuses float32, so the tokens
    # below can only come from ours
    assert r["methods"] is None and name.endswith("_tp2") or "SqplusLinearMethod" in r["methods"], r
    plain, weights = served["ckpts"][name]
    want = _reference_tokens(plain, weights, served["prompts"])
    for g, w in zip(r["tokens"], want):
        assert g[:16] == w[:16], f"{name}: first 16 tokens differ\n got {g[:16]}\nwant {w[:16]}"
        same = sum(a == b for a, b in zip(g, w)) / N_NEW
        assert same >= 0.95, f"{name}: only {same:.0%} of {N_NEW} tokens equal"


def test_without_the_flag_vllm_keeps_its_own_method(served):
    r = served["results"]["awq_no_flag"]
    # vLLM picked its own AWQ method: here it refuses float32 ("... for quantization method awq"),
    # elsewhere it may run; either way never ours
    if "error" in r:
        assert "quantization method awq" in r["error"], r["error"]
    else:
        assert "SqplusLinearMethod" not in r["methods"], r


def test_override_claims_foreign_checkpoints_only_on_request():
    from vllm_sqplus.errors import SqplusError
    from vllm_sqplus.vllm_compat import SmoothQuantPlusConfig as C
    awq = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}
    assert C.override_quantization_method(awq, None) is None
    assert C.override_quantization_method(awq, "awq") is None
    assert C.override_quantization_method(awq, "smoothquant_plus") == "smoothquant_plus"
    with pytest.raises(SqplusError, match="3-bit"):
        C.override_quantization_method(dict(awq, bits=3), "smoothquant_plus")
