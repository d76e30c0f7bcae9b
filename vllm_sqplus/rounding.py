"""Learned rounding: the search's last stage as an alternative to GPTQ (`sqplus smooth --rounding learned`).

SignRound (Cheng et al., "Optimize Weight Rounding via Signed Gradient Descent for the Quantization
of LLMs", arXiv 2309.05516; Intel's AutoRound), block-wise: per decoder layer, every linear's
INT4 weight is W_q = (clamp(round(W / s + V) + z, 0, 15) - z) * s with s, z the group's min-max
range scaled by learned factors (a_lo, a_hi in [range_min, 1]: a learned clipping) and a learned
rounding offset V in [-0.5, 0.5] per weight (V = 0, a = 1 is plain RTN). V and the factors follow
the sign of the gradient of the layer's output error (mean squared error against the
full-precision layer's output on full-precision inputs, the layer fed the already quantized
stream: the error of the layers before it is what this layer sees as deployed), with rounding
passed straight through. (RoundingOptions.target "layer" fits the full-precision layer on the
same quantized stream instead, GPTQ's target: the layer's own function only, not the error that
reaches it. Measured in session 20: worse on both SmolLM2 and Qwen2.5-Coder-0.5B, so opt-in.)
The step is lr = 1 / iters, decaying linearly to 0, so no offset moves by more than half a step
in all.

Unlike GPTQ it needs no Hessian and fits the layer's joint output (attention and MLP together),
not each linear's own. The iterate with the lowest error on a fixed subset of the calibration
samples is kept (checked every `check_every` steps; the start is the first candidate), so the
stage never leaves a layer worse than where it started on that subset. The start is plain RTN of
the layer's weights as given; where those are already INT4 grid values (GPTQ's result in the
RTN-reproducible form: the search's "gptq+learned") the start is exactly that quantization.

Output as the GPTQ stage's: per linear (codes, scales, zeros) in the RTN-reproducible form
(gptq._reproducible_group: the stored dequantized group is given back exactly these by plain RTN
at load, its smallest and largest weight pinned to the codes 0 and 15), so the checkpoint stays a
plain smoothed BF16/FP16 one that the plugin rounds while loading.

Cost: iters forward + backward passes of one layer on `batch` samples, per layer: about 50 x 2
samples of 512 tokens take 70 s per layer of Qwen2.5-Coder-0.5B on one core of a 2-core Xeon.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vllm_sqplus.arch import ArchSpec, get_module
from vllm_sqplus.gptq import _reproducible_group
from vllm_sqplus.quant import _MIN_RANGE, check_group_size


@dataclass(frozen=True)
class RoundingOptions:
    iters: int = 50            # signed-gradient steps per layer
    batch: int = 2             # calibration samples per step
    lr: float | None = None    # None: 1 / iters
    range_min: float = 0.5     # the smallest learned range factor (a group's range shrinks to at most this)
    val_samples: int = 8       # fixed calibration samples that pick the iterate kept
    check_every: int = 10
    seed: int = 0
    loss: str = "mse"          # "mse", or "normed": the error as the next RMSNorm passes it on (output_error)
    target: str = "fp"         # "fp": the full-precision layer on the full-precision stream (AutoRound's);
                               # "layer": the full-precision layer on the quantized stream (GPTQ's)


LOSSES = ("mse", "normed")
TARGETS = ("fp", "layer")


def output_error(out: torch.Tensor, tgt: torch.Tensor, loss: str = "mse",
                 gamma: torch.Tensor | None = None) -> torch.Tensor:
    """The layer-output error the fit minimises. "mse": mean squared error. "normed": the error as
    the next RMSNorm (weight gamma) passes it on, up to the change of the token's RMS: each
    token's error divided by the root mean square of its target and multiplied channel-wise by
    gamma, mean(((out - tgt) * gamma / rms(tgt))^2). Why it was tried: on Qwen2 the residual
    stream carries a few channels some hundred times larger than the rest on a few tokens, which
    rule a plain MSE, while the next layer reads them divided by their token's RMS. Measured on
    Qwen2.5-Coder-0.5B (session 20): worse than "mse" on held-out code and English, so opt-in."""
    if loss == "mse":
        return F.mse_loss(out, tgt)
    if loss != "normed":
        raise ValueError(f"unknown rounding loss {loss!r}; one of {', '.join(LOSSES)}")
    e = (out - tgt) * tgt.float().pow(2).mean(-1, keepdim=True).clamp(min=1e-12).rsqrt()
    if gamma is not None:
        e = e * gamma.float()
    return e.pow(2).mean()


def _ste_round(x: torch.Tensor) -> torch.Tensor:
    return (x.round() - x).detach() + x


def _ste_cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x rounded to dtype's values (kept float32), gradient passed straight through."""
    return (x.to(dtype).float() - x).detach() + x


class _LearnedQuant:
    """The learnable INT4 quantization of one weight w [N, K] (groups of g along K), its range and
    scale rounded to store_dtype as the plugin's RTN at load will read them."""

    def __init__(self, w: torch.Tensor, group_size: int, store_dtype: torch.dtype = torch.float32):
        n, k = w.shape
        self.g = check_group_size(k, group_size)
        self.store_dtype = store_dtype
        self.w = w.detach().float().reshape(n, k // self.g, self.g)
        self.V = torch.zeros_like(self.w, requires_grad=True)
        self.a_lo = torch.ones(n, k // self.g, requires_grad=True)
        self.a_hi = torch.ones(n, k // self.g, requires_grad=True)
        self.lo = self.w.amin(-1).clamp(max=0)
        self.hi = self.w.amax(-1).clamp(min=0)

    def params(self) -> list[torch.Tensor]:
        return [self.V, self.a_lo, self.a_hi]

    def weight(self) -> torch.Tensor:
        """The fake-quantized weight [N, K], differentiable in V and the range factors."""
        sd = self.store_dtype
        lo, hi = _ste_cast(self.lo * self.a_lo, sd), _ste_cast(self.hi * self.a_hi, sd)
        s = _ste_cast((hi - lo).clamp(min=_MIN_RANGE) / 15, sd)
        z = _ste_round(-lo / s).clamp(0, 15)
        q = (_ste_round(self.w / s[..., None] + self.V) + z[..., None]).clamp(0, 15)
        return ((q - z[..., None]) * s[..., None]).flatten(1)

    @torch.no_grad()
    def step(self, lr: float, range_min: float) -> None:
        for p in self.params():
            if p.grad is not None:
                p -= lr * p.grad.sign()
                p.grad = None
        self.V.clamp_(-0.5, 0.5)
        self.a_lo.clamp_(range_min, 1.0)
        self.a_hi.clamp_(range_min, 1.0)

    @torch.no_grad()
    def final(self):
        """(codes uint8 [N, K], scales store_dtype [N, K/g], zeros uint8 [N, K/g]) in the
        RTN-reproducible form: RTN at load of the dequantized, stored weight gives them back."""
        n, ng, g = self.w.shape
        store_dtype = self.store_dtype
        lo = (self.lo * self.a_lo).to(store_dtype).float().clamp(max=0)
        hi = (self.hi * self.a_hi).to(store_dtype).float().clamp(min=0)
        s32, z, s_st, _ = _reproducible_group(lo.flatten(), hi.flatten(), store_dtype)
        s32, z, s_st = s32.view(n, ng), z.view(n, ng), s_st.view(n, ng)
        q = (torch.round(self.w / s32[..., None] + self.V) + z[..., None]).clamp(0, 15)
        # the group's smallest / largest weight carry the codes 0 / 15 (where its range ends off 0),
        # so the stored group spans exactly the range RTN at load reads back
        lo_idx, hi_idx = self.w.argmin(-1, keepdim=True), self.w.argmax(-1, keepdim=True)
        q.scatter_(-1, lo_idx, torch.where(z[..., None] > 0, 0.0, q.gather(-1, lo_idx)))
        q.scatter_(-1, hi_idx, torch.where(z[..., None] < 15, 15.0, q.gather(-1, hi_idx)))
        return q.flatten(1).to(torch.uint8), s_st, z.to(torch.uint8)


def learned_rounding_layer(work: nn.Module, ref: nn.Module, arch: ArchSpec, runner, hs_q: torch.Tensor,
                           hs_fp: torch.Tensor, group_size: int, store_dtype: torch.dtype,
                           opts: RoundingOptions = RoundingOptions(), gamma: torch.Tensor | None = None):
    """Learned rounding of the linears of `work` (the layer as it will be stored: smoothed, clipped,
    not yet quantized) against `ref` (the full-precision layer; on hs_fp, or on hs_q with
    opts.target "layer"). hs_q: the quantized model's stream into this layer; hs_fp: the
    full-precision model's. gamma: the weight of the RMSNorm after the layer (the next layer's
    input norm, or the final norm), for opts.loss "normed". Returns ({linear: (codes, scales,
    zeros)}, the quantized stream out of the layer, the full-precision stream out of `ref` on hs_fp,
    a log dict: its val_mse keys hold opts.loss's error); the linears of `work` are left holding
    their dequantized INT4 weights."""
    from vllm_sqplus.quant import dequantize_int4
    if opts.target not in TARGETS:
        raise ValueError(f"unknown rounding target {opts.target!r}; one of {', '.join(TARGETS)}")
    with torch.no_grad():
        fp_out = runner.run_layer(ref, hs_fp)
        tgt = fp_out if opts.target == "fp" else runner.run_layer(ref, hs_q)
    kwargs = runner._capture_kwargs(hs_q.shape[1])
    lqs = {name: _LearnedQuant(get_module(work, name).weight, group_size, store_dtype) for name in arch.linears}
    saved = {}
    for p in work.parameters():
        p.requires_grad_(False)
    for name, lq in lqs.items():
        mod = get_module(work, name)
        saved[name] = mod.forward
        mod.forward = (lambda x, mod=mod, lq=lq: F.linear(x, lq.weight(), mod.bias))
    params = [p for lq in lqs.values() for p in lq.params()]
    n = hs_q.shape[0]
    gen = torch.Generator().manual_seed(opts.seed)
    val = torch.arange(n)[:: max(1, n // opts.val_samples)][: opts.val_samples]
    lr = opts.lr if opts.lr is not None else 1.0 / opts.iters

    def loss_on(idx: torch.Tensor) -> torch.Tensor:
        out = work(hs_q[idx], **kwargs)
        out = out[0] if isinstance(out, tuple) else out
        return output_error(out, tgt[idx], opts.loss, gamma)

    def val_loss() -> float:
        with torch.no_grad():
            return sum(float(loss_on(c)) * len(c) for c in val.split(runner.batch_size)) / len(val)

    def snap() -> list[torch.Tensor]:
        return [p.detach().clone() for p in params]

    try:
        start_loss = best = val_loss()
        best_state, best_it = snap(), 0
        for it in range(opts.iters):
            if it and it % opts.check_every == 0:
                v = val_loss()
                if v < best:
                    best, best_state, best_it = v, snap(), it
            loss_on(torch.randperm(n, generator=gen)[: opts.batch]).backward()
            step_lr = lr * (1 - it / opts.iters)
            for lq in lqs.values():
                lq.step(step_lr, opts.range_min)
        v = val_loss()
        if v < best:
            best, best_state, best_it = v, snap(), opts.iters
        with torch.no_grad():
            for p, b in zip(params, best_state):
                p.copy_(b)
    finally:
        for name, fwd in saved.items():
            get_module(work, name).forward = fwd
    qs = {}
    with torch.no_grad():
        for name, lq in lqs.items():
            codes, s, z = lq.final()
            w = get_module(work, name).weight
            w.copy_(dequantize_int4(codes, s, z, group_size, dtype=store_dtype).to(w.dtype))
            qs[name] = (codes, s, z)
        hs_next = runner.run_layer(work, hs_q)
    log = {"start_val_mse": start_loss, "val_mse": best, "kept_step": best_it, "loss": opts.loss,
           "target": opts.target}
    return qs, hs_next, fp_out, log
