"""Triton kernels of fixedpoint_mul / fixedpoint_unmul: one exact information-buffer step.

Maths (per element, floor division, every result mod 2^64 like int64 torch arithmetic)::

    mul    c ← F where c ≥ S;  (q, e) = divmod(c, n);  (X, r) = divmod(X·n + e, d);  c ← q·d + r
    unmul  (q, r) = divmod(c, d);  (X, e) = divmod(X·d + r, n);  c ← q·n + e

Design: one program per BLOCK contiguous elements, masked tail, all in int64. ``X·n`` can
overflow int64, so it is never formed: ``X = H·2^30 + L`` (arithmetic shift, mask) and
``H·a = q_h·b + r_h`` (``|H·a| ≤ 2^53``), ``r_h·2^30 + L·a + cin = q_l·b + r_l`` (below 2^51),
giving ``X·a + cin = (q_h·2^30 + q_l)·b + r_l`` -- the limb split of the reference. Triton's
integer ``//`` truncates toward zero (C semantics, on the GPU and in the interpreter), so
:func:`_floor_divmod` moves a negative remainder up by one ``b``; int64 division is exact for
every numerator, so the live word needs no limbs. Bitwise equal to the reference for all int64
inputs. Each element is loaded before it is stored, so the outputs may alias the inputs exactly.
Limits: contiguous int64 tensors of one shape, 0 < n < d ≤ 2^20 (checked by the caller); int64
division is emulated on GPUs (tens of instructions), still far below the memory traffic of the
many-op reference.
"""
import torch
import triton
import triton.language as tl

__all__ = ["fixedpoint_mul", "fixedpoint_unmul"]

# 1024 elements per program: 4 warps × 32 threads × 8 elements on the GPU; under the CPU
# interpreter larger blocks mean fewer (slow) program launches.
BLOCK = 1024
LIMB_BITS = tl.constexpr(30)
LIMB_MASK = tl.constexpr((1 << 30) - 1)


@triton.jit
def _floor_divmod(N, b):
    """Floor ``(N div b, N mod b)`` for int64 ``N`` and ``b ≥ 1`` (``//`` truncates)."""
    q = N // b
    r = N - q * b
    neg = r < 0
    return tl.where(neg, q - 1, q), tl.where(neg, r + b, r)


@triton.jit
def _muldiv(X, a, b, cin):
    """``(⌊(X·a + cin)/b⌋ mod 2^64, (X·a + cin) mod b)``: int64 X, 1 ≤ a, b ≤ 2^20, cin < 2^21."""
    qh, rh = _floor_divmod((X >> LIMB_BITS) * a, b)
    ql, r = _floor_divmod((rh << LIMB_BITS) + (X & LIMB_MASK) * a + cin, b)
    return (qh << LIMB_BITS) + ql, r


@triton.jit
def _fixedpoint_step_kernel(
    x_ptr,  # *int64 [numel] X, the fixed-point states
    c_ptr,  # *int64 [numel] c, the live information-buffer words
    x_out_ptr,  # *int64 [numel] new X; may alias x_ptr or c_ptr (loads come before stores)
    c_out_ptr,  # *int64 [numel] new c; may alias x_ptr or c_ptr
    numel,  # number of elements
    n,  # numerator of β = n/d, 0 < n < d
    d,  # denominator of β, d ≤ 2^20
    floor,  # F: a restarted word starts here (mul only)
    threshold,  # S: words c ≥ S restart at F before the multiplication (mul only)
    MUL: tl.constexpr,  # True: fixedpoint_mul, False: fixedpoint_unmul
    BLOCK: tl.constexpr,  # elements per program
):
    pid = tl.program_id(0).to(tl.int64)  # int64: offsets of >2^31-element vectors do not wrap
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    X = tl.load(x_ptr + offs, mask=mask, other=0)
    c = tl.load(c_ptr + offs, mask=mask, other=0)
    if MUL:
        c = tl.where(c >= threshold, floor, c)
        qc, e = _floor_divmod(c, n)
        X, r = _muldiv(X, n, d, e)
        c = qc * d + r
    else:
        qc, r = _floor_divmod(c, d)
        X, e = _muldiv(X, d, n, r)
        c = qc * n + e
    tl.store(x_out_ptr + offs, X, mask=mask)
    tl.store(c_out_ptr + offs, c, mask=mask)


def _launch(X, c, n, d, floor, threshold, X_out, c_out, mul):
    if X_out is None:
        X_out = torch.empty_like(X, memory_format=torch.contiguous_format)
    if c_out is None:
        c_out = torch.empty_like(c, memory_format=torch.contiguous_format)
    numel = X.numel()
    if numel == 0:
        return X_out, c_out
    grid = (triton.cdiv(numel, BLOCK),)
    _fixedpoint_step_kernel[grid](X, c, X_out, c_out, numel, n, d, floor, threshold, MUL=mul,
                                  BLOCK=BLOCK, num_warps=4)
    return X_out, c_out


def fixedpoint_mul(X: torch.Tensor, c: torch.Tensor, n: int, d: int, floor: int, threshold: int,
                   X_out: torch.Tensor = None, c_out: torch.Tensor = None):
    """Launch the mul step; arguments already checked by :func:`fastdistill.ops.fixedpoint_mul.
    fixedpoint_mul` (contiguous int64 of one shape and device). Returns ``(X', c')``."""
    return _launch(X, c, n, d, floor, threshold, X_out, c_out, True)


def fixedpoint_unmul(X: torch.Tensor, c: torch.Tensor, n: int, d: int,
                     X_out: torch.Tensor = None, c_out: torch.Tensor = None):
    """Launch the unmul step (see :func:`fixedpoint_mul`). Returns ``(X, c)`` before the mul."""
    return _launch(X, c, n, d, 1, 2, X_out, c_out, False)
