// Exact integer arithmetic of fastdistill::fixedpoint_mul / fixedpoint_unmul, shared by the CPU
// kernel (csrc/cpu/fixedpoint_mul.cpp) and the CUDA kernel (csrc/cuda/fixedpoint_mul.cu).
// Torch-free; the maths and the pure-PyTorch reference are in fastdistill/ops/fixedpoint_mul.py.
//
// One step of the information buffer for a parameter with state X and live word c, β = n/d:
//
//   mul    c ← F if c ≥ S;  (q, e) = divmod(c, n);  (X, r) = divmod(X·n + e, d);  c ← q·d + r
//   unmul  (q, r) = divmod(c, d);  (X, e) = divmod(X·d + r, n);  c ← q·n + e
//
// with floor division (remainders in [0, b) for negative numerators too) and every result taken
// mod 2^64, exactly what the int64 torch reference computes for *any* int64 X and c.
//
// How X·a + cin is divided exactly without a 128-bit dividend, for any int64 X, 1 ≤ a, b ≤ 2^20
// and 0 ≤ cin < 2^21. Bias X to U = X + 2^63 ∈ [0, 2^64) (flip the sign bit) and split it into
// limbs U = Uh·2^30 + Ul; then U·a + cin = (qh·2^30 + ql)·b + rl with
//   Uh·a = qh·b + rh                    (Uh·a < 2^54)
//   rh·2^30 + Ul·a + cin = ql·b + rl    (< 2^51 + 2^21)
// and X·a + cin = U·a + cin − 2^63·a; with 2^63·a = Qa·b + Ra (per call, on the host):
//   q = qh·2^30 + ql − Qa − [rl < Ra],  r = rl − Ra + b·[rl < Ra]   (q mod 2^64, r ∈ [0, b)).
// Both partial divisions have numerators below 2^63 and an invariant divisor, so they are a
// multiply-high and a shift (Granlund & Montgomery 1994): with l = ⌈log2 b⌉ ≥ 1, k = 63 + l and
// m = ⌈2^k / b⌉ < 2^64, the error e = m·b − 2^k < b ≤ 2^l gives N·e < 2^k for N < 2^63, hence
// ⌊N·m / 2^k⌋ = ⌊N / b⌋. b = 1 is the identity. No hardware division, no floating point.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FD_HD __host__ __device__ __forceinline__
#else
#define FD_HD inline
#endif

namespace fastdistill {
namespace fixedpoint {

using u64 = uint64_t;

constexpr int kLimbBits = 30;
constexpr u64 kLimbMask = (u64(1) << kLimbBits) - 1;
constexpr u64 kSignBit = u64(1) << 63;
constexpr int64_t kMaxDenominator = int64_t(1) << 20;

FD_HD u64 mulhi(u64 a, u64 b) {
#if defined(__CUDA_ARCH__)
  return __umul64hi(a, b);
#else
  return static_cast<u64>((static_cast<unsigned __int128>(a) * b) >> 64);
#endif
}

// Floor division of numerators N < 2^63 by an invariant 1 ≤ b ≤ 2^20 (see the header comment).
struct Divisor {
  u64 b, m;
  int shift;
  bool unit;  // b == 1: q = N, r = 0

  // Host only, once per call.
  static Divisor make(u64 b) {
    Divisor D{b, 0, 0, b == 1};
    if (D.unit) return D;
    int l = 0;
    while ((u64(1) << l) < b) ++l;
    const unsigned __int128 two_k = static_cast<unsigned __int128>(1) << (63 + l);
    D.m = static_cast<u64>((two_k + b - 1) / b);  // < 2^64 because b > 2^(l−1)
    D.shift = l - 1;
    return D;
  }

  FD_HD u64 div(u64 N, u64& r) const {
    if (unit) {
      r = 0;
      return N;
    }
    const u64 q = mulhi(N, m) >> shift;
    r = N - q * b;
    return q;
  }
};

// (⌊(X·a + cin)/b⌋ mod 2^64, (X·a + cin) mod b) for any int64 X.
struct MulDiv {
  Divisor D;
  u64 a;
  u64 bias_q, bias_r;  // 2^63·a = bias_q·b + bias_r (bias_q mod 2^64)

  // Host only, once per call.
  static MulDiv make(u64 a, u64 b) {
    const unsigned __int128 big = static_cast<unsigned __int128>(a) << 63;
    return {Divisor::make(b), a, static_cast<u64>(big / b), static_cast<u64>(big % b)};
  }

  FD_HD u64 apply(int64_t X, u64 cin, u64& r) const {
    const u64 U = static_cast<u64>(X) ^ kSignBit;  // X + 2^63
    u64 rh, rl;
    const u64 qh = D.div((U >> kLimbBits) * a, rh);
    const u64 ql = D.div((rh << kLimbBits) + (U & kLimbMask) * a + cin, rl);
    const u64 borrow = rl < bias_r ? 1 : 0;
    r = rl - bias_r + (borrow ? D.b : 0);
    return (qh << kLimbBits) + ql - bias_q - borrow;
  }
};

// The per-call constants of one mul or unmul step.
struct StepParams {
  MulDiv word;   // divmod of the live word: a = 1, b = n (mul) or d (unmul)
  MulDiv state;  // X·n + e by d (mul), X·d + r by n (unmul)
  u64 regrow;    // d (mul) or n (unmul): c ← q·regrow + remainder
  int64_t floor_word, threshold;  // mul only: words c ≥ threshold restart at floor_word

  static StepParams mul(int64_t n, int64_t d, int64_t floor_word, int64_t threshold) {
    return {MulDiv::make(1, static_cast<u64>(n)), MulDiv::make(static_cast<u64>(n), static_cast<u64>(d)),
            static_cast<u64>(d), floor_word, threshold};
  }
  static StepParams unmul(int64_t n, int64_t d) {
    return {MulDiv::make(1, static_cast<u64>(d)), MulDiv::make(static_cast<u64>(d), static_cast<u64>(n)),
            static_cast<u64>(n), 0, 0};
  }
};

// Floor (c div b, c mod b) of a live word: one multiply-high for c ≥ 0 (the only words the
// information buffer holds), the biased two-limb path for negative ones.
FD_HD u64 word_divmod(const MulDiv& M, int64_t c, u64& r) {
  if (c >= 0) return M.D.div(static_cast<u64>(c), r);
  return M.apply(c, 0, r);
}

// mul: one element. Reads x, c before the caller writes, so outputs may alias inputs.
FD_HD void mul_one(const StepParams& p, int64_t x, int64_t c, int64_t& x_out, int64_t& c_out) {
  if (c >= p.threshold) c = p.floor_word;
  u64 e, r;
  const u64 qc = word_divmod(p.word, c, e);
  const u64 q = p.state.apply(x, e, r);
  x_out = static_cast<int64_t>(q);
  c_out = static_cast<int64_t>(qc * p.regrow + r);
}

// unmul: one element.
FD_HD void unmul_one(const StepParams& p, int64_t x, int64_t c, int64_t& x_out, int64_t& c_out) {
  u64 r, e;
  const u64 qc = word_divmod(p.word, c, r);
  const u64 q = p.state.apply(x, r, e);
  x_out = static_cast<int64_t>(q);
  c_out = static_cast<int64_t>(qc * p.regrow + e);
}

}  // namespace fixedpoint
}  // namespace fastdistill
