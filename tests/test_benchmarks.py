"""The kernel benchmark (benchmarks/kernel_bench.py) end to end on a tiny shape: it checks our kernel
against the reference before timing, and writes the JSON record and its markdown table."""
from __future__ import annotations

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import kernel_bench  # noqa: E402

from vllm_sqplus.kernels import ops  # noqa: E402


@pytest.mark.skipif(not ops.has_kernel("cpu"), reason=f"sqplus CPU kernel not built: {ops.LOAD_ERROR}")
def test_kernel_bench_cpu_writes_record(tmp_path):
    out = tmp_path / "k.json"
    assert kernel_bench.main(["--shapes", "128x256", "--m", "1,3", "--min-time", "0.001",
                              "--bandwidth-gib", "0.002", "--cold-gib", "0.01", "--threads", "1", "--out", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert rec["machine"]["device"] == "cpu" and rec["machine"]["slug"]
    assert [r["M"] for r in rec["rows"]] == [1, 3]
    for r in rec["rows"]:
        assert r["ours_rel_err"] < 1e-2 and r["methods"]["sqplus"]["us"] > 0
        assert {"torch_f32", "torch_bf16"} <= set(r["methods"]) and r["speedup_vs"]["torch_f32"] > 0
    md = (tmp_path / "k.md").read_text()
    assert "| 128x256 | 128x256 | 1 |" in md and rec["command"] in md


def test_machine_slug_names_a_folder():
    slug = kernel_bench.machine_slug("cpu")
    assert slug and "/" not in slug and slug == slug.lower() and slug.endswith(f"{os.cpu_count()}c")


def test_machine_uarch_tags_generic_cpu_names():
    """Two CPUs behind one generic VM name ("AMD EPYC") get different folders: the tag comes from
    the x86 family/model, unknown ones spell both out."""
    import machine
    assert machine.uarch("amd", 0x1A, 2) == "zen5"
    assert machine.uarch("amd", 0x19, 0x11) == "zen4" and machine.uarch("amd", 0x19, 0x01) == "zen3"
    assert machine.uarch("amd", 0x17, 0x31) == "zen2" and machine.uarch("intel", 6, 143) == "spr"
    assert machine.uarch("intel", 6, 1) == "f6m1" and machine.uarch("amd", None, 2) == ""


def test_gptq_layer_time_writes_record_and_the_orders_differ_only_after_the_first_linears(tmp_path):
    """benchmarks/gptq_layer_time.py on a tiny saved model: one record with the three orders timed;
    q/k/v see the same input in the usual and the true-sequential order (identical codes), the
    later linears do not."""
    import torch
    import gptq_layer_time
    from tiny import save_tiny
    src = save_tiny(tmp_path / "m", "qwen2", dtype=torch.bfloat16)
    out = tmp_path / "g.json"
    assert gptq_layer_time.main(["--model", str(src), "--samples", "2", "--seq-len", "32", "--group-size", "32",
                                 "--threads", "1", "--repeats", "1", "--out", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert set(rec["orders"]) == {"usual", "true-sequential", "true-sequential act-order"} and all(v["seconds"] > 0 for v in rec["orders"].values())
    d = rec["codes_differing_share"]
    assert d["self_attn.q_proj"] == d["self_attn.k_proj"] == d["self_attn.v_proj"] == 0.0
    assert d["mlp.down_proj"] > 0.0
    assert rec["command"].startswith("python benchmarks/gptq_layer_time.py") and rec["machine"]


def test_act_int16_error_writes_record_and_int16_stays_below_bf16_rounding(tmp_path):
    """benchmarks/act_int16_error.py on a tiny saved model: one row per linear type, the int16
    activations' error below the bfloat16 output rounding (their documented bound is 2^-16 of a
    group's max|x| per element), and the round trip is the twin's."""
    import torch
    import act_int16_error
    from tiny import save_tiny
    src = save_tiny(tmp_path / "m", "qwen2", dtype=torch.bfloat16)
    out = tmp_path / "a.json"
    assert act_int16_error.main(["--model", str(src), "--tokens", "64", "--group-size", "64", "--out", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert {r["linear"] for r in rec["rows"]} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                   "up_proj", "down_proj"}
    for r in rec["rows"]:
        assert 0 < r["int16_median"] < r["bf16_out_median"] and r["int16_max"] < r["bf16_out_max"]
    assert "| down_proj | 2 |" in (tmp_path / "a.md").read_text()
    x = (torch.randn(3, 128) * torch.linspace(0.01, 50, 128)).bfloat16()
    err = (act_int16_error.int16_roundtrip(x, 64) - x.float()).abs().view(3, 2, 64)
    assert (err <= x.float().abs().view(3, 2, 64).amax(-1, keepdim=True) * 2**-16 * 1.01).all()


def test_act_int16_error_bad_input_is_one_clear_error(tmp_path):
    import torch
    import act_int16_error
    from tiny import save_tiny
    with pytest.raises(SystemExit, match="no config.json there"):
        act_int16_error.main(["--model", str(tmp_path / "absent")])
    src = save_tiny(tmp_path / "m", "qwen2", dtype=torch.bfloat16)
    with pytest.raises(SystemExit, match="positive multiple of 8"):
        act_int16_error.main(["--model", str(src), "--group-size", "12"])
    with pytest.raises(SystemExit, match="divides no decoder linear"):  # hidden 128, intermediate 256
        act_int16_error.main(["--model", str(src), "--group-size", "96", "--out", str(tmp_path / "a.json")])
    assert not (tmp_path / "a.json").exists()


def test_kernel_ab_builds_a_revision_and_both_sides_agree(tmp_path, monkeypatch):
    """benchmarks/kernel_ab.py: the CPU sources of HEAD, built into their own op namespace, compute
    the same bits as the installed build on a small shape (HEAD's kernel is the installed one in a
    fresh clone); the record names the rows it timed. The build is cached per commit."""
    import subprocess
    if not ops.has_kernel("cpu"):
        pytest.skip("no compiled CPU kernel")
    monkeypatch.setenv("SQPLUS_AB_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "ab.json"
    r = subprocess.run([sys.executable, os.path.join(os.path.dirname(kernel_bench.__file__), "kernel_ab.py"),
                        "--rev", "HEAD", "--m", "1,3", "--shapes", "128x256", "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rec = json.loads(out.read_text())
    assert [(row["shape"], row["m"]) for row in rec["rows"]] == [("128x256", 1), ("128x256", 3)]
    assert all(row["new_us"] > 0 and row["old_us"] > 0 for row in rec["rows"])
    bad = subprocess.run([sys.executable, os.path.join(os.path.dirname(kernel_bench.__file__), "kernel_ab.py"),
                          "--rev", "no-such-rev"], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "is not a revision" in bad.stderr
    for shapes, why in (("64x100", "not a positive multiple of --group-size 128"), ("64by128", "is not NxK")):
        r = subprocess.run([sys.executable, os.path.join(os.path.dirname(kernel_bench.__file__), "kernel_ab.py"),
                            "--rev", "HEAD", "--shapes", shapes], capture_output=True, text=True, timeout=120)
        assert r.returncode != 0 and why in r.stderr and "Traceback" not in r.stderr, r.stderr[-500:]
