"""Triton kernel of gd_update: ``out = theta − lr · grad`` (the plain-GD inner-loop step).

Maths: θ_{t+1} = θ_t − η_t g_t, elementwise over the flat parameter vector; η_t is a 0-d
tensor read from device memory (no host synchronisation when the learning rate is learned).
Design: one program per BLOCK contiguous elements, masked tail; memory bound (two reads, one
write), so a single pass is all there is to gain over ``theta - lr * grad`` (two passes, one
temporary). The product and the difference are rounded separately (``enable_fp_fusion=False``),
so the result is bitwise equal to the reference in float32 and float64.
Limits: contiguous float32/float64 tensors of equal shape; ``out`` may alias ``theta``.
The backward is plain PyTorch in ``fastdistill/ops/gd_update.py`` (dθ = ḡ, dg = −η ḡ,
dη = −Σ g ḡ); no backward kernel is needed.
"""
import torch
import triton
import triton.language as tl

__all__ = ["gd_update"]

# 1024 elements per program: 4 warps × 32 threads × 8 elements, a good fit for an elementwise
# op on sm_80+; under the CPU interpreter larger blocks mean fewer (slow) program launches.
BLOCK = 1024


@triton.jit
def _gd_update_kernel(
    theta_ptr,  # *T, [n] θ_t, contiguous
    grad_ptr,  # *T, [n] g_t = ∇ℓ(θ_t), contiguous
    lr_ptr,  # *T, one element: η_t
    out_ptr,  # *T, [n] θ_{t+1}, contiguous; may alias theta_ptr (each element read before written)
    n,  # number of elements
    BLOCK: tl.constexpr,  # elements per program
):
    pid = tl.program_id(0).to(tl.int64)  # int64: offsets of >2^31-element vectors do not wrap
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    eta = tl.load(lr_ptr)
    theta = tl.load(theta_ptr + offs, mask=mask, other=0.0)
    grad = tl.load(grad_ptr + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, theta - eta * grad, mask=mask)


def gd_update(theta: torch.Tensor, grad: torch.Tensor, lr: torch.Tensor,
              out: torch.Tensor = None) -> torch.Tensor:
    """Launch the kernel: ``out = theta − lr · grad``. Inputs must already be checked by
    :func:`fastdistill.ops.gd_update` (same shape/dtype/device, contiguous, 0-d ``lr``)."""
    if out is None:
        out = torch.empty_like(theta, memory_format=torch.contiguous_format)
    n = theta.numel()
    if n == 0:
        return out
    grid = (triton.cdiv(n, BLOCK),)
    _gd_update_kernel[grid](theta, grad, lr, out, n, BLOCK=BLOCK, num_warps=4,
                            enable_fp_fusion=False)
    return out
