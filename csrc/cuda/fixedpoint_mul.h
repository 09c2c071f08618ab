// Torch-free launchers of the CUDA fixedpoint_mul / fixedpoint_unmul kernels (see
// fixedpoint_mul.cu). Shared by the torch glue (fixedpoint_mul_glue.cpp) and compile-checked alone
// by CI with nvcc.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace fastdistill {
namespace cuda {

// One information-buffer step X ← X·n/d on `numel` int64 states X and live words c (words
// c ≥ threshold restart at floor first); results into X_out, c_out, which may equal X or c.
// Needs 0 < n < d ≤ 2^20 (checked by the caller). Returns the launch error (cudaSuccess for
// numel == 0, nothing launched).
cudaError_t fixedpoint_mul(const int64_t* X, const int64_t* c, int64_t* X_out, int64_t* c_out,
                           int64_t numel, int64_t n, int64_t d, int64_t floor_word,
                           int64_t threshold, cudaStream_t stream);

// Its inverse (the restart detection and refill stay with the caller).
cudaError_t fixedpoint_unmul(const int64_t* X, const int64_t* c, int64_t* X_out, int64_t* c_out,
                             int64_t numel, int64_t n, int64_t d, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastdistill
