"""`sqplus tune SMOOTHED --fp MODEL --out DIR`: end-to-end tuning of what RTN at load leaves free.

The INT4 model the plugin serves from a smoothed checkpoint is fixed by the stored weights: RTN at
load gives every group of a decoder linear its codes q, zero point z and scale s. Three kinds of
numbers can still move without changing one code:
  - the RMSNorm weights and the linears' biases, which the plugin keeps in full precision;
  - each group's scale: a group stored as s' (q - z) is quantized at load to the same q and z and to
    the scale s' (its codes reach 0 and 15, as RTN's codes and the GPTQ stage's always do, so its
    range is 15 s'; up to the rounding of the stored dtype, checked below).
This command fits them end to end, to the full-precision model's next-token distribution: Adam on
the mean KL per token between the full-precision model and the INT4 model over the calibration
samples of `sqplus smooth`'s GPTQ stage, with the codes frozen (the scales in log space). The
teacher runs once, before the student loads, and is then freed: on the training samples it leaves
its top-k next tokens per position (k = 1024 by default) and their log-probabilities, and the training
loss is the KL over those k tokens and one bucket for all others (exact when they cover the whole
vocabulary, a lower bound otherwise; the record states the teacher's mass they cover); on the
held-out samples it leaves every log-probability, so the held-out KL is exact. The result is judged
as served: the tuned tensors are stored in the checkpoint's dtype, RTN of the stored weights is what
is scored, on the search's held-out samples (never trained on), and the tuning is kept only if that
held-out KL is below the input's. Related work: EfficientQAT's end-to-end training of step sizes
with frozen codes (arXiv 2407.11062), Norm Tweaking (arXiv 2309.02784), and top-k logit caching for
distillation.

Cost: one forward of the teacher per sample, then a forward and backward of the student per sample
and epoch in float32; in memory at once: the student in float32 (its decoder linears as int8 codes
and float32 group scales once training starts) and the held-out log-probabilities (held-out samples
x tokens x vocabulary floats: 1.2 GB on Qwen2.5 with 4 x 512 tokens), never both models in float32.
Measured on Qwen2.5-Coder-0.5B at 1 thread: 128 x 512 tokens, 1 epoch, 32.6 min, peak RSS 11.4 GiB
(session 21, teacher resident, full-vocabulary KL: 64 x 2 epochs, 28 min at 2 threads, 12.5 GiB).
See sqplus_tune.json of a run for its own time and peak.
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vllm_sqplus.errors import SqplusError

TUNE_RECORD = "sqplus_tune.json"


@dataclass(frozen=True)
class TuneOptions:
    epochs: int = 2
    lr: float = 1e-3        # norms and biases: Adam's step relative to the tensor's mean |value|
    scale_lr: float = 5e-4  # group scales: Adam's step on log(scale)
    scales: bool = True
    biases: bool = True
    topk: int = 1024        # teacher tokens per position kept for the training loss (the rest: one bucket)
    seed: int = 0


class _CodesLinear(torch.autograd.Function):
    """y = x @ ((q - z) * scales).T + bias, differentiable in x, scales and bias. The weight is
    rebuilt in the backward instead of saved: autograd through a plain linear would keep every
    layer's float32 weight (and the codes as float32) from the forward to the backward, two float32
    copies of the model (measured: 15.9 GiB peak on Qwen2.5-Coder-0.5B before this)."""

    @staticmethod
    def forward(ctx, x, qz, scales, bias):
        ctx.save_for_backward(x, qz, scales)
        ctx.has_bias = bias is not None
        return F.linear(x, _weight(qz, scales), bias)

    @staticmethod
    def backward(ctx, grad):
        x, qz, scales = ctx.saved_tensors
        n, groups, g = qz.shape
        g2, x2 = grad.reshape(-1, n), x.reshape(-1, groups * g)
        grad_x = (g2 @ _weight(qz, scales)).reshape(x.shape)
        grad_scales = ((g2.T @ x2).view(n, groups, g) * qz).sum(-1)  # d(w)/d(scale) = q - z
        return grad_x, None, grad_scales, g2.sum(0) if ctx.has_bias else None


def _weight(qz: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    n, groups, g = qz.shape
    return (qz.float() * scales[..., None]).reshape(n, groups * g)


class GroupScales(nn.Module):
    """A decoder linear's weight as (q - z) * s0 * exp(log_scale) per group, with the RTN codes q
    and zeros z of the given weight frozen. At log_scale = 0 it is exactly RTN's dequantized weight
    (dequantize_int4 in float32, the scales as quantize_int4 rounds them to the weight's dtype).

    Only groups whose codes span the whole grid can take a new scale: RTN at load finds a group's
    scale from its range, 15 s only if its codes reach 0 and 15. RTN's own codes can stop at 14
    where the scale was rounded to a 16-bit dtype up; such a group's scale stays (`free` is False)
    and its stored weights stay the input's."""

    def __init__(self, weight: torch.Tensor, group_size: int, name: str):
        super().__init__()
        from vllm_sqplus.quant import quantize_int4
        q, s, z = quantize_int4(weight.detach(), group_size, True, name)
        n, k = q.shape
        g = k if group_size == -1 else group_size
        qz = q.to(torch.int16).reshape(n, k // g, g) - z.to(torch.int16)[..., None]
        # a group whose range is 15 steps: codes from 0 to 15, or from 0 up when its values are all
        # >= 0 and its range starts at 0 (z = 0), or from 15 down when all <= 0 (z = 15)
        qg = q.reshape(n, k // g, g)
        lo, hi = qg.amin(-1), qg.amax(-1)
        self.register_buffer("free", (hi == 15) & ((lo == 0) | (z == 0)) | ((z == 15) & (lo == 0)),
                             persistent=False)
        # q - z lies in -15..15: exact in int8 (a quarter of a float32 copy)
        self.register_buffer("qz", qz.to(torch.int8), persistent=False)
        self.register_buffer("s0", s.float(), persistent=False)
        self.log_scale = nn.Parameter(torch.zeros_like(self.s0))

    def scales(self) -> torch.Tensor:
        return self.s0 * (self.log_scale * self.free).exp()

    def weight(self) -> torch.Tensor:
        return _weight(self.qz, self.scales())

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return _CodesLinear.apply(x, self.qz, self.scales(), bias)


def decoder_linears(model, arch) -> list[tuple[str, nn.Linear]]:
    from vllm_sqplus.arch import get_module
    prefix = arch.layers
    return [(f"{prefix}.{i}.{name}", get_module(layer, name))
            for i, layer in enumerate(get_module(model, arch.layers)) for name in arch.linears]


def free_tensors(model, arch, biases: bool) -> list[tuple[str, nn.Parameter]]:
    """The full-precision tensors the tuning may move: every RMSNorm weight (decoder layers and
    the final norm) and, with biases, every decoder linear's bias."""
    names = {id(m.weight) for _, m in model.named_modules() if type(m).__name__.endswith("RMSNorm")}
    if biases:
        names |= {id(lin.bias) for _, lin in decoder_linears(model, arch) if lin.bias is not None}
    return [(n, p) for n, p in model.named_parameters() if id(p) in names]


def mean_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student), from logits [T, V] (or log-probabilities)."""
    t = F.log_softmax(teacher_logits.float(), -1)
    return (t.exp() * (t - F.log_softmax(student_logits.float(), -1))).sum(-1).mean()


def topk_kl(top_logp: torch.Tensor, top_ids: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student) over k + 1 outcomes: the teacher's top k tokens
    (their log-probabilities top_logp [T, k], ids top_ids [T, k]) and one bucket for every other
    token. Equal to mean_kl when the k tokens are the whole vocabulary; never above it otherwise
    (merging outcomes cannot raise a KL)."""
    s = F.log_softmax(student_logits.float(), -1).gather(-1, top_ids.long())
    p_rest = (-torch.expm1(torch.logsumexp(top_logp, -1))).clamp(min=0)
    q_rest = (-torch.expm1(torch.logsumexp(s, -1))).clamp(min=1e-12)
    kl = (top_logp.exp() * (top_logp - s)).sum(-1) + torch.xlogy(p_rest, p_rest) - p_rest * q_rest.log()
    return kl.mean()


@dataclass
class TeacherTargets:
    """What the training and the judging need of the full-precision model, computed once so that it
    can be freed before the student is built: per training sample and position its top-k
    log-probabilities and token ids; per held-out sample every log-probability."""
    top_logp: torch.Tensor      # [samples, T, k] float32
    top_ids: torch.Tensor       # [samples, T, k] int32
    heldout_logp: torch.Tensor  # [heldout, T, vocabulary] float32

    def topk_mass(self) -> float:
        """Mean over training positions of the teacher's probability on its top k tokens."""
        return float(self.top_logp.exp().sum(-1).mean())


def _logprobs(model, x: torch.Tensor) -> torch.Tensor:
    """[T, vocabulary] float32 next-token log-probabilities of `model` on one sample [T]."""
    return F.log_softmax(model(x[None]).logits[0].float(), -1)


@torch.no_grad()
def teacher_logprobs(teacher, samples: torch.Tensor) -> torch.Tensor:
    """[n, T, vocabulary] float32 log-probabilities of the teacher on each sample (filled in place:
    a list stacked at the end would hold them twice)."""
    out = None
    for i, x in enumerate(samples):
        logp = _logprobs(teacher, x)
        if out is None:
            out = torch.empty((samples.shape[0], *logp.shape))
        out[i] = logp
    return out


@torch.no_grad()
def teacher_targets(teacher, ids: torch.Tensor, heldout: torch.Tensor, topk: int) -> TeacherTargets:
    n, t = ids.shape
    top_logp, top_ids = torch.empty(n, t, topk), torch.empty(n, t, topk, dtype=torch.int32)
    for i, x in enumerate(ids):
        top_logp[i], top_ids[i] = torch.topk(_logprobs(teacher, x), topk, dim=-1)
    return TeacherTargets(top_logp, top_ids, teacher_logprobs(teacher, heldout))


@torch.no_grad()
def heldout_kl(teacher_logp: torch.Tensor, student, heldout: torch.Tensor) -> float:
    """Mean KL(teacher || student) over the held-out samples, from the teacher's cached
    log-probabilities (teacher_logprobs)."""
    return sum(float(mean_kl(t, student(h[None]).logits[0])) for t, h in zip(teacher_logp, heldout)) / heldout.shape[0]


@torch.no_grad()
def rtn_in_place(model, arch, group_size: int, dtype: torch.dtype) -> None:
    """What the plugin serves when it loads the model in `dtype`: RTN INT4 (zero point) of every
    decoder linear, computed in that dtype (the scales rounded to it), in place."""
    from vllm_sqplus.quant import pseudo_quantize_int4
    for name, lin in decoder_linears(model, arch):
        lin.weight.copy_(pseudo_quantize_int4(lin.weight.to(dtype), group_size, True, name))


def tune(targets: TeacherTargets, student, arch, ids: torch.Tensor, heldout: torch.Tensor, group_size: int,
         stored_dtype: torch.dtype, opts: TuneOptions = TuneOptions(), log=print) -> dict:
    """Tune `student` (the smoothed model in float32, its stored weights as they are) in place
    against the full-precision model's `targets` on `ids` and `heldout` (teacher_targets with
    opts.topk); returns the record.

    On return the student holds the tensors to store (in float32, exactly representable in
    stored_dtype): the tuned ones if the tuning is kept, the input's otherwise. record["changed"]
    names the tensors that differ from the input."""
    torch.manual_seed(opts.seed)
    if targets.top_ids.shape[:2] != ids.shape or targets.heldout_logp.shape[:2] != heldout.shape:
        raise SqplusError("tune: the teacher's targets do not belong to these samples")
    for p in student.parameters():
        p.requires_grad_(False)
    linears = decoder_linears(student, arch)
    free = free_tensors(student, arch, opts.biases)
    params = dict(student.named_parameters())
    pname = {id(p): n for n, p in params.items()}
    wname = {id(lin): pname[id(lin.weight)] for _, lin in linears}
    # the tensors that may change, as the input has them, in the stored dtype (they come from it:
    # exact, and half a float32 copy)
    inputs = {n: params[n].detach().to(stored_dtype, copy=True) for n in [n for n, _ in free] + list(wname.values())}
    for n, v in inputs.items():
        if not torch.equal(v.float(), params[n].detach().float()):
            raise SqplusError(f"tune: {n} holds values that {stored_dtype} does not (the student must be "
                              "the stored checkpoint)")
    t0 = time.perf_counter()
    # the start, scored as served: RTN of the stored weights
    rtn_in_place(student, arch, group_size, stored_dtype)
    start_kl = heldout_kl(targets.heldout_logp, student, heldout)
    log(f"tune: held-out KL at the start {start_kl:.5f}")
    groups = [{"params": [p], "lr": opts.lr * float(p.detach().abs().mean().clamp(min=1e-3))}
              for _, p in free]
    for _, p in free:
        p.requires_grad_(True)
    scaled = {}  # id(linear) -> its GroupScales, while it computes from codes and scales
    if opts.scales:
        for name, lin in linears:  # the input's codes (RTN is not idempotent on groups short of 15 steps)
            gs = scaled[id(lin)] = GroupScales(inputs[wname[id(lin)]], group_size, name)
            lin.weight.data = torch.empty(0)  # rebuilt from codes and scales until the end
            lin.forward = (lambda x, lin=lin, gs=gs: gs.linear(x, lin.bias))
        groups.append({"params": [gs.log_scale for gs in scaled.values()], "lr": opts.scale_lr})
    trained = [p for g in groups for p in g["params"]]
    opt = torch.optim.Adam(groups, betas=(0.9, 0.99))
    steps = max(1, opts.epochs * ids.shape[0])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / steps)
    best = {"epoch": 0, "kl": start_kl, "state": [p.detach().clone() for p in trained]}
    epochs = [{"epoch": 0, "heldout_kl": start_kl}]
    for ep in range(1, opts.epochs + 1):
        total = 0.0
        for j in torch.randperm(ids.shape[0]).tolist():
            loss = topk_kl(targets.top_logp[j], targets.top_ids[j], student(ids[j][None]).logits[0])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach())
        kl = heldout_kl(targets.heldout_logp, student, heldout)
        epochs.append({"epoch": ep, "train_kl": total / ids.shape[0], "heldout_kl": kl})
        log(f"tune: epoch {ep}/{opts.epochs}: train KL {total / ids.shape[0]:.5f}, held-out KL {kl:.5f}")
        if kl < best["kl"]:
            best = {"epoch": ep, "kl": kl, "state": [p.detach().clone() for p in trained]}
    with torch.no_grad():
        for p, v in zip(trained, best["state"]):
            p.copy_(v)
            p.requires_grad_(False)
        for _, lin in linears if opts.scales else ():
            # the tuned weight; groups that could not take a new scale keep the input's weights
            gs = scaled.pop(id(lin))
            w = gs.weight().view_as(gs.qz)
            w = torch.where(gs.free[..., None], w, inputs[wname[id(lin)]].float().view_as(w))
            lin.weight.data = w.reshape(w.shape[0], -1)
            del lin.forward  # nn.Linear's own again
    tuned = [n for n, _ in free] + ([wname[id(lin)] for _, lin in linears] if opts.scales else [])
    with torch.no_grad():
        # what would be stored: every tuned tensor in the checkpoint's dtype; the rest as it came
        stored = {n: params[n].to(stored_dtype) for n in tuned}
        for n, v in inputs.items():
            params[n].copy_(stored.get(n, v))
    mismatches = (_code_mismatches([(name, lin, inputs[wname[id(lin)]]) for name, lin in linears], group_size,
                                   stored_dtype) if opts.scales else 0)
    rtn_in_place(student, arch, group_size, stored_dtype)
    final_kl = heldout_kl(targets.heldout_logp, student, heldout)
    kept = best["epoch"] > 0 and final_kl < start_kl  # epoch 0 is the input itself
    log(f"tune: held-out KL as served {final_kl:.5f} (start {start_kl:.5f}, best epoch {best['epoch']}); "
        + ("kept" if kept else "not kept: the input is written unchanged"))
    with torch.no_grad():  # leave the student holding what is to be stored
        for n, v in inputs.items():
            params[n].copy_(stored[n] if kept and n in stored else v)
    changed = sorted(n for n in stored if kept and not torch.equal(stored[n], inputs[n]))
    return {"method": "end-to-end KL(FP || RTN-at-load INT4) over RMSNorm weights"
                      + (", biases" if opts.biases else "") + (", group scales (codes frozen)" if opts.scales else ""),
            "options": asdict(opts), "samples": int(ids.shape[0]), "seq_len": int(ids.shape[1]),
            "train_loss": f"KL over the teacher's top {opts.topk} tokens and one bucket for the rest",
            "teacher_topk_mass": round(targets.topk_mass(), 5),
            "heldout_samples": int(heldout.shape[0]), "epochs": epochs, "best_epoch": best["epoch"],
            "heldout_kl_start": start_kl, "heldout_kl": final_kl if kept else start_kl,
            "heldout_kl_tuned": final_kl, "kept": kept, "rtn_at_load_code_mismatches": mismatches,
            "changed": changed, "seconds": round(time.perf_counter() - t0, 1)}


@torch.no_grad()
def _code_mismatches(linears: list, group_size: int, dtype: torch.dtype) -> int:
    """Codes and zero points that RTN at load (in the stored dtype) of the tuned weights gives
    differently from RTN of the input's weights, over (name, linear, input weight) triples: 0 when
    every tuned scale survives storage."""
    from vllm_sqplus.quant import quantize_int4
    bad = 0
    for name, lin, w_in in linears:
        q1, _, z1 = quantize_int4(w_in.to(dtype), group_size, True, name)
        q2, _, z2 = quantize_int4(lin.weight.to(dtype), group_size, True, name)
        bad += int((q1 != q2).sum()) + int((z1 != z2).sum())
    return bad


# ------------------------------------------------------------------------------------------------ CLI

def add_parser(subparsers) -> None:
    o = TuneOptions()
    p = subparsers.add_parser("tune", help="end-to-end tuning of norms, biases and group scales of a smoothed "
                                           "checkpoint (codes frozen)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="smoothed checkpoint folder (sqplus smooth)")
    p.add_argument("--fp", required=True, help="the full-precision checkpoint it was made from (the teacher)")
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--epochs", type=int, default=o.epochs)
    p.add_argument("--lr", type=float, default=o.lr, help="norms and biases: step relative to the tensor's mean |value|")
    p.add_argument("--scale-lr", type=float, default=o.scale_lr, help="group scales: step on log(scale)")
    p.add_argument("--topk", type=int, default=o.topk,
                   help="teacher tokens per position the training loss keeps (the rest are one bucket)")
    p.add_argument("--no-scales", action="store_true", help="leave the group scales as RTN at load sets them")
    p.add_argument("--no-biases", action="store_true")
    p.add_argument("--calib", default=None, help="as sqplus smooth --calib (default: the one the checkpoint records)")
    p.add_argument("--samples", type=int, default=None,
                   help="training samples: those of sqplus smooth's GPTQ stage (default: as recorded, else 64)")
    p.add_argument("--seq-len", type=int, default=None, help="default: as recorded, else 512")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_run)


def _validate(args) -> tuple[dict, dict, Path]:
    """Every check that config.json files and flags allow, before a model loads."""
    from types import SimpleNamespace
    from vllm_sqplus.arch import get_arch
    from vllm_sqplus.checkpoint import check_group_size_for_config, check_output_dir, read_config
    from vllm_sqplus.config import parse_config
    raw, fp = read_config(args.model), read_config(args.fp)
    qc = raw.get("quantization_config") or {}
    if qc.get("quant_method") != "smoothquant_plus":
        raise SqplusError(f"{args.model} is not a smoothed checkpoint (its config.json names quant_method "
                          f"{qc.get('quant_method')!r}, not 'smoothquant_plus'); make one with sqplus smooth")
    if qc.get("format", "smoothed") != "smoothed":
        raise SqplusError(f"{args.model} is a packed checkpoint; tune needs the smoothed form")
    if not qc.get("zero_point", True):
        raise SqplusError(f"{args.model} is quantized without zero point; tune needs zero_point true")
    if fp.get("quantization_config"):
        raise SqplusError(f"--fp {args.fp} is quantized; give the full-precision checkpoint")
    get_arch(SimpleNamespace(architectures=raw.get("architectures"), model_type=raw.get("model_type")))
    check_group_size_for_config(raw, parse_config(qc, env={}).group_size)
    for key in ("architectures", "vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size"):
        if raw.get(key) != fp.get(key):
            raise SqplusError(f"--fp {args.fp} is not the model {args.model} was made from: {key} "
                              f"{fp.get(key)!r} against {raw.get(key)!r}")
    for flag in ("epochs", "samples", "seq_len", "topk"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            raise SqplusError(f"--{flag.replace('_', '-')} must be >= 1, got {v}")
    if not any(Path(args.model).glob("*.safetensors")):
        raise SqplusError(f"{args.model} has no *.safetensors weights (tune rewrites safetensors files only)")
    out = check_output_dir(args.model, args.out, args.overwrite)
    if Path(args.fp).resolve() in (out, *out.parents):
        raise SqplusError("--out must differ from (and not lie inside) the --fp folder")
    return raw, qc, out


def _run(args) -> int:
    from transformers import AutoTokenizer
    from vllm_sqplus.arch import get_arch
    from vllm_sqplus.calib import (DEFAULT_CALIB, DEFAULT_GPTQ_SAMPLES, DEFAULT_HELDOUT, DEFAULT_STAT_SAMPLES,
                                   load_calibration_texts, split_calibration, tokenize_samples)
    from vllm_sqplus.checkpoint import DTYPES, check_finite, load_full_precision, peak_rss_gib, write_checkpoint_atomic
    from vllm_sqplus.config import parse_config
    raw, qc, out = _validate(args)
    cfg = parse_config(qc, env={})
    rec_cal = qc.get("calibration") or {}
    calib = args.calib or rec_cal.get("data") or DEFAULT_CALIB
    n = args.samples or rec_cal.get("gptq_samples") or DEFAULT_GPTQ_SAMPLES
    seq_len = args.seq_len or rec_cal.get("seq_len") or 512
    n_held = rec_cal.get("heldout_samples") or DEFAULT_HELDOUT
    n_stats = rec_cal.get("samples") or DEFAULT_STAT_SAMPLES
    texts = load_calibration_texts(calib)  # a bad --calib fails here, before the models load
    stored = raw.get("dtype") or raw.get("torch_dtype") or "float32"
    stored_dtype = DTYPES.get(stored)
    if stored_dtype is None:
        raise SqplusError(f"{args.model}: stored dtype {stored!r} is not bfloat16, float16 or float32")
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(args.model)
    # the token stream of `sqplus smooth`, cut as it cuts it: the GPTQ stage's samples to train on,
    # the search's held-out samples (never among them) to choose the epoch and to judge the result
    stream = tokenize_samples(tok, texts, n_stats + n_held + max(0, n - n_stats), seq_len)
    _, heldout, ids = split_calibration(stream, n_stats, n_held, n)
    # the student in its stored dtype while the teacher runs (float32 once the teacher is freed: the
    # two models in float32 at once would not fit 24 GiB at 1.5B parameters)
    student = load_full_precision(args.model, stored_dtype, attn_implementation="sdpa")
    check_finite(student, args.model)
    teacher = load_full_precision(args.fp, torch.float32, attn_implementation="sdpa")
    check_finite(teacher, args.fp)
    topk = min(args.topk, int(teacher.config.vocab_size))
    print(f"tune: the teacher on {ids.shape[0]} + {heldout.shape[0]} samples (top {topk} tokens kept for training)",
          file=sys.stderr, flush=True)
    targets = teacher_targets(teacher, ids, heldout, topk)
    del teacher
    gc.collect()
    student.float()
    arch = get_arch(student.config)
    if cfg.lm_head != "none":  # the served logits: the plugin's lm_head quantization, frozen
        from vllm_sqplus.lm_head import pseudo_quantize_lm_head
        head = student.get_output_embeddings()
        head.weight = nn.Parameter(pseudo_quantize_lm_head(head.weight.detach().clone(), cfg.lm_head,
                                                           cfg.group_size, True), requires_grad=False)
    print(f"tune: {ids.shape[0]} x {ids.shape[1]} training tokens, {heldout.shape[0]} held-out samples ({calib})",
          file=sys.stderr, flush=True)
    opts = TuneOptions(epochs=args.epochs, lr=args.lr, scale_lr=args.scale_lr, scales=not args.no_scales,
                       biases=not args.no_biases, topk=topk)
    record = tune(targets, student, arch, ids, heldout, cfg.group_size, stored_dtype, opts,
                  log=lambda m: print(m, file=sys.stderr, flush=True))
    del targets
    record.update(peak_rss_gib=round(peak_rss_gib(), 3), command=" ".join(["sqplus", *sys.argv[1:]]),
                  date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), machine=platform.node(),
                  threads=torch.get_num_threads(), fp=str(args.fp), input=str(args.model))
    changed = {n: p.detach().to(stored_dtype) for n, p in student.named_parameters() if n in record["changed"]}

    def files(tmp: Path) -> None:
        from safetensors import safe_open
        from safetensors.torch import save_file
        found = set()
        for src in sorted(Path(args.model).iterdir()):
            if not src.is_file():
                continue
            if src.suffix == ".safetensors":
                with safe_open(str(src), "pt") as f:
                    hit = set(f.keys()) & changed.keys()
                    if hit:  # rewritten with the tuned tensors; a file without any is copied below
                        tensors = {k: changed[k].contiguous() if k in hit else f.get_tensor(k) for k in f.keys()}
                        meta = f.metadata()
                if hit:
                    save_file(tensors, str(tmp / src.name), metadata=meta)
                    found |= hit
                    continue
            if src.name != "config.json":
                shutil.copy2(src, tmp / src.name)
        for sub in ("sqplus_stats",):
            if (Path(args.model) / sub).is_dir():
                shutil.copytree(Path(args.model) / sub, tmp / sub)
        if found != changed.keys():
            raise SqplusError(f"{args.model}: tensors not found in its safetensors files: "
                              f"{sorted(changed.keys() - found)[:3]}")
        summary = {k: record[k] for k in ("method", "heldout_kl_start", "heldout_kl", "kept", "best_epoch",
                                           "samples", "rtn_at_load_code_mismatches", "seconds")}
        new = dict(raw, quantization_config=dict(qc, tuned=dict(summary, record=TUNE_RECORD)))
        (tmp / "config.json").write_text(json.dumps(new, indent=2) + "\n")
        (tmp / TUNE_RECORD).write_text(json.dumps(record, indent=2) + "\n")

    write_checkpoint_atomic(out, args.overwrite, files)
    print(f"tune: wrote {out} in {time.perf_counter() - t0:.0f}s "
          f"(held-out KL {record['heldout_kl_start']:.5f} -> {record['heldout_kl']:.5f})", file=sys.stderr)
    return 0
