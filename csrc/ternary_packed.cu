// Packed ternary GEMV / small-M GEMM: out[M, N] = x[M, K] @ (codes * scales)^T, meant for M = 1..64 (any M works).
//
// Weights stay 2-bit in memory (the memory-bound cost of a decode step); each warp decodes them in registers to
// bf16 {-1, 0, 1} (exact) and feeds the tensor cores with mma.m16n8k16: A = 16 weight rows, B = 8 tokens, fp32
// accumulation. A block owns 16 output features and splits K over its 8 warps (enough warps in flight at M = 1),
// then sums the warps' partial tiles through shared memory.
//
// Decode: byte b of a row holds codes k = 4b..4b+3 (value c+1 at bits 2*(k%4)). For a 32-bit word w of 16 codes,
// ((w >> s) & 0x00030003) | 0x43004300 is a bf16 pair (128 + c0, 128 + c1) (the bf16 ulp at 128 is 1), and
// subtracting 129 gives (c0 - 1, c1 - 1) exactly: three integer/bf16x2 instructions per two weights.
// The pair built from shift s = 8q + 2j holds codes 4q+j and 4q+j+8 of the word; the MMA's k order is permuted to
// match (any permutation works when A and B use the same), and the x fragments are permuted with byte_perm.
// group_size must be 0 (per-row scales, applied once at the end) or a multiple of 64 (a warp step's 64 codes then
// share one group, whose scales weight that step's partial sums).
#include "common.cuh"
#include "launchers.h"

namespace tgolf {
namespace {

constexpr int kWarps = 8;        // warps per block, splitting K
constexpr int kRows = 16;        // output features per block (the MMA's M)
constexpr int kChunkCodes = 64;  // codes per row per warp step: 4 lanes x one 32-bit word
constexpr int kUnroll = 8;       // chunks whose weight words are loaded before the first is used
constexpr uint32_t kZeroCodes = 0x55555555u;  // sixteen codes of value 0 (stored as 1)

// One 32-bit word of a packed row (16 codes starting at byte `offset`); past the row's end the codes are 0.
__device__ __forceinline__ uint32_t load_codes(const uint8_t* row, int64_t offset, int64_t Kp, bool vec) {
  if (row == nullptr) return kZeroCodes;
  if (vec && offset + 4 <= Kp) return __ldg(reinterpret_cast<const uint32_t*>(row + offset));
  uint32_t w = kZeroCodes;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if (offset + i < Kp) w = (w & ~(0xFFu << (8 * i))) | (uint32_t(__ldg(row + offset + i)) << (8 * i));
  }
  return w;
}

// x[k0 .. k0+15] of one token as eight bf16 pairs; zeros past K (and for a missing token).
__device__ __forceinline__ void load_x16(uint32_t (&xw)[8], const uint16_t* xrow, int64_t k0, int64_t K, bool vec) {
  if (xrow == nullptr) {  // padding token (M = 1 leaves 7 of the MMA's 8 token columns empty)
#pragma unroll
    for (int i = 0; i < 8; ++i) xw[i] = 0u;
    return;
  }
  if (vec && k0 + 16 <= K) {
    const uint4* p = reinterpret_cast<const uint4*>(xrow + k0);
    const uint4 lo = __ldg(p), hi = __ldg(p + 1);
    xw[0] = lo.x; xw[1] = lo.y; xw[2] = lo.z; xw[3] = lo.w;
    xw[4] = hi.x; xw[5] = hi.y; xw[6] = hi.z; xw[7] = hi.w;
    return;
  }
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int64_t k = k0 + 2 * i;
    const uint32_t a = k < K ? __ldg(xrow + k) : 0u;
    const uint32_t b = k + 1 < K ? __ldg(xrow + k + 1) : 0u;
    xw[i] = a | (b << 16);
  }
}

// bf16 pair (code - 1) of codes 4q+j (low half) and 4q+j+8 (high half) of a 16-code word, shift = 8q + 2j.
__device__ __forceinline__ uint32_t decode_pair(uint32_t w, int shift) {
  const uint32_t biased = ((w >> shift) & 0x00030003u) | 0x43004300u;
  return bf162_bits(__hsub2(bits_bf162(biased), __floats2bfloat162_rn(129.0f, 129.0f)));
}

// MT token tiles of 8 per block (M up to 8*MT per grid row).
template <int MT>
__global__ void __launch_bounds__(kWarps * 32) ternary_packed_mm_kernel(
    const uint16_t* __restrict__ x, const uint8_t* __restrict__ packed, const float* __restrict__ scales,
    uint16_t* __restrict__ out, int64_t M, int64_t N, int64_t K, int64_t Kp, int64_t G, int64_t group_size,
    bool w_vec, bool x_vec) {
  __shared__ float partial[kWarps][MT * 4][32];

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int64_t n0 = int64_t(blockIdx.x) * kRows;
  const int64_t m0 = int64_t(blockIdx.y) * 8 * MT;
  const int64_t row0 = n0 + g, row1 = n0 + g + 8;
  const uint8_t* wrow0 = row0 < N ? packed + row0 * Kp : nullptr;
  const uint8_t* wrow1 = row1 < N ? packed + row1 * Kp : nullptr;
  const uint16_t* xrow[MT];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    const int64_t m = m0 + mt * 8 + g;
    xrow[mt] = m < M ? x + m * K : nullptr;
  }
  const bool grouped = group_size > 0;
  const int64_t nchunks = (Kp + 15) / 16;

  float acc[MT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[mt][i] = 0.0f;

  for (int64_t base = warp; base < nchunks; base += kWarps * kUnroll) {
    uint32_t w0[kUnroll], w1[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t c = base + int64_t(u) * kWarps;
      w0[u] = c < nchunks ? load_codes(wrow0, c * 16 + 4 * t, Kp, w_vec) : kZeroCodes;
      w1[u] = c < nchunks ? load_codes(wrow1, c * 16 + 4 * t, Kp, w_vec) : kZeroCodes;
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t c = base + int64_t(u) * kWarps;
      if (c >= nchunks) break;
      uint32_t a0[8], a1[8];  // [4*q + j]: pair of shift 8q + 2j, rows g and g+8
#pragma unroll
      for (int q = 0; q < 2; ++q)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          a0[4 * q + j] = decode_pair(w0[u], 8 * q + 2 * j);
          a1[4 * q + j] = decode_pair(w1[u], 8 * q + 2 * j);
        }
      float part[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int i = 0; i < 4; ++i) part[mt][i] = 0.0f;
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        uint32_t xw[8];
        load_x16(xw, xrow[mt], c * kChunkCodes + 16 * t, K, x_vec);
#pragma unroll
        for (int q = 0; q < 2; ++q)
#pragma unroll
          for (int jp = 0; jp < 2; ++jp) {
            // MMA k slots (2t, 2t+1, 2t+8, 2t+9) of this lane hold codes 16t + 4q + 2jp + (0, 8, 1, 9).
            const uint32_t a[4] = {a0[4 * q + 2 * jp], a1[4 * q + 2 * jp], a0[4 * q + 2 * jp + 1],
                                   a1[4 * q + 2 * jp + 1]};
            const uint32_t lo = xw[2 * q + jp], hi = xw[2 * q + jp + 4];
            mma_bf16_16816(part[mt], a, __byte_perm(lo, hi, 0x5410), __byte_perm(lo, hi, 0x7632));
          }
      }
      // Per-chunk partial sums (plain registers: no run-time choice between accumulator arrays); with groups the
      // whole chunk lies in one group (group_size is a multiple of 64) and takes that group's scales.
      float s0 = 1.0f, s1 = 1.0f;
      if (grouped) {
        const int64_t grp = c * kChunkCodes / group_size;
        s0 = row0 < N ? __ldg(scales + row0 * G + grp) : 0.0f;
        s1 = row1 < N ? __ldg(scales + row1 * G + grp) : 0.0f;
      }
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          acc[mt][0] += part[mt][0] * s0;
          acc[mt][1] += part[mt][1] * s0;
          acc[mt][2] += part[mt][2] * s1;
          acc[mt][3] += part[mt][3] * s1;
        }
    }
  }

#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int i = 0; i < 4; ++i) partial[warp][mt * 4 + i][lane] = acc[mt][i];
  __syncthreads();

  // Sum the warps' tiles; element (i, l) of a tile is feature g(l) (+8 for i%4 >= 2), token 8*(i/4) + 2*t(l) + i%2.
  for (int e = threadIdx.x; e < MT * 4 * 32; e += kWarps * 32) {
    const int i = e / 32, l = e % 32;
    float sum = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) sum += partial[w][i][l];
    const int64_t n = n0 + (l >> 2) + ((i & 3) >= 2 ? 8 : 0);
    const int64_t m = m0 + 8 * (i >> 2) + 2 * (l & 3) + (i & 1);
    if (n < N && m < M) {
      if (!grouped) sum *= scales[n];
      out[m * N + n] = __bfloat16_as_ushort(__float2bfloat16_rn(sum));
    }
  }
}

template <int MT>
cudaError_t launch(const uint16_t* x, const uint8_t* packed, const float* scales, uint16_t* out, int64_t M,
                   int64_t N, int64_t K, int64_t group_size, cudaStream_t stream) {
  const int64_t Kp = (K + 3) / 4;
  const int64_t G = group_size > 0 ? (K + group_size - 1) / group_size : 1;
  const bool w_vec = Kp % 4 == 0 && reinterpret_cast<uintptr_t>(packed) % 4 == 0;
  const bool x_vec = K % 8 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0;
  const dim3 grid(ceil_div(N, kRows), ceil_div(M, 8 * MT));
  ternary_packed_mm_kernel<MT><<<grid, kWarps * 32, 0, stream>>>(x, packed, scales, out, M, N, K, Kp, G,
                                                                 group_size, w_vec, x_vec);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_ternary_packed_mm(const uint16_t* x, const uint8_t* packed, const float* scales, uint16_t* out,
                                     int64_t M, int64_t N, int64_t K, int64_t group_size, cudaStream_t stream) {
  if (M <= 8) return launch<1>(x, packed, scales, out, M, N, K, group_size, stream);
  if (M <= 16) return launch<2>(x, packed, scales, out, M, N, K, group_size, stream);
  if (M <= 32) return launch<4>(x, packed, scales, out, M, N, K, group_size, stream);
  return launch<8>(x, packed, scales, out, M, N, K, group_size, stream);
}

}  // namespace tgolf
