// CUDA kernels of ce_head: the softmax cross-entropy head of K networks, its logit gradient and
// their R-operator tangents; the maths and the reference are in fastdistill/ops/ce_head.py.
// Per network k and image column j (classes c, targets ỹ, σ = Σ_c ỹ_c, scale s, tangent ż):
//
//     log p = (z − max z) − log Σ_c exp(z_c − max z)
//     ℓ_k = −s Σ_j Σ_c ỹ_c log p_c,   δz = s (p σ − ỹ)
//     δż = s · p ⊙ (ż − ⟨p, ż⟩) · σ,   R{∇_ỹ ℓ} = −s (ż − ⟨p, ż⟩)
//
// Design: one warp per column (k, j) (grid-stride over the K·n columns). Lane l takes the
// classes l, l + 32, … in ascending order, then the warp combines its 32 partial values with a
// fixed xor butterfly (__shfl_xor_sync; every lane ends with the same sum, lane 0's value is
// broadcast anyway), so every max, Σ exp, σ, Σ ỹ log p and ⟨p, ż⟩ has one fixed order. The
// column's Σ_c ỹ log p goes to partial[k, j]; a second kernel, one block per network, sums
// partial[k, ·] in a fixed order (strided per thread, then a shared-memory tree): no atomics,
// reruns are bit-identical. Everything is computed in double for both dtypes (exp/log are
// CUDA's double functions) and rounded once, so a float32 result is at least as accurate as
// PyTorch's float32 and a float64 one agrees with the reference to round-off. The scale is read
// on the device from a one-element buffer of the logits' dtype (no host synchronisation).
// NaN logits propagate (the max keeps a NaN). Limits: float32/float64, contiguous buffers; the
// softmax head only. No torch headers here (nvcc-checkable on CI).
#include "ce_head.h"

namespace fastdistill {
namespace cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / kWarp;
constexpr int64_t kMaxBlocks = 65536;
constexpr unsigned kFull = 0xffffffffu;

// max that keeps a NaN (as torch's max does), so a NaN logit makes the whole column NaN
__device__ __forceinline__ double nan_max(double a, double b) { return (b > a || b != b) ? b : a; }

__device__ __forceinline__ double warp_sum(double v) {
  for (int d = kWarp / 2; d > 0; d /= 2) v += __shfl_xor_sync(kFull, v, d);
  return __shfl_sync(kFull, v, 0);
}

__device__ __forceinline__ double warp_max(double v) {
  for (int d = kWarp / 2; d > 0; d /= 2) v = nan_max(v, __shfl_xor_sync(kFull, v, d));
  return __shfl_sync(kFull, v, 0);
}

// Column (k, j) of [K, O, n] starts at k·O·n + j; class c is c·n further. y_stride = O·n, or 0
// for shared targets. Writes dz (and dzd, dy) and partial[k·n + j] = Σ_c ỹ log p.
template <typename T, bool kTangent>
__global__ void __launch_bounds__(kThreads)
ce_head_columns_kernel(const T* __restrict__ z, const T* __restrict__ Y, const T* __restrict__ scale,
                       const T* __restrict__ zd, T* __restrict__ dz, T* __restrict__ dzd,
                       T* __restrict__ dy, double* __restrict__ partial, int64_t K, int64_t O,
                       int64_t n, int64_t y_stride) {
  const int lane = threadIdx.x % kWarp;
  const double s = static_cast<double>(*scale);
  const int64_t columns = K * n;
  // The loop bound is uniform across a warp, so every lane reaches every shuffle.
  for (int64_t col = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp; col < columns;
       col += static_cast<int64_t>(gridDim.x) * kWarpsPerBlock) {
    const int64_t k = col / n, j = col % n;
    const T* zc = z + k * O * n + j;
    const T* yc = Y + k * y_stride + j;
    const int64_t base = k * O * n + j;
    double m = -INFINITY;
    for (int64_t c = lane; c < O; c += kWarp) m = nan_max(m, static_cast<double>(zc[c * n]));
    m = warp_max(m);
    double se = 0.0, sy = 0.0;
    for (int64_t c = lane; c < O; c += kWarp) {
      se += exp(static_cast<double>(zc[c * n]) - m);
      sy += static_cast<double>(yc[c * n]);
    }
    se = warp_sum(se);
    sy = warp_sum(sy);
    const double lse = log(se);
    double ylp = 0.0, pzd = 0.0;
    for (int64_t c = lane; c < O; c += kWarp) {
      const double logp = (static_cast<double>(zc[c * n]) - m) - lse;
      const double p = exp(logp), y = static_cast<double>(yc[c * n]);
      ylp += y * logp;
      dz[base + c * n] = static_cast<T>((p * sy - y) * s);
      if (kTangent) pzd += p * static_cast<double>(zd[base + c * n]);
    }
    ylp = warp_sum(ylp);
    if (lane == 0) partial[col] = ylp;
    if (kTangent) {
      pzd = warp_sum(pzd);
      for (int64_t c = lane; c < O; c += kWarp) {
        const double p = exp((static_cast<double>(zc[c * n]) - m) - lse);
        const double centred = static_cast<double>(zd[base + c * n]) - pzd;   // ż − ⟨p, ż⟩
        dzd[base + c * n] = static_cast<T>(p * centred * sy * s);
        dy[base + c * n] = static_cast<T>(-centred * s);
      }
    }
  }
}

// loss[k] = −s Σ_j partial[k·n + j]: thread t sums j = t, t + 256, … in order, then a fixed tree.
template <typename T>
__global__ void __launch_bounds__(kThreads)
ce_head_loss_kernel(const double* __restrict__ partial, const T* __restrict__ scale, T* __restrict__ loss,
                    int64_t K, int64_t n) {
  __shared__ double buf[kThreads];
  const double s = static_cast<double>(*scale);
  for (int64_t k = blockIdx.x; k < K; k += gridDim.x) {
    double acc = 0.0;
    for (int64_t j = threadIdx.x; j < n; j += kThreads) acc += partial[k * n + j];
    buf[threadIdx.x] = acc;
    __syncthreads();
    for (int w = kThreads / 2; w > 0; w /= 2) {
      if (threadIdx.x < w) buf[threadIdx.x] += buf[threadIdx.x + w];
      __syncthreads();
    }
    if (threadIdx.x == 0) loss[k] = static_cast<T>(-buf[0] * s);
    __syncthreads();   // buf is reused by the next network
  }
}

unsigned blocks_for(int64_t items, int64_t per_block) {
  const int64_t b = (items + per_block - 1) / per_block;
  return static_cast<unsigned>(b > kMaxBlocks ? kMaxBlocks : (b < 1 ? 1 : b));
}

template <typename T, bool kTangent>
cudaError_t launch(const T* z, const T* Y, const T* scale, const T* zd, T* loss, T* dz, T* dzd, T* dy,
                   double* partial, int64_t K, int64_t O, int64_t n, bool y_shared, cudaStream_t stream) {
  if (K <= 0) return cudaSuccess;
  if (n > 0) {   // (O = 0 leaves every column's Σ ỹ log p an empty sum, 0)
    ce_head_columns_kernel<T, kTangent><<<blocks_for(K * n, kWarpsPerBlock), kThreads, 0, stream>>>(
        z, Y, scale, zd, dz, dzd, dy, partial, K, O, n, y_shared ? 0 : O * n);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  ce_head_loss_kernel<T><<<blocks_for(K, 1), kThreads, 0, stream>>>(partial, scale, loss, K, n);
  return cudaGetLastError();
}

}  // namespace

template <typename T>
cudaError_t ce_head(const T* z, const T* Y, const T* scale, T* loss, T* dz, double* partial, int64_t K,
                    int64_t O, int64_t n, bool y_shared, cudaStream_t stream) {
  return launch<T, false>(z, Y, scale, nullptr, loss, dz, nullptr, nullptr, partial, K, O, n, y_shared,
                          stream);
}

template <typename T>
cudaError_t ce_head_tangent(const T* z, const T* Y, const T* scale, const T* zd, T* loss, T* dz, T* dzd,
                            T* dy, double* partial, int64_t K, int64_t O, int64_t n, bool y_shared,
                            cudaStream_t stream) {
  return launch<T, true>(z, Y, scale, zd, loss, dz, dzd, dy, partial, K, O, n, y_shared, stream);
}

#define FD_INSTANTIATE(T)                                                                          \
  template cudaError_t ce_head<T>(const T*, const T*, const T*, T*, T*, double*, int64_t, int64_t, \
                                  int64_t, bool, cudaStream_t);                                    \
  template cudaError_t ce_head_tangent<T>(const T*, const T*, const T*, const T*, T*, T*, T*, T*,  \
                                          double*, int64_t, int64_t, int64_t, bool, cudaStream_t);
FD_INSTANTIATE(float)
FD_INSTANTIATE(double)

}  // namespace cuda
}  // namespace fastdistill
