// AMX tile kernel: bfloat16 activations times 4-bit weights on the AMX-BF16 matrix unit
// (tdpbf16ps: C[16 x 16 fp32] += A[16 x 32 bf16] . B[32 x 16 bf16]), chosen at run time by
// w4a16_cpu.cpp for bfloat16 activations with enough rows (kAmxMinRows) when the CPU has AMX and
// the kernel grants this process the tile state. Layout: w4a16_cpu.h.
//
// Why: at a few rows and more the AVX-512 FMA kernel is bound by its vector ports (a decode and
// an FMA per 16 weights and row), far below the memory's speed; one tdpbf16ps does 8192
// multiply-adds. The weights are decoded once per 64-column tile and 32 k's into AMX's B format
// (pairs of consecutive k per 32-bit lane, 16 columns per 64-byte row) in a 4 KiB buffer:
//     t  = w >> 4p                         (pair p = k 2p, 2p+1 of an 8-k chunk, w4a16_cpu.h)
//     wb = (t & 0x000F000F) | 0x43004300    (bfloat16 128 + q in each half-word, exact)
// one shift and one vpternlogd per 32 weights, shared by up to 16 rows. The 128 offset and the
// zero point come out per group from the tile's fp32 sums:
//     sum_k x (q - z) s = s * C + (-z s - 128 s) * xsum,   C = sum_k x (128 + q)
// (C carries 128 * xsum, so its fp32 rounding is ~128 ulps of sum|x|: ~1e-5 relative, far below
// the bfloat16 output's 4e-3.) Groups must be a multiple of 32 k's (the tile depth); the caller
// sends other shapes, and fewer than kAmxMinRows rows, to the VNNI kernel (w4a16_vnni.cpp).
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "w4a16_cpu.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma,amx-tile,amx-bf16")

namespace sqplus_cpu {
namespace {

constexpr int NV = 4;   // a 64-column tile = 4 column blocks of 16 = 4 C tiles
constexpr int kDepth = 32;  // k's per tdpbf16ps

// tmm0..3: C of column blocks 0..3; tmm4: A (rows x 32 bf16); tmm5, tmm6: B (16 x 16 pairs)
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

void configure(int rows) {
  TileConfig c;
  for (int t = 0; t < NV; ++t) c.colsb[t] = 64, c.rows[t] = static_cast<uint8_t>(rows);  // C
  c.colsb[4] = 64, c.rows[4] = static_cast<uint8_t>(rows);                               // A
  for (int t = 5; t < 7; ++t) c.colsb[t] = 64, c.rows[t] = 16;                           // B
  _tile_loadconfig(&c);
}

// B rows of one column block v for k = k0 .. k0+31 (4 chunks of 8): row r = pair r (k0 + 2r, +1)
inline void decode_b(const int32_t* q, int v, uint16_t* b) {
  const __m512i mask = _mm512_set1_epi32(0x000F000F);
  const __m512i one28 = _mm512_set1_epi32(0x43004300);  // bfloat16 128.0 in both halves
  for (int c = 0; c < kDepth / kChunkK; ++c) {
    const __m512i w = _mm512_loadu_si512(q + c * kTileN + v * 16);
    for (int pr = 0; pr < 4; ++pr) {
      const __m512i t = pr == 0 ? w : _mm512_srl_epi32(w, _mm_cvtsi32_si128(4 * pr));
      _mm512_store_si512(b + (c * 4 + pr) * 32, _mm512_ternarylogic_epi32(t, mask, one28, 0xEA));
    }
  }
}

// GCC's tile intrinsics are asm statements without a memory clobber: to the compiler the decoded
// B rows are never read and the stored C tile never written. A compiler barrier after the
// decode and after the store keeps those stores and loads where they are.
inline void compiler_barrier() { asm volatile("" ::: "memory"); }

}  // namespace

namespace {

// C tiles 0..3 (rows m0 .. m0+mb of group gi) into the tile's fp32 accumulators:
// acc += s * C + (-z s - 128 s) * xsum
void add_group(const TileProblem& p, int64_t gi, int64_t m0, int mb) {
  alignas(64) float cbuf[16 * 16];
  const float* s = p.s + gi * p.s_stride;
  const float* zs = p.zs + gi * p.s_stride;
  const __m512 c128 = _mm512_set1_ps(128.0f);
  for (int v = 0; v < NV; ++v) {
    compiler_barrier();  // the previous block's cbuf loads stay before this store overwrites it
    switch (v) {  // tile numbers are immediates
      case 0: _tile_stored(0, cbuf, 64); break;
      case 1: _tile_stored(1, cbuf, 64); break;
      case 2: _tile_stored(2, cbuf, 64); break;
      default: _tile_stored(3, cbuf, 64); break;
    }
    compiler_barrier();
    const __m512 sv = _mm512_loadu_ps(s + v * 16);
    const __m512 zv = _mm512_fnmadd_ps(sv, c128, _mm512_loadu_ps(zs + v * 16));  // -z s - 128 s
    for (int r = 0; r < mb; ++r) {
      float* o = p.acc + (m0 + r) * kTileN + v * 16;
      __m512 ov = _mm512_fmadd_ps(_mm512_load_ps(cbuf + r * 16), sv, _mm512_loadu_ps(o));
      ov = _mm512_fmadd_ps(zv, _mm512_set1_ps(p.xsum[(m0 + r) * p.G + gi]), ov);
      _mm512_storeu_ps(o, ov);
    }
  }
}

void zero_c() {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
}

// Up to 16 rows: each 32-k step decodes its 4 B tiles into two alternating buffers, interleaved
// with the tdpbf16ps of the previous one, and the weights are read once.
void rows_upto16(const TileProblem& p, int64_t len) {
  alignas(64) uint16_t bbuf[2][16 * 32];
  const int mb = static_cast<int>(p.M);
  configure(mb);
  for (int64_t gi = 0; gi < p.G; ++gi) {
    const int64_t k0 = gi * len;
    zero_c();
    for (int64_t k = k0; k < k0 + len; k += kDepth) {
      const int32_t* q = p.qw + (k / kChunkK) * kTileN;
      // this step reads 4 chunks (16 lines): all of them 32 chunks (8 KiB) ahead into L1 and
      // 256 chunks (64 KiB) ahead into L2 (one line 8 chunks ahead was too little: at 4-8 rows
      // on 4096x4096 the kernel waited on memory, 1.3 ms at any row count)
      for (int l = 0; l < 16; ++l) {
        _mm_prefetch(reinterpret_cast<const char*>(q + kPrefetchL1Rows * kTileN + l * 16), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(q + kPrefetchL2Rows * kTileN + l * 16), _MM_HINT_T1);
      }
      _tile_loadd(4, p.xb + k, p.K8 * 2);
      // the column blocks unrolled: tile numbers are immediates
      decode_b(q, 0, bbuf[0]);
      compiler_barrier();
      _tile_loadd(5, bbuf[0], 64);
      decode_b(q, 1, bbuf[1]);
      compiler_barrier();
      _tile_dpbf16ps(0, 4, 5);
      _tile_loadd(6, bbuf[1], 64);
      compiler_barrier();  // bbuf[0] is rewritten only after tile 5 was loaded from it
      decode_b(q, 2, bbuf[0]);
      compiler_barrier();
      _tile_dpbf16ps(1, 4, 6);
      _tile_loadd(5, bbuf[0], 64);
      compiler_barrier();
      decode_b(q, 3, bbuf[1]);
      compiler_barrier();
      _tile_dpbf16ps(2, 4, 5);
      _tile_loadd(6, bbuf[1], 64);
      _tile_dpbf16ps(3, 4, 6);
      compiler_barrier();
    }
    add_group(p, gi, 0, mb);
  }
}

// More rows: a group's B tiles are decoded once into a buffer (len/32 x 4 tiles of 1 KiB: 16 KiB
// at g = 128) and every 16-row block reads them from there, so the decode is not repeated per
// row block.
void rows_over16(const TileProblem& p, int64_t len) {
  thread_local std::vector<uint16_t> gbuf;
  const int64_t steps = len / kDepth;
  gbuf.resize(steps * NV * 16 * 32 + 32);
  uint16_t* g = reinterpret_cast<uint16_t*>((reinterpret_cast<uintptr_t>(gbuf.data()) + 63) & ~uintptr_t{63});
  int configured = 0;
  for (int64_t gi = 0; gi < p.G; ++gi) {
    const int64_t k0 = gi * len;
    for (int64_t st = 0; st < steps; ++st)
      for (int v = 0; v < NV; ++v)
        decode_b(p.qw + ((k0 + st * kDepth) / kChunkK) * kTileN, v, g + (st * NV + v) * 512);
    compiler_barrier();
    for (int64_t m0 = 0; m0 < p.M; m0 += 16) {
      const int mb = static_cast<int>(std::min<int64_t>(16, p.M - m0));
      if (mb != configured) configure(configured = mb);
      const uint16_t* xa = p.xb + m0 * p.K8 + k0;
      zero_c();
      for (int64_t st = 0; st < steps; ++st) {
        const uint16_t* b = g + st * NV * 512;
        _tile_loadd(4, xa + st * kDepth, p.K8 * 2);
        _tile_loadd(5, b, 64);
        _tile_loadd(6, b + 512, 64);
        _tile_dpbf16ps(0, 4, 5);
        _tile_loadd(5, b + 1024, 64);
        _tile_dpbf16ps(1, 4, 6);
        _tile_loadd(6, b + 1536, 64);
        _tile_dpbf16ps(2, 4, 5);
        _tile_dpbf16ps(3, 4, 6);
      }
      add_group(p, gi, m0, mb);
    }
  }
}

}  // namespace

void tile_amx(const TileProblem& p) {
  const int64_t len = p.G == 1 ? p.K8 : p.group;  // a multiple of 32 (the caller checks)
  if (p.M <= 16)
    rows_upto16(p, len);
  else
    rows_over16(p, len);
  _tile_release();
}

}  // namespace sqplus_cpu

#pragma GCC pop_options
