// CPU implementations of sqplus::w4a16_pack and sqplus::w4a16_gemm (schemas: csrc/ops.cpp), and
// sqplus::w4a16_cpu_isa. Packed layout, math and blocking: w4a16_cpu.h. This file holds the torch
// glue: checks whose messages print the shapes, the packing routine, activation pre-processing, the
// split of N across threads (one 64-column tile per task), the fused bias + dtype-cast epilogue, the
// scalar fallback and the ISA table. Which ISA runs is the caller's argument (`kernel`: 0 = best this
// CPU has, 1 scalar, 2 AVX2: int16 dot products (vpmaddwd) for 16-bit activations, the FMA kernel
// for float32 ones, 3 AVX-512 FMA, 4 AVX-512 VNNI: int16 dot products (vpdpwssd) for 16-bit
// activations, the FMA kernel for float32 ones, 5 AMX: AMX-BF16 tiles for bfloat16 activations of at
// least kAmxMinRows rows, code 4 for the others), decided once in Python by the CPU backend
// (vllm_sqplus/kernels/backends.py, which also reads the forcing env var, once); w4a16_cpu_isa() tells it
// the best code this CPU supports (cpuid, read once per process).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <algorithm>
#include <vector>

#include "w4a16_cpu.h"

namespace sqplus_cpu {

void tile_scalar(const TileProblem& p) {
  const int64_t len = p.G == 1 ? p.K8 : p.group;
  float a[kTileN];
  for (int64_t gi = 0; gi < p.G; ++gi) {
    const int64_t k0 = gi * len;
    for (int64_t m = 0; m < p.M; ++m) {
      std::memset(a, 0, sizeof(a));
      for (int64_t c = 0; c < len / kChunkK; ++c) {
        const uint32_t* q = reinterpret_cast<const uint32_t*>(p.qw) + (k0 / kChunkK + c) * kTileN;
        const float* x = p.xs + m * p.K8 + k0 + c * kChunkK;
        for (int j = 0; j < 8; ++j) {
          // same decode as the SIMD kernels (x pre-scaled by 16^-j), so all paths agree bit-for-bit
          // up to summation order
          const uint32_t mask = 0xFu << (4 * j);
          for (int l = 0; l < kTileN; ++l) {
            const uint32_t n = j < 7 ? (q[l] & mask) : (q[l] >> 28);
            a[l] += static_cast<float>(static_cast<int32_t>(n)) * x[j];
          }
        }
      }
      const float* s = p.s + gi * p.s_stride;
      const float* zs = p.zs + gi * p.s_stride;
      const float xsum = p.xsum[m * p.G + gi];
      for (int l = 0; l < kTileN; ++l) p.acc[m * kTileN + l] += s[l] * a[l] + zs[l] * xsum;
    }
  }
}

// Best kernel code this CPU supports: 5 amx, 4 avx512 vnni, 3 avx512, 2 avx2, 1 scalar (each CPU
// with one of them has all below it).
int64_t best_isa();

namespace {

using TileFn = void (*)(const TileProblem&);

struct CpuIsa {
  bool avx2, avx512, vnni, amx, amd;
};

// AMX-TILE and AMX-BF16 (cpuid leaf 7: edx bits 24 and 22), and Linux's grant of the tile data
// state to this process (arch_prctl ARCH_REQ_XCOMP_PERM; without it the first tile instruction
// faults). The grant is per process and idempotent (torch's oneDNN asks for it too).
bool amx_usable() {
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !((d >> 24) & 1) || !((d >> 22) & 1)) return false;
#ifdef SYS_arch_prctl
  constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}

// cpuid once per process (the answer cannot change while it runs)
const CpuIsa& cpu_isa() {
  static const CpuIsa isa = [] {
    __builtin_cpu_init();
    const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512vl");
    const bool vnni = avx512 && __builtin_cpu_supports("avx512vnni");
    return CpuIsa{__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"), avx512, vnni,
                  vnni && amx_usable(), __builtin_cpu_is("amd") > 0};
  }();
  return isa;
}

// kernel code (see the file header), activation dtype, rows and group length -> tile function; 0 =
// the best this CPU has. Codes 4 and 2 run their int16 kernel (VNNI, AVX2) on 16-bit activations
// and their FMA kernel on float32 ones (int16 keeps every bfloat16 / float16 value near its
// group's maximum, not a float32 one's 24 bits). Code 5 runs the AMX kernel on bfloat16
// activations of at least kAmxMinRows rows whose groups are whole tile depths (32 k's), and code 4 on the rest (a float16
// or float32 value does not always fit bfloat16; fewer rows leave the tiles empty).
TileFn tile_fn(int64_t kernel, at::ScalarType xt, int64_t M, int64_t len) {
  const bool x16 = xt == at::kBFloat16 || xt == at::kHalf;
  if (kernel == 0) kernel = best_isa();
  switch (kernel) {
    case 1:
      return tile_scalar;
    case 2:
      TORCH_CHECK(cpu_isa().avx2, "w4a16_gemm: kernel 2 (avx2) asked, but this CPU has no AVX2+FMA");
      return x16 ? tile_avx2_int16 : tile_avx2;
    case 3:
      TORCH_CHECK(cpu_isa().avx512,
                  "w4a16_gemm: kernel 3 (avx512) asked, but this CPU has no AVX-512 (f, bw, vl)");
      return tile_avx512;
    case 4:
      TORCH_CHECK(cpu_isa().vnni, "w4a16_gemm: kernel 4 (avx512vnni) asked, but this CPU has no "
                  "AVX-512 VNNI");
      return x16 ? tile_vnni : tile_avx512;
    case 5:
      TORCH_CHECK(cpu_isa().amx, "w4a16_gemm: kernel 5 (amx) asked, but this CPU has no AMX-BF16 "
                  "(or the kernel did not grant this process the tile state)");
      return xt == at::kBFloat16 && M >= kAmxMinRows && len % 32 == 0 ? tile_amx
             : x16                                                     ? tile_vnni
                                                                       : tile_avx512;
    default:
      TORCH_CHECK(false, "w4a16_gemm: kernel must be 0 (best), 1 (scalar), 2 (avx2), 3 (avx512), "
                  "4 (avx512vnni) or 5 (amx), got ", kernel);
  }
  return tile_scalar;  // unreachable
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Effective group size for in_features k, checked (error names the shapes).
int64_t check_group(int64_t k, int64_t group_size, const char* what) {
  const int64_t g = group_size == -1 ? k : group_size;
  TORCH_CHECK(g > 0, what, ": group_size must be positive or -1, got ", group_size);
  TORCH_CHECK(k % g == 0, what, ": K = ", k, " is not divisible by group_size ", group_size);
  // a group must cover whole int32 lanes (8 k's) unless it spans all of K (per-channel), where K
  // is zero-padded to a multiple of 8 instead
  TORCH_CHECK(g % kChunkK == 0 || g == k, what, ": group_size ", group_size,
              " must be a multiple of 8 (or -1)");
  return g;
}

// Activations of the int16 kernels (w4a16_vnni.cpp / w4a16_avx2_int16.cpp: quantize_row_vnni, with
// AVX-512, or quantize_row_avx2, bit for bit the same): per row m and group gi of
// `len` k's, xscale = max|x| / qmax, xq[k] = round(x[k] / xscale), xsum = xscale * sum(xq), with
// qmax = 32767, lowered for long groups so that len * 15 * qmax < 2^31 (a group's int32 sum of
// q * xq cannot overflow); K is padded to K8 with zeros. An all-zero group has xscale 0.
void quantize_rows_int16(const at::Tensor& x2, int64_t M, int64_t K, int64_t K8, int64_t G, int64_t len,
                         bool avx512, int16_t* xq, float* xscale, float* xsum) {
  const float qmax = static_cast<float>(std::min<int64_t>(32767, ((int64_t{1} << 31) - 1) / (15 * len)));
  const bool bf16 = x2.scalar_type() == at::kBFloat16;
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x2.data_ptr());
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      (avx512 ? quantize_row_vnni : quantize_row_avx2)(xp + m * K, bf16, K, G, len, qmax, xq + m * K8,
                                                       xscale + m * G, xsum + m * G);
  });
}

}  // namespace

// q uint8 [N,K], scales [N,K/g] (float dtype), zeros uint8 [N,K/g] -> [qweight, scales_p, zeros_p]
std::vector<at::Tensor> w4a16_pack_cpu(const at::Tensor& q, const at::Tensor& scales,
                                       const at::Tensor& zeros, int64_t group_size) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kByte,
              "w4a16_pack: q must be uint8 [N, K], got ", q.scalar_type(), " ", q.sizes());
  const int64_t N = q.size(0), K = q.size(1);
  const int64_t g = check_group(K, group_size, "w4a16_pack");
  const int64_t G = K / g;
  TORCH_CHECK(at::isFloatingType(scales.scalar_type()) && scales.dim() == 2 &&
                  scales.size(0) == N && scales.size(1) == G,
              "w4a16_pack: scales must be floating [N, K/g] = [", N, ", ", G, "], got ",
              scales.scalar_type(), " ", scales.sizes());
  TORCH_CHECK(zeros.scalar_type() == at::kByte && zeros.sizes() == scales.sizes(),
              "w4a16_pack: zeros must be uint8 [N, K/g] = [", N, ", ", G, "], got ",
              zeros.scalar_type(), " ", zeros.sizes());
  TORCH_CHECK(N == 0 || K == 0 || q.max().item<uint8_t>() <= 15,
              "w4a16_pack: codes must lie in 0..15 (q.max() = ", (N && K) ? q.max().item<int>() : 0, ")");

  const int64_t Nt = ceil_div(N, kTileN), K8 = ceil_div(K, kChunkK) * kChunkK;
  // [Nt, K8/8, 64]: tile, 8-k chunk, column within the tile (padding holds code 0)
  at::Tensor qweight = at::zeros({Nt, K8 / kChunkK, kTileN}, q.options().dtype(at::kInt));
  const at::Tensor qc = q.contiguous();
  const uint8_t* src = qc.data_ptr<uint8_t>();
  uint32_t* dst = reinterpret_cast<uint32_t*>(qweight.data_ptr<int32_t>());
  at::parallel_for(0, Nt, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t l = 0; l < kTileN && t * kTileN + l < N; ++l) {
        const uint8_t* row = src + (t * kTileN + l) * K;  // q[n, :]
        for (int64_t c = 0; c < K8 / kChunkK; ++c) {
          uint32_t w = 0;
          for (int64_t j = 0; j < kChunkK; ++j)  // nibble j: k = c*8 + kOrder[j] (w4a16_cpu.h)
            if (c * kChunkK + kOrder[j] < K)
              w |= static_cast<uint32_t>(row[c * kChunkK + kOrder[j]]) << (4 * j);
          dst[(t * (K8 / kChunkK) + c) * kTileN + l] = w;  // qweight[t, c, l]
        }
      }
  });
  const at::Tensor s32 = scales.to(at::kFloat);
  at::Tensor scales_p = s32.t().contiguous();                              // [G, N]
  at::Tensor zeros_p = (zeros.to(at::kFloat) * s32).neg_().t().contiguous();  // [G, N] = -z*s
  return {qweight, scales_p, zeros_p};
}

// x [..., K] (f32/bf16/f16) -> [..., N] in x.dtype = x @ ((q - z) * s).T + bias
int64_t best_isa() {
  const CpuIsa& c = cpu_isa();
  return c.amx ? 5 : c.vnni ? 4 : c.avx512 ? 3 : c.avx2 ? 2 : 1;
}

at::Tensor w4a16_gemm_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                          const at::Tensor& zeros, int64_t group_size,
                          const c10::optional<at::Tensor>& bias, int64_t kernel_code) {
  const auto xt = x.scalar_type();
  TORCH_CHECK(xt == at::kFloat || xt == at::kBFloat16 || xt == at::kHalf,
              "w4a16_gemm: x must be float32, bfloat16 or float16, got ", xt, " ", x.sizes());
  TORCH_CHECK(x.dim() >= 1, "w4a16_gemm: x must have a K dimension, got ", x.sizes());
  TORCH_CHECK(qweight.scalar_type() == at::kInt && qweight.dim() == 3 && qweight.size(2) == kTileN,
              "w4a16_gemm: qweight must be the CPU packed int32 [N/64, K/8, 64], got ",
              qweight.scalar_type(), " ", qweight.sizes(), " (pack it with w4a16_pack on the CPU)");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.dim() == 2 &&
                  zeros.scalar_type() == at::kFloat && zeros.sizes() == scales.sizes(),
              "w4a16_gemm: scales and zeros must be packed float32 [K/g, N], got ", scales.scalar_type(),
              " ", scales.sizes(), " and ", zeros.scalar_type(), " ", zeros.sizes());
  const int64_t K = x.size(-1), N = scales.size(1), G = scales.size(0);
  const int64_t K8 = qweight.size(1) * kChunkK;
  TORCH_CHECK(ceil_div(K, kChunkK) * kChunkK == K8 && qweight.size(0) == ceil_div(N, kTileN),
              "w4a16_gemm: x ", x.sizes(), " (K = ", K, ") does not match qweight ", qweight.sizes(),
              " / scales ", scales.sizes(), " (N = ", N, ")");
  const int64_t g = check_group(K, group_size, "w4a16_gemm");
  TORCH_CHECK(K / g == G, "w4a16_gemm: K = ", K, " / group_size ", group_size, " = ", K / g,
              " groups, but scales has ", G, " rows: ", scales.sizes());
  at::Tensor b32;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N && at::isFloatingType(bias->scalar_type()),
                "w4a16_gemm: bias must be floating [N] = [", N, "], got ", bias->scalar_type(), " ",
                bias->sizes());
    b32 = bias->to(at::kFloat).contiguous();
  }

  // why no reshape of a contiguous 2-D x and the output made in its final shape (not viewed): a
  // view is a dispatcher call plus autograd view metadata, visible in a decode-sized call
  const at::Tensor x2 = x.dim() == 2 && x.is_contiguous() ? x : x.reshape({-1, K}).contiguous();
  const int64_t M = x2.size(0);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  at::Tensor out = at::empty(out_shape, x.options());  // contiguous: row m of [M, N] at m * N
  if (M == 0 || N == 0) return out;

  // Activations once per call: float32, in nibble order and pre-scaled per nibble position (layout
  // note), K padded to 8 with zeros; plus the per-group sums that carry the zero points. The AMX
  // kernel needs only the sums (it reads the bfloat16 activations as given, below), the VNNI
  // kernel int16 activations, their scales and sums (quantize_rows_int16).
  const int64_t len = G == 1 ? K8 : g;
  const TileFn kernel = tile_fn(kernel_code, xt, M, len);
  const bool int16_input = kernel == tile_vnni || kernel == tile_avx2_int16;
  const bool fma_input = kernel != tile_amx && !int16_input;
  std::vector<float> xs(fma_input ? M * K8 : 0, 0.0f), xsum(M * G, 0.0f);
  std::vector<int16_t> xq(int16_input ? M * K8 : 0, 0);
  std::vector<float> xscale(int16_input ? M * G : 0, 0.0f);
  // why the chunks of 8 with a constant j: the factor lookup and the 8 partial sums vectorize; a
  // per-element factor (with a division) and one running sum cost ~15 cycles an element, which
  // was a visible share of a K = 4864, M = 4 call
  static constexpr int kNibbleOf[kChunkK] = {0, 4, 1, 5, 2, 6, 3, 7};  // kOrder's inverse
  static constexpr float kFac[kChunkK] = {1.f,         1.f / 16,       1.f / 256,       1.f / 4096,
                                          1.f / 65536, 1.f / 1048576, 1.f / 16777216, 1.f};
  if (int16_input) {
    quantize_rows_int16(x2, M, K, K8, G, len, kernel == tile_vnni, xq.data(), xscale.data(), xsum.data());
  } else AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, xt, "w4a16_gemm_x", [&] {
    const scalar_t* xp = x2.data_ptr<scalar_t>();
    at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) {
        const scalar_t* xr = xp + m * K;
        float* xo = fma_input ? xs.data() + m * K8 : nullptr;
        for (int64_t gi = 0; gi < G; ++gi) {
          const int64_t k1 = std::min(K, (gi + 1) * len);
          float part[kChunkK] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
          int64_t k = gi * len;  // a multiple of 8
          for (; k + kChunkK <= k1; k += kChunkK)
            for (int j = 0; j < kChunkK; ++j) {
              const float v = static_cast<float>(xr[k + kOrder[j]]);
              part[j] += v;
              if (fma_input) xo[k + j] = v * kFac[j];  // loop-invariant: the compiler unswitches it
            }
          for (; k < k1; ++k) {  // K % 8 tail (per-channel groups only): nibble j of k % 8
            const float v = static_cast<float>(xr[k]);
            part[0] += v;
            const int j = kNibbleOf[k & 7];
            if (fma_input) xo[(k & ~int64_t{7}) + j] = v * kFac[j];
          }
          float sum = 0.f;
          for (int j = 0; j < kChunkK; ++j) sum += part[j];
          xsum[m * G + gi] = sum;
        }
      }
    });
  });

  // the AMX kernel reads the bfloat16 activations as they are (K zero-padded to a multiple of 8)
  at::Tensor xb16;
  if (kernel == tile_amx)
    xb16 = K8 == K ? x2 : at::constant_pad_nd(x2, {0, K8 - K}, 0).contiguous();
  const uint16_t* xbp = xb16.defined() ? reinterpret_cast<const uint16_t*>(xb16.data_ptr()) : nullptr;
  const int64_t Nt = ceil_div(N, kTileN);
  const float* sp = scales.contiguous().data_ptr<float>();
  const float* zp = zeros.contiguous().data_ptr<float>();
  const int32_t* qp = qweight.contiguous().data_ptr<int32_t>();
  const float* bp = b32.defined() ? b32.data_ptr<float>() : nullptr;
  const bool amd_plan = cpu_isa().amd && M <= kVnniPrefetchAmdMaxRows;
  const int64_t pf_l1 = amd_plan ? kVnniPrefetchL1Amd : kPrefetchL1Rows;
  const int64_t pf_l2 = amd_plan ? kVnniPrefetchL2Amd : kPrefetchL2Rows;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, xt, "w4a16_gemm_out", [&] {
    scalar_t* op = out.data_ptr<scalar_t>();
    // why the grain: a thread's share should be worth the fork/join (~5-10 us, far more on an
    // oversubscribed machine where a descheduled thread stalls the join); >= ~256K MACs a task
    const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / std::max<int64_t>(1, K8 * kTileN * M));
    at::parallel_for(0, Nt, grain, [&](int64_t t0, int64_t t1) {
      // accumulators on the stack up to 16 rows (4 KiB; a malloc per task otherwise)
      alignas(64) float acc_stack[16 * kTileN];
      std::vector<float> acc_heap(M > 16 ? M * kTileN : 0), spad, zpad;
      float* acc = M > 16 ? acc_heap.data() : acc_stack;
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t n0 = t * kTileN, cols = std::min(kTileN, N - n0);
        std::fill(acc, acc + M * kTileN, 0.0f);
        TileProblem p{qp + t * (K8 / kChunkK) * kTileN, sp + n0, zp + n0, N, xs.data(), xsum.data(),
                      xbp, xq.data(), xscale.data(), M, K8, len, G, acc, pf_l1, pf_l2};
        if (cols < kTileN) {  // last, partial tile: the kernels read 64 columns, give them padding
          spad.assign(G * kTileN, 0.0f);
          zpad.assign(G * kTileN, 0.0f);
          for (int64_t gi = 0; gi < G; ++gi)
            for (int64_t l = 0; l < cols; ++l) {
              spad[gi * kTileN + l] = sp[gi * N + n0 + l];
              zpad[gi * kTileN + l] = zp[gi * N + n0 + l];
            }
          p.s = spad.data();
          p.zs = zpad.data();
          p.s_stride = kTileN;
        }
        kernel(p);
        for (int64_t m = 0; m < M; ++m)  // fused epilogue: bias, cast to x.dtype
          for (int64_t l = 0; l < cols; ++l)
            op[m * N + n0 + l] =
                static_cast<scalar_t>(acc[m * kTileN + l] + (bp ? bp[n0 + l] : 0.0f));
      }
    });
  });
  return out;
}

}  // namespace sqplus_cpu

// No tensor argument, so a catch-all kernel (the pattern of torchvision's _cuda_version).
TORCH_LIBRARY_FRAGMENT(sqplus, m) { m.def("w4a16_cpu_isa", &sqplus_cpu::best_isa); }

TORCH_LIBRARY_IMPL(sqplus, CPU, m) {
  m.impl("w4a16_pack", &sqplus_cpu::w4a16_pack_cpu);
  m.impl("w4a16_gemm", &sqplus_cpu::w4a16_gemm_cpu);
}
