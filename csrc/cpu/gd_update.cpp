// CPU kernel of fastdistill::gd_update: out = theta − lr · grad (one pass, two reads, one write).
//
// Rounds exactly like the reference `theta - lr * grad` (a product rounded, then a difference
// rounded): setup.py compiles with -ffp-contract=off so no fused multiply-add is formed.
// Parallel over contiguous chunks with at::parallel_for (needs -fopenmp at compile and link).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "../check.h"

namespace fastdistill {
namespace {

// Below ~32k elements a thread team costs more than it saves.
constexpr int64_t kGrain = 32768;

void gd_update_out_cpu(const at::Tensor& theta, const at::Tensor& grad, const at::Tensor& lr,
                        const at::Tensor& out) {
  check_float_contiguous(theta, "theta", c10::DeviceType::CPU);
  check_float_contiguous(grad, "grad", c10::DeviceType::CPU);
  check_float_contiguous(out, "out", c10::DeviceType::CPU);
  check_like(grad, "grad", theta, "theta");
  check_like(out, "out", theta, "theta");
  check_scalar_like(lr, "lr", theta, "theta");
  const int64_t n = theta.numel();
  AT_DISPATCH_FLOATING_TYPES(theta.scalar_type(), "fastdistill::gd_update (cpu)", [&] {
    const scalar_t eta = *lr.const_data_ptr<scalar_t>();
    const scalar_t* th = theta.const_data_ptr<scalar_t>();
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    // `out` may alias `theta` (an in-place step): each element is read before it is written.
    at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        o[i] = th[i] - eta * g[i];
      }
    });
  });
}

at::Tensor gd_update_cpu(const at::Tensor& theta, const at::Tensor& grad, const at::Tensor& lr) {
  check_float_contiguous(theta, "theta", c10::DeviceType::CPU);
  at::Tensor out = at::empty_like(theta, at::MemoryFormat::Contiguous);
  gd_update_out_cpu(theta, grad, lr, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdistill, CPU, m) {
  m.impl("gd_update", &gd_update_cpu);
  m.impl("gd_update_out", &gd_update_out_cpu);
}

}  // namespace fastdistill
