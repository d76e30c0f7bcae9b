"""CPU W4A16 kernels and the kernels API, against the float32 reference x @ dequantize_int4(...).T.

Tolerances (max|y - ref| / max|ref|, ref computed in float32 from the same codes):
  float32 x: 2e-5  (the kernel multiplies exactly and only sums in another order; seen ~1e-6)
  float16 x: 1.5e-3 (output rounding to float16, 2^-11 relative per element)
  bfloat16 x: 8e-3  (output rounding to bfloat16, 2^-8 relative per element)
The activations are rounded to x.dtype before the reference sees them, so only the output
rounding separates the two (and, for the avx512vnni and avx2 kernels on 16-bit x, their int16
activations: 2^-16 of each group's max|x| per element; test_vnni_kernel checks them against their twin). Every ISA this CPU has is run (CpuBackend(isa=...) picks one).
Also here: the backend objects' choice (choose_backend, can_implement) and their errors.
"""
import functools
import subprocess
import sys
import warnings

import pytest
import torch

from vllm_sqplus.errors import SqplusError
from vllm_sqplus.kernels import (CpuBackend, CudaBackend, W4A16Linear, available_backends,
                                 choose_backend, ops, pack_weights, resolve_backend, w4a16_matmul)
from vllm_sqplus.kernels import backends
from vllm_sqplus.kernels.cpu_layout import (dequantize_act_int16, pack_cpu_reference, quantize_act_int16,
                                             unpack_cpu)
from vllm_sqplus.quant import dequantize_int4, quantize_int4

needs_ext = pytest.mark.skipif(not ops.has_kernel("cpu"),
                               reason=f"sqplus CPU kernel not built: {ops.LOAD_ERROR}")
TOL = {torch.float32: 2e-5, torch.float16: 1.5e-3, torch.bfloat16: 8e-3}


def _cpu_has(flag: str) -> bool:
    try:
        return flag in open("/proc/cpuinfo").read().split()
    except OSError:
        return False


ISAS = ["scalar",
        pytest.param("avx2", marks=pytest.mark.skipif(not (_cpu_has("avx2") and _cpu_has("fma")),
                                                       reason="no AVX2+FMA")),
        pytest.param("avx512", marks=pytest.mark.skipif(not _cpu_has("avx512bw"), reason="no AVX-512")),
        pytest.param("avx512vnni", marks=pytest.mark.skipif(not _cpu_has("avx512_vnni"),
                                                             reason="no AVX-512 VNNI")),
        pytest.param("amx", marks=pytest.mark.skipif("not _amx()", reason="no usable AMX-BF16"))]


def _amx() -> bool:
    # the kernel's own test (cpuid and Linux's grant of the tile state), not /proc/cpuinfo alone
    return (ops.has_kernel("cpu")
            and int(torch.ops.sqplus.w4a16_cpu_isa()) == backends.CPU_ISAS["amx"])


needs_amx = pytest.mark.skipif("not _amx()", reason="no usable AMX-BF16")
needs_vnni = pytest.mark.skipif(not _cpu_has("avx512_vnni"), reason="no AVX-512 VNNI")
needs_avx2 = pytest.mark.skipif(not (_cpu_has("avx2") and _cpu_has("fma")), reason="no AVX2+FMA")
VNNI, AMX, FMA512 = backends.CPU_ISAS["avx512vnni"], backends.CPU_ISAS["amx"], backends.CPU_ISAS["avx512"]
AVX2 = backends.CPU_ISAS["avx2"]
# the kernel codes whose 16-bit activations go through int16 (csrc/cpu/w4a16_vnni.cpp,
# w4a16_avx2_int16.cpp): the same activations, the same exact int32 sums, the same epilogue
INT16_CODES = [pytest.param(VNNI, marks=needs_vnni, id="avx512vnni"),
               pytest.param(AVX2, marks=needs_avx2, id="avx2")]
# what each of them runs on float32 x: an FMA kernel (code 4: the AVX-512 one)
FMA_OF = {VNNI: FMA512, AVX2: AVX2}
AMX_MIN_ROWS = 5  # kAmxMinRows, csrc/cpu/w4a16_cpu.h


@pytest.fixture(params=ISAS)
def cpu(request):
    """The CPU backend forced to one ISA (needs the extension)."""
    if not ops.has_kernel("cpu"):
        pytest.skip(f"sqplus CPU kernel not built: {ops.LOAD_ERROR}")
    b = CpuBackend(isa=request.param)
    assert b.isa == request.param and b.code == backends.CPU_ISAS[request.param]
    return b


@functools.lru_cache(maxsize=16)  # quantizing the big shapes dominates the suite: once per shape
def _quantized(n, k, g, zero_point, seed):
    # shared between tests through the cache: never modify these tensors
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * 0.05
    q, s, z = quantize_int4(w, g, zero_point=zero_point)
    x32 = torch.randn(128, k, generator=gen) + 0.5  # mean != 0: exercises the zero points
    return q, s, z, dequantize_int4(q, s, z, g, torch.float32), x32, torch.randn(n, generator=gen)


def _problem(m, n, k, g, zero_point, dtype, bias, seed=0):
    q, s, z, w_ref, x32, b = _quantized(n, k, g, zero_point, seed)
    x = x32[:m].to(dtype)
    ref = x.float() @ w_ref.T
    if bias:
        ref = ref + b
    return x, q, s, z, (b if bias else None), ref


def _poison(numel, dtype):
    # the op allocates its output with at::empty: hand the allocator a freed NaN block of that size
    # first, so an element the kernel forgot to write shows up as NaN rather than a lucky zero
    t = torch.full((numel,), float("nan"), dtype=dtype)
    del t


def _rel_err(y, ref):
    assert torch.isfinite(y).all(), "non-finite output (unwritten or poisoned element)"
    return ((y.float() - ref).abs().max() / ref.abs().max()).item()


# (M, N, K, group): small odd shapes for every group size, a few big ones (N, K >= 4096)
SHAPES = [(m, n, k, g) for m in (1, 3, 16, 33, 128) for (n, k, g) in
          [(256, 512, 32), (100, 192, 64), (64, 256, 128), (37, 100, -1), (130, 384, -1)]]
BIG = [(1, 4096, 4096, 128), (16, 4672, 4160, 64), (3, 1000, 5120, 128), (33, 4096, 4096, 32)]


@needs_ext
@pytest.mark.parametrize("m,n,k,g", SHAPES + BIG)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gemm_matches_reference(cpu, m, n, k, g, dtype):
    if cpu.isa == "scalar" and n * k > 2**20 and dtype != torch.float32:
        pytest.skip("scalar path on big shapes: float32 only (keeps the suite fast)")
    zero_point, bias = (m + n) % 2 == 0, n % 3 != 1  # vary both without squaring the test count
    x, q, s, z, b, ref = _problem(m, n, k, g, zero_point, dtype, bias)
    qw, sp, zp = torch.ops.sqplus.w4a16_pack(q, s, z, g)
    _poison(m * n, dtype)
    y = torch.ops.sqplus.w4a16_gemm(x, qw, sp, zp, g, b, cpu.code)
    assert y.dtype == dtype and y.shape == (m, n)
    assert _rel_err(y, ref) < TOL[dtype]


@needs_ext
@pytest.mark.parametrize("zero_point", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_zero_point_and_bias(cpu, zero_point, bias):
    x, q, s, z, b, ref = _problem(5, 192, 256, 64, zero_point, torch.float32, bias, seed=3)
    if not zero_point:
        assert (z == 8).all()
    y = w4a16_matmul(x, pack_weights(q, s, z, 64, cpu), 64, cpu, b)
    assert _rel_err(y, ref) < TOL[torch.float32]


@needs_ext
def test_leading_dims_and_empty():
    x, q, s, z, b, ref = _problem(6, 96, 128, 32, True, torch.bfloat16, True)
    lin = W4A16Linear.from_quantized(q, s, z, 32, bias=b, backend="sqplus")
    y = lin(x.view(2, 3, 128))
    assert y.shape == (2, 3, 96) and _rel_err(y.view(6, 96), ref) < TOL[torch.bfloat16]
    assert lin(torch.empty(0, 128, dtype=torch.bfloat16)).shape == (0, 96)


@needs_ext
def test_input_layouts_give_the_same_bits(cpu):
    # the op reads a contiguous 2-D x in place and copies any other layout first: a transposed
    # view, a 1-D x and a 3-D x must give exactly the contiguous 2-D call's output, in their shapes
    x, q, s, z, b, ref = _problem(4, 80, 128, 64, True, torch.bfloat16, True)
    packed = pack_weights(q, s, z, 64, cpu)
    y = w4a16_matmul(x, packed, 64, cpu, b)
    assert _rel_err(y, ref) < TOL[torch.bfloat16]
    xt = x.t().contiguous().t()  # same values, column-major strides
    assert not xt.is_contiguous()
    assert torch.equal(w4a16_matmul(xt, packed, 64, cpu, b), y)
    y1 = w4a16_matmul(x[1], packed, 64, cpu, b)
    assert y1.shape == (80,) and torch.equal(y1, y[1])
    y3 = w4a16_matmul(x.view(2, 2, 128), packed, 64, cpu, b)
    assert y3.shape == (2, 2, 80) and y3.is_contiguous() and torch.equal(y3.view(4, 80), y)


@pytest.mark.parametrize("backend", ["reference", pytest.param("sqplus", marks=needs_ext)])
def test_module_dtype_cast_keeps_packed_layout(backend):
    # model.to(bfloat16) casts the bias, never the packed codes / float32 scales
    x, q, s, z, b, ref = _problem(3, 80, 128, 64, True, torch.bfloat16, True)
    lin = W4A16Linear.from_quantized(q, s, z, 64, bias=b, backend=backend).to(torch.bfloat16)
    assert lin.bias.dtype == torch.bfloat16
    assert {getattr(lin, k).dtype for k in lin._keys} == {t.dtype for t in pack_weights(
        q, s, z, 64, backend).values()}
    ref = x.float() @ dequantize_int4(q, s, z, 64, torch.float32).T + b.bfloat16().float()
    assert _rel_err(lin(x), ref) < TOL[torch.bfloat16]


@needs_ext
@pytest.mark.parametrize("n,k,g", [(37, 100, -1), (130, 256, 32), (64, 128, 128), (1, 8, -1)])
def test_pack_layout_exact(n, k, g):
    gen = torch.Generator().manual_seed(n * k)
    q = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    gk = k if g == -1 else g
    s = torch.rand(n, k // gk, generator=gen, dtype=torch.float32) + 0.1
    z = torch.randint(0, 16, (n, k // gk), generator=gen, dtype=torch.uint8)
    qw, sp, zp = torch.ops.sqplus.w4a16_pack(q, s, z, g)
    assert qw.shape == (-(-n // 64), -(-k // 8), 64) and qw.dtype == torch.int32
    assert torch.equal(qw, pack_cpu_reference(q))       # C++ pack == the PyTorch twin, bit for bit
    assert torch.equal(unpack_cpu(qw, n, k), q)         # round trip
    assert torch.equal(unpack_cpu(qw, qw.shape[0] * 64, qw.shape[1] * 8)[n:].unique(),
                       torch.tensor([0], dtype=torch.uint8)) or n % 64 == 0  # padding holds code 0
    assert torch.equal(sp, s.T.contiguous()) and torch.equal(zp, -(z.float() * s).T.contiguous())


@needs_ext
def test_pack_nibble_order_is_the_documented_one():
    # q[n, k] = k % 8: nibble j of each word holds k offset (0, 2, 4, 6, 1, 3, 5, 7)[j]
    q = (torch.arange(16) % 8).to(torch.uint8).repeat(64, 1)
    qw, _, _ = torch.ops.sqplus.w4a16_pack(q, torch.ones(64, 1), torch.zeros(64, 1, dtype=torch.uint8), -1)
    assert (qw == 0x75316420).all()


@needs_ext
def test_all_isas_agree():
    # the decode is shared; different ISAs differ only in summation order. float32 x: avx512vnni
    # and amx run the FMA kernel here (their own paths: test_vnni_kernel, test_amx_kernel)
    x, q, s, z, b, ref = _problem(7, 320, 1024, 128, True, torch.float32, True, seed=5)
    qw, sp, zp = torch.ops.sqplus.w4a16_pack(q, s, z, 128)
    outs = {}
    for isa in ["scalar", "avx2", "avx512", "avx512vnni", "amx"]:
        if (isa == "avx2" and not _cpu_has("avx2") or isa == "avx512" and not _cpu_has("avx512bw")
                or isa == "avx512vnni" and not _cpu_has("avx512_vnni") or isa == "amx" and not _amx()):
            continue
        outs[isa] = CpuBackend(isa).apply(x, {"qweight": qw, "scales": sp, "zeros": zp}, 128, b)
    assert len(outs) >= 2 or not _cpu_has("avx2"), outs.keys()
    # kernel 0 is the best ISA, the one CpuBackend("auto") names
    best = torch.ops.sqplus.w4a16_gemm(x, qw, sp, zp, 128, b, 0)
    assert torch.equal(best, outs[CpuBackend("auto").isa])
    for y in outs.values():
        torch.testing.assert_close(y, outs["scalar"], rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@needs_ext
@needs_amx
@pytest.mark.parametrize("m,n,k,g", [(1, 320, 1024, 128), (2, 256, 512, 32), (4, 192, 256, 64),
                                     (16, 320, 1024, 128), (17, 130, 384, 128), (37, 64, 256, -1),
                                     (5, 130, 100, -1), (20, 130, 92, -1), (33, 256, 4096, 128)])
def test_amx_kernel(m, n, k, g):
    # kernel 5 on bfloat16 x (AMX tiles on 128 + q, the offset removed per group) against the
    # AVX-512 FMA kernel on the same values in float32: both multiply exactly, so they differ by
    # the summation order and by kernel 5's output rounding to bfloat16 (2^-8 relative). M = 1..4
    # (below kAmxMinRows) and groups that are not whole 32-k tile depths (K = 100) take the VNNI
    # kernel inside kernel 5, bit for bit; M > 16 takes several row blocks, N = 130 a partial
    # 64-column tile. On float32 x kernel 5 is the FMA kernel, bit for bit.
    x, q, s, z, b, ref = _problem(m, n, k, g, True, torch.bfloat16, True, seed=11)
    qw, sp, zp = torch.ops.sqplus.w4a16_pack(q, s, z, g)
    _poison(m * n, torch.bfloat16)
    y5 = torch.ops.sqplus.w4a16_gemm(x, qw, sp, zp, g, b, AMX)
    y3 = torch.ops.sqplus.w4a16_gemm(x.float(), qw, sp, zp, g, b, FMA512)
    assert y5.dtype == torch.bfloat16 and torch.isfinite(y5).all()
    assert _rel_err(y5, ref) < TOL[torch.bfloat16]
    assert torch.equal(torch.ops.sqplus.w4a16_gemm(x.float(), qw, sp, zp, g, b, AMX), y3)
    glen = -(-k // 8) * 8 if g == -1 else g  # the kernel's group length (per-channel: K padded to 8)
    amx_runs = m >= AMX_MIN_ROWS and glen % 32 == 0
    y4 = torch.ops.sqplus.w4a16_gemm(x, qw, sp, zp, g, b, VNNI)
    if amx_runs:
        torch.testing.assert_close(y5.float(), y3, rtol=2**-8, atol=1e-5 * y3.abs().max().item())
        # the AMX path really ran (a silent fallback would equal the VNNI kernel bit for bit)
        assert not torch.equal(y5, y4)
    else:
        assert torch.equal(y5, y4)


def _vnni_reference(x, q, s, z, g, bias):
    """float64 x~ @ w.T (+ bias) with x~ = xscale * xq, the kernel's int16 activations (twin)."""
    k = x.shape[1]
    glen = -(-k // 8) * 8 if g == -1 else g
    xt = dequantize_act_int16(*quantize_act_int16(x, glen), glen, torch.float64)
    y = xt @ dequantize_int4(q, s, z, g, torch.float64).T
    return y + bias.double() if bias is not None else y


@needs_ext
@pytest.mark.parametrize("code", INT16_CODES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,n,k,g", [(1, 320, 1024, 128), (2, 256, 512, 32), (3, 130, 384, 64),
                                     (4, 192, 256, 128), (1, 130, 100, -1), (2, 130, 100, -1),
                                     (7, 130, 100, -1), (1, 64, 1024, -1), (2, 130, 5000, -1),
                                     (9, 4096, 4096, 128)])
def test_vnni_kernel(m, n, k, g, dtype, code):
    # kernel 4 (and kernel 2, its AVX2 twin) on 16-bit x equals x~ @ w.T with x~ its int16
    # activations (quantize_act_int16, the twin of the C++ quantizers) up to the output rounding to x.dtype and fp32 epilogue sums:
    # M = 1, 2 take the masked-pair path on groups of <= 512 k's (g = 32..128, and per-channel
    # K = 100: a 104-k group with a K % 16 tail in the quantizer), the shift path above (per-channel
    # K = 1024, and K = 5000 where qmax drops to 28633 against int32 overflow), M = 3, 4, 7, 9 the
    # 4-row blocks and their tails; N = 130 a partial tile. Kernel 2 (AVX2) has one path for every
    # row count (a shift per pair), its row blocks 1, 2, 3-4 with 8, 4, 2 column vectors a pass
    x, q, s, z, b, _ = _problem(m, n, k, g, True, dtype, True, seed=13)
    qw, sp, zp = torch.ops.sqplus.w4a16_pack(q, s, z, g)
    _poison(m * n, dtype)
    y = torch.ops.sqplus.w4a16_gemm(x, qw, sp, zp, g, b, code)
    assert y.dtype == dtype and torch.isfinite(y).all()
    ref = _vnni_reference(x, q, s, z, g, b)
    out_ulp = 2**-8 if dtype == torch.bfloat16 else 2**-11
    torch.testing.assert_close(y.double(), ref, rtol=out_ulp, atol=1e-6 * ref.abs().max().item())
    # (that the int16 path, not an FMA fallback, ran: test_vnni_activations_are_int16_per_group)
    # float32 x: the FMA kernel, bit for bit (code 2: its float32 kernel is the FMA one)
    if FMA_OF[code] != code:
        assert torch.equal(torch.ops.sqplus.w4a16_gemm(x.float(), qw, sp, zp, g, b, code),
                           torch.ops.sqplus.w4a16_gemm(x.float(), qw, sp, zp, g, b, FMA_OF[code]))


@needs_ext
@needs_vnni
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,n,k,g", [(1, 320, 1024, 128), (3, 130, 100, -1), (5, 256, 5000, -1),
                                     (16, 192, 512, 64)])
def test_avx2_int16_kernel_is_the_vnni_kernel_bit_for_bit(m, n, k, g, dtype):
    # same int16 activations (quantize_row_avx2 = quantize_row_vnni), exact int32 sums and the
    # same float epilogue: kernels 2 and 4 give the same bits on 16-bit x
    x, q, s, z, b, _ = _problem(m, n, k, g, True, dtype, True, seed=17)
    qw, sp, zp = torch.ops.sqplus.w4a16_pack(q, s, z, g)
    assert torch.equal(torch.ops.sqplus.w4a16_gemm(x, qw, sp, zp, g, b, AVX2),
                       torch.ops.sqplus.w4a16_gemm(x, qw, sp, zp, g, b, VNNI))


@needs_ext
@pytest.mark.parametrize("code", INT16_CODES)
@pytest.mark.parametrize("m,k,g", [(1, 512, -1), (2, 4096, -1), (1, 256, 128), (4, 4096, -1),
                                   (1, 4376, -1), (2, 8192, -1)])
def test_vnni_int32_sums_do_not_overflow(m, k, g, code):
    # the worst case of the documented bounds: every code 15, zero point 0, every x at +max, so
    # each int32 lane sums len * 15 * qmax (per-channel K = 4096: 2.01e9 of 2^31; K = 4376, where
    # qmax is lowered to 32716: 2,147,478,240, 5 407 below 2^31 - 1) and, on the masked path
    # (per-channel K = 512), the 16 q class len/2 * 240 * 32767 (2.01e9 too)
    n = 64
    q = torch.full((n, k), 15, dtype=torch.uint8)
    gk = k if g == -1 else g
    s = torch.full((n, k // gk), 0.01)
    z = torch.zeros(n, k // gk, dtype=torch.uint8)
    qw, sp, zp = torch.ops.sqplus.w4a16_pack(q, s, z, g)
    x = torch.full((m, k), 3.0, dtype=torch.bfloat16)
    y = torch.ops.sqplus.w4a16_gemm(x, qw, sp, zp, g, None, code)
    torch.testing.assert_close(y.float(), torch.full((m, n), 3.0 * 15 * 0.01 * k), rtol=2**-8, atol=0)


@needs_ext
@pytest.mark.parametrize("code", INT16_CODES)
def test_vnni_non_finite_and_tiny_groups(code):
    # a NaN or an infinity makes its group's outputs NaN (as the FMA kernel's would be: NaN or
    # inf), other groups' rows stay exact; a group of tiny values (amax 1e-36 < 32767 / FLT_MAX)
    # keeps finite codes (factor clamped), and the twin agrees on all of it
    k, n = 256, 64
    q, s, z = quantize_int4(torch.randn(n, k) * 0.05, 128)
    qw, sp, zp = torch.ops.sqplus.w4a16_pack(q, s, z, 128)
    x = torch.randn(4, k)
    x[0, 5] = float("nan")
    x[1, 200] = float("inf")
    x[3, :128] = 1e-36
    xb = x.bfloat16()
    y = torch.ops.sqplus.w4a16_gemm(xb, qw, sp, zp, 128, None, code).float()
    assert torch.isnan(y[0]).all() and torch.isnan(y[1]).all() and torch.isfinite(y[2:]).all()
    xq, xs = quantize_act_int16(xb, 128)
    assert torch.isnan(xs[0, 0]) and not torch.isnan(xs[0, 1]) and torch.isnan(xs[1, 1])
    assert (xq[0, :128] == 0).all() and torch.isfinite(xs[3]).all() and xq[3, :128].abs().max() > 0
    ref = _vnni_reference(xb[2:], q, s, z, 128, None).float()
    torch.testing.assert_close(y[2:], ref, rtol=2**-8, atol=1e-6 * ref.abs().max().item())


@needs_ext
@pytest.mark.parametrize("code", INT16_CODES)
def test_vnni_activations_are_int16_per_group(code):
    # the documented semantics, on an input where they show: a group with one outlier (1000) and
    # elements 2^-17 of it (they quantize to 0) whose weights carry the whole output (the outlier's
    # weight is 0). The kernel gives the twin's result (0 from that group), not the exact one.
    k, n = 256, 64
    x = torch.full((1, k), 1000.0 * 2**-17)
    x[0, 0] = 1000.0
    x[0, 128:] = 0.5  # second group: ordinary values
    q = torch.full((n, k), 9, dtype=torch.uint8)
    q[:, 0] = 8
    s = torch.full((n, 2), 0.1)
    z = torch.full((n, 2), 8, dtype=torch.uint8)
    qw, sp, zp = torch.ops.sqplus.w4a16_pack(q, s, z, 128)
    xb = x.bfloat16()
    y = torch.ops.sqplus.w4a16_gemm(xb, qw, sp, zp, 128, None, code).float()
    exact = xb.float() @ dequantize_int4(q, s, z, 128, torch.float32).T
    twin = _vnni_reference(xb, q, s, z, 128, None).float()
    torch.testing.assert_close(y, twin, rtol=2**-8, atol=0)
    assert (exact - y).abs().min() > 0.05 * 127 * 1000 * 2**-17 * 0.9  # the lost group-0 part


@needs_ext
def test_opcheck():
    x, q, s, z, b, _ = _problem(3, 100, 192, 64, True, torch.bfloat16, True)
    torch.library.opcheck(torch.ops.sqplus.w4a16_pack.default, (q, s, z, 64))
    packed = torch.ops.sqplus.w4a16_pack(q, s, z, 64)
    torch.library.opcheck(torch.ops.sqplus.w4a16_gemm.default, (x, *packed, 64, b))
    torch.library.opcheck(torch.ops.sqplus.w4a16_gemm.default, (x.float(), *packed, 64, None))
    torch.library.opcheck(torch.ops.sqplus.w4a16_gemm.default, (x, *packed, 64, b, 1))


@needs_ext
def test_errors():
    x, q, s, z, b, _ = _problem(2, 64, 256, 64, True, torch.float32, False)
    qw, sp, zp = torch.ops.sqplus.w4a16_pack(q, s, z, 64)
    with pytest.raises(RuntimeError, match=r"not divisible by group_size 48"):
        torch.ops.sqplus.w4a16_pack(q, s, z, 48)
    with pytest.raises(SqplusError, match=r"group_size must be one of \[32, 64, 128, -1\], got 48"):
        pack_weights(q, s, z, 48, "sqplus")
    with pytest.raises(RuntimeError, match=r"does not match qweight"):
        torch.ops.sqplus.w4a16_gemm(x[:, :128], qw, sp, zp, 64)
    with pytest.raises(RuntimeError, match=r"must be float32, bfloat16 or float16.*Double"):
        torch.ops.sqplus.w4a16_gemm(x.double(), qw, sp, zp, 64)
    with pytest.raises(RuntimeError, match=r"q must be uint8 \[N, K\]"):
        torch.ops.sqplus.w4a16_pack(q.int(), s, z, 64)
    with pytest.raises(RuntimeError, match=r"codes must lie in 0..15"):
        torch.ops.sqplus.w4a16_pack(q | 16, s, z, 64)
    with pytest.raises(RuntimeError, match=r"scales must be floating \[N, K/g\] = \[64, 4\]"):
        torch.ops.sqplus.w4a16_pack(q, s[:, :2], z, 64)
    with pytest.raises(RuntimeError, match=r"scales has 4 rows"):
        torch.ops.sqplus.w4a16_gemm(x, qw, sp, zp, 128)
    with pytest.raises(RuntimeError, match=r"bias must be floating \[N\] = \[64\]"):
        torch.ops.sqplus.w4a16_gemm(x, qw, sp, zp, 64, torch.zeros(65))
    with pytest.raises(SqplusError, match="must be float32, bfloat16 or float16"):
        w4a16_matmul(x.to(torch.int32), {"qweight": qw, "scales": sp, "zeros": zp}, 64)
    with pytest.raises(SqplusError, match=r"backend 'reference' runs on \['q', 'scales', 'zeros'\]"):
        w4a16_matmul(x, {"qweight": qw, "scales": sp, "zeros": zp}, 64, "reference")
    with pytest.raises(SqplusError, match="unknown W4A16 backend"):
        resolve_backend("marlin", "cpu")
    with pytest.raises(RuntimeError, match=r"kernel must be 0 \(best\), 1 \(scalar\)"):
        torch.ops.sqplus.w4a16_gemm(x, qw, sp, zp, 64, None, 7)


def test_cpu_isa_env_is_read_once_at_construction(monkeypatch):
    monkeypatch.setenv("SQPLUS_CPU_ISA", "sse")
    with pytest.raises(SqplusError,
                       match="SQPLUS_CPU_ISA must be one of scalar, avx2, avx512, avx512vnni, amx, got 'sse'"):
        CpuBackend()
    monkeypatch.setenv("SQPLUS_CPU_ISA", "scalar")
    b = CpuBackend()
    monkeypatch.delenv("SQPLUS_CPU_ISA")  # changing the env later changes nothing
    assert b.isa == "scalar" and (b.code == 1 or b.unavailable)
    if ops.has_kernel("cpu") and not _cpu_has("avx512bw"):
        with pytest.raises(SqplusError, match="this CPU has no AVX512"):
            CpuBackend("avx512")


@needs_ext
def test_backends_agree_and_auto():
    assert available_backends() == ["reference", "sqplus"]
    assert resolve_backend("auto", "cpu") == "sqplus"
    x, q, s, z, b, ref = _problem(4, 128, 256, 128, True, torch.float16, True, seed=9)
    ys = {bk: W4A16Linear.from_quantized(q, s, z, 128, bias=b, backend=bk)(x)
          for bk in ("reference", "sqplus", "auto")}
    for y in ys.values():
        assert y.dtype == torch.float16 and _rel_err(y, ref) < TOL[torch.float16]


def test_reference_backend_matches_dequant():
    x, q, s, z, b, ref = _problem(3, 48, 96, 32, True, torch.float32, True)
    y = w4a16_matmul(x, pack_weights(q, s, z, 32, "reference"), 32, "reference", b)
    assert _rel_err(y, ref) < 1e-6


def test_auto_warns_once_where_no_kernel(monkeypatch):
    monkeypatch.setattr(backends, "_warned", set())
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        assert resolve_backend("auto", "meta") == "reference"
        assert resolve_backend("auto", "meta") == "reference"
    assert len([w for w in rec if "no W4A16 kernel for device 'meta'" in str(w.message)]) == 1
    with pytest.raises(SqplusError, match="not available on device 'meta'"):
        resolve_backend("sqplus", "meta")


# ---- choosing a backend per layer shape (vllm_sqplus.kernels.backends) -------------------------------
@pytest.mark.parametrize("g", [16, 48, 96, 256, 0])
def test_group_rule_is_every_backends_rule(g):
    # config.GROUP_SIZES is the one rule: no backend accepts 16 although the CPU kernel could run it
    for b in (backends.REFERENCE, CpuBackend("scalar") if ops.has_kernel("cpu") else CpuBackend(),
              CudaBackend()):
        ok, why = b.can_implement(64, 768, g, torch.float32, "cuda" if b.name == "cuda" else "cpu")
        assert not ok and "group_size must be one of [32, 64, 128, -1]" in why, (b, why)
    with pytest.raises(SqplusError, match=f"kernel_backend=reference cannot run .*got {g}"):
        choose_backend("reference", n=64, k=768, group=g, act_dtype=torch.float32, device="cpu")


@needs_ext
def test_auto_chooses_our_cpu_kernel_and_explicit_reference():
    c = choose_backend("auto", n=100, k=192, group=64, act_dtype=torch.bfloat16, device="cpu")
    assert c.backend.name == "cpu" and c.fallbacks == ()
    c = choose_backend("reference", n=100, k=192, group=64, act_dtype=torch.bfloat16, device="cpu")
    assert c.backend.name == "reference"
    lin = W4A16Linear.from_quantized(*_quantized(64, 256, 64, True, 0)[:3], 64)
    assert lin.backend.name == "cpu" and lin.backend.isa == CpuBackend().isa


class _FakeCudaShapes:
    """Answers as a CUDA machine would (capability, kernel present) without a GPU."""

    def __init__(self, monkeypatch, cap=(9, 0)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda dev=None: cap)
        self.b = CudaBackend()
        self.b.unavailable = None


@pytest.mark.parametrize("n,k,g,why", [
    (100, 256, 64, "N a multiple of 64"),
    (128, 80, -1, "multiple of 32, got 80"),       # per-channel group = K = 80
    (128, 192, 96, "group_size must be one of"),
])
def test_cuda_can_implement_rules(monkeypatch, n, k, g, why):
    b = _FakeCudaShapes(monkeypatch).b
    ok, reason = b.can_implement(n, k, g, torch.float16, "cuda")
    assert not ok and why in reason, reason
    assert b.can_implement(128, 256, 64, torch.float16, "cuda") == (True, "")
    assert not b.can_implement(128, 256, 64, torch.float16, "cpu")[0]


def test_cuda_below_sm80_falls_back_in_auto_and_fails_explicit(monkeypatch):
    """get_min_capability says 60: on sm_75 our kernel declines and auto takes the next backend."""
    b = _FakeCudaShapes(monkeypatch, cap=(7, 5)).b
    monkeypatch.setitem(backends._OURS, "cuda", b)
    ok, why = b.can_implement(128, 256, 64, torch.float16, "cuda")
    assert not ok and "needs sm_80 or newer" in why and "sm_75" in why
    c = choose_backend("auto", n=128, k=256, group=64, act_dtype=torch.float16, device="cuda")
    assert c.backend.name == "reference" and c.fallbacks[0][0] == "cuda" and "sm_75" in c.reason()
    with pytest.raises(SqplusError, match=r"kernel_backend=sqplus cannot run .*sm_80.*kernel_backend auto"):
        choose_backend("sqplus", n=128, k=256, group=64, act_dtype=torch.float16, device="cuda")
    with pytest.raises(SqplusError, match="N a multiple of 64"):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda dev=None: (9, 0))
        choose_backend("sqplus", n=100, k=256, group=64, act_dtype=torch.float16, device="cuda")


def test_cuda_path_and_threshold_decided_at_construction(monkeypatch):
    monkeypatch.setenv("SQPLUS_CUDA_DEQUANT_M", "33")
    b = CudaBackend()
    monkeypatch.delenv("SQPLUS_CUDA_DEQUANT_M")
    calls = []
    monkeypatch.setattr(torch.ops.sqplus, "w4a16_gemm", lambda *a: calls.append(a[-1]) or a[0],
                        raising=False)
    for m in (1, 32, 33):
        b.apply(torch.zeros(m, 64), {"qweight": None, "scales": None, "zeros": None}, 64)
    assert calls == [1, 1, 2] and b.dequant_m == 33
    assert CudaBackend(path="stream").code == 1 and CudaBackend(path="dequant").code == 2
    with pytest.raises(SqplusError, match="path must be one of"):
        CudaBackend(path="fast")
    monkeypatch.setenv("SQPLUS_CUDA_DEQUANT_M", "x")
    with pytest.raises(SqplusError, match="SQPLUS_CUDA_DEQUANT_M must be a positive integer"):
        CudaBackend()


def test_import_without_extension():
    # a process where vllm_sqplus._C cannot load: the package imports, the reference path runs,
    # and one warning says so
    code = ("import sys, warnings; sys.modules['vllm_sqplus._C'] = None\n"
            "import torch; from vllm_sqplus.kernels import *; from vllm_sqplus.quant import *\n"
            "warnings.simplefilter('always')\n"
            "with warnings.catch_warnings(record=True) as rec:\n"
            "    q, s, z = quantize_int4(torch.randn(8, 64), 32)\n"
            "    lin = W4A16Linear.from_quantized(q, s, z, 32)\n"
            "    W4A16Linear.from_quantized(q, s, z, 32)\n"
            "    y = lin(torch.randn(2, 64))\n"
            "assert available_backends() == ['reference'] and lin.backend.name == 'reference'\n"
            "assert y.shape == (2, 8) and len(rec) == 1, rec\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


@needs_ext
def test_torch_compile_fullgraph():
    x, q, s, z, b, ref = _problem(4, 128, 256, 64, True, torch.float32, True)
    lin = W4A16Linear.from_quantized(q, s, z, 64, bias=b, backend="sqplus")
    y = torch.compile(lin, fullgraph=True)(x)
    assert _rel_err(y, ref) < TOL[torch.float32]
