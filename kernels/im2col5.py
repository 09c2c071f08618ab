"""Triton kernels of im2col5 / col2im5: the 5×5 patches of a stack of image planes, and their
adjoint (the batched LeNet engine's convolutions run as GEMMs over these patches).

Maths, for ``a [B, C, M, H, W]``, zero padding ``pad``, ``H' = H + 2·pad − 4``, ``W'`` alike::

    im2col5: u[b, c·25 + 5i + j, (m·H' + y)·W' + x] = a[b, c, m, y + i − pad, x + j − pad]
             (0 outside the image)
    col2im5: a[b, c, m, Y, X] = Σ_{(i, j) in row-major order} d[b, c·25 + 5i + j, col(i, j)],
             col(i, j) = (m·H' + Y + pad − i)·W' + X + pad − j, over the (i, j) that keep
             (Y + pad − i, X + pad − j) inside the H'×W' grid.

Design: one program per BLOCK output elements (flat, masked tail). im2col5 is a pure gather
(masked loads with ``other=0`` give the zero padding) and copies values: bitwise equal to the
reference. col2im5 is written as a gather-sum: each output element reads its ≤ 25 patch entries
and adds them in the reference's (i, j) order, starting from 0 — no atomics, deterministic and
bitwise equal to the reference's 25 shifted adds (an absent term adds +0.0, which cannot change
a sum that started at +0.0).
Limits: contiguous float32/float64 tensors; flat index maths in int64.
"""
import os

import torch
import triton
import triton.language as tl

__all__ = ["im2col5", "col2im5"]

# Elements per program: 1024 on a GPU (4 warps × 32 threads × 8; memory bound). Under the CPU
# interpreter each program costs milliseconds whatever its size, so programs are 16× larger.
BLOCK = 16384 if os.environ.get("TRITON_INTERPRET", "0") == "1" else 1024


@triton.jit
def _im2col5_kernel(
    a_ptr,  # *T, [B, C, M, H, W] image planes, contiguous
    u_ptr,  # *T, [B, C·25, M·H'·W'] out: patches
    n,  # B·C·25·M·H'·W' output elements
    L,  # M·H'·W' columns per row
    H,  # input height
    W,  # input width
    Ho,  # H' = H + 2·pad − 4
    Wo,  # W' = W + 2·pad − 4
    pad,  # zero padding on each side
    M,  # images per plane stack
    BLOCK: tl.constexpr,  # output elements per program
):
    pid = tl.program_id(0).to(tl.int64)
    e = pid * BLOCK + tl.arange(0, BLOCK)
    mask = e < n
    row = e // L
    col = e - row * L
    bc = row // 25                                 # (b, c) plane
    t = row - bc * 25
    i = t // 5
    j = t - i * 5
    m = col // (Ho * Wo)
    yx = col - m * (Ho * Wo)
    y = yx // Wo
    x = yx - y * Wo
    iy = y + i - pad
    ix = x + j - pad
    inside = mask & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
    v = tl.load(a_ptr + ((bc * M + m) * H + iy) * W + ix, mask=inside, other=0.0)
    tl.store(u_ptr + e, v, mask=mask)


# col2im5 is the adjoint of im2col5 (⟨im2col5 a, d⟩ = ⟨a, col2im5 d⟩): the input element (Y, X)
# appears in the patch column (Y + pad − i, X + pad − j) at row 5i + j for every (i, j) that keeps
# that column inside the H'×W' grid, so its gradient is the sum of those ≤ 25 entries.
@triton.jit
def _col2im5_kernel(
    d_ptr,  # *T, [B, C·25, M·H'·W'] patch gradients, contiguous
    out_ptr,  # *T, [B, C, M, H, W] out
    n,  # B·C·M·H·W output elements
    L,  # M·H'·W' columns per row of d
    H,  # output height
    W,  # output width
    Ho,  # H'
    Wo,  # W'
    pad,  # zero padding on each side
    M,  # images per plane stack
    BLOCK: tl.constexpr,  # output elements per program
):
    pid = tl.program_id(0).to(tl.int64)
    e = pid * BLOCK + tl.arange(0, BLOCK)
    mask = e < n
    X = e % W
    r = e // W
    Y = r % H
    r = r // H
    m = r % M
    bc = r // M                                    # (b, c) plane
    row0 = bc * 25
    acc = tl.zeros((BLOCK,), dtype=out_ptr.dtype.element_ty)
    for t in tl.static_range(0, 25):               # the reference's (i, j) order
        y = Y + pad - (t // 5)
        x = X + pad - (t % 5)
        ok = mask & (y >= 0) & (y < Ho) & (x >= 0) & (x < Wo)
        acc += tl.load(d_ptr + (row0 + t) * L + (m * Ho + y) * Wo + x, mask=ok, other=0.0)
    tl.store(out_ptr + e, acc, mask=mask)


def im2col5(a: torch.Tensor, pad: int) -> torch.Tensor:
    """Launch im2col5: ``[B, C, M, H, W] -> [B, C·25, M·H'·W']`` (inputs checked by the op)."""
    B, C, M, H, W = a.shape
    Ho, Wo = H + 2 * pad - 4, W + 2 * pad - 4
    u = torch.empty((B, C * 25, M * Ho * Wo), dtype=a.dtype, device=a.device)
    n = u.numel()
    if n:
        _im2col5_kernel[(triton.cdiv(n, BLOCK),)](a, u, n, M * Ho * Wo, H, W, Ho, Wo, pad, M,
                                                   BLOCK=BLOCK, num_warps=4)
    return u


def col2im5(d: torch.Tensor, H: int, W: int, pad: int) -> torch.Tensor:
    """Launch col2im5: ``[B, C·25, M·H'·W'] -> [B, C, M, H, W]`` (inputs checked by the op)."""
    Ho, Wo = H + 2 * pad - 4, W + 2 * pad - 4
    B, C, M = d.shape[0], d.shape[1] // 25, d.shape[2] // (Ho * Wo)
    out = torch.empty((B, C, M, H, W), dtype=d.dtype, device=d.device)
    n = out.numel()
    if n:
        _col2im5_kernel[(triton.cdiv(n, BLOCK),)](d, out, n, M * Ho * Wo, H, W, Ho, Wo, pad, M,
                                                   BLOCK=BLOCK, num_warps=4, enable_fp_fusion=False)
    return out
