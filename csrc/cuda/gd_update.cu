// CUDA kernel of gd_update: out = theta − lr · grad, elementwise (memory bound: 2 reads, 1 write).
//
// Design: a grid-stride loop so any n fits a bounded grid; lr is read from device memory so a
// learning rate that lives on the GPU needs no host synchronisation. The product and the
// difference are rounded separately (__fmul_rn/__dmul_rn cannot be contracted into an FMA),
// which makes the result bitwise equal to torch's `theta - lr * grad`.
// Limits: float32/float64, contiguous buffers; no torch headers here (nvcc-checkable on CI).
#include "gd_update.h"

namespace fastdistill {
namespace cuda {
namespace {

__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65536;

template <typename T>
__global__ void gd_update_kernel(const T* __restrict__ theta, const T* __restrict__ grad,
                                 const T* __restrict__ lr, T* out, int64_t n) {
  const T eta = *lr;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    out[i] = theta[i] - mul_rn(eta, grad[i]);
  }
}

template <typename T>
cudaError_t launch(const T* theta, const T* grad, const T* lr, T* out, int64_t n, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  int64_t blocks = (n + kThreads - 1) / kThreads;
  if (blocks > kMaxBlocks) blocks = kMaxBlocks;
  gd_update_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(theta, grad, lr, out, n);
  return cudaGetLastError();
}

}  // namespace

cudaError_t gd_update_f32(const float* theta, const float* grad, const float* lr, float* out,
                          int64_t n, cudaStream_t stream) {
  return launch<float>(theta, grad, lr, out, n, stream);
}

cudaError_t gd_update_f64(const double* theta, const double* grad, const double* lr, double* out,
                          int64_t n, cudaStream_t stream) {
  return launch<double>(theta, grad, lr, out, n, stream);
}

}  // namespace cuda
}  // namespace fastdistill
