// CPU kernels of fastdistill::maxpool3s2 (AlexCifarNet's 3×3 / stride 2 / padding 1 max-pool)
// for the batched multi-network engine's planes z [P, M, H, W] (P = networks × channels, M
// images); the maths and the reference are in fastdistill/ops/maxpool3s2.py.
//
//   maxpool3s2(z)                       -> (p [P, M, h, w], idx int64), h = (H − 1)/2 + 1
//   maxpool3s2_tangent(zd, idx)         ṗ = ż[idx]
//   maxpool3s2_backward(d, idx, H, W)   d [S, P, M, h, w] -> dz [S, P, M, H, W]
//
// The forward reproduces max_pool2d's CPU scan (start from −∞ at the window's first in-image
// pixel, take a value when it is greater or NaN: the first maximum, or the last NaN), so values
// and indices are bitwise F.max_pool2d(z, 3, 2, 1, return_indices=True); interior windows run
// branch-free. The
// backward sums, for every input pixel, d over the windows whose argmax it is, in ascending
// window order from +0 -- the reference's scatter_add_, bit for bit. Each task owns whole planes
// (no two tasks write one location, no atomics: deterministic) and adds its windows into them in
// ascending order: the same sums as a per-pixel gather over the ≤ 4 covering windows (what the
// CUDA kernel does, one thread per pixel), but a gather's data-dependent selects mispredict on
// real data and measured 5-10× slower here. Parallel over planes with at::parallel_for; every
// index is range-checked (the CPU kernel, like the reference, accepts any in-plane index; the
// CUDA gather only sees indices inside their own window, which is all the forward produces).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <tuple>

#include "../check.h"

namespace fastdistill {
namespace {

inline int64_t pooled(int64_t n) { return (n - 1) / 2 + 1; }

void check_idx(const at::Tensor& idx, const char* op) {
  TORCH_CHECK(idx.device().is_cpu() && idx.scalar_type() == at::kLong && idx.is_contiguous(),
              "fastdistill: ", op, ": idx must be a contiguous int64 CPU tensor (maxpool3s2's "
              "argmax), got ", idx.scalar_type(), " on ", idx.device(),
              idx.is_contiguous() ? "" : " (not contiguous)");
  TORCH_CHECK(idx.dim() == 4, "fastdistill: ", op, ": idx must be [P, M, h, w], got ", idx.sizes());
}

// Row/column range [lo, hi) of the window of pooled position i over n input pixels.
inline void window(int64_t i, int64_t n, int64_t& lo, int64_t& hi) {
  lo = std::max<int64_t>(0, 2 * i - 1);
  hi = std::min<int64_t>(n, 2 * i + 2);
}

// ------------------------------------------------------------------------------------ forward
std::tuple<at::Tensor, at::Tensor> maxpool3s2_cpu(const at::Tensor& z) {
  check_float_contiguous(z, "z", c10::DeviceType::CPU);
  TORCH_CHECK(z.dim() == 4, "fastdistill: maxpool3s2: z must be [P, M, H, W], got ", z.sizes());
  const int64_t P = z.size(0), M = z.size(1), H = z.size(2), W = z.size(3);
  TORCH_CHECK(H >= 1 && W >= 1, "fastdistill: maxpool3s2: H and W must be >= 1, got ", H, "×", W);
  const int64_t h = pooled(H), w = pooled(W);
  at::Tensor p = at::empty({P, M, h, w}, z.options());
  at::Tensor idx = at::empty({P, M, h, w}, z.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "fastdistill::maxpool3s2 (cpu)", [&] {
    const scalar_t* src = z.const_data_ptr<scalar_t>();
    scalar_t* out = p.mutable_data_ptr<scalar_t>();
    int64_t* arg = idx.mutable_data_ptr<int64_t>();
    at::parallel_for(0, P * M, 1, [&](int64_t begin, int64_t end) {
      for (int64_t q = begin; q < end; ++q) {
        const scalar_t* plane = src + q * H * W;
        scalar_t* o = out + q * h * w;
        int64_t* ix = arg + q * h * w;
        for (int64_t i = 0; i < h; ++i) {
          int64_t y0, y1;
          window(i, H, y0, y1);
          for (int64_t j = 0; j < w; ++j) {
            int64_t x0, x1;
            window(j, W, x0, x1);
            const int64_t first = y0 * W + x0;
            int64_t best_i = first;
            if (y1 - y0 == 3 && x1 - x0 == 3) {
              // Interior window, branch-free (random data would mispredict a branch per value):
              // the scan's result is the last NaN if there is one, else the first value equal
              // to the maximum m (a max tree; m is only used when there is no NaN).
              scalar_t v[9];
              int64_t k[9];
              for (int r = 0; r < 3; ++r) {
                for (int c = 0; c < 3; ++c) {
                  k[3 * r + c] = first + r * W + c;
                  v[3 * r + c] = plane[k[3 * r + c]];
                }
              }
              const scalar_t m = std::max(std::max(std::max(std::max(v[0], v[1]), std::max(v[2], v[3])),
                                                   std::max(std::max(v[4], v[5]), std::max(v[6], v[7]))),
                                          v[8]);
              // selects as masks: gcc turns `c ? a : b` on float compares into branches here
              int64_t first_max = k[8], last_nan = 0, any_nan = 0;
              for (int t = 7; t >= 0; --t) {
                const int64_t eq = -static_cast<int64_t>(v[t] == m);
                first_max = (k[t] & eq) | (first_max & ~eq);
              }
              for (int t = 0; t < 9; ++t) {
                const int64_t nan = -static_cast<int64_t>(v[t] != v[t]);
                last_nan = (k[t] & nan) | (last_nan & ~nan);
                any_nan |= nan;
              }
              best_i = (last_nan & any_nan) | (first_max & ~any_nan);
            } else {
              // max_pool2d's scan: from −∞, take a greater value or any NaN
              scalar_t best = -std::numeric_limits<scalar_t>::infinity();
              for (int64_t y = y0; y < y1; ++y) {
                for (int64_t x = x0; x < x1; ++x) {
                  const scalar_t v = plane[y * W + x];
                  const bool take = (v > best) | (v != v);
                  best = take ? v : best;
                  best_i = take ? y * W + x : best_i;
                }
              }
            }
            // the value at the argmax: the scan's value bit for bit (±0 and NaN payloads too)
            const scalar_t best = plane[best_i];
            o[i * w + j] = best;
            ix[i * w + j] = best_i;
          }
        }
      }
    });
  });
  return {p, idx};
}

// ------------------------------------------------------------------------------------ tangent
at::Tensor maxpool3s2_tangent_cpu(const at::Tensor& zd, const at::Tensor& idx) {
  check_float_contiguous(zd, "zd", c10::DeviceType::CPU);
  check_idx(idx, "maxpool3s2_tangent");
  TORCH_CHECK(zd.dim() == 4, "fastdistill: maxpool3s2_tangent: zd must be [P, M, H, W], got ",
              zd.sizes());
  const int64_t P = zd.size(0), M = zd.size(1), H = zd.size(2), W = zd.size(3);
  TORCH_CHECK(H >= 1 && W >= 1 && idx.size(0) == P && idx.size(1) == M && idx.size(2) == pooled(H) &&
              idx.size(3) == pooled(W), "fastdistill: maxpool3s2_tangent: idx must be [", P, ", ",
              M, ", ", pooled(H), ", ", pooled(W), "] for zd ", zd.sizes(), ", got ", idx.sizes());
  const int64_t HW = H * W, hw = idx.size(2) * idx.size(3);
  at::Tensor out = at::empty(idx.sizes(), zd.options());
  AT_DISPATCH_FLOATING_TYPES(zd.scalar_type(), "fastdistill::maxpool3s2_tangent (cpu)", [&] {
    const scalar_t* src = zd.const_data_ptr<scalar_t>();
    const int64_t* ix = idx.const_data_ptr<int64_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, P * M, 1, [&](int64_t begin, int64_t end) {
      for (int64_t q = begin; q < end; ++q) {
        const scalar_t* plane = src + q * HW;
        for (int64_t e = q * hw; e < (q + 1) * hw; ++e) {
          const int64_t k = ix[e];
          TORCH_CHECK(k >= 0 && k < HW, "fastdistill: maxpool3s2_tangent: idx out of range");
          dst[e] = plane[k];
        }
      }
    });
  });
  return out;
}

// ----------------------------------------------------------------------------------- backward
at::Tensor maxpool3s2_backward_cpu(const at::Tensor& d, const at::Tensor& idx, int64_t H, int64_t W) {
  check_float_contiguous(d, "d", c10::DeviceType::CPU);
  check_idx(idx, "maxpool3s2_backward");
  TORCH_CHECK(d.dim() == 5 && d.sizes().slice(1) == idx.sizes(), "fastdistill: maxpool3s2_backward: "
              "d must be [S, ", idx.sizes(), "] (idx's shape), got ", d.sizes());
  const int64_t S = d.size(0), P = idx.size(0), M = idx.size(1), h = idx.size(2), w = idx.size(3);
  TORCH_CHECK(H >= 1 && W >= 1 && pooled(H) == h && pooled(W) == w, "fastdistill: maxpool3s2_backward:"
              " an ", H, "×", W, " input does not pool to ", h, "×", w);
  const int64_t HW = H * W, hw = h * w, q_n = P * M;
  at::Tensor dz = at::empty({S, P, M, H, W}, d.options());
  AT_DISPATCH_FLOATING_TYPES(d.scalar_type(), "fastdistill::maxpool3s2_backward (cpu)", [&] {
    const scalar_t* g = d.const_data_ptr<scalar_t>();
    const int64_t* ix = idx.const_data_ptr<int64_t>();
    scalar_t* out = dz.mutable_data_ptr<scalar_t>();
    // one plane per task: it owns its S·H·W outputs
    at::parallel_for(0, q_n, 1, [&](int64_t begin, int64_t end) {
      for (int64_t q = begin; q < end; ++q) {
        const int64_t* iq = ix + q * hw;
        bool ok = true;  // branch-free: one check per plane
        for (int64_t e = 0; e < hw; ++e) ok &= static_cast<uint64_t>(iq[e]) < static_cast<uint64_t>(HW);
        TORCH_CHECK(ok, "fastdistill: maxpool3s2_backward: idx out of range (not a flat index into "
                    "the ", H, "×", W, " plane)");
        for (int64_t s = 0; s < S; ++s) {
          const scalar_t* gq = g + (s * q_n + q) * hw;
          scalar_t* oq = out + (s * q_n + q) * HW;
          std::fill(oq, oq + HW, scalar_t(0));
          for (int64_t e = 0; e < hw; ++e) oq[iq[e]] += gq[e];
        }
      }
    });
  });
  return dz;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastdistill, m) {
  // z [P, M, H, W] -> (max_pool2d(z, 3, 2, 1) [P, M, h, w], argmax int64), h = (H − 1)/2 + 1.
  m.def("maxpool3s2(Tensor z) -> (Tensor, Tensor)");
  // ṗ = ż[idx]: zd [P, M, H, W], idx [P, M, h, w] -> [P, M, h, w].
  m.def("maxpool3s2_tangent(Tensor zd, Tensor idx) -> Tensor");
  // d [S, P, M, h, w] -> dz [S, P, M, H, W] (each pixel: Σ d over the windows it won).
  m.def("maxpool3s2_backward(Tensor d, Tensor idx, int H, int W) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastdistill, CPU, m) {
  m.impl("maxpool3s2", &maxpool3s2_cpu);
  m.impl("maxpool3s2_tangent", &maxpool3s2_tangent_cpu);
  m.impl("maxpool3s2_backward", &maxpool3s2_backward_cpu);
}

}  // namespace fastdistill
