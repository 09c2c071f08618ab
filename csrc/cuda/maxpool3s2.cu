// CUDA kernels of maxpool3s2 (AlexCifarNet's 3×3 / stride 2 / padding 1 max-pool) and its
// tangent/backward; the CPU kernels and the maths are in csrc/cpu/maxpool3s2.cpp, the reference
// in fastdistill/ops/maxpool3s2.py.
//
// Design: one thread per output element (grid-stride loops), so no two threads write one
// location and no atomics are used. The forward scans its window like max_pool2d (start at −∞
// with the window's first in-image pixel, take a greater value or a NaN), so values and indices
// equal F.max_pool2d's. The backward runs one thread per *input* pixel, which gathers d from the
// ≤ 2×2 windows that can cover it (rows u/2..(u+1)/2, columns v/2..(v+1)/2) whose argmax it is,
// in ascending (i, j) order: the reference's scatter_add_ order, hence the same rounding and
// bit-identical reruns. Limits: float32/float64, contiguous buffers; an index outside its window
// contributes nothing in the backward (the CPU kernel rejects it). No torch headers here
// (nvcc-checkable on CI).
#include "maxpool3s2.h"

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

template <typename T>
__device__ __forceinline__ T quiet_nan();
template <>
__device__ __forceinline__ float quiet_nan<float>() { return __int_as_float(0x7fc00000); }
template <>
__device__ __forceinline__ double quiet_nan<double>() { return __longlong_as_double(0x7ff8000000000000LL); }

template <typename T>
__device__ __forceinline__ T neg_inf();
template <>
__device__ __forceinline__ float neg_inf<float>() { return __int_as_float(0xff800000); }
template <>
__device__ __forceinline__ double neg_inf<double>() { return __longlong_as_double(0xfff0000000000000LL); }

// z: [P·M] planes of H×W; p, idx: [P·M] planes of h×w; n = P·M·h·w
template <typename T>
__global__ void maxpool3s2_kernel(const T* __restrict__ z, T* __restrict__ p, int64_t* __restrict__ idx,
                                  int64_t H, int64_t W, int64_t h, int64_t w, int64_t n) {
  FD_GRID_LOOP(t, n) {
    const int64_t q = t / (h * w), e = t % (h * w), i = e / w, j = e % w;
    const T* plane = z + q * H * W;
    const int64_t y0 = i > 0 ? 2 * i - 1 : 0, y1 = 2 * i + 2 < H ? 2 * i + 2 : H;
    const int64_t x0 = j > 0 ? 2 * j - 1 : 0, x1 = 2 * j + 2 < W ? 2 * j + 2 : W;
    int64_t best_i = y0 * W + x0;
    T best = neg_inf<T>();
    for (int64_t y = y0; y < y1; ++y) {
      for (int64_t x = x0; x < x1; ++x) {
        const T v = plane[y * W + x];
        if (v > best || v != v) {  // max_pool2d's rule: a NaN is always taken
          best = v;
          best_i = y * W + x;
        }
      }
    }
    p[t] = best;
    idx[t] = best_i;
  }
}

// pd[t] = zd[plane of t][idx[t]]; n = P·M·h·w, HW = H·W, hw = h·w
template <typename T>
__global__ void maxpool3s2_tangent_kernel(const T* __restrict__ zd, const int64_t* __restrict__ idx,
                                          T* __restrict__ pd, int64_t HW, int64_t hw, int64_t n) {
  FD_GRID_LOOP(t, n) {
    const int64_t k = idx[t];
    pd[t] = (k >= 0 && k < HW) ? zd[(t / hw) * HW + k] : quiet_nan<T>();
  }
}

// dz[s, q, u, v] = Σ_{(i, j) covering (u, v), idx[q, i, j] = u·W + v} d[s, q, i, j]; n = S·P·M·H·W
template <typename T>
__global__ void maxpool3s2_backward_kernel(const T* __restrict__ d, const int64_t* __restrict__ idx,
                                           T* __restrict__ dz, int64_t PM, int64_t H, int64_t W,
                                           int64_t h, int64_t w, int64_t n) {
  FD_GRID_LOOP(t, n) {
    const int64_t k = t % (H * W), sq = t / (H * W), q = sq % PM;
    const int64_t u = k / W, v = k % W;
    const int64_t i1 = (u + 1) / 2 < h - 1 ? (u + 1) / 2 : h - 1;
    const int64_t j1 = (v + 1) / 2 < w - 1 ? (v + 1) / 2 : w - 1;
    const int64_t* iq = idx + q * h * w;
    const T* gq = d + sq * h * w;
    T acc = T(0);
    for (int64_t i = u / 2; i <= i1; ++i) {
      for (int64_t j = v / 2; j <= j1; ++j) {
        if (iq[i * w + j] == k) acc += gq[i * w + j];
      }
    }
    dz[t] = acc;
  }
}

}  // namespace

template <typename T>
cudaError_t maxpool3s2(const T* z, T* p, int64_t* idx, int64_t P, int64_t M, int64_t H, int64_t W,
                       cudaStream_t stream) {
  const int64_t h = (H - 1) / 2 + 1, w = (W - 1) / 2 + 1, n = P * M * h * w;
  if (n <= 0 || H <= 0 || W <= 0) return cudaSuccess;
  maxpool3s2_kernel<T><<<blocks_for(n), kThreads, 0, stream>>>(z, p, idx, H, W, h, w, n);
  return cudaGetLastError();
}

template <typename T>
cudaError_t maxpool3s2_tangent(const T* zd, const int64_t* idx, T* pd, int64_t P, int64_t M, int64_t H,
                               int64_t W, cudaStream_t stream) {
  const int64_t h = (H - 1) / 2 + 1, w = (W - 1) / 2 + 1, n = P * M * h * w;
  if (n <= 0 || H <= 0 || W <= 0) return cudaSuccess;
  maxpool3s2_tangent_kernel<T><<<blocks_for(n), kThreads, 0, stream>>>(zd, idx, pd, H * W, h * w, n);
  return cudaGetLastError();
}

template <typename T>
cudaError_t maxpool3s2_backward(const T* d, const int64_t* idx, T* dz, int64_t S, int64_t P, int64_t M,
                                int64_t H, int64_t W, cudaStream_t stream) {
  const int64_t h = (H - 1) / 2 + 1, w = (W - 1) / 2 + 1, n = S * P * M * H * W;
  if (n <= 0 || H <= 0 || W <= 0) return cudaSuccess;
  maxpool3s2_backward_kernel<T><<<blocks_for(n), kThreads, 0, stream>>>(d, idx, dz, P * M, H, W, h, w, n);
  return cudaGetLastError();
}

#define FD_INSTANTIATE(T)                                                                          \
  template cudaError_t maxpool3s2<T>(const T*, T*, int64_t*, int64_t, int64_t, int64_t, int64_t,   \
                                     cudaStream_t);                                                \
  template cudaError_t maxpool3s2_tangent<T>(const T*, const int64_t*, T*, int64_t, int64_t,       \
                                             int64_t, int64_t, cudaStream_t);                      \
  template cudaError_t maxpool3s2_backward<T>(const T*, const int64_t*, T*, int64_t, int64_t,      \
                                              int64_t, int64_t, int64_t, cudaStream_t);
FD_INSTANTIATE(float)
FD_INSTANTIATE(double)

}  // namespace cuda
}  // namespace fastdistill
