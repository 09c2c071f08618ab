// CPU kernels of fastdistill::fixedpoint_mul / fixedpoint_unmul: one exact step of the
// information buffer of the `reversible` strategy (multiplication of int64 fixed-point states by
// β = n/d and its inverse, the destroyed digits moved into / out of the live buffer words).
//
//   fixedpoint_mul(X, c, n, d, floor, threshold)   c' = floor where c ≥ threshold else c;
//                                                  (q, e) = divmod(c', n); (X', r) = divmod(X·n + e, d)
//                                                  -> (X', q·d + r)
//   fixedpoint_unmul(X, c, n, d)                   (q, r) = divmod(c, d); (X', e) = divmod(X·d + r, n)
//                                                  -> (X', q·n + e)
//
// Floor division, results mod 2^64: bitwise what the int64 torch reference in
// fastdistill/ops/fixedpoint_mul.py computes, for every int64 input. The exact arithmetic (two
// 30-bit limbs, invariant-divisor multiply-high, no 128-bit dividend, no floating point) lives in
// csrc/fixedpoint_math.h, shared with the CUDA kernel. One pass, two reads and two writes per
// element; each element is read before it is written, so out may alias X or c exactly.
// Parallel over contiguous chunks with at::parallel_for (-fopenmp at compile and link).
//
// The schemas live here (a TORCH_LIBRARY_FRAGMENT of the `fastdistill` namespace that
// csrc/ops.cpp opens) so the op builds and registers as one translation unit.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

#include "../fixedpoint_math.h"

namespace fastdistill {
namespace {

namespace fp = fixedpoint;

// ~5 ns per element: below this many elements a thread team costs more than it saves.
constexpr int64_t kGrain = 16384;

void check_state(const at::Tensor& t, const char* name, const char* op) {
  TORCH_CHECK(t.device().type() == c10::DeviceType::CPU, "fastdistill::", op, ": ", name,
              " must be a CPU tensor, got one on ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kLong, "fastdistill::", op, ": ", name,
              " must be int64, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "fastdistill::", op, ": ", name,
              " must be contiguous (call .contiguous())");
}

void check_same_shape(const at::Tensor& t, const char* name, const at::Tensor& X, const char* op) {
  TORCH_CHECK(t.sizes() == X.sizes(), "fastdistill::", op, ": ", name, " must have the shape of X ",
              X.sizes(), ", got ", t.sizes());
}

void check_ratio(int64_t n, int64_t d, const char* op) {
  TORCH_CHECK(0 < n && n < d && d <= fp::kMaxDenominator, "fastdistill::", op,
              ": β = n/d needs 0 < n < d ≤ 2^20, got n = ", n, ", d = ", d);
}

void check_spill(int64_t floor_word, int64_t threshold) {
  TORCH_CHECK(1 <= floor_word && floor_word < threshold, "fastdistill::fixedpoint_mul: needs "
              "1 ≤ floor < threshold, got floor = ", floor_word, ", threshold = ", threshold);
}

void check_args(const at::Tensor& X, const at::Tensor& c, int64_t n, int64_t d, const char* op) {
  check_state(X, "X", op);
  check_state(c, "c", op);
  check_same_shape(c, "c", X, op);
  check_ratio(n, d, op);
}

void check_outs(const at::Tensor& X, const at::Tensor& X_out, const at::Tensor& c_out, const char* op) {
  check_state(X_out, "X_out", op);
  check_state(c_out, "c_out", op);
  check_same_shape(X_out, "X_out", X, op);
  check_same_shape(c_out, "c_out", X, op);
  TORCH_CHECK(X.numel() == 0 || X_out.data_ptr() != c_out.data_ptr(), "fastdistill::", op,
              ": X_out and c_out must be different tensors");
}

template <bool kMul>
void run(const fp::StepParams& p, const at::Tensor& X, const at::Tensor& c, const at::Tensor& X_out,
         const at::Tensor& c_out) {
  const int64_t* x = X.const_data_ptr<int64_t>();
  const int64_t* w = c.const_data_ptr<int64_t>();
  int64_t* xo = X_out.mutable_data_ptr<int64_t>();
  int64_t* wo = c_out.mutable_data_ptr<int64_t>();
  at::parallel_for(0, X.numel(), kGrain, [&](int64_t begin, int64_t end) {
    // A private copy of the constants: the int64 stores below may alias anything reached
    // through a reference, which would force a reload of every constant per element.
    const fp::StepParams q = p;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t xi = x[i], wi = w[i];  // both read before either is written (aliasing)
      int64_t xn, wn;
      if (kMul) {
        fp::mul_one(q, xi, wi, xn, wn);
      } else {
        fp::unmul_one(q, xi, wi, xn, wn);
      }
      xo[i] = xn;
      wo[i] = wn;
    }
  });
}

void fixedpoint_mul_out_cpu(const at::Tensor& X, const at::Tensor& c, int64_t n, int64_t d,
                            int64_t floor_word, int64_t threshold, const at::Tensor& X_out,
                            const at::Tensor& c_out) {
  check_args(X, c, n, d, "fixedpoint_mul");
  check_spill(floor_word, threshold);
  check_outs(X, X_out, c_out, "fixedpoint_mul");
  run<true>(fp::StepParams::mul(n, d, floor_word, threshold), X, c, X_out, c_out);
}

std::tuple<at::Tensor, at::Tensor> fixedpoint_mul_cpu(const at::Tensor& X, const at::Tensor& c,
                                                      int64_t n, int64_t d, int64_t floor_word,
                                                      int64_t threshold) {
  check_args(X, c, n, d, "fixedpoint_mul");
  at::Tensor X_out = at::empty_like(X), c_out = at::empty_like(c);
  fixedpoint_mul_out_cpu(X, c, n, d, floor_word, threshold, X_out, c_out);
  return {X_out, c_out};
}

void fixedpoint_unmul_out_cpu(const at::Tensor& X, const at::Tensor& c, int64_t n, int64_t d,
                              const at::Tensor& X_out, const at::Tensor& c_out) {
  check_args(X, c, n, d, "fixedpoint_unmul");
  check_outs(X, X_out, c_out, "fixedpoint_unmul");
  run<false>(fp::StepParams::unmul(n, d), X, c, X_out, c_out);
}

std::tuple<at::Tensor, at::Tensor> fixedpoint_unmul_cpu(const at::Tensor& X, const at::Tensor& c,
                                                        int64_t n, int64_t d) {
  check_args(X, c, n, d, "fixedpoint_unmul");
  at::Tensor X_out = at::empty_like(X), c_out = at::empty_like(c);
  fixedpoint_unmul_out_cpu(X, c, n, d, X_out, c_out);
  return {X_out, c_out};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastdistill, m) {
  // Information-buffer step X ← X·n/d (exact, digits saved in the live words c); int64 X, c of
  // one shape; words c ≥ threshold restart at floor first. Returns (X', c').
  m.def("fixedpoint_mul(Tensor X, Tensor c, int n, int d, int floor, int threshold) "
        "-> (Tensor, Tensor)");
  // The same into preallocated X_out, c_out (each may alias X or c exactly). Returns nothing: a
  // custom op whose output aliases an input cannot be functionalised (torch.compile, opcheck).
  m.def("fixedpoint_mul_out(Tensor X, Tensor c, int n, int d, int floor, int threshold, "
        "Tensor(a!) X_out, Tensor(b!) c_out) -> ()");
  // Its inverse: recovers the X and c (after the restart) that fixedpoint_mul was given.
  m.def("fixedpoint_unmul(Tensor X, Tensor c, int n, int d) -> (Tensor, Tensor)");
  m.def("fixedpoint_unmul_out(Tensor X, Tensor c, int n, int d, Tensor(a!) X_out, "
        "Tensor(b!) c_out) -> ()");
}

TORCH_LIBRARY_IMPL(fastdistill, CPU, m) {
  m.impl("fixedpoint_mul", &fixedpoint_mul_cpu);
  m.impl("fixedpoint_mul_out", &fixedpoint_mul_out_cpu);
  m.impl("fixedpoint_unmul", &fixedpoint_unmul_cpu);
  m.impl("fixedpoint_unmul_out", &fixedpoint_unmul_out_cpu);
}

}  // namespace fastdistill
