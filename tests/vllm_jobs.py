"""vLLM engines for the tests, in a subprocess (so no engine leaks into the pytest process).

A test module is its own worker script: its `if __name__ == "__main__"` calls `worker(...)` with
the probes it needs, and its fixture calls `run(...)` on itself. A spec is {"jobs": [...], "prompts":
[[token ids], ...]}; a job is {"name", "model", optional "quantization", "tp" (default 1), "env"
(set while the job runs), "probes" (names of probe functions run inside the engine with
llm.apply_model; each result is the list of per-worker values, or {"error": ...})}. Every job's
result is {"tokens", "seconds", probe name: value} or {"error": ...}, written after each job, so a
crash still leaves the earlier results.
"""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

ENGINE = dict(enforce_eager=True, max_model_len=256, dtype="float32", kv_cache_memory_bytes=32 << 20)
ENV = dict(VLLM_LOGGING_LEVEL="WARNING", OMP_NUM_THREADS="1",
           VLLM_ALLOW_INSECURE_SERIALIZATION="1")  # apply_model ships the probe function


def worker(spec_path: str, out_path: str, *, n_new: int, probes: dict[str, Callable] | None = None,
           **engine_kw) -> None:
    from vllm import LLM, SamplingParams
    spec = json.loads(Path(spec_path).read_text())
    params = SamplingParams(max_tokens=n_new, temperature=0.0, ignore_eos=True)
    probes = probes or {}
    results = {}
    for job in spec["jobs"]:
        t0 = time.time()
        old_env = {k: os.environ.get(k) for k in job.get("env", {})}
        os.environ.update(job.get("env", {}))
        try:
            tp = job.get("tp", 1)
            # TP=1: engine and model in this process (seconds instead of a minute per start);
            # TP>1 needs the multiprocess executor
            kw = dict(ENGINE, **engine_kw, tensor_parallel_size=tp,
                      distributed_executor_backend="uni" if tp == 1 else "mp")
            if job.get("quantization"):
                kw["quantization"] = job["quantization"]
            llm = LLM(model=job["model"], **kw)
            outs = llm.generate([{"prompt_token_ids": p} for p in spec["prompts"]], params)
            res = {"tokens": [list(o.outputs[0].token_ids) for o in outs], "seconds": time.time() - t0}
            for name in job.get("probes", []):
                try:
                    res[name] = llm.apply_model(probes[name])
                except Exception as e:  # noqa: BLE001 - only the test that reads it fails
                    res[name] = {"error": f"{type(e).__name__}: {e}"[:2000]}
            results[job["name"]] = res
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception:  # noqa: BLE001 - shutdown API moves between releases
                pass
            del llm
            gc.collect()
        except Exception as e:  # noqa: BLE001 - reported to the test, which decides
            results[job["name"]] = {"error": f"{type(e).__name__}: {e}"[:3000]}
        finally:
            for k, v in old_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        Path(out_path).write_text(json.dumps(results))


def run(script: Path, root: Path, parts: list[tuple[list[dict], dict]], prompts, *, timeout: int,
        drop_env: tuple[str, ...] = ()) -> dict:
    """Run each (jobs, extra env) part in one worker process (`python script SPEC OUT`) ->
    {"results": {job name: result}, "log": the workers' output}. Fails the test if a worker
    wrote nothing."""
    import pytest
    results, log = {}, ""
    for i, (jobs, extra) in enumerate(parts):
        if not jobs:
            continue
        spec, out = root / f"spec{i}.json", root / f"out{i}.json"
        spec.write_text(json.dumps({"jobs": jobs, "prompts": prompts}))
        env = {k: v for k, v in os.environ.items() if k not in drop_env}
        env.update(ENV, **extra)
        proc = subprocess.run([sys.executable, str(script), str(spec), str(out)], env=env,
                              capture_output=True, text=True, timeout=timeout)
        log += proc.stdout + proc.stderr
        if not out.exists():
            pytest.fail(f"vLLM worker produced nothing (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
        results.update(json.loads(out.read_text()))
    return {"results": results, "log": log}


def first(value):
    """A probe's value in the first (or only) worker; raises where the probe failed."""
    if isinstance(value, dict) and "error" in value:
        raise AssertionError(value["error"])
    return value[0]
