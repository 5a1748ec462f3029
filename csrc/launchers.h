// Host-side launchers of tgolf's CUDA kernels: raw pointers in, a CUDA error code out.
// Kept free of torch headers so that nvcc compiles the .cu files fast; csrc/ops.cpp does the tensor checks.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace tgolf {

// out[M, N] (bf16 bits) = x[M, K] (bf16 bits) @ (codes * scales)^T; packed [N, ceil(K/4)] 2-bit codes
// (value c+1 at bits 2*(k%4) of byte k/4), scales [N, G] float32 (group_size 0: G = 1; else a multiple of 64).
cudaError_t launch_ternary_packed_mm(const uint16_t* x, const uint8_t* packed, const float* scales, uint16_t* out,
                                     int64_t M, int64_t N, int64_t K, int64_t group_size, cudaStream_t stream);

// out[M, N] (bf16 bits) = (int32(quant(x) @ codes^T) * scales[n]) * xscale[m]; x quantized per token
// (definition in tgolf/_extension.py).
cudaError_t launch_ternary_int8_linear(const uint16_t* x, const int8_t* codes, const float* scales, uint16_t* out,
                                       int64_t M, int64_t N, int64_t K, cudaStream_t stream);

// The same GEMM with x already quantized: xq int8 [M, K], xscale [M] float32.
cudaError_t launch_ternary_int8_mm(const int8_t* xq, const float* xscale, const int8_t* codes, const float* scales,
                                   uint16_t* out, int64_t M, int64_t N, int64_t K, cudaStream_t stream);

// Softcapped cross-entropy on a chunk of rows, logits [n, V] (bf16 bits when is_bf16, else float32) overwritten
// by their gradient; loss [n] float32.
cudaError_t launch_softcap_ce_chunk(void* logits, bool is_bf16, const int64_t* targets, float* loss, int64_t n,
                                    int64_t V, float softcap, float grad_scale, cudaStream_t stream);

}  // namespace tgolf
