"""HumanEval scoring on canned samples (no model), completion extraction, pass@1, the `sqplus eval`
command line, and the perplexity arithmetic with fake vLLM logprobs."""
import json
import math
import os
from types import SimpleNamespace

import pytest

from vllm_sqplus.cli import build_parser, main
from vllm_sqplus.errors import SqplusError
from vllm_sqplus.eval import humaneval as he
from vllm_sqplus.eval import ppl

TASKS = ["HumanEval/0", "HumanEval/2", "HumanEval/53"]


@pytest.fixture(scope="module")
def problems():
    return he.load_problems()


def test_data_has_164_problems(problems):
    assert len(problems) == 164
    assert all({"prompt", "test", "entry_point", "canonical_solution"} <= set(p) for p in problems.values())


def test_canonical_pass_broken_fail(problems):
    samples = [{"task_id": t, "completion": problems[t]["canonical_solution"]} for t in TASKS]
    samples.append({"task_id": "HumanEval/4", "completion": "    return 0.0\n"})        # wrong answer
    samples.append({"task_id": "HumanEval/5", "completion": "    return [\n"})          # syntax error
    res = he.score(samples, problems)
    assert [r["passed"] for r in res] == [True, True, True, False, False]
    assert res[3]["result"].startswith("failed: AssertionError")
    assert "SyntaxError" in res[4]["result"]
    assert he.pass_at_1(res) == pytest.approx(3 / 5)


def test_pass_at_1_counts_tasks_not_rows():
    rows = [{"task_id": "a", "passed": True}, {"task_id": "b", "passed": False}, {"task_id": "b", "passed": True}]
    assert he.pass_at_1(rows) == pytest.approx((1 + 0.5) / 2)
    with pytest.raises(SqplusError):
        he.pass_at_1([])


def test_extract_instruct_answer_drops_the_models_own_tests(problems):
    p = problems["HumanEval/2"]
    raw = ("def truncate_number(number: float) -> float:\n    return number % 1.0\n\n"
           "# Test cases\nprint(truncate_number(3.5))\nassert truncate_number(4.9) == 0.8, 'wrong own test'\n"
           "def test_it():\n    assert False\ntest_it()\n")
    comp = he.extract_completion(p, raw, "instruct")
    assert "print(" not in comp and "test_it()" not in comp.split("def test_it")[0]
    r = he.score([{"task_id": "HumanEval/2", "completion": comp}], problems)[0]
    assert r["passed"], r
    # unsanitized, the same answer fails on its own wrong assert: the sanitizer matters
    r_raw = he.score([{"task_id": "HumanEval/2", "completion": "\n" + raw}], problems)[0]
    assert not r_raw["passed"]


def test_extract_keeps_helpers_imports_and_bare_bodies(problems):
    p = problems["HumanEval/0"]
    raw = ("import itertools\n\nEPS = 0.0\n\ndef _close(a, b, t):\n    return abs(a - b) < t\n\n"
           "def has_close_elements(numbers, threshold):\n"
           "    return any(_close(a, b, threshold) for a, b in itertools.combinations(numbers, 2))\n"
           "```\nExplanation: ...")
    comp = he.extract_completion(p, raw, "instruct")
    assert "Explanation" not in comp and "import itertools" in comp and "def _close" in comp
    assert he.score([{"task_id": "HumanEval/0", "completion": comp}], problems)[0]["passed"]
    body = he.extract_completion(p, p["canonical_solution"], "instruct")  # no def: continue the prompt
    assert body == p["canonical_solution"]


def test_build_prompt_instruct_prefills_the_code_fence(problems):
    class Tok:
        def apply_chat_template(self, msgs, tokenize, add_generation_prompt):
            return "<user>" + msgs[0]["content"] + "<assistant>"
    text = he.build_prompt(problems["HumanEval/0"], Tok(), "instruct")
    assert text.endswith("```python\n") and "def has_close_elements" in text
    assert he.build_prompt(problems["HumanEval/0"], Tok(), "completion") == problems["HumanEval/0"]["prompt"]


def test_score_only_cli_writes_results_beside_samples(tmp_path, problems, capsys):
    samples = tmp_path / "samples.jsonl"
    rows = [{"task_id": t, "completion": problems[t]["canonical_solution"]} for t in TASKS]
    rows.append({"task_id": "HumanEval/4", "completion": "    return 0.0\n"})
    samples.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["eval", "humaneval", "--score-only", str(samples)]) == 0
    out = tmp_path / "samples.jsonl_results.jsonl"
    res = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["task_id"] for r in res] == [r["task_id"] for r in rows]
    assert all({"task_id", "completion", "result", "passed"} <= set(r) for r in res)
    assert [r["passed"] for r in res] == [True, True, True, False]
    assert "pass@1 = 0.7500 (3/4)" in capsys.readouterr().out


def test_score_only_bad_inputs_are_clear_errors(tmp_path, capsys):
    assert main(["eval", "humaneval", "--score-only", str(tmp_path / "missing.jsonl")]) == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"task_id": "HumanEval/999", "completion": ""}) + "\n")
    assert main(["eval", "humaneval", "--score-only", str(bad)]) == 2
    assert "unknown task_id" in capsys.readouterr().err
    assert main(["eval", "humaneval"]) == 2  # neither MODEL nor --score-only


def test_cli_parses_the_documented_forms():
    p = build_parser()
    a = p.parse_args(["eval", "humaneval", "M", "--quantization", "smoothquant_plus", "--limit", "5",
                      "--max-tokens", "256", "--out", "D"])
    assert (a.model, a.quantization, a.limit, a.max_tokens, a.out) == ("M", "smoothquant_plus", 5, 256, "D")
    a = p.parse_args(["eval", "ppl", "M", "--data", "f.txt", "--quantization", "smoothquant_plus"])
    assert (a.model, a.data, a.quantization, a.seq_len) == ("M", "f.txt", "smoothquant_plus", 512)
    with pytest.raises(SystemExit):
        p.parse_args(["eval", "ppl", "M"])  # --data is required


def test_ppl_chunking_and_nll():
    assert ppl.chunk_ids(list(range(10)), 4, None) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert ppl.chunk_ids(list(range(10)), 4, 1) == [[0, 1, 2, 3]]
    with pytest.raises(SqplusError):
        ppl.chunk_ids([1, 2], 4, None)
    # fake prompt_logprobs: position 0 is None, then {token_id: Logprob}
    chunk = [5, 7, 9]
    lp = [None, {7: SimpleNamespace(logprob=math.log(0.5)), 1: SimpleNamespace(logprob=-0.1)},
          {9: SimpleNamespace(logprob=math.log(0.25))}]
    assert ppl.nll_of(chunk, lp) == pytest.approx(-math.log(0.5) - math.log(0.25))


def test_ppl_reads_text_and_jsonl(tmp_path):
    t = tmp_path / "a.txt"
    t.write_text("hello world")
    assert ppl.read_text(str(t)) == "hello world"
    j = tmp_path / "a.jsonl"
    j.write_text(json.dumps({"text": "one"}) + "\n" + json.dumps({"text": "two"}) + "\n")
    assert ppl.read_text(str(j)) == "one\n\ntwo"
    j.write_text('{"nottext": 1}\n')
    with pytest.raises(SqplusError, match="'text' field"):
        ppl.read_text(str(j))
    with pytest.raises(SqplusError, match="not found"):
        ppl.read_text(str(tmp_path / "nope.txt"))


def test_benchmark_table_and_failure_reason():
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import throughput as tp
    log = ("INFO loading\n(Worker pid=1) ERROR 11-23 [x.py:1] vllm_sqplus.errors.SqplusError: kernel_backend=vllm: "
           "no cpu_gemm_wna16\nRuntimeError: Engine core initialization failed\n")
    assert tp.failure_reason(log).startswith("vllm_sqplus.errors.SqplusError: kernel_backend=vllm")
    assert tp.failure_reason("") == "no output"
    rows = [{"engine": "bf16", "status": "ok", "tok": 10.0}, {"engine": "sqplus", "status": "ok", "tok": 25.0},
            {"engine": "vllm-w4a16", "status": "unavailable", "reason": "no kernel"}]
    t = tp.table(rows, [("tok", "tok/s", ".1f")], "tok").splitlines()
    assert "2.50x" in t[2] and "unavailable" in t[3] and "no kernel" in t[3]
    assert tp.random_prompts(2, 5, 50000) == tp.random_prompts(2, 5, 50000)  # same prompts for every engine


def test_sanitizer_recovers_an_answer_cut_off_by_max_tokens(problems):
    p = problems["HumanEval/2"]
    raw = "def truncate_number(number: float) -> float:\n    return number % 1.0\n\nprint(truncate_number(3.5), [1, 2,"
    comp = he.extract_completion(p, raw, "instruct")
    assert he.score([{"task_id": "HumanEval/2", "completion": comp}], problems)[0]["passed"]
    assert he.sanitize("def f(:\n  pass\n") == "def f(:\n  pass\n"  # nothing parses: unchanged


def test_benchmark_clis_share_checked_options(capsys):
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import latency
    import throughput
    for mod in (latency, throughput):
        with pytest.raises(SystemExit) as e:
            mod.main(["--model", "m", "--engines", "bf16,nope"])
        assert e.value.code == 2 and "unknown engine(s) ['nope']" in capsys.readouterr().err
        with pytest.raises(SystemExit):
            mod.main([])
        assert "--model is required" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        latency.main(["--model", "m", "--output-len", "1"])
    assert "--output-len must be at least 2" in capsys.readouterr().err


def test_benchmark_report_writes_json_and_plot(tmp_path, monkeypatch, capsys):
    import argparse
    import json
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import throughput as tp
    monkeypatch.setattr(tp, "RESULTS", tmp_path)
    monkeypatch.setattr(tp, "machine", lambda: {"cpu": "test"})
    rows = [{"engine": "fp32", "status": "ok", "tps": 4.0, "ms": 250.0},
            {"engine": "sqplus", "status": "ok", "tps": 12.0, "ms": 83.3},
            {"engine": "vllm-w4a16", "status": "unavailable", "reason": "no kernel"}]
    assert tp.report("latency", argparse.Namespace(tag="t"), {"model": "m"}, rows, [("tps", "tok/s", ".1f")],
                     "tps", "HEADER", "ms", "title", plot_metric="ms") == 0
    out = capsys.readouterr().out
    assert "HEADER" in out and "3.00x" in out and "unavailable" in out
    rec = json.loads((tmp_path / "latency_t.json").read_text())
    assert rec["benchmark"] == "latency" and rec["results"] == rows and rec["config"] == {"model": "m"}
    assert (tmp_path / "latency_t.png").stat().st_size > 1000


def test_humaneval_summary_names_the_cpu_model():
    import torch
    from vllm_sqplus.eval.cli import machine_name
    if torch.cuda.is_available():
        assert machine_name() == torch.cuda.get_device_name(0)
        return
    models = ([ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")]
              if os.path.exists("/proc/cpuinfo") else [])
    if not models:
        pytest.skip("no 'model name' in /proc/cpuinfo (the fallback names the platform's processor)")
    assert machine_name() == f"{models[0]}, {os.cpu_count()} cpus"
