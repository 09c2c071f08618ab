// Torch-free launchers of the CUDA maxpool3s2 op (3×3 max-pool, stride 2, padding 1; see
// maxpool3s2.cu and, for the maths, csrc/cpu/maxpool3s2.cpp). Shared by maxpool3s2_glue.cpp and
// compile-checked alone by CI. Every pointer is a contiguous device buffer; h = (H − 1)/2 + 1,
// w = (W − 1)/2 + 1. Each launcher returns the launch error (cudaSuccess when there is nothing
// to do).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace fastdistill {
namespace cuda {

// z [P, M, H, W] -> p [P, M, h, w], idx (max_pool2d's rule: first maximum, a NaN is always taken).
template <typename T>
cudaError_t maxpool3s2(const T* z, T* p, int64_t* idx, int64_t P, int64_t M, int64_t H, int64_t W,
                       cudaStream_t stream);
// ṗ = ż[idx]; zd [P, M, H, W], idx/pd [P, M, h, w] (an index outside the plane gives NaN).
template <typename T>
cudaError_t maxpool3s2_tangent(const T* zd, const int64_t* idx, T* pd, int64_t P, int64_t M, int64_t H,
                               int64_t W, cudaStream_t stream);
// d [S, P, M, h, w] -> dz [S, P, M, H, W], written in full: one thread per input pixel gathers
// from the ≤ 4 windows covering it in ascending order (no atomics: deterministic).
template <typename T>
cudaError_t maxpool3s2_backward(const T* d, const int64_t* idx, T* dz, int64_t S, int64_t P, int64_t M,
                                int64_t H, int64_t W, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastdistill
