// Torch glue of the CUDA LeNet layer ops: checks, device guard, current stream, registration.
// Built only when the installed torch has CUDA (setup.py); the kernels are lenet_ops.cu and the
// schemas are declared in csrc/cpu/lenet_ops.cpp (always built).
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAStream.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "../check.h"
#include "lenet_ops.h"

namespace fastdistill {
namespace {

constexpr auto kCUDA = c10::DeviceType::CUDA;

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "fastdistill::", op, " (cuda): launch failed: ", cudaGetErrorString(err));
}

void check_index(const at::Tensor& idx, const at::Tensor& a, const char* op) {
  TORCH_CHECK(idx.device() == a.device() && idx.scalar_type() == at::kLong && idx.is_contiguous(),
              "fastdistill: ", op, ": idx must be a contiguous int64 tensor on ", a.device());
  TORCH_CHECK(idx.sizes() == a.sizes(), "fastdistill: ", op, ": idx and a must have one shape");
}

at::Tensor im2col5_cuda(const at::Tensor& a, int64_t pad) {
  check_float_contiguous(a, "a", kCUDA);
  TORCH_CHECK(a.dim() == 5 && pad >= 0, "fastdistill: im2col5: a must be [B, C, M, H, W], pad >= 0");
  const int64_t B = a.size(0), C = a.size(1), M = a.size(2), H = a.size(3), W = a.size(4);
  const int64_t Ho = H + 2 * pad - 4, Wo = W + 2 * pad - 4;
  TORCH_CHECK(Ho >= 1 && Wo >= 1, "fastdistill: im2col5: image smaller than the 5×5 kernel");
  const c10::cuda::CUDAGuard guard(a.device());
  at::Tensor u = at::empty({B, C * 25, M * Ho * Wo}, a.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (a.scalar_type() == at::kFloat) {
    check_launch(cuda::im2col5<float>(a.const_data_ptr<float>(), u.mutable_data_ptr<float>(), B, C, M,
                                      H, W, pad, stream), "im2col5");
  } else {
    check_launch(cuda::im2col5<double>(a.const_data_ptr<double>(), u.mutable_data_ptr<double>(), B, C,
                                       M, H, W, pad, stream), "im2col5");
  }
  return u;
}

at::Tensor col2im5_cuda(const at::Tensor& d, int64_t H, int64_t W, int64_t pad) {
  check_float_contiguous(d, "d", kCUDA);
  TORCH_CHECK(d.dim() == 3 && pad >= 0 && H >= 1 && W >= 1, "fastdistill: col2im5: bad arguments");
  const int64_t Ho = H + 2 * pad - 4, Wo = W + 2 * pad - 4;
  TORCH_CHECK(Ho >= 1 && Wo >= 1, "fastdistill: col2im5: image smaller than the 5×5 kernel");
  TORCH_CHECK(d.size(1) % 25 == 0, "fastdistill: col2im5: d.size(1) must be C·25, got ", d.size(1));
  TORCH_CHECK(d.size(2) % (Ho * Wo) == 0, "fastdistill: col2im5: d.size(2) must be M·", Ho, "·", Wo);
  const int64_t B = d.size(0), C = d.size(1) / 25, M = d.size(2) / (Ho * Wo);
  const c10::cuda::CUDAGuard guard(d.device());
  at::Tensor out = at::empty({B, C, M, H, W}, d.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (d.scalar_type() == at::kFloat) {
    check_launch(cuda::col2im5<float>(d.const_data_ptr<float>(), out.mutable_data_ptr<float>(), B, C, M,
                                      H, W, pad, stream), "col2im5");
  } else {
    check_launch(cuda::col2im5<double>(d.const_data_ptr<double>(), out.mutable_data_ptr<double>(), B, C,
                                       M, H, W, pad, stream), "col2im5");
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor> pool2_relu_cuda(const at::Tensor& z, const at::Tensor& bias) {
  check_float_contiguous(z, "z", kCUDA);
  TORCH_CHECK(z.dim() == 4 && z.size(2) % 2 == 0 && z.size(3) % 2 == 0,
              "fastdistill: pool2_relu: z must be [P, M, H, W] with H and W even");
  check_float_contiguous(bias, "bias", kCUDA);
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == z.size(0) && bias.scalar_type() == z.scalar_type(),
              "fastdistill: pool2_relu: bias must be [P] with z's dtype");
  const int64_t P = z.size(0), M = z.size(1), H = z.size(2), W = z.size(3);
  const c10::cuda::CUDAGuard guard(z.device());
  at::Tensor a = at::empty({P, M, H / 2, W / 2}, z.options());
  at::Tensor idx = at::empty({P, M, H / 2, W / 2}, z.options().dtype(at::kLong));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (z.scalar_type() == at::kFloat) {
    check_launch(cuda::pool2_relu<float>(z.const_data_ptr<float>(), bias.const_data_ptr<float>(),
                                         a.mutable_data_ptr<float>(), idx.mutable_data_ptr<int64_t>(),
                                         P, M, H, W, stream), "pool2_relu");
  } else {
    check_launch(cuda::pool2_relu<double>(z.const_data_ptr<double>(), bias.const_data_ptr<double>(),
                                          a.mutable_data_ptr<double>(), idx.mutable_data_ptr<int64_t>(),
                                          P, M, H, W, stream), "pool2_relu");
  }
  return {a, idx};
}

at::Tensor pool2_relu_tangent_cuda(const at::Tensor& zd, const at::Tensor& bias_d, const at::Tensor& idx,
                                   const at::Tensor& a) {
  check_float_contiguous(a, "a", kCUDA);
  check_float_contiguous(zd, "zd", kCUDA);
  check_float_contiguous(bias_d, "bias_d", kCUDA);
  check_index(idx, a, "pool2_relu_tangent");
  TORCH_CHECK(a.dim() == 4 && zd.dim() == 4 && zd.size(0) == a.size(0) && zd.size(1) == a.size(1) &&
              zd.size(2) == 2 * a.size(2) && zd.size(3) == 2 * a.size(3) &&
              zd.scalar_type() == a.scalar_type(),
              "fastdistill: pool2_relu_tangent: zd must be [P, M, 2h, 2w] with a's dtype");
  TORCH_CHECK(bias_d.dim() == 1 && bias_d.size(0) == a.size(0) && bias_d.scalar_type() == a.scalar_type(),
              "fastdistill: pool2_relu_tangent: bias_d must be [P] with a's dtype");
  const c10::cuda::CUDAGuard guard(a.device());
  at::Tensor ad = at::empty_like(a);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t P = a.size(0), M = a.size(1), h = a.size(2), w = a.size(3);
  if (a.scalar_type() == at::kFloat) {
    check_launch(cuda::pool2_relu_tangent<float>(zd.const_data_ptr<float>(), bias_d.const_data_ptr<float>(),
                                                 idx.const_data_ptr<int64_t>(), a.const_data_ptr<float>(),
                                                 ad.mutable_data_ptr<float>(), P, M, h, w, stream),
                 "pool2_relu_tangent");
  } else {
    check_launch(cuda::pool2_relu_tangent<double>(zd.const_data_ptr<double>(), bias_d.const_data_ptr<double>(),
                                                  idx.const_data_ptr<int64_t>(), a.const_data_ptr<double>(),
                                                  ad.mutable_data_ptr<double>(), P, M, h, w, stream),
                 "pool2_relu_tangent");
  }
  return ad;
}

std::tuple<at::Tensor, at::Tensor> pool2_relu_backward_cuda(const at::Tensor& d, const at::Tensor& idx,
                                                            const at::Tensor& a) {
  check_float_contiguous(a, "a", kCUDA);
  check_float_contiguous(d, "d", kCUDA);
  check_index(idx, a, "pool2_relu_backward");
  TORCH_CHECK(a.dim() == 4 && d.dim() == 5 && d.sizes().slice(1) == a.sizes() &&
              d.scalar_type() == a.scalar_type(),
              "fastdistill: pool2_relu_backward: d must be [S, P, M, h, w] with a's shape and dtype");
  const int64_t S = d.size(0), P = a.size(0), M = a.size(1), h = a.size(2), w = a.size(3);
  const c10::cuda::CUDAGuard guard(a.device());
  at::Tensor dz = at::empty({S, P, M, 2 * h, 2 * w}, d.options());
  at::Tensor db = at::empty({S, P}, d.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (a.scalar_type() == at::kFloat) {
    check_launch(cuda::pool2_relu_backward<float>(d.const_data_ptr<float>(), idx.const_data_ptr<int64_t>(),
                                                  a.const_data_ptr<float>(), dz.mutable_data_ptr<float>(),
                                                  db.mutable_data_ptr<float>(), S, P, M, h, w, stream),
                 "pool2_relu_backward");
  } else {
    check_launch(cuda::pool2_relu_backward<double>(d.const_data_ptr<double>(), idx.const_data_ptr<int64_t>(),
                                                   a.const_data_ptr<double>(), dz.mutable_data_ptr<double>(),
                                                   db.mutable_data_ptr<double>(), S, P, M, h, w, stream),
                 "pool2_relu_backward");
  }
  return {dz, db};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdistill, CUDA, m) {
  m.impl("im2col5", &im2col5_cuda);
  m.impl("col2im5", &col2im5_cuda);
  m.impl("pool2_relu", &pool2_relu_cuda);
  m.impl("pool2_relu_tangent", &pool2_relu_tangent_cuda);
  m.impl("pool2_relu_backward", &pool2_relu_backward_cuda);
}

}  // namespace fastdistill
