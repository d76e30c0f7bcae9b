"""`sqplus smooth` end to end on tiny checkpoints, and every bad input it must refuse clearly."""
import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch

from tiny import CODE, save_tiny
from vllm_sqplus.cli import main

FAST = ["--seq-len", "32", "--samples", "6", "--heldout", "2", "--alpha-step", "0.25", "--group-size", "64"]


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("calib") / "code.jsonl"
    p.write_text("\n".join(json.dumps({"text": CODE * 3 + str(i)}) for i in range(4)) + "\n")
    return p


def _digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _logits(path, ids):
    from vllm_sqplus.checkpoint import load_full_precision
    m = load_full_precision(path)  # the smoothed weights themselves, not our INT4 transformers path
    with torch.no_grad():
        return m(ids).logits


@pytest.mark.parametrize("arch,kw", [("llama", {}), ("qwen2", {"kv_heads": 2}), ("llama", {"tie": True})])
def test_smooth_writes_equivalent_checkpoint(tmp_path, calib_file, arch, kw):
    src = save_tiny(tmp_path / "src", arch, **kw)
    before = _digest(src)
    out = tmp_path / "out"
    # --no-clip: smoothing alone is exact in full precision (clipping deliberately is not)
    assert main(["smooth", str(src), "--out", str(out), "--calib", str(calib_file), "--alpha", "0.5", "--no-clip",
                 *FAST]) == 0
    assert _digest(src) == before  # input untouched
    cfg = json.loads((out / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "smoothquant_plus" and qc["bits"] == 4 and qc["group_size"] == 64
    assert qc["zero_point"] is True and qc["alpha"] == 0.5
    for name in ("tokenizer.json", "sqplus_search.json", "sqplus_stats/act_scales.safetensors", "model.safetensors"):
        assert (out / name).is_file(), name
    # vLLM loads every top-level *.safetensors as weights: only the model's tensors may be there
    from safetensors import safe_open
    from vllm_sqplus.checkpoint import load_full_precision
    names = set(load_full_precision(out).state_dict())
    for f in out.glob("*.safetensors"):
        with safe_open(f, "pt") as sf:
            assert set(sf.keys()) <= names, f"{f.name} holds non-model tensors"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temp leftovers
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(3))
    ref, new = _logits(src, ids), _logits(out, ids)
    assert float((new - ref).abs().max() / ref.abs().max()) <= 1e-4
    # weights did change: a checkpoint copied unsmoothed would pass the check above too
    from safetensors.torch import load_file
    a, b = load_file(src / "model.safetensors"), load_file(out / "model.safetensors")
    assert not torch.equal(a["model.layers.0.input_layernorm.weight"], b["model.layers.0.input_layernorm.weight"])


def test_search_is_deterministic_and_picks_the_minimum(tmp_path, calib_file):
    src = save_tiny(tmp_path / "src", "llama")
    tables = []
    for i in range(2):
        out = tmp_path / f"out{i}"
        assert main(["smooth", str(src), "--out", str(out), "--calib", str(calib_file), *FAST, "--thorough"]) == 0
        tables.append(json.loads((out / "sqplus_search.json").read_text()))
    assert tables[0]["rows"] == tables[1]["rows"]
    rows = {r["name"]: r for r in tables[0]["rows"]}
    # identity always a candidate; the whole grid, clipping and the per-layer plan all scored
    assert {"rtn", "alpha=0", "alpha=0.5", "alpha=1", "rtn+clip", "per-layer+clip"} <= set(rows)
    # the lowest KL among the settings whose held-out NLL is no worse than RTN's (search.choose); then
    # the GPTQ stage run on that setting replaces it if search.keep_gptq_stage says so (both unit-tested
    # in test_search.py)
    from vllm_sqplus.search import choose, keep_gptq_stage
    base = choose([n for n, r in rows.items() if "base" not in r], rows)
    stage = [r for r in rows.values() if r.get("base") == base]
    assert len(stage) == 1  # FAST keeps the stage on: it must have been judged
    best = rows[stage[0]["name"] if keep_gptq_stage(stage[0], rows[base]) else base]
    assert tables[0]["chosen"] == best["name"]
    phases = tables[0]["peak_rss_gib_by_phase"]  # Linux: per phase, each at most the run's peak
    assert list(phases)[:2] == ["before", "calibrate_and_alpha_grid"] and list(phases)[-2:] == ["apply", "save_model"]
    assert all(0 < v <= tables[0]["peak_rss_gib"] + 1e-3 for v in phases.values())
    qc = json.loads((tmp_path / "out0" / "config.json").read_text())["quantization_config"]
    assert qc["choice"] == best["name"] and qc["search"]["kl"] == best["kl"]
    assert qc["search"]["kl"] <= rows["rtn"]["kl"]  # never worse than plain RTN on its own loss


def test_per_layer_plan_without_clip_is_exact_and_recorded(tmp_path, calib_file):
    src = save_tiny(tmp_path / "src", "qwen2", kv_heads=2)
    out = tmp_path / "out"
    assert main(["smooth", str(src), "--out", str(out), "--calib", str(calib_file), "--alpha-granularity",
                 "layer", "--no-clip", "--thorough", *FAST]) == 0
    table = json.loads((out / "sqplus_search.json").read_text())
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    rows = {r["name"]: r for r in table["rows"]}
    assert "per-layer" in rows and len(table["layers"]) == 2 and len(table["layer_log"]) == 2
    assert qc["search"]["kl"] == rows[table["chosen"]]["kl"]
    if rows[table["chosen"]]["kind"] == "per-layer":
        assert qc["alpha_granularity"] == "layer" and len(qc["layer_alphas"]) == 2
    ids = torch.randint(0, 320, (2, 24))
    ref, new = _logits(src, ids), _logits(out, ids)
    assert float((new - ref).abs().max() / ref.abs().max()) <= 1e-4


def test_pruned_phases_are_recorded_and_thorough_runs_them(tmp_path, calib_file, monkeypatch, capsys):
    import vllm_sqplus.search as search_mod
    monkeypatch.setattr(search_mod, "_prune", lambda scored, opts, n: "forced" if opts.prune else None)
    src = save_tiny(tmp_path / "src", "llama")
    tables = {}
    for flag in ([], ["--thorough"]):
        out = tmp_path / f"out{len(flag)}"
        assert main(["smooth", str(src), "--out", str(out), "--calib", str(calib_file), "--no-gptq", *FAST, *flag]) == 0
        tables[bool(flag)] = json.loads((out / "sqplus_search.json").read_text())
    # (FAST's --alpha-step is a full grid: no refinement to skip)
    assert tables[False]["pruned"] == {"smoothed+clip": "forced", "per_layer": "forced"}
    assert "skipped per_layer: forced" in capsys.readouterr().err
    assert tables[True]["pruned"] is None
    names = [{r["name"] for r in t["rows"]} for t in (tables[False], tables[True])]
    assert "per-layer+clip" in names[1] - names[0] and "rtn+clip" in names[0]


def test_group_size_the_kernels_cannot_take_fails_before_loading(tmp_path, capsys, calib_file):
    src = save_tiny(tmp_path / "src", "llama")
    line = _fails(capsys, ["smooth", str(src), "--out", str(tmp_path / "o"), "--calib", str(calib_file),
                           "--group-size", "16"], "--group-size 16")
    assert "group_size must be one of" in line
    assert "loading" not in capsys.readouterr().err


# ---- bad input: one clear line on stderr, exit 2, input untouched -----------------------------

def _fails(capsys, argv, pattern):
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [l for l in lines if "error" in l.lower()]
    assert errors == [lines[-1]] and lines[-1].startswith("sqplus smooth: error: "), lines  # one, last
    assert pattern in lines[-1], lines[-1]
    return lines[-1]


def test_sample_counts_below_one_are_one_error_before_any_work(tmp_path, capsys, calib_file):
    src = save_tiny(tmp_path / "src", "llama")
    for opt in ("--gptq-samples", "--samples", "--rounding-iters"):
        _fails(capsys, ["smooth", str(src), "--out", str(tmp_path / "o"), "--calib", str(calib_file), opt, "0"],
               "--gptq-samples must be >= 1")
    assert not (tmp_path / "o").exists()


def test_missing_folder(tmp_path, capsys):
    _fails(capsys, ["smooth", str(tmp_path / "nope"), "--out", str(tmp_path / "o")], "model folder not found")


def test_folder_without_config(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    _fails(capsys, ["smooth", str(tmp_path / "m"), "--out", str(tmp_path / "o")], "no config.json")


def test_unsupported_architecture(tmp_path, capsys, calib_file):
    src = save_tiny(tmp_path / "src", "llama")
    cfg = json.loads((src / "config.json").read_text())
    cfg["architectures"] = ["FalconForCausalLM"]
    (src / "config.json").write_text(json.dumps(cfg))
    _fails(capsys, ["smooth", str(src), "--out", str(tmp_path / "o"), "--calib", str(calib_file)],
           "unsupported architecture FalconForCausalLM")


def test_group_size_not_dividing(tmp_path, capsys, calib_file):
    src = save_tiny(tmp_path / "src", "llama", hidden=96, intermediate=192)
    err = _fails(capsys, ["smooth", str(src), "--out", str(tmp_path / "o"), "--calib", str(calib_file),
                          "--group-size", "64"], "not a multiple of group_size 64")
    assert "hidden_size 96" in err and "[32]" in err  # found from config.json, before loading


def test_nan_weights(tmp_path, capsys, calib_file):
    from safetensors.torch import load_file, save_file
    src = save_tiny(tmp_path / "src", "llama")
    sd = load_file(src / "model.safetensors")
    sd["model.layers.1.mlp.up_proj.weight"][0, 0] = float("inf")
    save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    _fails(capsys, ["smooth", str(src), "--out", str(tmp_path / "o"), "--calib", str(calib_file)],
           "model.layers.1.mlp.up_proj.weight contains NaN or Inf")


def test_corrupt_weights(tmp_path, capsys, calib_file):
    src = save_tiny(tmp_path / "src", "llama")
    w = src / "model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    _fails(capsys, ["smooth", str(src), "--out", str(tmp_path / "o"), "--calib", str(calib_file)],
           "cannot load weights")


@pytest.mark.parametrize("content,pattern", [("", "holds no text"), ("{not json\n", "not valid JSON"),
                                             ('{"foo": 1}\n', "no string field 'text'")])
def test_bad_calibration_file(tmp_path, capsys, content, pattern):
    src = save_tiny(tmp_path / "src", "llama")
    bad = tmp_path / "calib.jsonl"
    bad.write_text(content)
    _fails(capsys, ["smooth", str(src), "--out", str(tmp_path / "o"), "--calib", str(bad)], pattern)


def test_missing_calibration_file(tmp_path, capsys):
    src = save_tiny(tmp_path / "src", "llama")
    _fails(capsys, ["smooth", str(src), "--out", str(tmp_path / "o"), "--calib", str(tmp_path / "x.txt")],
           "calibration file not found")


def test_out_equal_to_model_and_not_empty(tmp_path, capsys, calib_file):
    src = save_tiny(tmp_path / "src", "llama")
    before = _digest(src)
    _fails(capsys, ["smooth", str(src), "--out", str(src)], "--out must differ")
    _fails(capsys, ["smooth", str(src), "--out", str(src / "sub")], "inside the input model folder")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    _fails(capsys, ["smooth", str(src), "--out", str(busy), "--calib", str(calib_file)], "--overwrite")
    assert (busy / "keep.txt").read_text() == "mine"
    assert _digest(src) == before
    assert main(["smooth", str(src), "--out", str(busy), "--calib", str(calib_file), "--overwrite",
                 "--alpha", "0.5", *FAST]) == 0
    assert not (busy / "keep.txt").exists() and (busy / "config.json").is_file()


def test_already_smoothed_and_bad_alpha(tmp_path, capsys, calib_file):
    src = save_tiny(tmp_path / "src", "llama")
    out = tmp_path / "out"
    assert main(["smooth", str(src), "--out", str(out), "--calib", str(calib_file), "--alpha", "0.5", *FAST]) == 0
    capsys.readouterr()
    _fails(capsys, ["smooth", str(out), "--out", str(tmp_path / "o2")], "already smoothed")
    _fails(capsys, ["smooth", str(src), "--out", str(tmp_path / "o3"), "--alpha", "1.5"], "--alpha must lie in [0, 1]")


@pytest.mark.parametrize("act_order,asym", [(True, False), (False, False), (True, True)])
def test_default_gptq_stage_is_scored_and_stored_in_rtn_reproducible_form(tmp_path, calib_file, act_order, asym):
    # act_order=True: act-order, true-sequential; False: --no-gptq-act-order
    # --no-gptq-true-sequential (GPTQ's usual order), both options off in one tiny run;
    # asym: the asymmetric stage (--gptq-asymmetric)
    """The default's last stage: GPTQ on the chosen smoothed + clipped weights, a row of its own,
    kept by search.keep_gptq_stage; when kept, every stored linear is a fixed point of the
    plugin's RTN at load (dequantize(quantize(w)) == w bit for bit), so the plugin reproduces it.
    Same in the usual order; the config records which order was used."""
    from safetensors.torch import load_file
    from vllm_sqplus.quant import dequantize_int4, quantize_int4
    src = save_tiny(tmp_path / "src", "llama", dtype=torch.bfloat16)
    out = tmp_path / "out"
    extra = [] if act_order else ["--no-gptq-act-order", "--no-gptq-true-sequential"]
    extra += ["--gptq-asymmetric"] if asym else ["--no-gptq-asymmetric"]
    assert main(["smooth", str(src), "--out", str(out), "--calib", str(calib_file), *FAST, *extra]) == 0
    table = json.loads((out / "sqplus_search.json").read_text())
    rows = {r["name"]: r for r in table["rows"]}
    g = [r for r in rows.values() if r.get("gptq")]
    assert len(g) == 1 and g[0]["rtn_at_load_mismatches"] == 0 and "gptq" in table["seconds"]
    assert not list(tmp_path.glob(".sqplus-spill-*"))  # the stage's spilled codes are gone with the run
    # the stage runs on the guarded choice among the other rows and replaces it when its KL is lower
    # and its NLL within one standard error of that base's (search.keep_gptq_stage)
    from vllm_sqplus.search import choose, keep_gptq_stage
    base = rows[choose([n for n, r in rows.items() if not r.get("gptq")], rows)]
    assert g[0]["name"] == base["name"] + "+gptq" and g[0]["base"] == base["name"]
    assert abs(g[0]["nll_minus_base"] - (g[0]["nll"] - base["nll"])) < 1e-9
    assert table["chosen"] == (g[0] if keep_gptq_stage(g[0], base) else base)["name"]
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["gptq"] == table["chosen"].endswith("+gptq")
    if qc["gptq"]:
        assert qc["gptq_act_order"] is act_order and qc["gptq_true_sequential"] is act_order
        assert qc["gptq_asymmetric"] is asym and ("gptq_asymmetric_ridge" in qc) is asym
    else:
        assert "gptq_act_order" not in qc and "gptq_true_sequential" not in qc
    sd = load_file(out / "model.safetensors")
    linears = [k for k in sd if k.endswith("proj.weight")]
    fixed = [torch.equal(dequantize_int4(*quantize_int4(sd[k], 64), 64, dtype=sd[k].dtype), sd[k]) for k in linears]
    if qc["gptq"]:
        assert all(fixed)
    else:  # smoothing + clipping only: stored weights are not on the INT4 grid
        assert not all(fixed)


@pytest.mark.parametrize("loss,target", [("mse", "fp"), ("normed", "layer")])
def test_learned_rounding_stage_is_scored_recorded_and_stored_in_rtn_reproducible_form(tmp_path, calib_file, loss,
                                                                                       target):
    """--rounding learned: the last stage is vllm_sqplus.rounding's, a row "<base>+learned" judged
    as the GPTQ stage is; the config says which stage was kept, and a kept stage's stored linears
    are fixed points of the plugin's RTN at load."""
    from safetensors.torch import load_file
    from vllm_sqplus.quant import dequantize_int4, quantize_int4
    src = save_tiny(tmp_path / "src", "qwen2", dtype=torch.bfloat16, kv_heads=2)
    out = tmp_path / "out"
    assert main(["smooth", str(src), "--out", str(out), "--calib", str(calib_file), *FAST,
                 "--rounding", "learned", "--rounding-iters", "20", "--rounding-loss", loss, "--rounding-target", target]) == 0
    table = json.loads((out / "sqplus_search.json").read_text())
    stage = [r for r in table["rows"] if r.get("stage")]
    assert len(stage) == 1 and stage[0]["name"].endswith("+learned") and stage[0]["rtn_at_load_mismatches"] == 0
    assert not any(r.get("gptq") for r in table["rows"]) and "learned" in table["seconds"]
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    kept = table["chosen"] == stage[0]["name"]
    assert qc["learned_rounding"] is kept and qc["gptq"] is False
    assert all(lg["loss"] == loss and lg["target"] == target for lg in stage[0]["layer_log"])
    assert qc.get("rounding_loss") == (loss if kept else None)
    assert qc.get("rounding_target") == (target if kept else None)
    sd = load_file(out / "model.safetensors")
    fixed = [torch.equal(dequantize_int4(*quantize_int4(sd[k], 64), 64, dtype=sd[k].dtype), sd[k])
             for k in sd if k.endswith("proj.weight")]
    assert all(fixed) if kept else not all(fixed)


@pytest.mark.parametrize("extra", [["--no-clip"], ["--alpha", "0.5"], ["--no-gptq"], ["--no-zero-point"]])
def test_learned_rounding_with_its_stage_turned_off_is_one_error_before_any_work(tmp_path, capsys, calib_file, extra):
    src = save_tiny(tmp_path / "src", "llama")
    _fails(capsys, ["smooth", str(src), "--out", str(tmp_path / "o"), "--calib", str(calib_file),
                    "--rounding", "learned", *extra], "--rounding learned is the search's last stage")
    assert not (tmp_path / "o").exists()


def test_rounding_loss_without_the_learned_stage_is_one_error(tmp_path, capsys, calib_file):
    src = save_tiny(tmp_path / "src", "llama")
    _fails(capsys, ["smooth", str(src), "--out", str(tmp_path / "o"), "--calib", str(calib_file),
                    "--rounding-loss", "normed"], "--rounding-loss normed sets the learned rounding's fit")
    _fails(capsys, ["smooth", str(src), "--out", str(tmp_path / "o"), "--calib", str(calib_file),
                    "--rounding-target", "layer"], "--rounding-target layer sets the learned rounding's fit")
    assert not (tmp_path / "o").exists()


def test_lm_head_option_is_written_and_read_back(tmp_path, calib_file):
    from vllm_sqplus.config import parse_config
    src = save_tiny(tmp_path / "src", "llama")
    out = tmp_path / "out"
    assert main(["smooth", str(src), "--out", str(out), "--calib", str(calib_file), "--alpha", "0.5",
                 "--no-clip", "--lm-head", "int4", *FAST]) == 0
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["lm_head"] == "int4" and parse_config(qc, env={}).lm_head == "int4"
    out2 = tmp_path / "out2"
    assert main(["smooth", str(src), "--out", str(out2), "--calib", str(calib_file), "--alpha", "0.5",
                 "--no-clip", *FAST]) == 0
    assert "lm_head" not in json.loads((out2 / "config.json").read_text())["quantization_config"]


def test_search_plot_takes_every_row_kind_the_search_writes(tmp_path):
    """Regression: a GPTQ row on a whole-model setting ("rtn+gptq", the choice on Qwen2.5-Coder-1.5B)
    has no alpha; the plot raised KeyError and the atomic write threw the 116-minute search away."""
    pytest.importorskip("matplotlib")
    from vllm_sqplus.smooth_cli import plot_search
    rows = [{"name": "rtn", "kind": "whole-model", "alpha": None, "clip": False, "kl": 0.05},
            {"name": "alpha=0.4", "kind": "whole-model", "alpha": 0.4, "clip": False, "kl": 0.06},
            {"name": "alpha=0.6", "kind": "whole-model", "alpha": 0.6, "clip": False, "kl": 0.07},
            {"name": "rtn+clip", "kind": "whole-model", "alpha": None, "clip": True, "kl": 0.045},
            {"name": "per-layer+clip", "kind": "per-layer", "clip": True, "kl": 0.048},
            {"name": "rtn+gptq", "kind": "whole-model", "clip": False, "gptq": True, "kl": 0.041}]
    plot_search({"rows": rows, "group_size": 128, "chosen": "rtn+gptq"}, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_gptq_range_search_without_act_order_is_one_error_before_any_work(tmp_path, calib_file, capsys):
    src = save_tiny(tmp_path / "src", "llama")
    out = tmp_path / "out"
    _fails(capsys, ["smooth", str(src), "--out", str(out), "--calib", str(calib_file), "--gptq-range-search",
                    "--no-gptq-act-order"], "--gptq-range-search goes with act-order")
    assert not out.exists()
    _fails(capsys, ["smooth", str(src), "--out", str(out), "--calib", str(calib_file), "--gptq-asymmetric",
                    "--no-gptq-true-sequential"], "--gptq-asymmetric goes with the true-sequential order")
    assert not out.exists()


def test_phase_peaks_record_each_phase_s_own_peak():
    """A 96 MiB buffer touched in one phase shows in that phase's peak and not in a later one's."""
    from vllm_sqplus.checkpoint import PhasePeaks
    p = PhasePeaks()
    if not p.ok:
        pytest.skip("this kernel cannot reset the peak resident set (/proc/self/clear_refs)")
    x = torch.ones(96 * 2**20 // 4)
    p.mark("big")
    del x
    p.mark("freed")   # its peak still holds x: the reset at "big" saw it resident
    p.mark("small")
    assert p.gib["big"] - p.gib["small"] >= 0.08 and "before" in p.gib


def test_peak_rss_survives_the_resets():
    """The kernel's ru_maxrss follows a VmHWM reset; peak_rss_gib (what sqplus_search.json and the
    gptq record report as the run's peak) must still hold a 192 MiB buffer freed before the reset."""
    import resource
    from vllm_sqplus.checkpoint import peak_rss_gib, proc_status_kib, reset_peak_rss
    if not reset_peak_rss():
        pytest.skip("this kernel cannot reset the peak resident set (/proc/self/clear_refs)")
    base = proc_status_kib("VmRSS") / 2**20
    x = torch.ones(192 * 2**20 // 4)
    del x
    reset_peak_rss()
    reset_peak_rss()  # a second reset finds the lower VmHWM and must not lower the kept peak
    assert proc_status_kib("VmHWM") / 2**20 < base + 0.1        # the reset really dropped the buffer's peak
    assert peak_rss_gib() >= base + 0.18
    assert peak_rss_gib() >= resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def test_split_calibration_keeps_the_held_out_samples_out_of_every_set():
    from vllm_sqplus.calib import split_calibration, split_heldout
    s = torch.arange(12)[:, None].repeat(1, 3)  # sample i holds i
    stats, held, g = split_calibration(s, 4, 2, 8)
    assert stats[:, 0].tolist() == [0, 1, 2, 3] and held[:, 0].tolist() == [4, 5]
    assert g[:, 0].tolist() == [0, 1, 2, 3, 6, 7, 8, 9]              # statistics, then after the held-out
    assert split_calibration(s, 4, 2, 3)[2][:, 0].tolist() == [0, 1, 2]  # fewer than the statistics
    assert split_calibration(s, 4, 2, 40)[2][:, 0].tolist() == [0, 1, 2, 3, 6, 7, 8, 9, 10, 11]  # what exists
    a, b = split_heldout(s[:5], 2)                                      # short stream: split_heldout's split
    stats, held, g = split_calibration(s[:5], 4, 2, 8)
    assert torch.equal(stats, a) and torch.equal(held, b) and torch.equal(g, a)


def test_gptq_stage_calibrates_on_the_gptq_samples(tmp_path, calib_file, monkeypatch):
    """--gptq-samples N: the GPTQ stage's stream is the statistics samples plus the ones after the
    held-out samples, N in all; statistics and held-out samples are the same as without it."""
    import vllm_sqplus.search as search_mod
    from transformers import AutoTokenizer
    from vllm_sqplus.calib import load_calibration_texts, tokenize_samples
    seen, real = {}, search_mod._pass_gptq

    def spy(runner, **kw):
        seen["gptq"] = kw["stat_ids"].clone()
        return real(runner, **kw)
    real_search = search_mod.search

    def spy_search(model, arch, stat_ids, heldout, q, opts=None, **kw):
        seen["stats"], seen["held"] = stat_ids.clone(), heldout.clone()
        return real_search(model, arch, stat_ids, heldout, q, opts, **kw)
    monkeypatch.setattr(search_mod, "_pass_gptq", spy)
    monkeypatch.setattr(search_mod, "search", spy_search)
    src = save_tiny(tmp_path / "src", "llama", dtype=torch.bfloat16)
    out = tmp_path / "out"
    assert main(["smooth", str(src), "--out", str(out), "--calib", str(calib_file), *FAST, "--gptq-samples", "8"]) == 0
    stream = tokenize_samples(AutoTokenizer.from_pretrained(src), load_calibration_texts(str(calib_file)), 10, 32)
    assert stream.shape[0] == 10  # the fixture is long enough for 6 + 2 + 2 samples
    assert torch.equal(seen["stats"], stream[:6]) and torch.equal(seen["held"], stream[6:8])
    assert torch.equal(seen["gptq"], torch.cat([stream[:6], stream[8:10]]))
    table = json.loads((out / "sqplus_search.json").read_text())
    assert table["gptq_tokens"] == (8 * 32 if table["chosen"].endswith("+gptq") else 0)


@pytest.mark.parametrize("row,identity_won", [("paper", False), ("paper", True), ("best-alpha", True)])
def test_sq_variant_writes_the_scored_whole_model_alpha(tmp_path, calib_file, row, identity_won, monkeypatch):
    """benchmarks/sq_variant.py: --row paper re-applies the run's paper_alpha (the identity allowed),
    --row best-alpha the lowest-KL smoothed alpha of the run's table; the checkpoint is the source
    model smoothed by that alpha from the run's saved statistics (exact in float32: same logits),
    records the alpha, and leaves the run and the source untouched."""
    import importlib.util
    src = save_tiny(tmp_path / "src", "llama")
    run = tmp_path / "run"
    assert main(["smooth", str(src), "--out", str(run), "--calib", str(calib_file), "--no-gptq", *FAST]) == 0
    table = json.loads((run / "sqplus_search.json").read_text())
    if identity_won:  # as on both Qwen2.5-Coder models: the identity had the lowest KL of the grid
        table["paper_alpha"] = None
        (run / "sqplus_search.json").write_text(json.dumps(table))
    before = (_digest(src), _digest(run))
    spec = importlib.util.spec_from_file_location(
        "sq_variant", Path(__file__).resolve().parent.parent / "benchmarks" / "sq_variant.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "v"
    monkeypatch.setattr(sys, "argv", ["sq_variant", "--model", str(src), "--run", str(run), "--out", str(out),
                                      "--row", row])
    mod.main()
    smoothed = [r for r in table["rows"] if r["kind"] == "whole-model" and not r["clip"] and not r.get("gptq")
                and r["alpha"] is not None]
    want = table["paper_alpha"] if row == "paper" else min(smoothed, key=lambda r: r["kl"])["alpha"]
    assert (want is None) == (row == "paper" and identity_won)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["alpha"] == want and qc["choice"] == row and not qc["clipped"]
    rec = json.loads((out / "sqplus_search.json").read_text())
    assert rec["chosen_alpha"] == want
    ph = table["peak_rss_gib_by_phase"]  # the paper form's phases only, not the whole run's peak
    assert rec["peak_rss_gib"] == max(ph[k] for k in ("before", "calibrate_and_alpha_grid", "alpha_refine") if k in ph)
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_logits(out, ids), _logits(src, ids), rtol=1e-4, atol=1e-4)
    from safetensors.torch import load_file
    a, b = load_file(src / "model.safetensors"), load_file(out / "model.safetensors")
    norm = "model.layers.0.input_layernorm.weight"
    assert torch.equal(a[norm], b[norm]) == (want is None)   # smoothed unless the identity
    assert (_digest(src), _digest(run)) == before
