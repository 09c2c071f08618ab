// Torch-free launchers of the CUDA ce_head op (the softmax cross-entropy head of K networks,
// its logit gradient and their R-operator tangents; see ce_head.cu and, for the maths,
// fastdistill/ops/ce_head.py). Shared by ce_head_glue.cpp and compile-checked alone by CI.
// Every pointer is a contiguous device buffer: z, zd, dz, dzd, dy [K, O, n] (classes on dim 1,
// images on dim 2); Y [K, O, n], or [1, O, n] shared by every network (y_shared); scale one
// element (the loss scale s); loss [K]; `partial` a workspace of K·n doubles. Each launcher
// returns the launch error (cudaSuccess when there is nothing to do).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace fastdistill {
namespace cuda {

// loss_k = −s Σ_j Σ_c ỹ_cj log p_cj,  dz = s (p σ − ỹ)  (σ = Σ_c ỹ_c per column).
template <typename T>
cudaError_t ce_head(const T* z, const T* Y, const T* scale, T* loss, T* dz, double* partial, int64_t K,
                    int64_t O, int64_t n, bool y_shared, cudaStream_t stream);
// The same, and dzd = s · p ⊙ (ż − ⟨p, ż⟩) · σ,  dy = −s (ż − ⟨p, ż⟩).
template <typename T>
cudaError_t ce_head_tangent(const T* z, const T* Y, const T* scale, const T* zd, T* loss, T* dz, T* dzd,
                            T* dy, double* partial, int64_t K, int64_t O, int64_t n, bool y_shared,
                            cudaStream_t stream);

}  // namespace cuda
}  // namespace fastdistill
