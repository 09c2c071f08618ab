// Torch glue of the CUDA ce_head op: checks, device guard, current stream, workspace,
// registration. Built only when the installed torch has CUDA (setup.py); the kernels are
// ce_head.cu, the schemas are declared in csrc/ops.cpp, and the op has no CPU kernel.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "../check.h"
#include "ce_head.h"

namespace fastdistill {
namespace {

constexpr auto kCUDA = c10::DeviceType::CUDA;

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "fastdistill::", op, " (cuda): launch failed: ", cudaGetErrorString(err));
}

// z [K, O, n]; Y [K or 1, O, n] with z's dtype and device; scale 0-d with z's dtype and device.
void check_head(const at::Tensor& z, const at::Tensor& Y, const at::Tensor& scale, const char* op) {
  check_float_contiguous(z, "z", kCUDA);
  check_float_contiguous(Y, "Y", kCUDA);
  TORCH_CHECK(z.dim() == 3, "fastdistill: ", op, ": z must be [K, O, n], got ", z.sizes());
  TORCH_CHECK(Y.dim() == 3 && (Y.size(0) == z.size(0) || Y.size(0) == 1) && Y.size(1) == z.size(1) &&
                  Y.size(2) == z.size(2),
              "fastdistill: ", op, ": Y must be [K or 1, O, n] for z ", z.sizes(), ", got ", Y.sizes());
  TORCH_CHECK(Y.scalar_type() == z.scalar_type() && Y.device() == z.device(), "fastdistill: ", op,
              ": Y must have z's dtype and device");
  check_scalar_like(scale, "scale", z, "z");
}

template <typename T>
void launch(const at::Tensor& z, const at::Tensor& Y, const at::Tensor& scale, const at::Tensor* zd,
            at::Tensor& loss, at::Tensor& dz, at::Tensor* dzd, at::Tensor* dy, const char* op) {
  const int64_t K = z.size(0), O = z.size(1), n = z.size(2);
  at::Tensor partial = at::empty({K * n}, z.options().dtype(at::kDouble));
  const bool shared = Y.size(0) == 1 && K != 1;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (zd == nullptr) {
    check_launch(cuda::ce_head<T>(z.const_data_ptr<T>(), Y.const_data_ptr<T>(), scale.const_data_ptr<T>(),
                                  loss.mutable_data_ptr<T>(), dz.mutable_data_ptr<T>(),
                                  partial.mutable_data_ptr<double>(), K, O, n, shared, stream), op);
  } else {
    check_launch(cuda::ce_head_tangent<T>(z.const_data_ptr<T>(), Y.const_data_ptr<T>(),
                                          scale.const_data_ptr<T>(), zd->const_data_ptr<T>(),
                                          loss.mutable_data_ptr<T>(), dz.mutable_data_ptr<T>(),
                                          dzd->mutable_data_ptr<T>(), dy->mutable_data_ptr<T>(),
                                          partial.mutable_data_ptr<double>(), K, O, n, shared, stream), op);
  }
}

std::tuple<at::Tensor, at::Tensor> ce_head_cuda(const at::Tensor& z, const at::Tensor& Y,
                                                const at::Tensor& scale) {
  check_head(z, Y, scale, "ce_head");
  const c10::cuda::CUDAGuard guard(z.device());
  at::Tensor loss = at::empty({z.size(0)}, z.options());
  at::Tensor dz = at::empty_like(z);
  if (z.scalar_type() == at::kFloat) {
    launch<float>(z, Y, scale, nullptr, loss, dz, nullptr, nullptr, "ce_head");
  } else {
    launch<double>(z, Y, scale, nullptr, loss, dz, nullptr, nullptr, "ce_head");
  }
  return {loss, dz};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ce_head_tangent_cuda(const at::Tensor& z,
                                                                                const at::Tensor& Y,
                                                                                const at::Tensor& scale,
                                                                                const at::Tensor& zd) {
  check_head(z, Y, scale, "ce_head_tangent");
  check_float_contiguous(zd, "zd", kCUDA);
  check_like(zd, "zd", z, "z");
  const c10::cuda::CUDAGuard guard(z.device());
  at::Tensor loss = at::empty({z.size(0)}, z.options());
  at::Tensor dz = at::empty_like(z), dzd = at::empty_like(z), dy = at::empty_like(z);
  if (z.scalar_type() == at::kFloat) {
    launch<float>(z, Y, scale, &zd, loss, dz, &dzd, &dy, "ce_head_tangent");
  } else {
    launch<double>(z, Y, scale, &zd, loss, dz, &dzd, &dy, "ce_head_tangent");
  }
  return {loss, dz, dzd, dy};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdistill, CUDA, m) {
  m.impl("ce_head", &ce_head_cuda);
  m.impl("ce_head_tangent", &ce_head_tangent_cuda);
}

}  // namespace fastdistill
