// CPU kernels of the LeNet layer ops used by the batched multi-network engine
// (fastdistill/models/batched.py): the memory-bound passes around its GEMMs.
//
//   im2col5(a, pad)                 5×5 patches, a [B, C, M, H, W] -> [B, C·25, M·H'·W']
//   col2im5(d, H, W, pad)           its adjoint (a gather-sum per output pixel)
//   pool2_relu(z, bias)             2×2 max-pool, + bias, ReLU; z [P, M, H, W] -> (a, argmax)
//   pool2_relu_tangent(zd, bd, idx, a)       forward-mode tangent of pool2_relu
//   pool2_relu_backward(d, idx, a, H, W)     adjoint of pool2_relu for S stacked gradients
//
// Layouts follow the engine: M is the number of images (one plane per (network, channel)),
// H' = H + 2·pad − 4. Every kernel is a pure function of its inputs with a fixed summation
// order (no atomics), so two runs give bit-identical results; im2col5, col2im5, pool2_relu and
// its tangent round exactly like their references in fastdistill/ops (setup.py compiles with
// -ffp-contract=off: no fused multiply-add). Parallel over independent output rows or planes
// with at::parallel_for (OpenMP; -fopenmp at compile and link).
//
// The schemas live here (a TORCH_LIBRARY_FRAGMENT of the `fastdistill` namespace that
// csrc/ops.cpp opens) so these ops build and register as one translation unit.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

#include "../check.h"
#include "pool2_window.h"

namespace fastdistill {
namespace {

constexpr int64_t kK = 5;  // kernel side of the convolutions (LeNet, AlexCifarNet)

void check_dim(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.dim() == dim, "fastdistill: ", name, " must have ", dim, " dimensions, got shape ",
              t.sizes());
}

// ------------------------------------------------------------------------------------ im2col5
at::Tensor im2col5_cpu(const at::Tensor& a, int64_t pad) {
  check_float_contiguous(a, "a", c10::DeviceType::CPU);
  check_dim(a, "a", 5);
  TORCH_CHECK(pad >= 0, "fastdistill: im2col5: pad must be >= 0, got ", pad);
  const int64_t B = a.size(0), C = a.size(1), M = a.size(2), H = a.size(3), W = a.size(4);
  const int64_t Ho = H + 2 * pad - kK + 1, Wo = W + 2 * pad - kK + 1;
  TORCH_CHECK(Ho >= 1 && Wo >= 1, "fastdistill: im2col5: a ", H, "×", W, " image with pad ", pad,
              " is smaller than the 5×5 kernel");
  at::Tensor u = at::empty({B, C * kK * kK, M * Ho * Wo}, a.options());
  const int64_t L = M * Ho * Wo;
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "fastdistill::im2col5 (cpu)", [&] {
    const scalar_t* src = a.const_data_ptr<scalar_t>();
    scalar_t* dst = u.mutable_data_ptr<scalar_t>();
    // one output row (b, c, i, j) per task: M·H'·W' values, written once each
    at::parallel_for(0, B * C * kK * kK, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t j = r % kK, i = (r / kK) % kK, bc = r / (kK * kK);
        const scalar_t* plane0 = src + bc * M * H * W;
        scalar_t* row = dst + r * L;
        // columns x whose source column x + j − pad lies inside the image
        const int64_t x0 = std::max<int64_t>(0, pad - j);
        const int64_t x1 = std::min<int64_t>(Wo, W + pad - j);
        for (int64_t m = 0; m < M; ++m) {
          const scalar_t* plane = plane0 + m * H * W;
          for (int64_t y = 0; y < Ho; ++y) {
            scalar_t* out = row + (m * Ho + y) * Wo;
            const int64_t yy = y + i - pad;
            if (yy < 0 || yy >= H || x1 <= x0) {
              for (int64_t x = 0; x < Wo; ++x) out[x] = scalar_t(0);
              continue;
            }
            // plain loops, not memcpy/fill calls: the runs are short (10 values for conv2)
            const scalar_t* in = plane + yy * W + (j - pad);
            for (int64_t x = 0; x < x0; ++x) out[x] = scalar_t(0);
            for (int64_t x = x0; x < x1; ++x) out[x] = in[x];
            for (int64_t x = x1; x < Wo; ++x) out[x] = scalar_t(0);
          }
        }
      }
    });
  });
  return u;
}

// ------------------------------------------------------------------------------------ col2im5
// out[b, c, m, yy, xx] = Σ_{i, j} d[b, (c, i, j), (m, yy + pad − i, xx + pad − j)] over the
// in-range terms, summed in (i, j) order -- the order of the reference's 25 shifted adds.
at::Tensor col2im5_cpu(const at::Tensor& d, int64_t H, int64_t W, int64_t pad) {
  check_float_contiguous(d, "d", c10::DeviceType::CPU);
  check_dim(d, "d", 3);
  TORCH_CHECK(pad >= 0 && H >= 1 && W >= 1, "fastdistill: col2im5: need H, W >= 1 and pad >= 0");
  const int64_t Ho = H + 2 * pad - kK + 1, Wo = W + 2 * pad - kK + 1;
  TORCH_CHECK(Ho >= 1 && Wo >= 1, "fastdistill: col2im5: the image is smaller than the kernel");
  TORCH_CHECK(d.size(1) % (kK * kK) == 0, "fastdistill: col2im5: d.size(1) must be C·25, got ",
              d.size(1));
  TORCH_CHECK(d.size(2) % (Ho * Wo) == 0, "fastdistill: col2im5: d.size(2) must be M·", Ho, "·",
              Wo, " for a ", H, "×", W, " image with pad ", pad, ", got ", d.size(2));
  const int64_t B = d.size(0), C = d.size(1) / (kK * kK), M = d.size(2) / (Ho * Wo);
  const int64_t L = M * Ho * Wo;
  at::Tensor out = at::empty({B, C, M, H, W}, d.options());
  AT_DISPATCH_FLOATING_TYPES(d.scalar_type(), "fastdistill::col2im5 (cpu)", [&] {
    const scalar_t* src = d.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    // one output plane (b, c, m) per task; it stays in L1 while its 25 source rows stream by
    at::parallel_for(0, B * C * M, 1, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const int64_t m = p % M, bc = p / M;
        scalar_t* plane = dst + p * H * W;
        std::fill(plane, plane + H * W, scalar_t(0));
        for (int64_t i = 0; i < kK; ++i) {
          for (int64_t j = 0; j < kK; ++j) {
            const scalar_t* row = src + (bc * kK * kK + i * kK + j) * L + m * Ho * Wo;
            const int64_t x0 = std::max<int64_t>(0, pad - j);
            const int64_t x1 = std::min<int64_t>(Wo, W + pad - j);
            for (int64_t y = std::max<int64_t>(0, pad - i); y < std::min<int64_t>(Ho, H + pad - i); ++y) {
              scalar_t* o = plane + (y + i - pad) * W + (j - pad);
              const scalar_t* s = row + y * Wo;
              for (int64_t x = x0; x < x1; ++x) o[x] += s[x];
            }
          }
        }
      }
    });
  });
  return out;
}

// --------------------------------------------------------------------------------- pool2_relu
void check_pool_pair(const at::Tensor& idx, const at::Tensor& a, const char* op) {
  check_float_contiguous(a, "a", c10::DeviceType::CPU);
  check_dim(a, "a", 4);
  TORCH_CHECK(idx.device().is_cpu() && idx.scalar_type() == at::kLong && idx.is_contiguous(),
              "fastdistill: ", op, ": idx must be a contiguous int64 CPU tensor (pool2_relu's "
              "argmax), got ", idx.scalar_type(), " on ", idx.device());
  TORCH_CHECK(idx.sizes() == a.sizes(), "fastdistill: ", op, ": idx and a must have one shape, got ",
              idx.sizes(), " and ", a.sizes());
}

void check_bias(const at::Tensor& b, const char* name, const at::Tensor& ref, int64_t planes) {
  check_float_contiguous(b, name, c10::DeviceType::CPU);
  TORCH_CHECK(b.dim() == 1 && b.size(0) == planes, "fastdistill: ", name, " must be [", planes,
              "] (one per plane), got ", b.sizes());
  TORCH_CHECK(b.scalar_type() == ref.scalar_type(), "fastdistill: ", name, " must have dtype ",
              ref.scalar_type(), ", got ", b.scalar_type());
}

// a = relu(max_{2×2}(z) + b); idx = flat index (within the H×W plane) of the first maximum in
// scan order, like max_pool2d(return_indices=True) (a NaN counts as the maximum).
std::tuple<at::Tensor, at::Tensor> pool2_relu_cpu(const at::Tensor& z, const at::Tensor& bias) {
  check_float_contiguous(z, "z", c10::DeviceType::CPU);
  check_dim(z, "z", 4);
  const int64_t P = z.size(0), M = z.size(1), H = z.size(2), W = z.size(3);
  TORCH_CHECK(H % 2 == 0 && W % 2 == 0 && H > 0 && W > 0,
              "fastdistill: pool2_relu: H and W must be even and positive, got ", H, "×", W);
  check_bias(bias, "bias", z, P);
  const int64_t h = H / 2, w = W / 2;
  at::Tensor a = at::empty({P, M, h, w}, z.options());
  at::Tensor idx = at::empty({P, M, h, w}, z.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "fastdistill::pool2_relu (cpu)", [&] {
    const scalar_t* src = z.const_data_ptr<scalar_t>();
    const scalar_t* bb = bias.const_data_ptr<scalar_t>();
    scalar_t* out = a.mutable_data_ptr<scalar_t>();
    int64_t* arg = idx.mutable_data_ptr<int64_t>();
    at::parallel_for(0, P * M, 1, [&](int64_t begin, int64_t end) {
      for (int64_t q = begin; q < end; ++q) {
        const scalar_t b = bb[q / M];
        const scalar_t* plane = src + q * H * W;
        scalar_t* o = out + q * h * w;
        int64_t* ix = arg + q * h * w;
        for (int64_t y = 0; y < h; ++y) {
          for (int64_t x = 0; x < w; ++x)
            o[y * w + x] = pool2_relu_window<scalar_t, int64_t>(plane, (2 * y) * W + 2 * x, W, b,
                                                                ix + y * w + x);
        }
      }
    });
  });
  return {a, idx};
}

// ȧ = (ż[idx] + ḃ) · [a > 0]
at::Tensor pool2_relu_tangent_cpu(const at::Tensor& zd, const at::Tensor& bias_d,
                                  const at::Tensor& idx, const at::Tensor& a) {
  check_pool_pair(idx, a, "pool2_relu_tangent");
  check_float_contiguous(zd, "zd", c10::DeviceType::CPU);
  check_dim(zd, "zd", 4);
  const int64_t P = a.size(0), M = a.size(1), h = a.size(2), w = a.size(3);
  TORCH_CHECK(zd.size(0) == P && zd.size(1) == M && zd.size(2) == 2 * h && zd.size(3) == 2 * w,
              "fastdistill: pool2_relu_tangent: zd must be [", P, ", ", M, ", ", 2 * h, ", ", 2 * w,
              "], got ", zd.sizes());
  TORCH_CHECK(zd.scalar_type() == a.scalar_type(), "fastdistill: pool2_relu_tangent: zd and a "
              "must have one dtype");
  check_bias(bias_d, "bias_d", a, P);
  const int64_t HW = 4 * h * w;
  at::Tensor ad = at::empty_like(a);
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "fastdistill::pool2_relu_tangent (cpu)", [&] {
    const scalar_t* src = zd.const_data_ptr<scalar_t>();
    const scalar_t* bd = bias_d.const_data_ptr<scalar_t>();
    const scalar_t* av = a.const_data_ptr<scalar_t>();
    const int64_t* ix = idx.const_data_ptr<int64_t>();
    scalar_t* out = ad.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, P * M, 1, [&](int64_t begin, int64_t end) {
      for (int64_t q = begin; q < end; ++q) {
        const scalar_t b = bd[q / M];
        const scalar_t* plane = src + q * HW;
        for (int64_t e = q * h * w; e < (q + 1) * h * w; ++e) {
          const int64_t k = ix[e];
          TORCH_CHECK(k >= 0 && k < HW, "fastdistill: pool2_relu_tangent: idx out of range");
          out[e] = (plane[k] + b) * static_cast<scalar_t>(av[e] > 0);
        }
      }
    });
  });
  return ad;
}

// For S stacked gradients d [S, P, M, h, w] of a: dz [S, P, M, 2h, 2w] (d·[a > 0] at the argmax,
// zero elsewhere; 2×2 windows do not overlap) and db [S, P] (Σ over M, h, w in memory order).
std::tuple<at::Tensor, at::Tensor> pool2_relu_backward_cpu(const at::Tensor& d, const at::Tensor& idx,
                                                           const at::Tensor& a) {
  check_pool_pair(idx, a, "pool2_relu_backward");
  check_float_contiguous(d, "d", c10::DeviceType::CPU);
  check_dim(d, "d", 5);
  TORCH_CHECK(d.sizes().slice(1) == a.sizes(), "fastdistill: pool2_relu_backward: d must be [S, ",
              a.sizes(), "], got ", d.sizes());
  TORCH_CHECK(d.scalar_type() == a.scalar_type(), "fastdistill: pool2_relu_backward: d and a must "
              "have one dtype");
  const int64_t S = d.size(0), P = a.size(0), M = a.size(1), h = a.size(2), w = a.size(3);
  const int64_t HW = 4 * h * w, q_n = P * M;
  at::Tensor dz = at::zeros({S, P, M, 2 * h, 2 * w}, d.options());
  at::Tensor db = at::empty({S, P}, d.options());
  AT_DISPATCH_FLOATING_TYPES(d.scalar_type(), "fastdistill::pool2_relu_backward (cpu)", [&] {
    const scalar_t* g = d.const_data_ptr<scalar_t>();
    const scalar_t* av = a.const_data_ptr<scalar_t>();
    const int64_t* ix = idx.const_data_ptr<int64_t>();
    scalar_t* out = dz.mutable_data_ptr<scalar_t>();
    scalar_t* bias = db.mutable_data_ptr<scalar_t>();
    // one (s, plane) per task: it owns its M·2h·2w outputs and its bias sum
    at::parallel_for(0, S * P, 1, [&](int64_t begin, int64_t end) {
      for (int64_t sp = begin; sp < end; ++sp) {
        const int64_t s = sp / P, pl = sp % P;
        scalar_t acc = 0;
        for (int64_t m = 0; m < M; ++m) {
          const int64_t q = pl * M + m;
          const scalar_t* gq = g + (s * q_n + q) * h * w;
          scalar_t* oq = out + (s * q_n + q) * HW;
          for (int64_t e = 0; e < h * w; ++e) {
            const int64_t k = ix[q * h * w + e];
            TORCH_CHECK(k >= 0 && k < HW, "fastdistill: pool2_relu_backward: idx out of range");
            const scalar_t v = gq[e] * static_cast<scalar_t>(av[q * h * w + e] > 0);
            oq[k] = v;
            acc += v;
          }
        }
        bias[sp] = acc;
      }
    });
  });
  return {dz, db};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastdistill, m) {
  // 5×5 im2col of a [B, C, M, H, W]: [B, C·25, M·H'·W'], rows (c, i, j), columns (m, y, x).
  m.def("im2col5(Tensor a, int pad) -> Tensor");
  // Adjoint of im2col5: d [B, C·25, M·H'·W'] -> [B, C, M, H, W].
  m.def("col2im5(Tensor d, int H, int W, int pad) -> Tensor");
  // z [P, M, H, W], bias [P] -> (relu(maxpool2(z) + bias) [P, M, H/2, W/2], argmax int64).
  m.def("pool2_relu(Tensor z, Tensor bias) -> (Tensor, Tensor)");
  m.def("pool2_relu_tangent(Tensor zd, Tensor bias_d, Tensor idx, Tensor a) -> Tensor");
  // d [S, P, M, h, w] -> (dz [S, P, M, 2h, 2w], dbias [S, P]).
  m.def("pool2_relu_backward(Tensor d, Tensor idx, Tensor a) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastdistill, CPU, m) {
  m.impl("im2col5", &im2col5_cpu);
  m.impl("col2im5", &col2im5_cpu);
  m.impl("pool2_relu", &pool2_relu_cpu);
  m.impl("pool2_relu_tangent", &pool2_relu_tangent_cpu);
  m.impl("pool2_relu_backward", &pool2_relu_backward_cpu);
}

}  // namespace fastdistill
