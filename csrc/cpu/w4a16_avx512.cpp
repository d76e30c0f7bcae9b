// AVX-512 tile kernel (16 fp32 lanes), chosen at run time by w4a16_cpu.cpp when the CPU has
// avx512f; the same build runs on AVX2-only machines because only this file's functions carry
// the AVX-512 target. Layout and math: w4a16_cpu.h. Same scheme as w4a16_avx2.cpp with a 64-column
// tile = 4 zmm vectors, so every call covers the whole tile (NV = 4) and the 32 registers take
// up to 4 rows x 4 vectors of accumulators (2 x 4 for one row, see below).
#include <immintrin.h>

#include "w4a16_cpu.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma")

namespace sqplus_cpu {
namespace {

template <int MR>
inline void group_avx512(const TileProblem& p, int64_t gi, int64_t k0, int64_t len, int64_t m0) {
  constexpr int NV = 4;
  // why: one row has only 4 accumulators, i.e. 4 dependent FMA chains (latency 4, 2 FMA ports
  // want 8 in flight): alternate two sets by nibble parity and add them at the end
  constexpr int S = MR == 1 ? 2 : 1;
  __m512 acc[S][MR][NV];
  for (int a = 0; a < S; ++a)
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < NV; ++v) acc[a][r][v] = _mm512_setzero_ps();
  const int32_t* q = p.qw + (k0 / kChunkK) * kTileN;
  const float* x = p.xs + m0 * p.K8 + k0;
  for (int64_t c = 0; c < len / kChunkK; ++c, q += kTileN, x += kChunkK) {
    // why: a tile row is 4 lines; prefetch all four 32 rows (8 KiB) ahead (see w4a16_avx2.cpp)
    for (int l = 0; l < 4; ++l)
      _mm_prefetch(reinterpret_cast<const char*>(q + 32 * kTileN + l * 16), _MM_HINT_T0);
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) {
      __m512 xb[MR];
      for (int r = 0; r < MR; ++r) xb[r] = _mm512_set1_ps(x[r * p.K8 + j]);
      for (int v = 0; v < NV; ++v) {
        const __m512i w = _mm512_loadu_si512(q + v * 16);
        const __m512i n = j < 7 ? _mm512_and_si512(w, _mm512_set1_epi32(0xF << (4 * j)))
                                : _mm512_srli_epi32(w, 28);
        const __m512 wf = _mm512_cvtepi32_ps(n);
        for (int r = 0; r < MR; ++r) acc[j % S][r][v] = _mm512_fmadd_ps(wf, xb[r], acc[j % S][r][v]);
      }
    }
  }
  const float* s = p.s + gi * p.s_stride;
  const float* zs = p.zs + gi * p.s_stride;
  for (int r = 0; r < MR; ++r) {
    const __m512 xsum = _mm512_set1_ps(p.xsum[(m0 + r) * p.G + gi]);
    for (int v = 0; v < NV; ++v) {
      float* o = p.acc + (m0 + r) * kTileN + v * 16;
      __m512 ov = _mm512_loadu_ps(o);
      const __m512 sum = S == 2 ? _mm512_add_ps(acc[0][r][v], acc[S - 1][r][v]) : acc[0][r][v];
      ov = _mm512_fmadd_ps(sum, _mm512_loadu_ps(s + v * 16), ov);
      ov = _mm512_fmadd_ps(_mm512_loadu_ps(zs + v * 16), xsum, ov);
      _mm512_storeu_ps(o, ov);
    }
  }
}

}  // namespace

void tile_avx512(const TileProblem& p) {
  for_each_group_and_row_block(p, [&](auto mr, int64_t gi, int64_t k0, int64_t len, int64_t m0) {
    group_avx512<decltype(mr)::value>(p, gi, k0, len, m0);
  });
}

}  // namespace sqplus_cpu

#pragma GCC pop_options
