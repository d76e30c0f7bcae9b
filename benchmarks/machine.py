"""The name of this machine's results folder, benchmarks/results/<slug>/ (torch-free, cheap).

  cpu:  the CPU model's first words, a microarchitecture tag where the model name is a generic
        one (no model number, as VMs report: "AMD EPYC", "Intel(R) Xeon(R) Processor"), and the
        core count, e.g. "amd-epyc-zen5-2c", "intel-xeon-spr-2c", "amd-epyc-7763-64c"
  cuda: the GPU's name, e.g. "nvidia-h200"
Every benchmark writes its generated records there; benchmarks/results/README.md cites them.
The tag keeps two different CPUs behind one generic name apart (folders written before it existed:
amd-epyc-2c was an AVX2-only EPYC, intel-xeon-2c a Sapphire-Rapids-class Xeon).
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


def _cpuinfo_int(key: str) -> int | None:
    try:
        for line in open("/proc/cpuinfo"):
            if line.split(":", 1)[0].strip() == key:
                return int(line.split(":", 1)[1].strip())
    except (OSError, ValueError):
        pass
    return None


# x86 family/model -> microarchitecture (the ones these folders meet; others: "f<family>m<model>")
_INTEL6 = {85: "skx", 106: "icx", 108: "icx", 143: "spr", 207: "emr", 173: "gnr", 174: "gnr"}


def uarch(vendor_word: str, family: int | None, model: int | None) -> str:
    if family is None or model is None:
        return ""
    if vendor_word == "amd":
        if family == 0x1A:
            return "zen5"
        if family == 0x19:
            return "zen4" if 0x10 <= model <= 0x1F or 0x60 <= model <= 0xAF else "zen3"
        if family == 0x17:
            return "zen2" if model >= 0x30 else "zen"
    if vendor_word == "intel" and family == 6 and model in _INTEL6:
        return _INTEL6[model]
    return f"f{family}m{model}"


def slug(device: str = "cpu") -> str:
    if device == "cuda":
        import torch
        name = torch.cuda.get_device_name(0)
    else:
        name = cpu_model()
    words = [w for w in "".join(c if c.isalnum() else " " for c in name.lower()).split()
             if w not in _NOISE][:3] or [device]
    if device != "cuda" and not any(c.isdigit() for c in name) and words[0] in ("amd", "intel"):
        tag = uarch(words[0], _cpuinfo_int("cpu family"), _cpuinfo_int("model"))
        words += [tag] if tag else []
    return "-".join(words if device == "cuda" else words + [f"{os.cpu_count()}c"])


def parse_cores(bind: str) -> list[int]:
    """'0' / '0-1' / '0,2-3' (a VLLM_CPU_OMP_THREADS_BIND list of cores) -> [cores]."""
    out = []
    for part in bind.split(","):
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi or lo) + 1))
    return out


def pin_to_bound_cores() -> list[int]:
    """Pin this process to VLLM_CPU_OMP_THREADS_BIND's cores with one torch thread per core. For an
    in-process vLLM engine (VLLM_ENABLE_V1_MULTIPROCESSING=0 / the uni executor), where vLLM binds
    no threads itself (only a worker process of its own reads the binding)."""
    import torch
    cores = parse_cores(os.environ["VLLM_CPU_OMP_THREADS_BIND"])
    os.sched_setaffinity(0, cores)
    torch.set_num_threads(len(cores))
    return cores


def results_dir(device: str = "cpu") -> Path:
    return RESULTS / slug(device)
