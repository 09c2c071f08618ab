// Torch-free launchers of the CUDA lrn op (local response norm across channels; see lrn.cu and,
// for the maths, csrc/cpu/lrn.cpp). Shared by lrn_glue.cpp and compile-checked alone by CI.
// x is [B, C, E] (E = M·H·W) contiguous on the device; size ≥ 1; every quantity is computed in
// double. Each launcher returns the launch error (cudaSuccess when there is nothing to do).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace fastdistill {
namespace cuda {

// y = x / (k + α/size · Σ_{W(c)} x²)^β, y like x.
template <typename T>
cudaError_t lrn(const T* x, T* y, int64_t B, int64_t C, int64_t E, int64_t size, double alpha,
                double beta, double k, cudaStream_t stream);
// The JVP ẏ at x along xd (xd, yd like x).
template <typename T>
cudaError_t lrn_tangent(const T* xd, const T* x, T* yd, int64_t B, int64_t C, int64_t E, int64_t size,
                        double alpha, double beta, double k, cudaStream_t stream);
// The VJP for S stacked cotangents g [S, B, C, E] -> xg [S, B, C, E]; `work` is a device buffer
// of 2·B·C·E doubles (1/D and y/t, computed once for all S).
template <typename T>
cudaError_t lrn_backward(const T* g, const T* x, T* xg, double* work, int64_t S, int64_t B, int64_t C,
                         int64_t E, int64_t size, double alpha, double beta, double k,
                         cudaStream_t stream);

}  // namespace cuda
}  // namespace fastdistill
