// CUDA kernels of lrn (local response norm across channels) and its tangent/backward; the CPU
// kernels, the formulas and their derivation are in csrc/cpu/lrn.cpp and fastdistill/ops/lrn.py.
//
// Design: one thread per output element (grid-stride loops; consecutive threads take
// consecutive e, so every channel row is read coalesced), no shared writes, no atomics. Each
// thread evaluates the same expressions as the CPU kernel, in double for both dtypes, with the
// window sums in ascending channel order, t = κ + (α/n)·s and t^0.75 = √t·√√t (IEEE sqrt and
// division; built with --fmad=false), so CPU and CUDA round alike and reruns are bit-identical.
// The backward first writes 1/D and y/t per (b, c, e) into a workspace, then gathers over the
// transposed window.
// Limits: float32/float64, contiguous buffers. No torch headers here (nvcc-checkable on CI).
#include "lrn.h"

namespace fastdistill {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65536;

unsigned blocks_for(int64_t n) {
  int64_t b = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(b > kMaxBlocks ? kMaxBlocks : (b < 1 ? 1 : b));
}

#define FD_GRID_LOOP(t, n)                                                                     \
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < (n);        \
       t += static_cast<int64_t>(blockDim.x) * gridDim.x)

// Window W(c) = c − before .. c + after of size n; a = α/n; c2 = 2αβ/n.
struct Params {
  int64_t before, after;
  double a, beta, k, c2;
  bool three_quarters;
};

__device__ __forceinline__ double t_of(const Params& p, double s) { return p.k + p.a * s; }

__device__ __forceinline__ double pow_beta(const Params& p, double t) {
  if (p.three_quarters) {
    const double r = sqrt(t);
    return r * sqrt(r);
  }
  return pow(t, p.beta);
}

// Σ_{j ∈ W(c)} x_j² at (b, ·, e) for channel c; xb points at (b, 0, e), E = channel stride
template <typename T>
__device__ __forceinline__ double square_sum(const Params& p, const T* xb, int64_t c, int64_t C, int64_t E) {
  const int64_t j0 = c - p.before > 0 ? c - p.before : 0;
  const int64_t j1 = c + p.after < C - 1 ? c + p.after : C - 1;
  double s = 0.0;
  for (int64_t j = j0; j <= j1; ++j) {
    const double v = static_cast<double>(xb[j * E]);
    s += v * v;
  }
  return s;
}

// y = x / D; n = B·C·E
template <typename T>
__global__ void lrn_kernel(const T* __restrict__ x, T* __restrict__ y, Params p, int64_t C, int64_t E,
                           int64_t n) {
  FD_GRID_LOOP(t, n) {
    const int64_t e = t % E, c = (t / E) % C, b = t / (C * E);
    const double d = pow_beta(p, t_of(p, square_sum(p, x + b * C * E + e, c, C, E)));
    y[t] = static_cast<T>(static_cast<double>(x[t]) / d);
  }
}

// ẏ = ẋ/D − c2 · (y/t) · Σ_{W(c)} x ẋ; n = B·C·E
template <typename T>
__global__ void lrn_tangent_kernel(const T* __restrict__ xd, const T* __restrict__ x, T* __restrict__ yd,
                                   Params p, int64_t C, int64_t E, int64_t n) {
  FD_GRID_LOOP(t, n) {
    const int64_t e = t % E, c = (t / E) % C, b = t / (C * E);
    const T* xb = x + b * C * E + e;
    const T* tb = xd + b * C * E + e;
    const int64_t j0 = c - p.before > 0 ? c - p.before : 0;
    const int64_t j1 = c + p.after < C - 1 ? c + p.after : C - 1;
    double s = 0.0, sx = 0.0;
    for (int64_t j = j0; j <= j1; ++j) {
      const double v = static_cast<double>(xb[j * E]);
      s += v * v;
      sx += v * static_cast<double>(tb[j * E]);
    }
    const double tt = t_of(p, s), rd = 1.0 / pow_beta(p, tt);
    const double q = (static_cast<double>(x[t]) * rd) / tt;
    yd[t] = static_cast<T>(static_cast<double>(xd[t]) * rd - p.c2 * q * sx);
  }
}

// work[0·BCE + t] = 1/D, work[1·BCE + t] = y/t; n = B·C·E
template <typename T>
__global__ void lrn_prepare_kernel(const T* __restrict__ x, double* __restrict__ work, Params p,
                                   int64_t C, int64_t E, int64_t n) {
  FD_GRID_LOOP(t, n) {
    const int64_t e = t % E, c = (t / E) % C, b = t / (C * E);
    const double tt = t_of(p, square_sum(p, x + b * C * E + e, c, C, E)), rd = 1.0 / pow_beta(p, tt);
    work[t] = rd;
    work[n + t] = (static_cast<double>(x[t]) * rd) / tt;
  }
}

// x̄_j = ȳ_j/D_j − c2 · x_j · Σ_{c ∈ Wᵀ(j)} ȳ_c (y/t)_c, Wᵀ(j) = j − after .. j + before;
// g, xg [S, B, C, E]; BCE = B·C·E; n = S·BCE
template <typename T>
__global__ void lrn_backward_kernel(const T* __restrict__ g, const T* __restrict__ x,
                                    const double* __restrict__ work, T* __restrict__ xg, Params p,
                                    int64_t C, int64_t E, int64_t BCE, int64_t n) {
  FD_GRID_LOOP(t, n) {
    const int64_t r = t % BCE, s = t / BCE;
    const int64_t e = r % E, j = (r / E) % C, b = r / (C * E);
    const int64_t c0 = j - p.after > 0 ? j - p.after : 0;
    const int64_t c1 = j + p.before < C - 1 ? j + p.before : C - 1;
    const T* gb = g + s * BCE + b * C * E + e;
    const double* qb = work + BCE + b * C * E + e;
    double acc = 0.0;
    for (int64_t c = c0; c <= c1; ++c) acc += static_cast<double>(gb[c * E]) * qb[c * E];
    xg[t] = static_cast<T>(static_cast<double>(g[t]) * work[r] - p.c2 * static_cast<double>(x[r]) * acc);
  }
}

Params make_params(int64_t size, double alpha, double beta, double k) {
  Params p;
  p.before = size / 2;
  p.after = (size - 1) / 2;
  p.a = alpha / static_cast<double>(size);
  p.beta = beta;
  p.k = k;
  p.c2 = 2.0 * alpha * beta / static_cast<double>(size);
  p.three_quarters = beta == 0.75;
  return p;
}

}  // namespace

template <typename T>
cudaError_t lrn(const T* x, T* y, int64_t B, int64_t C, int64_t E, int64_t size, double alpha,
                double beta, double k, cudaStream_t stream) {
  const int64_t n = B * C * E;
  if (n <= 0) return cudaSuccess;
  lrn_kernel<T><<<blocks_for(n), kThreads, 0, stream>>>(x, y, make_params(size, alpha, beta, k), C, E, n);
  return cudaGetLastError();
}

template <typename T>
cudaError_t lrn_tangent(const T* xd, const T* x, T* yd, int64_t B, int64_t C, int64_t E, int64_t size,
                        double alpha, double beta, double k, cudaStream_t stream) {
  const int64_t n = B * C * E;
  if (n <= 0) return cudaSuccess;
  lrn_tangent_kernel<T><<<blocks_for(n), kThreads, 0, stream>>>(xd, x, yd, make_params(size, alpha, beta, k),
                                                                 C, E, n);
  return cudaGetLastError();
}

template <typename T>
cudaError_t lrn_backward(const T* g, const T* x, T* xg, double* work, int64_t S, int64_t B, int64_t C,
                         int64_t E, int64_t size, double alpha, double beta, double k,
                         cudaStream_t stream) {
  const int64_t BCE = B * C * E, n = S * BCE;
  if (n <= 0) return cudaSuccess;
  const Params p = make_params(size, alpha, beta, k);
  lrn_prepare_kernel<T><<<blocks_for(BCE), kThreads, 0, stream>>>(x, work, p, C, E, BCE);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  lrn_backward_kernel<T><<<blocks_for(n), kThreads, 0, stream>>>(g, x, work, xg, p, C, E, BCE, n);
  return cudaGetLastError();
}

#define FD_INSTANTIATE(T)                                                                          \
  template cudaError_t lrn<T>(const T*, T*, int64_t, int64_t, int64_t, int64_t, double, double,    \
                              double, cudaStream_t);                                               \
  template cudaError_t lrn_tangent<T>(const T*, const T*, T*, int64_t, int64_t, int64_t, int64_t,  \
                                      double, double, double, cudaStream_t);                       \
  template cudaError_t lrn_backward<T>(const T*, const T*, T*, double*, int64_t, int64_t, int64_t, \
                                       int64_t, int64_t, double, double, double, cudaStream_t);
FD_INSTANTIATE(float)
FD_INSTANTIATE(double)

}  // namespace cuda
}  // namespace fastdistill
