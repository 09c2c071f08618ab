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

}  // namespace fastdistill
