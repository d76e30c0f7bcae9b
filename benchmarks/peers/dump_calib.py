"""Dump the exact calibration tokens `sqplus smooth` uses, for the peers (GPTQ, AWQ) to read.

Runs in OUR venv (it imports vllm_sqplus); the peers' runner reads the file in llm-compressor's venv.
The statistics samples ([n_samples, seq_len] stat_ids) are what GPTQ/AWQ calibrate on; the held-out
samples (the search's own loss in `sqplus smooth`) are stored too, for the record, never fed to a peer.
With --gptq-samples N, stat_ids is instead the set the search's GPTQ stage (and `sqplus gptq --samples
N`) calibrates on: the first 32 statistics samples plus the N - 32 after the held-out ones, so a peer
given N samples sees exactly our stage's tokens (not the held-out ones, which the first 64 of the
plain dump contain).

usage: python benchmarks/peers/dump_calib.py MODEL_DIR --out FILE.safetensors
           [--calib stdlib] [--n-samples 64] [--n-heldout 4] [--seq-len 512] [--gptq-samples N]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
from pathlib import Path

from vllm_sqplus.calib import DEFAULT_CALIB, calibration_ids, gptq_stage_ids


def ids_sha256(t) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--out", required=True)
    ap.add_argument("--calib", default=DEFAULT_CALIB)
    ap.add_argument("--n-samples", type=int, default=64)
    ap.add_argument("--n-heldout", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--gptq-samples", type=int, default=None,
                    help="dump the GPTQ stage's N samples as stat_ids (as sqplus gptq --samples N)")
    a = ap.parse_args()
    if a.gptq_samples is not None and a.gptq_samples < 1:
        raise SystemExit(f"error: --gptq-samples must be >= 1, got {a.gptq_samples}")
    from safetensors.torch import save_file
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(a.model)
    if a.gptq_samples is None:
        stat_ids, held_ids = calibration_ids(tok, a.calib, n_samples=a.n_samples, n_heldout=a.n_heldout,
                                             seq_len=a.seq_len)
    else:
        stat_ids, held_ids = gptq_stage_ids(tok, a.calib, a.gptq_samples, a.seq_len, a.n_heldout)
    meta = {"set": "statistics" if a.gptq_samples is None else f"gptq stage ({a.gptq_samples})",
            "model": str(Path(a.model).resolve()), "calib": a.calib,
            "n_samples": str(a.n_samples if a.gptq_samples is None else stat_ids.shape[0]),
            "n_heldout": str(a.n_heldout), "seq_len": str(a.seq_len),
            "stat_ids_shape": json.dumps(list(stat_ids.shape)), "stat_ids_sha256": ids_sha256(stat_ids)}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=out.name + ".")
    os.close(fd)
    save_file({"stat_ids": stat_ids.contiguous(), "heldout_ids": held_ids.contiguous()}, tmp, metadata=meta)
    os.replace(tmp, out)
    print(f"{out}: stat_ids {tuple(stat_ids.shape)} heldout_ids {tuple(held_ids.shape)} "
          f"sha256 {meta['stat_ids_sha256'][:16]}")


if __name__ == "__main__":
    main()
