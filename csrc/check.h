// Argument checks shared by every C++/CUDA entry point of fastdistill._C.
//
// Each entry point checks shape, dtype, device and contiguity before touching a data pointer:
// the kernels index raw memory, so a wrong stride or size would read or write out of bounds.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace fastdistill {

// `t` lives on `device_type`, is contiguous and is float32 or float64.
inline void check_float_contiguous(const at::Tensor& t, const char* name, c10::DeviceType device_type) {
  TORCH_CHECK(t.device().type() == device_type, "fastdistill: ", name, " must be a ",
              c10::DeviceTypeName(device_type), " tensor, got one on ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble,
              "fastdistill: ", name, " must be float32 or float64, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "fastdistill: ", name, " must be contiguous (call .contiguous())");
}

// `t` has exactly the sizes, dtype and device of `ref`.
inline void check_like(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.sizes() == ref.sizes(), "fastdistill: ", name, " must have the shape of ", ref_name,
              " ", ref.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "fastdistill: ", name, " must have the dtype of ",
              ref_name, " (", ref.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), "fastdistill: ", name, " must be on the device of ", ref_name,
              " (", ref.device(), "), got ", t.device());
}

// A 0-d tensor with the dtype and device of `ref` (a learning rate, a momentum coefficient).
inline void check_scalar_like(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.dim() == 0, "fastdistill: ", name, " must be a 0-d tensor, got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "fastdistill: ", name, " must have the dtype of ",
              ref_name, " (", ref.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), "fastdistill: ", name, " must be on the device of ", ref_name,
              " (", ref.device(), "), got ", t.device());
}

}  // namespace fastdistill
