// AVX2 + FMA tile kernel (8 fp32 lanes). Layout and math: w4a16_cpu.h.
//
// Register budget (16 ymm): MR*NV accumulators + 1 decoded weight vector + MR broadcasts of x +
// the nibble mask. The weights are re-read from L1 for each nibble (vpand with a memory operand),
// which frees the registers that holding them would take. Blocking per call: MR rows x NV vectors;
// the 8 vectors of a 64-column tile are covered in 8/NV passes over one group, whose weights
// (group*32 bytes, 4 KiB at g = 128) stay in L1 between passes and between row blocks, so memory
// is streamed once however large M is, and each decoded weight vector serves MR rows.
#include <immintrin.h>

#include "w4a16_cpu.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma")

namespace sqplus_cpu {
namespace {

constexpr int64_t kPrefetchRows = 32;  // 8 KiB ahead (16..64 measured alike)

// One group (k0 .. k0+len, len a multiple of 8) for rows m0..m0+MR and vectors v0..v0+NV.
template <int MR, int NV>
inline void group_avx2(const TileProblem& p, int64_t gi, int64_t k0, int64_t len, int64_t m0,
                       int v0) {
  __m256 acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_setzero_ps();
  if (v0 == 0) prefetch_next_group_scales(p, gi);  // once, on the group's first pass
  const int32_t* q = p.qw + (k0 / kChunkK) * kTileN + v0 * 8;
  const float* x = p.xs + m0 * p.K8 + k0;
  for (int64_t c = 0; c < len / kChunkK; ++c, q += kTileN, x += kChunkK) {
    // why: the hardware prefetcher alone left M = 1 at ~60% of the warm speed when the weights
    // come from DRAM; fetch the whole 256-byte row (4 lines) PF rows ahead, once (first pass)
    if (v0 == 0)
      for (int l = 0; l < 4; ++l)
        _mm_prefetch(reinterpret_cast<const char*>(q + kPrefetchRows * kTileN + l * 16), _MM_HINT_T0);
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) {
      __m256 xb[MR];
      for (int r = 0; r < MR; ++r) xb[r] = _mm256_broadcast_ss(x + r * p.K8 + j);
      for (int v = 0; v < NV; ++v) {
        const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + v * 8));
        // nibble j as q*16^j (x was pre-scaled by 16^-j); nibble 7 shifted to avoid the sign bit
        const __m256i n = j < 7 ? _mm256_and_si256(w, _mm256_set1_epi32(0xF << (4 * j)))
                                : _mm256_srli_epi32(w, 28);
        const __m256 wf = _mm256_cvtepi32_ps(n);
        for (int r = 0; r < MR; ++r) acc[r][v] = _mm256_fmadd_ps(wf, xb[r], acc[r][v]);
      }
    }
  }
  // group epilogue: out += s * acc + (-z s) * sum(x over the group)
  const float* s = p.s + gi * p.s_stride + v0 * 8;
  const float* zs = p.zs + gi * p.s_stride + v0 * 8;
  for (int r = 0; r < MR; ++r) {
    const __m256 xsum = _mm256_broadcast_ss(p.xsum + (m0 + r) * p.G + gi);
    for (int v = 0; v < NV; ++v) {
      float* o = p.acc + (m0 + r) * kTileN + (v0 + v) * 8;
      __m256 ov = _mm256_loadu_ps(o);
      ov = _mm256_fmadd_ps(acc[r][v], _mm256_loadu_ps(s + v * 8), ov);
      ov = _mm256_fmadd_ps(_mm256_loadu_ps(zs + v * 8), xsum, ov);
      _mm256_storeu_ps(o, ov);
    }
  }
}

template <int MR, int NV>
inline void rows_avx2(const TileProblem& p, int64_t gi, int64_t k0, int64_t len, int64_t m0) {
  for (int v0 = 0; v0 < 8; v0 += NV) group_avx2<MR, NV>(p, gi, k0, len, m0, v0);
}

}  // namespace

void tile_avx2(const TileProblem& p) {
  // column vectors per pass by rows: the 16 ymm registers hold MR x NV accumulators
  for_each_group_and_row_block(p, [&](auto mr, int64_t gi, int64_t k0, int64_t len, int64_t m0) {
    constexpr int MR = decltype(mr)::value;
    rows_avx2<MR, MR == 1 ? 8 : MR == 2 ? 4 : 2>(p, gi, k0, len, m0);
  });
}

}  // namespace sqplus_cpu

#pragma GCC pop_options
