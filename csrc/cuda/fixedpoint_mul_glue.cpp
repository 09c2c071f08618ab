// Torch glue of the CUDA fixedpoint_mul / fixedpoint_unmul kernels: checks, device guard, current
// stream, registration. Built only when the installed torch has CUDA (setup.py); the kernels are
// fixedpoint_mul.cu and the schemas are declared in csrc/cpu/fixedpoint_mul.cpp (always built).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "../fixedpoint_math.h"
#include "fixedpoint_mul.h"

namespace fastdistill {
namespace {

void check_state(const at::Tensor& t, const char* name, const at::Tensor& X, const char* op) {
  TORCH_CHECK(t.device().type() == c10::DeviceType::CUDA, "fastdistill::", op, ": ", name,
              " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == X.device(), "fastdistill::", op, ": ", name,
              " must be on the device of X (", X.device(), "), got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kLong, "fastdistill::", op, ": ", name,
              " must be int64, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "fastdistill::", op, ": ", name,
              " must be contiguous (call .contiguous())");
  TORCH_CHECK(t.sizes() == X.sizes(), "fastdistill::", op, ": ", name, " must have the shape of X ",
              X.sizes(), ", got ", t.sizes());
}

void check_args(const at::Tensor& X, const at::Tensor& c, int64_t n, int64_t d, const char* op) {
  check_state(X, "X", X, op);
  check_state(c, "c", X, op);
  TORCH_CHECK(0 < n && n < d && d <= fixedpoint::kMaxDenominator, "fastdistill::", op,
              ": β = n/d needs 0 < n < d ≤ 2^20, got n = ", n, ", d = ", d);
}

void check_outs(const at::Tensor& X, const at::Tensor& X_out, const at::Tensor& c_out, const char* op) {
  check_state(X_out, "X_out", X, op);
  check_state(c_out, "c_out", X, op);
  TORCH_CHECK(X.numel() == 0 || X_out.data_ptr() != c_out.data_ptr(), "fastdistill::", op,
              ": X_out and c_out must be different tensors");
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "fastdistill::", op, " (cuda): launch failed: ",
              cudaGetErrorString(err));
}

void fixedpoint_mul_out_cuda(const at::Tensor& X, const at::Tensor& c, int64_t n, int64_t d,
                             int64_t floor_word, int64_t threshold, const at::Tensor& X_out,
                             const at::Tensor& c_out) {
  check_args(X, c, n, d, "fixedpoint_mul");
  TORCH_CHECK(1 <= floor_word && floor_word < threshold, "fastdistill::fixedpoint_mul: needs "
              "1 ≤ floor < threshold, got floor = ", floor_word, ", threshold = ", threshold);
  check_outs(X, X_out, c_out, "fixedpoint_mul");
  const c10::cuda::CUDAGuard guard(X.device());
  check_launch(cuda::fixedpoint_mul(X.const_data_ptr<int64_t>(), c.const_data_ptr<int64_t>(),
                                    X_out.mutable_data_ptr<int64_t>(), c_out.mutable_data_ptr<int64_t>(),
                                    X.numel(), n, d, floor_word, threshold,
                                    c10::cuda::getCurrentCUDAStream()),
               "fixedpoint_mul");
}

std::tuple<at::Tensor, at::Tensor> fixedpoint_mul_cuda(const at::Tensor& X, const at::Tensor& c,
                                                       int64_t n, int64_t d, int64_t floor_word,
                                                       int64_t threshold) {
  check_args(X, c, n, d, "fixedpoint_mul");
  at::Tensor X_out = at::empty_like(X), c_out = at::empty_like(c);
  fixedpoint_mul_out_cuda(X, c, n, d, floor_word, threshold, X_out, c_out);
  return {X_out, c_out};
}

void fixedpoint_unmul_out_cuda(const at::Tensor& X, const at::Tensor& c, int64_t n, int64_t d,
                               const at::Tensor& X_out, const at::Tensor& c_out) {
  check_args(X, c, n, d, "fixedpoint_unmul");
  check_outs(X, X_out, c_out, "fixedpoint_unmul");
  const c10::cuda::CUDAGuard guard(X.device());
  check_launch(cuda::fixedpoint_unmul(X.const_data_ptr<int64_t>(), c.const_data_ptr<int64_t>(),
                                      X_out.mutable_data_ptr<int64_t>(),
                                      c_out.mutable_data_ptr<int64_t>(), X.numel(), n, d,
                                      c10::cuda::getCurrentCUDAStream()),
               "fixedpoint_unmul");
}

std::tuple<at::Tensor, at::Tensor> fixedpoint_unmul_cuda(const at::Tensor& X, const at::Tensor& c,
                                                         int64_t n, int64_t d) {
  check_args(X, c, n, d, "fixedpoint_unmul");
  at::Tensor X_out = at::empty_like(X), c_out = at::empty_like(c);
  fixedpoint_unmul_out_cuda(X, c, n, d, X_out, c_out);
  return {X_out, c_out};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdistill, CUDA, m) {
  m.impl("fixedpoint_mul", &fixedpoint_mul_cuda);
  m.impl("fixedpoint_mul_out", &fixedpoint_mul_out_cuda);
  m.impl("fixedpoint_unmul", &fixedpoint_unmul_cuda);
  m.impl("fixedpoint_unmul_out", &fixedpoint_unmul_out_cuda);
}

}  // namespace fastdistill
