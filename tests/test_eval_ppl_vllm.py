"""`sqplus eval ppl` end to end: vLLM (prompt_logprobs, our load path and kernel) against a plain
transformers computation of the same perplexity.

Reference: the tiny Llama in float32 with its decoder linears replaced by
dequantize_int4(quantize_int4(w, 128, zero point)) (what smoothquant_plus serves from a plain
checkpoint), the same chunks of the same token ids, NLL summed over positions 1.. of each chunk.
Tolerance: 1e-3 relative on ppl (float32 both sides, only summation order differs). The test can
fail: the INT4 and full-precision perplexities of this model are checked to differ by far more.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))
pytest.importorskip("vllm")
from tiny import fake_quantize_model, save_tiny  # noqa: E402

from vllm_sqplus.eval.ppl import chunk_ids  # noqa: E402

SEQ = 64
TEXT = "\n".join(
    f"def f{i}(a, b):\n    total = a * {i} + b\n    for k in range({i % 7 + 2}):\n        total += k\n    return total\n"
    for i in range(40))


@torch.no_grad()
def _reference_ppl(model_dir: Path, chunks: list[list[int]], quantized: bool) -> float:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if quantized:
        fake_quantize_model(model, 128, True)
    nll, n = 0.0, 0
    for c in chunks:
        logp = torch.log_softmax(model(torch.tensor([c])).logits[0, :-1].double(), -1)
        nll -= logp.gather(1, torch.tensor(c[1:])[:, None]).sum().item()
        n += len(c) - 1
    return math.exp(nll / n)


def test_eval_ppl_cli_matches_transformers_reference(tmp_path):
    model = save_tiny(tmp_path / "llama", "llama", hidden=256, intermediate=512, heads=4, kv_heads=2)
    data = tmp_path / "code.txt"
    data.write_text(TEXT)
    out = tmp_path / "ppl.json"
    cmd = [sys.executable, "-m", "vllm_sqplus.cli", "eval", "ppl", str(model), "--data", str(data),
           "--quantization", "smoothquant_plus", "--dtype", "float32", "--seq-len", str(SEQ),
           "--max-chunks", "6", "--json", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1", VLLM_LOGGING_LEVEL="WARNING"))
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads(out.read_text())
    assert "ppl = " in p.stdout and got["chunks"] == 6 and got["tokens"] == 6 * (SEQ - 1)

    from transformers import AutoTokenizer
    ids = AutoTokenizer.from_pretrained(model).encode(TEXT, add_special_tokens=False)
    chunks = chunk_ids(ids, SEQ, 6)
    want_q = _reference_ppl(model, chunks, quantized=True)
    want_fp = _reference_ppl(model, chunks, quantized=False)
    assert abs(got["ppl"] / want_q - 1) < 1e-3, (got["ppl"], want_q, want_fp)
    assert abs(want_fp / want_q - 1) > 1e-2, "INT4 and FP ppl too close: the test could not tell them apart"
