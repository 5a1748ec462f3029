// Softcapped cross-entropy on a chunk of logit rows, forward and backward in one kernel, one warp per row.
//
//   z = softcap * tanh(l / softcap)   (softcap <= 0: z = l)
//   loss = logsumexp(z) - z[target]
//   l <- grad_scale * (softmax(z) - onehot(target)) * (1 - tanh^2(l / softcap))   (in place)
//
// Pass 1 keeps a running (max, sum of exp) per lane over 16-byte vectors (online softmax), merged across the warp
// with shuffles; pass 2 re-reads the row (from L2 for long rows) and writes the gradient over it. A target outside
// [0, V) gives a NaN loss and the gradient of softmax alone, like the Triton kernel (no host sync to check it).
#include <cmath>

#include "common.cuh"
#include "launchers.h"

namespace tgolf {
namespace {

constexpr int kRowsPerBlock = 8;  // one warp per row

template <typename T>
struct Io;
template <>
struct Io<float> {
  static constexpr int kVec = 4;
  __device__ static float load(const float* p) { return *p; }
  __device__ static void store(float* p, float v) { *p = v; }
  __device__ static void load_vec(const float* p, float (&v)[kVec]) {
    const float4 q = *reinterpret_cast<const float4*>(p);
    v[0] = q.x; v[1] = q.y; v[2] = q.z; v[3] = q.w;
  }
  __device__ static void store_vec(float* p, const float (&v)[kVec]) {
    *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
  }
};
template <>
struct Io<__nv_bfloat16> {
  static constexpr int kVec = 8;
  __device__ static float load(const __nv_bfloat16* p) { return __bfloat162float(*p); }
  __device__ static void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
  __device__ static void load_vec(const __nv_bfloat16* p, float (&v)[kVec]) {
    const uint4 q = *reinterpret_cast<const uint4*>(p);
    const uint32_t w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      v[2 * i] = __uint_as_float(w[i] << 16);
      v[2 * i + 1] = __uint_as_float(w[i] & 0xFFFF0000u);
    }
  }
  __device__ static void store_vec(__nv_bfloat16* p, const float (&v)[kVec]) {
    uint32_t w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) w[i] = bf162_bits(__floats2bfloat162_rn(v[2 * i], v[2 * i + 1]));
    *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
  }
};

struct Cap {
  float softcap, inv_softcap;
  bool on;
  // (capped logit, its derivative with respect to the raw logit)
  __device__ __forceinline__ void apply(float l, float& z, float& dz) const {
    if (on) {
      const float th = tanhf(l * inv_softcap);
      z = softcap * th;
      dz = 1.0f - th * th;
    } else {
      z = l;
      dz = 1.0f;
    }
  }
};

// Merge a running (max, sum of exp(z - max)) with another; -inf maxima mean "nothing seen yet".
__device__ __forceinline__ void merge(float& m, float& s, float m2, float s2) {
  if (m2 == -INFINITY) return;
  if (m == -INFINITY) {
    m = m2;
    s = s2;
    return;
  }
  const float mn = fmaxf(m, m2);
  s = s * expf(m - mn) + s2 * expf(m2 - mn);
  m = mn;
}

template <typename T>
__global__ void __launch_bounds__(kRowsPerBlock * 32) softcap_ce_kernel(T* __restrict__ logits,
                                                                       const int64_t* __restrict__ targets,
                                                                       float* __restrict__ loss, int64_t n,
                                                                       int64_t V, Cap cap, float grad_scale,
                                                                       bool vec) {
  constexpr int kVec = Io<T>::kVec;
  const int lane = threadIdx.x & 31;
  const int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + (threadIdx.x >> 5);
  if (row >= n) return;
  T* p = logits + row * V;
  const int64_t target = targets[row];
  const bool valid = target >= 0 && target < V;
  // 16-byte pieces when every row is aligned to them, else element by element.
  const int64_t vend = vec ? V : 0;

  float m = -INFINITY, s = 0.0f, dz;
  for (int64_t k = int64_t(lane) * kVec; k < vend; k += 32 * kVec) {
    float v[kVec];
    Io<T>::load_vec(p + k, v);
    float cm = -INFINITY;
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      cap.apply(v[i], v[i], dz);
      cm = fmaxf(cm, v[i]);
    }
    if (cm == -INFINITY) continue;  // uncapped -inf logits only
    float cs = 0.0f;
#pragma unroll
    for (int i = 0; i < kVec; ++i) cs += expf(v[i] - cm);
    merge(m, s, cm, cs);
  }
  for (int64_t k = vend + lane; k < V; k += 32) {
    float z;
    cap.apply(Io<T>::load(p + k), z, dz);
    merge(m, s, z, 1.0f);
  }
  float z_target = NAN;
  if (valid && lane == 0) cap.apply(Io<T>::load(p + target), z_target, dz);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float m2 = __shfl_xor_sync(0xFFFFFFFFu, m, off), s2 = __shfl_xor_sync(0xFFFFFFFFu, s, off);
    merge(m, s, m2, s2);
  }
  const float lse = m + logf(s);
  if (lane == 0) loss[row] = lse - z_target;
  __syncwarp();  // lane 0 has read logits[target] before anyone overwrites it

  // d loss / d l = (softmax(z) - onehot) * dz, times grad_scale.
  for (int64_t k = int64_t(lane) * kVec; k < vend; k += 32 * kVec) {
    float v[kVec];
    Io<T>::load_vec(p + k, v);
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      float z;
      cap.apply(v[i], z, dz);
      const float onehot = (k + i == target) ? 1.0f : 0.0f;
      v[i] = grad_scale * ((expf(z - lse) - onehot) * dz);
    }
    Io<T>::store_vec(p + k, v);
  }
  for (int64_t k = vend + lane; k < V; k += 32) {
    float z;
    cap.apply(Io<T>::load(p + k), z, dz);
    const float onehot = (k == target) ? 1.0f : 0.0f;
    Io<T>::store(p + k, grad_scale * ((expf(z - lse) - onehot) * dz));
  }
}

template <typename T>
cudaError_t launch(T* logits, const int64_t* targets, float* loss, int64_t n, int64_t V, float softcap,
                   float grad_scale, cudaStream_t stream) {
  const Cap cap{softcap, softcap > 0.0f ? 1.0f / softcap : 0.0f, softcap > 0.0f};
  const bool vec = reinterpret_cast<uintptr_t>(logits) % 16 == 0 && V % Io<T>::kVec == 0;
  softcap_ce_kernel<T><<<ceil_div(n, kRowsPerBlock), kRowsPerBlock * 32, 0, stream>>>(logits, targets, loss, n, V,
                                                                                      cap, grad_scale, vec);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_softcap_ce_chunk(void* logits, bool is_bf16, const int64_t* targets, float* loss, int64_t n,
                                    int64_t V, float softcap, float grad_scale, cudaStream_t stream) {
  if (is_bf16) {
    return launch(static_cast<__nv_bfloat16*>(logits), targets, loss, n, V, softcap, grad_scale, stream);
  }
  return launch(static_cast<float*>(logits), targets, loss, n, V, softcap, grad_scale, stream);
}

}  // namespace tgolf
