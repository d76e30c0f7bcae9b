"""The CUDA kernels must compile on a machine without a GPU (nvcc + torch headers suffice).

Running them needs a GPU: tests/test_kernels_cuda.py, driven by scripts/gpu_check.sh on one.
"""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("nvcc") is None and not os.path.exists("/usr/local/cuda/bin/nvcc"),
                    reason="nvcc not installed")
def test_cuda_sources_compile_with_nvcc():
    r = subprocess.run(["bash", str(ROOT / "scripts" / "check_cuda_compile.sh")], capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
