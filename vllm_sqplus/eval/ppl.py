"""Perplexity through vLLM itself (prompt_logprobs), so it measures what the engine serves: the
smoothquant_plus load path and kernel included, not a simulation.

Text is tokenized once, cut into non-overlapping chunks of `seq_len` tokens (the tail shorter than
seq_len is dropped so every chunk has the same context length), and each chunk is one prompt. The
first token of a chunk has no logprob; ppl = exp(mean NLL over the other seq_len-1 tokens of every chunk).
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

from vllm_sqplus.errors import SqplusError


def read_text(path: str) -> str:
    """A .jsonl file's "text" fields joined by blank lines, or any other file as plain text."""
    p = Path(path)
    if not p.is_file():
        raise SqplusError(f"data file not found: {path}")
    raw = p.read_text(encoding="utf-8", errors="replace")
    if p.suffix == ".jsonl":
        try:
            texts = [json.loads(line)["text"] for line in raw.splitlines() if line.strip()]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise SqplusError(f"{path}: every line must be a JSON object with a 'text' field ({e})") from e
        raw = "\n\n".join(texts)
    if not raw.strip():
        raise SqplusError(f"data file is empty: {path}")
    return raw


def chunk_ids(ids: list[int], seq_len: int, max_chunks: int | None) -> list[list[int]]:
    if seq_len < 2:
        raise SqplusError(f"--seq-len must be at least 2, got {seq_len}")
    chunks = [ids[i:i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)]
    if max_chunks:
        chunks = chunks[:max_chunks]
    if not chunks:
        raise SqplusError(f"text has {len(ids)} tokens, fewer than one chunk of --seq-len {seq_len}")
    return chunks


def nll_of(chunk: list[int], prompt_logprobs) -> float:
    """Sum of -log p(token) over positions 1.. of one chunk, from vLLM's prompt_logprobs list."""
    total = 0.0
    for tok, lp in zip(chunk[1:], prompt_logprobs[1:]):
        total -= lp[tok].logprob
    return total


def perplexity(model: str, data: str, quantization: str | None = None, seq_len: int = 512,
               max_chunks: int | None = 32, dtype: str = "bfloat16", kv_cache_bytes: int = 1 << 30,
               extra_llm_kwargs: dict | None = None) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from vllm_sqplus.eval.humaneval import close_llm, default_eager

    text = read_text(data)
    kw = dict(model=model, dtype=dtype, max_model_len=seq_len + 1, kv_cache_memory_bytes=kv_cache_bytes, seed=0,
              enforce_eager=default_eager())
    if quantization:
        kw["quantization"] = quantization
    kw.update(extra_llm_kwargs or {})
    llm = LLM(**kw)
    ids = llm.get_tokenizer().encode(text, add_special_tokens=False)
    chunks = chunk_ids(ids, seq_len, max_chunks)
    t0 = time.time()
    # prompt_logprobs=1: the chosen token's logprob is always included besides the top-1
    outs = llm.generate([TokensPrompt(prompt_token_ids=c) for c in chunks],
                        SamplingParams(max_tokens=1, prompt_logprobs=1, temperature=0.0))
    seconds = round(time.time() - t0, 1)
    close_llm(llm)
    del llm
    nll = sum(nll_of(c, o.prompt_logprobs) for c, o in zip(chunks, outs))
    n = sum(len(c) - 1 for c in chunks)
    return {"model": model, "quantization": quantization, "data": str(data), "seq_len": seq_len,
            "chunks": len(chunks), "tokens": n, "nll": nll / n, "ppl": math.exp(nll / n),
            "seconds": seconds}
