"""Evaluation: sandboxed HumanEval (humaneval.py, sandbox.py) and perplexity through vLLM (ppl.py).

The `sqplus eval` sub-commands live in cli.py. Nothing here imports vLLM at module import time.
"""
