// One 2×2 max-pool window + bias + ReLU, shared by the pool2_relu op (lenet_ops.cpp) and the
// fused LeNet step (lenet_step.cpp) so both follow one rule.
#pragma once

namespace fastdistill {

// The window's top-left element is plane[i0] in a plane of row length W. Returns
// relu(max + bias) and writes the flat index of the first maximum in scan order into `arg`,
// with max_pool2d's rule that a NaN counts as the maximum (the last NaN wins). Selects instead
// of branches: on random data a branch here would mispredict half the time.
template <typename T, typename I>
inline T pool2_relu_window(const T* plane, I i0, I W, T bias, I* arg) {
  I best_i = i0;
  T best = plane[i0];
  const I cand[3] = {i0 + 1, i0 + W, i0 + W + 1};
  for (I c : cand) {
    const T v = plane[c];
    const bool take = (v > best) | (v != v);
    best = take ? v : best;
    best_i = take ? c : best_i;
  }
  *arg = best_i;
  const T p = best + bias;
  return p * static_cast<T>(p > 0);
}

// The same rule over one row of w windows: r0/r1 are the window rows (2w values each) of a plane
// of row length W, and arg[x] gets base + the flat offset of the winner (0, 1, W or W + 1 from
// the window's corner, base + 2x). Straight-line selects over whole rows, so the compiler
// vectorises it (the per-window form compiles to branches that mispredict on random data).
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

}  // namespace fastdistill
