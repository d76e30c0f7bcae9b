// W4A16 on the CPU: y[M,N] = x[M,K] @ ((q - zeros) * scales).T (+ bias), fp32 accumulation.
//
// ---------------------------------------------------------------------------------------------
// Packed layout (defined here, produced by w4a16_pack in w4a16_cpu.cpp)
//
//   qweight   int32 [ceil(N/64), ceil(K/8), 64]      (N padded to 64 with code 0, K to 8 with code 0)
//             qweight[t, c, l] holds the 8 codes q[t*64 + l, c*8 + j], j = 0..7, code j in bits
//             4j..4j+3 (code 0 in the low nibble).
//   scales_p  float32 [K/g, N]    scales transposed, in float32 (one load per 8/16 columns).
//   zeros_p   float32 [K/g, N]    -zeros * scales, in float32: the zero point is folded into an
//                                 offset so the inner loop never subtracts it (see below).
//
//   Picture of one 64-column tile t (contiguous, K*32 bytes; a thread owns whole tiles):
//
//        column l:   0   1   2  ...  63        <- one 256-byte row = 8 AVX2 / 4 AVX-512 vectors
//     k  0..7     [ w   w   w  ...   w ]       w = one int32 = 8 nibbles, k = c*8 + j
//     k  8..15    [ w   w   w  ...   w ]
//       ...
//
// Why this interleave: the GEMM walks K; at each k the 64 outputs of a tile need 64 weights, and
// they lie in one 256-byte row with the 8 k's that follow, so the weights of a tile stream once,
// front to back, in cache-line order (one prefetch stream per thread), and a 32-bit lane holds
// one output column, so nibble j of every lane is "the weight at k = c*8+j" for 8 (AVX2) or 16
// (AVX-512) columns at once: decoding is one AND (or a shift for j = 7) and one int->float
// convert, with no shuffles. The AND leaves code j multiplied by 16^j (j < 7); the activations
// are pre-scaled by 16^-j instead (exact: a power of two), so the shift costs nothing.
//
// Math per (row m, column n, group G):
//   sum_k x[k] * (q[k] - z) * s = s * sum_k x[k] q[k] + (-z s) * sum_k x[k]
// so the inner loop is one FMA per weight and per row (acc += x * q), and each group ends with
// out += s * acc + (-z s) * xsum[m, G]   (xsum precomputed once per call).
// ---------------------------------------------------------------------------------------------
#pragma once
#include <cstdint>

namespace sqplus_cpu {

constexpr int64_t kTileN = 64;  // output columns per tile: 8 AVX2 vectors, 4 AVX-512 vectors
constexpr int64_t kChunkK = 8;  // k's per int32 lane

// One tile's work: all M rows, 64 columns, all of K. Plain pointers so the ISA files need no torch.
struct TileProblem {
  const int32_t* qw;    // tile base: [K8/8][64] int32
  const float* s;       // scales of this tile's columns, group 0; group gi at s + gi * s_stride
  const float* zs;      // -zeros*scales, same indexing as s
  int64_t s_stride;     // floats between groups (N, or 64 for a padded copy of a partial tile)
  const float* xs;      // [M][K8] activations in float32, pre-scaled by 16^-(k%8) (k%8 < 7)
  const float* xsum;    // [M][G] plain (unscaled) sum of x over each group
  int64_t M, K8, group, G;  // group = k's per group (a multiple of 8, or K8 when G == 1)
  float* acc;           // [M][64] output accumulators, zeroed by the caller
};

// Activations are pre-scaled once per call (w4a16_cpu.cpp, kFac): nibble j = k % 8 comes out of
// the AND as q * 16^j for j < 7, so xs[k] = x[k] * 16^-j; nibble 7 is shifted down instead (a shift
// avoids the int32 sign bit), so its factor is 1.

void tile_scalar(const TileProblem& p);
void tile_avx2(const TileProblem& p);    // compiled with target("avx2,fma")
void tile_avx512(const TileProblem& p);  // compiled with target("avx512f,...")

}  // namespace sqplus_cpu
