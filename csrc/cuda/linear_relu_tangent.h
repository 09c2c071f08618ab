// Torch-free launchers of the CUDA linear_relu_tangent op (K batched linear layers + ReLU and
// their R-operator tangent; see linear_relu_tangent.cu and, for the maths,
// fastdistill/ops/linear_relu_tangent.py). Shared by linear_relu_tangent_glue.cpp and
// compile-checked alone by CI. Every pointer is a contiguous device buffer:
// h, hd [K, F_in, n]; W, V [K, F_out, F_in]; b, bd [K, F_out]; out, td [K, F_out, n].
// Each launcher returns the launch error (cudaSuccess when there is nothing to do).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace fastdistill {
namespace cuda {

// out = relu(W h + b) (relu = false: out = W h + b).
template <typename T>
cudaError_t linear_relu(const T* h, const T* W, const T* b, T* out, int64_t K, int64_t F_in,
                        int64_t F_out, int64_t n, bool relu, cudaStream_t stream);
// out as linear_relu, and td = (V h + W ḣ + ḃ) · [out > 0] (relu = false: without the mask).
template <typename T>
cudaError_t linear_relu_tangent(const T* h, const T* hd, const T* W, const T* V, const T* b,
                                const T* bd, T* out, T* td, int64_t K, int64_t F_in, int64_t F_out,
                                int64_t n, bool relu, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastdistill
