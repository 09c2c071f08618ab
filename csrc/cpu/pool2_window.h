// One 2×2 max-pool window + bias + ReLU, shared by the pool2_relu op (lenet_ops.cpp) and the
// fused LeNet step (lenet_step.cpp) so both follow one rule.
#pragma once

namespace fastdistill {

// One row of w windows of a plane of row length W: r0/r1 are the two window rows (2w values
// each). out[x] = relu(max + bias) and arg[x] = base + 2x + the winner's offset from the
// window's corner (0, 1, W or W + 1): the first maximum in scan order, with max_pool2d's rule
// that a NaN counts as the maximum (the last NaN wins). Straight-line selects, so the compiler
// vectorises whole rows (with -fno-trapping-math); branches would mispredict on random data.
template <typename T, typename I>
inline void pool2_relu_row(const T* r0, const T* r1, int w, I base, I W, T bias, T* out, I* arg) {
  for (int x = 0; x < w; ++x) {
    const T a = r0[2 * x], b = r0[2 * x + 1], c = r1[2 * x], e = r1[2 * x + 1];
    T best = a;
    I off = 0;
    bool take = (b > best) | (b != b);
    best = take ? b : best;
    off = take ? I(1) : off;
    take = (c > best) | (c != c);
    best = take ? c : best;
    off = take ? W : off;
    take = (e > best) | (e != e);
    best = take ? e : best;
    off = take ? I(W + 1) : off;
    arg[x] = base + I(2 * x) + off;
    const T p = best + bias;
    out[x] = p * static_cast<T>(p > 0);
  }
}

// One window: the row form with w = 1 (one rule, written once).
template <typename T, typename I>
inline T pool2_relu_window(const T* plane, I i0, I W, T bias, I* arg) {
  T out;
  pool2_relu_row<T, I>(plane + i0, plane + i0 + W, 1, i0, W, bias, &out, arg);
  return out;
}

}  // namespace fastdistill
