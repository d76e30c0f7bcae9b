"""transformers integration (vllm_sqplus/hf.py): from_pretrained on smoothed / packed checkpoints.

Tiny random Llama / Qwen2 checkpoints built here (tests/tiny.py). Ground truth: the same
checkpoint loaded as a plain float32 transformers model whose decoder linears carry
pseudo_quantize_int4(w) (dequantized INT4; lm_head kept).
Tolerances (float32 both sides; the kernel multiplies exactly and sums in another order):
  logits  max|got - ref| <= 1e-4 * max|ref|   (a wrong code, scale or zero point moves them by
          >1e-2; the full-precision model differs from the reference by far more, checked too)
  greedy  32 new tokens: the first 16 equal, >= 95% equal (a near-tie may flip a late token)
Memory (a subprocess, a model big enough to see a full-precision copy): RSS after loading
<= 1.10 x (runtime RSS + bytes of the loaded tensors); the anonymous-memory growth after loading
is under half of the full-precision linears' bytes, and its peak during loading under INT4 + half.
Measured (2-core EPYC VM, loaded machine, 2026-12-01): Llama 8 x 768/2048 float32 (216 MiB of FP
linears): runtime 489.6 MiB, after load 522.9 MiB vs expected 521.9 (INT4 linears 30.4 MiB), peak
anonymous growth while loading 42-73 MiB, 3 s.

This file is also the memory worker: `python test_hf.py mem MODEL_DIR OUT.json`.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve()
QC = {"quant_method": "smoothquant_plus", "bits": 4, "alpha": 0.5}


def _rss_kib() -> dict:
    with open("/proc/self/status") as f:
        rows = [line.split(":", 1) for line in f if line.startswith(("VmRSS", "RssAnon", "RssFile"))]
    return {k: int(v.split()[0]) for k, v in rows}


def _mem_worker(model_dir: str, warm_dir: str, out_path: str) -> None:
    """RSS of: the runtime (imports + a tiny warm-up load of the same architecture), then after
    loading model_dir through the smoothquant_plus quantizer; RssAnon sampled every 5 ms during the load."""
    import gc

    import vllm_sqplus  # noqa: F401  (registers smoothquant_plus)
    from transformers import AutoModelForCausalLM

    from vllm_sqplus.hf import _trim_heap, quantized_linears
    warm = AutoModelForCausalLM.from_pretrained(warm_dir)
    warm(torch.tensor([[1, 2, 3]]))
    del warm
    gc.collect()
    _trim_heap()
    runtime = _rss_kib()
    peak, stop = [runtime["RssAnon"]], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_kib()["RssAnon"])
            time.sleep(0.005)
    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    load_s = time.time() - t0
    stop.set()
    th.join()
    gc.collect()
    after = _rss_kib()
    tensors = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    lin = quantized_linears(model)
    int4 = sum(t.numel() * t.element_size() for m in lin.values() for t in m.buffers())
    Path(out_path).write_text(json.dumps({
        "runtime_kib": runtime, "after_kib": after, "peak_anon_kib": peak[0], "load_s": load_s,
        "tensor_bytes": tensors, "int4_linear_bytes": int4, "n_quantized": len(lin)}))


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    if sys.argv[1] == "mem":
        _mem_worker(sys.argv[2], sys.argv[3], sys.argv[4])
    sys.exit(0)


sys.path.insert(0, str(HERE.parent))
pytest.importorskip("transformers")
from tiny import CODE, save_tiny  # noqa: E402

import vllm_sqplus  # noqa: E402,F401
from vllm_sqplus.errors import SqplusError  # noqa: E402
from vllm_sqplus.kernels import W4A16Linear, ops  # noqa: E402
from vllm_sqplus.kernels.cpu_layout import unpack_cpu  # noqa: E402
from vllm_sqplus.quant import pseudo_quantize_int4, quantize_int4  # noqa: E402

needs_ext = pytest.mark.skipif(not ops.has_kernel("cpu"),
                               reason=f"sqplus CPU kernel not built: {ops.LOAD_ERROR}")
N_NEW = 32
LOGIT_TOL = 1e-4


def _with_qc(src: Path, dst: Path, qc: dict | None) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    if qc is None:
        cfg.pop("quantization_config", None)
    else:
        cfg["quantization_config"] = qc
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst


def _prompts(model_dir: Path) -> list[torch.Tensor]:
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    return [torch.tensor([tok(p)["input_ids"]]) for p in (CODE[:60], CODE[60:130], "for i in")]


@torch.no_grad()
def _reference(plain_dir: Path, group_size: int, zero_point: bool):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(plain_dir, dtype=torch.float32).eval()
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name != "lm_head":
            mod.weight.copy_(pseudo_quantize_int4(mod.weight, group_size, zero_point))
    return model


@torch.no_grad()
def _greedy(model, ids: torch.Tensor) -> list[int]:
    out = model.generate(ids, max_new_tokens=N_NEW, do_sample=False, min_new_tokens=N_NEW,
                         pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


def _assert_matches_reference(model, ref, prompts, what):
    for ids in prompts:
        with torch.no_grad():
            got, want = model(ids).logits, ref(ids).logits
        err = float((got - want).abs().max() / want.abs().max())
        assert err <= LOGIT_TOL, f"{what}: logits differ from the dequantized reference by {err:.2e}"
        g, w = _greedy(model, ids), _greedy(ref, ids)
        assert g[:16] == w[:16], f"{what}: first 16 tokens differ\n got {g[:16]}\nwant {w[:16]}"
        same = sum(a == b for a, b in zip(g, w)) / N_NEW
        assert len(g) == N_NEW and same >= 0.95, f"{what}: only {same:.0%} of {N_NEW} tokens equal"


def _gemm_calls(model, ids) -> int:
    """How many times our compiled op ran in one forward (profiler events of sqplus::w4a16_gemm)."""
    from torch.profiler import ProfilerActivity, profile
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        model(ids)
    return sum(e.count for e in prof.key_averages() if e.key == "sqplus::w4a16_gemm")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    llama = save_tiny(root / "llama", "llama", hidden=128, intermediate=256, heads=4)
    qwen = save_tiny(root / "qwen", "qwen2", seed=1, hidden=256, intermediate=512, heads=4, kv_heads=2)
    return dict(
        root=root, llama=llama, qwen=qwen,
        # `sqplus smooth`-shaped configs: asymmetric g64 on Llama, symmetric g128 on Qwen2 (qkv bias, GQA)
        llama_sm=_with_qc(llama, root / "llama_sm", dict(QC, group_size=64, zero_point=True)),
        qwen_sm=_with_qc(qwen, root / "qwen_sm", dict(QC, group_size=128, zero_point=False,
                                                      modules_to_not_convert=["lm_head"])))


# ---- import and registration ------------------------------------------------------------------
def _python(code: str, **env) -> str:
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1", **env))
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout.strip()


def test_import_is_cheap_and_registers_when_transformers_loads():
    out = _python("import sys, vllm_sqplus; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
                  "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING as M\n"
                  "print(M['smoothquant_plus'].__name__)")
    assert out.splitlines() == ["[]", "SmoothQuantPlusHfQuantizer"], out


def test_registers_when_transformers_was_imported_first():
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    from vllm_sqplus import hf
    assert AUTO_QUANTIZER_MAPPING["smoothquant_plus"] is hf.SmoothQuantPlusHfQuantizer
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["smoothquant_plus"] is hf.SmoothQuantPlusConfig
    hf.register()  # idempotent


def test_import_without_transformers():
    code = ("import sys; sys.modules['transformers'] = None\n"  # makes `import transformers` fail
            "import vllm_sqplus; print(vllm_sqplus.QUANT_METHOD)")
    assert _python(code) == "smoothquant_plus"


# ---- loading -----------------------------------------------------------------------------------
@needs_ext
@pytest.mark.parametrize("arch,g,zp", [("llama", 64, True), ("qwen", 128, False)])
def test_smoothed_checkpoint_loads_as_w4a16_on_cpu_kernel(ckpts, arch, g, zp):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(ckpts[f"{arch}_sm"]).eval()
    lin = {n: m for n, m in model.named_modules() if isinstance(m, W4A16Linear)}
    n_layers = model.config.num_hidden_layers
    assert len(lin) == 7 * n_layers, sorted(lin)
    # the CPU kernel: a backend object named "cpu" (kernels/backends.py) or the name "sqplus"
    assert all(getattr(m.backend, "name", m.backend) in ("cpu", "sqplus") and m.group_size == g
               for m in lin.values()), [m.backend for m in lin.values()]
    assert all(m.qweight.dtype == torch.int32 and m.qweight.device.type == "cpu" for m in lin.values())
    assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight.dtype == torch.float32
    assert not any(n.endswith("proj.weight") for n, _ in model.named_parameters())  # no FP leftovers
    if arch == "qwen":  # biases arrive before the weight is quantized and land in the W4A16Linear
        assert lin["model.layers.1.self_attn.q_proj"].bias.abs().sum() > 0
    prompts = _prompts(ckpts[arch])
    assert _gemm_calls(model, prompts[0]) == len(lin)  # every decoder linear ran our CPU op
    ref = _reference(ckpts[arch], g, zp)
    _assert_matches_reference(model, ref, prompts, f"{arch} smoothed g{g}")
    # the tolerance can fail: the full-precision model is far outside it
    fp = AutoModelForCausalLM.from_pretrained(ckpts[arch], dtype=torch.float32)
    with torch.no_grad():
        want = ref(prompts[0]).logits
        assert float((fp(prompts[0]).logits - want).abs().max() / want.abs().max()) > 50 * LOGIT_TOL


@needs_ext
def test_packed_checkpoint_loads_without_requantizing(ckpts):
    from transformers import AutoModelForCausalLM

    from vllm_sqplus.export import quantize_checkpoint
    packed = quantize_checkpoint(str(ckpts["qwen_sm"]), str(ckpts["root"] / "qwen_packed"))
    assert json.loads((packed / "config.json").read_text())["quantization_config"]["format"] == "packed"
    model = AutoModelForCausalLM.from_pretrained(packed).eval()
    fp = AutoModelForCausalLM.from_pretrained(ckpts["qwen"], dtype=torch.float32)
    lin = {n: m for n, m in model.named_modules() if isinstance(m, W4A16Linear)}
    assert len(lin) == 7 * model.config.num_hidden_layers
    for name, m in lin.items():  # integers equal: the codes are the checkpoint's, repacked exactly
        w = fp.get_submodule(name).weight
        q, _, _ = quantize_int4(w, 128, False)
        assert torch.equal(unpack_cpu(m.qweight, *q.shape), q), name
    prompts = _prompts(ckpts["qwen"])
    assert _gemm_calls(model, prompts[0]) == len(lin)
    _assert_matches_reference(model, _reference(ckpts["qwen"], 128, False), prompts, "qwen packed")


@needs_ext
def test_plain_checkpoint_with_config_argument(ckpts):
    """No quantization_config in config.json: passing SmoothQuantPlusConfig quantizes with RTN."""
    from transformers import AutoModelForCausalLM

    from vllm_sqplus.hf import SmoothQuantPlusConfig
    model = AutoModelForCausalLM.from_pretrained(
        ckpts["llama"], quantization_config=SmoothQuantPlusConfig(group_size=64)).eval()
    assert sum(isinstance(m, W4A16Linear) for m in model.modules()) == 14
    _assert_matches_reference(model, _reference(ckpts["llama"], 64, True), _prompts(ckpts["llama"])[:1],
                              "llama plain + config")


def test_bf16_model_runs(ckpts, tmp_path):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(ckpts["llama_sm"], dtype=torch.bfloat16).eval()
    lin = [m for m in model.modules() if isinstance(m, W4A16Linear)]
    assert lin and model.lm_head.weight.dtype == torch.bfloat16
    with torch.no_grad():
        logits = model(_prompts(ckpts["llama"])[0]).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


# ---- errors ------------------------------------------------------------------------------------
def test_bad_config_is_one_clear_error(ckpts, tmp_path):
    from transformers import AutoModelForCausalLM
    bad = _with_qc(ckpts["llama"], tmp_path / "bad", dict(QC, bits=3))
    with pytest.raises(SqplusError, match="bits must be 4"):
        AutoModelForCausalLM.from_pretrained(bad)


def test_group_size_that_does_not_divide_names_the_layer(tmp_path):
    from transformers import AutoModelForCausalLM
    plain = save_tiny(tmp_path / "odd", "llama", hidden=96, intermediate=192, heads=4)
    bad = _with_qc(plain, tmp_path / "odd_sm", dict(QC, group_size=64))
    with pytest.raises(SqplusError, match=r"model\.layers\.0\.self_attn\.q_proj: in_features 96 is not "
                                          r"divisible by group_size 64"):
        AutoModelForCausalLM.from_pretrained(bad)


def test_missing_linear_weight_is_an_error(ckpts, tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM
    broken = _with_qc(ckpts["llama"], tmp_path / "broken", dict(QC, group_size=64))
    f = broken / "model.safetensors"
    sd = load_file(f)
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, f, metadata={"format": "pt"})
    with pytest.raises(SqplusError, match="no weight for model.layers.1.mlp.up_proj"):
        AutoModelForCausalLM.from_pretrained(broken)


def test_save_pretrained_refuses(ckpts, tmp_path):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(ckpts["llama_sm"])
    with pytest.raises(ValueError, match="not serializable"):
        model.save_pretrained(tmp_path / "out")


# ---- memory ------------------------------------------------------------------------------------
@needs_ext
def test_rss_after_load_is_int4_model_plus_runtime(ckpts, tmp_path):
    """Quantize-while-loading keeps no full-precision copy: numbers go to the test's output."""
    big = save_tiny(tmp_path / "big", "llama", hidden=768, intermediate=2048, layers=8, heads=12)
    big = _with_qc(big, tmp_path / "big_sm", dict(QC, group_size=128))
    fp_linear_bytes = 8 * (4 * 768 * 768 + 3 * 768 * 2048) * 4
    out = tmp_path / "mem.json"
    p = subprocess.run([sys.executable, str(HERE), "mem", str(big), str(ckpts["llama_sm"]), str(out)],
                       capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0 and out.exists(), p.stderr[-3000:]
    r = json.loads(out.read_text())
    rt, after = r["runtime_kib"]["VmRSS"] * 1024, r["after_kib"]["VmRSS"] * 1024
    expected = rt + r["tensor_bytes"]
    growth_anon = (r["after_kib"]["RssAnon"] - r["runtime_kib"]["RssAnon"]) * 1024
    peak_growth = (r["peak_anon_kib"] - r["runtime_kib"]["RssAnon"]) * 1024
    mib = 2 ** 20
    print(f"\nmemory: runtime RSS {rt / mib:.1f} MiB, after load {after / mib:.1f} MiB, expected "
          f"(runtime + tensors) {expected / mib:.1f} MiB; tensors {r['tensor_bytes'] / mib:.1f} MiB of "
          f"which INT4 linears {r['int4_linear_bytes'] / mib:.1f} MiB; full-precision linears "
          f"{fp_linear_bytes / mib:.1f} MiB; anon growth {growth_anon / mib:.1f} MiB, peak anon growth "
          f"during load {peak_growth / mib:.1f} MiB; load {r['load_s']:.1f} s")
    assert r["n_quantized"] == 56
    assert after <= 1.10 * expected, r
    assert growth_anon < 0.5 * fp_linear_bytes, r
    # never the whole full-precision model at once (that would be >= int4 + fp_linear_bytes)
    assert peak_growth < r["int4_linear_bytes"] + 0.5 * fp_linear_bytes, r
