"""``fixedpoint_mul`` / ``fixedpoint_unmul``: one exact step of the ``reversible`` information buffer.

The ``reversible`` strategy (:mod:`fastdistill.backgrad.fixedpoint`) multiplies int64
fixed-point states by β_t = n/d and makes the product invertible by moving the digits it destroys
into a per-parameter *live word* ``c``. For one step and every element (floor ``div``/``mod``, so
remainders lie in ``[0, b)`` for negative numerators too)::

    fixedpoint_mul                                   fixedpoint_unmul (its inverse)
    c ← F  where  c ≥ S   (restart spilled words)    r ← c mod d;   q ← c div d
    e ← c mod n;   q ← c div n                       Y ← X·d + r
    Y ← X·n + e                                      e ← Y mod n;   X ← Y div n
    r ← Y mod d;   X ← Y div d                       c ← q·n + e
    c ← q·d + r

``X·n`` can exceed int64, so it is never formed: :func:`_muldiv` splits ``X = H·2^30 + L`` and
divides the two limbs separately; every result is the exact integer taken mod 2^64 (as int64
arithmetic wraps), for *any* int64 ``X`` and ``c`` -- so the backends can be compared bitwise on
arbitrary inputs. :func:`fixedpoint_unmul` undoes :func:`fixedpoint_mul` exactly, bit for bit,
whenever the new word ``q·d + r`` fits in int64 (``0 ≤ c < S`` after the restart, with the
default ``S = spill_threshold(n, d)``).

What stays in Python (:class:`~fastdistill.backgrad.fixedpoint.InfoBuffer`): pushing the words
``c ≥ S`` onto the word stack *before* the multiplication (the op only restarts them at F) and,
after an unmul, detecting the words that are back at F and refilling them from the stack.

:func:`fixedpoint_mul_reference` / :func:`fixedpoint_unmul_reference` are the specification,
the fallback and the test oracle; the public functions check their arguments once, pick a backend
through :mod:`fastdistill._backend` (reference / cpp / triton / cuda) and record which one ran.
Every backend is bitwise equal to the reference. Integer ops: nothing is differentiable.
"""
from __future__ import annotations

import operator
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import _backend
from ..errors import ConfigError, ShapeError

__all__ = ["fixedpoint_mul", "fixedpoint_unmul", "fixedpoint_mul_reference",
           "fixedpoint_unmul_reference", "spill_threshold", "MAX_DENOMINATOR"]

OPS = ("fixedpoint_mul", "fixedpoint_unmul")

#: largest rational denominator: keeps every partial quotient below 2^53 (exact in float64).
MAX_DENOMINATOR = 1 << 20
_INT64_MAX = (1 << 63) - 1
_LIMB_BITS = 30
_LIMB_MASK = (1 << _LIMB_BITS) - 1


def spill_threshold(n: int, d: int) -> int:
    """``S = n·((2^63 − d) div d)``: below it the new live word ``(c div n)·d + r`` of
    :func:`fixedpoint_mul` cannot overflow int64 (the default ``threshold``)."""
    return n * ((_INT64_MAX + 1 - d) // d)


# ------------------------------------------------------------------------------- the reference
def _divmod_small(N: Tensor, b: int) -> Tuple[Tensor, Tensor]:
    """Floor ``(N div b, N mod b)`` for int64 ``|N| ≤ 2^53`` and ``1 ≤ b ≤ 2^20``, via float64.

    Exact: ``float64(N)`` is exact, and the correctly rounded quotient ``fl(N/b)`` differs from
    ``N/b`` by at most ``|N/b|·2^-53 < 1/b``, while a non-integer ``N/b`` lies at least ``1/b``
    from the nearest integer, so the floor is never pushed across one. (int64 division runs
    ~10× slower than this on CPUs.)
    """
    q = N.to(torch.float64).div_(b).floor_().to(torch.int64)
    return q, torch.sub(N, q, alpha=b)


def _divmod(N: Tensor, b: int) -> Tuple[Tensor, Tensor]:
    """Floor ``(N div b, N mod b)`` for any int64 ``N`` and ``1 ≤ b ≤ 2^20`` (two 30-bit limbs)."""
    qh, rh = _divmod_small(N >> _LIMB_BITS, b)          # |N >> 30| ≤ 2^33
    ql, r = _divmod_small((rh << _LIMB_BITS) + (N & _LIMB_MASK), b)  # < 2^50 + 2^30
    return qh * (1 << _LIMB_BITS) + ql, r


def _muldiv(X: Tensor, a: int, b: int, c: Tensor) -> Tuple[Tensor, Tensor]:
    """``(floor((X·a + c)/b), (X·a + c) mod b)`` without forming ``X·a`` in int64.

    Exact for any int64 ``X``, ``1 ≤ a, b ≤ 2^20`` and ``0 ≤ c < 2^20`` (the quotient mod 2^64):
    with ``X = H·2^30 + L`` (``0 ≤ L < 2^30``; arithmetic shift and mask are floor div/mod,
    ``|H| ≤ 2^33``), ``H·a = q_h·b + r_h`` (``|H·a| ≤ 2^53``) and
    ``r_h·2^30 + L·a + c = q_l·b + r_l`` (below 2^51), ``X·a + c = (q_h·2^30 + q_l)·b + r_l``.
    """
    qh, rh = _divmod_small((X >> _LIMB_BITS) * a, b)
    ql, r = _divmod_small((rh << _LIMB_BITS) + (X & _LIMB_MASK) * a + c, b)
    return qh * (1 << _LIMB_BITS) + ql, r


def _store(out: Optional[Sequence[Tensor]], X: Tensor, c: Tensor) -> Tuple[Tensor, Tensor]:
    if out is None:
        return X, c
    out[0].copy_(X)
    out[1].copy_(c)
    return out[0], out[1]


def fixedpoint_mul_reference(X: Tensor, c: Tensor, n: int, d: int, floor: int, threshold: int, *,
                             out: Optional[Sequence[Tensor]] = None) -> Tuple[Tensor, Tensor]:
    """Plain-PyTorch :func:`fixedpoint_mul` (no argument checks): returns ``(X', c')``."""
    c = c.masked_fill(c >= threshold, floor)
    qc, e = _divmod(c, n)
    X, r = _muldiv(X, n, d, e)
    return _store(out, X, qc * d + r)


def fixedpoint_unmul_reference(X: Tensor, c: Tensor, n: int, d: int, *,
                               out: Optional[Sequence[Tensor]] = None) -> Tuple[Tensor, Tensor]:
    """Plain-PyTorch :func:`fixedpoint_unmul` (no argument checks): returns ``(X, c)`` before
    the multiplication."""
    qc, r = _divmod(c, d)
    X, e = _muldiv(X, d, n, r)
    return _store(out, X, qc * n + e)


# --------------------------------------------------------------------------------- the checks
def _as_int(value, name: str, op: str) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{op}: {name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ConfigError(f"{op}: {name} must be an integer, got {value!r}") from None


def _check(op: str, X, c, n, d, out) -> Tuple[int, int]:
    if not isinstance(X, Tensor) or not isinstance(c, Tensor):
        raise ShapeError(f"{op}: X and c must be tensors")
    for name, t in (("X", X), ("c", c)):
        if t.dtype != torch.int64:
            raise ShapeError(f"{op}: {name} must be int64 (fixed-point integers), got {t.dtype}")
    if c.shape != X.shape or c.device != X.device:
        raise ShapeError(f"{op}: c must match X ({tuple(X.shape)}, {X.device}); got "
                         f"({tuple(c.shape)}, {c.device})")
    n, d = _as_int(n, "n", op), _as_int(d, "d", op)
    if not 0 < n < d <= MAX_DENOMINATOR:
        raise ConfigError(f"{op}: β = n/d needs integers 0 < n < d ≤ 2^20, got n = {n}, d = {d}")
    if out is not None:
        if not isinstance(out, (tuple, list)) or len(out) != 2 or \
                not all(isinstance(t, Tensor) for t in out):
            raise ShapeError(f"{op}: out must be a pair of tensors (X_out, c_out)")
        for name, t in zip(("X_out", "c_out"), out):
            if t.shape != X.shape or t.dtype != torch.int64 or t.device != X.device:
                raise ShapeError(f"{op}: {name} must match X ({tuple(X.shape)}, int64, {X.device});"
                                 f" got ({tuple(t.shape)}, {t.dtype}, {t.device})")
            if not t.is_contiguous():
                raise ShapeError(f"{op}: {name} must be contiguous")
        if X.numel() and out[0].data_ptr() == out[1].data_ptr():
            raise ShapeError(f"{op}: X_out and c_out must be different tensors")
    return n, d


def _contiguous(name: str, X: Tensor, c: Tensor) -> Tuple[Tensor, Tensor]:
    return (X, c) if name == "reference" else (X.contiguous(), c.contiguous())


# ------------------------------------------------------------------------------- the public ops
def fixedpoint_mul(X: Tensor, c: Tensor, n: int, d: int, *, floor: int,
                   threshold: Optional[int] = None, out: Optional[Sequence[Tensor]] = None,
                   backend: Optional[str] = None) -> Tuple[Tensor, Tensor]:
    """Exact ``X ← X·n/d`` of the information buffer, the destroyed digit kept in ``c``.

    Per element, with floor division: words ``c ≥ threshold`` restart at ``floor`` (the caller
    has already saved them), then ``e = c mod n``, ``X' = (X·n + e) div d``,
    ``r = (X·n + e) mod d`` and ``c' = (c div n)·d + r``. ``X'`` is within one unit of
    ``X·β`` (β = n/d); ``c' > c`` whenever ``c ≥ floor ≥ ⌈(n + (n−1)·d)/(d − n)⌉``.

    Args:
        X: int64 fixed-point states, any shape (usually the flat ``[P]`` vector).
        c: int64 live buffer words, the shape and device of ``X``.
        n, d: β = n/d as Python integers, ``0 < n < d ≤ 2^20``.
        floor: F, the value a restarted word starts from (``1 ≤ floor < threshold``).
        threshold: S, default :func:`spill_threshold` ``(n, d)`` (below it ``c'`` cannot
            overflow); with a larger one ``c'`` may wrap around (mod 2^64, as the reference does).
        out: optional pair ``(X_out, c_out)`` of contiguous int64 tensors shaped like ``X``; each
            may be ``X`` or ``c`` itself (in place), but they must not overlap otherwise.
        backend: force ``"reference"``, ``"cpp"``, ``"triton"`` or ``"cuda"`` (default: the
            :func:`fastdistill._backend.use_backend` context, ``FASTDISTILL_BACKEND``, or auto).
    Returns:
        ``(X', c')``: new contiguous tensors (``out`` when given).
    Raises:
        ShapeError: non-int64 or mismatched tensors, a bad ``out``.
        ConfigError: ``n``/``d``/``floor``/``threshold`` not integers in range.
        BackendUnavailableError: the forced backend cannot run here.

    Non-contiguous ``X``/``c`` are copied to contiguous memory first.

    Example::

        >>> import torch
        >>> from fastdistill.ops.fixedpoint_mul import fixedpoint_mul, fixedpoint_unmul
        >>> X, c = torch.tensor([1000, -1000]), torch.tensor([89, 89])
        >>> X9, c9 = fixedpoint_mul(X, c, 9, 10, floor=89)
        >>> X9, c9
        (tensor([ 900, -900]), tensor([98, 98]))
        >>> [torch.equal(a, b) for a, b in zip(fixedpoint_unmul(X9, c9, 9, 10), (X, c))]
        [True, True]
    """
    op = "fixedpoint_mul"
    n, d = _check(op, X, c, n, d, out)
    floor = _as_int(floor, "floor", op)
    threshold = spill_threshold(n, d) if threshold is None else _as_int(threshold, "threshold", op)
    if not 1 <= floor < threshold <= _INT64_MAX:
        raise ConfigError(f"{op}: needs integers 1 ≤ floor < threshold ≤ 2^63 − 1, got "
                          f"floor = {floor}, threshold = {threshold}")
    name, fn, _ = _backend.resolve(op, X.device, backend)
    X, c = _contiguous(name, X, c)
    return fn(X, c, n, d, floor, threshold, out)


def fixedpoint_unmul(X: Tensor, c: Tensor, n: int, d: int, *,
                     out: Optional[Sequence[Tensor]] = None,
                     backend: Optional[str] = None) -> Tuple[Tensor, Tensor]:
    """Inverse of :func:`fixedpoint_mul`: recover the ``(X, c)`` it was given (``c`` after the
    restart), popping the digit it pushed.

    Per element, with floor division: ``r = c mod d``, ``X' = (X·d + r) div n``,
    ``e = (X·d + r) mod n`` and ``c' = (c div d)·n + e``. Arguments, ``out``, ``backend``,
    returns and errors as for :func:`fixedpoint_mul` (no ``floor``/``threshold``: detecting and
    refilling restarted words is the caller's job).

    Example::

        >>> import torch
        >>> from fastdistill.ops.fixedpoint_mul import fixedpoint_unmul
        >>> fixedpoint_unmul(torch.tensor([900, -900]), torch.tensor([98, 98]), 9, 10)
        (tensor([ 1000, -1000]), tensor([89, 89]))
    """
    op = "fixedpoint_unmul"
    n, d = _check(op, X, c, n, d, out)
    name, fn, _ = _backend.resolve(op, X.device, backend)
    X, c = _contiguous(name, X, c)
    return fn(X, c, n, d, out)


# ----------------------------------------------------------------------- reference backend
def _run_mul_reference(X, c, n, d, floor, threshold, out):
    return fixedpoint_mul_reference(X, c, n, d, floor, threshold, out=out)


def _run_unmul_reference(X, c, n, d, out):
    return fixedpoint_unmul_reference(X, c, n, d, out=out)


_backend.register("fixedpoint_mul", "reference", None, _run_mul_reference)
_backend.register("fixedpoint_unmul", "reference", None, _run_unmul_reference)


# ------------------------------- cpp / cuda backends: torch.ops.fastdistill.fixedpoint_(un)mul
def _run_mul_dispatcher(X, c, n, d, floor, threshold, out):
    if out is None:
        return torch.ops.fastdistill.fixedpoint_mul.default(X, c, n, d, floor, threshold)
    torch.ops.fastdistill.fixedpoint_mul_out.default(X, c, n, d, floor, threshold, out[0], out[1])
    return out[0], out[1]


def _run_unmul_dispatcher(X, c, n, d, out):
    if out is None:
        return torch.ops.fastdistill.fixedpoint_unmul.default(X, c, n, d)
    torch.ops.fastdistill.fixedpoint_unmul_out.default(X, c, n, d, out[0], out[1])
    return out[0], out[1]


def _register_fakes() -> None:
    """Fake (meta) kernels: shape propagation for opcheck / torch.compile. No autograd: int64."""

    def _same(X, c):
        torch._check(c.shape == X.shape, lambda: "fixedpoint_mul: c must match X")

    @torch.library.register_fake("fastdistill::fixedpoint_mul")
    def _fake_mul(X, c, n, d, floor, threshold):
        _same(X, c)
        return torch.empty_like(X), torch.empty_like(c)

    @torch.library.register_fake("fastdistill::fixedpoint_mul_out")
    def _fake_mul_out(X, c, n, d, floor, threshold, X_out, c_out):
        _same(X, c)

    @torch.library.register_fake("fastdistill::fixedpoint_unmul")
    def _fake_unmul(X, c, n, d):
        _same(X, c)
        return torch.empty_like(X), torch.empty_like(c)

    @torch.library.register_fake("fastdistill::fixedpoint_unmul_out")
    def _fake_unmul_out(X, c, n, d, X_out, c_out):
        _same(X, c)


if _backend.has_kernel("fastdistill::fixedpoint_mul", "CPU"):
    _register_fakes()


_backend.register_extension("fixedpoint_mul", _run_mul_dispatcher)
_backend.register_extension("fixedpoint_unmul", _run_unmul_dispatcher)


# ------------------------------------------------------------------------------ triton backend
def _run_mul_triton(X, c, n, d, floor, threshold, out):
    from .._kernels.fixedpoint_mul import fixedpoint_mul as launch
    return launch(X, c, n, d, floor, threshold, *(out if out is not None else (None, None)))


def _run_unmul_triton(X, c, n, d, out):
    from .._kernels.fixedpoint_mul import fixedpoint_unmul as launch
    return launch(X, c, n, d, *(out if out is not None else (None, None)))


_backend.register("fixedpoint_mul", "triton", {"cuda", "cpu"}, _run_mul_triton)
_backend.register("fixedpoint_unmul", "triton", {"cuda", "cpu"}, _run_unmul_triton)
