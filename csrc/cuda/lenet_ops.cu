// CUDA kernels of the LeNet layer ops (im2col5, col2im5, pool2_relu and its tangent/backward);
// the CPU kernels and the maths are in csrc/cpu/lenet_ops.cpp, the references in fastdistill/ops.
//
// Design: one thread per output element (grid-stride loops), so no two threads write one
// location and no float atomics are used: the results do not depend on scheduling (the
// reversible strategy needs bit-identical recomputation). col2im5 gathers its ≤ 25 terms in the
// reference's (i, j) order, so it rounds like the reference; pool2_relu's bias gradient is a
// per-(s, plane) block reduction in a fixed tree order (equal to the reference to round-off).
// Limits: float32/float64, contiguous buffers, 5×5 kernels, 2×2 pools; no torch headers here
// (nvcc-checkable on CI).
#include "lenet_ops.h"

namespace fastdistill {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65536;
constexpr int kK = 5;

unsigned blocks_for(int64_t n) {
  int64_t b = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(b > kMaxBlocks ? kMaxBlocks : (b < 1 ? 1 : b));
}

#define FD_GRID_LOOP(t, n)                                                                     \
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < (n);        \
       t += static_cast<int64_t>(blockDim.x) * gridDim.x)

template <typename T>
__global__ void im2col5_kernel(const T* __restrict__ a, T* __restrict__ u, int64_t M, int64_t H,
                               int64_t W, int64_t Ho, int64_t Wo, int64_t pad, int64_t n) {
  const int64_t L = M * Ho * Wo;
  FD_GRID_LOOP(t, n) {
    const int64_t col = t % L, r = t / L;
    const int64_t x = col % Wo, y = (col / Wo) % Ho, m = col / (Wo * Ho);
    const int64_t j = r % kK, i = (r / kK) % kK, bc = r / (kK * kK);
    const int64_t yy = y + i - pad, xx = x + j - pad;
    u[t] = (yy >= 0 && yy < H && xx >= 0 && xx < W) ? a[((bc * M + m) * H + yy) * W + xx] : T(0);
  }
}

template <typename T>
__global__ void col2im5_kernel(const T* __restrict__ d, T* __restrict__ out, int64_t M, int64_t H,
                               int64_t W, int64_t Ho, int64_t Wo, int64_t pad, int64_t n) {
  const int64_t L = M * Ho * Wo;
  FD_GRID_LOOP(t, n) {
    const int64_t xx = t % W, yy = (t / W) % H, m = (t / (W * H)) % M, bc = t / (W * H * M);
    T acc = T(0);
    for (int i = 0; i < kK; ++i) {
      const int64_t y = yy + pad - i;
      if (y < 0 || y >= Ho) continue;
      for (int j = 0; j < kK; ++j) {
        const int64_t x = xx + pad - j;
        if (x < 0 || x >= Wo) continue;
        acc += d[(bc * kK * kK + i * kK + j) * L + (m * Ho + y) * Wo + x];
      }
    }
    out[t] = acc;
  }
}

template <typename T>
__global__ void pool2_relu_kernel(const T* __restrict__ z, const T* __restrict__ bias, T* __restrict__ a,
                                  int64_t* __restrict__ idx, int64_t M, int64_t H, int64_t W, int64_t n) {
  const int64_t h = H / 2, w = W / 2;
  FD_GRID_LOOP(t, n) {
    const int64_t q = t / (h * w), e = t % (h * w), y = e / w, x = e % w;
    const T* plane = z + q * H * W;
    int64_t best_i = (2 * y) * W + 2 * x;
    T best = plane[best_i];
    const int64_t cand[3] = {best_i + 1, best_i + W, best_i + W + 1};
    for (int c = 0; c < 3; ++c) {
      const T v = plane[cand[c]];
      if (v > best || v != v) {  // max_pool2d's rule: the last NaN wins
        best = v;
        best_i = cand[c];
      }
    }
    const T p = best + bias[q / M];
    a[t] = p * static_cast<T>(p > T(0));
    idx[t] = best_i;
  }
}

template <typename T>
__global__ void pool2_relu_tangent_kernel(const T* __restrict__ zd, const T* __restrict__ bias_d,
                                          const int64_t* __restrict__ idx, const T* __restrict__ a,
                                          T* __restrict__ ad, int64_t M, int64_t hw, int64_t n) {
  FD_GRID_LOOP(t, n) {
    const int64_t q = t / hw;
    ad[t] = (zd[q * 4 * hw + idx[t]] + bias_d[q / M]) * static_cast<T>(a[t] > T(0));
  }
}

template <typename T>
__global__ void pool2_relu_scatter_kernel(const T* __restrict__ d, const int64_t* __restrict__ idx,
                                          const T* __restrict__ a, T* __restrict__ dz, int64_t PMhw,
                                          int64_t hw, int64_t n) {
  FD_GRID_LOOP(t, n) {
    const int64_t s = t / PMhw, e = t % PMhw, q = e / hw;
    dz[(s * (PMhw / hw) + q) * 4 * hw + idx[e]] = d[t] * static_cast<T>(a[e] > T(0));
  }
}

// one block per (s, plane): Σ over the plane's M·h·w contiguous values, fixed tree order
template <typename T>
__global__ void pool2_relu_bias_kernel(const T* __restrict__ d, const T* __restrict__ a,
                                       T* __restrict__ db, int64_t P, int64_t Mhw) {
  __shared__ T part[kThreads];
  const int64_t sp = blockIdx.x, pl = sp % P;
  const T* g = d + sp * Mhw;
  const T* av = a + pl * Mhw;
  T acc = T(0);
  for (int64_t e = threadIdx.x; e < Mhw; e += blockDim.x) acc += g[e] * static_cast<T>(av[e] > T(0));
  part[threadIdx.x] = acc;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) part[threadIdx.x] += part[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) db[sp] = part[0];
}

}  // namespace

template <typename T>
cudaError_t im2col5(const T* a, T* u, int64_t B, int64_t C, int64_t M, int64_t H, int64_t W,
                    int64_t pad, cudaStream_t stream) {
  const int64_t Ho = H + 2 * pad - kK + 1, Wo = W + 2 * pad - kK + 1;
  const int64_t n = B * C * kK * kK * M * Ho * Wo;
  if (n <= 0) return cudaSuccess;
  im2col5_kernel<T><<<blocks_for(n), kThreads, 0, stream>>>(a, u, M, H, W, Ho, Wo, pad, n);
  return cudaGetLastError();
}

template <typename T>
cudaError_t col2im5(const T* d, T* out, int64_t B, int64_t C, int64_t M, int64_t H, int64_t W,
                    int64_t pad, cudaStream_t stream) {
  const int64_t Ho = H + 2 * pad - kK + 1, Wo = W + 2 * pad - kK + 1;
  const int64_t n = B * C * M * H * W;
  if (n <= 0) return cudaSuccess;
  col2im5_kernel<T><<<blocks_for(n), kThreads, 0, stream>>>(d, out, M, H, W, Ho, Wo, pad, n);
  return cudaGetLastError();
}

template <typename T>
cudaError_t pool2_relu(const T* z, const T* bias, T* a, int64_t* idx, int64_t P, int64_t M,
                       int64_t H, int64_t W, cudaStream_t stream) {
  const int64_t n = P * M * (H / 2) * (W / 2);
  if (n <= 0) return cudaSuccess;
  pool2_relu_kernel<T><<<blocks_for(n), kThreads, 0, stream>>>(z, bias, a, idx, M, H, W, n);
  return cudaGetLastError();
}

template <typename T>
cudaError_t pool2_relu_tangent(const T* zd, const T* bias_d, const int64_t* idx, const T* a, T* ad,
                               int64_t P, int64_t M, int64_t h, int64_t w, cudaStream_t stream) {
  const int64_t n = P * M * h * w;
  if (n <= 0) return cudaSuccess;
  pool2_relu_tangent_kernel<T><<<blocks_for(n), kThreads, 0, stream>>>(zd, bias_d, idx, a, ad, M, h * w, n);
  return cudaGetLastError();
}

template <typename T>
cudaError_t pool2_relu_backward(const T* d, const int64_t* idx, const T* a, T* dz, T* db, int64_t S,
                                int64_t P, int64_t M, int64_t h, int64_t w, cudaStream_t stream) {
  const int64_t PMhw = P * M * h * w, n = S * PMhw;
  if (n <= 0) return cudaSuccess;
  cudaError_t err = cudaMemsetAsync(dz, 0, sizeof(T) * 4 * n, stream);
  if (err != cudaSuccess) return err;
  pool2_relu_scatter_kernel<T><<<blocks_for(n), kThreads, 0, stream>>>(d, idx, a, dz, PMhw, h * w, n);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  pool2_relu_bias_kernel<T><<<static_cast<unsigned>(S * P), kThreads, 0, stream>>>(d, a, db, P, M * h * w);
  return cudaGetLastError();
}

#define FD_INSTANTIATE(T)                                                                          \
  template cudaError_t im2col5<T>(const T*, T*, int64_t, int64_t, int64_t, int64_t, int64_t,       \
                                  int64_t, cudaStream_t);                                          \
  template cudaError_t col2im5<T>(const T*, T*, int64_t, int64_t, int64_t, int64_t, int64_t,       \
                                  int64_t, cudaStream_t);                                          \
  template cudaError_t pool2_relu<T>(const T*, const T*, T*, int64_t*, int64_t, int64_t, int64_t,  \
                                     int64_t, cudaStream_t);                                       \
  template cudaError_t pool2_relu_tangent<T>(const T*, const T*, const int64_t*, const T*, T*,     \
                                             int64_t, int64_t, int64_t, int64_t, cudaStream_t);    \
  template cudaError_t pool2_relu_backward<T>(const T*, const int64_t*, const T*, T*, T*, int64_t, \
                                              int64_t, int64_t, int64_t, int64_t, cudaStream_t);
FD_INSTANTIATE(float)
FD_INSTANTIATE(double)

}  // namespace cuda
}  // namespace fastdistill
