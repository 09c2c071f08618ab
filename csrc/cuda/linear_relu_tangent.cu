// CUDA kernels of linear_relu_tangent: K batched linear layers + ReLU and their R-operator
// tangent; the maths and the reference are in fastdistill/ops/linear_relu_tangent.py.
//
//     z = W h + b,   out = relu(z);   ż = V h + W ḣ + ḃ,   td = ż · [out > 0]
//
// Design: a plain shared-memory tiled GEMM. One block of 16×16 threads owns a 32 (F_out) × 32
// (n) tile of one network's outputs, each thread a 2×2 micro-tile; the reduction over F_in walks
// 32-wide slabs of W, h (and V, ḣ) staged in shared memory, so every input element is read from
// global memory once per tile, and z and ż share the loads of W and h. The bias, the ReLU and
// the tangent's mask are applied in the epilogue, so out and td are written once. Every output
// accumulates its products in ascending F_in order (for ż: V h then W ḣ at each index) in
// double for both dtypes, the bias added last, rounded once to the output dtype: the order does
// not depend on the launch, no atomics, so reruns are bit-identical (built with --fmad=false:
// separate multiplies and adds). Out-of-range slab entries are zero in both operands, so they
// add exact zeros (and never 0 · inf).
// Limits: float32/float64, contiguous buffers; networks beyond gridDim.z are looped over. No
// torch headers here (nvcc-checkable on CI).
#include "linear_relu_tangent.h"

namespace fastdistill {
namespace cuda {
namespace {

constexpr int kTile = 32;             // rows (F_out) and columns (n) of one block's tile
constexpr int kSlab = 32;             // F_in entries staged per step
constexpr int kSide = 16;             // threads per tile side: 16 × 16 = 256, 2 × 2 outputs each
constexpr int kThreads = kSide * kSide;
constexpr unsigned kMaxGridZ = 65535;

// ReLU as torch.relu: NaN stays NaN.
template <typename T>
__device__ __forceinline__ T relu_of(T v) {
  return (v > T(0) || v != v) ? v : T(0);
}

// Stage rows k0.. of a [rows, F_in] matrix (W or V) transposed into s[kk][r] (r < kTile), and
// rows k0.. of a [F_in, n] matrix (h or ḣ) into s[kk][c]; zeros outside.
template <typename T>
__device__ __forceinline__ void stage_weights(T (*s)[kTile + 1], const T* __restrict__ w, int64_t m0,
                                              int64_t k0, int64_t F_out, int64_t F_in, int tid) {
  for (int e = tid; e < kTile * kSlab; e += kThreads) {
    const int kk = e % kSlab, r = e / kSlab;   // consecutive threads read consecutive F_in
    const int64_t m = m0 + r, k = k0 + kk;
    s[kk][r] = (m < F_out && k < F_in) ? w[m * F_in + k] : T(0);
  }
}

template <typename T>
__device__ __forceinline__ void stage_inputs(T (*s)[kTile], const T* __restrict__ x, int64_t n0, int64_t k0,
                                             int64_t F_in, int64_t n, int tid) {
  for (int e = tid; e < kTile * kSlab; e += kThreads) {
    const int c = e % kTile, kk = e / kTile;   // consecutive threads read consecutive columns
    const int64_t j = n0 + c, k = k0 + kk;
    s[kk][c] = (j < n && k < F_in) ? x[k * n + j] : T(0);
  }
}

// Block (bx, by, bz): columns n0 = bx·32.., rows m0 = by·32.., networks bz, bz + gridDim.z, …
// Thread (tx, ty) computes rows m0 + ty + 16·i, columns n0 + tx + 16·j (i, j ∈ {0, 1}).
template <typename T, bool kTangent>
__global__ void __launch_bounds__(kThreads)
linear_relu_kernel(const T* __restrict__ h, const T* __restrict__ hd, const T* __restrict__ W,
                   const T* __restrict__ V, const T* __restrict__ b, const T* __restrict__ bd,
                   T* __restrict__ out, T* __restrict__ td, int64_t K, int64_t F_in, int64_t F_out,
                   int64_t n, bool relu) {
  __shared__ T Ws[kSlab][kTile + 1];   // +1: the transposed stores hit distinct banks
  __shared__ T Hs[kSlab][kTile];
  __shared__ T Vs[kTangent ? kSlab : 1][kTile + 1];
  __shared__ T Ds[kTangent ? kSlab : 1][kTile];
  const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * kSide + tx;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kTile;
  for (int64_t k = blockIdx.z; k < K; k += gridDim.z) {
    const T* hk = h + k * F_in * n;
    const T* Wk = W + k * F_out * F_in;
    double acc[2][2] = {{0.0, 0.0}, {0.0, 0.0}};
    double accd[2][2] = {{0.0, 0.0}, {0.0, 0.0}};
    for (int64_t k0 = 0; k0 < F_in; k0 += kSlab) {
      stage_weights<T>(Ws, Wk, m0, k0, F_out, F_in, tid);
      stage_inputs<T>(Hs, hk, n0, k0, F_in, n, tid);
      if (kTangent) {
        stage_weights<T>(Vs, V + k * F_out * F_in, m0, k0, F_out, F_in, tid);
        stage_inputs<T>(Ds, hd + k * F_in * n, n0, k0, F_in, n, tid);
      }
      __syncthreads();
      for (int kk = 0; kk < kSlab; ++kk) {   // ascending F_in: the fixed accumulation order
        const double w[2] = {static_cast<double>(Ws[kk][ty]), static_cast<double>(Ws[kk][ty + kSide])};
        const double x[2] = {static_cast<double>(Hs[kk][tx]), static_cast<double>(Hs[kk][tx + kSide])};
        for (int i = 0; i < 2; ++i)
          for (int j = 0; j < 2; ++j) acc[i][j] += w[i] * x[j];
        if (kTangent) {
          const double v[2] = {static_cast<double>(Vs[kk][ty]), static_cast<double>(Vs[kk][ty + kSide])};
          const double d[2] = {static_cast<double>(Ds[kk][tx]), static_cast<double>(Ds[kk][tx + kSide])};
          for (int i = 0; i < 2; ++i)
            for (int j = 0; j < 2; ++j) {
              accd[i][j] += v[i] * x[j];
              accd[i][j] += w[i] * d[j];
            }
        }
      }
      __syncthreads();   // the next slab overwrites the tiles
    }
    for (int i = 0; i < 2; ++i) {
      const int64_t m = m0 + ty + kSide * i;
      if (m >= F_out) continue;
      const double bias = static_cast<double>(b[k * F_out + m]);
      const double bias_d = kTangent ? static_cast<double>(bd[k * F_out + m]) : 0.0;
      for (int j = 0; j < 2; ++j) {
        const int64_t col = n0 + tx + kSide * j;
        if (col >= n) continue;
        const int64_t o = (k * F_out + m) * n + col;
        T z = static_cast<T>(acc[i][j] + bias);
        if (relu) z = relu_of(z);
        out[o] = z;
        if (kTangent) {
          const double zd = accd[i][j] + bias_d;
          // as the reference's ż · (out > 0): an inf/NaN ż times a closed mask stays NaN
          td[o] = static_cast<T>(relu ? zd * (z > T(0) ? 1.0 : 0.0) : zd);
        }
      }
    }
  }
}

template <typename T, bool kTangent>
cudaError_t launch(const T* h, const T* hd, const T* W, const T* V, const T* b, const T* bd, T* out,
                   T* td, int64_t K, int64_t F_in, int64_t F_out, int64_t n, bool relu,
                   cudaStream_t stream) {
  if (K <= 0 || F_out <= 0 || n <= 0) return cudaSuccess;
  const int64_t gx = (n + kTile - 1) / kTile, gy = (F_out + kTile - 1) / kTile;
  if (gx > 0x7fffffff || gy > 65535) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy),
                  static_cast<unsigned>(K < kMaxGridZ ? K : kMaxGridZ));
  linear_relu_kernel<T, kTangent><<<grid, dim3(kSide, kSide), 0, stream>>>(h, hd, W, V, b, bd, out, td, K,
                                                                           F_in, F_out, n, relu);
  return cudaGetLastError();
}

}  // namespace

template <typename T>
cudaError_t linear_relu(const T* h, const T* W, const T* b, T* out, int64_t K, int64_t F_in,
                        int64_t F_out, int64_t n, bool relu, cudaStream_t stream) {
  return launch<T, false>(h, nullptr, W, nullptr, b, nullptr, out, nullptr, K, F_in, F_out, n, relu, stream);
}

template <typename T>
cudaError_t linear_relu_tangent(const T* h, const T* hd, const T* W, const T* V, const T* b,
                                const T* bd, T* out, T* td, int64_t K, int64_t F_in, int64_t F_out,
                                int64_t n, bool relu, cudaStream_t stream) {
  return launch<T, true>(h, hd, W, V, b, bd, out, td, K, F_in, F_out, n, relu, stream);
}

#define FD_INSTANTIATE(T)                                                                          \
  template cudaError_t linear_relu<T>(const T*, const T*, const T*, T*, int64_t, int64_t, int64_t, \
                                      int64_t, bool, cudaStream_t);                                \
  template cudaError_t linear_relu_tangent<T>(const T*, const T*, const T*, const T*, const T*,    \
                                              const T*, T*, T*, int64_t, int64_t, int64_t, int64_t, \
                                              bool, cudaStream_t);
FD_INSTANTIATE(float)
FD_INSTANTIATE(double)

}  // namespace cuda
}  // namespace fastdistill
