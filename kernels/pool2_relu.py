"""Triton kernels of pool2_relu: LeNet's conv epilogue (2×2 max-pool, + bias, ReLU), its tangent
and its adjoint, on planes ``z [P, M, H, W]`` (P = networks × channels, M images).

Maths (one plane, pooled position o with 2×2 window w(o), see ``fastdistill/ops/pool2_relu.py``)::

    forward   a_o = relu(max_{u ∈ w(o)} z_u + b),  idx_o = first argmax in scan order
    tangent   ȧ_o = (ż_{idx_o} + ḃ) · [a_o > 0]
    backward  ∂z_u = [u = idx_o(u)] · d_o(u) · [a_o(u) > 0],   ∂b = Σ_o d_o · [a_o > 0]

Design: forward and tangent: one program per BLOCK pooled outputs (flat over P·M·h·w, masked
tail). The argmax scans the window in max_pool2d's order (0,0), (0,1), (1,0), (1,1) with its
update rule ``v > m or isnan(v)``, so the index (first maximum; the last NaN when there are
NaNs) and the value are those of ``F.max_pool2d(return_indices=True)``. The ReLU is
``p · [p > 0]`` like the reference (a NaN stays NaN, −inf gives NaN as there); products and sums
are rounded separately (``enable_fp_fusion=False``): forward and tangent are bitwise equal to
the reference.
Backward: no atomics. The 2×2 windows tile the plane, so the program that owns output o writes
all four ∂z of its window (each input element receives its one window's value and is written
exactly once: deterministic). A program holds a [ROWS, COLS] tile of (s, p) planes × outputs
(ROWS > 1 packs small planes), and ∂b is reduced in a fixed order: each program sums its row of
masked gradients (a fixed tree) into ``partial[s·P + p, block]`` and the launcher sums those rows
with ``torch.sum`` (deterministic). Equal to the reference's ``sum`` to round-off, not bitwise.
Limits: contiguous float32/float64 tensors, H and W even, int64 indices (as max_pool2d);
index maths in int64 (tensors beyond 2^31 elements do not wrap); the backward's grid has
cdiv(M·h·w, COLS) ≤ 65535 column blocks per plane (M·h·w < 6.7·10^7 on a GPU).
"""
import os

import torch
import triton
import triton.language as tl

__all__ = ["pool2_relu", "pool2_relu_tangent", "pool2_relu_backward"]

# 1024 pooled outputs per program on a GPU (4 warps × 32 threads × 8): each reads 4 inputs; the
# op is memory bound, one pass is the whole gain. Under the CPU interpreter a launch costs ~3 ms
# per program whatever its size, so programs there are 16× larger (tests may lower BLOCK to
# exercise the multi-block paths).
BLOCK = 16384 if os.environ.get("TRITON_INTERPRET", "0") == "1" else 1024


@triton.jit
def _pool2_relu_kernel(
    z_ptr,  # *T, [P, M, H, W] pre-pool conv outputs, contiguous
    bias_ptr,  # *T, [P] one bias per plane
    a_ptr,  # *T, [P, M, h, w] out: relu(max + b)
    idx_ptr,  # *int64, [P, M, h, w] out: flat argmax in the H×W plane
    n_out,  # P·M·h·w pooled outputs
    plane_out,  # M·h·w outputs per bias plane (p = o // plane_out)
    w,  # pooled width W/2
    hw,  # pooled plane size h·w
    W,  # input width
    BLOCK: tl.constexpr,  # pooled outputs per program
):
    pid = tl.program_id(0).to(tl.int64)
    o = pid * BLOCK + tl.arange(0, BLOCK)
    mask = o < n_out
    pm = o // hw                                   # (p, m) image plane
    r = o - pm * hw
    y = r // w
    x = r - y * w
    u0 = (2 * y) * W + 2 * x                       # flat index of the window's top-left in H×W
    base = z_ptr + pm * (4 * hw)                   # H·W = 4·h·w
    m = tl.load(base + u0, mask=mask, other=0.0)
    best = u0
    # max_pool2d's scan: a later value replaces the maximum when larger, or when it is NaN
    for k in tl.static_range(1, 4):
        u = u0 + (k // 2) * W + (k % 2)
        v = tl.load(base + u, mask=mask, other=0.0)
        take = (v > m) | (v != v)
        m = tl.where(take, v, m)
        best = tl.where(take, u, best)
    b = tl.load(bias_ptr + o // plane_out, mask=mask, other=0.0)
    p = m + b
    tl.store(a_ptr + o, p * (p > 0).to(p.dtype), mask=mask)
    tl.store(idx_ptr + o, best, mask=mask)


@triton.jit
def _pool2_relu_tangent_kernel(
    zd_ptr,  # *T, [P, M, H, W] tangent ż of the pre-pool outputs, contiguous
    bias_d_ptr,  # *T, [P] tangent ḃ of the bias
    idx_ptr,  # *int64, [P, M, h, w] the forward's argmax
    a_ptr,  # *T, [P, M, h, w] the forward's activations (ReLU mask a > 0)
    out_ptr,  # *T, [P, M, h, w] out: ȧ
    n_out,  # P·M·h·w pooled outputs
    plane_out,  # M·h·w outputs per bias plane
    hw,  # pooled plane size h·w
    BLOCK: tl.constexpr,  # pooled outputs per program
):
    pid = tl.program_id(0).to(tl.int64)
    o = pid * BLOCK + tl.arange(0, BLOCK)
    mask = o < n_out
    pm = o // hw
    idx = tl.load(idx_ptr + o, mask=mask, other=0)
    zd = tl.load(zd_ptr + pm * (4 * hw) + idx, mask=mask, other=0.0)
    bd = tl.load(bias_d_ptr + o // plane_out, mask=mask, other=0.0)
    a = tl.load(a_ptr + o, mask=mask, other=0.0)
    tl.store(out_ptr + o, (zd + bd) * (a > 0).to(a.dtype), mask=mask)


# VJP of a_o = relu(z_{idx_o} + b) (idx and the mask constant a.e.): with m_o = d_o · [a_o > 0],
# ∂z_u = Σ_o [u = idx_o] m_o — only o = o(u), the one window holding u, can contribute, so
# ∂z_u = m_{o(u)} if u = idx_{o(u)} else 0 — and ∂b = Σ_o m_o over the plane's M·h·w outputs.
@triton.jit
def _pool2_relu_backward_kernel(
    d_ptr,  # *T, [S, P, M, h, w] gradients with respect to a, contiguous
    idx_ptr,  # *int64, [P, M, h, w] the forward's argmax
    a_ptr,  # *T, [P, M, h, w] the forward's activations
    dz_ptr,  # *T, [S, P, M, H, W] out: ∂z, every element written once
    partial_ptr,  # *T, [S·P, n_blocks] out: per-program partial sums of ∂b
    n_planes,  # S·P (s, p) planes
    plane_out,  # M·h·w outputs per (s, p) plane
    n_blocks,  # column blocks per plane: cdiv(plane_out, COLS)
    w,  # pooled width
    hw,  # pooled plane size h·w
    W,  # input width
    P,  # planes per stack entry
    ROWS: tl.constexpr,  # (s, p) planes per program (> 1 when planes are small)
    COLS: tl.constexpr,  # outputs per plane per program
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)              # (s, p) planes
    sp = rows[:, None]                             # [ROWS, 1]
    blk = tl.program_id(1).to(tl.int64)
    q = blk * COLS + tl.arange(0, COLS)[None, :]   # [1, COLS] output index inside the plane
    mask = (sp < n_planes) & (q < plane_out)
    o = (sp % P) * plane_out + q                   # index into idx / a (shared by every s)
    d = tl.load(d_ptr + sp * plane_out + q, mask=mask, other=0.0)
    a = tl.load(a_ptr + o, mask=mask, other=0.0)
    idx = tl.load(idx_ptr + o, mask=mask, other=0)
    g = d * (a > 0).to(d.dtype)
    mi = q // hw                                   # image inside the plane
    r = q - mi * hw
    y = r // w
    x = r - y * w
    u0 = (2 * y) * W + 2 * x
    base = dz_ptr + (sp * plane_out + mi * hw) * 4  # (s, p, m) plane of H·W = 4·h·w inputs
    for k in tl.static_range(0, 4):
        u = u0 + (k // 2) * W + (k % 2)
        tl.store(base + u, tl.where(idx == u, g, 0.0), mask=mask)
    part = tl.sum(g, axis=1)                       # [ROWS], a fixed reduction tree
    tl.store(partial_ptr + rows * n_blocks + blk, part, mask=rows < n_planes)


def pool2_relu(z: torch.Tensor, bias: torch.Tensor):
    """Launch the forward: ``(a [P, M, H/2, W/2], idx int64)``. Inputs are checked by
    :func:`fastdistill.ops.pool2_relu` (contiguous, even H and W, bias [P])."""
    P, M, H, W = z.shape
    h, w = H // 2, W // 2
    a = torch.empty((P, M, h, w), dtype=z.dtype, device=z.device)
    idx = torch.empty((P, M, h, w), dtype=torch.long, device=z.device)
    n = a.numel()
    if n:
        _pool2_relu_kernel[(triton.cdiv(n, BLOCK),)](z, bias, a, idx, n, M * h * w, w, h * w, W,
                                                      BLOCK=BLOCK, num_warps=4,
                                                      enable_fp_fusion=False)
    return a, idx


def pool2_relu_tangent(zd: torch.Tensor, bias_d: torch.Tensor, idx: torch.Tensor,
                       a: torch.Tensor) -> torch.Tensor:
    """Launch the tangent ``ȧ = (ż[idx] + ḃ) · [a > 0]`` (inputs checked by the op)."""
    P, M, h, w = a.shape
    out = torch.empty_like(a)
    n = a.numel()
    if n:
        _pool2_relu_tangent_kernel[(triton.cdiv(n, BLOCK),)](zd, bias_d, idx, a, out, n, M * h * w,
                                                              h * w, BLOCK=BLOCK, num_warps=4,
                                                              enable_fp_fusion=False)
    return out


def pool2_relu_backward(d: torch.Tensor, idx: torch.Tensor, a: torch.Tensor):
    """Launch the adjoint for S stacked gradients: ``(dz [S, P, M, 2h, 2w], dbias [S, P])``."""
    S = d.shape[0]
    P, M, h, w = a.shape
    plane = M * h * w
    dz = torch.empty((S, P, M, 2 * h, 2 * w), dtype=d.dtype, device=d.device)
    if S * P == 0 or plane == 0:
        return dz, torch.zeros((S, P), dtype=d.dtype, device=d.device)
    cols = min(BLOCK, triton.next_power_of_2(plane))
    rows = BLOCK // cols                           # small planes: several per program
    n_blocks = triton.cdiv(plane, cols)
    partial = torch.empty((S * P, n_blocks), dtype=d.dtype, device=d.device)
    grid = (triton.cdiv(S * P, rows), n_blocks)
    _pool2_relu_backward_kernel[grid](d, idx, a, dz, partial, S * P, plane, n_blocks, w, h * w,
                                      2 * w, P, ROWS=rows, COLS=cols, num_warps=4,
                                      enable_fp_fusion=False)
    return dz, partial.sum(1).reshape(S, P)
