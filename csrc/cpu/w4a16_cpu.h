// W4A16 on the CPU: y[M,N] = x[M,K] @ ((q - zeros) * scales).T (+ bias), fp32 accumulation.
//
// ---------------------------------------------------------------------------------------------
// Packed layout (defined here, produced by w4a16_pack in w4a16_cpu.cpp)
//
//   qweight   int32 [ceil(N/64), ceil(K/8), 64]      (N padded to 64 with code 0, K to 8 with code 0)
//             qweight[t, c, l] holds the 8 codes q[t*64 + l, c*8 + kOrder[j]], j = 0..7, in bits
//             4j..4j+3, kOrder = {0, 2, 4, 6, 1, 3, 5, 7}: the even k's of the chunk in the low
//             half-word, the odd ones in the high half-word (why: w4a16_amx.cpp reads the
//             pair k = 2p, 2p+1 with one shift and one mask; the FMA kernels do not care, their
//             activations are permuted to match, below).
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
// are pre-scaled by 16^-j instead (exact: a power of two), so the shift costs nothing. Nibble j
// is the weight at k = c*8 + kOrder[j], so the pre-scaled activations are stored in that order
// too: xs[c*8 + j] = x[c*8 + kOrder[j]] * 16^-j.
//
// Math per (row m, column n, group G):
//   sum_k x[k] * (q[k] - z) * s = s * sum_k x[k] q[k] + (-z s) * sum_k x[k]
// so the inner loop is one FMA per weight and per row (acc += x * q), and each group ends with
// out += s * acc + (-z s) * xsum[m, G]   (xsum precomputed once per call).
// ---------------------------------------------------------------------------------------------
#pragma once
#include <cstdint>
#include <type_traits>

namespace sqplus_cpu {

constexpr int64_t kTileN = 64;  // output columns per tile: 8 AVX2 vectors, 4 AVX-512 vectors
constexpr int64_t kChunkK = 8;  // k's per int32 lane
// k offset (within a chunk of 8) of the code in nibble j of a lane
constexpr int kOrder[kChunkK] = {0, 2, 4, 6, 1, 3, 5, 7};

// One tile's work: all M rows, 64 columns, all of K. Plain pointers so the ISA files need no torch.
struct TileProblem {
  const int32_t* qw;    // tile base: [K8/8][64] int32
  const float* s;       // scales of this tile's columns, group 0; group gi at s + gi * s_stride
  const float* zs;      // -zeros*scales, same indexing as s
  int64_t s_stride;     // floats between groups (N, or 64 for a padded copy of a partial tile)
  const float* xs;      // [M][K8] activations in float32, in nibble order, pre-scaled (see above)
  const float* xsum;    // [M][G] plain (unscaled) sum of x over each group
  const uint16_t* xb;   // [M][K8] the bfloat16 activations as given (K zero-padded to 8), for
                        // tile_amx only (nullptr for the other kernels)
  const int16_t* xq;    // [M][K8] activations quantized to int16 per row and group, natural k
                        // order, for tile_vnni and tile_avx2_int16 only; nullptr otherwise
  const float* xscale;  // [M][G] their scales (x ~ xscale * xq), those two kernels only
  int64_t M, K8, group, G;  // group = k's per group (a multiple of 8, or K8 when G == 1)
  float* acc;           // [M][64] output accumulators, zeroed by the caller
  // software prefetch of the weight stream, in tile rows (256 bytes) ahead of the row being read:
  // into L1 (0: none) and into L2; tile_vnni only (kVnniPrefetch* below)
  int64_t pf_l1_rows, pf_l2_rows;
};

// The VNNI kernel's prefetch distances (TileProblem::pf_*), chosen per call in w4a16_cpu.cpp by
// the CPU's vendor (cpuid, read once per process) and the rows. Intel, and AMD above
// kVnniPrefetchAmdMaxRows rows: 32 rows (8 KiB) into L1 and 256 (64 KiB) into L2, the scheme of the
// Sapphire-Rapids-class VM the kernel was written on (session 11). AMD at 1-2 rows (memory bound):
// L2 only, 128 rows ahead. why: on a Zen 5 VM (1 thread, cold weights, variant builds timed
// interleaved in one process; results/README.md, amd-epyc-zen5-2c, session 26) dropping the L1
// prefetch, L2 at 128 rows, was 1.03-1.06x at M = 1-2 on five benchmark shapes; L2 at 256 rows about
// level with 128, at 512-1024 worse on the small shapes (their prefetches run past the weights' end);
// no prefetch at all 0.84x on 4096x4096; from 4 rows on (compute bound) 0.98-1.04x, no clear gain,
// so the plan changes there. Not measured on Zen 4 (it takes the AMD plan) or Zen 3 (AVX2 kernel).
// kPrefetchL1Rows / kPrefetchL2Rows: the session-11 plan, also what tile_amx and tile_avx2_int16 use.
constexpr int64_t kPrefetchL1Rows = 32, kPrefetchL2Rows = 256;
constexpr int64_t kVnniPrefetchL1Amd = 0, kVnniPrefetchL2Amd = 128, kVnniPrefetchAmdMaxRows = 2;

// For tile_vnni and tile_avx2_int16 (16-bit activations only) xsum holds xscale * sum(xq)
// instead: the sum of the quantized activations the kernel multiplies (w4a16_vnni.cpp).
//
// Activations are pre-scaled once per call (w4a16_cpu.cpp, kFac): nibble j comes out of the AND
// as q * 16^j for j < 7, so xs[c*8 + j] = x[c*8 + kOrder[j]] * 16^-j; nibble 7 is shifted down
// instead (a shift avoids the int32 sign bit), so its factor is 1.

void tile_scalar(const TileProblem& p);
void tile_avx2(const TileProblem& p);    // compiled with target("avx2,fma")
void tile_avx512(const TileProblem& p);  // compiled with target("avx512f,...")
void tile_vnni(const TileProblem& p);    // target("avx512vnni,..."): int16-quantized x (p.xq)
void tile_avx2_int16(const TileProblem& p);  // target("avx2,..."): the same int16 x, vpmaddwd
// one row of the VNNI kernel's activations (K bfloat16 or float16 values as bits): per group of
// `len` k's xscale = max|x| / qmax, xq = round_half_even(x * (qmax / max|x|)), xsum = xscale *
// sum(xq); xq is written for k < K only (the caller zero-fills the padding to K8)
void quantize_row_vnni(const uint16_t* x, bool bf16, int64_t K, int64_t G, int64_t len, float qmax,
                       int16_t* xq, float* xscale, float* xsum);
// the same with AVX2 (w4a16_avx2_int16.cpp), bit for bit
void quantize_row_avx2(const uint16_t* x, bool bf16, int64_t K, int64_t G, int64_t len, float qmax,
                       int16_t* xq, float* xscale, float* xsum);
void tile_amx(const TileProblem& p);     // target("amx-tile,amx-bf16,..."): bfloat16 x only (p.xb)
// the AMX kernel from this many rows on, the VNNI kernel below (bfloat16 activations). Measured on
// a 2-core Sapphire-Rapids-class VM, 1 thread, cold weights, time AMX / VNNI: M = 4: 0.95-1.12
// (896x896 .. 4096x4096), M = 5: 0.80-1.03, M = 6: 0.71-0.96, M = 8: 0.57-0.82
constexpr int64_t kAmxMinRows = 5;

// The next group's scales and offsets of a tile (64 floats each) into L1, issued by the tile kernels
// as a group starts. why: they are rows of [G, N], a stride the hardware prefetcher does not follow,
// so without it a cold tile waits for two misses in every group's epilogue (cold 4096x4096, M = 1,
// AVX2 int16 kernel: 788 -> 568 us). __builtin_prefetch(., 0, 3) is prefetcht0 on x86.
inline void prefetch_next_group_scales(const TileProblem& p, int64_t gi) {
  const int64_t gn = gi + 1 < p.G ? gi + 1 : gi;
  for (int l = 0; l < 4; ++l) {
    __builtin_prefetch(p.s + gn * p.s_stride + l * 16, 0, 3);
    __builtin_prefetch(p.zs + gn * p.s_stride + l * 16, 0, 3);
  }
}

// The loop every FMA/VNNI tile kernel shares: each group of the tile, its rows in blocks of 4 and
// a tail of 1-3, as body(std::integral_constant<int, MR>{}, gi, k0, len, m0). always_inline: it
// is compiled into the caller, so under the caller's ISA target, and the body inlines there too.
template <typename Body>
__attribute__((always_inline)) inline void for_each_group_and_row_block(const TileProblem& p, Body&& body) {
  const int64_t len = p.G == 1 ? p.K8 : p.group;
  for (int64_t gi = 0; gi < p.G; ++gi) {
    const int64_t k0 = gi * len;
    int64_t m = 0;
    for (; m + 4 <= p.M; m += 4) body(std::integral_constant<int, 4>{}, gi, k0, len, m);
    switch (p.M - m) {
      case 3: body(std::integral_constant<int, 3>{}, gi, k0, len, m); break;
      case 2: body(std::integral_constant<int, 2>{}, gi, k0, len, m); break;
      case 1: body(std::integral_constant<int, 1>{}, gi, k0, len, m); break;
      default: break;
    }
  }
}

}  // namespace sqplus_cpu
