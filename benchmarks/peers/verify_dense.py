"""Check a peer's dense checkpoint against its compressed-tensors checkpoint, independently.

Unpacks every weight_packed / weight_zero_point of OUT/compressed (compressed-tensors' own
unpack_from_int32), dequantizes w = (q - zero) * scale per group with plain PyTorch, and compares
with OUT/dense (rounded to its dtype): every linear must match exactly and every other tensor
(norms, embeddings) must equal the dense one. Runs in the peers' venv. Exit 1 on a mismatch.

usage: python verify_dense.py OUT
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
from safetensors.torch import load_file


def load_dir(d: Path) -> dict:
    sd = {}
    for f in sorted(d.glob("*.safetensors")):
        sd.update(load_file(f))
    return sd


def main() -> int:
    out = Path(sys.argv[1])
    comp, dense = load_dir(out / "compressed"), load_dir(out / "dense")
    w_args = json.loads((out / "compressed" / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]["weights"]
    g, bits = w_args["group_size"], w_args["num_bits"]
    n_lin, worst, bad = 0, 0.0, []
    for k in [k for k in comp if k.endswith(".weight_packed")]:
        base = k[: -len(".weight_packed")]
        shape = torch.Size(comp[base + ".weight_shape"].tolist())
        q = unpack_from_int32(comp[k], bits, shape).to(torch.float32)                       # [N, K]
        scale = comp[base + ".weight_scale"].float()                                         # [N, K/g]
        zp = unpack_from_int32(comp[base + ".weight_zero_point"], bits,
                               torch.Size(scale.shape), packed_dim=0).to(torch.float32)     # [N, K/g]
        w = ((q.reshape(shape[0], -1, g) - zp[..., None]) * scale[..., None]).reshape(shape)
        d = dense[base + ".weight"]
        diff = float((w.to(d.dtype).float() - d.float()).abs().max())
        worst = max(worst, diff)
        if diff:
            bad.append((base, diff))
        n_lin += 1
    others = [k for k in dense if k in comp and not k.endswith(".weight_packed")]
    other_bad = [k for k in others if not torch.equal(comp[k].to(dense[k].dtype), dense[k])]
    print(json.dumps({"linears": n_lin, "max_abs_diff": worst, "mismatched_linears": bad[:5],
                      "other_tensors": len(others), "mismatched_other": other_bad[:5]}))
    return 1 if bad or other_bad or n_lin == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
