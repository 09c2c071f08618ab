// Torch-free launchers of the CUDA gd_update kernel (see gd_update.cu). Shared by the torch glue
// (gd_update_glue.cpp) and compile-checked alone by CI with nvcc.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace fastdistill {
namespace cuda {

// out[i] = theta[i] − (*lr) · grad[i] for i < n; `lr` is a device pointer to one element.
// `out` may equal `theta`. Returns the launch error (cudaSuccess for n == 0, nothing launched).
cudaError_t gd_update_f32(const float* theta, const float* grad, const float* lr, float* out,
                          int64_t n, cudaStream_t stream);
cudaError_t gd_update_f64(const double* theta, const double* grad, const double* lr, double* out,
                          int64_t n, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastdistill
