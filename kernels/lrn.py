"""Triton kernels of lrn: local response normalisation across channels (``F.local_response_norm``),
its tangent (JVP) and its adjoint (VJP), on ``x [B, C, M, H, W]`` (B networks, C channels
normalised over, M images; the engine's planes ``[B·C, M, H, W]`` viewed), E = M·H·W.

Maths (see ``fastdistill/ops/lrn.py``; n = size, a = α/n, c2 = 2αβ/n,
W(c) = {c − n//2, …, c + (n−1)//2} ∩ [0, C), Wᵀ(j) = {j − (n−1)//2, …, j + n//2} ∩ [0, C))::

    forward   y_c = x_c / D_c,   D_c = t_c^β,   t_c = κ + a·s_c,   s_c = Σ_{j ∈ W(c)} x_j²
    tangent   ẏ_c = ẋ_c / D_c − c2 · (y_c / t_c) · Σ_{j ∈ W(c)} x_j ẋ_j
    backward  x̄_j = ȳ_j / D_j − c2 · x_j · Σ_{c ∈ Wᵀ(j)} ȳ_c (y_c / t_c)

Design: the CUDA kernels' (``csrc/cuda/lrn.cu``) in Triton. Every kernel is flat over its
outputs, one program per BLOCK of them (masked tail); channel j of an element lies j − c rows
of E away, so each window tap is one coalesced load (taps outside [0, C) masked to 0, and the
window runs over a constexpr offset range). Everything is computed in float64 for both dtypes
and rounded once on store, with the same expressions in the same order as the C++/CUDA kernels:
window sums in ascending channel order from 0, t = κ + a·s, t^0.75 = √t·√√t when β = 0.75
(IEEE square roots), else exp(β·log t), 1/D formed once, no FMA contraction
(``enable_fp_fusion=False``). The hyper-parameters travel as a float64 tensor (Triton would
pass Python floats as float32). The backward first writes 1/D and y/t per (b, c, e) into a
float64 workspace ``[2, B·C·E]``, then gathers over the transposed window for all S stacked
cotangents. No shared writes, no atomics: reruns are bit-identical. Limits: contiguous
float32/float64 tensors; index maths in int64; C·E < 2^31 per network (window offsets).
The window sum and the denominator are written out in each kernel rather than in a shared
``@triton.jit`` helper: under the CPU interpreter (how CI tests these) a nested jit call costs
more than the whole kernel body.
"""
import os

import torch
import triton
import triton.language as tl

__all__ = ["lrn", "lrn_tangent", "lrn_backward"]

# 1024 elements per program on a GPU; under the CPU interpreter a launch costs milliseconds per
# program whatever its size, so programs there are 16× larger (tests may lower BLOCK).
BLOCK = 16384 if os.environ.get("TRITON_INTERPRET", "0") == "1" else 1024

_PARAMS = {}


@triton.jit
def _lrn_kernel(
    x_ptr,  # *T, [B, C, E] input, contiguous
    y_ptr,  # *T, [B, C, E] out
    prm_ptr,  # *float64, [a = α/n, κ, β, c2 = 2αβ/n]
    n,  # B·C·E elements
    C,  # channels
    E,  # elements per channel row: M·H·W
    BEFORE: tl.constexpr,  # window c − BEFORE .. c + AFTER
    AFTER: tl.constexpr,
    THREE_QUARTERS: tl.constexpr,  # β = 0.75: t^β = √t·√√t
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    o = pid * BLOCK + tl.arange(0, BLOCK)
    mask = o < n
    c = (o // E) % C
    a = tl.load(prm_ptr)
    kappa = tl.load(prm_ptr + 1)
    s = tl.zeros((BLOCK,), tl.float64)
    for tap in tl.static_range(BEFORE + AFTER + 1):
        off = tap - BEFORE
        ok = mask & (c + off >= 0) & (c + off < C)
        v = tl.load(x_ptr + o + off * E, mask=ok, other=0.0).to(tl.float64)
        s += v * v
    t = kappa + a * s
    if THREE_QUARTERS:
        r = tl.sqrt(t)
        den = r * tl.sqrt(r)
    else:
        den = tl.exp(tl.load(prm_ptr + 2) * tl.log(t))
    xv = tl.load(x_ptr + o, mask=mask, other=0.0).to(tl.float64)
    tl.store(y_ptr + o, (xv / den).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _lrn_tangent_kernel(
    xd_ptr,  # *T, [B, C, E] tangent ẋ, contiguous
    x_ptr,  # *T, [B, C, E] the point x
    out_ptr,  # *T, [B, C, E] out: ẏ
    prm_ptr,  # *float64, [a, κ, β, c2]
    n,  # B·C·E elements
    C,
    E,
    BEFORE: tl.constexpr,
    AFTER: tl.constexpr,
    THREE_QUARTERS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    o = pid * BLOCK + tl.arange(0, BLOCK)
    mask = o < n
    c = (o // E) % C
    a = tl.load(prm_ptr)
    kappa = tl.load(prm_ptr + 1)
    c2 = tl.load(prm_ptr + 3)
    s = tl.zeros((BLOCK,), tl.float64)
    sx = tl.zeros((BLOCK,), tl.float64)
    for tap in tl.static_range(BEFORE + AFTER + 1):
        off = tap - BEFORE
        ok = mask & (c + off >= 0) & (c + off < C)
        v = tl.load(x_ptr + o + off * E, mask=ok, other=0.0).to(tl.float64)
        vd = tl.load(xd_ptr + o + off * E, mask=ok, other=0.0).to(tl.float64)
        s += v * v
        sx += v * vd
    t = kappa + a * s
    if THREE_QUARTERS:
        r = tl.sqrt(t)
        den = r * tl.sqrt(r)
    else:
        den = tl.exp(tl.load(prm_ptr + 2) * tl.log(t))
    rd = 1.0 / den
    xv = tl.load(x_ptr + o, mask=mask, other=0.0).to(tl.float64)
    xdv = tl.load(xd_ptr + o, mask=mask, other=0.0).to(tl.float64)
    q = (xv * rd) / t                              # y/t
    tl.store(out_ptr + o, (xdv * rd - (c2 * q) * sx).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _lrn_prepare_kernel(
    x_ptr,  # *T, [B, C, E] the point x, contiguous
    work_ptr,  # *float64, [2, B·C·E] out: 1/D, then y/t
    prm_ptr,  # *float64, [a, κ, β, c2]
    n,  # B·C·E elements
    C,
    E,
    BEFORE: tl.constexpr,
    AFTER: tl.constexpr,
    THREE_QUARTERS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    o = pid * BLOCK + tl.arange(0, BLOCK)
    mask = o < n
    c = (o // E) % C
    a = tl.load(prm_ptr)
    kappa = tl.load(prm_ptr + 1)
    s = tl.zeros((BLOCK,), tl.float64)
    for tap in tl.static_range(BEFORE + AFTER + 1):
        off = tap - BEFORE
        ok = mask & (c + off >= 0) & (c + off < C)
        v = tl.load(x_ptr + o + off * E, mask=ok, other=0.0).to(tl.float64)
        s += v * v
    t = kappa + a * s
    if THREE_QUARTERS:
        r = tl.sqrt(t)
        den = r * tl.sqrt(r)
    else:
        den = tl.exp(tl.load(prm_ptr + 2) * tl.log(t))
    rd = 1.0 / den
    xv = tl.load(x_ptr + o, mask=mask, other=0.0).to(tl.float64)
    tl.store(work_ptr + o, rd, mask=mask)
    tl.store(work_ptr + n + o, (xv * rd) / t, mask=mask)


@triton.jit
def _lrn_backward_kernel(
    g_ptr,  # *T, [S, B, C, E] cotangents ȳ, contiguous
    x_ptr,  # *T, [B, C, E] the point x
    work_ptr,  # *float64, [2, B·C·E] 1/D and y/t (the prepare kernel's)
    out_ptr,  # *T, [S, B, C, E] out: x̄
    prm_ptr,  # *float64, [a, κ, β, c2]
    n,  # B·C·E elements per stack entry
    n_all,  # S·B·C·E outputs
    C,
    E,
    BEFORE: tl.constexpr,  # forward window c − BEFORE .. c + AFTER; transposed: j − AFTER .. j + BEFORE
    AFTER: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    o = pid * BLOCK + tl.arange(0, BLOCK)
    mask = o < n_all
    r = o % n                                      # (b, j, e) inside the stack entry
    j = (r // E) % C
    c2 = tl.load(prm_ptr + 3)
    acc = tl.zeros((BLOCK,), tl.float64)
    for tap in tl.static_range(AFTER + BEFORE + 1):
        off = tap - AFTER
        ok = mask & (j + off >= 0) & (j + off < C)
        gv = tl.load(g_ptr + o + off * E, mask=ok, other=0.0).to(tl.float64)
        qv = tl.load(work_ptr + n + r + off * E, mask=ok, other=0.0)
        acc += gv * qv
    gj = tl.load(g_ptr + o, mask=mask, other=0.0).to(tl.float64)
    rdj = tl.load(work_ptr + r, mask=mask, other=0.0)
    xj = tl.load(x_ptr + r, mask=mask, other=0.0).to(tl.float64)
    tl.store(out_ptr + o, (gj * rdj - (c2 * xj) * acc).to(out_ptr.dtype.element_ty), mask=mask)


def _params(device, size: int, alpha: float, beta: float, k: float) -> torch.Tensor:
    """``[α/n, κ, β, 2αβ/n]`` as a float64 tensor on ``device`` (cached: one copy per setting)."""
    key = (device, size, alpha, beta, k)
    prm = _PARAMS.get(key)
    if prm is None:
        prm = _PARAMS[key] = torch.tensor([alpha / size, k, beta, 2.0 * alpha * beta / size],
                                          dtype=torch.float64, device=device)
    return prm


def _window(size: int):
    return dict(BEFORE=size // 2, AFTER=(size - 1) // 2)


def lrn(x: torch.Tensor, size: int, alpha: float, beta: float, k: float) -> torch.Tensor:
    """Launch the forward ``y = x / (κ + α/n · Σ_W x²)^β`` on ``x [B, C, M, H, W]`` (inputs
    checked by :func:`fastdistill.ops.lrn`: contiguous, float32/float64, size ≥ 1)."""
    y = torch.empty_like(x)
    n = x.numel()
    if n:
        C, E = x.shape[1], n // (x.shape[0] * x.shape[1])
        _lrn_kernel[(triton.cdiv(n, BLOCK),)](x, y, _params(x.device, size, alpha, beta, k), n, C, E,
                                              **_window(size), THREE_QUARTERS=beta == 0.75,
                                              BLOCK=BLOCK, num_warps=4, enable_fp_fusion=False)
    return y


def lrn_tangent(xd: torch.Tensor, x: torch.Tensor, size: int, alpha: float, beta: float,
                k: float) -> torch.Tensor:
    """Launch the tangent ``ẏ`` at ``x`` along ``xd`` (inputs checked by the op)."""
    out = torch.empty_like(x)
    n = x.numel()
    if n:
        C, E = x.shape[1], n // (x.shape[0] * x.shape[1])
        _lrn_tangent_kernel[(triton.cdiv(n, BLOCK),)](xd, x, out, _params(x.device, size, alpha, beta, k),
                                                      n, C, E, **_window(size),
                                                      THREE_QUARTERS=beta == 0.75, BLOCK=BLOCK,
                                                      num_warps=4, enable_fp_fusion=False)
    return out


def lrn_backward(g: torch.Tensor, x: torch.Tensor, size: int, alpha: float, beta: float,
                 k: float) -> torch.Tensor:
    """Launch the adjoint at ``x`` for S stacked cotangents ``g [S, B, C, M, H, W]``."""
    out = torch.empty_like(g)
    n = x.numel()
    if n and g.shape[0]:
        C, E = x.shape[1], n // (x.shape[0] * x.shape[1])
        prm = _params(x.device, size, alpha, beta, k)
        work = torch.empty((2, n), dtype=torch.float64, device=x.device)
        _lrn_prepare_kernel[(triton.cdiv(n, BLOCK),)](x, work, prm, n, C, E, **_window(size),
                                                      THREE_QUARTERS=beta == 0.75, BLOCK=BLOCK,
                                                      num_warps=4, enable_fp_fusion=False)
        n_all = g.numel()
        _lrn_backward_kernel[(triton.cdiv(n_all, BLOCK),)](g, x, work, out, prm, n, n_all, C, E,
                                                           **_window(size), BLOCK=BLOCK,
                                                           num_warps=4, enable_fp_fusion=False)
    return out
