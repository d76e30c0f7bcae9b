"""`sqplus` command line. Each sub-command lives in its own module exposing add_parser(subparsers):

  sqplus smooth    MODEL --out DIR     calibrate, search alpha, write a smoothed checkpoint (smooth_cli.py)
  sqplus quantize  MODEL --out DIR     write a pre-quantized INT4 checkpoint (export.py)
  sqplus gptq      MODEL --out DIR     GPTQ INT4 of a smoothed checkpoint, pre-quantized (gptq.py)
  sqplus tune      SMOOTHED --fp MODEL --out DIR   end-to-end tuning of norms, biases, group scales (tune.py)
  sqplus serve     MODEL [vllm args]   OpenAI server with smoothquant_plus (serve.py)
  sqplus eval      humaneval|ppl ...   evaluation (eval/cli.py)

User errors (SqplusError) print one line on stderr and exit 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from vllm_sqplus.errors import SqplusError

_COMMANDS = ["vllm_sqplus.smooth_cli", "vllm_sqplus.export", "vllm_sqplus.gptq", "vllm_sqplus.tune", "vllm_sqplus.serve", "vllm_sqplus.eval.cli"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sqplus", description="SmoothQuant+ W4A16 for vLLM")
    sub = parser.add_subparsers(dest="command", required=True)
    for mod in _COMMANDS:
        try:
            importlib.import_module(mod).add_parser(sub)
        except ModuleNotFoundError as e:  # a sub-command whose module is not there yet
            if e.name is None or not mod.startswith(e.name):
                raise
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except SqplusError as e:
        print(f"sqplus {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sqplus: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
