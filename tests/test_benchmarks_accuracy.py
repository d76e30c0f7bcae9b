"""benchmarks/accuracy.py (one evaluation for every variant) and benchmarks/accuracy_table.py (the
generated table), on a tiny random model built here: no downloads."""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from tiny import CODE, save_tiny
from vllm_sqplus.quant import dequantize_int4, pseudo_quantize_int4, quantize_int4

_BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, _BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


acc = _load("accuracy")
table = _load("accuracy_table")
GS = 32
TEXTS = {"code": CODE * 40, "english": ("The quick brown fox jumps over the lazy dog. " * 200)}


@pytest.fixture(scope="module")
def fp_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("fp") / "m", hidden=64, intermediate=128, tie=False)


def _linears(model):
    for layer in model.model.layers:
        yield from (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                    layer.self_attn.o_proj, layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj)


def _prequantized(fp_dir: Path, out: Path) -> Path:
    """A dense checkpoint on an INT4 grid that RTN would NOT reproduce (what GPTQ writes, in spirit):
    the RTN codes clamped to 1..14 keep RTN's scale, but re-quantizing them picks a narrower range."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    m = AutoModelForCausalLM.from_pretrained(fp_dir, dtype=torch.float32)
    with torch.no_grad():
        for lin in _linears(m):
            q, s, z = quantize_int4(lin.weight, GS, True)
            lin.weight.copy_(dequantize_int4(q.clamp(1, 14), s, z, GS, torch.float32))
    m.save_pretrained(out)
    AutoTokenizer.from_pretrained(fp_dir).save_pretrained(out)
    return out


@torch.no_grad()
def _ref_ppl(model, ids) -> float:
    lp = torch.log_softmax(model(ids).logits[:, :-1].float(), -1)
    return math.exp(float(-lp.gather(-1, ids[:, 1:, None]).mean()))


def _run(fp_dir, variants, tmp_path, out=None):
    return acc.run(fp_dir, "tiny", variants, GS, n_windows=3, seq_len=64, cache_root=tmp_path / "cache",
                   out=out, command="pytest", texts=TEXTS)


def test_fp_kl_zero_rtn_differs_prequantized_not_requantized(fp_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    pre = _prequantized(fp_dir, tmp_path / "pre")
    out = tmp_path / "acc.json"
    rec = _run(fp_dir, [("RTN", "rtn", str(fp_dir)), ("PRE", "prequantized", str(pre))], tmp_path, out)
    v = rec["variants"]
    assert v["FP"]["code_kl"] == 0.0 and v["FP"]["english_kl"] == 0.0
    assert v["RTN"]["code_kl"] > 1e-4 and v["RTN"]["code_ppl"] != v["FP"]["code_ppl"]
    assert v["RTN"]["fake_quantized_linears"] == 14
    # PRE is evaluated as stored: its perplexity is that of the stored weights, and re-quantizing
    # them (which would be a bug) changes them, so the equality below can fail
    m = AutoModelForCausalLM.from_pretrained(pre, dtype=torch.float32).eval()
    w = m.model.layers[0].mlp.down_proj.weight
    assert not torch.equal(pseudo_quantize_int4(w, GS, True), w)
    ids = acc.windows(AutoTokenizer.from_pretrained(fp_dir), TEXTS["code"], 3, 64)
    assert v["PRE"]["code_ppl"] == pytest.approx(_ref_ppl(m, ids), rel=1e-5)
    assert v["PRE"]["code_ppl"] != pytest.approx(v["RTN"]["code_ppl"], rel=1e-4)
    assert v["PRE"]["max_levels_per_group"] <= 14 and "fake_quantized_linears" not in v["PRE"]
    assert v["PRE"]["code_kl"] > 0
    assert json.loads(out.read_text())["variants"].keys() == {"FP", "RTN", "PRE"}
    assert rec["windows"]["code"]["n"] == 3 and rec["windows"]["code"]["seq_len"] == 64


def test_ppl_matches_plain_reference(fp_dir, tmp_path):
    """Perplexity and KL against a direct computation with both models in memory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    rec = _run(fp_dir, [("RTN", "rtn", str(fp_dir))], tmp_path)
    tok = AutoTokenizer.from_pretrained(fp_dir)
    ids = acc.windows(tok, TEXTS["code"], 3, 64)
    fp = AutoModelForCausalLM.from_pretrained(fp_dir, dtype=torch.float32).eval()
    q = AutoModelForCausalLM.from_pretrained(fp_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for lin in _linears(q):
            lin.weight.copy_(pseudo_quantize_int4(lin.weight, GS, True))
        lp = torch.log_softmax(fp(ids).logits[:, :-1].float(), -1)
        lq = torch.log_softmax(q(ids).logits[:, :-1].float(), -1)
    nll = -lq.gather(-1, ids[:, 1:, None]).mean()
    kl = (lp.exp() * (lp - lq)).sum(-1).mean()
    assert rec["variants"]["RTN"]["code_ppl"] == pytest.approx(math.exp(float(nll)), rel=1e-4)
    per_window = -lq.gather(-1, ids[:, 1:, None]).squeeze(-1).mean(-1)
    assert rec["variants"]["RTN"]["code_window_nll"] == pytest.approx(per_window.tolist(), abs=2e-6)
    assert rec["variants"]["RTN"]["code_kl"] == pytest.approx(float(kl), rel=2e-2)  # float16 cache


def test_bad_inputs(fp_dir, tmp_path):
    with pytest.raises(SystemExit, match="not an INT4 checkpoint"):
        _run(fp_dir, [("X", "prequantized", str(fp_dir))], tmp_path)   # FP weights are no INT4 grid
    with pytest.raises(SystemExit, match="not smoothquant_plus"):
        _run(fp_dir, [("X", "smoothed", str(fp_dir))], tmp_path)
    with pytest.raises(SystemExit, match="no config.json"):
        _run(fp_dir, [("X", "rtn", str(tmp_path))], tmp_path)
    with pytest.raises(SystemExit, match="expected NAME=DIR"):
        acc.parse_named(["nodir"], "--smoothed")


def _fake_record(model="m", code=(10.0, 12.0, 10.5), eng=(20.0, 22.0, 23.0)):
    def row(c, e, kl, kind, prod=None):
        return {"kind": kind, "path": "/x", "code_ppl": c, "english_ppl": e, "code_kl": kl, "english_kl": kl,
                "seconds": 1.0, "date": "2026-12-01T00:00:00+00:00", "command": "python benchmarks/accuracy.py",
                "machine": {"cpu": "CPU X", "cores": 2}, "producer": prod}
    return {"model": model, "group_size": 64, "windows": {"code": {"n": 16, "seq_len": 512},
                                                          "english": {"n": 16, "seq_len": 512}},
            "variants": {"FP": row(code[0], eng[0], 0.0, "fp"), "RTN": row(code[1], eng[1], 0.2, "rtn"),
                         "AWQ": row(code[2], eng[2], 0.05, "prequantized", {"calib_samples": 16,
                                                                            "calib_of_samples": 64}),
                         "GPTQ": row(code[2], eng[2], 0.05, "prequantized",
                                     {"seconds": 600.0, "peak_rss_gib": 1.5, "command": "run_peer.py",
                                      "date": "2026-12-01", "machine": {"cpu": "CPU X", "cores": 2}})}}


def test_table_shares_and_missing_rows(tmp_path):
    (tmp_path / "accuracy_m.json").write_text(json.dumps(_fake_record()))
    md = table.render(table.load_results(tmp_path), humaneval={})
    lines = [ln for ln in md.splitlines() if ln.startswith("| GPTQ")]
    assert len(lines) == 1
    cells = [c.strip() for c in lines[0].strip("|").split("|")]
    # code: (10.5 - 10) / (12 - 10) = 25%; English: (23 - 20) / (22 - 20) = 150%
    assert "10.500" in cells[1] and cells[2] == "25%" and "23.000" in cells[3] and cells[4] == "150%"
    assert "not run" in lines[0] and "10.0 min" in lines[0] and "1.50 GiB" in lines[0]
    assert "| AWQ (first 16 of the 64 calibration samples) |" in md
    assert "| SQ+ paper" in md and "missing" in md.split("| SQ+ paper", 1)[1].splitlines()[0]
    assert "accuracy_notes.md" in md and "CPU X" in md and "GENERATED" in md
    assert "## qwen2.5-coder-1.5b" in md and "Not evaluated yet" in md.split("## qwen2.5-coder-1.5b", 1)[1]


def test_share_standard_error(tmp_path):
    """share_se: 0 where every window moves by the same NLL (the share is then the same in every
    resample); with noise, about half as large on 4x the windows; None without the windows or
    with lists of unequal length."""
    g = torch.Generator().manual_seed(0)
    fp = (2.0 + 0.3 * torch.randn(16, generator=g)).tolist()
    rtn = [f + 0.05 for f in fp]
    assert table.share_se([f + 0.02 for f in fp], fp, rtn) == pytest.approx(0.0, abs=1e-9)
    noisy = [f + 0.02 + 0.02 * float(e) for f, e in zip(fp, torch.randn(16, generator=g))]
    se = table.share_se(noisy, fp, rtn)
    se4 = table.share_se(noisy * 4, fp * 4, rtn * 4)
    assert 0.05 < se < 0.5 and se4 == pytest.approx(se / 2, rel=0.2)
    assert table.share_se(None, fp, rtn) is None and table.share_se(noisy[:8], fp, rtn) is None
    assert table.share_se(noisy, fp, fp) is None  # RTN no worse than FP: no share
    rec = _fake_record()
    for name, base in (("FP", fp), ("RTN", rtn), ("GPTQ", noisy)):
        rec["variants"][name]["code_window_nll"] = base
    (tmp_path / "accuracy_m.json").write_text(json.dumps(rec))
    md = table.render(table.load_results(tmp_path), humaneval={})
    gptq = next(ln for ln in md.splitlines() if ln.startswith("| GPTQ"))
    cells = [c.strip() for c in gptq.strip("|").split("|")]
    assert cells[2] == f"25% ± {100 * se:.0f}" and cells[4] == "150%"  # (no English windows: no error)


def test_table_humaneval_column(tmp_path):
    rec = _fake_record()
    (tmp_path / "accuracy_m.json").write_text(json.dumps(rec))
    he = {("m", "FP"): {"passed": 91, "n": 164, "source": "humaneval.json"}}
    md = table.render(table.load_results(tmp_path), humaneval=he)
    fp_line = next(ln for ln in md.splitlines() if ln.startswith("| FP"))
    assert "91/164" in fp_line


def test_table_main_writes_atomically(tmp_path):
    (tmp_path / "accuracy_m.json").write_text(json.dumps(_fake_record()))
    out = tmp_path / "accuracy.md"
    table.main(["--results", str(tmp_path), "--out", str(out)])
    assert out.read_text().startswith("<!-- GENERATED")
    assert not list(tmp_path.glob("accuracy.md.*"))


def test_smoothed_is_fake_quantized_at_eval(fp_dir, tmp_path):
    """An identity-smoothed checkpoint (the FP weights, quant_method smoothquant_plus) must score
    exactly RTN: the eval quantizes it the way the plugin does at load. Its maker's time is read."""
    import shutil
    sm = tmp_path / "sm"
    shutil.copytree(fp_dir, sm)
    cfg = json.loads((sm / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "smoothquant_plus", "group_size": GS, "alpha": None}
    (sm / "config.json").write_text(json.dumps(cfg))
    (sm / "sqplus_search.json").write_text(json.dumps({"seconds": {"total": 90.0, "stats": 10.0},
                                                       "chosen": "rtn"}))
    rec = _run(fp_dir, [("RTN", "rtn", str(fp_dir)), ("SQ+ default", "smoothed", str(sm))], tmp_path,
               tmp_path / "accuracy_tiny.json")
    v = rec["variants"]
    assert v["SQ+ default"]["code_ppl"] == v["RTN"]["code_ppl"]
    assert v["SQ+ default"]["fake_quantized_linears"] == 14
    assert v["SQ+ default"]["producer"]["seconds"] == 90.0
    md = table.render(table.load_results(tmp_path), humaneval={})
    row = next(ln for ln in md.splitlines() if ln.startswith("| SQ+ default"))
    assert "1.5 min" in row and "100%" in row


def test_producer_of_a_sqplus_gptq_smoothed_checkpoint_is_its_own_record(tmp_path):
    """`sqplus gptq --format smoothed` on a full-precision checkpoint writes no search table: its
    time and peak RSS come from the config's gptq record; a folder with neither has no producer."""
    d = tmp_path / "g"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"quantization_config": {
        "quant_method": "smoothquant_plus", "gptq": {"seconds": 1489.0, "peak_rss_gib": 5.1}}}))
    p = acc.producer_record("smoothed", d)
    assert p["seconds"] == 1489.0 and p["peak_rss_gib"] == 5.1 and p["method"] == "sqplus gptq"
    (d / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "smoothquant_plus"}}))
    assert acc.producer_record("smoothed", d) is None



def test_producer_of_a_tuned_checkpoint_adds_the_tune_time_and_keeps_the_larger_peak(tmp_path):
    """`sqplus tune` copies the search table into its output: the row's time is the search's plus
    the tuning's, its peak RSS the larger of the two, its command both."""
    d = tmp_path / "t"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "smoothquant_plus"}}))
    (d / "sqplus_search.json").write_text(json.dumps({"seconds": {"total": 600.0}, "peak_rss_gib": 3.0,
                                                      "command": "sqplus smooth m --out s", "date": "d"}))
    (d / "sqplus_tune.json").write_text(json.dumps({"seconds": 120.0, "peak_rss_gib": 4.5, "kept": True,
                                                    "command": "sqplus tune s --fp m --out t"}))
    p = acc.producer_record("smoothed", d)
    assert p["seconds"] == 720.0 and p["peak_rss_gib"] == 4.5
    assert p["seconds_by_phase"]["sqplus_tune"] == 120.0 and p["tune"]["kept"] is True
    assert p["command"] == "sqplus smooth m --out s; then sqplus tune s --fp m --out t"

def test_peer_calibration_dump_of_the_gptq_stage_set(fp_dir, tmp_path, monkeypatch):
    """benchmarks/peers/dump_calib.py --gptq-samples N hands a peer exactly our GPTQ stage's samples:
    the first 32 statistics samples and the N - 32 after the held-out ones (the held-out never among
    them); without it, the statistics samples as calibration_ids gives them."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer
    from vllm_sqplus.calib import load_calibration_texts, split_calibration, tokenize_samples
    calib = tmp_path / "calib.txt"
    calib.write_text(CODE * 60)
    dump = _load("peers/dump_calib")
    tok = AutoTokenizer.from_pretrained(fp_dir)
    stream = tokenize_samples(tok, load_calibration_texts(str(calib)), 44, 16)
    assert stream.shape[0] == 44
    out = tmp_path / "c.safetensors"
    monkeypatch.setattr(sys, "argv", ["dump_calib", str(fp_dir), "--calib", str(calib), "--seq-len", "16",
                                      "--gptq-samples", "40", "--out", str(out)])
    dump.main()
    got = load_file(out)
    from safetensors import safe_open
    with safe_open(str(out), "pt") as f:  # the record names the set dumped, not the unused --n-samples
        assert f.metadata()["n_samples"] == "40" and f.metadata()["set"] == "gptq stage (40)"
    _, held, want = split_calibration(stream, 32, 4, 40)
    assert torch.equal(got["stat_ids"], want) and torch.equal(got["heldout_ids"], held)
    assert torch.equal(want[:32], stream[:32]) and torch.equal(want[32:], stream[36:44])
    monkeypatch.setattr(sys, "argv", ["dump_calib", str(fp_dir), "--calib", str(calib), "--seq-len", "16",
                                      "--n-samples", "40", "--out", str(out)])
    dump.main()
    assert torch.equal(load_file(out)["stat_ids"], stream[:40])


def test_missing_row_shows_no_humaneval_of_another_table(tmp_path):
    """A role missing from one table (e.g. the 16-window 1.5B table) must not show the HumanEval
    count of the checkpoint that bears the name in another table of the same model."""
    (tmp_path / "accuracy_m.json").write_text(json.dumps(_fake_record()))
    he = {("m", "SQ+ paper"): {"passed": 100, "n": 164, "source": "x"}}
    md = table.render(table.load_results(tmp_path), humaneval=he)
    line = next(ln for ln in md.splitlines() if ln.startswith("| SQ+ paper"))
    assert "missing" in line and "100/164" not in line
