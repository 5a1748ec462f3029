// int8 tensor-core GEMMs for TernaryLinear's forward: out[M, N] = bf16((acc * scales[n]) * xscale[m]) with
// acc = xq @ codes^T in int32, codes int8 [N, K] (ternary in use), in two variants sharing one kernel:
//
// * fused (ternary_int8_linear_cuda): x bf16; each block finds the absmax of its 128 tokens in a prologue and
//   quantizes x on the fly while staging tiles to shared memory (no int8 copy of x in global memory; the price
//   is that every column block re-reads its tokens twice from L2);
// * pre-quantized (ternary_int8_mm_cuda): xq int8 and xscale given (e.g. by an activation-quantization kernel
//   whose codes the backward reuses); tiles of both operands are copied with cp.async.
//
// Main loop: mma.sync m16n8k32 s8 with int32 accumulators, operands from shared memory via ldmatrix, double
// buffered, 128 x 128 x 64 tiles, 8 warps of 64 x 32.
//
// Activation quantization, bit-exact with tgolf.ops.ternary.reference.quantize_activations_int8:
//   amax = max(max_k |x[m, k]|, 2^-64) in float64, inv = float32((1 / amax) * 127),
//   code = round_half_even(x * inv) on the exact product (one fma with 1.5 * 2^23, whose low byte is the code),
//   xscale = float32(amax / 127).
#include "common.cuh"
#include "launchers.h"

namespace tgolf {
namespace {

constexpr int kBM = 128, kBN = 128, kBK = 64;
constexpr int kStride = kBK + 16;  // bytes per shared-memory row: 80 makes ldmatrix's 8 rows hit distinct banks
constexpr int kThreads = 256;      // 8 warps: 2 along M x 4 along N, each a 64 x 32 tile
constexpr float kRoundMagic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer held in the low bits

// Four bf16 (two pairs) → four int8 codes in one word, k order kept.
__device__ __forceinline__ uint32_t quantize4(uint32_t p0, uint32_t p1, float inv) {
  const uint32_t q0 = __float_as_uint(__fmaf_rn(__uint_as_float(p0 << 16), inv, kRoundMagic));
  const uint32_t q1 = __float_as_uint(__fmaf_rn(__uint_as_float(p0 & 0xFFFF0000u), inv, kRoundMagic));
  const uint32_t q2 = __float_as_uint(__fmaf_rn(__uint_as_float(p1 << 16), inv, kRoundMagic));
  const uint32_t q3 = __float_as_uint(__fmaf_rn(__uint_as_float(p1 & 0xFFFF0000u), inv, kRoundMagic));
  return __byte_perm(__byte_perm(q0, q1, 0x0040), __byte_perm(q2, q3, 0x0040), 0x5410);
}

// Eight bf16 of x[m, k..k+7]; zeros past K or for a missing token.
__device__ __forceinline__ uint4 load_x8(const uint16_t* x, int64_t m, int64_t k, int64_t M, int64_t K, bool vec) {
  if (m >= M) return make_uint4(0, 0, 0, 0);
  const uint16_t* p = x + m * K + k;
  if (vec && k + 8 <= K) return __ldg(reinterpret_cast<const uint4*>(p));
  uint32_t w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint32_t a = k + 2 * i < K ? __ldg(p + 2 * i) : 0u;
    const uint32_t b = k + 2 * i + 1 < K ? __ldg(p + 2 * i + 1) : 0u;
    w[i] = a | (b << 16);
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// Rows [row0, row0 + rows) x bytes [k0, k0 + 64) of an int8 matrix [total, K] into a shared tile (zeros outside),
// 16 bytes per thread and step: cp.async where all 16 are in range and aligned, else byte by byte.
template <int kRows>
__device__ __forceinline__ void stage_int8(int8_t (*tile)[kStride], const int8_t* src, int64_t row0, int64_t total,
                                           int64_t K, int64_t k0, bool vec) {
#pragma unroll
  for (int i = 0; i < kRows * (kBK / 16) / kThreads; ++i) {
    const int idx = threadIdx.x + i * kThreads, r = idx >> 2;
    const int64_t row = row0 + r, k = k0 + (idx & 3) * 16;
    int8_t* dst = &tile[r][(idx & 3) * 16];
    if (row < total && vec && k + 16 <= K) {
      cp_async_16(dst, src + row * K + k);
    } else {
      uint32_t w[4] = {0, 0, 0, 0};
      for (int j = 0; j < 16; ++j) {
        if (row < total && k + j < K) w[j >> 2] |= uint32_t(uint8_t(src[row * K + k + j])) << (8 * (j & 3));
      }
      *reinterpret_cast<uint4*>(dst) = make_uint4(w[0], w[1], w[2], w[3]);
    }
  }
}

// kQuantize: A is x bf16 [M, K], quantized here; else A is xq int8 [M, K] with xscale [M]. The fused variant
// needs more than 128 registers (its prefetched x tile), so it runs one block per SM rather than spilling.
template <bool kQuantize>
__global__ void __launch_bounds__(kThreads, kQuantize ? 1 : 2) ternary_int8_kernel(
    const void* __restrict__ a, const float* __restrict__ xscale, const int8_t* __restrict__ codes,
    const float* __restrict__ scales, uint16_t* __restrict__ out, int64_t M, int64_t N, int64_t K, bool a_vec,
    bool w_vec, bool out_vec) {
  __shared__ __align__(16) int8_t As[2][kBM][kStride];
  __shared__ __align__(16) int8_t Bs[2][kBN][kStride];
  __shared__ float row_inv[kBM], row_scale[kBM];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int wm = warp >> 2, wn = warp & 3;
  const int64_t m0 = int64_t(blockIdx.y) * kBM, n0 = int64_t(blockIdx.x) * kBN;
  const uint16_t* x = static_cast<const uint16_t*>(a);
  const int8_t* xq = static_cast<const int8_t*>(a);

  if constexpr (kQuantize) {
    // Prologue: per-token absmax (|bf16| compares as its bits & 0x7fff), 16 tokens per warp.
    uint32_t amax2[16];
#pragma unroll
    for (int r = 0; r < 16; ++r) amax2[r] = 0;
    for (int64_t k = int64_t(lane) * 8; k < K; k += 256) {
#pragma unroll
      for (int r = 0; r < 16; ++r) {
        const uint4 v = load_x8(x, m0 + warp * 16 + r, k, M, K, a_vec);
        const uint32_t m = __vmaxu2(__vmaxu2(v.x & 0x7FFF7FFFu, v.y & 0x7FFF7FFFu),
                                    __vmaxu2(v.z & 0x7FFF7FFFu, v.w & 0x7FFF7FFFu));
        amax2[r] = __vmaxu2(amax2[r], m);
      }
    }
#pragma unroll
    for (int r = 0; r < 16; ++r) {
      uint32_t m = amax2[r];
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) m = __vmaxu2(m, __shfl_xor_sync(0xFFFFFFFFu, m, off));
      if (lane == r) {
        const float amax_f = bf16_bits_to_float(uint16_t(max(m & 0xFFFFu, m >> 16)));
        const double amax = fmax(double(amax_f), 0x1p-64);
        const bool valid = m0 + warp * 16 + r < M;
        row_inv[warp * 16 + r] = valid ? __double2float_rn(__dmul_rn(__drcp_rn(amax), 127.0)) : 0.0f;
        row_scale[warp * 16 + r] = valid ? __double2float_rn(__ddiv_rn(amax, 127.0)) : 0.0f;
      }
    }
  } else {
    for (int r = tid; r < kBM; r += kThreads) row_scale[r] = m0 + r < M ? xscale[m0 + r] : 0.0f;
  }
  __syncthreads();

  // A tiles of the fused variant go through registers and the quantizer (prefetched a tile ahead).
  uint4 xa[4];
  auto load_a = [&](int64_t k0) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int idx = tid + i * kThreads;
      xa[i] = load_x8(x, m0 + (idx >> 3), k0 + (idx & 7) * 8, M, K, a_vec);
    }
  };
  auto store_a = [&](int buf) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int idx = tid + i * kThreads, r = idx >> 3;
      const float inv = row_inv[r];
      const uint2 q = make_uint2(quantize4(xa[i].x, xa[i].y, inv), quantize4(xa[i].z, xa[i].w, inv));
      *reinterpret_cast<uint2*>(&As[buf][r][(idx & 7) * 8]) = q;
    }
  };
  // Issue the copies of tile k0 into buffer buf (A only for the pre-quantized variant).
  auto stage = [&](int64_t k0, int buf) {
    stage_int8<kBN>(Bs[buf], codes, n0, N, K, k0, w_vec);
    if constexpr (!kQuantize) stage_int8<kBM>(As[buf], xq, m0, M, K, k0, a_vec);
    cp_async_commit();
  };

  int32_t acc[4][4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0;

  const int64_t nk = (K + kBK - 1) / kBK;
  stage(0, 0);
  if constexpr (kQuantize) {
    load_a(0);
    store_a(0);
  }
  cp_async_wait_all();
  __syncthreads();

  for (int64_t kt = 0; kt < nk; ++kt) {
    const int cur = int(kt & 1);
    const bool more = kt + 1 < nk;
    if (more) {
      stage((kt + 1) * kBK, cur ^ 1);
      if constexpr (kQuantize) load_a((kt + 1) * kBK);
    }
#pragma unroll
    for (int ks = 0; ks < kBK / 32; ++ks) {
      uint32_t af[4][4], bfr[2][4];
#pragma unroll
      for (int i = 0; i < 4; ++i)
        ldmatrix_x4(af[i], &As[cur][wm * 64 + i * 16 + (lane & 15)][ks * 32 + (lane >> 4) * 16]);
#pragma unroll
      for (int jj = 0; jj < 2; ++jj)
        ldmatrix_x4(bfr[jj], &Bs[cur][wn * 32 + jj * 16 + (lane & 7) + ((lane >> 4) << 3)]
                                     [ks * 32 + ((lane >> 3) & 1) * 16]);
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
          mma_s8_16832(acc[i][j], af[i], bfr[j >> 1][(j & 1) * 2], bfr[j >> 1][(j & 1) * 2 + 1]);
    }
    if (more) {
      if constexpr (kQuantize) store_a(cur ^ 1);
      cp_async_wait_all();
    }
    __syncthreads();
  }

  // Epilogue: (acc * scales[n]) * xscale[m] in fp32 (the reference's order), rounded to bf16.
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int64_t n = n0 + wn * 32 + j * 8 + 2 * t;
    const float s0 = n < N ? __ldg(scales + n) : 0.0f;
    const float s1 = n + 1 < N ? __ldg(scales + n + 1) : 0.0f;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = wm * 64 + i * 16 + g + 8 * h;
        const int64_t m = m0 + r;
        if (m >= M) continue;
        const float xs = row_scale[r];
        const __nv_bfloat16 v0 = __float2bfloat16_rn(__fmul_rn(__fmul_rn(float(acc[i][j][2 * h]), s0), xs));
        const __nv_bfloat16 v1 = __float2bfloat16_rn(__fmul_rn(__fmul_rn(float(acc[i][j][2 * h + 1]), s1), xs));
        uint16_t* dst = out + m * N + n;
        if (out_vec && n + 1 < N) {
          *reinterpret_cast<__nv_bfloat162*>(dst) = __halves2bfloat162(v0, v1);
        } else {
          if (n < N) dst[0] = __bfloat16_as_ushort(v0);
          if (n + 1 < N) dst[1] = __bfloat16_as_ushort(v1);
        }
      }
  }
}

template <bool kQuantize>
cudaError_t launch(const void* a, const float* xscale, const int8_t* codes, const float* scales, uint16_t* out,
                   int64_t M, int64_t N, int64_t K, cudaStream_t stream) {
  const bool a_vec = K % (kQuantize ? 8 : 16) == 0 && reinterpret_cast<uintptr_t>(a) % 16 == 0;
  const bool w_vec = K % 16 == 0 && reinterpret_cast<uintptr_t>(codes) % 16 == 0;
  const bool out_vec = N % 2 == 0 && reinterpret_cast<uintptr_t>(out) % 4 == 0;
  const dim3 grid(ceil_div(N, kBN), ceil_div(M, kBM));  // column blocks of one token panel run side by side
  ternary_int8_kernel<kQuantize><<<grid, kThreads, 0, stream>>>(a, xscale, codes, scales, out, M, N, K, a_vec,
                                                                w_vec, out_vec);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_ternary_int8_linear(const uint16_t* x, const int8_t* codes, const float* scales, uint16_t* out,
                                       int64_t M, int64_t N, int64_t K, cudaStream_t stream) {
  return launch<true>(x, nullptr, codes, scales, out, M, N, K, stream);
}

cudaError_t launch_ternary_int8_mm(const int8_t* xq, const float* xscale, const int8_t* codes, const float* scales,
                                   uint16_t* out, int64_t M, int64_t N, int64_t K, cudaStream_t stream) {
  return launch<false>(xq, xscale, codes, scales, out, M, N, K, stream);
}

}  // namespace tgolf
