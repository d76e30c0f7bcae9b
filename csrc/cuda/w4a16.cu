// CUDA implementation of sqplus::w4a16_pack and sqplus::w4a16_gemm (schemas in csrc/ops.cpp).
//
// Packed layout (CUDA only; the CPU has its own). The unit is a "super-tile" of 64 output columns
// (a strip) by 16 k: 512 bytes, read by one warp as one 16-byte load per lane. It feeds 8
// mma.m16n8k16 B operands (8 n-tiles of 8 columns) directly, so the kernel never shuffles weights:
//   qweight int32 [N/64, K/16, 128]   index [strip][kstep][lane*4 + w], lane = 4*g + t (g = lane/4,
//     t = lane%4), word w holds n-tiles 2w and 2w+1 of the strip, i.e. columns
//     c0 = strip*64 + 16w + g and c1 = c0 + 8, at k = kstep*16 + 4t + {0,1,2,3}:
//       nibble 0,4,1,5 (bit offsets 0,16,4,20) = q[c0][k+0], q[c0][k+1], q[c0][k+2], q[c0][k+3]
//       nibble 2,6,3,7 (bit offsets 8,24,12,28) = the same k for c1.
//     So (word >> 4i) & 0x000f000f puts two consecutive k of one column into the two 16-bit halves,
//     and OR-ing the exponent of 1024 (fp16) / 128 (bf16) turns them into floats 1024+q / 128+q in
//     one LOP3 (the magic-number trick of Marlin / FasterTransformer), with no int->float convert.
//   The mma's logical k (2t, 2t+1, 2t+8, 2t+9) maps to actual k (4t .. 4t+3) for B and for A alike,
//   so each lane reads its activations as one 8-byte load per row. A sum over k does not care.
//   scales_p [K/g, N] (x's dtype) and zeros_p uint8 [K/g, N]: row = group, columns permuted inside
//     each strip of 64: column c = 8j + g is stored at position 8g + j, so lane g's 8 columns
//     (n-tiles j = 0..7) are one 16-byte (scales) and one 8-byte (zeros) load.
// Dequantization: w = (q - z) * s. (1024+q) - (1024+z) is exact in fp16 (and 128+q - (128+z) in
// bf16), so only the product with s rounds, exactly as the float reference rounds when cast.
//
// Paths of w4a16_gemm (x [M, K] after flattening; float32 x always takes the cuBLAS path with
// exact fp32 weights):
//   M <= 16 (kernel 0; kernel 1 forces it): "stream" kernel. Grid = (N/64 strips, split-K, M blocks of
//     16 or 32 rows). Each warp owns a batch of 8 k-steps of one strip, issues its 8 x 512 B weight
//     loads and the batch's scales/zeros before using any, dequantizes in registers and issues
//     8 mma.sync per k-step (fp32 accumulate); rows >= M are zero and never loaded. Warps reduce
//     through shared memory; split-K blocks write fp32 partials and the last block of a strip
//     (atomic counter, which it resets) sums them in a fixed order, adds the bias, writes x.dtype.
//     One launch per call. Measured (benchmarks/results/kernels_cuda.md): issue-bound, not yet at
//     HBM bandwidth (see there for why and what is next).
//   M >= 17 (kernel 0; kernel 2 forces it): "dequant" kernel writes W [N, K] in x.dtype, then cuBLAS (at::linear). The extra pass
//     costs 2*N*K bytes of traffic: ~0.75x cuBLAS at M=1024, ~0.9x at M=4096. (vLLM's AWQ path does
//     the same above 256 tokens.) A fused wgmma kernel would remove that cost.
// Narrow ATen headers (not ATen/ATen.h): they halve the host compile time.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/zeros.h>
// Only c10/cuda headers: ATen/cuda/CUDAContext.h pulls cuSPARSE/cuBLAS headers that a bare nvcc lacks.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>
#include <string>
#include <mutex>
#include <vector>

namespace sqplus_cuda {

// Error messages format integers with std::to_string, never through TORCH_CHECK's ostream: on the
// H100 image, `ostream << long` inside this extension crashed (a libstdc++ locale facet mismatch
// between the extension's build and the process), turning a clear error into a segfault.

constexpr int kStrip = 64;     // output columns per super-tile
constexpr int kKStep = 16;     // k per super-tile
constexpr int kWarps = 4;      // warps per block of the stream kernel

// ---------------------------------------------------------------------------------------------
// dtype traits: magic exponent and the mma instruction
template <typename T> struct Traits;
template <> struct Traits<__half> {
  static constexpr uint32_t kMagic = 0x6400;  // 1024.0: ulp 1, so 1024 + q is exact
  using T2 = __half2;
};
template <> struct Traits<__nv_bfloat16> {
  static constexpr uint32_t kMagic = 0x4300;  // 128.0: ulp 1 in bf16
  using T2 = __nv_bfloat162;
};

__device__ __forceinline__ uint32_t as_u32(__half2 v) { return *reinterpret_cast<uint32_t*>(&v); }
__device__ __forceinline__ uint32_t as_u32(__nv_bfloat162 v) {
  return *reinterpret_cast<uint32_t*>(&v);
}
template <typename T2> __device__ __forceinline__ T2 from_u32(uint32_t u) {
  return *reinterpret_cast<T2*>(&u);
}

template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1);
template <>
__device__ __forceinline__ void mma16816<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                 uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4],
                                                        uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// Weights are read exactly once: keep them out of L1.
__device__ __forceinline__ uint4 ld_stream(const uint4* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// Two consecutive-k values of one column: (word >> shift) & 0x000f000f | magic, minus (magic + z),
// times s. z2 holds (magic | z) in both halves, s2 the scale in both halves.
template <typename T>
__device__ __forceinline__ uint32_t dq2(uint32_t word, int shift, uint32_t z2, uint32_t s2) {
  using T2 = typename Traits<T>::T2;
  constexpr uint32_t magic2 = Traits<T>::kMagic * 0x10001u;
  // (w >> shift) & mask | magic as ONE LOP3: a LOP3 takes one immediate, so ptxas split the plain
  // C++ expression into two; with both constants in registers (hoisted) it is one instruction.
  uint32_t v, mask = 0x000f000fu, mg = magic2;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(v) : "r"(word >> shift), "r"(mask), "r"(mg));
  T2 r = __hmul2(__hsub2(from_u32<T2>(v), from_u32<T2>(z2)), from_u32<T2>(s2));
  return as_u32(r);
}

template <typename T>
__device__ __forceinline__ uint32_t splat(T v) {
  uint16_t u = *reinterpret_cast<uint16_t*>(&v);
  return (uint32_t)u * 0x10001u;
}

// ---------------------------------------------------------------------------------------------
// Stream kernel. Grid = (N/64 strips, split-K, M blocks of 16*MT rows); 4 warps per block.
// Each warp owns nb batches of 8 consecutive k-steps (8-aligned) of one strip, and issues all 8
// weight loads of a batch (4 KB per warp) plus the batch's scales/zeros (at most 4 groups, since
// group % 32 == 0) before using any of them: one DRAM round trip per batch. Decode is latency-bound
// otherwise (a first version that walked k-steps 4 at a time and fetched scales on first use
// reached 11 us for 4096x4096 at M=1: ~4 dependent DRAM latencies per warp).
// The block's slice of x (16*MT rows x 512*nb k) is staged in shared memory (rows >= M zero).
constexpr int kBatch = 8;  // k-steps per batch
constexpr int kXPad = 16;  // row pad (elements): row stride = 32 mod 128 bytes, no extra conflicts

template <typename T, int MT>
__global__ void __launch_bounds__(kWarps * 32, MT == 1 ? 4 : 2)  // MT=1: <= 128 regs, 16 warps/SM
    w4a16_stream_kernel(const T* __restrict__ x, const uint4* __restrict__ qw,
                        const T* __restrict__ scales, const uint8_t* __restrict__ zeros,
                        const T* __restrict__ bias, T* __restrict__ out, float* __restrict__ partial,
                        int* __restrict__ counters, int M, int N, int K, int kpg, unsigned kpg_magic,
                        int nb) {
  constexpr int ROWS = 16 * MT;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int kchunk = kWarps * nb * kBatch * kKStep;  // k values of x per block
  const int xstride = kchunk + kXPad;
  T* xs = reinterpret_cast<T*>(smem_raw);                                       // [ROWS][xstride]
  float* red = reinterpret_cast<float*>(smem_raw + (size_t)ROWS * xstride * sizeof(T));  // [ROWS][68]
  __shared__ int is_last;

  const int strip = blockIdx.x, split = blockIdx.y, mblock = blockIdx.z;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const int KS = K / kKStep;
  const int m0 = mblock * ROWS;
  const int kb = split * kWarps * nb * kBatch;  // first k-step of the block
  const int wks = kb + warp * nb * kBatch;      // first k-step of this warp
  const uint4* qp = qw + (size_t)strip * KS * 32 + lane;
  const int col_p = strip * kStrip + 8 * g;  // permuted position of this lane's 8 columns

  uint4 bw[kBatch];
  uint4 sv[4];
  uint2 zv[4];
  auto issue = [&](int bks) {  // weights, scales, zeros of the batch starting at k-step bks
#pragma unroll
    for (int u = 0; u < kBatch; ++u)
      if (bks + u < KS) bw[u] = ld_stream(qp + (size_t)(bks + u) * 32);
    const int g0 = (int)__umulhi((unsigned)bks, kpg_magic);
    const int last = min(bks + kBatch, KS) - 1;
#pragma unroll
    for (int i = 0; i < 4; ++i)
      if (bks < KS && (g0 + i) * kpg <= last) {
        sv[i] = __ldg(reinterpret_cast<const uint4*>(scales + (size_t)(g0 + i) * N + col_p));
        zv[i] = __ldg(reinterpret_cast<const uint2*>(zeros + (size_t)(g0 + i) * N + col_p));
      }
  };
  issue(wks);

  // Stage x: 16-byte copies of the rows < M only (the A loads below skip the others); k past K
  // is zero. ncu on v2 (all 16 rows staged, zero-filled, with run-time divisions) showed the
  // kernel issue-bound at ~2700 instructions per warp; this loop was a good part of that.
  const int rows = min(ROWS, M - m0);
  {
    const int k0 = kb * kKStep;
    for (int r = 0; r < rows; ++r)
      for (int c = threadIdx.x * 8; c < kchunk; c += kWarps * 32 * 8) {
        uint4 v = make_uint4(0u, 0u, 0u, 0u);
        if (k0 + c < K) v = __ldg(reinterpret_cast<const uint4*>(x + (size_t)(m0 + r) * K + k0 + c));
        *reinterpret_cast<uint4*>(xs + (size_t)r * xstride + c) = v;
      }
    for (int i = threadIdx.x; i < rows * (kStrip + 4); i += blockDim.x) red[i] = 0.f;
  }
  __syncthreads();

  float acc[MT][8][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[mt][j][r] = 0.f;

  uint32_t s2[8], z2[8];
  for (int b = 0; b < nb; ++b) {
    const int bks = wks + b * kBatch;
    if (bks >= KS) break;
    if (b > 0) issue(bks);
    const int g0 = (int)__umulhi((unsigned)bks, kpg_magic);
    int cur = -1;
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int ks = bks + u;
      if (ks < KS) {
        const int slot = (int)__umulhi((unsigned)ks, kpg_magic) - g0;  // ks / kpg, one IMAD.HI
        if (slot != cur) {  // uniform branch: the group changed (g=32: every 2 steps)
          cur = slot;
          // select without run-time indexing (keeps sv/zv in registers)
          const uint4 s4 = slot == 0 ? sv[0] : slot == 1 ? sv[1] : slot == 2 ? sv[2] : sv[3];
          const uint2 zz = slot == 0 ? zv[0] : slot == 1 ? zv[1] : slot == 2 ? zv[2] : zv[3];
          const uint32_t sw[4] = {s4.x, s4.y, s4.z, s4.w};
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            s2[j] = ((sw[j >> 1] >> (16 * (j & 1))) & 0xffffu) * 0x10001u;
            const uint32_t zb = ((j < 4 ? zz.x : zz.y) >> (8 * (j & 3))) & 0xffu;
            z2[j] = (Traits<T>::kMagic | zb) * 0x10001u;
          }
        }
        // A fragments from shared memory: rows g, g+8 of each m-tile, k = 4t..4t+3 of this step,
        // loaded word by word straight into mma operand order (a0 a1 a2 a3): two 8-byte loads put
        // them in (a0 a2)(a1 a3) order and the SASS then spent 4 MOVs per HMMA re-forming the quad.
        uint32_t afr[MT][4];
        const int kc = (ks - kb) * kKStep + 4 * t;
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const int r = mt * 16 + g + 8 * (i & 1);
            afr[mt][i] = r < rows ? *reinterpret_cast<const uint32_t*>(xs + (size_t)r * xstride + kc +
                                                                        2 * (i >> 1))
                                  : 0u;
          }
        const uint32_t words[4] = {bw[u].x, bw[u].y, bw[u].z, bw[u].w};
#pragma unroll
        for (int w = 0; w < 4; ++w) {
          const uint32_t b00 = dq2<T>(words[w], 0, z2[2 * w], s2[2 * w]);
          const uint32_t b01 = dq2<T>(words[w], 4, z2[2 * w], s2[2 * w]);
          const uint32_t b10 = dq2<T>(words[w], 8, z2[2 * w + 1], s2[2 * w + 1]);
          const uint32_t b11 = dq2<T>(words[w], 12, z2[2 * w + 1], s2[2 * w + 1]);
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            mma16816<T>(acc[mt][2 * w], afr[mt], b00, b01);
            mma16816<T>(acc[mt][2 * w + 1], afr[mt], b10, b11);
          }
        }
      }
    }
  }

  // C fragment: c0,c1 = (row g, cols 2t, 2t+1), c2,c3 = (row g+8, same cols) of n-tile j.
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int row = mt * 16 + g + 8 * (r >> 1);
        if (m0 + row < M) atomicAdd(&red[row * (kStrip + 4) + 8 * j + 2 * t + (r & 1)], acc[mt][j][r]);
      }
  __syncthreads();

  const int nsplit = gridDim.y;
  if (nsplit == 1) {
    for (int i = threadIdx.x; i < rows * kStrip; i += blockDim.x) {
      const int row = i / kStrip, c = i % kStrip, n = strip * kStrip + c;
      float v = red[row * (kStrip + 4) + c];
      if (bias) v += (float)bias[n];
      out[(size_t)(m0 + row) * N + n] = (T)v;
    }
    return;
  }
  for (int i = threadIdx.x; i < rows * kStrip; i += blockDim.x) {
    const int row = i / kStrip, c = i % kStrip, n = strip * kStrip + c;
    partial[((size_t)split * M + m0 + row) * N + n] = red[row * (kStrip + 4) + c];
  }
  __threadfence();
  __syncthreads();
  int* counter = counters + (size_t)mblock * gridDim.x + strip;
  if (threadIdx.x == 0) is_last = atomicAdd(counter, 1) == nsplit - 1;
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  for (int i = threadIdx.x; i < rows * kStrip; i += blockDim.x) {
    const int row = i / kStrip, c = i % kStrip, n = strip * kStrip + c;
    float v = 0.f;
    for (int s = 0; s < nsplit; ++s) v += __ldcg(partial + ((size_t)s * M + m0 + row) * N + n);
    if (bias) v += (float)bias[n];
    out[(size_t)(m0 + row) * N + n] = (T)v;
  }
  if (threadIdx.x == 0) *counter = 0;  // ready for the next call, no memset needed
}

// ---------------------------------------------------------------------------------------------
// Dequantize the packed weights to W [N, K] in T (for the cuBLAS path and for tests).
template <typename T>
__global__ void w4a16_dequant_kernel(const uint4* __restrict__ qw, const T* __restrict__ scales,
                                     const uint8_t* __restrict__ zeros, T* __restrict__ wout, int N,
                                     int K, int kpg) {
  const int KS = K / kKStep;
  const long total = (long)(N / kStrip) * KS;  // super-tiles, one per warp
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  for (long tile = (blockIdx.x * (long)blockDim.x + threadIdx.x) / 32; tile < total;
       tile += (long)gridDim.x * blockDim.x / 32) {
    const int strip = tile / KS, ks = tile % KS;
    const uint4 b = ld_stream(qw + tile * 32 + lane);
    const int grp = ks / kpg;
    const int col_p = strip * kStrip + 8 * g;
    const uint4 sv = __ldg(reinterpret_cast<const uint4*>(scales + (size_t)grp * N + col_p));
    // float scales: 8 of them are 32 bytes, the second half here (unused for 16-bit T)
    uint4 sv2 = make_uint4(0u, 0u, 0u, 0u);
    if constexpr (sizeof(T) == 4)
      sv2 = __ldg(reinterpret_cast<const uint4*>(scales + (size_t)grp * N + col_p) + 1);
    const uint2 zv = __ldg(reinterpret_cast<const uint2*>(zeros + (size_t)grp * N + col_p));
    const uint32_t sw[4] = {sv.x, sv.y, sv.z, sv.w};
    const uint32_t words[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
    for (int w = 0; w < 4; ++w) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int j = 2 * w + h;
        const int n = strip * kStrip + 8 * j + g;
        if constexpr (std::is_same_v<T, float>) {  // float activations: exact (q - z) * s in fp32
          const float s = reinterpret_cast<const float*>(&sv)[j & 3];  // scales are float here (32 B)
          const float s_hi = reinterpret_cast<const float*>(&sv2)[j & 3];
          const float sc = j < 4 ? s : s_hi;
          const float z = (float)(((j < 4 ? zv.x : zv.y) >> (8 * (j & 3))) & 0xffu);
          const uint32_t wd = words[w] >> (8 * h);
          float4 v;
          v.x = ((float)((wd >> 0) & 15u) - z) * sc;
          v.y = ((float)((wd >> 16) & 15u) - z) * sc;
          v.z = ((float)((wd >> 4) & 15u) - z) * sc;
          v.w = ((float)((wd >> 20) & 15u) - z) * sc;
          *reinterpret_cast<float4*>(wout + (size_t)n * K + ks * kKStep + 4 * t) = v;
          continue;
        } else {
        const uint32_t s2 = ((sw[j >> 1] >> (16 * (j & 1))) & 0xffffu) * 0x10001u;
        const uint32_t zb = ((j < 4 ? zv.x : zv.y) >> (8 * (j & 3))) & 0xffu;
        const uint32_t z2 = (Traits<T>::kMagic | zb) * 0x10001u;
        uint2 v;
        v.x = dq2<T>(words[w], 8 * h, z2, s2);      // k = 4t, 4t+1
        v.y = dq2<T>(words[w], 8 * h + 4, z2, s2);  // k = 4t+2, 4t+3
        *reinterpret_cast<uint2*>(wout + (size_t)n * K + ks * kKStep + 4 * t) = v;
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Pack: one thread per int32 word of qweight; and the permuted scales/zeros.
__global__ void pack_q_kernel(const uint8_t* __restrict__ q, uint32_t* __restrict__ qw, int N,
                              int K) {
  const int KS = K / kKStep;
  const long total = (long)N * K / 8;
  for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < total;
       i += (long)gridDim.x * blockDim.x) {
    const int w = i & 3, lane = (i >> 2) & 31;
    const long tile = i >> 7;
    const int strip = tile / KS, ks = tile % KS;
    const int g = lane >> 2, t = lane & 3;
    const int c0 = strip * kStrip + 16 * w + g, c1 = c0 + 8;
    const int k = ks * kKStep + 4 * t;
    const uint8_t* q0 = q + (size_t)c0 * K + k;
    const uint8_t* q1 = q + (size_t)c1 * K + k;
    uint32_t v = 0;
    v |= (uint32_t)(q0[0] & 15) << 0;
    v |= (uint32_t)(q0[1] & 15) << 16;
    v |= (uint32_t)(q0[2] & 15) << 4;
    v |= (uint32_t)(q0[3] & 15) << 20;
    v |= (uint32_t)(q1[0] & 15) << 8;
    v |= (uint32_t)(q1[1] & 15) << 24;
    v |= (uint32_t)(q1[2] & 15) << 12;
    v |= (uint32_t)(q1[3] & 15) << 28;
    qw[i] = v;
  }
}

// src [N, G] -> dst [G, N] with columns permuted inside each strip (c = 8j+g stored at 8g+j).
template <typename S>
__global__ void pack_meta_kernel(const S* __restrict__ src, S* __restrict__ dst, int N, int G) {
  const long total = (long)N * G;
  for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < total;
       i += (long)gridDim.x * blockDim.x) {
    const int grp = i / N, p = i % N;  // destination index
    const int strip = p / kStrip, pp = p % kStrip;
    const int c = strip * kStrip + 8 * (pp % 8) + pp / 8;  // pp = 8g + j -> c = 8j + g
    dst[i] = src[(size_t)c * G + grp];
  }
}

// ---------------------------------------------------------------------------------------------
// Host side
static int grid_for(long work, int threads) {
  long b = (work + threads - 1) / threads;
  return (int)std::min<long>(std::max<long>(b, 1), 65535L * 8);
}

static void check_group(int64_t K, int64_t group_size) {
  // % 32: a batch of 8 k-steps then spans at most 4 groups (the stream kernel's scale slots)
  TORCH_CHECK(group_size > 0 && group_size % 32 == 0 && K % group_size == 0,
              "sqplus w4a16 (CUDA): group size ", std::to_string(group_size), " must be a multiple of 32 dividing K=",
              std::to_string(K), " (use -1 for one group per row)");
}

std::vector<at::Tensor> w4a16_pack_cuda(const at::Tensor& q, const at::Tensor& scales,
                                        const at::Tensor& zeros, int64_t group_size) {
  TORCH_CHECK(q.is_cuda() && q.dim() == 2 && q.scalar_type() == at::kByte,
              "sqplus w4a16_pack (CUDA): q must be a uint8 [N, K] CUDA tensor");
  const int64_t N = q.size(0), K = q.size(1);
  if (group_size == -1) group_size = K;
  check_group(K, group_size);
  TORCH_CHECK(N % kStrip == 0, "sqplus w4a16_pack (CUDA): N=", std::to_string(N), " must be a multiple of 64");
  const int64_t G = K / group_size;
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == N && scales.size(1) == G,
              "sqplus w4a16_pack (CUDA): scales must be [N, K/g] = [", std::to_string(N), ", ", std::to_string(G), "]");
  TORCH_CHECK(zeros.dim() == 2 && zeros.size(0) == N && zeros.size(1) == G,
              "sqplus w4a16_pack (CUDA): zeros must be [N, K/g] = [", std::to_string(N), ", ", std::to_string(G), "]");
  TORCH_CHECK(scales.scalar_type() == at::kHalf || scales.scalar_type() == at::kBFloat16 ||
                  scales.scalar_type() == at::kFloat,
              "sqplus w4a16_pack (CUDA): scales must be float16, bfloat16 or float32");
  c10::cuda::CUDAGuard guard(q.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  auto qc = q.contiguous();
  auto sc = scales.contiguous();
  auto zc = zeros.to(q.device(), at::kByte).contiguous();
  auto qweight = at::empty({N / kStrip, K / kKStep, 128}, q.options().dtype(at::kInt));
  const long words = N * K / 8;
  pack_q_kernel<<<grid_for(words, 256), 256, 0, stream>>>(
      qc.data_ptr<uint8_t>(), reinterpret_cast<uint32_t*>(qweight.data_ptr<int32_t>()), N, K);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  auto scales_p = at::empty({G, N}, sc.options());
  auto zeros_p = at::empty({G, N}, zc.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, sc.scalar_type(), "w4a16_pack", [&] {
    pack_meta_kernel<scalar_t><<<grid_for(N * G, 256), 256, 0, stream>>>(
        sc.data_ptr<scalar_t>(), scales_p.data_ptr<scalar_t>(), N, G);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  pack_meta_kernel<uint8_t><<<grid_for(N * G, 256), 256, 0, stream>>>(
      zc.data_ptr<uint8_t>(), zeros_p.data_ptr<uint8_t>(), N, G);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {qweight, scales_p, zeros_p};
}

// Split-K counters: zeroed once, each use leaves them zero again.
static int* counters_for(const at::Device& dev, int64_t n) {
  static std::mutex mu;
  static std::vector<at::Tensor> cache(64);
  std::lock_guard<std::mutex> lock(mu);
  auto& c = cache.at(dev.index());
  if (!c.defined() || c.numel() < n)
    c = at::zeros({std::max<int64_t>(n, 4096)}, at::TensorOptions().device(dev).dtype(at::kInt));
  return c.data_ptr<int>();
}

static int num_sms(int dev) {
  static int cached[64] = {0};
  if (!cached[dev]) C10_CUDA_CHECK(cudaDeviceGetAttribute(&cached[dev], cudaDevAttrMultiProcessorCount, dev));
  return cached[dev];
}

template <typename T, int MT>
static void launch_stream(const at::Tensor& x, const at::Tensor& qw, const at::Tensor& s,
                          const at::Tensor& z, const c10::optional<at::Tensor>& bias,
                          at::Tensor& out, int64_t M, int64_t N, int64_t K, int64_t group) {
  const int strips = N / kStrip, KS = K / kKStep;
  const int mblocks = (M + 16 * MT - 1) / (16 * MT);
  const int batches = (KS + kBatch - 1) / kBatch;  // per strip
  // One batch per warp unless that makes more than ~4 waves of 16 warps per SM (then 2, halving
  // split-K partial traffic); shared memory for x caps nb at 2/MT.
  int nb = (long)strips * mblocks * batches > 4L * num_sms(x.get_device()) * 16 ? 2 : 1;
  nb = std::max(1, std::min(nb, 2 / MT));
  const int splits = (batches + kWarps * nb - 1) / (kWarps * nb);
  const int kchunk = kWarps * nb * kBatch * kKStep;
  const size_t smem = (size_t)16 * MT * (kchunk + kXPad) * sizeof(T) + 16 * MT * (kStrip + 4) * 4;
  TORCH_CHECK(smem <= 48 * 1024, "sqplus w4a16_gemm (CUDA): internal: shared memory ", std::to_string(smem));
  at::Tensor partial;
  int* counters = nullptr;
  if (splits > 1) {
    partial = at::empty({splits, M, N}, x.options().dtype(at::kFloat));
    counters = counters_for(x.device(), (int64_t)strips * mblocks);
  }
  dim3 grid(strips, splits, mblocks);
  auto stream = c10::cuda::getCurrentCUDAStream();
  w4a16_stream_kernel<T, MT><<<grid, kWarps * 32, smem, stream>>>(
      reinterpret_cast<const T*>(x.data_ptr()), reinterpret_cast<const uint4*>(qw.data_ptr()),
      reinterpret_cast<const T*>(s.data_ptr()), z.data_ptr<uint8_t>(),
      bias ? reinterpret_cast<const T*>(bias->data_ptr()) : nullptr,
      reinterpret_cast<T*>(out.data_ptr()), splits > 1 ? partial.data_ptr<float>() : nullptr,
      counters, (int)M, (int)N, (int)K, (int)(group / kKStep),
      (unsigned)((0x100000000ull + group / kKStep - 1) / (group / kKStep)), nb);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
static at::Tensor dequant(const at::Tensor& qw, const at::Tensor& s, const at::Tensor& z,
                          int64_t N, int64_t K, int64_t group, at::TensorOptions opts) {
  auto w = at::empty({N, K}, opts);
  const long warps = (N / kStrip) * (K / kKStep);
  auto stream = c10::cuda::getCurrentCUDAStream();
  w4a16_dequant_kernel<T><<<grid_for(warps * 32, 256), 256, 0, stream>>>(
      reinterpret_cast<const uint4*>(qw.data_ptr()), reinterpret_cast<const T*>(s.data_ptr()),
      z.data_ptr<uint8_t>(), reinterpret_cast<T*>(w.data_ptr()), N, K, (int)(group / kKStep));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return w;
}

// Rows at or above which kernel 0 takes the cuBLAS path (measured: M=32 stream 2x slower than it).
// The Python CUDA backend may choose another threshold; it then passes kernel 1 or 2 per call.
constexpr int64_t kDequantM = 17;

// kernel (the `path`): 0 by rows, 1 stream kernel, 2 dequant + cuBLAS (csrc/ops.cpp).
at::Tensor w4a16_gemm_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                           const at::Tensor& zeros, int64_t group_size,
                           const c10::optional<at::Tensor>& bias, int64_t path) {
  TORCH_CHECK(path >= 0 && path <= 2, "sqplus w4a16_gemm (CUDA): kernel must be 0 (by rows), 1 (stream) "
              "or 2 (dequant + cuBLAS), got ", std::to_string(path));
  TORCH_CHECK(x.is_cuda(), "sqplus w4a16_gemm (CUDA): x must be on CUDA");
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16 ||
                  x.scalar_type() == at::kFloat,
              "sqplus w4a16_gemm (CUDA): x must be float16, bfloat16 or float32, got ",
              x.scalar_type());
  TORCH_CHECK(qweight.dim() == 3 && qweight.size(2) == 128 && qweight.scalar_type() == at::kInt,
              "sqplus w4a16_gemm (CUDA): qweight is not in the CUDA packed layout (w4a16_pack)");
  const int64_t N = qweight.size(0) * kStrip, K = qweight.size(1) * kKStep;
  TORCH_CHECK(x.size(-1) == K, "sqplus w4a16_gemm (CUDA): x has K=", std::to_string(x.size(-1)), ", weights ",
              std::to_string(K));
  if (group_size == -1) group_size = K;
  check_group(K, group_size);
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == K / group_size && scales.size(1) == N,
              "sqplus w4a16_gemm (CUDA): scales must be [K/g, N]");
  TORCH_CHECK(zeros.dim() == 2 && zeros.size(0) == K / group_size && zeros.size(1) == N &&
                  zeros.scalar_type() == at::kByte,
              "sqplus w4a16_gemm (CUDA): zeros must be uint8 [K/g, N]");
  c10::cuda::CUDAGuard guard(x.device());
  // Scales in the activation dtype (the pack keeps the model's dtype; a mismatch costs a convert).
  at::Tensor s = scales.scalar_type() == x.scalar_type() ? scales.contiguous()
                                                         : scales.to(x.scalar_type()).contiguous();
  at::Tensor z = zeros.contiguous();
  c10::optional<at::Tensor> b;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == N, "sqplus w4a16_gemm (CUDA): bias must have N=", std::to_string(N),
                " elements");
    b = bias->to(x.scalar_type()).contiguous();
  }
  auto out_shape = x.sizes().vec();
  out_shape.back() = N;
  at::Tensor x2 = x.reshape({-1, K}).contiguous();
  // 8-byte activation loads need an aligned base
  if (reinterpret_cast<uintptr_t>(x2.data_ptr()) % 16 != 0) x2 = x2.clone();
  const int64_t M = x2.size(0);
  if (M == 0) return at::empty(out_shape, x.options());
  if (path == 0) path = M >= kDequantM ? 2 : 1;
  at::Tensor out;
  if (x.scalar_type() == at::kFloat) {  // no float tensor-core path: exact fp32 weights + cuBLAS
    at::Tensor w = dequant<float>(qweight, s, z, N, K, group_size, x.options());
    out = b ? at::linear(x2, w, *b) : at::linear(x2, w);
    return out.view(out_shape);
  }
  if (path == 2) {
    AT_DISPATCH_REDUCED_FLOATING_TYPES(x.scalar_type(), "w4a16_dequant", [&] {
      using T = std::conditional_t<std::is_same_v<scalar_t, at::Half>, __half, __nv_bfloat16>;
      at::Tensor w = dequant<T>(qweight, s, z, N, K, group_size, x.options());
      out = b ? at::linear(x2, w, *b) : at::linear(x2, w);
    });
    return out.view(out_shape);
  }
  out = at::empty({M, N}, x.options());
  AT_DISPATCH_REDUCED_FLOATING_TYPES(x.scalar_type(), "w4a16_stream", [&] {
    using T = std::conditional_t<std::is_same_v<scalar_t, at::Half>, __half, __nv_bfloat16>;
    if (M <= 16)
      launch_stream<T, 1>(x2, qweight, s, z, b, out, M, N, K, group_size);
    else  // M > 16 here only when path 1 is forced (tests, benchmarks): 32-row blocks
      launch_stream<T, 2>(x2, qweight, s, z, b, out, M, N, K, group_size);
  });
  return out.view(out_shape);
}

// Dequantize the CUDA packed weights back to W [N, K] (tests; the cuBLAS path uses the same kernel).
at::Tensor w4a16_dequant_cuda(const at::Tensor& qweight, const at::Tensor& scales,
                              const at::Tensor& zeros, int64_t group_size) {
  const int64_t N = qweight.size(0) * kStrip, K = qweight.size(1) * kKStep;
  if (group_size == -1) group_size = K;
  check_group(K, group_size);
  c10::cuda::CUDAGuard guard(qweight.device());
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scales.scalar_type(), "w4a16_dequant", [&] {
    using T = std::conditional_t<std::is_same_v<scalar_t, at::Half>, __half,
              std::conditional_t<std::is_same_v<scalar_t, at::BFloat16>, __nv_bfloat16, float>>;
    if constexpr (std::is_same_v<scalar_t, double>) {
      TORCH_CHECK(false, "sqplus w4a16_dequant (CUDA): float64 scales are not supported");
    } else {
      out = dequant<T>(qweight, scales.contiguous(), zeros.contiguous(), N, K, group_size,
                       scales.options());
    }
  });
  return out;
}

}  // namespace sqplus_cuda

// CUDA-only extra (tests: the packed weights back to W; not part of the shared contract).
TORCH_LIBRARY_FRAGMENT(sqplus, m) {
  m.def("w4a16_dequant(Tensor qweight, Tensor scales, Tensor zeros, int group_size) -> Tensor");
}

TORCH_LIBRARY_IMPL(sqplus, CUDA, m) {
  m.impl("w4a16_pack", &sqplus_cuda::w4a16_pack_cuda);
  m.impl("w4a16_gemm", &sqplus_cuda::w4a16_gemm_cuda);
  m.impl("w4a16_dequant", &sqplus_cuda::w4a16_dequant_cuda);
}
