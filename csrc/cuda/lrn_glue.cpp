// Torch glue of the CUDA lrn op: checks, device guard, current stream, workspace, registration.
// Built only when the installed torch has CUDA (setup.py); the kernels are lrn.cu and the
// schemas are declared in csrc/cpu/lrn.cpp (always built).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>

#include "../check.h"
#include "lrn.h"

namespace fastdistill {
namespace {

constexpr auto kCUDA = c10::DeviceType::CUDA;

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "fastdistill::", op, " (cuda): launch failed: ", cudaGetErrorString(err));
}

void check_args(const at::Tensor& x, int64_t size, double alpha, double beta, double k, const char* op) {
  check_float_contiguous(x, "x", kCUDA);
  TORCH_CHECK(x.dim() == 5, "fastdistill: ", op, ": x must be [B, C, M, H, W], got ", x.sizes());
  TORCH_CHECK(size >= 1 && std::isfinite(alpha) && std::isfinite(beta) && std::isfinite(k),
              "fastdistill: ", op, ": need size >= 1 and finite alpha, beta, k");
}

int64_t row_size(const at::Tensor& x) { return x.size(2) * x.size(3) * x.size(4); }

at::Tensor lrn_cuda(const at::Tensor& x, int64_t size, double alpha, double beta, double k) {
  check_args(x, size, alpha, beta, k, "lrn");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty_like(x);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t B = x.size(0), C = x.size(1), E = row_size(x);
  if (x.scalar_type() == at::kFloat) {
    check_launch(cuda::lrn<float>(x.const_data_ptr<float>(), y.mutable_data_ptr<float>(), B, C, E, size,
                                  alpha, beta, k, stream), "lrn");
  } else {
    check_launch(cuda::lrn<double>(x.const_data_ptr<double>(), y.mutable_data_ptr<double>(), B, C, E, size,
                                   alpha, beta, k, stream), "lrn");
  }
  return y;
}

at::Tensor lrn_tangent_cuda(const at::Tensor& xd, const at::Tensor& x, int64_t size, double alpha,
                            double beta, double k) {
  check_args(x, size, alpha, beta, k, "lrn_tangent");
  check_float_contiguous(xd, "xd", kCUDA);
  check_like(xd, "xd", x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor yd = at::empty_like(x);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t B = x.size(0), C = x.size(1), E = row_size(x);
  if (x.scalar_type() == at::kFloat) {
    check_launch(cuda::lrn_tangent<float>(xd.const_data_ptr<float>(), x.const_data_ptr<float>(),
                                          yd.mutable_data_ptr<float>(), B, C, E, size, alpha, beta, k,
                                          stream), "lrn_tangent");
  } else {
    check_launch(cuda::lrn_tangent<double>(xd.const_data_ptr<double>(), x.const_data_ptr<double>(),
                                           yd.mutable_data_ptr<double>(), B, C, E, size, alpha, beta, k,
                                           stream), "lrn_tangent");
  }
  return yd;
}

at::Tensor lrn_backward_cuda(const at::Tensor& g, const at::Tensor& x, int64_t size, double alpha,
                             double beta, double k) {
  check_args(x, size, alpha, beta, k, "lrn_backward");
  check_float_contiguous(g, "g", kCUDA);
  TORCH_CHECK(g.dim() == 6 && g.sizes().slice(1) == x.sizes() && g.scalar_type() == x.scalar_type() &&
              g.device() == x.device(),
              "fastdistill: lrn_backward: g must be [S, B, C, M, H, W] with x's shape, dtype and device");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t S = g.size(0), B = x.size(0), C = x.size(1), E = row_size(x);
  at::Tensor xg = at::empty_like(g);
  at::Tensor work = at::empty({2 * B * C * E}, x.options().dtype(at::kDouble));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (x.scalar_type() == at::kFloat) {
    check_launch(cuda::lrn_backward<float>(g.const_data_ptr<float>(), x.const_data_ptr<float>(),
                                           xg.mutable_data_ptr<float>(), work.mutable_data_ptr<double>(),
                                           S, B, C, E, size, alpha, beta, k, stream), "lrn_backward");
  } else {
    check_launch(cuda::lrn_backward<double>(g.const_data_ptr<double>(), x.const_data_ptr<double>(),
                                            xg.mutable_data_ptr<double>(), work.mutable_data_ptr<double>(),
                                            S, B, C, E, size, alpha, beta, k, stream), "lrn_backward");
  }
  return xg;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdistill, CUDA, m) {
  m.impl("lrn", &lrn_cuda);
  m.impl("lrn_tangent", &lrn_tangent_cuda);
  m.impl("lrn_backward", &lrn_backward_cuda);
}

}  // namespace fastdistill
