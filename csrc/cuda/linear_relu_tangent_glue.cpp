// Torch glue of the CUDA linear_relu_tangent op: checks, device guard, current stream,
// registration. Built only when the installed torch has CUDA (setup.py); the kernels are
// linear_relu_tangent.cu, the schemas are declared in csrc/ops.cpp, and the op has no CPU kernel
// (on CPU the reference's two GEMMs are already torch's).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "../check.h"
#include "linear_relu_tangent.h"

namespace fastdistill {
namespace {

constexpr auto kCUDA = c10::DeviceType::CUDA;

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "fastdistill::", op, " (cuda): launch failed: ", cudaGetErrorString(err));
}

// h [K, F_in, n], W [K, F_out, F_in], b [K, F_out]: one dtype and device, contiguous.
void check_layer(const at::Tensor& h, const at::Tensor& W, const at::Tensor& b, const char* op) {
  check_float_contiguous(h, "h", kCUDA);
  check_float_contiguous(W, "W", kCUDA);
  check_float_contiguous(b, "b", kCUDA);
  TORCH_CHECK(h.dim() == 3, "fastdistill: ", op, ": h must be [K, F_in, n], got ", h.sizes());
  TORCH_CHECK(W.dim() == 3 && W.size(0) == h.size(0) && W.size(2) == h.size(1), "fastdistill: ", op,
              ": W must be [K, F_out, F_in] with h's K and F_in, got ", W.sizes(), " for h ", h.sizes());
  TORCH_CHECK(b.dim() == 2 && b.size(0) == W.size(0) && b.size(1) == W.size(1), "fastdistill: ", op,
              ": b must be [K, F_out], got ", b.sizes(), " for W ", W.sizes());
  TORCH_CHECK(W.scalar_type() == h.scalar_type() && b.scalar_type() == h.scalar_type() &&
                  W.device() == h.device() && b.device() == h.device(),
              "fastdistill: ", op, ": h, W and b must have one dtype and device");
}

at::Tensor linear_relu_cuda(const at::Tensor& h, const at::Tensor& W, const at::Tensor& b, bool relu) {
  check_layer(h, W, b, "linear_relu");
  const c10::cuda::CUDAGuard guard(h.device());
  const int64_t K = h.size(0), F_in = h.size(1), n = h.size(2), F_out = W.size(1);
  at::Tensor out = at::empty({K, F_out, n}, h.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (h.scalar_type() == at::kFloat) {
    check_launch(cuda::linear_relu<float>(h.const_data_ptr<float>(), W.const_data_ptr<float>(),
                                          b.const_data_ptr<float>(), out.mutable_data_ptr<float>(), K, F_in,
                                          F_out, n, relu, stream), "linear_relu");
  } else {
    check_launch(cuda::linear_relu<double>(h.const_data_ptr<double>(), W.const_data_ptr<double>(),
                                           b.const_data_ptr<double>(), out.mutable_data_ptr<double>(), K,
                                           F_in, F_out, n, relu, stream), "linear_relu");
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor> linear_relu_tangent_cuda(const at::Tensor& h, const at::Tensor& hd,
                                                            const at::Tensor& W, const at::Tensor& V,
                                                            const at::Tensor& b, const at::Tensor& bd,
                                                            bool relu) {
  check_layer(h, W, b, "linear_relu_tangent");
  check_float_contiguous(hd, "hd", kCUDA);
  check_float_contiguous(V, "V", kCUDA);
  check_float_contiguous(bd, "bd", kCUDA);
  check_like(hd, "hd", h, "h");
  check_like(V, "V", W, "W");
  check_like(bd, "bd", b, "b");
  const c10::cuda::CUDAGuard guard(h.device());
  const int64_t K = h.size(0), F_in = h.size(1), n = h.size(2), F_out = W.size(1);
  at::Tensor out = at::empty({K, F_out, n}, h.options());
  at::Tensor td = at::empty({K, F_out, n}, h.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (h.scalar_type() == at::kFloat) {
    check_launch(cuda::linear_relu_tangent<float>(h.const_data_ptr<float>(), hd.const_data_ptr<float>(),
                                                  W.const_data_ptr<float>(), V.const_data_ptr<float>(),
                                                  b.const_data_ptr<float>(), bd.const_data_ptr<float>(),
                                                  out.mutable_data_ptr<float>(), td.mutable_data_ptr<float>(),
                                                  K, F_in, F_out, n, relu, stream), "linear_relu_tangent");
  } else {
    check_launch(cuda::linear_relu_tangent<double>(h.const_data_ptr<double>(), hd.const_data_ptr<double>(),
                                                   W.const_data_ptr<double>(), V.const_data_ptr<double>(),
                                                   b.const_data_ptr<double>(), bd.const_data_ptr<double>(),
                                                   out.mutable_data_ptr<double>(),
                                                   td.mutable_data_ptr<double>(), K, F_in, F_out, n, relu,
                                                   stream), "linear_relu_tangent");
  }
  return {out, td};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdistill, CUDA, m) {
  m.impl("linear_relu", &linear_relu_cuda);
  m.impl("linear_relu_tangent", &linear_relu_tangent_cuda);
}

}  // namespace fastdistill
