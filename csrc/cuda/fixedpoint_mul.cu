// CUDA kernels of fixedpoint_mul / fixedpoint_unmul: one exact information-buffer step.
//
// Maths: csrc/fixedpoint_math.h (shared with the CPU kernel, so both run the same integer
// arithmetic): floor division, results mod 2^64, bitwise equal to the torch reference in
// fastdistill/ops/fixedpoint_mul.py for every int64 input. The divisions by n and d are
// multiply-highs (__umul64hi) by constants prepared once per call on the host: no 64-bit
// hardware division (which GPUs emulate), no floating point.
// Design: a grid-stride loop so any numel fits a bounded grid; each thread reads X[i], c[i]
// before writing X_out[i], c_out[i], so the outputs may alias the inputs exactly. Memory bound
// (two int64 reads, two writes per element).
// Limits: contiguous int64 buffers; no torch headers here (nvcc-checkable on CI).
#include "../fixedpoint_math.h"
#include "fixedpoint_mul.h"

namespace fastdistill {
namespace cuda {
namespace {

namespace fp = fastdistill::fixedpoint;

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65536;

template <bool kMul>
__global__ void fixedpoint_step_kernel(const int64_t* X, const int64_t* c, int64_t* X_out,
                                       int64_t* c_out, int64_t numel, const fp::StepParams p) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride) {
    const int64_t x = X[i], w = c[i];
    int64_t xn, wn;
    if (kMul) {
      fp::mul_one(p, x, w, xn, wn);
    } else {
      fp::unmul_one(p, x, w, xn, wn);
    }
    X_out[i] = xn;
    c_out[i] = wn;
  }
}

template <bool kMul>
cudaError_t launch(const int64_t* X, const int64_t* c, int64_t* X_out, int64_t* c_out,
                   int64_t numel, const fp::StepParams& p, cudaStream_t stream) {
  if (numel <= 0) return cudaSuccess;
  int64_t blocks = (numel + kThreads - 1) / kThreads;
  if (blocks > kMaxBlocks) blocks = kMaxBlocks;
  fixedpoint_step_kernel<kMul><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      X, c, X_out, c_out, numel, p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t fixedpoint_mul(const int64_t* X, const int64_t* c, int64_t* X_out, int64_t* c_out,
                           int64_t numel, int64_t n, int64_t d, int64_t floor_word,
                           int64_t threshold, cudaStream_t stream) {
  return launch<true>(X, c, X_out, c_out, numel, fp::StepParams::mul(n, d, floor_word, threshold),
                      stream);
}

cudaError_t fixedpoint_unmul(const int64_t* X, const int64_t* c, int64_t* X_out, int64_t* c_out,
                             int64_t numel, int64_t n, int64_t d, cudaStream_t stream) {
  return launch<false>(X, c, X_out, c_out, numel, fp::StepParams::unmul(n, d), stream);
}

}  // namespace cuda
}  // namespace fastdistill
