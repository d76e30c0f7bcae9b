"""GPU smoke test of `sqplus smooth --device cuda` on a tiny random Qwen2 model (no vLLM needed).

Checks that calibration + search run with the layers on the GPU and that the smoothed checkpoint
computes the same function as the input (float32, relative error <= 1e-4). Exit code 0 on success.
usage (on a GPU machine, repo root): PYTHONPATH=. python3 scripts/gpu_smooth_smoke.py
"""
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny import CODE, save_tiny  # noqa: E402

from vllm_sqplus.cli import main  # noqa: E402

assert torch.cuda.is_available(), "no CUDA device"
with tempfile.TemporaryDirectory() as d:
    d = Path(d)
    src = save_tiny(d / "src", "qwen2", kv_heads=2, hidden=256, intermediate=512, layers=4)
    (d / "calib.txt").write_text(CODE * 40)
    t = time.perf_counter()
    rc = main(["smooth", str(src), "--out", str(d / "out"), "--calib", str(d / "calib.txt"), "--device", "cuda",
               "--seq-len", "64", "--samples", "8", "--heldout", "2", "--group-size", "128"])
    assert rc == 0, rc
    from transformers import AutoModelForCausalLM
    ids = torch.randint(0, 320, (2, 48))
    a = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)(ids).logits
    from vllm_sqplus.checkpoint import load_full_precision  # from_pretrained would quantize it
    b = load_full_precision(d / "out", torch.float32)(ids).logits
    rel = float((a - b).abs().max() / a.abs().max())
    print(f"sqplus smooth --device cuda: ok in {time.perf_counter() - t:.1f}s; logits rel err {rel:.2e}")
    assert rel <= 1e-4
