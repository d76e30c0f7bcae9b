// AVX2 int16 tile kernel: 16-bit activations as int16 times 4-bit weights with vpmaddwd (int16
// pairs -> one int32 per lane, added to the lane's accumulator), chosen at run time by
// w4a16_cpu.cpp for bfloat16 and float16 activations on CPUs with AVX2 and no AVX-512 VNNI. The
// AVX2 twin of w4a16_vnni.cpp: the same activations (int16 per row and group, quantize_row_avx2
// below is quantize_row_vnni bit for bit), the same per-group epilogue; vpdpwssd's fused add is a
// separate vpaddd here. Layout: w4a16_cpu.h.
//
// Why: the FMA kernel (w4a16_avx2.cpp) spends three vector uops per 8 weights and row (AND,
// int->float convert, FMA) and at 1 row is bound by them, not by memory (about 45% of the read
// bandwidth on the 2-core AVX2 EPYC VM, results/amd-epyc-2c/kernels_cpu_4096.md). Here the packed
// word's pair p (k = 2p, 2p+1 of an 8-k chunk: nibbles p and p + 4) comes out as two int16 lanes,
//     t = (w >> 4p) & 0x000F000F          (q[2p] in the low half-word, q[2p+1] in the high)
// the shift reading the weights straight from L1 (vpsrld's memory form: no register holds them),
// and per row one vpmaddwd against the broadcast activation pair and one vpaddd: 2 + 2M uops per
// 16 weights (the shift missing at p = 0) instead of 4 + 2M per 8.
//
// Activations and error: w4a16_vnni.cpp's header (2^-16 of the group's max|x| per element; qmax
// lowered for groups longer than 4369 so the int32 sums cannot overflow).
#include <immintrin.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <limits>

#include "w4a16_cpu.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

namespace sqplus_cpu {
namespace {

// the int16 pair (k, k+1) as one int32 broadcast to 8 lanes; memcpy: no aliasing
inline __m256i pair8(const int16_t* x) {
  int32_t v;
  std::memcpy(&v, x, sizeof(v));
  return _mm256_set1_epi32(v);
}

// Pair PR of one chunk for MR rows and vectors v0..v0+NV: decode each vector's pair from memory
// (L1), then one vpmaddwd + vpaddd per row. Constant indices (template) keep the accumulators in
// registers.
template <int MR, int NV, int PR>
__attribute__((always_inline)) inline void pair_avx2(__m256i (&acc)[MR][NV], const int32_t* q,
                                                     const int16_t* x, int64_t K8, __m256i m0f) {
  __m256i xb[MR];
  for (int r = 0; r < MR; ++r) xb[r] = pair8(x + r * K8 + 2 * PR);
  for (int v = 0; v < NV; ++v) {
    const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + v * 8));
    const __m256i t = _mm256_and_si256(PR ? _mm256_srli_epi32(w, 4 * PR) : w, m0f);
    for (int r = 0; r < MR; ++r) {
      acc[r][v] = _mm256_add_epi32(acc[r][v], _mm256_madd_epi16(t, xb[r]));
      // why: integer adds reassociate, and GCC did: it summed the four pairs' products of a chunk
      // first and kept the 8 accumulators of 3-4 rows on the stack (a load and a store each per
      // chunk). An empty asm that "changes" the accumulator pins each add here, in a register.
      __asm__("" : "+x"(acc[r][v]));
    }
  }
}

// One group (k0 .. k0+len) for rows m0..m0+MR and column vectors v0..v0+NV (8 columns each).
template <int MR, int NV>
inline void group_avx2_int16(const TileProblem& p, int64_t gi, int64_t k0, int64_t len, int64_t m0,
                             int v0) {
  __m256i acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_setzero_si256();
  if (v0 == 0) prefetch_next_group_scales(p, gi);  // once, on the group's first pass
  const __m256i m0f = _mm256_set1_epi32(0x000F000F);
  const int32_t* q = p.qw + (k0 / kChunkK) * kTileN + v0 * 8;
  const int16_t* x = p.xq + m0 * p.K8 + k0;
  for (int64_t c = 0; c < len / kChunkK; ++c, q += kTileN, x += kChunkK) {
    // the whole 256-byte tile row (4 lines), PF rows ahead into L1 and PF2 rows ahead into L2,
    // once (first pass over the group)
    if (v0 == 0)
      for (int l = 0; l < 4; ++l) {
        _mm_prefetch(reinterpret_cast<const char*>(q + kPrefetchL1Rows * kTileN + l * 16), _MM_HINT_T0);  // 8 KiB (w4a16_cpu.h)
        _mm_prefetch(reinterpret_cast<const char*>(q + kPrefetchL2Rows * kTileN + l * 16), _MM_HINT_T1);  // 64 KiB
      }
    pair_avx2<MR, NV, 0>(acc, q, x, p.K8, m0f);
    pair_avx2<MR, NV, 1>(acc, q, x, p.K8, m0f);
    pair_avx2<MR, NV, 2>(acc, q, x, p.K8, m0f);
    pair_avx2<MR, NV, 3>(acc, q, x, p.K8, m0f);
  }
  // out += s * sx * C + (-z s) * xsum   (w4a16_vnni.cpp)
  const float* s = p.s + gi * p.s_stride + v0 * 8;
  const float* zs = p.zs + gi * p.s_stride + v0 * 8;
#pragma GCC unroll 4
  for (int r = 0; r < MR; ++r) {
    const __m256 sx = _mm256_set1_ps(p.xscale[(m0 + r) * p.G + gi]);
    const __m256 xsum = _mm256_set1_ps(p.xsum[(m0 + r) * p.G + gi]);
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      float* o = p.acc + (m0 + r) * kTileN + (v0 + v) * 8;
      __m256 ov = _mm256_loadu_ps(o);
      ov = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[r][v]), _mm256_mul_ps(_mm256_loadu_ps(s + v * 8), sx), ov);
      ov = _mm256_fmadd_ps(_mm256_loadu_ps(zs + v * 8), xsum, ov);
      _mm256_storeu_ps(o, ov);
    }
  }
}

}  // namespace

void tile_avx2_int16(const TileProblem& p) {
  // 16 ymm registers: MR x NV accumulators + MR broadcasts + mask + decoded pair
  for_each_group_and_row_block(p, [&](auto mr, int64_t gi, int64_t k0, int64_t len, int64_t m0) {
    constexpr int MR = decltype(mr)::value;
    constexpr int NV = MR == 1 ? 8 : MR == 2 ? 4 : 2;
    for (int v0 = 0; v0 < 8; v0 += NV) group_avx2_int16<MR, NV>(p, gi, k0, len, m0, v0);
  });
}

namespace {

// 8 activations (bfloat16 or float16 bits) from x, the lanes past `cnt` zero, as float32
inline __m256 load8(const uint16_t* x, int64_t cnt, bool bf16) {
  __m128i h;
  if (cnt >= 8) {
    h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x));
  } else {
    alignas(16) uint16_t tmp[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    std::memcpy(tmp, x, cnt * sizeof(uint16_t));
    h = _mm_load_si128(reinterpret_cast<const __m128i*>(tmp));
  }
  return bf16 ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)) : _mm256_cvtph_ps(h);
}

inline float hmax8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

inline int32_t hsum8(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

}  // namespace

// quantize_row_vnni's arithmetic with 8 lanes (the same results bit for bit: max, one float32
// multiply, round half to even, int32 sum; the codes never exceed qmax in magnitude)
void quantize_row_avx2(const uint16_t* x, bool bf16, int64_t K, int64_t G, int64_t len, float qmax,
                       int16_t* xq, float* xscale, float* xsum) {
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  const __m256 inf = _mm256_set1_ps(HUGE_VALF);
  for (int64_t gi = 0; gi < G; ++gi) {
    const int64_t k0 = gi * len, k1 = std::min(K, k0 + len);
    __m256 vmax = _mm256_setzero_ps();
    int bad = 0;  // a NaN or an infinity in the group
    for (int64_t k = k0; k < k1; k += 8) {
      const __m256 a = _mm256_and_ps(load8(x + k, k1 - k, bf16), absmask);
      bad |= _mm256_movemask_ps(_mm256_cmp_ps(a, inf, _CMP_NLT_UQ));  // |x| >= inf, or NaN
      vmax = _mm256_max_ps(vmax, a);
    }
    if (bad) {
      std::fill(xq + k0, xq + k1, int16_t{0});
      xscale[gi] = xsum[gi] = std::numeric_limits<float>::quiet_NaN();
      continue;
    }
    const float amax = hmax8(vmax);
    const float inv = amax > 0.f ? std::min(qmax / amax, FLT_MAX) : 0.f;
    const __m256 vinv = _mm256_set1_ps(inv);
    __m256i isum = _mm256_setzero_si256();
    for (int64_t k = k0; k < k1; k += 8) {
      const int64_t cnt = k1 - k;
      const __m256i qi = _mm256_cvtps_epi32(_mm256_mul_ps(load8(x + k, cnt, bf16), vinv));  // half to even
      isum = _mm256_add_epi32(isum, qi);
      // |qi| <= qmax < 2^15: packing to int16 with saturation changes nothing
      const __m128i q16 = _mm_packs_epi32(_mm256_castsi256_si128(qi), _mm256_extracti128_si256(qi, 1));
      if (cnt >= 8)
        _mm_storeu_si128(reinterpret_cast<__m128i*>(xq + k), q16);
      else {
        alignas(16) int16_t tmp[8];
        _mm_store_si128(reinterpret_cast<__m128i*>(tmp), q16);
        std::memcpy(xq + k, tmp, cnt * sizeof(int16_t));
      }
    }
    const float sx = amax / qmax;
    xscale[gi] = sx;
    xsum[gi] = sx * static_cast<float>(hsum8(isum));
  }
}

}  // namespace sqplus_cpu

#pragma GCC pop_options
