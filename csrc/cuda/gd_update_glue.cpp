// Torch glue of the CUDA gd_update kernel: checks, device guard, current stream, registration.
// Built only when the installed torch has CUDA (setup.py); the kernel itself is gd_update.cu.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../check.h"
#include "gd_update.h"

namespace fastdistill {
namespace {

void gd_update_out_cuda(const at::Tensor& theta, const at::Tensor& grad, const at::Tensor& lr,
                         const at::Tensor& out) {
  check_float_contiguous(theta, "theta", c10::DeviceType::CUDA);
  check_float_contiguous(grad, "grad", c10::DeviceType::CUDA);
  check_float_contiguous(out, "out", c10::DeviceType::CUDA);
  check_like(grad, "grad", theta, "theta");
  check_like(out, "out", theta, "theta");
  check_scalar_like(lr, "lr", theta, "theta");
  const c10::cuda::CUDAGuard guard(theta.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t n = theta.numel();
  cudaError_t err;
  if (theta.scalar_type() == at::kFloat) {
    err = cuda::gd_update_f32(theta.const_data_ptr<float>(), grad.const_data_ptr<float>(),
                              lr.const_data_ptr<float>(), out.mutable_data_ptr<float>(), n, stream);
  } else {
    err = cuda::gd_update_f64(theta.const_data_ptr<double>(), grad.const_data_ptr<double>(),
                              lr.const_data_ptr<double>(), out.mutable_data_ptr<double>(), n, stream);
  }
  TORCH_CHECK(err == cudaSuccess, "fastdistill::gd_update (cuda): launch failed: ", cudaGetErrorString(err));
}

at::Tensor gd_update_cuda(const at::Tensor& theta, const at::Tensor& grad, const at::Tensor& lr) {
  check_float_contiguous(theta, "theta", c10::DeviceType::CUDA);
  at::Tensor out = at::empty_like(theta, at::MemoryFormat::Contiguous);
  gd_update_out_cuda(theta, grad, lr, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdistill, CUDA, m) {
  m.impl("gd_update", &gd_update_cuda);
  m.impl("gd_update_out", &gd_update_out_cuda);
}

}  // namespace fastdistill
