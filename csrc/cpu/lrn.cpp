// CPU kernels of fastdistill::lrn (local response normalisation across channels, PyTorch's
// F.local_response_norm) on x [B, C, M, H, W] (B networks, C channels, M images; the batched
// engine's planes [B·C, M, H, W] viewed), with its tangent and its adjoint. The maths, the
// derivation of the JVP/VJP and the reference are in fastdistill/ops/lrn.py. With n = size,
// a = α/n, W(c) = {c − n/2, …, c + (n−1)/2} ∩ [0, C) (n = 4: c−2..c+1), E = M·H·W:
//
//   lrn(x, n, α, β, κ)              y_c = x_c / D_c,  D_c = t_c^β,  t_c = (s_c / n)·α + κ,
//                                   s_c = Σ_{j ∈ W(c)} x_j²
//   lrn_tangent(xd, x, …)           ẏ_c = ẋ_c / D_c − 2aβ · (y_c / t_c) · Σ_{j ∈ W(c)} x_j ẋ_j
//   lrn_backward(g, x, …)           x̄_j = ȳ_j / D_j − 2aβ · x_j · Σ_{c ∈ Wᵀ(j)} ȳ_c (y_c / t_c),
//                                   Wᵀ(j) = {j − (n−1)/2, …, j + n/2} ∩ [0, C); g [S, B, C, M, H, W]
//
// Every quantity is computed in double for both dtypes and rounded once on store (so float32
// results are at least as accurate as PyTorch's float32 path; float64 ones agree with the
// reference to a few ulp): window sums run in ascending channel order, t = κ + (α/n)·s,
// t^0.75 = √t·√√t (β = 0.75, AlexCifarNet; setup.py's -fno-math-errno lets the square roots
// vectorise) else std::pow, and 1/D is formed once so the S-fold loop of the backward has no
// division. Each task owns a contiguous run of one output row (b, c) [and s], so there are no
// shared writes and two runs are bit-identical. Parallel with at::parallel_for over
// (rows × chunks of E).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "../check.h"

namespace fastdistill {
namespace {

// Elements of one row handled by one task: a stack accumulator of this many doubles.
constexpr int64_t kChunk = 512;

struct LrnParams {
  int64_t n, before, after;  // window: c − before .. c + after
  double a, beta, k, c2;  // a = α/n, c2 = 2αβ/n
  bool three_quarters;

  LrnParams(int64_t size, double alpha, double beta_, double k_)
      : n(size), before(size / 2), after((size - 1) / 2), a(alpha / static_cast<double>(size)),
        beta(beta_), k(k_), c2(2.0 * alpha * beta_ / static_cast<double>(size)),
        three_quarters(beta_ == 0.75) {}

  double t_of(double s) const { return k + a * s; }
  double pow_beta(double t) const {
    if (three_quarters) {
      const double r = std::sqrt(t);
      return r * std::sqrt(r);
    }
    return std::pow(t, beta);
  }
};

void check_x(const at::Tensor& x, const char* name, int64_t dim) {
  check_float_contiguous(x, name, c10::DeviceType::CPU);
  TORCH_CHECK(x.dim() == dim, "fastdistill: ", name, " must have ", dim, " dimensions (",
              dim == 6 ? "[S, B, C, M, H, W]" : "[B, C, M, H, W]", "), got shape ", x.sizes());
}

void check_hyper(int64_t size, double alpha, double beta, double k, const char* op) {
  TORCH_CHECK(size >= 1, "fastdistill: ", op, ": size must be >= 1, got ", size);
  TORCH_CHECK(std::isfinite(alpha) && std::isfinite(beta) && std::isfinite(k), "fastdistill: ", op,
              ": alpha, beta and k must be finite");
}

// Calls body(row, e0, e1) for every chunk [e0, e1) of every row in [0, rows), in parallel.
template <typename F>
void for_row_chunks(int64_t rows, int64_t E, const F& body) {
  const int64_t chunks = (E + kChunk - 1) / kChunk;
  at::parallel_for(0, rows * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t row = task / chunks, e0 = (task % chunks) * kChunk;
      body(row, e0, std::min(E, e0 + kChunk));
    }
  });
}

// ------------------------------------------------------------------------------------ forward
at::Tensor lrn_cpu(const at::Tensor& x, int64_t size, double alpha, double beta, double k) {
  check_x(x, "x", 5);
  check_hyper(size, alpha, beta, k, "lrn");
  const int64_t B = x.size(0), C = x.size(1), E = x.size(2) * x.size(3) * x.size(4);
  const LrnParams lp(size, alpha, beta, k);
  at::Tensor y = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fastdistill::lrn (cpu)", [&] {
    const scalar_t* src = x.const_data_ptr<scalar_t>();
    scalar_t* dst = y.mutable_data_ptr<scalar_t>();
    for_row_chunks(B * C, E, [&](int64_t row, int64_t e0, int64_t e1) {
      const int64_t b = row / C, c = row % C, len = e1 - e0;
      double s[kChunk];
      std::fill(s, s + len, 0.0);
      for (int64_t j = std::max<int64_t>(0, c - lp.before); j <= std::min(C - 1, c + lp.after); ++j) {
        const scalar_t* xj = src + (b * C + j) * E + e0;
        for (int64_t e = 0; e < len; ++e) {
          const double v = static_cast<double>(xj[e]);
          s[e] += v * v;
        }
      }
      const scalar_t* xc = src + row * E + e0;
      scalar_t* yc = dst + row * E + e0;
      for (int64_t e = 0; e < len; ++e) {
        yc[e] = static_cast<scalar_t>(static_cast<double>(xc[e]) / lp.pow_beta(lp.t_of(s[e])));
      }
    });
  });
  return y;
}

// ------------------------------------------------------------------------------------ tangent
at::Tensor lrn_tangent_cpu(const at::Tensor& xd, const at::Tensor& x, int64_t size, double alpha,
                           double beta, double k) {
  check_x(x, "x", 5);
  check_x(xd, "xd", 5);
  check_like(xd, "xd", x, "x");
  check_hyper(size, alpha, beta, k, "lrn_tangent");
  const int64_t B = x.size(0), C = x.size(1), E = x.size(2) * x.size(3) * x.size(4);
  const LrnParams lp(size, alpha, beta, k);
  at::Tensor yd = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fastdistill::lrn_tangent (cpu)", [&] {
    const scalar_t* xs = x.const_data_ptr<scalar_t>();
    const scalar_t* ts = xd.const_data_ptr<scalar_t>();
    scalar_t* dst = yd.mutable_data_ptr<scalar_t>();
    for_row_chunks(B * C, E, [&](int64_t row, int64_t e0, int64_t e1) {
      const int64_t b = row / C, c = row % C, len = e1 - e0;
      double s[kChunk], sx[kChunk];
      std::fill(s, s + len, 0.0);
      std::fill(sx, sx + len, 0.0);
      for (int64_t j = std::max<int64_t>(0, c - lp.before); j <= std::min(C - 1, c + lp.after); ++j) {
        const scalar_t* xj = xs + (b * C + j) * E + e0;
        const scalar_t* tj = ts + (b * C + j) * E + e0;
        for (int64_t e = 0; e < len; ++e) {
          const double v = static_cast<double>(xj[e]);
          s[e] += v * v;
          sx[e] += v * static_cast<double>(tj[e]);
        }
      }
      const scalar_t* xc = xs + row * E + e0;
      const scalar_t* tc = ts + row * E + e0;
      scalar_t* out = dst + row * E + e0;
      for (int64_t e = 0; e < len; ++e) {
        const double t = lp.t_of(s[e]), rd = 1.0 / lp.pow_beta(t);
        const double q = (static_cast<double>(xc[e]) * rd) / t;  // y/t
        out[e] = static_cast<scalar_t>(static_cast<double>(tc[e]) * rd - lp.c2 * q * sx[e]);
      }
    });
  });
  return yd;
}

// ----------------------------------------------------------------------------------- backward
at::Tensor lrn_backward_cpu(const at::Tensor& g, const at::Tensor& x, int64_t size, double alpha,
                            double beta, double k) {
  check_x(x, "x", 5);
  check_x(g, "g", 6);
  TORCH_CHECK(g.sizes().slice(1) == x.sizes(), "fastdistill: lrn_backward: g must be [S, ", x.sizes(),
              "] (x's shape), got ", g.sizes());
  TORCH_CHECK(g.scalar_type() == x.scalar_type(), "fastdistill: lrn_backward: g and x must have one "
              "dtype, got ", g.scalar_type(), " and ", x.scalar_type());
  check_hyper(size, alpha, beta, k, "lrn_backward");
  const int64_t S = g.size(0), B = x.size(0), C = x.size(1), E = x.size(2) * x.size(3) * x.size(4);
  const LrnParams lp(size, alpha, beta, k);
  at::Tensor xg = at::empty_like(g);
  // 1/D and y/t of every (b, c, e), computed once for all S cotangents
  at::Tensor work = at::empty({2, B * C * E}, x.options().dtype(at::kDouble));
  double* RD = work.mutable_data_ptr<double>();
  double* Q = RD + B * C * E;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fastdistill::lrn_backward (cpu)", [&] {
    const scalar_t* xs = x.const_data_ptr<scalar_t>();
    const scalar_t* gs = g.const_data_ptr<scalar_t>();
    scalar_t* dst = xg.mutable_data_ptr<scalar_t>();
    for_row_chunks(B * C, E, [&](int64_t row, int64_t e0, int64_t e1) {
      const int64_t b = row / C, c = row % C, len = e1 - e0;
      double s[kChunk];
      std::fill(s, s + len, 0.0);
      for (int64_t j = std::max<int64_t>(0, c - lp.before); j <= std::min(C - 1, c + lp.after); ++j) {
        const scalar_t* xj = xs + (b * C + j) * E + e0;
        for (int64_t e = 0; e < len; ++e) {
          const double v = static_cast<double>(xj[e]);
          s[e] += v * v;
        }
      }
      const scalar_t* xc = xs + row * E + e0;
      for (int64_t e = 0; e < len; ++e) {
        const double t = lp.t_of(s[e]), rd = 1.0 / lp.pow_beta(t);
        RD[row * E + e0 + e] = rd;
        Q[row * E + e0 + e] = (static_cast<double>(xc[e]) * rd) / t;
      }
    });
    // row (s, b, j): Σ over c ∈ Wᵀ(j) = j − after .. j + before, ascending
    for_row_chunks(S * B * C, E, [&](int64_t srow, int64_t e0, int64_t e1) {
      const int64_t row = srow % (B * C), s = srow / (B * C), b = row / C, j = row % C;
      const int64_t len = e1 - e0;
      double r[kChunk];
      std::fill(r, r + len, 0.0);
      for (int64_t c = std::max<int64_t>(0, j - lp.after); c <= std::min(C - 1, j + lp.before); ++c) {
        const scalar_t* gc = gs + (s * B * C + b * C + c) * E + e0;
        const double* qc = Q + (b * C + c) * E + e0;
        for (int64_t e = 0; e < len; ++e) r[e] += static_cast<double>(gc[e]) * qc[e];
      }
      const scalar_t* gj = gs + srow * E + e0;
      const scalar_t* xj = xs + row * E + e0;
      const double* rdj = RD + row * E + e0;
      scalar_t* out = dst + srow * E + e0;
      for (int64_t e = 0; e < len; ++e) {
        out[e] = static_cast<scalar_t>(static_cast<double>(gj[e]) * rdj[e] -
                                       lp.c2 * static_cast<double>(xj[e]) * r[e]);
      }
    });
  });
  return xg;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastdistill, m) {
  // Local response norm over dim 1 of x [B, C, M, H, W] (F.local_response_norm semantics).
  m.def("lrn(Tensor x, int size, float alpha, float beta, float k) -> Tensor");
  // Its JVP at x along xd (both [B, C, M, H, W]).
  m.def("lrn_tangent(Tensor xd, Tensor x, int size, float alpha, float beta, float k) -> Tensor");
  // Its VJP at x for S stacked cotangents g [S, B, C, M, H, W] -> [S, B, C, M, H, W].
  m.def("lrn_backward(Tensor g, Tensor x, int size, float alpha, float beta, float k) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastdistill, CPU, m) {
  m.impl("lrn", &lrn_cpu);
  m.impl("lrn_tangent", &lrn_tangent_cpu);
  m.impl("lrn_backward", &lrn_backward_cpu);
}

}  // namespace fastdistill
