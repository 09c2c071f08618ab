// Torch glue of the CUDA maxpool3s2 op: checks, device guard, current stream, registration.
// Built only when the installed torch has CUDA (setup.py); the kernels are maxpool3s2.cu and
// the schemas are declared in csrc/cpu/maxpool3s2.cpp (always built).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "../check.h"
#include "maxpool3s2.h"

namespace fastdistill {
namespace {

constexpr auto kCUDA = c10::DeviceType::CUDA;

inline int64_t pooled(int64_t n) { return (n - 1) / 2 + 1; }

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "fastdistill::", op, " (cuda): launch failed: ", cudaGetErrorString(err));
}

void check_index(const at::Tensor& idx, const at::Tensor& ref, const char* op) {
  TORCH_CHECK(idx.device() == ref.device() && idx.scalar_type() == at::kLong && idx.is_contiguous(),
              "fastdistill: ", op, ": idx must be a contiguous int64 tensor on ", ref.device());
  TORCH_CHECK(idx.dim() == 4, "fastdistill: ", op, ": idx must be [P, M, h, w], got ", idx.sizes());
}

std::tuple<at::Tensor, at::Tensor> maxpool3s2_cuda(const at::Tensor& z) {
  check_float_contiguous(z, "z", kCUDA);
  TORCH_CHECK(z.dim() == 4 && z.size(2) >= 1 && z.size(3) >= 1,
              "fastdistill: maxpool3s2: z must be [P, M, H, W] with H, W >= 1, got ", z.sizes());
  const int64_t P = z.size(0), M = z.size(1), H = z.size(2), W = z.size(3);
  const c10::cuda::CUDAGuard guard(z.device());
  at::Tensor p = at::empty({P, M, pooled(H), pooled(W)}, z.options());
  at::Tensor idx = at::empty({P, M, pooled(H), pooled(W)}, z.options().dtype(at::kLong));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (z.scalar_type() == at::kFloat) {
    check_launch(cuda::maxpool3s2<float>(z.const_data_ptr<float>(), p.mutable_data_ptr<float>(),
                                         idx.mutable_data_ptr<int64_t>(), P, M, H, W, stream), "maxpool3s2");
  } else {
    check_launch(cuda::maxpool3s2<double>(z.const_data_ptr<double>(), p.mutable_data_ptr<double>(),
                                          idx.mutable_data_ptr<int64_t>(), P, M, H, W, stream), "maxpool3s2");
  }
  return {p, idx};
}

at::Tensor maxpool3s2_tangent_cuda(const at::Tensor& zd, const at::Tensor& idx) {
  check_float_contiguous(zd, "zd", kCUDA);
  check_index(idx, zd, "maxpool3s2_tangent");
  TORCH_CHECK(zd.dim() == 4 && zd.size(2) >= 1 && zd.size(3) >= 1 && idx.size(0) == zd.size(0) &&
              idx.size(1) == zd.size(1) && idx.size(2) == pooled(zd.size(2)) &&
              idx.size(3) == pooled(zd.size(3)),
              "fastdistill: maxpool3s2_tangent: idx must be [P, M, (H-1)/2+1, (W-1)/2+1] for zd [P, M, H, W]");
  const int64_t P = zd.size(0), M = zd.size(1), H = zd.size(2), W = zd.size(3);
  const c10::cuda::CUDAGuard guard(zd.device());
  at::Tensor pd = at::empty(idx.sizes(), zd.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (zd.scalar_type() == at::kFloat) {
    check_launch(cuda::maxpool3s2_tangent<float>(zd.const_data_ptr<float>(), idx.const_data_ptr<int64_t>(),
                                                 pd.mutable_data_ptr<float>(), P, M, H, W, stream),
                 "maxpool3s2_tangent");
  } else {
    check_launch(cuda::maxpool3s2_tangent<double>(zd.const_data_ptr<double>(), idx.const_data_ptr<int64_t>(),
                                                  pd.mutable_data_ptr<double>(), P, M, H, W, stream),
                 "maxpool3s2_tangent");
  }
  return pd;
}

at::Tensor maxpool3s2_backward_cuda(const at::Tensor& d, const at::Tensor& idx, int64_t H, int64_t W) {
  check_float_contiguous(d, "d", kCUDA);
  check_index(idx, d, "maxpool3s2_backward");
  TORCH_CHECK(d.dim() == 5 && d.sizes().slice(1) == idx.sizes(),
              "fastdistill: maxpool3s2_backward: d must be [S, P, M, h, w] with idx's shape");
  TORCH_CHECK(H >= 1 && W >= 1 && pooled(H) == idx.size(2) && pooled(W) == idx.size(3),
              "fastdistill: maxpool3s2_backward: an ", H, "×", W, " input does not pool to ",
              idx.size(2), "×", idx.size(3));
  const int64_t S = d.size(0), P = idx.size(0), M = idx.size(1);
  const c10::cuda::CUDAGuard guard(d.device());
  at::Tensor dz = at::empty({S, P, M, H, W}, d.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (d.scalar_type() == at::kFloat) {
    check_launch(cuda::maxpool3s2_backward<float>(d.const_data_ptr<float>(), idx.const_data_ptr<int64_t>(),
                                                  dz.mutable_data_ptr<float>(), S, P, M, H, W, stream),
                 "maxpool3s2_backward");
  } else {
    check_launch(cuda::maxpool3s2_backward<double>(d.const_data_ptr<double>(), idx.const_data_ptr<int64_t>(),
                                                   dz.mutable_data_ptr<double>(), S, P, M, H, W, stream),
                 "maxpool3s2_backward");
  }
  return dz;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdistill, CUDA, m) {
  m.impl("maxpool3s2", &maxpool3s2_cuda);
  m.impl("maxpool3s2_tangent", &maxpool3s2_tangent_cuda);
  m.impl("maxpool3s2_backward", &maxpool3s2_backward_cuda);
}

}  // namespace fastdistill
