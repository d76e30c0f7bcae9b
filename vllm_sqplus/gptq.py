"""`sqplus gptq MODEL --out Q_DIR`: error-compensating INT4 (GPTQ) on a smoothed checkpoint.

The optional last stage beyond the paper: the smoothed (and clipped) weights of `sqplus smooth` are
quantized with GPTQ (Frantar et al., arXiv 2210.17323) instead of plain rounding: column by column,
each column's rounding error is pushed onto the columns not yet quantized through the inverse of the
input Hessian H = X^T X, so the layer's output error shrinks where plain RTN leaves it. Scheme as
everywhere here: INT4, asymmetric min-max with zero point per group of g along K (quant.py's
formulas; a group's scale and zero come from the group's weights as updated when GPTQ reaches its
first column), lm_head and embeddings kept. Act-order (default; --no-act-order for the plain
order) quantizes the columns in decreasing order of input energy with static groups (parameters
from the weights as given), so the packed layout stays the plain one.

Layer by layer (one decoder layer on the device at a time), on the *quantized* model's stream of the
calibration samples: the Hessians of a layer's linears are collected in one forward of the layer,
every linear is quantized, and the quantized layer produces the next layer's input, as GPTQ does
(--no-true-sequential). The default, true-sequential, instead quantizes each linear, in one forward
of the whole stream, from the input the already quantized linears before it give it (one forward per
layer instead of two).

--asymmetric (off by default): the full-precision stream of the calibration samples is carried
beside the quantized one (one more forward per layer), and each linear rounds the weight that best
maps its quantized-stream input to the full-precision layer's output on the full-precision stream
(asymmetric_target; GPTAQ's asymmetric calibration, arXiv 2504.02692), so the error the quantized
layers before it left is corrected too, not only its own rounding error.

Output: the pre-quantized "packed" checkpoint that the vLLM plugin and transformers (after
`import vllm_sqplus`) load without requantizing (names in export.py). `--dense-out DIR` also writes
the dequantized weights as a plain float32 checkpoint, for evaluation with any tool.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from vllm_sqplus.errors import SqplusError
from vllm_sqplus.quant import _MIN_RANGE, check_group_size


def _group_params(w: torch.Tensor, zero_point: bool, store_dtype: torch.dtype):
    """quant.py's scale / zero for rows of one group w [N, g] -> (scale fp32 [N], zero fp32 [N], scale stored)."""
    if zero_point:
        s, z = _load_time_params(w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0), store_dtype)
        s32 = s.float()
    else:
        s = (w.abs().amax(-1).clamp(min=_MIN_RANGE) / 7).to(store_dtype)
        s32 = s.float()
        z = torch.full_like(s32, 8.0)
    return s32, z, s


def _next_values(s: torch.Tensor, steps: int) -> torch.Tensor:
    """The store-dtype values `steps` ulps from s (s > 0, a store-dtype tensor), same dtype."""
    bits = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}[s.dtype]
    return (s.view(bits) + steps).view(s.dtype)


def _load_time_params(lo_st: torch.Tensor, hi_st: torch.Tensor, store_dtype: torch.dtype):
    """quant.quantize_int4's scale (as stored) and zero for a group whose stored min/max are
    lo_st <= 0 <= hi_st (store-dtype values as float32): what RTN at load will find."""
    s = ((hi_st - lo_st).clamp(min=_MIN_RANGE) / 15).to(store_dtype)
    return s, torch.round(-lo_st / s.float()).clamp(0, 15)


def _reproducible_group(lo: torch.Tensor, hi: torch.Tensor, store_dtype: torch.dtype, tries: int = 3):
    """A scale (store dtype) and zero for a group with range lo <= 0 <= hi [N] such that a group
    holding the codes 0 and 15 (dequantized, stored in store_dtype) is given back exactly this
    scale and zero by RTN at load. Starts from RTN's own scale and tries its neighbours (a few
    ulps) where rounding the stored extremes moves it. Returns (s32, z, s_stored, ok [N] bool)."""
    s0, z0 = _load_time_params(lo, hi, store_dtype)
    best_s, best_z = s0.clone(), z0
    ok = torch.zeros_like(lo, dtype=torch.bool)
    for d in [0, *[x for k in range(1, tries + 1) for x in (-k, k)]]:
        sc = _next_values(s0, d) if d else s0
        s32 = sc.float()
        zc = torch.round(-lo / s32).clamp(0, 15)
        lo_st = ((0 - zc) * s32).to(store_dtype).float()
        hi_st = ((15 - zc) * s32).to(store_dtype).float()
        s_back, z_back = _load_time_params(lo_st.clamp(max=0), hi_st.clamp(min=0), store_dtype)
        good = (s_back == sc) & (z_back == zc) & (s32 > 0) & ~ok
        best_s = torch.where(good, sc, best_s)
        best_z = torch.where(good, zc, best_z)
        ok |= good
    return best_s.float(), best_z, best_s, ok


def _group_range_params(grp: torch.Tensor, col0: int, zero_point: bool, store_dtype: torch.dtype,
                        reproducible: bool, shrink: float | None = None):
    """A group's quantization from its weights grp [N, g] (columns col0 .. col0+g-1) ->
    (s32, z, s_stored, pin_lo, pin_hi): pin_lo / pin_hi [N] are the columns given the codes 0 / 15
    in the reproducible form (-1: none, where the group's range ends at 0), else None.
    shrink: the range clipped to shrink x (min, max) (zero point, reproducible only)."""
    if not reproducible:
        s32, z, s_st = _group_params(grp, zero_point, store_dtype)
        return s32, z, s_st, None, None
    hi, lo = grp.amax(-1).clamp(min=0), grp.amin(-1).clamp(max=0)
    if shrink is not None:
        hi, lo = hi * shrink, lo * shrink
    s32, z, s_st, _ = _reproducible_group(lo.to(store_dtype).float(), hi.to(store_dtype).float(), store_dtype)
    pin_lo = torch.where(z > 0, col0 + grp.argmin(-1), -1)
    pin_hi = torch.where(z < 15, col0 + grp.argmax(-1), -1)
    return s32, z, s_st, pin_lo, pin_hi


def _lower_triangular_inverse(L: torch.Tensor, leaf: int = 256) -> torch.Tensor:
    """L^-1 of a lower triangular L, by halves: with L = [[A, 0], [C, D]],
    L^-1 = [[A^-1, 0], [-D^-1 C A^-1, D^-1]]. About K^3 / 3 multiply-adds against the K^3 of a
    triangular solve against the identity (3.9 s instead of 6.0 s at K = 8960, 1 thread); the
    same inverse to float32 rounding (relative difference 1e-7 measured there)."""
    n = L.shape[0]
    if n <= leaf:
        return torch.linalg.solve_triangular(L, torch.eye(n, dtype=L.dtype, device=L.device), upper=False)
    h = n // 2
    out = torch.zeros_like(L)
    out[:h, :h] = _lower_triangular_inverse(L[:h, :h], leaf)
    out[h:, h:] = _lower_triangular_inverse(L[h:, h:], leaf)
    out[h:, :h] = -(out[h:, h:] @ (L[h:, :h] @ out[:h, :h]))
    return out


def _inverse_upper_cholesky(box: list) -> torch.Tensor:
    """The upper triangular U with U^T U = H^-1 (GPTQ's Hinv) of the Hessian H in box ([H], taken
    out of it, overwritten), from one Cholesky and one triangular inverse: with J the order-reversing
    permutation and J H J = L L^T, H^-1 = (J L^-1 J)^T (J L^-1 J) and J L^-1 J is upper triangular.
    Faster than Cholesky, inverse, Cholesky again, the same factor up to rounding, and at most
    three K x K matrices alive at once (H is let go as soon as it is factored: 0.32 GB each at
    K = 8960)."""
    H = box.pop()
    try:
        L = torch.linalg.cholesky(H.flip(0, 1))
    except RuntimeError as e:
        raise SqplusError(f"GPTQ: the input Hessian is not positive definite ({e}); use more calibration samples")
    del H
    Linv = _lower_triangular_inverse(L)
    del L
    return Linv.flip(0, 1)


def _searched_group_range(grp: torch.Tensor, col0: int, d: torch.Tensor, store_dtype: torch.dtype,
                          ratios: tuple[float, ...]):
    """_group_range_params (reproducible form) of the per-row range shrink in `ratios` with the
    least input-energy-weighted rounding error sum_j d_j (w_j - deq(q(w_j)))^2 (d [g]: diag(H) of
    the group's columns), GPTQ's "mse" range on the weights as given (static groups)."""
    n = grp.shape[0]
    best_err = torch.full((n,), float("inf"))
    best = None
    for r in ratios:
        s32, z, s_st, plo, phi = _group_range_params(grp, col0, True, store_dtype, True, shrink=float(r))
        q = (torch.round(grp / s32[:, None]) + z[:, None]).clamp(0, 15)
        err = (((q - z[:, None]) * s32[:, None] - grp).pow(2) * d[None, :]).sum(-1)
        take = err < best_err
        best_err = torch.where(take, err, best_err)
        cur = (s32, z, s_st, plo, phi)
        best = cur if best is None else tuple(torch.where(take, c, b) for c, b in zip(cur, best))
    return best


@torch.no_grad()
def gptq_quantize(w: torch.Tensor, h, group_size: int, zero_point: bool = True,
                  store_dtype: torch.dtype = torch.bfloat16, block: int = 128, damp: float = 0.01,
                  reproducible: bool = False, act_order: bool = False,
                  range_ratios: tuple[float, ...] | None = None):
    """GPTQ of w [N, K] with input Hessian h [K, K] -> (q uint8 [N, K], scales [N, K/g] store_dtype,
    zeros uint8 [N, K/g]); dequantize_int4 of the result is the layer's new weight.

    reproducible (zero point only): the result, dequantized and stored in store_dtype as a plain
    weight, is quantized back to exactly (q, scales, zeros) by plain RTN (quant.quantize_int4), so
    a smoothed checkpoint can carry GPTQ's rounding decisions and the plugin still only rounds at
    load. Per group, the scale is one RTN at load reproduces (_reproducible_group) and the group's
    smallest and largest weight are given the codes 0 and 15, so the stored group spans exactly
    that range; GPTQ's error feedback absorbs the two pinned roundings.

    act_order: columns are quantized in decreasing order of diag(H) (the inputs with the most energy
    first, while the most columns are left to absorb their error), with static groups: every group's
    scale, zero (and pins) come from the weights as given, before any update, so the groups stay the
    plain contiguous ones (no g_idx; llm-compressor's actorder "static"). Without it, a group's
    parameters come from its weights as updated when GPTQ reaches the group's first column.

    range_ratios (act_order and reproducible only): each (row, group) range is the shrink among
    these with the least diag(H)-weighted rounding error of the weights as given
    (_searched_group_range); None: the plain min-max range.

    h may also be a one-element list [H] (float32): H is then taken out of the list and overwritten,
    so a caller that holds no other reference does not keep a K x K copy alive meanwhile.
    """
    if reproducible and not zero_point:
        raise SqplusError("GPTQ in the RTN-reproducible form needs the zero-point scheme")
    if range_ratios is not None and not act_order:
        raise SqplusError("GPTQ's range search goes with act-order (static groups)")
    if range_ratios is not None and not reproducible:
        raise SqplusError("GPTQ's range search needs the RTN-reproducible form")
    n, k = w.shape
    g = check_group_size(k, group_size)
    W = w.float().clone()
    H = h.pop() if isinstance(h, list) else h.float().clone()
    del h
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    scales = torch.zeros(n, k // g, dtype=store_dtype)
    zeros = torch.zeros(n, k // g, dtype=torch.uint8)
    perm = None
    if act_order:
        S32, Z, PLO, PHI = [], [], [], []
        dH = torch.diag(H)
        for gi in range(k // g):
            if range_ratios is not None:
                s32, z, s_st, plo, phi = _searched_group_range(W[:, gi * g:(gi + 1) * g], gi * g,
                                                               dH[gi * g:(gi + 1) * g], store_dtype, range_ratios)
            else:
                s32, z, s_st, plo, phi = _group_range_params(W[:, gi * g:(gi + 1) * g], gi * g, zero_point,
                                                             store_dtype, reproducible)
            scales[:, gi], zeros[:, gi] = s_st, z.to(torch.uint8)
            S32.append(s32), Z.append(z), PLO.append(plo), PHI.append(phi)
        S32, Z = torch.stack(S32, 1), torch.stack(Z, 1)
        if reproducible:
            PLO, PHI = torch.stack(PLO, 1), torch.stack(PHI, 1)
        perm = torch.argsort(torch.diag(H), descending=True, stable=True)
        W, H = W[:, perm], H.index_select(0, perm).index_select(1, perm)
    H.diagonal().add_(damp * torch.mean(torch.diag(H)))
    box = [H]
    del H
    Hinv = _inverse_upper_cholesky(box)
    block = max(block, g)  # groups never straddle a block (g in 32, 64, 128 or K)
    # The loop works on the transpose (one row per column of w): a column's reads and writes and
    # its rank-1 update of the block are then contiguous (a third less time at K = 8960).
    Wt = W.T.contiguous()
    del W
    Qt = torch.zeros(k, n, dtype=torch.uint8)
    s32 = z = pin_lo = pin_hi = None
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        W1 = Wt[i1:i2].clone()
        Err = torch.zeros_like(W1)
        Hi = Hinv[i1:i2, i1:i2]
        for j in range(i2 - i1):
            col = i1 + j if perm is None else int(perm[i1 + j])  # the column's place in w
            if perm is not None:
                gi = col // g
                s32, z = S32[:, gi], Z[:, gi]
                if reproducible:
                    pin_lo, pin_hi = PLO[:, gi], PHI[:, gi]
            elif col % g == 0:  # the group's range from its weights as they are now
                s32, z, s_st, pin_lo, pin_hi = _group_range_params(W1[j: j + g].T, col, zero_point,
                                                                   store_dtype, reproducible)
                scales[:, col // g] = s_st
                zeros[:, col // g] = z.to(torch.uint8)
            wc = W1[j]
            qc = (torch.round(wc / s32) + z).clamp(0, 15)
            if reproducible:
                qc = torch.where(pin_lo == col, 0.0, torch.where(pin_hi == col, 15.0, qc))
            Qt[col] = qc.to(torch.uint8)
            deq = (qc - z) * s32
            e = (wc - deq) / Hi[j, j]
            W1[j:].addr_(Hi[j, j:], e, alpha=-1)
            Err[j] = e
        Wt[i2:] -= Hinv[i1:i2, i2:].T @ Err
    Q = Qt.T.contiguous()
    return Q, scales, zeros


def _log(msg: str) -> None:
    print(f"[sqplus gptq] {msg}", file=sys.stderr, flush=True)


def gram(x: torch.Tensor, block: int = 1536) -> torch.Tensor:
    """x^T x [K, K] of x [T, K] (float32). Symmetric, so for wide inputs (the MLP's down projection)
    only the blocks on and above the diagonal are multiplied and the rest mirrored: 58% of the
    multiply-adds at K = 8960. Exactly symmetric either way."""
    k = x.shape[1]
    if k <= 2 * block:
        return x.T @ x
    nb = -(-k // block)
    edges = [round(i * k / nb) for i in range(nb + 1)]
    h = torch.empty(k, k, dtype=x.dtype, device=x.device)
    for a in range(nb):
        a0, a1 = edges[a], edges[a + 1]
        xa = x[:, a0:a1]
        for b in range(a, nb):
            b0, b1 = edges[b], edges[b + 1]
            blk = xa.T @ x[:, b0:b1]
            h[a0:a1, b0:b1] = blk
            if b != a:
                h[b0:b1, a0:a1] = blk.T
    return h


def capture_linear_inputs(layer, arch, runner, hs: torch.Tensor):
    """One forward of `layer` (not yet quantized) on the stream hs, in the runner's batches ->
    ({linear: (kind, [one tensor per batch])}, the layer's output): the full-precision side of the
    asymmetric GPTQ stage (gptq_layer's fp_inputs). kind "in": the linear's input X (linears called
    with the same tensor, q/k/v and gate/up, share the list's tensors, not copies); kind "out", for
    a linear with more inputs than outputs (the MLP's down projection): its output X W^T without
    the bias instead, which is all the residual needs and 4.9-5.8x smaller on Qwen2.5."""
    from vllm_sqplus.arch import get_module
    caps: dict = {}
    hooks = []
    for name in arch.linears:
        mod = get_module(layer, name)
        n, k = mod.weight.shape
        if k > n:
            caps[name] = ("out", [])
            hooks.append(mod.register_forward_hook(
                lambda m, a, o, name=name: caps[name][1].append(
                    (o if m.bias is None else o - m.bias).detach())))
        else:
            caps[name] = ("in", [])
            hooks.append(mod.register_forward_pre_hook(
                lambda m, a, name=name: caps[name][1].append(a[0].detach())))
    try:
        hs_out = runner.run_layer(layer, hs)
    finally:
        for hk in hooks:
            hk.remove()
    return caps, hs_out


# The asymmetric correction's ridge: l = ASYM_DAMP * mean diag(H). Single-layer probe (64 x 512 fitting
# tokens, output error on 8 other samples; session 24): 0.3 best of 0.01 / 0.03 / 0.1 / 0.3 / 1.0 on
# SmolLM2 layers 8 and 20; on Qwen2.5-Coder-0.5B layer 12 the error fell up to 1.0 (0.3 close). GPTQ's
# own 0.01 was the worst everywhere and, whole-model, worse than RTN on Qwen-0.5B; 0.3 beat the
# symmetric stage whole-model on SmolLM2 and Qwen-0.5B.
ASYM_DAMP = 0.3


def asymmetric_target(w: torch.Tensor, h: torch.Tensor, r: torch.Tensor, damp: float = ASYM_DAMP) -> torch.Tensor:
    """The weight GPTQ should round when the layer's input is the quantized model's X~ but its
    output should be the full-precision model's X W^T (asymmetric calibration, GPTAQ: Li et al.,
    arXiv 2504.02692): w + ((H + l I)^-1 R)^T with H = X~^T X~, R = X~^T (X - X~) W^T [K, N] and
    l = damp * mean diag(H). Then ||X W^T - X~ Q^T||^2 = ||X~ (W* - Q)^T||^2 + const (exact for
    l = 0), which GPTQ with H minimizes: the ridge-regressed correction of the output residual the
    quantized layers before this one left, onto this linear's input. Returns float32 [N, K]."""
    hd = h.float().clone()
    dead = torch.diag(hd) == 0
    hd[dead, dead] = 1.0
    hd.diagonal().add_(damp * torch.mean(torch.diag(hd)))
    chol = torch.linalg.cholesky(hd)
    del hd
    return w.float() + torch.cholesky_solve(r.float(), chol).T


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).float()


class _Stop(Exception):
    """Ends a chunk's pass through the MLP once the input of the linear being collected is seen."""


@torch.no_grad()
def gptq_layer(layer, arch, runner, hs: torch.Tensor, group_size: int, zero_point: bool,
               store_dtype: torch.dtype, reproducible: bool = False, act_order: bool = False,
               true_sequential: bool = False, range_ratios: tuple[float, ...] | None = None,
               fp_inputs: dict | None = None):
    """GPTQ of every linear of one decoder layer (on the device) in place -> ({linear: (q, s, z)},
    the quantized layer's output stream hs').

    fp_inputs (true_sequential only): {linear: (kind, its inputs or outputs per batch)} from the
    full-precision model's stream (capture_linear_inputs, same samples, same batches): each linear then rounds
    asymmetric_target(W) instead of W, so that its output on the quantized stream approaches the
    full-precision layer's output on the full-precision stream (GPTAQ's asymmetric calibration)
    rather than its own output on the quantized stream.

    Usual order (true_sequential False): every linear's Hessian from one forward of the layer as
    given (in batches, q/k/v and gate/up sharing theirs), all linears quantized, then a second
    forward gives hs'. true_sequential: one forward of the whole stream at once; each linear is
    quantized in a pre-hook just before it runs, from the Hessian of the input it receives then,
    so every Hessian sees the already quantized linears before it, and the forward's output is hs'.

    Memory in true-sequential order: each sub-module holding linears (the attention, the MLP)
    runs in batches of the runner's batch size, so its intermediates (attention scores, the MLP's
    wide activations) exist for one batch at a time: the linears that take the sub-module's input
    are quantized from the whole input's Hessian before the first batch; a pass over the batches
    collects the next linear's input (o_proj's, down_proj's), adds each batch's Gram to its Hessian
    and stops there; that linear is quantized, and the sub-module's output is that linear applied
    to what was collected (checked bit for bit on the first batch against the sub-module's own
    forward, which is run instead where it differs). A collected input wider than the sub-module's
    input (down_proj's: intermediate_size, 4.9-5.8x the hidden size) is not kept past its batch's
    Gram: the sub-module then runs again over the batches with that linear quantized, so the
    stage never holds more than one extra copy of the stream (at 64 x 512 tokens of Qwen2.5-1.5B,
    1.17 GB less) for one more pass of the MLP's gate/up."""
    from vllm_sqplus.arch import get_module
    from vllm_sqplus.quant import dequantize_int4
    out: dict = {}
    hess: dict = {}
    last: dict = {}
    hooks = []
    if fp_inputs is not None and not true_sequential:
        raise SqplusError("GPTQ's asymmetric calibration goes with the true-sequential order")
    fp_whole: dict = {}

    def residual(name, xq: torch.Tensor, batch: int | None = None) -> tuple[str, torch.Tensor]:
        """This linear's residual term on the whole stream or one batch, summed over batches by the
        caller: ("c", C) with C = X~^T (X W^T) [K, N] for a linear whose output was captured (then
        R = C - H W^T, with H the Hessian the stage computes anyway), else ("m", M) with
        M = X~^T (X - X~) [K, K] (R = M W^T: fewer multiply-adds when K <= N, and shared by the
        linears that share the input)."""
        kind, fp = fp_inputs[name]
        xq2 = _flat(xq)
        if kind == "out":
            y = fp[batch] if batch is not None else torch.cat(fp)
            return "c", xq2.T @ _flat(y)
        if batch is not None:
            return "m", xq2.T @ (_flat(fp[batch]) - xq2)
        if fp_whole.get("xq") is not xq or fp_whole.get("fp") is not fp[0]:  # identity, not equality
            fp_whole.clear()
            fp_whole.update(xq=xq, fp=fp[0], m=xq2.T @ (_flat(torch.cat(fp)) - xq2))
        return "m", fp_whole["m"]

    def quantize(mod, name, h, xq=None, r=None):
        if name in out:
            raise SqplusError(f"GPTQ: {name} runs twice in one decoder layer's forward; unsupported model code")
        if fp_inputs is not None:
            kind, t = r if r is not None else residual(name, xq)
            hh = h[0] if isinstance(h, list) else h
            rr = t @ mod.weight.float().T if kind == "m" else t - hh @ mod.weight.float().T
            mod.weight.copy_(asymmetric_target(mod.weight, hh, rr).to(mod.weight.dtype))
            del r, t, rr, hh
        q, s, z = gptq_quantize(mod.weight.to(store_dtype), h, group_size, zero_point, store_dtype,
                                reproducible=reproducible, act_order=act_order, range_ratios=range_ratios)
        mod.weight.copy_(dequantize_int4(q, s, z, group_size, dtype=torch.float32).to(mod.weight.device))
        out[name] = (q, s, z)

    # true-sequential: every sub-module holding linears (self_attn, mlp) runs in batches, staged
    groups = {}
    if true_sequential:
        for n in arch.linears:
            parent = n.rpartition(".")[0]
            if parent:
                groups[n] = parent
    states: dict = {p: {} for p in set(groups.values())}

    def staged_hook(mod, x_in, name):
        st = states[groups[name]]
        if name in out:
            return
        x0 = x_in.detach()
        if x_in is st["x"]:  # the sub-module's own input: the Hessian of the whole input
            if st.get("h") is None:
                st["h"] = gram(st["whole"].reshape(-1, x0.shape[-1]).float())
            quantize(mod, name, st["h"], xq=st["whole"])
            return
        st.update(target=(name, mod), p=x0)  # a derived input: collect it, end the batch
        raise _Stop

    def hook(mod, args, name):
        if name in groups:
            return staged_hook(mod, args[0], name)
        # q/k/v (gate/up) are called with the same tensor object (not merely equal): one Hessian
        shared = last.get("x") is args[0]
        if not shared:
            x0 = args[0].detach()
            last.update(x=args[0], name=name, h=gram(x0.reshape(-1, x0.shape[-1]).float()))
        if true_sequential:
            quantize(mod, name, last["h"], xq=last["x"])
        elif shared:
            hess.setdefault(name, hess[last["name"]])  # the same tensor, accumulated in place
        elif name in hess:
            hess[name] += last["h"]
        else:
            hess[name] = last["h"]

    def _joined(outs: list):
        """The batches' outputs as one: tensors concatenated; a tuple's first element likewise,
        its other elements None (attention weights not returned), anything else unsupported."""
        if isinstance(outs[0], tuple):
            if any(v is not None for o in outs for v in o[1:]):
                raise SqplusError("GPTQ (true-sequential): a sub-module returns more than its hidden "
                                  "states; unsupported model code")
            return (torch.cat([o[0] for o in outs]), *outs[0][1:])
        return torch.cat(outs)

    def staged_forward(path, orig):
        st = states[path]

        def forward(*args, **kwargs):
            if args:
                x = args[0]

                def call(xb):
                    st["x"] = xb
                    return orig(xb, *args[1:], **kwargs)
            else:  # HF passes the attention its input by keyword
                key = "hidden_states" if "hidden_states" in kwargs else "x"
                x = kwargs[key]

                def call(xb):
                    st["x"] = xb
                    return orig(**{**kwargs, key: xb})
            batches = x.split(runner.batch_size)
            st.update(whole=x.detach(), h=None)
            budget = x.numel() * x.element_size()
            while True:
                st["target"], collected, outs, h, held, r = None, [], [], None, 0, None
                for b, xb in enumerate(batches):
                    try:
                        outs.append(call(xb))
                    except _Stop:
                        p = st.pop("p")
                        hp = gram(p.reshape(-1, p.shape[-1]).float())  # summed over the batches
                        h = hp if h is None else h.add_(hp)
                        del hp
                        if fp_inputs is not None:
                            kind, rb = residual(st["target"][0], p, b)
                            r = (kind, rb) if r is None else (kind, r[1].add_(rb))
                            del rb
                        held += p.numel() * p.element_size()
                        if collected is not None and held <= budget:
                            collected.append(p)
                        else:  # wider than the sub-module's input (the MLP's down_proj): not kept
                            collected = None
                        del p
                if st["target"] is None:
                    return _joined(outs)
                name, mod = st["target"]
                box = [h]
                del h
                quantize(mod, name, box, r=r)
                r = None
                st["h"] = None
                if collected is None:  # the sub-module runs again, now with that linear quantized
                    continue
                try:
                    y0 = call(batches[0])
                except _Stop:  # another linear's input to collect first
                    continue
                first = y0[0] if isinstance(y0, tuple) else y0
                rest_none = not isinstance(y0, tuple) or all(v is None for v in y0[1:])
                if rest_none and torch.equal(first, mod(collected[0])):  # its output is that linear's
                    joined = torch.cat([first, *[mod(p) for p in collected[1:]]])
                    return (joined, *y0[1:]) if isinstance(y0, tuple) else joined
        return forward

    for name in arch.linears:
        hooks.append(get_module(layer, name).register_forward_pre_hook(
            lambda m, a, name=name: hook(m, a, name)))
    wrapped = [get_module(layer, p) for p in states]
    for path, m in zip(states, wrapped):
        m.forward = staged_forward(path, m.forward)
    try:
        if true_sequential:
            res = layer(hs, **runner._capture_kwargs(hs.shape[1]))
            hs_out = res[0] if isinstance(res, tuple) else res
        else:
            runner.run_layer(layer, hs)
    finally:
        for hk in hooks:
            hk.remove()
        for m in wrapped:
            del m.forward
        last.clear()
        states.clear()
        fp_whole.clear()
    missing = [n for n in arch.linears if n not in (out if true_sequential else hess)]
    if missing:
        raise SqplusError(f"GPTQ: {', '.join(missing)} never ran in the decoder layer's forward")
    if not true_sequential:
        for name in arch.linears:
            quantize(get_module(layer, name), name, hess[name])
        hs_out = runner.run_layer(layer, hs)
    return {n: out[n] for n in arch.linears}, hs_out


@torch.no_grad()
def gptq_model(model, arch, calib_ids: torch.Tensor, group_size: int, zero_point: bool,
               store_dtype: torch.dtype, device: str = "cpu", batch_size: int = 4, progress: bool = False,
               reproducible: bool = False, act_order: bool = True, true_sequential: bool = True,
               weights_dtype: torch.dtype | None = None, range_ratios: tuple[float, ...] | None = None,
               asymmetric: bool = False):
    """Quantize every decoder linear of `model` in place (weights become their dequantized INT4,
    float32, or weights_dtype where given: the stored dtype for the smoothed form, which holds
    them exactly there); returns {module name: (packed codes (export.pack_nibbles), scales, zeros)}.

    Layer by layer: the Hessians are collected on the quantized model's own stream, as GPTQ does.
    A replaced weight's pages in a memory-mapped checkpoint are released as it goes
    (checkpoint.release_file_pages), so the process holds one copy of the linears, not two.
    asymmetric: the full-precision stream is carried beside the quantized one and each layer's
    linears are fitted to it (gptq_layer's fp_inputs; one more forward per layer)."""
    from vllm_sqplus.arch import get_module
    from vllm_sqplus.calibrate import LayerwiseModel
    from vllm_sqplus.checkpoint import release_file_pages
    from vllm_sqplus.export import pack_nibbles
    runner = LayerwiseModel(model, arch, device, batch_size=batch_size)
    hs = runner.embed(calib_ids)
    hs_fp = hs.clone() if asymmetric else None
    out = {}
    it = range(len(runner.layers))
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc="gptq", unit="layer")
    for i in it:
        layer = runner.layer_on_device(i)
        fp = None
        if asymmetric:
            fp, hs_fp = capture_linear_inputs(layer, arch, runner, hs_fp)
        qs, hs = gptq_layer(layer, arch, runner, hs, group_size, zero_point, store_dtype, reproducible, act_order,
                            true_sequential, range_ratios, fp_inputs=fp)
        del fp
        stored = runner.layers[i]
        for name, t in qs.items():
            w = get_module(stored, name).weight
            old = w.data
            w.data = get_module(layer, name).weight.detach().to(w.device, weights_dtype or torch.float32,
                                                                 copy=True)
            release_file_pages(old)
            del old
            q, sc, zz = t
            out[f"{arch.layers}.{i}.{name}"] = (pack_nibbles(q), sc, zz)  # two codes a byte
        del layer
    return out


RANGE_RATIOS = tuple(round(1.0 - 0.025 * i, 3) for i in range(9))  # 1.0 .. 0.8


def range_ratios_of(on: bool) -> tuple[float, ...] | None:
    return RANGE_RATIOS if on else None


def add_order_args(p, prefix: str = "") -> None:
    """--{prefix}act-order and --{prefix}true-sequential (each with its --no- form) and
    --{prefix}range-search: the GPTQ options
    of `sqplus gptq` (no prefix) and of `sqplus smooth`'s GPTQ stage (prefix "gptq-"). Both on by
    default: on SmolLM2 and Qwen-0.5B together they gave the lowest held-out KL and code perplexity
    of the three orders measured (benchmarks/results/accuracy.md), in one forward per layer."""
    p.add_argument(f"--{prefix}act-order", action=argparse.BooleanOptionalAction, default=True,
                   help="quantize columns in decreasing order of input energy (static groups: the "
                        "stored layout and the plugin's RTN at load are unchanged); default on")
    p.add_argument(f"--{prefix}true-sequential", action=argparse.BooleanOptionalAction, default=True,
                   help="one forward per layer, each linear quantized from the input the quantized linears "
                        "before it give it; --no-...: all of a layer's Hessians from the layer as given, "
                        "then a second forward (GPTQ's usual order); default on")
    p.add_argument(f"--{prefix}asymmetric", action=argparse.BooleanOptionalAction, default=False,
                   help="fit each linear to the full-precision model's output on the full-precision "
                        "stream (GPTAQ's asymmetric calibration) instead of its own output on the quantized "
                        "stream; true-sequential only, one more forward per layer (off by default)")
    p.add_argument(f"--{prefix}range-search", action="store_true",
                   help="each group's range: the shrink (1.0 .. 0.8) with the least input-energy-weighted "
                        "rounding error, instead of min-max (act-order, RTN-reproducible form; off by default)")


def add_parser(subparsers) -> None:
    from vllm_sqplus.calib import DEFAULT_GPTQ_SAMPLES
    p = subparsers.add_parser("gptq", help="GPTQ INT4 of a smoothed checkpoint -> pre-quantized checkpoint",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="smoothed (sqplus smooth) or plain checkpoint folder")
    p.add_argument("--out", required=True, help="output checkpoint folder")
    p.add_argument("--format", choices=["packed", "smoothed"], default="packed",
                   help="packed: INT4 codes, scales, zeros (loaded as is); smoothed: the dequantized "
                        "weights in the input's dtype, which the plugin's RTN at load quantizes back to "
                        "exactly GPTQ's codes and scales (the paper's deployment form; zero point only)")
    add_order_args(p)
    p.add_argument("--dense-out", default=None, help="also write the dequantized weights (float32)")
    p.add_argument("--calib", default="stdlib", help="as sqplus smooth --calib")
    p.add_argument("--samples", type=int, default=DEFAULT_GPTQ_SAMPLES,
                   help="calibration samples: those sqplus smooth takes its statistics from (its default 32), "
                        "then the ones after its 4 held-out samples (the GPTQ stage of sqplus smooth; default 64)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--group-size", type=int, default=None, help="default: the input's, else 128")
    p.add_argument("--device", default="cpu")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from transformers import AutoTokenizer
    from vllm_sqplus.arch import get_arch
    from vllm_sqplus.calib import gptq_stage_ids
    from vllm_sqplus.checkpoint import (check_finite, check_group_size_for_config, check_output_dir,
                                        copy_side_files, load_full_precision, peak_rss_gib, read_config,
                                        write_checkpoint_atomic)
    from vllm_sqplus.config import SqplusConfig, parse_config
    from vllm_sqplus.export import unpack_nibbles
    t0 = time.perf_counter()
    raw = read_config(args.model)
    qc_in = raw.get("quantization_config")
    if qc_in is not None and (qc_in.get("quant_method") != "smoothquant_plus" or qc_in.get("format") == "packed"):
        raise SqplusError(f"{args.model} is already quantized; start from a smoothed or full-precision checkpoint")
    cfg = parse_config(dict(qc_in or {}, **({"group_size": args.group_size} if args.group_size else {})), env={})
    arch = get_arch(SimpleNamespace(architectures=raw.get("architectures"), model_type=raw.get("model_type")))
    check_group_size_for_config(raw, cfg.group_size)
    if args.range_search and (args.format != "smoothed" or not args.act_order):
        raise SqplusError("--range-search goes with --format smoothed and act-order (not --no-act-order)")
    if args.format == "smoothed" and args.dense_out:
        raise SqplusError("--dense-out goes with --format packed (the smoothed form is itself dense)")
    if args.asymmetric and not args.true_sequential:
        raise SqplusError("--asymmetric goes with the true-sequential order (not --no-true-sequential)")
    if args.samples < 1:
        raise SqplusError(f"--samples must be >= 1, got {args.samples}")
    out = check_output_dir(args.model, args.out, args.overwrite)
    dense = check_output_dir(args.model, args.dense_out, args.overwrite) if args.dense_out else None
    tok = AutoTokenizer.from_pretrained(args.model)
    ids, _ = gptq_stage_ids(tok, args.calib, args.samples, args.seq_len)  # its held-out samples stay unseen
    stored = raw.get("dtype") or raw.get("torch_dtype") or "bfloat16"
    store_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}.get(stored, torch.bfloat16)
    model = load_full_precision(args.model, store_dtype)
    check_finite(model, args.model)
    _log(f"{ids.shape[0]} x {ids.shape[1]} calibration tokens ({args.calib}), group {cfg.group_size}")
    if args.format == "smoothed" and not cfg.zero_point:
        raise SqplusError("--format smoothed needs the zero-point scheme (the input's quantization_config "
                          "has zero_point false)")
    qs = gptq_model(model, arch, ids, cfg.group_size, cfg.zero_point, store_dtype, args.device, progress=True,
                    reproducible=args.format == "smoothed", act_order=args.act_order,
                    true_sequential=args.true_sequential,
                    # float32 only for --dense-out, which writes the exact dequantized values
                    weights_dtype=None if dense is not None else store_dtype,
                    range_ratios=range_ratios_of(args.range_search), asymmetric=args.asymmetric)
    secs = time.perf_counter() - t0
    gptq_info = {"calibration": {"data": args.calib, "samples": int(ids.shape[0]), "seq_len": args.seq_len},
                 "damp": 0.01, "act_order": bool(args.act_order),
                 "true_sequential": bool(args.true_sequential),
                 **({"asymmetric": True, "asymmetric_ridge": ASYM_DAMP} if args.asymmetric else {}),
                 **({"range_ratios": list(RANGE_RATIOS)} if args.range_search else {}),
                 "seconds": round(secs, 1)}

    def write_smoothed(tmp: Path) -> None:
        from vllm_sqplus.checkpoint import save_model
        from vllm_sqplus.quant import quantize_int4
        model.to(store_dtype)
        # the promise of this form, checked on what is written: RTN at load gives GPTQ's quantization
        mismatched = 0
        for mod, (packed, s, z) in qs.items():
            w = get_module(model, mod).weight
            q2, s2, z2 = quantize_int4(w, cfg.group_size, True, mod)
            mismatched += int((q2 != unpack_nibbles(packed)).sum()) + int((s2 != s).sum()) + int((z2 != z).sum())
        gptq_info["rtn_at_load_mismatches"] = mismatched
        gptq_info["peak_rss_gib"] = round(peak_rss_gib(), 3)  # the process so far: load, GPTQ, this check
        extra = dict(qc_in or {})
        extra["gptq"] = dict(gptq_info, form="smoothed: dequantized GPTQ weights, exact under RTN at load")
        qcfg = SqplusConfig(group_size=cfg.group_size, zero_point=cfg.zero_point, lm_head=cfg.lm_head,
                            format="smoothed")
        save_model(model, args.model, tmp, qcfg.to_dict(extra=extra))

    if args.format == "smoothed":
        from vllm_sqplus.arch import get_module
        write_checkpoint_atomic(out, args.overwrite, write_smoothed)
        _log(f"wrote {out} in {time.perf_counter() - t0:.0f}s (GPTQ {secs:.0f}s; values RTN at load "
             f"does not give back: {gptq_info['rtn_at_load_mismatches']})")
        return 0

    def write_packed(tmp: Path) -> None:
        from safetensors.torch import save_file
        sd = {k: v for k, v in model.state_dict().items()}
        if getattr(model.config, "tie_word_embeddings", False):
            sd.pop("lm_head.weight", None)
        tensors = {}
        for name, t in sd.items():
            mod = name[: -len(".weight")] if name.endswith(".weight") else None
            if mod in qs:
                packed, s, z = qs[mod]
                tensors[f"{mod}.qweight"] = packed
                tensors[f"{mod}.scales"] = s.contiguous()
                tensors[f"{mod}.zeros"] = z.contiguous()
            else:
                tensors[name] = t.to(store_dtype).contiguous() if t.is_floating_point() else t.contiguous()
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        copy_side_files(args.model, tmp)
        new = dict(raw)
        extra = dict(qc_in or {})
        gptq_info["peak_rss_gib"] = round(peak_rss_gib(), 3)
        extra["gptq"] = gptq_info
        new["quantization_config"] = SqplusConfig(group_size=cfg.group_size, zero_point=cfg.zero_point,
                                                  lm_head=cfg.lm_head, format="packed").to_dict(extra=extra)
        (tmp / "config.json").write_text(json.dumps(new, indent=2) + "\n")

    write_checkpoint_atomic(out, args.overwrite, write_packed)
    if dense is not None:
        def write_dense(tmp: Path) -> None:
            model.float().save_pretrained(tmp, safe_serialization=True)
            copy_side_files(args.model, tmp)
            c = json.loads((tmp / "config.json").read_text())
            c.pop("quantization_config", None)
            c["sqplus_dequantized_from"] = str(out)
            (tmp / "config.json").write_text(json.dumps(c, indent=2) + "\n")
        write_checkpoint_atomic(dense, args.overwrite, write_dense)
    _log(f"wrote {out}{' and ' + str(dense) if dense else ''} in {time.perf_counter() - t0:.0f}s "
         f"(GPTQ {secs:.0f}s)")
    return 0
