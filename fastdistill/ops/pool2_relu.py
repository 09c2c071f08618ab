"""``pool2_relu``: LeNet's conv epilogue -- 2×2 max-pool, + bias, ReLU -- with its tangent and
adjoint, for the batched engine's planes ``z [P, M, H, W]`` (P = networks × channels, M images).

Maths (one plane, pooled position o with window w(o))::

    forward   a_o   = relu(max_{u ∈ w(o)} z_u + b),  idx_o = argmax (first maximum in scan order,
              exactly max_pool2d(return_indices=True)'s subgradient; so pool-then-ReLU equals
              ReLU-then-pool in values and in gradients)
    tangent   ȧ_o   = (ż_{idx_o} + ḃ) · [a_o > 0]
    backward  ∂z_u  = Σ_o [u = idx_o] · d_o · [a_o > 0],   ∂b = Σ_o d_o · [a_o > 0]

Adding the bias after the pool is exact: a per-plane constant does not move the maximum.
:func:`pool2_relu_reference` & co. are the specification and the fallback; the ``cpp`` and
``cuda`` backends (``torch.ops.fastdistill.pool2_relu*``) and the ``triton`` backend
(``kernels/pool2_relu.py``) fuse each into one pass. The forward and the tangent round exactly
like the references; the backward's bias sum runs in a fixed order of its own (equal to the
reference's ``sum`` to round-off). The three ops are each other's adjoints (the tangent's VJP is
the backward, the backward's VJP is the tangent), which is how the triton backend differentiates
them, to any order.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _backend
from ..errors import ShapeError
from ._autograd import needs_grad

__all__ = ["pool2_relu", "pool2_relu_reference", "pool2_relu_tangent",
           "pool2_relu_tangent_reference", "pool2_relu_backward", "pool2_relu_backward_reference"]

OPS = ("pool2_relu", "pool2_relu_tangent", "pool2_relu_backward")
_DTYPES = (torch.float32, torch.float64)


# -------------------------------------------------------------------------------- references
def pool2_relu_reference(z: Tensor, bias: Tensor) -> Tuple[Tensor, Tensor]:
    """``(a [P, M, H/2, W/2], idx int64)`` from ``z [P, M, H, W]`` and ``bias [P]``."""
    p, idx = F.max_pool2d(z, 2, return_indices=True)
    p = p + bias.reshape(-1, 1, 1, 1)
    return p * (p > 0), idx


def pool2_relu_tangent_reference(zd: Tensor, bias_d: Tensor, idx: Tensor, a: Tensor) -> Tensor:
    """``ȧ = (ż[idx] + ḃ) · [a > 0]``."""
    P, M = a.shape[:2]
    pd = zd.reshape(P, M, -1).gather(2, idx.reshape(P, M, -1)).reshape(a.shape)
    return (pd + bias_d.reshape(-1, 1, 1, 1)) * (a > 0)


def pool2_relu_backward_reference(d: Tensor, idx: Tensor, a: Tensor) -> Tuple[Tensor, Tensor]:
    """For S stacked gradients ``d [S, P, M, h, w]``: ``(dz [S, P, M, 2h, 2w], dbias [S, P])``."""
    S = d.shape[0]
    P, M, h, w = a.shape
    dm = d * (a > 0)
    dz = torch.zeros((S, P, M, 4 * h * w), dtype=d.dtype, device=d.device)
    dz.scatter_(3, idx.reshape(1, P, M, -1).expand(S, P, M, h * w), dm.reshape(S, P, M, -1))
    return dz.reshape(S, P, M, 2 * h, 2 * w), dm.reshape(S, P, -1).sum(2)


# ------------------------------------------------------------------------------------ public
def _check_float(t: Tensor, name: str, op: str, dim: int):
    if not isinstance(t, Tensor) or t.dim() != dim or t.dtype not in _DTYPES:
        raise ShapeError(f"{op}: {name} must be a float32/float64 tensor with {dim} dimensions, got "
                         f"{getattr(t, 'dtype', type(t))} {list(getattr(t, 'shape', []))}")


def _check_bias(b: Tensor, name: str, op: str, ref: Tensor):
    if b.shape != (ref.shape[0],) or b.dtype != ref.dtype or b.device != ref.device:
        raise ShapeError(f"{op}: {name} must be [{ref.shape[0]}] ({ref.dtype}, {ref.device}), got "
                         f"{list(b.shape)} ({b.dtype}, {b.device})")


def _check_pair(idx: Tensor, a: Tensor, op: str):
    _check_float(a, "a", op, 4)
    if idx.shape != a.shape or idx.dtype != torch.long or idx.device != a.device:
        raise ShapeError(f"{op}: idx must be pool2_relu's int64 argmax with a's shape {list(a.shape)},"
                         f" got {idx.dtype} {list(idx.shape)}")


def _run(op: str, device, backend, *args):
    name, fn, _ = _backend.resolve(op, device, backend)
    if name != "reference":
        args = tuple(t.contiguous() for t in args)
    return fn(*args)


def pool2_relu(z: Tensor, bias: Tensor, *, backend: Optional[str] = None) -> Tuple[Tensor, Tensor]:
    """2×2 max-pool + bias + ReLU with argmax (see the module docstring).

    Args:
        z: ``[P, M, H, W]`` pre-pool conv outputs (H, W even), float32/float64.
        bias: ``[P]``, one per plane.
        backend: force ``"reference"``, ``"cpp"``, ``"cuda"`` or ``"triton"`` (default: the
            registry's choice).
    Returns:
        ``(a, idx)``: ``[P, M, H/2, W/2]`` activations and the int64 flat argmax in each H×W plane.
    Raises:
        ShapeError: wrong shapes or dtypes; BackendUnavailableError: a forced backend cannot run.

    Example::

        >>> import torch
        >>> a, idx = pool2_relu(torch.tensor([[[[1., -2.], [3., 0.]]]]), torch.tensor([-1.]))
        >>> a.flatten().tolist(), idx.flatten().tolist()
        ([2.0], [2])
    """
    _check_float(z, "z", "pool2_relu", 4)
    if z.shape[2] % 2 or z.shape[3] % 2:
        raise ShapeError(f"pool2_relu: H and W must be even, got {list(z.shape)}")
    _check_bias(bias, "bias", "pool2_relu", z)
    return _run("pool2_relu", z.device, backend, z, bias)


def pool2_relu_tangent(zd: Tensor, bias_d: Tensor, idx: Tensor, a: Tensor, *,
                       backend: Optional[str] = None) -> Tensor:
    """Forward-mode tangent ``ȧ`` of :func:`pool2_relu` at the point that gave ``(a, idx)``."""
    _check_pair(idx, a, "pool2_relu_tangent")
    _check_float(zd, "zd", "pool2_relu_tangent", 4)
    P, M, h, w = a.shape
    if zd.shape != (P, M, 2 * h, 2 * w) or zd.dtype != a.dtype:
        raise ShapeError(f"pool2_relu_tangent: zd must be [{P}, {M}, {2 * h}, {2 * w}] {a.dtype}, got "
                         f"{zd.dtype} {list(zd.shape)}")
    _check_bias(bias_d, "bias_d", "pool2_relu_tangent", a)
    return _run("pool2_relu_tangent", a.device, backend, zd, bias_d, idx, a)


def pool2_relu_backward(d: Tensor, idx: Tensor, a: Tensor, *,
                        backend: Optional[str] = None) -> Tuple[Tensor, Tensor]:
    """Adjoint of :func:`pool2_relu` for S stacked output gradients.

    Args:
        d: ``[S, P, M, h, w]`` gradients with respect to ``a`` (S = 1, or 2 for a value and its
            tangent).
        idx, a: what :func:`pool2_relu` returned.
    Returns:
        ``(dz [S, P, M, 2h, 2w], dbias [S, P])``.
    """
    _check_pair(idx, a, "pool2_relu_backward")
    _check_float(d, "d", "pool2_relu_backward", 5)
    if d.shape[1:] != a.shape or d.dtype != a.dtype:
        raise ShapeError(f"pool2_relu_backward: d must be [S, {', '.join(map(str, a.shape))}] "
                         f"{a.dtype}, got {d.dtype} {list(d.shape)}")
    return _run("pool2_relu_backward", a.device, backend, d, idx, a)


# ----------------------------------------------------------------------------------- backends
_backend.register("pool2_relu", "reference", None, pool2_relu_reference)
_backend.register("pool2_relu_tangent", "reference", None, pool2_relu_tangent_reference)
_backend.register("pool2_relu_backward", "reference", None, pool2_relu_backward_reference)


def _register_extension_ops() -> None:
    """Fake kernels and the autograd of the C++ forward (its backward is the C++ adjoint)."""

    @torch.library.register_fake("fastdistill::pool2_relu")
    def _fake(z, bias):
        P, M, H, W = z.shape
        return z.new_empty((P, M, H // 2, W // 2)), z.new_empty((P, M, H // 2, W // 2), dtype=torch.long)

    @torch.library.register_fake("fastdistill::pool2_relu_tangent")
    def _fake_tangent(zd, bias_d, idx, a):
        return torch.empty_like(a)

    @torch.library.register_fake("fastdistill::pool2_relu_backward")
    def _fake_backward(d, idx, a):
        S, P, M, h, w = d.shape
        return d.new_empty((S, P, M, 2 * h, 2 * w)), d.new_empty((S, P))

    def _ctx(ctx, inputs, output):
        a, idx = output
        ctx.save_for_backward(idx, a)
        ctx.mark_non_differentiable(idx)

    def _bw(ctx, grad_a, grad_idx):
        idx, a = ctx.saved_tensors
        dz, db = torch.ops.fastdistill.pool2_relu_backward(grad_a.contiguous().unsqueeze(0), idx, a)
        return dz[0], db[0]

    torch.library.register_autograd("fastdistill::pool2_relu", _bw, setup_context=_ctx)


if _backend.has_kernel("fastdistill::pool2_relu", "CPU"):
    _register_extension_ops()
for _op in OPS:
    _backend.register_extension(_op)


# ------------------------------------------------------------------------------ triton backend
# The three ops are mutual adjoints (idx and the ReLU mask are constant almost everywhere):
# VJP(forward) = backward, VJP(tangent) = backward, VJP(backward) = the tangent per stack entry.
# Each triton op is an autograd.Function whose backward calls another one, so the backward is
# itself differentiable (double backward through pool2_relu works as with the reference).


class _TritonPool2Relu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, bias):
        from .._kernels.pool2_relu import pool2_relu as launch
        a, idx = launch(z, bias)
        ctx.save_for_backward(idx, a)
        ctx.mark_non_differentiable(idx)
        return a, idx

    @staticmethod
    def backward(ctx, grad_a, grad_idx):
        idx, a = ctx.saved_tensors
        dz, db = _triton_backward(grad_a.contiguous().unsqueeze(0), idx, a)
        return dz[0], db[0]


class _TritonPool2ReluTangent(torch.autograd.Function):
    @staticmethod
    def forward(ctx, zd, bias_d, idx, a):
        from .._kernels.pool2_relu import pool2_relu_tangent as launch
        ctx.save_for_backward(idx, a)
        return launch(zd, bias_d, idx, a)

    @staticmethod
    def backward(ctx, grad):
        idx, a = ctx.saved_tensors
        dz, db = _triton_backward(grad.contiguous().unsqueeze(0), idx, a)
        return dz[0], db[0], None, None


class _TritonPool2ReluBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, d, idx, a):
        from .._kernels.pool2_relu import pool2_relu_backward as launch
        ctx.save_for_backward(idx, a)
        return launch(d, idx, a)

    @staticmethod
    def backward(ctx, grad_dz, grad_db):
        idx, a = ctx.saved_tensors
        S = grad_dz.shape[0]
        grad_dz, grad_db = grad_dz.contiguous(), grad_db.contiguous()
        dd = torch.stack([_triton_tangent(grad_dz[s], grad_db[s], idx, a) for s in range(S)])
        return dd, None, None


def _triton_forward(z, bias):
    if needs_grad(z, bias):
        return _TritonPool2Relu.apply(z, bias)
    from .._kernels.pool2_relu import pool2_relu as launch
    return launch(z, bias)


def _triton_tangent(zd, bias_d, idx, a):
    if needs_grad(zd, bias_d):
        return _TritonPool2ReluTangent.apply(zd, bias_d, idx, a)
    from .._kernels.pool2_relu import pool2_relu_tangent as launch
    return launch(zd, bias_d, idx, a)


def _triton_backward(d, idx, a):
    if needs_grad(d):
        return _TritonPool2ReluBackward.apply(d, idx, a)
    from .._kernels.pool2_relu import pool2_relu_backward as launch
    return launch(d, idx, a)


_backend.register("pool2_relu", "triton", {"cuda", "cpu"}, _triton_forward)
_backend.register("pool2_relu_tangent", "triton", {"cuda", "cpu"}, _triton_tangent)
_backend.register("pool2_relu_backward", "triton", {"cuda", "cpu"}, _triton_backward)
