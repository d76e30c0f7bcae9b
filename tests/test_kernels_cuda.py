"""CUDA W4A16 kernels (csrc/cuda/w4a16.cu) against dequantize + matmul in float32.

Skipped without a GPU or without the extension's CUDA kernels. On a GPU machine, scripts/gpu_check.sh
builds the extension and runs this file. Random data (never zeros); outputs are poisoned (NaN) before
each call by running on a fresh torch.full(NaN) pool: torch's caching allocator hands the poisoned
block back to the op, so an output element the kernel forgets to write stays NaN and fails.

Tolerance: ||y - ref|| / ||ref|| <= 1e-2 for bfloat16 and 2e-3 for float16 activations (the weights
are exact after (q - z); the error is the rounding of x, of (q - z) * s to 16 bits, and of y).
The float32 reference uses the same 16-bit-rounded activations, so the bound is on the kernel.
"""
import pytest
import torch

from vllm_sqplus.quant import dequantize_int4, quantize_int4

try:
    import vllm_sqplus._C  # noqa: F401
    HAVE_OP = torch._C._dispatch_has_kernel_for_dispatch_key("sqplus::w4a16_gemm", "CUDA")
except Exception:  # extension not built
    HAVE_OP = False

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not (torch.cuda.is_available() and HAVE_OP),
                                 reason="needs a CUDA GPU and the extension built with CUDA")]

TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-5}
PATH_AUTO, PATH_STREAM, PATH_DEQUANT = 0, 1, 2


def _quantized(n, k, group, zero_point, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(n, k, device="cuda", generator=g, dtype=torch.float32) * 0.05
    q, s, z = quantize_int4(w.to(dtype), group, zero_point)
    return q, s, z


def _relerr(y, ref):
    return ((y.float() - ref).norm() / ref.norm()).item()


def _poison():
    # Fill and free blocks of both allocator pools (large, and small <= 1 MB): the caching allocator
    # hands them back for the op's next outputs, which therefore start as NaN.
    big = torch.full((64 << 20,), float("nan"), device="cuda", dtype=torch.float32)
    small = [torch.full((1 << 17,), float("nan"), device="cuda") for _ in range(32)]
    del big, small


def _run(m, n, k, group, zero_point, dtype, bias, path, seed=0):
    q, s, z = _quantized(n, k, group, zero_point, dtype, seed)
    qw, sp, zp = torch.ops.sqplus.w4a16_pack(q, s, z, group)
    assert tuple(sp.shape) == (k // (k if group == -1 else group), n)
    g = torch.Generator(device="cuda").manual_seed(seed + 1)
    x = torch.randn(m, k, device="cuda", generator=g).to(dtype)
    b = (torch.randn(n, device="cuda", generator=g) * 0.1).to(dtype) if bias else None
    w_ref = dequantize_int4(q, s, z, k if group == -1 else group, torch.float32)
    ref = x.float() @ w_ref.T
    if b is not None:
        ref = ref + b.float()
    _poison()
    y = torch.ops.sqplus.w4a16_gemm(x, qw, sp, zp, group, b, path)
    torch.cuda.synchronize()
    assert y.dtype == dtype and tuple(y.shape) == (m, n)
    assert torch.isfinite(y).all(), "unwritten (NaN-poisoned) or non-finite output"
    err = _relerr(y, ref)
    assert err <= TOL[dtype], f"rel err {err:.2e} > {TOL[dtype]:.0e}"
    return err


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3, 16, 33, 128])
@pytest.mark.parametrize("group", [32, 64, 128, -1])
@pytest.mark.parametrize("zero_point,bias", [(True, False), (False, True), (True, True)])
def test_stream_kernel(dtype, m, group, zero_point, bias):
    _run(m, 256, 512, group, zero_point, dtype, bias, PATH_STREAM, seed=m * 7 + abs(group))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 33, 1024])
@pytest.mark.parametrize("group", [32, 128])
def test_dequant_cublas_path(dtype, m, group):
    _run(m, 320, 768, group, True, dtype, True, PATH_DEQUANT, seed=m + group)


@pytest.mark.parametrize("m,n,k", [(1, 4096, 4096), (16, 11008, 4096), (3, 4096, 11008),
                                   (33, 896, 4864), (64, 128, 896), (1024, 4096, 4096),
                                   (2, 8192, 8192), (5, 64, 32)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_auto_large_shapes(m, n, k, dtype):
    _run(m, n, k, 128 if k % 128 == 0 else 32, True, dtype, m % 2 == 1, PATH_AUTO, seed=n + m)


def test_float32_activations():
    _run(7, 256, 512, 128, True, torch.float32, True, PATH_AUTO)


def test_dequant_matches_reference_exactly():
    """(q - z) * s rounds once: the packed -> dequantized weights equal the reference cast."""
    for dtype in (torch.float16, torch.bfloat16):
        q, s, z = _quantized(192, 256, 64, True, dtype, 3)
        qw, sp, zp = torch.ops.sqplus.w4a16_pack(q, s, z, 64)
        w = torch.ops.sqplus.w4a16_dequant(qw, sp, zp, 64)
        ref = dequantize_int4(q, s, z, 64, torch.float32).to(dtype)
        assert torch.equal(w, ref)


def test_split_k_counters_reset_between_calls():
    """Split-K blocks count arrivals; repeated calls (and M changing) must give the same answer."""
    q, s, z = _quantized(4096, 4096, 128, True, torch.float16, 5)
    qw, sp, zp = torch.ops.sqplus.w4a16_pack(q, s, z, 128)
    x = torch.randn(16, 4096, device="cuda", dtype=torch.float16)
    y0 = torch.ops.sqplus.w4a16_gemm(x, qw, sp, zp, 128)
    for m in (1, 5, 16, 3, 16):
        y = torch.ops.sqplus.w4a16_gemm(x[:m], qw, sp, zp, 128)
        torch.testing.assert_close(y, y0[:m], rtol=1e-3, atol=1e-3)


def test_leading_dims_and_api():
    from vllm_sqplus.kernels import W4A16Linear
    q, s, z = _quantized(256, 512, 128, True, torch.float16, 9)
    lin = W4A16Linear.from_quantized(q, s, z, 128, backend="sqplus")
    x = torch.randn(2, 3, 512, device="cuda", dtype=torch.float16)
    ref = x.float() @ dequantize_int4(q, s, z, 128, torch.float32).T
    y = lin(x)
    assert lin.backend.name == "cuda"  # our kernel ran, not the reference
    assert y.shape == (2, 3, 256) and y.dtype == torch.float16
    assert _relerr(y, ref) <= TOL[torch.float16]


def test_backend_paths_and_auto_fallback():
    from vllm_sqplus.errors import SqplusError
    from vllm_sqplus.kernels import CudaBackend, W4A16Linear
    q, s, z = _quantized(256, 512, 128, True, torch.float16, 2)
    x = torch.randn(24, 512, device="cuda", dtype=torch.float16)
    ref = x.float() @ dequantize_int4(q, s, z, 128, torch.float32).T
    for path in ("stream", "dequant", "auto"):
        b = CudaBackend(path=path)
        assert _relerr(b.apply(x, b.pack(q, s, z, 128), 128), ref) <= TOL[torch.float16], path
    q, s, z = _quantized(96, 256, 128, True, torch.float16, 4)  # N = 96: not our kernel's shape
    with pytest.warns(RuntimeWarning, match="N a multiple of 64"):
        lin = W4A16Linear.from_quantized(q, s, z, 128)
    assert lin.backend.name == "reference"
    with pytest.raises(SqplusError, match="N a multiple of 64"):
        W4A16Linear.from_quantized(q, s, z, 128, backend="sqplus")


def test_bad_shapes_raise():
    """N = 96 is not a multiple of 64: a clear error, not a crash (checked in a child process, so a
    crash is reported as a failure instead of killing the test session)."""
    import subprocess
    import sys
    code = ("import torch, vllm_sqplus._C\n"
            "q = torch.zeros(96, 256, dtype=torch.uint8, device='cuda')\n"
            "s = torch.ones(96, 2, dtype=torch.float16, device='cuda')\n"
            "z = torch.full((96, 2), 8, dtype=torch.uint8, device='cuda')\n"
            "try:\n    torch.ops.sqplus.w4a16_pack(q, s, z, 128)\n"
            "except RuntimeError as e:\n    print('RAISED', e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"crashed (exit {r.returncode}): {r.stderr[-2000:]}"
    assert "RAISED" in r.stdout and "multiple of 64" in r.stdout, r.stdout + r.stderr
