"""Triton kernel of linear_relu_tangent: one batched linear layer (+ ReLU) of K networks with its
R-operator tangent, fused (the batched LeNet engine's fully connected layers).

Maths, per network k (``h [F_in, n]`` columns are images)::

    z = W h + b,          ż = V h + W ḣ + ḃ          (V, ḃ: the direction's weights and bias)
    out = relu(z),        ṫ = ż · [z > 0]            (relu=False: out = z, ṫ = ż)

Design: one program per (network k, BM rows of F_out, BN columns of n); it walks F_in in BK
chunks and reads each tile of h, ḣ, W, V once, feeding three ``tl.dot`` (W h, V h, W ḣ) into
two accumulators of the output's dtype (fp32 for fp32 inputs, fp64 for fp64), then adds the
biases, applies the ReLU and its mask and writes both outputs once. ``input_precision="ieee"``:
on a GPU fp32 dots would otherwise run in TF32 (10-bit mantissa), far from torch's fp32 GEMM.
Tails are masked (``other=0`` adds zero terms), so F_out, F_in and n need not be multiples of the
blocks; the blocks themselves are ≥ 16 (tl.dot's minimum on a GPU). The sums run in the dots'
order, not torch's: the result equals the reference to round-off (fp32: within ~2× torch's own
fp32 error against an fp64 GEMM), not bitwise. The ReLU mirrors ``torch.relu`` (NaN passes) and
the tangent mask is a product ``ż · [out > 0]`` like the engine's.
Limits: contiguous float32/float64 tensors; fp64 ``tl.dot`` runs under the interpreter and
compiles on sm_80+ only where the Triton build supports fp64 dots (checked on a GPU only).
The backward is plain PyTorch in ``fastdistill/ops/linear_relu_tangent.py``.
"""
import os

import torch
import triton
import triton.language as tl

__all__ = ["linear_relu_tangent"]

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _linear_relu_tangent_kernel(
    h_ptr,  # *T, [K, F_in, n] layer input h, contiguous
    hd_ptr,  # *T, [K, F_in, n] its tangent ḣ (unused without HAS_TANGENT)
    w_ptr,  # *T, [K, F_out, F_in] weights W, contiguous
    v_ptr,  # *T, [K, F_out, F_in] weight direction V (unused without HAS_TANGENT)
    b_ptr,  # *T, [K, F_out] bias b
    bd_ptr,  # *T, [K, F_out] bias direction ḃ (unused without HAS_TANGENT)
    out_ptr,  # *T, [K, F_out, n] out: relu(z) (or z)
    outd_ptr,  # *T, [K, F_out, n] out: ż · [z > 0] (or ż); unused without HAS_TANGENT
    F_out,  # output features
    F_in,  # input features (the reduction length)
    n,  # columns (images)
    HAS_TANGENT: tl.constexpr,  # also compute ż
    RELU: tl.constexpr,  # apply the ReLU and its mask
    BM: tl.constexpr,  # output rows per program (≥ 16)
    BN: tl.constexpr,  # columns per program (≥ 16)
    BK: tl.constexpr,  # reduction chunk (≥ 16)
):
    k = tl.program_id(0).to(tl.int64)
    rm = tl.program_id(1) * BM + tl.arange(0, BM)
    rn = tl.program_id(2) * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    row_ok = rm < F_out
    col_ok = rn < n
    w_base = w_ptr + k * F_out * F_in
    v_base = v_ptr + k * F_out * F_in
    h_base = h_ptr + k * F_in * n
    hd_base = hd_ptr + k * F_in * n
    acc_t = out_ptr.dtype.element_ty
    acc = tl.zeros((BM, BN), dtype=acc_t)
    accd = tl.zeros((BM, BN), dtype=acc_t)
    for k0 in range(0, F_in, BK):
        kk = k0 + rk
        k_ok = kk < F_in
        w_off = rm[:, None] * F_in + kk[None, :]
        w_mask = row_ok[:, None] & k_ok[None, :]
        h_off = kk[:, None] * n + rn[None, :]
        h_mask = k_ok[:, None] & col_ok[None, :]
        w = tl.load(w_base + w_off, mask=w_mask, other=0.0)
        x = tl.load(h_base + h_off, mask=h_mask, other=0.0)
        acc = tl.dot(w, x, acc, input_precision="ieee", out_dtype=acc_t)
        if HAS_TANGENT:
            v = tl.load(v_base + w_off, mask=w_mask, other=0.0)
            xd = tl.load(hd_base + h_off, mask=h_mask, other=0.0)
            accd = tl.dot(v, x, accd, input_precision="ieee", out_dtype=acc_t)
            accd = tl.dot(w, xd, accd, input_precision="ieee", out_dtype=acc_t)
    b = tl.load(b_ptr + k * F_out + rm, mask=row_ok, other=0.0)
    z = acc + b[:, None]
    if RELU:
        z = tl.where((z > 0) | (z != z), z, 0.0)   # torch.relu: NaN passes through
    o_off = k * F_out * n + rm[:, None] * n + rn[None, :]
    o_mask = row_ok[:, None] & col_ok[None, :]
    tl.store(out_ptr + o_off, z, mask=o_mask)
    if HAS_TANGENT:
        bd = tl.load(bd_ptr + k * F_out + rm, mask=row_ok, other=0.0)
        zd = accd + bd[:, None]
        if RELU:
            zd = zd * (z > 0).to(acc_t)
        tl.store(outd_ptr + o_off, zd, mask=o_mask)


def _blocks(F_out: int, F_in: int, n: int):
    """(BM, BN, BK): powers of two ≥ 16 (tl.dot's minimum). On a GPU 64×64 output tiles with
    32-deep chunks (two fp32 accumulators stay in registers); under the interpreter, where each
    program costs milliseconds, tiles up to 128 so small layers take one program per network."""
    cap_mn, cap_k = (128, 128) if _INTERPRET else (64, 32)
    clamp = lambda v, cap: max(16, min(cap, triton.next_power_of_2(max(v, 1))))  # noqa: E731
    return clamp(F_out, cap_mn), clamp(n, cap_mn), clamp(F_in, cap_k)


def linear_relu_tangent(h: torch.Tensor, hd, W: torch.Tensor, V, b: torch.Tensor, bd,
                        relu: bool):
    """Launch the kernel: ``(out, out_d or None)``; inputs checked by
    :func:`fastdistill.ops.linear_relu_tangent.linear_relu_tangent` (contiguous, one dtype;
    ``hd``, ``V``, ``bd`` all tensors or all None)."""
    K, F_in, n = h.shape
    F_out = W.shape[1]
    tangent = hd is not None
    out = torch.empty((K, F_out, n), dtype=h.dtype, device=h.device)
    outd = torch.empty_like(out) if tangent else None
    if out.numel() == 0:
        return out, outd
    BM, BN, BK = _blocks(F_out, F_in, n)
    grid = (K, triton.cdiv(F_out, BM), triton.cdiv(n, BN))
    _linear_relu_tangent_kernel[grid](
        h, hd if tangent else h, W, V if tangent else W, b, bd if tangent else b,
        out, outd if tangent else out, F_out, F_in, n,
        HAS_TANGENT=tangent, RELU=bool(relu), BM=BM, BN=BN, BK=BK, num_warps=4,
        # four operand tiles per stage: 64 KB of shared memory per stage in float64
        num_stages=2 if h.dtype == torch.float64 else 3, enable_fp_fusion=False)
    return out, outd
