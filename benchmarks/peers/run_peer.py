"""Run one peer (llm-compressor GPTQ or AWQ) with OUR scheme on OUR calibration tokens.

Runs in the peers' own venv (benchmarks/peers/setup_peers.sh); never imports vllm_sqplus.
Scheme (the plugin's): INT4, asymmetric with zero point, group-wise along in_features (group 128,
64 for SmolLM2 whose hidden 576 is not a multiple of 128), every decoder linear quantized,
lm_head (and embeddings) kept in full precision.
Calibration: the [n, seq_len] statistics samples that `sqplus smooth` uses, dumped by
benchmarks/peers/dump_calib.py (safetensors, key stat_ids), fed as a datasets.Dataset, in order.

The model is calibrated in float32 (bf16 matmuls are slow on this AVX2 CPU and GPTQ's Hessian is
float32 anyway). Writes:
  OUT/compressed/   the compressed-tensors checkpoint (pack-quantized INT4) as llm-compressor saves it
  OUT/dense/        a dense checkpoint in the input model's dtype whose linears hold the dequantized
                    INT4 weights (what a W4A16 kernel computes with), readable by any HF loader
  OUT/peer_run.json wall time, peak RSS, versions, command, date, machine

usage: python run_peer.py --model DIR --method gptq|awq --calib FILE --group-size 64 --out OUT
           [--threads 1] [--max-samples N]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import socket
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/machine.py (stdlib only)
from machine import cpu_model  # noqa: E402


def patch_pin_memory() -> str:
    """llm-compressor 0.14 AWQ pins cached activations (IntermediatesCache.pin_memory) for faster
    host->device copies; with a CPU-only torch pin_memory raises. Nothing is copied to a device
    here, so pinning is a no-op by design. Patched at run time, site-packages untouched."""
    from llmcompressor.pipelines.cache import IntermediatesCache
    if not hasattr(IntermediatesCache, "pin_memory"):
        raise SystemExit("error: llmcompressor has no IntermediatesCache.pin_memory; check the version")
    IntermediatesCache.pin_memory = lambda self, *a, **k: None
    return "llmcompressor.pipelines.cache.IntermediatesCache.pin_memory -> no-op"


def recipe_for(method: str, group_size: int):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    weights = QuantizationArgs(num_bits=4, type="int", symmetric=False, strategy="group",
                               group_size=group_size)
    scheme = {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}
    if method == "gptq":
        from llmcompressor.modifiers.gptq import GPTQModifier
        return [GPTQModifier(config_groups=scheme, ignore=["lm_head"])]
    if method == "awq":
        from llmcompressor.modifiers.quantization import QuantizationModifier
        from llmcompressor.modifiers.transform.awq import AWQModifier
        return [AWQModifier(), QuantizationModifier(config_groups=scheme, ignore=["lm_head"])]
    raise SystemExit(f"error: unknown --method {method!r} (gptq or awq)")


def dequantized_state(model, dtype):
    """{name.weight: dequantized INT4 weight in dtype} for every quantized linear, computed with
    compressed-tensors' own fake_quantize from the module's final scale and zero point."""
    import torch
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    out, stats = {}, {"linears": 0, "max_levels_per_group": 0}
    for name, m in model.named_modules():
        scheme = getattr(m, "quantization_scheme", None)
        if scheme is None or scheme.weights is None or not hasattr(m, "weight_scale"):
            continue
        with torch.no_grad():
            w = fake_quantize(m.weight.float(), m.weight_scale.float(), m.weight_zero_point,
                              scheme.weights)
        g = scheme.weights.group_size
        levels = max(int(torch.unique(row).numel()) for row in w.reshape(-1, g)[:: max(1, w.numel() // g // 64)])
        stats["max_levels_per_group"] = max(stats["max_levels_per_group"], levels)
        stats["linears"] += 1
        out[name + ".weight"] = w.to(dtype)
    return out, stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--method", required=True, choices=["gptq", "awq"])
    ap.add_argument("--calib", required=True, help="safetensors from dump_calib.py (key stat_ids)")
    ap.add_argument("--group-size", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-samples", type=int, default=None,
                    help="calibrate on the first N statistics samples only (a prefix of the same tokens); "
                         "recorded in peer_run.json")
    a = ap.parse_args()
    t_start = time.time()
    import torch
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    import compressed_tensors
    import datasets
    import llmcompressor
    import transformers
    from llmcompressor import oneshot
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(a.out)
    if out.exists():
        raise SystemExit(f"error: --out {out} exists; remove it first")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    patch = patch_pin_memory()

    with safe_open(a.calib, "pt") as f:
        ids = f.get_tensor("stat_ids")
        calib_meta = f.metadata()
    n_all = ids.shape[0]
    if a.max_samples is not None:
        if not 1 <= a.max_samples <= n_all:
            raise SystemExit(f"error: --max-samples {a.max_samples} not in 1..{n_all}")
        ids = ids[: a.max_samples]
    n, seq_len = ids.shape
    ds = datasets.Dataset.from_dict({"input_ids": ids.tolist(),
                                     "attention_mask": torch.ones_like(ids).tolist()})
    src_dtype = getattr(torch, json.loads((Path(a.model) / "config.json").read_text()).get("dtype")
                        or json.loads((Path(a.model) / "config.json").read_text()).get("torch_dtype")
                        or "float32")
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
    t0 = time.time()
    oneshot(model=model, tokenizer=tok, dataset=ds, recipe=recipe_for(a.method, a.group_size),
            max_seq_length=seq_len, num_calibration_samples=n, shuffle_calibration_samples=False,
            pipeline="sequential")
    t_calib = time.time() - t0
    dense_sd, qstats = dequantized_state(model, src_dtype)
    # every other parameter as calibrated (AWQ folded its scales into the norms; GPTQ changed none);
    # taken before saving, which compresses the modules in place
    qparams = ("weight_scale", "weight_zero_point", "weight_g_idx", "weight_global_scale")
    others = {k: v.detach().to(src_dtype).clone() for k, v in model.state_dict().items()
              if k not in dense_sd and not k.endswith(qparams)}
    model.save_pretrained(tmp / "compressed", save_compressed=True)
    tok.save_pretrained(tmp / "compressed")
    t_total_quant = time.time() - t0
    del model
    # dense: the original checkpoint (same dtype, same config) with the calibrated parameters and
    # the dequantized linears
    dense = AutoModelForCausalLM.from_pretrained(a.model, dtype=src_dtype).eval()
    sd = dense.state_dict()
    missing = [k for k in list(dense_sd) + list(others) if k not in sd]
    if missing:
        raise SystemExit(f"error: calibrated names not in the original model: {missing[:3]}")
    changed = []
    with torch.no_grad():
        for k, v in dense_sd.items():
            sd[k].copy_(v)
        for k, v in others.items():
            if not torch.equal(sd[k], v):
                changed.append(k)
            sd[k].copy_(v)
    qstats["changed_other_params"] = len(changed)
    qstats["changed_other_examples"] = changed[:4]
    dense.save_pretrained(tmp / "dense")
    tok.save_pretrained(tmp / "dense")
    record = {
        "method": a.method, "model": str(Path(a.model).resolve()), "group_size": a.group_size,
        "scheme": "INT4 asymmetric (zero point), group-wise, every decoder Linear, lm_head kept",
        "calibration": {"file": str(Path(a.calib).resolve()), "samples": n, "of_samples": n_all, "seq_len": seq_len,
                        **calib_meta},
        "calibration_dtype": "float32", "dense_dtype": str(src_dtype).replace("torch.", ""),
        "seconds_oneshot": round(t_calib, 1), "seconds_quantize_and_save": round(t_total_quant, 1),
        "seconds_total": round(time.time() - t_start, 1),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
        "threads": a.threads, "quantized": qstats, "patch": patch,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "llmcompressor": llmcompressor.__version__,
                     "compressed_tensors": compressed_tensors.__version__, "datasets": datasets.__version__},
        "command": " ".join([sys.executable, *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"host": socket.gethostname(), "cpu": cpu_model(), "cores": os.cpu_count()},
    }
    (tmp / "peer_run.json").write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, out)
    print(json.dumps({k: record[k] for k in ("method", "seconds_total", "peak_rss_gib", "quantized")}))


if __name__ == "__main__":
    main()
