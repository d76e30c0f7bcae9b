// AVX-512 VNNI tile kernel: 16-bit activations as int16 times 4-bit weights with vpdpwssd
// (int16 pairs -> int32 dot product, accumulated), chosen at run time by w4a16_cpu.cpp for
// bfloat16 and float16 activations when the CPU has avx512_vnni. Layout: w4a16_cpu.h.
//
// Why: the FMA kernel spends three vector uops per 16 weights and row (AND, int->float convert,
// FMA); at 1-4 rows that, not memory, bounds it. Here the packed word's pair p (k = 2p, 2p+1 of
// an 8-k chunk, w4a16_cpu.h) comes out as two int16 lanes with one shift and one AND,
//     t = (w >> 4p) & 0x000F000F          (q[2p] in the low half-word, q[2p+1] in the high)
// and one vpdpwssd per row multiplies it by the broadcast int16 activation pair and adds both
// products into the column's int32 lane: 2 + M uops per 32 weights instead of 4 + 2M (measured
// on this machine's Sapphire-Rapids-class core: vpdpwssd 2 per cycle like an FMA, a shift 1 per
// cycle; 1-2 rows use one shift per 4 pairs, kMask below). At one row, 896x896 with its weights
// in cache, calls back to back: 12.5 us against the FMA kernel's 24.2 (1 thread, a one-off
// script); kernel_bench --warm, other methods in between: 1.28x (results/intel-xeon-2c).
//
// The activations are quantized per call, per row and group, to int16 (quantize_row_vnni at the
// end of this file, called per row by w4a16_cpu.cpp; twin: kernels/cpu_layout.quantize_act_int16):
//     xq = round(x / sx),  sx = max|x over the group| / qmax,  qmax <= 32767
// an error of at most sx / 2 = 2^-16 of the group's largest |x| per element (qmax = 32767; long
// per-channel groups, len > 4369, lower qmax: 2^-15.1 at len 8192), below the bfloat16
// (2^-9 relative) and float16 (2^-12) rounding the input already carries for every element
// within a factor 2^7 (resp. 2^4) of that maximum. qmax is lowered for long groups so that a
// group's int32 sum cannot overflow (len * 15 * qmax < 2^31). Per group the int32 sums become
//     out += s * sx * C + (-z s) * xsum,   C = sum_k xq q,   xsum = sx * sum_k xq
// (xsum of the quantized x, so a column whose codes all equal its zero point gives exactly 0). A
// group holding a NaN or an infinity gets xscale = xsum = NaN (its outputs become NaN).
#include <immintrin.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <limits>

#include "w4a16_cpu.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")

namespace sqplus_cpu {
namespace {

// kMask (1-2 rows, groups of at most kMaskMaxLen k's): pairs 1 and 3 are masked in place with
// 0x00F000F0, i.e. as 16 q, so one shift (by 8) serves all four pairs; their products go to their
// own accumulators, divided by 16 (exactly: a multiple of 16 shifted) at the end. Their int32 sums
// reach len / 2 * 240 * 32767 < 2^31 for len <= 512.
constexpr int64_t kMaskMaxLen = 512;

// the int16 pair (k, k+1) as one int32 (the broadcast operand of vpdpwssd); memcpy: no aliasing
inline int32_t pair(const int16_t* x) {
  int32_t v;
  std::memcpy(&v, x, sizeof(v));
  return v;
}

constexpr int kNV = 4;  // 16-column vectors per 64-column tile

// Pair PR (k = 2 PR, 2 PR + 1 of each 8-k chunk) of one chunk, for MR rows without kMask: w holds
// the chunk's kNV packed weight vectors, shifted in place by 4 before each pair after the first,
// so a pair costs kNV ANDs, kNV shifts (none for pair 0) and MR broadcasts besides its MR x kNV
// vpdpwssd. why a template per pair and this order: with the vectors outer and the pairs inner
// (the kMask order below), GCC kept all 4 x MR broadcasts live across the vectors, 12-16
// registers beside 12-16 accumulators at 3-4 rows, and spilled accumulators to the stack inside
// the loop; pair by pair, with constant indices, they stay in registers. Tried and dropped: the
// broadcast as vpdpwssd's own memory operand ({1to16}, inline asm): 6-14% slower at 1 and 3-8
// rows on a Zen 5 core (a one-off A/B, not recorded; one broadcast load per vector instead of one
// per pair and row).
template <int MR, int S, int PR>
__attribute__((always_inline)) inline void pair_step(__m512i (&acc)[S][MR][kNV], __m512i (&w)[kNV],
                                                     const int16_t* x, int64_t K8, __m512i m0f) {
  __m512i xb[MR];
  for (int r = 0; r < MR; ++r) xb[r] = _mm512_set1_epi32(pair(x + r * K8 + 2 * PR));
  if (PR > 0)
    for (int v = 0; v < kNV; ++v) w[v] = _mm512_srli_epi32(w[v], 4);
  constexpr int a = PR % S;
  for (int v = 0; v < kNV; ++v) {
    const __m512i t = _mm512_and_si512(w[v], m0f);
    for (int r = 0; r < MR; ++r) acc[a][r][v] = _mm512_dpwssd_epi32(acc[a][r][v], t, xb[r]);
  }
}

// kMask (1-2 rows): vector V of one chunk, all four pairs: pairs 0 and 1 from w masked with
// 0x000F000F and 0x00F000F0 (1 q and 16 q), pairs 2 and 3 likewise from w >> 8; the pair's class
// and, at one row, its half pick the accumulator set. Templates, so that every index is a
// constant: with a runtime-unrolled pair loop (and the rolled epilogue loop of group_vnni) GCC
// kept the accumulator array of 2 rows in memory and stored all 16 accumulators every chunk.
template <int MR, int S, int V, int PR>
__attribute__((always_inline)) inline void mask_pair(__m512i (&acc)[S][MR][kNV], __m512i t,
                                                     const int16_t* x, int64_t K8) {
  constexpr int a = (PR % 2) * (S / 2) + (S == 4 ? PR / 2 : 0);
  for (int r = 0; r < MR; ++r)
    acc[a][r][V] = _mm512_dpwssd_epi32(acc[a][r][V], t, _mm512_set1_epi32(pair(x + r * K8 + 2 * PR)));
}

template <int MR, int S, int V>
__attribute__((always_inline)) inline void mask_vector(__m512i (&acc)[S][MR][kNV], const int32_t* q,
                                                       const int16_t* x, int64_t K8, __m512i m0f,
                                                       __m512i m1f) {
  const __m512i w = _mm512_loadu_si512(q + V * 16);
  const __m512i w8 = _mm512_srli_epi32(w, 8);
  mask_pair<MR, S, V, 0>(acc, _mm512_and_si512(w, m0f), x, K8);
  mask_pair<MR, S, V, 1>(acc, _mm512_and_si512(w, m1f), x, K8);
  mask_pair<MR, S, V, 2>(acc, _mm512_and_si512(w8, m0f), x, K8);
  mask_pair<MR, S, V, 3>(acc, _mm512_and_si512(w8, m1f), x, K8);
}

template <int MR, bool kMask, bool kPrefetchL1>
inline void group_vnni(const TileProblem& p, int64_t gi, int64_t k0, int64_t len, int64_t m0) {
  constexpr int NV = kNV;
  // why: vpdpwssd has a latency of ~5 cycles at 2 per cycle, so ~10 chains must be in flight;
  // one row has 4 (one per column block): 1 row cycles 4 sets by pair, 2 rows 2 (kMask: the
  // pair's parity picks the class, 1 q or 16 q, and for one row its half the set)
  constexpr int S = MR == 1 ? 4 : MR == 2 ? 2 : 1;
  __m512i acc[S][MR][NV];
  for (int a = 0; a < S; ++a)
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < NV; ++v) acc[a][r][v] = _mm512_setzero_si512();
  prefetch_next_group_scales(p, gi);
  const __m512i m0f = _mm512_set1_epi32(0x000F000F), m1f = _mm512_set1_epi32(0x00F000F0);
  const int32_t* q = p.qw + (k0 / kChunkK) * kTileN;
  const int16_t* x = p.xq + m0 * p.K8 + k0;
  // a tile row is 4 lines; prefetch p.pf_l1_rows ahead into L1 (Intel), p.pf_l2_rows into L2
  // (w4a16_cpu.h: kVnniPrefetch*)
  const int64_t pf1 = p.pf_l1_rows * kTileN, pf2 = p.pf_l2_rows * kTileN;
  for (int64_t c = 0; c < len / kChunkK; ++c, q += kTileN, x += kChunkK) {
    for (int l = 0; l < 4; ++l) {
      if constexpr (kPrefetchL1) _mm_prefetch(reinterpret_cast<const char*>(q + pf1 + l * 16), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(q + pf2 + l * 16), _MM_HINT_T1);
    }
    if constexpr (kMask) {
      // 1-2 rows: vector by vector (mask_vector: one shift per vector)
      mask_vector<MR, S, 0>(acc, q, x, p.K8, m0f, m1f);
      mask_vector<MR, S, 1>(acc, q, x, p.K8, m0f, m1f);
      mask_vector<MR, S, 2>(acc, q, x, p.K8, m0f, m1f);
      mask_vector<MR, S, 3>(acc, q, x, p.K8, m0f, m1f);
    } else {
      // pair by pair (pair_step): the weight vectors stay in registers, shifted in place
      __m512i w[NV];
      for (int v = 0; v < NV; ++v) w[v] = _mm512_loadu_si512(q + v * 16);
      pair_step<MR, S, 0>(acc, w, x, p.K8, m0f);
      pair_step<MR, S, 1>(acc, w, x, p.K8, m0f);
      pair_step<MR, S, 2>(acc, w, x, p.K8, m0f);
      pair_step<MR, S, 3>(acc, w, x, p.K8, m0f);
    }
  }
  const float* s = p.s + gi * p.s_stride;
  const float* zs = p.zs + gi * p.s_stride;
  // fully unrolled (constant indices): rolled, it kept the accumulator array in memory, and GCC
  // then stored accumulators to the stack on every chunk of the loop above (2-4 rows). Measured
  // together with the templates above: results/amd-epyc-zen5-2c/kernel_ab_*.json
#pragma GCC unroll 4
  for (int r = 0; r < MR; ++r) {
    const __m512 sx = _mm512_set1_ps(p.xscale[(m0 + r) * p.G + gi]);
    const __m512 xsum = _mm512_set1_ps(p.xsum[(m0 + r) * p.G + gi]);
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      __m512i sum;
      if (kMask) {
        __m512i s1 = acc[0][r][v], s16 = acc[S / 2][r][v];
        if (S == 4) s1 = _mm512_add_epi32(s1, acc[1][r][v]), s16 = _mm512_add_epi32(s16, acc[3][r][v]);
        sum = _mm512_add_epi32(s1, _mm512_srai_epi32(s16, 4));  // s16: a multiple of 16
      } else {
        sum = acc[0][r][v];
        for (int a = 1; a < S; ++a) sum = _mm512_add_epi32(sum, acc[a][r][v]);
      }
      float* o = p.acc + (m0 + r) * kTileN + v * 16;
      __m512 ov = _mm512_loadu_ps(o);
      ov = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_mul_ps(_mm512_loadu_ps(s + v * 16), sx), ov);
      ov = _mm512_fmadd_ps(_mm512_loadu_ps(zs + v * 16), xsum, ov);
      _mm512_storeu_ps(o, ov);
    }
  }
}

template <bool kPrefetchL1>
void tile_vnni_pf(const TileProblem& p) {
  for_each_group_and_row_block(p, [&](auto mr, int64_t gi, int64_t k0, int64_t len, int64_t m0) {
    constexpr int MR = decltype(mr)::value;
    if (MR <= 2 && len <= kMaskMaxLen)
      group_vnni<MR, MR <= 2, kPrefetchL1>(p, gi, k0, len, m0);
    else
      group_vnni<MR, false, kPrefetchL1>(p, gi, k0, len, m0);
  });
}

}  // namespace

void tile_vnni(const TileProblem& p) {
  if (p.pf_l1_rows > 0)
    tile_vnni_pf<true>(p);
  else
    tile_vnni_pf<false>(p);
}

namespace {

// 16 activations (bfloat16 or float16 bits) from k, the lanes past `cnt` zero, as float32
inline __m512 load16(const uint16_t* x, int64_t cnt, bool bf16) {
  const __mmask16 m = cnt >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << cnt) - 1);
  const __m256i h = _mm256_maskz_loadu_epi16(m, x);
  return bf16 ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)) : _mm512_cvtph_ps(h);
}

}  // namespace

void quantize_row_vnni(const uint16_t* x, bool bf16, int64_t K, int64_t G, int64_t len, float qmax,
                       int16_t* xq, float* xscale, float* xsum) {
  for (int64_t gi = 0; gi < G; ++gi) {
    const int64_t k0 = gi * len, k1 = std::min(K, k0 + len);
    __m512 vmax = _mm512_setzero_ps();
    __mmask16 bad = 0;  // lanes that saw a NaN or an infinity
    const __m512 inf = _mm512_set1_ps(HUGE_VALF);
    for (int64_t k = k0; k < k1; k += 16) {
      const __m512 a = _mm512_abs_ps(load16(x + k, k1 - k, bf16));
      bad |= _mm512_cmp_ps_mask(a, inf, _CMP_NLT_UQ);  // |x| >= inf, or unordered (NaN)
      vmax = _mm512_max_ps(vmax, a);
    }
    if (bad) {  // a non-finite activation makes the group's outputs NaN, as in the other kernels
      std::fill(xq + k0, xq + k1, int16_t{0});
      xscale[gi] = xsum[gi] = std::numeric_limits<float>::quiet_NaN();
      continue;
    }
    const float amax = _mm512_reduce_max_ps(vmax);
    // FLT_MAX: a group of tiny values (amax < qmax / FLT_MAX, possible in bfloat16) would make
    // the factor infinite; clamped, its codes stay finite
    const float inv = amax > 0.f ? std::min(qmax / amax, FLT_MAX) : 0.f;
    const __m512 vinv = _mm512_set1_ps(inv);
    __m512i isum = _mm512_setzero_si512();  // |sum| <= len * qmax < 2^31 / 15
    for (int64_t k = k0; k < k1; k += 16) {
      const int64_t cnt = k1 - k;
      // round half to even (the default MXCSR mode, as std::nearbyint and torch.round)
      const __m512i qi = _mm512_cvtps_epi32(_mm512_mul_ps(load16(x + k, cnt, bf16), vinv));
      isum = _mm512_add_epi32(isum, qi);
      _mm512_mask_cvtsepi32_storeu_epi16(xq + k, cnt >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << cnt) - 1), qi);
    }
    const float sx = amax / qmax;
    xscale[gi] = sx;
    xsum[gi] = sx * static_cast<float>(_mm512_reduce_add_epi32(isum));
  }
}

}  // namespace sqplus_cpu

#pragma GCC pop_options
