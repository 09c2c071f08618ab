"""Triton kernel of ce_head: the softmax cross-entropy head of K networks with its gradient and
its R-operator tangent (the batched LeNet engine's ``_loss_head`` + ``_loss_tangent``), fused.

Maths, per network k and image column j (logits z_{·j} over O classes, targets ỹ_{·j} that need
not sum to one, scale s, logit tangent ż)::

    log p = z − max z − log Σ_c exp(z_c − max z),   σ = Σ_c ỹ_c
    ℓ_k   = −s Σ_j Σ_c ỹ_c log p_c
    δz    = s (p σ − ỹ)
    δż    = s · p ⊙ (ż − ⟨p, ż⟩) · σ          (the tangent of δz in direction ż)
    R{∇_ỹ ℓ} = −s (ż − ⟨p, ż⟩)                (the tangent of ∇_ỹ ℓ = −s log p)

Design: one program per (network k, BN consecutive image columns): a [BO, BN] tile holds whole
columns (BO ≥ O), so every softmax, ⟨p, ż⟩ and Σ ỹ is a reduction over the tile's first axis
inside one program; n is the contiguous dimension of ``[K, O, n]``, so loads are coalesced
along the columns. Each program writes its columns' δz, δż, R{∇_ỹ ℓ} once and the sum of its
columns' Σ ỹ log p into ``partial[k, block]``; the launcher forms ℓ = −s · Σ_block partial with
``torch.sum`` (a fixed order: deterministic, no atomics). Padded rows and columns load 0
(targets and tangents too); padded rows enter the max and the exponentials as −inf, so they
add nothing and 0 · (−inf) never appears. The scale is read from a one-element tensor of the
logits' dtype (a Python float argument would reach the kernel as fp32). exp/log are Triton's,
not torch's: results equal the reference to round-off, not bitwise.
Limits: contiguous float32/float64 tensors, O ≤ 4096 classes (one column per tile); the
softmax head only (the engine's one-logit BCE head is not covered).
"""
import os

import torch
import triton
import triton.language as tl

__all__ = ["ce_head", "MAX_CLASSES"]

MAX_CLASSES = 4096
# Elements per tile: 1024 on a GPU (4 warps); under the interpreter each program costs
# milliseconds whatever its size, so tiles are 16× larger there.
_TILE = 16384 if os.environ.get("TRITON_INTERPRET", "0") == "1" else 1024


@triton.jit
def _ce_head_kernel(
    z_ptr,  # *T, [K, O, n] logits, contiguous
    y_ptr,  # *T, [K or 1, O, n] targets ỹ, contiguous
    zd_ptr,  # *T, [K, O, n] logit tangent ż (unused without HAS_TANGENT)
    scale_ptr,  # *T, one element: the loss scale s
    partial_ptr,  # *T, [K, n_blocks] out: Σ_{columns of the block} Σ_c ỹ log p
    dz_ptr,  # *T, [K, O, n] out: δz
    dzd_ptr,  # *T, [K, O, n] out: δż (unused without HAS_TANGENT)
    dy_ptr,  # *T, [K, O, n] out: R{∇_ỹ ℓ} (unused without HAS_TANGENT)
    O,  # classes
    n,  # image columns
    y_stride,  # O·n, or 0 when the targets are shared by all networks
    n_blocks,  # column blocks per network: cdiv(n, BN)
    HAS_TANGENT: tl.constexpr,  # also compute δż and R{∇_ỹ ℓ}
    BO: tl.constexpr,  # rows per tile: next power of two ≥ O
    BN: tl.constexpr,  # columns per program
):
    k = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    rc = tl.arange(0, BO)
    rn = blk * BN + tl.arange(0, BN)
    row_ok = (rc < O)[:, None]
    mask = row_ok & (rn < n)[None, :]
    off = rc[:, None] * n + rn[None, :]
    base = k * O * n
    s = tl.load(scale_ptr)
    # padded columns and rows load 0 (finite); padded rows are kept out of the max and the
    # exponentials by −inf arguments (exp(−inf) = 0), and have zero targets and tangents
    z = tl.load(z_ptr + base + off, mask=mask, other=0.0)
    y = tl.load(y_ptr + k * y_stride + off, mask=mask, other=0.0)
    zmax = tl.max(tl.where(row_ok, z, float("-inf")), axis=0)
    shifted = z - zmax[None, :]
    lse = tl.log(tl.sum(tl.exp(tl.where(row_ok, shifted, float("-inf"))), axis=0))
    logp = shifted - lse[None, :]
    p = tl.exp(tl.where(row_ok, logp, float("-inf")))
    ysum = tl.sum(y, axis=0)                       # σ per column (padded entries are 0)
    ylogp = tl.sum(y * logp, axis=1)               # [BO]; padded entries are 0 · finite = 0
    tl.store(partial_ptr + k * n_blocks + blk, tl.sum(ylogp, axis=0))
    tl.store(dz_ptr + base + off, (p * ysum[None, :] - y) * s, mask=mask)
    if HAS_TANGENT:
        zd = tl.load(zd_ptr + base + off, mask=mask, other=0.0)
        centred = zd - tl.sum(p * zd, axis=0)[None, :]   # ż − ⟨p, ż⟩
        tl.store(dzd_ptr + base + off, p * centred * ysum[None, :] * s, mask=mask)
        tl.store(dy_ptr + base + off, -centred * s, mask=mask)


def ce_head(z: torch.Tensor, Y: torch.Tensor, scale: torch.Tensor, zd=None):
    """Launch the kernel: ``(loss [K], δz, δż or None, R{∇_ỹ ℓ} or None)``. Inputs are checked by
    :func:`fastdistill.ops.ce_head.ce_head` (contiguous, one dtype; ``scale`` one element)."""
    K, O, n = z.shape
    dz = torch.empty_like(z)
    tangent = zd is not None
    dzd = torch.empty_like(z) if tangent else None
    dy = torch.empty_like(z) if tangent else None
    if K * n == 0 or O == 0:
        dz.zero_()
        if tangent:
            dzd.zero_()
            dy.zero_()
        return torch.zeros(K, dtype=z.dtype, device=z.device), dz, dzd, dy
    BO = triton.next_power_of_2(O)
    BN = max(1, min(triton.next_power_of_2(n), _TILE // BO))
    n_blocks = triton.cdiv(n, BN)
    partial = torch.empty((K, n_blocks), dtype=z.dtype, device=z.device)
    y_stride = 0 if Y.shape[0] == 1 else O * n
    _ce_head_kernel[(K, n_blocks)](
        z, Y, zd if tangent else z, scale, partial, dz, dzd if tangent else dz,
        dy if tangent else dz, O, n, y_stride, n_blocks,
        HAS_TANGENT=tangent, BO=BO, BN=BN, num_warps=4, enable_fp_fusion=False)
    return -partial.sum(1) * scale, dz, dzd, dy
