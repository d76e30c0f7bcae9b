"""Reference INT4 quantizer: code range, error bounds, exact round trips, errors."""
import pytest
import torch

from vllm_sqplus.quant import (QuantError, dequantize_int4, pseudo_quantize_int4, quantize_int4,
                               sqnr_db)


@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("zero_point", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_shapes_ranges_and_error_bound(group_size, zero_point, dtype):
    torch.manual_seed(0)
    w = (torch.randn(96, 256) * 0.05).to(dtype)
    q, s, z = quantize_int4(w, group_size, zero_point)
    g = 256 if group_size == -1 else group_size
    assert q.shape == (96, 256) and q.dtype == torch.uint8
    assert s.shape == z.shape == (96, 256 // g) and s.dtype == dtype and z.dtype == torch.uint8
    assert int(q.max()) <= 15 and int(z.max()) <= 15
    if not zero_point:
        assert bool((z == 8).all())
    w_hat = dequantize_int4(q, s, z, group_size, torch.float32)
    # round-to-nearest: error at most half a step (plus the scale's own rounding to dtype); neither
    # scheme clips (min-max covers the range; symmetric maps max|w| to 7 and never reaches -8)
    wg = w.float().reshape(96, -1, g)
    err = (wg - w_hat.reshape(96, -1, g)).abs()
    step = s.float().unsqueeze(-1)
    slack = 0.5 + (0.02 if dtype != torch.float32 else 1e-4) * 15
    assert bool((err <= step * slack).all())
    ulp = {torch.float32: 1e-6, torch.bfloat16: 2**-8, torch.float16: 2**-11}[dtype]
    if zero_point:  # min-max: [min(w, 0), max(w, 0)] in 15 steps, the zero point shifts the grid
        want = (wg.amax(-1).clamp(min=0) - wg.amin(-1).clamp(max=0)) / 15
        torch.testing.assert_close(s.float(), want, rtol=ulp, atol=0)
        assert bool((z != 8).any())  # random groups are not centred: zero points vary
    else:  # symmetric: step max|w| / 7, zero 8, and the largest |w| of each group is on the grid
        torch.testing.assert_close(s.float(), wg.abs().amax(-1) / 7, rtol=ulp, atol=0)
        at_max = err.gather(-1, wg.abs().argmax(-1, keepdim=True))
        assert bool((at_max <= 7 * step * ulp * 1.01).all())


def test_sqnr_on_gaussian_is_about_20db():
    torch.manual_seed(1)
    w = torch.randn(512, 1024)
    db = sqnr_db(w, pseudo_quantize_int4(w, 128, True))
    assert 18.0 < db < 23.0, db  # torchao reports ~20 dB for INT4 g128 asym on Gaussian weights
    assert sqnr_db(w, pseudo_quantize_int4(w, 32, True)) > db  # smaller groups: less error


def test_grid_weights_round_trip_exactly():
    torch.manual_seed(2)
    n, k, g = 16, 128, 32
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    q[:, ::g] = 0
    q[:, 1::g] = 15  # every group spans the full code range, so min-max recovers scale and zero
    s = torch.rand(n, k // g) * 0.1 + 0.01
    z = torch.randint(0, 16, (n, k // g), dtype=torch.uint8)
    w = dequantize_int4(q, s, z, g, torch.float32)
    q2, s2, z2 = quantize_int4(w, g, True)
    torch.testing.assert_close(s2, s, rtol=1e-5, atol=0)
    assert torch.equal(z2, z) and torch.equal(q2, q)


def test_constant_and_zero_groups_are_finite():
    w = torch.zeros(4, 64)
    w[1] = 3.0
    q, s, z = quantize_int4(w, 32, True)
    w_hat = dequantize_int4(q, s, z, 32, torch.float32)
    assert torch.isfinite(w_hat).all()
    assert torch.allclose(w_hat[0], w[0]) and (w_hat[1] - 3.0).abs().max() < 1e-5 * 15


def test_errors_are_clear():
    with pytest.raises(QuantError, match=r"fc1: in_features 576 is not divisible by group_size 128.*\[64, 32\]"):
        quantize_int4(torch.randn(8, 576), 128, name="fc1")
    bad = torch.randn(8, 64)
    bad[3, 5] = float("nan")
    with pytest.raises(QuantError, match="NaN or Inf"):
        quantize_int4(bad, 32)
    with pytest.raises(QuantError, match="2-D"):
        quantize_int4(torch.randn(2, 8, 64), 32)
