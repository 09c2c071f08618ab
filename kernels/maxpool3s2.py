"""Triton kernels of maxpool3s2: AlexCifarNet's 3×3 max-pool, stride 2, padding 1, its tangent and
its adjoint, on planes ``z [P, M, H, W]`` (P = networks × channels, M images).

Maths (one H×W plane, pooled position o = (i, j), window rows 2i−1..2i+1 × columns 2j−1..2j+1
clipped to the image, see ``fastdistill/ops/maxpool3s2.py``)::

    forward   p_o = max_{u ∈ w(o)} z_u,  idx_o = first maximum in row-major scan (last NaN wins)
    tangent   ṗ_o = ż_{idx_o}
    backward  ∂z_u = Σ_{o : idx_o = u} d_o   (≤ 4 windows cover a pixel), ascending o, from +0

Design: every kernel is flat over its outputs, one program per BLOCK of them (masked tail).
Forward: the scan starts from −∞ at the window's first in-image pixel and takes a value when it
is greater or NaN (max_pool2d's rule), out-of-image taps load −∞ and so are never taken: values
and indices are bitwise ``F.max_pool2d(z, 3, 2, 1, return_indices=True)``. Tangent: a gather.
Backward: no atomics; each program owns BLOCK input pixels of the [S, P, M, H, W] gradient and
gathers from the ≤ 2×2 windows that cover each (rows ⌊y/2⌋ and, for odd y, ⌊y/2⌋ + 1; columns
alike) in ascending (i, j) order from +0, adding d_o where idx_o = u and +0 elsewhere (an
identity: the sum is never −0). That is the reference's ``scatter_add_`` order, so the result is
bitwise the reference's, and every pixel is written exactly once (deterministic). Indices that
are not inside their own window are ignored by the backward; the tangent reads 0 for an index
outside the plane (no out-of-bounds read). Limits: contiguous float32/float64 tensors, int64
indices; index maths in int64 (tensors beyond 2^31 elements do not wrap).
"""
import os

import torch
import triton
import triton.language as tl

__all__ = ["maxpool3s2", "maxpool3s2_tangent", "maxpool3s2_backward"]

# 1024 elements per program on a GPU (4 warps × 32 threads × 8), memory bound. Under the CPU
# interpreter a launch costs milliseconds per program whatever its size, so programs there are
# 16× larger (tests lower BLOCK to exercise the multi-program paths).
BLOCK = 16384 if os.environ.get("TRITON_INTERPRET", "0") == "1" else 1024


@triton.jit
def _maxpool3s2_kernel(
    z_ptr,  # *T, [P, M, H, W] input planes, contiguous
    p_ptr,  # *T, [P, M, h, w] out: window maxima
    idx_ptr,  # *int64, [P, M, h, w] out: flat argmax in the H×W plane
    n_out,  # P·M·h·w pooled outputs
    H, W,  # input plane
    h, w,  # pooled plane: (H − 1) // 2 + 1, likewise w
    BLOCK: tl.constexpr,  # pooled outputs per program
):
    pid = tl.program_id(0).to(tl.int64)
    o = pid * BLOCK + tl.arange(0, BLOCK)
    mask = o < n_out
    hw = h * w
    q = o // hw                                    # (p, m) plane
    r = o - q * hw
    i = r // w
    j = r - i * w
    y0 = 2 * i - 1                                 # window's top-left, may be −1 (padding)
    x0 = 2 * j - 1
    base = z_ptr + q * H * W
    m = tl.full((BLOCK,), float("-inf"), z_ptr.dtype.element_ty)
    best = tl.maximum(y0, 0) * W + tl.maximum(x0, 0)   # the first in-image pixel
    # max_pool2d's scan in row-major order: from −∞, take a value when greater or NaN (the
    # first maximum, or the last NaN); padding taps load −∞ and are never taken
    for dy in tl.static_range(3):
        y = y0 + dy
        row_ok = mask & (y >= 0) & (y < H)
        for dx in tl.static_range(3):
            x = x0 + dx
            u = y * W + x
            v = tl.load(base + u, mask=row_ok & (x >= 0) & (x < W), other=float("-inf"))
            take = (v > m) | (v != v)
            m = tl.where(take, v, m)
            best = tl.where(take, u, best)
    tl.store(p_ptr + o, m, mask=mask)
    tl.store(idx_ptr + o, best, mask=mask)


@triton.jit
def _maxpool3s2_tangent_kernel(
    zd_ptr,  # *T, [P, M, H, W] tangent ż of the input, contiguous
    idx_ptr,  # *int64, [P, M, h, w] the forward's argmax
    out_ptr,  # *T, [P, M, h, w] out: ṗ = ż[idx]
    n_out,  # P·M·h·w pooled outputs
    HW,  # input plane size H·W
    hw,  # pooled plane size h·w
    BLOCK: tl.constexpr,  # pooled outputs per program
):
    pid = tl.program_id(0).to(tl.int64)
    o = pid * BLOCK + tl.arange(0, BLOCK)
    mask = o < n_out
    q = o // hw
    k = tl.load(idx_ptr + o, mask=mask, other=0)
    ok = mask & (k >= 0) & (k < HW)                # never read outside the plane
    v = tl.load(zd_ptr + q * HW + k, mask=ok, other=0.0)
    tl.store(out_ptr + o, v, mask=mask)


# VJP of p_o = z_{idx_o}: ∂z_u = Σ_{o : idx_o = u} d_o. Pixel (y, x) lies in the windows of rows
# i ∈ {⌊y/2⌋} ∪ {⌊y/2⌋ + 1 if y is odd and < h} and likewise of columns: ≤ 4 candidates, taken
# in ascending (i, j) (= ascending o) order, the order of the reference's scatter_add_.
@triton.jit
def _maxpool3s2_backward_kernel(
    d_ptr,  # *T, [S, P, M, h, w] gradients with respect to p, contiguous
    idx_ptr,  # *int64, [P, M, h, w] the forward's argmax
    dz_ptr,  # *T, [S, P, M, H, W] out: ∂z, every element written once
    n_in,  # S·P·M·H·W input pixels
    n_planes,  # P·M planes of idx (shared by every s)
    H, W,  # input plane
    h, w,  # pooled plane
    BLOCK: tl.constexpr,  # input pixels per program
):
    pid = tl.program_id(0).to(tl.int64)
    t = pid * BLOCK + tl.arange(0, BLOCK)
    mask = t < n_in
    HW = H * W
    hw = h * w
    sq = t // HW                                   # (s, p, m) plane of d and dz
    u = t - sq * HW                                # pixel inside the plane
    y = u // W
    x = u - y * W
    q = sq % n_planes                              # (p, m) plane of idx
    i0 = y // 2
    j0 = x // 2
    y_odd = (y % 2) == 1
    x_odd = (x % 2) == 1
    acc = tl.zeros((BLOCK,), d_ptr.dtype.element_ty)
    for di in tl.static_range(2):
        i = i0 + di
        if di == 0:
            i_ok = mask
        else:
            i_ok = mask & y_odd & (i < h)
        for dj in tl.static_range(2):
            j = j0 + dj
            if dj == 0:
                ok = i_ok
            else:
                ok = i_ok & x_odd & (j < w)
            o = i * w + j
            k = tl.load(idx_ptr + q * hw + o, mask=ok, other=-1)
            g = tl.load(d_ptr + sq * hw + o, mask=ok & (k == u), other=0.0)
            acc += g
    tl.store(dz_ptr + t, acc, mask=mask)


def _pooled(n: int) -> int:
    return (n - 1) // 2 + 1


def maxpool3s2(z: torch.Tensor):
    """Launch the forward: ``(p [P, M, h, w], idx int64)`` (inputs checked by
    :func:`fastdistill.ops.maxpool3s2`: contiguous, float32/float64, H, W ≥ 1)."""
    P, M, H, W = z.shape
    h, w = _pooled(H), _pooled(W)
    p = torch.empty((P, M, h, w), dtype=z.dtype, device=z.device)
    idx = torch.empty((P, M, h, w), dtype=torch.long, device=z.device)
    n = p.numel()
    if n:
        _maxpool3s2_kernel[(triton.cdiv(n, BLOCK),)](z, p, idx, n, H, W, h, w, BLOCK=BLOCK,
                                                      num_warps=4)
    return p, idx


def maxpool3s2_tangent(zd: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Launch the tangent ``ṗ = ż[idx]`` (inputs checked by the op)."""
    H, W = zd.shape[2:]
    out = torch.empty(idx.shape, dtype=zd.dtype, device=zd.device)
    n = out.numel()
    if n:
        _maxpool3s2_tangent_kernel[(triton.cdiv(n, BLOCK),)](zd, idx, out, n, H * W,
                                                              idx.shape[2] * idx.shape[3],
                                                              BLOCK=BLOCK, num_warps=4)
    return out


def maxpool3s2_backward(d: torch.Tensor, idx: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """Launch the adjoint for S stacked gradients ``d [S, P, M, h, w]``: ``dz [S, P, M, H, W]``."""
    S = d.shape[0]
    P, M, h, w = idx.shape
    dz = torch.empty((S, P, M, H, W), dtype=d.dtype, device=d.device)
    n = dz.numel()
    if n:
        _maxpool3s2_backward_kernel[(triton.cdiv(n, BLOCK),)](d, idx, dz, n, P * M, H, W, h, w,
                                                               BLOCK=BLOCK, num_warps=4)
    return dz
