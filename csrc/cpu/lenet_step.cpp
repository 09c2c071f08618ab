// CPU kernel of LeNet's whole inner step for K networks at once: the fused per-layer passes of
// the batched explicit engine (fastdistill/models/batched.py, LeNetBatchedEngine), one network
// per task, networks in parallel.
//
//   lenet_grad(θ [K, P], x, Y, scale, pad)            -> (ℓ [K], g = ∇_θ ℓ [K, P])
//   lenet_grad_hvp(θ, x, Y, v [K, P], scale, pad, need_x, need_y)
//       -> (ℓ, g, H v, ∇_x Σ_k v_k·g_k, ∇_Y Σ_k v_k·g_k)
//
//   x: [n, C, H, W] (the same images for every network) or [K, n, C, H, W];
//   Y: soft or one-hot targets [1 or K, n, O] (O ≥ 2; ℓ = −scale Σ_i Σ_c Y_ic log softmax(z_i)_c);
//   the mixed terms have x's and Y's shapes (summed over the networks when shared); empty [0]
//   tensors when not requested.
//
// Why one op for the whole step: LeNet's layers at 10 images are small GEMMs (M or N of 6..16)
// separated by memory-bound passes (im2col, pooling, col2im). Run layer by layer over all K
// networks, every pass streams K networks' activations (~20 MB at K = 16) through memory, and
// each of the ~25 batched GEMMs synchronises the threads. Here one thread takes one network
// through the whole step: its ~3 MB of activations stay in L2/L3, every GEMM is a sequential
// BLAS call on cache-hot operands, and the threads meet only once, at the end.
//
// The maths is LeNetBatchedEngine's (forward, backward and Pearlmutter's R-operator pass in the
// direction v, layer by layer; see its docstring): conv1 5×5 (pad) → 2×2 max-pool → +bias →
// ReLU → conv2 5×5 → pool → +bias → ReLU → fc 400-120 ReLU → fc 120-84 ReLU → fc 84-O. Pool
// then ReLU with the bias after the pool is exact (see pool2_relu in lenet_ops.cpp; same
// first-maximum / NaN rule). Layouts per network: conv activations [channel, image·y·x] (im2col
// columns ordered (image, y, x)), fully connected activations [image, feature] -- the
// orientation in which the GEMMs with 10 images are fastest (4× over [feature, image] here).
//
// Determinism: each network is computed by one thread with BLAS forced sequential
// (MKL_Set_Num_Threads_Local(1); brgemm is single-threaded), so its result does not depend on K,
// on the thread count or on which thread ran it; sums over networks (shared x or Y) and over
// images (bias gradients) run in a fixed order. The value path (ℓ, g) issues exactly the same
// GEMM calls in lenet_grad and lenet_grad_hvp, so both return bit-identical g (the reversible
// strategy relies on it).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../check.h"
#include "pool2_window.h"

// BLAS and MKL's thread control, exported by libtorch_cpu (torch's CPU wheel links MKL in).
extern "C" {
void sgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc);
void dgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
            const double* beta, double* c, const int* ldc);
int MKL_Set_Num_Threads_Local(int nt);  // the C entry (mkl_set_num_threads_local is the Fortran one)
}


namespace fastdistill {
namespace {

// Row-major C[M×N] = op(A) op(B) + beta·C (ta/tb: 'N' or 'T' on the row-major operand;
// beta 0 or 1).
//
// float32 with B untransposed goes to oneDNN's brgemm micro-kernel (at::native::cpublas::brgemm:
// JIT-compiled once per shape, no operand packing, no separate C scaling). One-off timings on the
// dev CPU (AMD EPYC, where MKL takes its generic path; the scripts were not kept): single calls
// 1.3-2.2× faster than MKL sgemm on these shapes, 10-15 % off the whole step. An A operand that must be transposed is small at every such call site here
// (weights or the 10-image δ) and is transposed into a thread-local scratch first. A transposed
// B (activations) is not worth a copy; those calls, and float64, go to the
// Fortran BLAS of the MKL that libtorch_cpu links (column-major BLAS sees the transposes:
// Cᵀ = op(B)ᵀ op(A)ᵀ, so the operands swap).
std::vector<float>& transpose_scratch() {
  thread_local std::vector<float> buf;
  return buf;
}

inline void gemm(char ta, char tb, int M, int N, int K, const float* A, int lda, const float* B,
                 int ldb, float beta, float* C, int ldc) {
  if (tb == 'N') {
    const float* a = A;
    int la = lda;
    if (ta == 'T') {  // A is stored K×M (leading dimension lda): make the M×K copy
      std::vector<float>& t = transpose_scratch();
      if (t.size() < size_t(M) * K) t.resize(size_t(M) * K);
      for (int k = 0; k < K; ++k)
        for (int m = 0; m < M; ++m) t[size_t(m) * K + k] = A[size_t(k) * lda + m];
      a = t.data();
      la = K;
    }
    at::native::cpublas::brgemm(M, N, K, la, ldb, ldc, beta != 0.0f, a, B, C);
    return;
  }
  const float one = 1.0f;
  sgemm_(&tb, &ta, &N, &M, &K, &one, B, &ldb, A, &lda, &beta, C, &ldc);
}
inline void gemm(char ta, char tb, int M, int N, int K, const double* A, int lda, const double* B,
                 int ldb, double beta, double* C, int ldc) {
  const double one = 1.0;
  dgemm_(&tb, &ta, &N, &M, &K, &one, B, &ldb, A, &lda, &beta, C, &ldc);
}

// MKL sequential inside one network's task; restored on scope exit.
struct SequentialBlas {
  int prev;
  SequentialBlas() : prev(MKL_Set_Num_Threads_Local(1)) {}
  ~SequentialBlas() { MKL_Set_Num_Threads_Local(prev); }
};

constexpr int kC1 = 6, kC2 = 16, kF0 = 400, kF1 = 120, kF2 = 84;
constexpr int kH1 = 28, kP1 = 14, kH2 = 10, kP2 = 5;  // conv1 out, pool1, conv2 out, pool2

struct Dims {
  int K, n, C, H, pad, O;
  bool shared_x, shared_y;
  int64_t P;
  // offsets of the parameters in θ (LeNet's spec order)
  int64_t w1, b1, w2, b2, f1, c1, f2, c2, f3, c3;
  int C25() const { return C * 25; }
  int L1() const { return n * kH1 * kH1; }
  int L2() const { return n * kH2 * kH2; }
};

Dims make_dims(const at::Tensor& theta, const at::Tensor& x, const at::Tensor& Y, int64_t pad,
               const char* op) {
  check_float_contiguous(theta, "theta", c10::DeviceType::CPU);
  TORCH_CHECK(theta.dim() == 2, "fastdistill: ", op, ": theta must be [K, P], got ", theta.sizes());
  TORCH_CHECK(x.scalar_type() == theta.scalar_type() && Y.scalar_type() == theta.scalar_type(),
              "fastdistill: ", op, ": theta, x and Y must have one dtype");
  Dims d{};
  d.K = static_cast<int>(theta.size(0));
  d.shared_x = x.dim() == 4;
  TORCH_CHECK(x.dim() == 4 || (x.dim() == 5 && x.size(0) == d.K), "fastdistill: ", op,
              ": x must be [n, C, H, W] or [K, n, C, H, W], got ", x.sizes());
  const int64_t o = d.shared_x ? 0 : 1;
  d.n = static_cast<int>(x.size(o));
  d.C = static_cast<int>(x.size(o + 1));
  d.H = static_cast<int>(x.size(o + 2));
  d.pad = static_cast<int>(pad);
  TORCH_CHECK(x.size(o + 3) == d.H && d.H + 2 * pad - 4 == kH1 && d.n >= 1 && d.C >= 1,
              "fastdistill: ", op, ": LeNet needs square images whose 5×5 conv with pad ", pad,
              " is 28×28 (and n ≥ 1), got x ", x.sizes());
  // per-network buffers are indexed with int: conv1's patch matrix C·25 × n·784 must fit
  TORCH_CHECK(x.size(o + 1) * 25 * x.size(o) * kH1 * kH1 < (int64_t(1) << 31), "fastdistill: ",
              op, ": ", x.size(o), " images of ", x.size(o + 1), " channels in one call is too many (the patch matrix "
              "would exceed 2^31 elements); split the batch");
  check_float_contiguous(x, "x", c10::DeviceType::CPU);
  check_float_contiguous(Y, "Y", c10::DeviceType::CPU);
  TORCH_CHECK(Y.dim() == 3 && (Y.size(0) == 1 || Y.size(0) == d.K) && Y.size(1) == d.n && Y.size(2) >= 2,
              "fastdistill: ", op, ": Y must be [1 or K, n, O] targets with O ≥ 2, got ", Y.sizes());
  d.shared_y = Y.size(0) == 1;
  d.O = static_cast<int>(Y.size(2));
  int64_t at_ = 0;
  auto take = [&](int64_t numel) { const int64_t r = at_; at_ += numel; return r; };
  d.w1 = take(int64_t(kC1) * d.C25()); d.b1 = take(kC1);
  d.w2 = take(kC2 * kC1 * 25); d.b2 = take(kC2);
  d.f1 = take(kF1 * kF0); d.c1 = take(kF1);
  d.f2 = take(kF2 * kF1); d.c2 = take(kF2);
  d.f3 = take(int64_t(d.O) * kF2); d.c3 = take(d.O);
  d.P = at_;
  TORCH_CHECK(theta.size(1) == d.P, "fastdistill: ", op, ": theta must be [K, ", d.P,
              "] for LeNet with ", d.C, " input channels and ", d.O, " outputs, got ", theta.sizes());
  return d;
}

// ------------------------------------------------------------------- memory-bound layer passes
// dst [cols × rows] = srcᵀ for a row-major src [rows × cols], in cache-sized tiles
template <typename T>
void transpose(const T* src, int rows, int cols, T* dst) {
  constexpr int kTile = 32;
  for (int r0 = 0; r0 < rows; r0 += kTile)
    for (int c0 = 0; c0 < cols; c0 += kTile) {
      const int r1 = std::min(rows, r0 + kTile), c1 = std::min(cols, c0 + kTile);
      for (int c = c0; c < c1; ++c)
        for (int r = r0; r < r1; ++r) dst[int64_t(c) * rows + r] = src[int64_t(r) * cols + c];
    }
}

// X[(c,i,j), (m,y,x)] = img[m, c, y+i−pad, x+j−pad] (0 outside); img [n, C, Hs, Hs].
template <typename T>
void im2col_input(const T* img, int n, int C, int Hs, int pad, T* X) {
  const int L = n * kH1 * kH1;
  for (int c = 0; c < C; ++c)
    for (int i = 0; i < 5; ++i)
      for (int j = 0; j < 5; ++j) {
        T* row = X + ((c * 5 + i) * 5 + j) * L;
        for (int m = 0; m < n; ++m) {
          const T* plane = img + (int64_t(m) * C + c) * Hs * Hs;
          T* out = row + m * kH1 * kH1;
          for (int y = 0; y < kH1; ++y) {
            const int sy = y + i - pad;
            T* o = out + y * kH1;
            if (sy < 0 || sy >= Hs) { std::fill(o, o + kH1, T(0)); continue; }
            for (int x = 0; x < kH1; ++x) {
              const int sx = x + j - pad;
              o[x] = (sx >= 0 && sx < Hs) ? plane[sy * Hs + sx] : T(0);
            }
          }
        }
      }
}

// adjoint of im2col_input: img[m, c, ·, ·] = Σ_(i,j) X[(c,i,j), (m, ·−i+pad, ·−j+pad)]
template <typename T>
void col2im_input(const T* X, int n, int C, int Hs, int pad, T* img) {
  const int L = n * kH1 * kH1;
  for (int m = 0; m < n; ++m)
    for (int c = 0; c < C; ++c) {
      T* plane = img + (int64_t(m) * C + c) * Hs * Hs;
      std::fill(plane, plane + Hs * Hs, T(0));
      for (int i = 0; i < 5; ++i)
        for (int j = 0; j < 5; ++j) {
          const T* row = X + ((c * 5 + i) * 5 + j) * L + m * kH1 * kH1;
          for (int y = std::max(0, pad - i); y < std::min(kH1, Hs + pad - i); ++y) {
            T* o = plane + (y + i - pad) * Hs + (j - pad);
            const T* s = row + y * kH1;
            for (int x = std::max(0, pad - j); x < std::min(kH1, Hs + pad - j); ++x) o[x] += s[x];
          }
        }
    }
}

// 5×5 patches of planes a [Cp, n, 14, 14] (pad 0): U[(c,i,j), (m,y,x)], 10×10 outputs
template <typename T>
void im2col_pool1(const T* a, int Cp, int n, T* U) {
  const int L = n * kH2 * kH2;
  for (int c = 0; c < Cp; ++c)
    for (int i = 0; i < 5; ++i)
      for (int j = 0; j < 5; ++j) {
        T* row = U + ((c * 5 + i) * 5 + j) * L;
        for (int m = 0; m < n; ++m) {
          const T* plane = a + (int64_t(c) * n + m) * kP1 * kP1;
          for (int y = 0; y < kH2; ++y) {
            const T* s = plane + (y + i) * kP1 + j;
            T* o = row + (m * kH2 + y) * kH2;
            for (int x = 0; x < kH2; ++x) o[x] = s[x];
          }
        }
      }
}

// adjoint: a[c, m, ·, ·] = Σ_(i,j) U[(c,i,j), (m, ·−i, ·−j)]
template <typename T>
void col2im_pool1(const T* U, int Cp, int n, T* a) {
  const int L = n * kH2 * kH2;
  for (int c = 0; c < Cp; ++c)
    for (int m = 0; m < n; ++m) {
      T* plane = a + (int64_t(c) * n + m) * kP1 * kP1;
      std::fill(plane, plane + kP1 * kP1, T(0));
      for (int i = 0; i < 5; ++i)
        for (int j = 0; j < 5; ++j) {
          const T* row = U + ((c * 5 + i) * 5 + j) * L + m * kH2 * kH2;
          for (int y = 0; y < kH2; ++y) {
            T* o = plane + (y + i) * kP1 + j;
            const T* s = row + y * kH2;
            for (int x = 0; x < kH2; ++x) o[x] += s[x];
          }
        }
    }
}

// a = relu(max_{2×2} z + b) per plane (planes × n images of side Hz); idx = first maximum in
// scan order, NaN wins (pool2_relu_window, shared with the pool2_relu op)
template <typename T>
void pool_fwd(const T* z, const T* bias, int planes, int n, int Hz, T* a, int* idx) {
  const int h = Hz / 2;
  for (int c = 0; c < planes; ++c) {
    const T b = bias[c];
    for (int m = 0; m < n; ++m) {
      const int64_t q = int64_t(c) * n + m;
      const T* plane = z + q * Hz * Hz;
      T* o = a + q * h * h;
      int* ix = idx + q * h * h;
      for (int y = 0; y < h; ++y)
        pool2_relu_row<T, int>(plane + 2 * y * Hz, plane + (2 * y + 1) * Hz, h, 2 * y * Hz, Hz, b,
                               o + y * h, ix + y * h);
    }
  }
}

// ȧ = (ż[idx] + ḃ)·[a > 0]
template <typename T>
void pool_tan(const T* zd, const T* bias_d, const int* idx, const T* a, int planes, int n, int Hz,
              T* ad) {
  const int hh = (Hz / 2) * (Hz / 2);
  for (int c = 0; c < planes; ++c)
    for (int m = 0; m < n; ++m) {
      const int64_t q = int64_t(c) * n + m;
      const T* plane = zd + q * Hz * Hz;
      for (int o = 0; o < hh; ++o) {
        const int64_t k = q * hh + o;
        ad[k] = (plane[idx[k]] + bias_d[c]) * static_cast<T>(a[k] > 0);
      }
    }
}

// dz[u] = d[o]·[a_o > 0] at u = idx_o (windows do not overlap), 0 elsewhere; db_c = Σ d·[a > 0]
template <typename T>
void pool_bwd(const T* d, const int* idx, const T* a, int planes, int n, int Hz, T* dz, T* db) {
  const int hh = (Hz / 2) * (Hz / 2);
  for (int c = 0; c < planes; ++c) {
    T acc = 0;
    for (int m = 0; m < n; ++m) {
      const int64_t q = int64_t(c) * n + m;
      T* plane = dz + q * Hz * Hz;
      std::fill(plane, plane + Hz * Hz, T(0));
      for (int o = 0; o < hh; ++o) {
        const int64_t k = q * hh + o;
        const T g = d[k] * static_cast<T>(a[k] > 0);
        plane[idx[k]] = g;
        acc += g;
      }
    }
    db[c] = acc;
  }
}

// h[m, f] = relu?(h[m, f] + b[f]); optional mask output
template <typename T>
void add_bias_relu(T* h, const T* b, int n, int F, bool relu) {
  for (int m = 0; m < n; ++m)
    for (int f = 0; f < F; ++f) {
      const T v = h[m * F + f] + b[f];
      h[m * F + f] = relu ? v * static_cast<T>(v > 0) : v;
    }
}

// t[m, f] = (t[m, f] + bd[f])·[h[m, f] > 0] (bd may be null: no bias tangent)
template <typename T>
void tangent_mask(T* t, const T* bd, const T* h, int n, int F, bool relu) {
  for (int m = 0; m < n; ++m)
    for (int f = 0; f < F; ++f) {
      const T v = t[m * F + f] + (bd ? bd[f] : T(0));
      t[m * F + f] = relu ? v * static_cast<T>(h[m * F + f] > 0) : v;
    }
}

template <typename T>
void mask_by(T* d, const T* h, int count) {
  for (int i = 0; i < count; ++i) d[i] *= static_cast<T>(h[i] > 0);
}

// column sums over images: db[f] = Σ_m d[m, f] (fixed order)
template <typename T>
void sum_images(const T* d, int n, int F, T* db) {
  for (int f = 0; f < F; ++f) {
    T acc = 0;
    for (int m = 0; m < n; ++m) acc += d[m * F + f];
    db[f] = acc;
  }
}

// ------------------------------------------------------------------------------ one network
template <typename T>
struct Net {
  const Dims& d;
  const T* th;  // θ_k
  const T* vv;  // v_k (null: no tangent)
  // activations (value, tangent), layouts in the header comment
  T *X, *Z1, *A1, *U, *Z2, *A2, *f0, *h1, *h2, *z;
  T *A1d, *f0d, *h1d, *h2d, *zd;
  int *i1, *i2;
  // backward buffers
  T *dz, *dzd, *dh2, *dh2d, *dh1, *dh1d, *df0, *df0d, *DA1, *XC;
  T* XT;  // Xᵀ [L1 × C·25]: conv1's weight gradient is then an untransposed-B GEMM
  T* AB;  // [V1ᵀ | W1ᵀ] or [V2ᵀ | W2ᵀ]: a tangent's two input-gradient products as one GEMM

  Net(const Dims& d_, const T* th_, const T* v_, const T* Xshared, const T* XTshared, std::vector<T>& buf,
      std::vector<int>& ibuf)
      : d(d_), th(th_), vv(v_) {
    const int n = d.n, L1 = d.L1(), L2 = d.L2(), S = vv ? 2 : 1;
    size_t need = 0;
    auto plan = [&](size_t count) { const size_t r = need; need += (count + 15) & ~size_t(15); return r; };
    const size_t oX = Xshared ? 0 : plan(size_t(d.C25()) * L1);
    const size_t oXT = Xshared ? 0 : plan(size_t(d.C25()) * L1);
    const size_t oZ1 = plan(size_t(S) * kC1 * L1), oA1 = plan(size_t(S) * kC1 * n * kP1 * kP1);
    const size_t oU = plan(size_t(S) * 150 * L2), oZ2 = plan(size_t(S) * kC2 * L2);
    const size_t oA2 = plan(size_t(S) * kF0 * n), of0 = plan(size_t(S) * n * kF0);
    const size_t oh1 = plan(size_t(S) * n * kF1), oh2 = plan(size_t(S) * n * kF2);
    const size_t oz = plan(size_t(S) * n * d.O), odz = plan(size_t(S) * n * d.O);
    const size_t odh2 = plan(size_t(S) * n * kF2), odh1 = plan(size_t(S) * n * kF1);
    const size_t odf0 = plan(size_t(S) * n * kF0), oDA1 = plan(size_t(S) * kC1 * n * kP1 * kP1);
    const size_t oXC = vv ? plan(size_t(d.C25()) * L1) : 0;
    const size_t oAB = vv ? plan(std::max(size_t(d.C25()) * 2 * kC1, size_t(150) * 2 * kC2)) : 0;
    if (buf.size() < need) buf.resize(need);
    const size_t ineed = size_t(kC1) * n * kP1 * kP1 + size_t(kF0) * n;
    if (ibuf.size() < ineed) ibuf.resize(ineed);
    T* B = buf.data();
    X = Xshared ? const_cast<T*>(Xshared) : B + oX;
    XT = Xshared ? const_cast<T*>(XTshared) : B + oXT;
    Z1 = B + oZ1; A1 = B + oA1; U = B + oU; Z2 = B + oZ2; A2 = B + oA2; f0 = B + of0;
    h1 = B + oh1; h2 = B + oh2; z = B + oz; dz = B + odz; dh2 = B + odh2; dh1 = B + odh1;
    df0 = B + odf0; DA1 = B + oDA1; XC = vv ? B + oXC : nullptr; AB = vv ? B + oAB : nullptr;
    A1d = A1 + kC1 * n * kP1 * kP1; f0d = f0 + n * kF0; h1d = h1 + n * kF1; h2d = h2 + n * kF2;
    zd = z + n * d.O; dzd = dz + n * d.O; dh2d = dh2 + n * kF2; dh1d = dh1 + n * kF1;
    df0d = df0 + n * kF0;
    i1 = ibuf.data(); i2 = i1 + kC1 * n * kP1 * kP1;
  }

  const T* W(int64_t off) const { return th + off; }
  const T* V(int64_t off) const { return vv + off; }

  void forward(const T* img) {
    const int n = d.n, L1 = d.L1(), L2 = d.L2(), C25 = d.C25(), O = d.O;
    if (img) {
      im2col_input(img, n, d.C, d.H, d.pad, X);
      transpose(X, C25, L1, XT);
    }
    // conv1: value rows; the tangent (V1 X, no ẋ) in its own call so the value path is the
    // same BLAS call with and without v
    gemm('N', 'N', kC1, L1, C25, W(d.w1), C25, X, L1, T(0), Z1, L1);
    pool_fwd(Z1, W(d.b1), kC1, n, kH1, A1, i1);
    im2col_pool1(A1, kC1, n, U);
    gemm('N', 'N', kC2, L2, 150, W(d.w2), 150, U, L2, T(0), Z2, L2);
    pool_fwd(Z2, W(d.b2), kC2, n, kH2, A2, i2);
    flatten(A2, f0);
    gemm('N', 'T', n, kF1, kF0, f0, kF0, W(d.f1), kF0, T(0), h1, kF1);
    add_bias_relu(h1, W(d.c1), n, kF1, true);
    gemm('N', 'T', n, kF2, kF1, h1, kF1, W(d.f2), kF1, T(0), h2, kF2);
    add_bias_relu(h2, W(d.c2), n, kF2, true);
    gemm('N', 'T', n, O, kF2, h2, kF2, W(d.f3), kF2, T(0), z, O);
    add_bias_relu(z, W(d.c3), n, O, false);
    if (!vv) return;
    // tangents: ż = V h + W ḣ + ḃ layer by layer (ReLU masks and pool indices fixed)
    T* Z1d = Z1 + kC1 * L1;
    gemm('N', 'N', kC1, L1, C25, V(d.w1), C25, X, L1, T(0), Z1d, L1);
    pool_tan(Z1d, V(d.b1), i1, A1, kC1, n, kH1, A1d);
    T* Ud = U + 150 * L2;
    im2col_pool1(A1d, kC1, n, Ud);
    T* Z2d = Z2 + kC2 * L2;
    gemm('N', 'N', kC2, L2, 150, V(d.w2), 150, U, L2, T(0), Z2d, L2);
    gemm('N', 'N', kC2, L2, 150, W(d.w2), 150, Ud, L2, T(1), Z2d, L2);
    T* A2d = A2 + kF0 * n;
    pool_tan(Z2d, V(d.b2), i2, A2, kC2, n, kH2, A2d);
    flatten(A2d, f0d);
    linear_tan(f0, f0d, d.f1, d.c1, kF0, kF1, h1, h1d, true);
    linear_tan(h1, h1d, d.f2, d.c2, kF1, kF2, h2, h2d, true);
    linear_tan(h2, h2d, d.f3, d.c3, kF2, O, z, zd, false);
  }

  // a2 [16, n, 25] -> f [n, 400] with features in (c, y, x) order
  void flatten(const T* a2, T* f) const {
    for (int c = 0; c < kC2; ++c)
      for (int m = 0; m < d.n; ++m)
        for (int p = 0; p < 25; ++p) f[m * kF0 + c * 25 + p] = a2[(c * d.n + m) * 25 + p];
  }
  void unflatten(const T* f, T* a2) const {
    for (int c = 0; c < kC2; ++c)
      for (int m = 0; m < d.n; ++m)
        for (int p = 0; p < 25; ++p) a2[(c * d.n + m) * 25 + p] = f[m * kF0 + c * 25 + p];
  }

  // ḣ_out = (h Vᵀ + ḣ Wᵀ + ḃ)·[h_out > 0]
  void linear_tan(const T* h, const T* hd, int64_t w, int64_t b, int Fin, int Fout, const T* hout,
                  T* hdout, bool relu) {
    const int n = d.n;
    gemm('N', 'T', n, Fout, Fin, h, Fin, V(w), Fin, T(0), hdout, Fout);
    gemm('N', 'T', n, Fout, Fin, hd, Fin, W(w), Fin, T(1), hdout, Fout);
    tangent_mask(hdout, V(b), hout, n, Fout, relu);
  }

  // softmax cross-entropy: ℓ, δz = s(p ΣY − Y); with v: δż = s p (ż − ⟨p, ż⟩) ΣY and
  // R{∇_Y ℓ} = −s (ż − ⟨p, ż⟩) into dY [n, O]
  T head(const T* Yk, T scale, T* dY) {
    const int n = d.n, O = d.O;
    T loss = 0;
    for (int m = 0; m < n; ++m) {
      const T* zr = z + m * O;
      const T* yr = Yk + m * O;
      T mx = zr[0];
      for (int c = 1; c < O; ++c) mx = std::max(mx, zr[c]);
      T se = 0;
      for (int c = 0; c < O; ++c) se += std::exp(zr[c] - mx);
      const T lse = mx + std::log(se);
      T ysum = 0, row = 0, pz = 0;
      for (int c = 0; c < O; ++c) {
        const T logp = zr[c] - lse;
        const T p = std::exp(logp);
        ysum += yr[c];
        row += yr[c] * logp;
        if (vv) pz += p * zd[m * O + c];
      }
      loss -= row;
      for (int c = 0; c < O; ++c) {
        const T p = std::exp(zr[c] - lse);
        dz[m * O + c] = (p * ysum - yr[c]) * scale;
        if (vv) {
          const T centred = zd[m * O + c] - pz;
          dzd[m * O + c] = p * centred * ysum * scale;
          if (dY) dY[m * O + c] = -centred * scale;
        }
      }
    }
    return loss * scale;
  }

  // z = h Wᵀ + b backwards: ∇W = δᵀ h, ∇b = Σ δ, δh = δ W (masked by the ReLU of h);
  // R{∇W} = δ̇ᵀ h + δᵀ ḣ, R{δh} = δ̇ W + δ V
  void linear_back(const T* dd, const T* ddd, const T* h, const T* hd, int64_t w, int64_t b,
                   int Fin, int Fout, T* g, T* gd, T* dh, T* dhd, bool mask) {
    const int n = d.n;
    gemm('T', 'N', Fout, Fin, n, dd, Fout, h, Fin, T(0), g + w, Fin);
    sum_images(dd, n, Fout, g + b);
    if (dh) {
      gemm('N', 'N', n, Fin, Fout, dd, Fout, W(w), Fin, T(0), dh, Fin);
      if (mask) mask_by(dh, h, n * Fin);
    }
    if (!vv) return;
    gemm('T', 'N', Fout, Fin, n, ddd, Fout, h, Fin, T(0), gd + w, Fin);
    gemm('T', 'N', Fout, Fin, n, dd, Fout, hd, Fin, T(1), gd + w, Fin);
    sum_images(ddd, n, Fout, gd + b);
    if (dhd) {
      gemm('N', 'N', n, Fin, Fout, ddd, Fout, W(w), Fin, T(0), dhd, Fin);
      gemm('N', 'N', n, Fin, Fout, dd, Fout, V(w), Fin, T(1), dhd, Fin);
      if (mask) mask_by(dhd, h, n * Fin);
    }
  }

  // AB [cols × 2·rows] = [aᵀ | bᵀ] for row-major a, b [rows × cols]
  void stack_transposed(const T* a, const T* b, int rows, int cols) {
    for (int q = 0; q < cols; ++q)
      for (int o = 0; o < rows; ++o) {
        AB[q * 2 * rows + o] = a[o * cols + q];
        AB[q * 2 * rows + rows + o] = b[o * cols + q];
      }
  }

  // ∇W1 = δz1 Xᵀ (and R{∇W1} = δż1 Xᵀ) image by image: each image's 784 rows of Xᵀ (78 KB at
  // C = 1) stay in cache for both products; g's calls are the same with and without v
  void conv1_wgrad(const T* DZ1, const T* DZ1d, T* g, T* gd) {
    const int L1 = d.L1(), C25 = d.C25(), HW = kH1 * kH1;
    for (int m = 0; m < d.n; ++m) {
      const T* xt = XT + int64_t(m) * HW * C25;
      gemm('N', 'N', kC1, C25, HW, DZ1 + m * HW, L1, xt, C25, T(m > 0), g + d.w1, C25);
      if (DZ1d) gemm('N', 'N', kC1, C25, HW, DZ1d + m * HW, L1, xt, C25, T(m > 0), gd + d.w1, C25);
    }
  }

  // from δz (and δż) in dz/dzd: g (and H v, and the per-network input term into dximg)
  void backward(T* g, T* gd, T* dximg) {
    const int n = d.n, L1 = d.L1(), L2 = d.L2(), C25 = d.C25(), O = d.O;
    linear_back(dz, dzd, h2, h2d, d.f3, d.c3, kF2, O, g, gd, dh2, dh2d, true);
    linear_back(dh2, dh2d, h1, h1d, d.f2, d.c2, kF1, kF2, g, gd, dh1, dh1d, true);
    linear_back(dh1, dh1d, f0, f0d, d.f1, d.c1, kF0, kF1, g, gd, df0, df0d, false);
    // pool2: δ at the pooled maps back to conv2's output. f0/ḟ0 are free now (fc1 is done)
    // and hold the unflattened δ; Z2's storage takes δz2 (value rows, then tangent rows).
    unflatten(df0, f0);
    T* DZ2 = Z2;
    pool_bwd(f0, i2, A2, kC2, n, kH2, DZ2, g + d.b2);
    T* DZ2d = Z2 + kC2 * L2;
    if (vv) {
      unflatten(df0d, f0d);
      pool_bwd(f0d, i2, A2, kC2, n, kH2, DZ2d, gd + d.b2);
    }
    // conv2 weights: ∇W2 = δz2 Uᵀ; R{∇W2} = δż2 Uᵀ + δz2 U̇ᵀ
    gemm('N', 'T', kC2, 150, L2, DZ2, L2, U, L2, T(0), g + d.w2, 150);
    if (vv) {
      gemm('N', 'T', kC2, 150, L2, DZ2d, L2, U, L2, T(0), gd + d.w2, 150);
      gemm('N', 'T', kC2, 150, L2, DZ2, L2, U + 150 * L2, L2, T(1), gd + d.w2, 150);
    }
    // conv2 input: W2ᵀ δz2 (and V2ᵀ δz2 + W2ᵀ δż2) as columns in U's storage, then col2im
    gemm('T', 'N', 150, L2, kC2, W(d.w2), 150, DZ2, L2, T(0), U, L2);
    col2im_pool1(U, kC1, n, DA1);
    T* DZ1 = Z1;
    pool_bwd(DA1, i1, A1, kC1, n, kH1, DZ1, g + d.b1);
    if (!vv) { conv1_wgrad(DZ1, nullptr, g, nullptr); return; }
    T* Ud = U + 150 * L2;
    // V2ᵀ δz2 + W2ᵀ δż2 = [V2ᵀ | W2ᵀ] [δz2; δż2] (the two are consecutive rows of Z2's storage)
    stack_transposed(V(d.w2), W(d.w2), kC2, 150);
    gemm('N', 'N', 150, L2, 2 * kC2, AB, 2 * kC2, DZ2, L2, T(0), Ud, L2);
    T* DA1d = DA1 + kC1 * n * kP1 * kP1;
    col2im_pool1(Ud, kC1, n, DA1d);
    T* DZ1d = Z1 + kC1 * L1;
    pool_bwd(DA1d, i1, A1, kC1, n, kH1, DZ1d, gd + d.b1);
    conv1_wgrad(DZ1, DZ1d, g, gd);
    if (dximg) {  // R{∇_x ℓ} = V1ᵀ δz1 + W1ᵀ δż1, back through im2col
      stack_transposed(V(d.w1), W(d.w1), kC1, C25);
      gemm('N', 'N', C25, L1, 2 * kC1, AB, 2 * kC1, DZ1, L1, T(0), XC, L1);
      col2im_input(XC, n, d.C, d.H, d.pad, dximg);
    }
  }
};

template <typename T>
struct Scratch {
  std::vector<T> buf;
  std::vector<int> ibuf;
};

template <typename T>
Scratch<T>& thread_scratch() {
  thread_local Scratch<T> s;  // OpenMP's worker threads persist: reused across calls
  return s;
}

template <typename T>
void run(const Dims& d, const at::Tensor& theta, const at::Tensor& x, const at::Tensor& Y,
         const at::Tensor* v, double scale, at::Tensor& loss, at::Tensor& g, at::Tensor* hv,
         at::Tensor* dx_per_net, at::Tensor* dY_per_net) {
  const T* th = theta.const_data_ptr<T>();
  const T* vp = v ? v->const_data_ptr<T>() : nullptr;
  const T* xp = x.const_data_ptr<T>();
  const T* yp = Y.const_data_ptr<T>();
  const int64_t img_numel = int64_t(d.n) * d.C * d.H * d.H;
  const int64_t y_numel = int64_t(d.n) * d.O;
  // the shared input's patches once for every network
  std::vector<T> Xs, XTs;
  if (d.shared_x) {
    Xs.resize(size_t(d.C25()) * d.L1());
    XTs.resize(Xs.size());
    im2col_input(xp, d.n, d.C, d.H, d.pad, Xs.data());
    transpose(Xs.data(), d.C25(), d.L1(), XTs.data());
  }
  T* lp = loss.mutable_data_ptr<T>();
  T* gp = g.mutable_data_ptr<T>();
  T* hp = hv ? hv->mutable_data_ptr<T>() : nullptr;
  T* dxp = dx_per_net ? dx_per_net->mutable_data_ptr<T>() : nullptr;
  T* dyp = dY_per_net ? dY_per_net->mutable_data_ptr<T>() : nullptr;
  at::parallel_for(0, d.K, 1, [&](int64_t begin, int64_t end) {
    SequentialBlas seq;
    Scratch<T>& s = thread_scratch<T>();
    for (int64_t k = begin; k < end; ++k) {
      Net<T> net(d, th + k * d.P, vp ? vp + k * d.P : nullptr, d.shared_x ? Xs.data() : nullptr, d.shared_x ? XTs.data() : nullptr,
                 s.buf, s.ibuf);
      net.forward(d.shared_x ? nullptr : xp + k * img_numel);
      lp[k] = net.head(yp + (d.shared_y ? 0 : k * y_numel), static_cast<T>(scale),
                       dyp ? dyp + k * y_numel : nullptr);
      net.backward(gp + k * d.P, hp ? hp + k * d.P : nullptr, dxp ? dxp + k * img_numel : nullptr);
    }
    if (std::is_same<T, float>::value) at::native::cpublas::brgemm_release(false);
  });
}

// Σ over networks in index order (deterministic): [K, rest] -> [rest]
at::Tensor sum_networks(const at::Tensor& per_net) {
  at::Tensor out = at::zeros(per_net.sizes().slice(1), per_net.options());
  const int64_t K = per_net.size(0), N = out.numel();
  AT_DISPATCH_FLOATING_TYPES(per_net.scalar_type(), "fastdistill::lenet_step sum", [&] {
    const scalar_t* src = per_net.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, N, 4096, [&](int64_t b, int64_t e) {
      for (int64_t k = 0; k < K; ++k)
        for (int64_t i = b; i < e; ++i) dst[i] += src[k * N + i];
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> lenet_grad_cpu(const at::Tensor& theta, const at::Tensor& x,
                                                  const at::Tensor& Y, double scale, int64_t pad) {
  const Dims d = make_dims(theta, x, Y, pad, "lenet_grad");
  at::Tensor loss = at::empty({d.K}, theta.options());
  at::Tensor g = at::empty({d.K, d.P}, theta.options());
  AT_DISPATCH_FLOATING_TYPES(theta.scalar_type(), "fastdistill::lenet_grad (cpu)", [&] {
    run<scalar_t>(d, theta, x, Y, nullptr, scale, loss, g, nullptr, nullptr, nullptr);
  });
  return {loss, g};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lenet_grad_hvp_cpu(
    const at::Tensor& theta, const at::Tensor& x, const at::Tensor& Y, const at::Tensor& v,
    double scale, int64_t pad, bool need_x, bool need_y) {
  const Dims d = make_dims(theta, x, Y, pad, "lenet_grad_hvp");
  check_float_contiguous(v, "v", c10::DeviceType::CPU);
  TORCH_CHECK(v.sizes() == theta.sizes() && v.scalar_type() == theta.scalar_type(),
              "fastdistill: lenet_grad_hvp: v must have theta's shape ", theta.sizes(), " and dtype, got ",
              v.sizes());
  at::Tensor loss = at::empty({d.K}, theta.options());
  at::Tensor g = at::empty({d.K, d.P}, theta.options());
  at::Tensor hv = at::empty({d.K, d.P}, theta.options());
  at::Tensor dx = need_x ? at::empty({d.K, d.n, d.C, d.H, d.H}, theta.options())
                         : at::empty({0}, theta.options());
  at::Tensor dY = need_y ? at::empty({d.K, d.n, d.O}, theta.options()) : at::empty({0}, theta.options());
  AT_DISPATCH_FLOATING_TYPES(theta.scalar_type(), "fastdistill::lenet_grad_hvp (cpu)", [&] {
    run<scalar_t>(d, theta, x, Y, &v, scale, loss, g, &hv, need_x ? &dx : nullptr,
                  need_y ? &dY : nullptr);
  });
  if (need_x && d.shared_x) dx = sum_networks(dx);
  if (need_y && d.shared_y) dY = sum_networks(dY).unsqueeze(0);
  return {loss, g, hv, dx, dY};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastdistill, m) {
  // ℓ and ∇_θ ℓ of K LeNets (see the header): theta [K, P], x [n,C,H,W] or [K,n,C,H,W],
  // Y [1 or K, n, O] float targets; ℓ = −scale Σ Y log softmax.
  m.def("lenet_grad(Tensor theta, Tensor x, Tensor Y, float scale, int pad) -> (Tensor, Tensor)");
  // (ℓ, g, H v, ∇_x Σ v·g (x's shape; [0] unless need_x), ∇_Y Σ v·g ([1 or K, n, O]; [0] unless need_y))
  m.def("lenet_grad_hvp(Tensor theta, Tensor x, Tensor Y, Tensor v, float scale, int pad, "
        "bool need_x, bool need_y) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastdistill, CPU, m) {
  m.impl("lenet_grad", &lenet_grad_cpu);
  m.impl("lenet_grad_hvp", &lenet_grad_hvp_cpu);
}

}  // namespace fastdistill
