"""Clipping search (vllm_sqplus.clip): the fold into stored weights is exact, the search never loses."""
import pytest
import torch

from vllm_sqplus.clip import apply_clip, clip_bounds, group_gram, scale_gram, search_clip
from vllm_sqplus.quant import pseudo_quantize_int4, quantize_int4


def _heavy(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    w[torch.rand(n, k, generator=g) < 0.01] *= 12  # a few outliers per group, as in trained LLMs
    return w


def _output_error(w, wq, x):
    return float(((x @ (w - wq).T) ** 2).sum())


def test_group_gram_is_the_block_diagonal_of_xtx():
    x = torch.randn(50, 96)
    gram = group_gram(x, 32)
    full = x.T @ x
    for j in range(3):
        torch.testing.assert_close(gram[j], full[32 * j: 32 * j + 32, 32 * j: 32 * j + 32], rtol=1e-5, atol=1e-4)


def test_scale_gram_is_the_gram_of_the_smoothed_input():
    x, s = torch.randn(40, 64), torch.rand(64) + 0.5
    torch.testing.assert_close(scale_gram(group_gram(x, 32), s), group_gram(x / s, 32), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fold_is_exact_rtn_at_load_reproduces_the_clipped_quantization(dtype):
    """The search quantizes clamp(w) in the storage dtype; the plugin later runs plain RTN on what was
    stored. Both must give the same codes, scales and zero points, bit for bit."""
    w = _heavy(64, 256).to(dtype)
    ratios = torch.rand(64, 4, generator=torch.Generator().manual_seed(1)) * 0.5 + 0.5
    # the search's view: float32 copy of the stored values, bounds rounded to the storage dtype
    searched = apply_clip(w.float(), ratios, 64, dtype)
    stored = apply_clip(w, ratios, 64)               # what apply_plans writes into the checkpoint
    assert stored.dtype == dtype
    assert torch.equal(searched, stored.float())     # representable: nothing rounds on save
    qa, sa, za = quantize_int4(stored, 64)           # the plugin's RTN at load
    lo, hi = clip_bounds(w, ratios, 64)
    # RTN of the stored weights finds exactly the clamp range where something was clipped
    wg = stored.float().reshape(64, 4, 64)
    assert torch.equal(wg.amax(-1).clamp(min=0), hi.float().clamp(min=0))
    assert torch.equal(wg.amin(-1).clamp(max=0), lo.float().clamp(max=0))
    qb, sb, zb = quantize_int4(searched.to(dtype), 64)
    assert torch.equal(qa, qb) and torch.equal(sa, sb) and torch.equal(za, zb)
    # and clipping changed the quantization (a fold that clamps nothing would pass the above too)
    assert not torch.equal(qa, quantize_int4(w, 64)[0])


def test_search_never_loses_and_wins_on_outliers():
    w = _heavy(128, 256, seed=2)
    x = torch.randn(512, 256)
    x[:, :8] *= 6  # outlier input channels
    ratios, rel = search_clip(w, group_gram(x, 64), 64)
    assert ratios.shape == (128, 4) and 0 < rel < 1.0
    assert (ratios <= 1.0).all() and (ratios >= 0.5).all() and (ratios < 1.0).any()
    rtn = _output_error(w, pseudo_quantize_int4(w, 64), x)
    clipped = _output_error(w, pseudo_quantize_int4(apply_clip(w, ratios, 64), 64), x)
    assert clipped < 0.95 * rtn
    # the reported ratio is the objective's own: block-diagonal output error, clipped / unclipped
    assert abs(rel - clipped / rtn) < 0.35  # off-diagonal blocks are what separates the two


def test_ratio_one_wins_ties_and_gaussian_weights_barely_clip():
    w = torch.randn(32, 128) * 0.02
    x = torch.randn(256, 128)
    ratios, rel = search_clip(w, group_gram(x, 128), 128, ratios=(1.0, 1.0))
    assert torch.equal(ratios, torch.ones(32, 1)) and rel == 1.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fast_clipped_fake_quant_is_bit_identical_to_clip_then_rtn(dtype):
    """search_clip's fused path == pseudo_quantize_int4(apply_clip(w)) in the storage dtype, bit for
    bit, for every ratio (groups of one sign and all-zero groups included)."""
    from vllm_sqplus.clip import _fake_quant_ranges
    w = _heavy(64, 256, seed=3).to(dtype).float()
    w[0, :64] = w[0, :64].abs()          # a positive group
    w[1, 64:128] = -w[1, 64:128].abs()   # a negative group
    w[2, 128:192] = 0.0                  # an all-zero group
    wg = w.reshape(64, 4, 64)
    lo0, hi0 = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
    for r in (1.0, 0.95, 0.8, 0.65, 0.5):
        rr = torch.full((64, 4), r)
        lo, hi = clip_bounds(w, rr, 64, dtype)
        got = _fake_quant_ranges(wg, lo.float(), hi.float(), dtype).reshape(64, 256)
        want = pseudo_quantize_int4(apply_clip(w, rr, 64, dtype).to(dtype), 64).float()
        assert torch.equal(got, want), r
