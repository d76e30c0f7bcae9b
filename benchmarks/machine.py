"""The name of this machine's results folder, benchmarks/results/<slug>/ (torch-free, cheap).

  cpu:  the CPU model's first words and the core count, e.g. "amd-epyc-2c"
  cuda: the GPU's name, e.g. "nvidia-h200"
Every benchmark writes its generated records there; benchmarks/results/README.md cites them.
"""
from __future__ import annotations

import os
import platform
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
_NOISE = ("r", "tm", "processor", "cpu", "core", "with", "radeon", "graphics")


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def slug(device: str = "cpu") -> str:
    if device == "cuda":
        import torch
        name = torch.cuda.get_device_name(0)
    else:
        name = cpu_model()
    words = [w for w in "".join(c if c.isalnum() else " " for c in name.lower()).split()
             if w not in _NOISE][:3] or [device]
    return "-".join(words if device == "cuda" else words + [f"{os.cpu_count()}c"])


def results_dir(device: str = "cpu") -> Path:
    return RESULTS / slug(device)
