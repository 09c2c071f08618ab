"""``maxpool3s2``: AlexCifarNet's 3×3 max-pool with stride 2 and padding 1, with its tangent and
adjoint, for the batched engine's planes ``z [P, M, H, W]`` (P = networks × channels, M images).

Maths (one H×W plane, pooled position o = (i, j) with window w(o) = rows 2i−1..2i+1 × columns
2j−1..2j+1, clipped to the image; the padding never wins, as in ``F.max_pool2d(z, 3, 2, 1)``)::

    forward   p_o  = max_{u ∈ w(o)} z_u,   idx_o = argmax: the first maximum in row-major scan
              order, except that a NaN is taken whenever it is met (the last NaN of the window
              wins) -- exactly max_pool2d(return_indices=True)'s rule and index convention
              (flat index into the H×W plane)
    tangent   ṗ_o  = ż_{idx_o}
    backward  ∂z_u = Σ_{o : idx_o = u} d_o        (windows overlap: up to 4 terms per pixel)

Output size: h = ⌊(H − 1)/2⌋ + 1 (so 32 → 16, 16 → 8, 1 → 1). In the backward each input
pixel u sums d over the windows it won (≤ 4: the 2×2 windows that can cover it) in ascending
(i, j) order from +0 -- the order in which the reference's ``scatter_add_`` (and max_pool2d's own
backward) accumulate -- with no atomics: the CUDA kernel gathers (one thread per pixel), the
CPU kernel gives each task whole planes and adds their windows in order, so both equal the
reference bitwise and are deterministic. ``idx`` must be what the forward returned (every index
inside its own window); the CUDA gather ignores any other. :func:`maxpool3s2_reference` & co.
are the specification and the fallback; the ``cpp`` and ``cuda`` backends are
``torch.ops.fastdistill.maxpool3s2*``; the ``triton`` backend (``kernels/maxpool3s2.py``) runs
the same rules (the forward's scan, a per-pixel gather in ascending window order for the
backward, no atomics), so it too equals the reference bitwise and is deterministic. Its three
ops are each other's adjoints (the forward's and the tangent's VJP is the backward, the
backward's VJP is the tangent), which is how the triton backend differentiates them, to any
order.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _backend
from ..errors import ShapeError
from ._autograd import needs_grad

__all__ = ["maxpool3s2", "maxpool3s2_reference", "maxpool3s2_tangent", "maxpool3s2_tangent_reference",
           "maxpool3s2_backward", "maxpool3s2_backward_reference", "pooled_size"]

OPS = ("maxpool3s2", "maxpool3s2_tangent", "maxpool3s2_backward")
_DTYPES = (torch.float32, torch.float64)


def pooled_size(n: int) -> int:
    """Output side of a 3×3, stride 2, padding 1 pool over ``n`` pixels: ``⌊(n − 1)/2⌋ + 1``."""
    return (n - 1) // 2 + 1


# -------------------------------------------------------------------------------- references
def maxpool3s2_reference(z: Tensor) -> Tuple[Tensor, Tensor]:
    """``(p [P, M, h, w], idx int64)`` = ``F.max_pool2d(z, 3, 2, 1, return_indices=True)``."""
    return F.max_pool2d(z, 3, 2, 1, return_indices=True)


def maxpool3s2_tangent_reference(zd: Tensor, idx: Tensor) -> Tensor:
    """``ṗ = ż[idx]`` (a gather in each H×W plane)."""
    P, M, h, w = idx.shape
    return zd.reshape(P, M, zd.shape[2] * zd.shape[3]).gather(2, idx.reshape(P, M, h * w)).reshape(idx.shape)


def maxpool3s2_backward_reference(d: Tensor, idx: Tensor, H: int, W: int) -> Tensor:
    """For S stacked gradients ``d [S, P, M, h, w]``: ``dz [S, P, M, H, W]``."""
    S = d.shape[0]
    P, M, h, w = idx.shape
    dz = torch.zeros((S, P, M, H * W), dtype=d.dtype, device=d.device)
    dz.scatter_add_(3, idx.reshape(1, P, M, h * w).expand(S, P, M, h * w), d.reshape(S, P, M, h * w))
    return dz.reshape(S, P, M, H, W)


# ------------------------------------------------------------------------------------ public
def _check_float(t: Tensor, name: str, op: str, dim: int):
    if not isinstance(t, Tensor) or t.dim() != dim or t.dtype not in _DTYPES:
        raise ShapeError(f"{op}: {name} must be a float32/float64 tensor with {dim} dimensions, got "
                         f"{getattr(t, 'dtype', type(t))} {list(getattr(t, 'shape', []))}")


def _check_idx(idx: Tensor, op: str, like: Tensor):
    if (not isinstance(idx, Tensor) or idx.dim() != 4 or idx.dtype != torch.long
            or idx.device != like.device):
        raise ShapeError(f"{op}: idx must be maxpool3s2's int64 argmax [P, M, h, w] on {like.device},"
                         f" got {getattr(idx, 'dtype', type(idx))} {list(getattr(idx, 'shape', []))}")


def _run(op: str, device, backend, *args):
    name, fn, _ = _backend.resolve(op, device, backend)
    if name != "reference":
        args = tuple(t.contiguous() if isinstance(t, Tensor) else t for t in args)
    return fn(*args)


def maxpool3s2(z: Tensor, *, backend: Optional[str] = None) -> Tuple[Tensor, Tensor]:
    """3×3 max-pool, stride 2, padding 1, with argmax (see the module docstring).

    Args:
        z: ``[P, M, H, W]`` planes (H, W ≥ 1), float32/float64.
        backend: force ``"reference"``, ``"cpp"``, ``"cuda"`` or ``"triton"`` (default: the
            registry's choice).
    Returns:
        ``(p, idx)``: ``[P, M, h, w]`` maxima (h = ⌊(H − 1)/2⌋ + 1) and the int64 flat argmax in
        each H×W plane, both equal to ``F.max_pool2d(z, 3, 2, 1, return_indices=True)``.
    Raises:
        ShapeError: wrong shapes or dtypes; BackendUnavailableError: a forced backend cannot run.

    Example::

        >>> import torch
        >>> p, idx = maxpool3s2(torch.arange(9.).reshape(1, 1, 3, 3))
        >>> p.flatten().tolist(), idx.flatten().tolist()
        ([4.0, 5.0, 7.0, 8.0], [4, 5, 7, 8])
    """
    _check_float(z, "z", "maxpool3s2", 4)
    if z.shape[2] < 1 or z.shape[3] < 1:
        raise ShapeError(f"maxpool3s2: H and W must be >= 1, got {list(z.shape)}")
    return _run("maxpool3s2", z.device, backend, z)


def maxpool3s2_tangent(zd: Tensor, idx: Tensor, *, backend: Optional[str] = None) -> Tensor:
    """Forward-mode tangent ``ṗ = ż[idx]`` of :func:`maxpool3s2` at the point that gave ``idx``.

    Args:
        zd: ``[P, M, H, W]`` tangent of the input.
        idx: ``[P, M, h, w]`` int64, what :func:`maxpool3s2` returned, h = ⌊(H − 1)/2⌋ + 1.
    Returns:
        ``[P, M, h, w]`` with zd's dtype.
    """
    _check_float(zd, "zd", "maxpool3s2_tangent", 4)
    _check_idx(idx, "maxpool3s2_tangent", zd)
    P, M, H, W = zd.shape
    want = (P, M, pooled_size(H), pooled_size(W))
    if tuple(idx.shape) != want:
        raise ShapeError(f"maxpool3s2_tangent: idx must be {list(want)} for zd {list(zd.shape)}, got "
                         f"{list(idx.shape)}")
    return _run("maxpool3s2_tangent", zd.device, backend, zd, idx)


def maxpool3s2_backward(d: Tensor, idx: Tensor, H: int, W: int, *,
                        backend: Optional[str] = None) -> Tensor:
    """Adjoint of :func:`maxpool3s2` for S stacked output gradients.

    Args:
        d: ``[S, P, M, h, w]`` gradients with respect to the pooled output (S = 1, or 2 for a
            value and its tangent).
        idx: ``[P, M, h, w]`` int64, what :func:`maxpool3s2` returned.
        H, W: the input plane's size (h = ⌊(H − 1)/2⌋ + 1 must hold, likewise for w).
    Returns:
        ``dz [S, P, M, H, W]``: ``dz_u = Σ_{o : idx_o = u} d_o``, summed in ascending o.
    """
    _check_float(d, "d", "maxpool3s2_backward", 5)
    _check_idx(idx, "maxpool3s2_backward", d)
    if d.shape[1:] != idx.shape:
        raise ShapeError(f"maxpool3s2_backward: d must be [S, {', '.join(map(str, idx.shape))}] "
                         f"(idx's shape), got {list(d.shape)}")
    if (not isinstance(H, int) or not isinstance(W, int) or H < 1 or W < 1
            or (pooled_size(H), pooled_size(W)) != tuple(idx.shape[2:])):
        raise ShapeError(f"maxpool3s2_backward: an H×W = {H}×{W} input does not pool to "
                         f"{idx.shape[2]}×{idx.shape[3]} (h = (H - 1) // 2 + 1)")
    return _run("maxpool3s2_backward", d.device, backend, d, idx, H, W)


# ----------------------------------------------------------------------------------- backends
_backend.register("maxpool3s2", "reference", None, maxpool3s2_reference)
_backend.register("maxpool3s2_tangent", "reference", None, maxpool3s2_tangent_reference)
_backend.register("maxpool3s2_backward", "reference", None, maxpool3s2_backward_reference)


def _register_extension_ops() -> None:
    """Fake kernels and the autograd of the C++ ops (each backward is a C++ op)."""

    @torch.library.register_fake("fastdistill::maxpool3s2")
    def _fake(z):
        P, M, H, W = z.shape
        shape = (P, M, (H - 1) // 2 + 1, (W - 1) // 2 + 1)
        return z.new_empty(shape), z.new_empty(shape, dtype=torch.long)

    @torch.library.register_fake("fastdistill::maxpool3s2_tangent")
    def _fake_tangent(zd, idx):
        return zd.new_empty(idx.shape)

    @torch.library.register_fake("fastdistill::maxpool3s2_backward")
    def _fake_backward(d, idx, H, W):
        S, P, M = d.shape[:3]
        return d.new_empty((S, P, M, H, W))

    def _ctx(ctx, inputs, output):
        (z,) = inputs
        ctx.H, ctx.W = z.shape[2], z.shape[3]
        ctx.save_for_backward(output[1])
        ctx.mark_non_differentiable(output[1])

    def _bw(ctx, grad_p, grad_idx):
        (idx,) = ctx.saved_tensors
        dz = torch.ops.fastdistill.maxpool3s2_backward(grad_p.contiguous().unsqueeze(0), idx, ctx.H, ctx.W)
        return dz[0]

    torch.library.register_autograd("fastdistill::maxpool3s2", _bw, setup_context=_ctx)

    # The tangent (a gather) and the backward (a gather-sum) are linear in their float input and
    # each other's adjoint, so both are differentiable to any order.
    def _ctx_tangent(ctx, inputs, output):
        zd, idx = inputs
        ctx.H, ctx.W = zd.shape[2], zd.shape[3]
        ctx.save_for_backward(idx)

    def _bw_tangent(ctx, grad_pd):
        (idx,) = ctx.saved_tensors
        dz = torch.ops.fastdistill.maxpool3s2_backward(grad_pd.contiguous().unsqueeze(0), idx, ctx.H, ctx.W)
        return dz[0], None

    def _ctx_backward(ctx, inputs, output):
        ctx.save_for_backward(inputs[1])

    def _bw_backward(ctx, grad_dz):
        (idx,) = ctx.saved_tensors
        S, P, M, H, W = grad_dz.shape
        planes = grad_dz.contiguous().view(S * P, M, H, W)
        gd = torch.ops.fastdistill.maxpool3s2_tangent(planes, idx.repeat(S, 1, 1, 1))
        return gd.view((S,) + tuple(idx.shape)), None, None, None

    torch.library.register_autograd("fastdistill::maxpool3s2_tangent", _bw_tangent,
                                    setup_context=_ctx_tangent)
    torch.library.register_autograd("fastdistill::maxpool3s2_backward", _bw_backward,
                                    setup_context=_ctx_backward)


if _backend.has_kernel("fastdistill::maxpool3s2", "CPU"):
    _register_extension_ops()


for _op in OPS:
    _backend.register_extension(_op)


# ------------------------------------------------------------------------------ triton backend
# The three ops are mutual adjoints (idx is constant almost everywhere): VJP(forward) = backward,
# VJP(tangent) = backward, VJP(backward) = the tangent per stack entry. Each triton op is an
# autograd.Function whose backward calls another one, so the triton backend is differentiable to
# any order (double backward through maxpool3s2 works as with the reference).


class _TritonMaxpool3s2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z):
        from .._kernels.maxpool3s2 import maxpool3s2 as launch
        p, idx = launch(z)
        ctx.H, ctx.W = z.shape[2], z.shape[3]
        ctx.save_for_backward(idx)
        ctx.mark_non_differentiable(idx)
        return p, idx

    @staticmethod
    def backward(ctx, grad_p, grad_idx):
        (idx,) = ctx.saved_tensors
        return _triton_backward(grad_p.contiguous().unsqueeze(0), idx, ctx.H, ctx.W)[0]


class _TritonMaxpool3s2Tangent(torch.autograd.Function):
    @staticmethod
    def forward(ctx, zd, idx):
        from .._kernels.maxpool3s2 import maxpool3s2_tangent as launch
        ctx.H, ctx.W = zd.shape[2], zd.shape[3]
        ctx.save_for_backward(idx)
        return launch(zd, idx)

    @staticmethod
    def backward(ctx, grad):
        (idx,) = ctx.saved_tensors
        return _triton_backward(grad.contiguous().unsqueeze(0), idx, ctx.H, ctx.W)[0], None


class _TritonMaxpool3s2Backward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, d, idx, H, W):
        from .._kernels.maxpool3s2 import maxpool3s2_backward as launch
        ctx.save_for_backward(idx)
        return launch(d, idx, H, W)

    @staticmethod
    def backward(ctx, grad_dz):
        (idx,) = ctx.saved_tensors
        grad_dz = grad_dz.contiguous()
        dd = torch.stack([_triton_tangent(grad_dz[s], idx) for s in range(grad_dz.shape[0])])
        return dd, None, None, None


def _triton_forward(z):
    if needs_grad(z):
        return _TritonMaxpool3s2.apply(z)
    from .._kernels.maxpool3s2 import maxpool3s2 as launch
    return launch(z)


def _triton_tangent(zd, idx):
    if needs_grad(zd):
        return _TritonMaxpool3s2Tangent.apply(zd, idx)
    from .._kernels.maxpool3s2 import maxpool3s2_tangent as launch
    return launch(zd, idx)


def _triton_backward(d, idx, H, W):
    if needs_grad(d):
        return _TritonMaxpool3s2Backward.apply(d, idx, H, W)
    from .._kernels.maxpool3s2 import maxpool3s2_backward as launch
    return launch(d, idx, H, W)


_backend.register("maxpool3s2", "triton", {"cuda", "cpu"}, _triton_forward)
_backend.register("maxpool3s2_tangent", "triton", {"cuda", "cpu"}, _triton_tangent)
_backend.register("maxpool3s2_backward", "triton", {"cuda", "cpu"}, _triton_backward)
