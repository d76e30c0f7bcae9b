"""benchmarks/decode_breakdown.py without an engine: the nested timers on a fake clock (exclusive
times per category, prefill steps left out, categories summing to the step) and the errors."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import decode_breakdown as db  # noqa: E402
import machine  # noqa: E402


class FakeClock:
    def __init__(self):
        self.ns = 0

    def __call__(self):
        return self.ns

    def spend(self, ms):
        self.ns += int(ms * 1e6)


def _engine(rec, clock, tokens):
    """One synthetic engine step: scheduler 1 ms, a forward with 2 linears (3 ms each), attention
    (2 ms) and 1.5 ms of other work, lm_head 10 ms, sampling 0.5 ms, output processing 1 ms: 22 ms."""
    linear = rec.wrap("w4a16_linears", lambda: clock.spend(3))
    attn = rec.wrap("attention", lambda: clock.spend(2))

    def forward_body(input_ids):
        clock.spend(1.0)
        linear()
        attn()
        linear()
        clock.spend(0.5)
    forward = rec.wrap("forward", forward_body, tokens_of=db._forward_tokens)
    logits = rec.wrap("lm_head", lambda: clock.spend(10))
    sample = rec.wrap("sampling", lambda: clock.spend(0.5))

    class Ids:
        shape = (tokens,)

    def step():
        clock.spend(1)
        forward(input_ids=Ids())
        logits()
        sample()
        clock.spend(1)
    return rec.wrap_step(step)


def test_summarize_exclusive_times_decode_only(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(db.time, "perf_counter_ns", clock)
    rec = db.Recorder()
    rec.on = True
    _engine(rec, clock, tokens=64)()  # prefill of batch 2 x 32 tokens: left out
    for _ in range(3):
        _engine(rec, clock, tokens=2)()
    rec.on = False
    _engine(rec, clock, tokens=2)()  # recorder off: not recorded
    assert len(rec.steps) == 4
    s = db.summarize(rec.steps, batch=2)
    assert s["decode_steps"] == 3 and s["steps_left_out"] == 1
    assert s["step_ms_mean"] == pytest.approx(22.0)
    c = {k: v["ms"] for k, v in s["categories"].items()}
    assert c == pytest.approx({"w4a16_linears": 6.0, "lm_head": 10.0, "attention": 2.0,
                               "model_other": 1.5, "sampling": 0.5, "engine_overhead": 1.0 + 1.0})
    assert sum(c.values()) == pytest.approx(s["step_ms_mean"])
    assert s["categories"]["lm_head"]["pct"] == pytest.approx(100 * 10 / 22, abs=0.05)
    assert s["calls_per_step"]["w4a16_linears"] == 2 and s["calls_per_step"]["attention"] == 1
    assert s["decode_tok_s"] == pytest.approx(2 * 1000 / 22, abs=0.01)


def test_summarize_without_decode_steps_names_the_counts():
    steps = [{"wall_ns": 1, "tokens": 64, "excl_ns": {"step": 1}, "calls": {}}]
    with pytest.raises(ValueError, match=r"no decode steps for batch 16.*64"):
        db.summarize(steps, batch=16)


def test_timers_pass_through_outside_a_step():
    rec = db.Recorder()
    f = rec.wrap("attention", lambda x: x + 1)
    assert f(1) == 2 and rec.steps == []


def test_worker_cores_parse_the_binding_forms():
    """The in-process worker pins itself to VLLM_CPU_OMP_THREADS_BIND's cores (vLLM does not there)."""
    assert machine.parse_cores("0") == [0] and machine.parse_cores("0-1") == [0, 1]
    assert machine.parse_cores("0,2-3") == [0, 2, 3]
