// Torch-free launchers of the CUDA LeNet layer ops (see lenet_ops.cu and, for the maths and the
// layouts, csrc/cpu/lenet_ops.cpp). Shared by lenet_ops_glue.cpp and compile-checked alone by CI.
// Every pointer is a contiguous device buffer; sizes as in the CPU kernels. Each launcher returns
// the launch error (cudaSuccess when there is nothing to do).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace fastdistill {
namespace cuda {

// a [B, C, M, H, W] -> u [B, C·25, M·Ho·Wo], Ho = H + 2·pad − 4.
template <typename T>
cudaError_t im2col5(const T* a, T* u, int64_t B, int64_t C, int64_t M, int64_t H, int64_t W,
                    int64_t pad, cudaStream_t stream);
// d [B, C·25, M·Ho·Wo] -> out [B, C, M, H, W] (gather-sum in (i, j) order; no atomics).
template <typename T>
cudaError_t col2im5(const T* d, T* out, int64_t B, int64_t C, int64_t M, int64_t H, int64_t W,
                    int64_t pad, cudaStream_t stream);
// z [P, M, H, W], bias [P] -> a [P, M, H/2, W/2], idx (first maximum; the last NaN wins).
template <typename T>
cudaError_t pool2_relu(const T* z, const T* bias, T* a, int64_t* idx, int64_t P, int64_t M,
                       int64_t H, int64_t W, cudaStream_t stream);
// ȧ = (ż[idx] + ḃ) · [a > 0]; zd [P, M, 2h, 2w], a/idx/ad [P, M, h, w].
template <typename T>
cudaError_t pool2_relu_tangent(const T* zd, const T* bias_d, const int64_t* idx, const T* a, T* ad,
                               int64_t P, int64_t M, int64_t h, int64_t w, cudaStream_t stream);
// d [S, P, M, h, w] -> dz [S, P, M, 2h, 2w] (written in full), db [S, P] (one block per entry,
// a fixed-order tree reduction: deterministic).
template <typename T>
cudaError_t pool2_relu_backward(const T* d, const int64_t* idx, const T* a, T* dz, T* db, int64_t S,
                                int64_t P, int64_t M, int64_t h, int64_t w, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastdistill
