"""``lrn``: local response normalisation across channels (AlexCifarNet's ``F.local_response_norm``)
with its tangent (JVP) and adjoint (VJP), on the batched engine's planes viewed as
``x [B, C, M, H, W]`` (B networks, C channels normalised over, M images).

Layout: the explicit engine keeps conv outputs as planes ``z [P, M, H, W]`` with P = B·C in
(network, channel) order, so ``z.view(B, C, M, H, W)`` is free and normalising over dim 1 never
crosses networks. ``F.local_response_norm`` treats dim 1 of any ≥ 3-D tensor as the channels,
so on this layout the reference *is* PyTorch's function, unchanged.

Maths (one column x_0..x_{C−1} over the channels at a fixed (b, m, y, x); n = ``size``,
a = α/n, β = ``beta``, κ = ``k``). PyTorch pads n//2 channels before and (n−1)//2 after, so the
window of channel c is W(c) = {c − n//2, …, c + (n−1)//2} ∩ [0, C) (n = 4: c−2..c+1)::

    s_c = Σ_{j ∈ W(c)} x_j²,   t_c = κ + a·s_c,   D_c = t_c^β,   y_c = x_c / D_c

    tangent (JVP), from ∂y_c/∂x_j = [j = c]/D_c − 2aβ · x_c t_c^{−β−1} · x_j · [j ∈ W(c)]:
        ẏ_c = ẋ_c / D_c − 2aβ · (y_c / t_c) · Σ_{j ∈ W(c)} x_j ẋ_j

    backward (VJP), the transpose: j ∈ W(c) ⇔ c ∈ Wᵀ(j) = {j − (n−1)//2, …, j + n//2} ∩ [0, C):
        x̄_j = ȳ_j / D_j − 2aβ · x_j · Σ_{c ∈ Wᵀ(j)} ȳ_c · (y_c / t_c)

The references compute exactly these expressions in plain PyTorch (t as PyTorch does it,
(s/n)·α + κ). The ``cpp`` and ``cuda`` kernels evaluate them in float64 internally for both
dtypes, so a float32 result is rounded once at the end (at least as accurate as PyTorch's own
float32) and a float64 one agrees with the reference to a few ulp: window sums in ascending
channel order, t = κ + (α/n)·s, t^0.75 = √t·√√t when β = 0.75 (two correctly rounded square
roots instead of a ``pow`` call), and 1/D formed once. The backward stacks S cotangents
``[S, B, C, M, H, W]`` and recomputes 1/D and y/t from x once for all S. The ``triton`` backend
(``kernels/lrn.py``) evaluates the same float64 expressions in the same order (t^β =
exp(β·log t) when β ≠ 0.75); it is differentiable to any order: its first derivatives are its
own kernels (the forward's VJP and the tangent's VJP in ẋ are the backward, the backward's VJP
in ȳ is the tangent), and the second-order terms in x (the tangent's and the backward's VJP in
x) go through autograd of the references.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _backend
from ..errors import ShapeError
from ._autograd import needs_grad

__all__ = ["lrn", "lrn_reference", "lrn_tangent", "lrn_tangent_reference", "lrn_backward",
           "lrn_backward_reference", "ALEXCIFARNET_LRN"]

OPS = ("lrn", "lrn_tangent", "lrn_backward")
_DTYPES = (torch.float32, torch.float64)

#: AlexCifarNet's normalisation (fastdistill/models/lenet.py), as keyword arguments of :func:`lrn`.
ALEXCIFARNET_LRN = dict(size=4, alpha=0.001 / 9.0, beta=0.75, k=1.0)


# -------------------------------------------------------------------------------- references
def _window_sum(v: Tensor, dim: int, before: int, after: int) -> Tensor:
    """``out_c = Σ_{j = c − before}^{c + after} v_j`` along ``dim`` (zeros outside), ascending j."""
    C = v.shape[dim]
    pad = [0, 0] * (v.dim() - 1 - dim) + [before, after]
    vp = F.pad(v, pad)
    out = vp.narrow(dim, 0, C)
    for o in range(1, before + after + 1):
        out = out + vp.narrow(dim, o, C)
    return out


def _t_and_d(x: Tensor, size: int, alpha: float, beta: float, k: float, dim: int = 1):
    s = _window_sum(x * x, dim, size // 2, (size - 1) // 2)
    t = (s / size) * alpha + k
    return t, t.pow(beta)


def lrn_reference(x: Tensor, size: int, alpha: float = 1e-4, beta: float = 0.75,
                  k: float = 1.0) -> Tensor:
    """``F.local_response_norm(x, size, alpha, beta, k)`` on ``x [B, C, M, H, W]``."""
    return F.local_response_norm(x.contiguous(), size, alpha, beta, k)


def lrn_tangent_reference(xd: Tensor, x: Tensor, size: int, alpha: float = 1e-4, beta: float = 0.75,
                          k: float = 1.0) -> Tensor:
    """``ẏ = ẋ/D − 2aβ · (y/t) · Σ_{W(c)} x ẋ`` (see the module docstring)."""
    t, d = _t_and_d(x, size, alpha, beta, k)
    sx = _window_sum(x * xd, 1, size // 2, (size - 1) // 2)
    c2 = 2.0 * alpha * beta / size
    return xd / d - c2 * ((x / d) / t) * sx


def lrn_backward_reference(g: Tensor, x: Tensor, size: int, alpha: float = 1e-4, beta: float = 0.75,
                           k: float = 1.0) -> Tensor:
    """For S stacked cotangents ``g [S, B, C, M, H, W]``: ``x̄ = ȳ/D − 2aβ · x · Σ_{Wᵀ(j)} ȳ · y/t``."""
    t, d = _t_and_d(x, size, alpha, beta, k)
    r = _window_sum(g * ((x / d) / t), 2, (size - 1) // 2, size // 2)
    c2 = 2.0 * alpha * beta / size
    return g / d - c2 * x * r


# ------------------------------------------------------------------------------------ public
def _check_x(t: Tensor, name: str, op: str, dim: int = 5):
    if not isinstance(t, Tensor) or t.dim() != dim or t.dtype not in _DTYPES:
        raise ShapeError(f"{op}: {name} must be a float32/float64 tensor with {dim} dimensions "
                         f"({'[S, ' if dim == 6 else '['}B, C, M, H, W]), got "
                         f"{getattr(t, 'dtype', type(t))} {list(getattr(t, 'shape', []))}")


def _check_hyper(op: str, size, alpha, beta, k):
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ShapeError(f"{op}: size must be an int >= 1, got {size!r}")
    for name, v in (("alpha", alpha), ("beta", beta), ("k", k)):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ShapeError(f"{op}: {name} must be a Python number, got {type(v).__name__}")


def _check_like(t: Tensor, name: str, op: str, x: Tensor, shape):
    if tuple(t.shape) != tuple(shape) or t.dtype != x.dtype or t.device != x.device:
        raise ShapeError(f"{op}: {name} must be {list(shape)} ({x.dtype}, {x.device}), got "
                         f"{list(t.shape)} ({t.dtype}, {t.device})")


def _run(op: str, device, backend, *args):
    name, fn, _ = _backend.resolve(op, device, backend)
    if name != "reference":
        args = tuple(t.contiguous() if isinstance(t, Tensor) else t for t in args)
    return fn(*args)


def lrn(x: Tensor, size: int, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0, *,
        backend: Optional[str] = None) -> Tensor:
    """Local response normalisation over dim 1 of ``x [B, C, M, H, W]`` (see the module docstring).

    Args:
        x: ``[B, C, M, H, W]`` float32/float64 (the engine's planes ``[B·C, M, H, W]`` viewed).
        size, alpha, beta, k: as in ``F.local_response_norm`` (AlexCifarNet:
            :data:`ALEXCIFARNET_LRN`, i.e. 4, 0.001/9, 0.75, 1).
        backend: force ``"reference"``, ``"cpp"``, ``"cuda"`` or ``"triton"`` (default: the
            registry's choice).
    Returns:
        ``y`` with x's shape and dtype: ``y_c = x_c / (k + α/n · Σ_{j ∈ W(c)} x_j²)^β``.
    Raises:
        ShapeError: wrong shapes, dtypes or hyper-parameters; BackendUnavailableError: a forced
        backend cannot run.

    Example::

        >>> import torch
        >>> y = lrn(torch.full((1, 3, 1, 1, 1), 2.0), 2, alpha=1.0, beta=1.0, k=1.0)
        >>> y.flatten().tolist()   # channel 0: 2 / (1 + 4/2); channels 1, 2: 2 / (1 + 8/2)
        [0.6666666865348816, 0.4000000059604645, 0.4000000059604645]
    """
    _check_x(x, "x", "lrn")
    _check_hyper("lrn", size, alpha, beta, k)
    return _run("lrn", x.device, backend, x, size, float(alpha), float(beta), float(k))


def lrn_tangent(xd: Tensor, x: Tensor, size: int, alpha: float = 1e-4, beta: float = 0.75,
                k: float = 1.0, *, backend: Optional[str] = None) -> Tensor:
    """Forward-mode tangent ``ẏ`` of :func:`lrn` at ``x`` along ``xd`` (both ``[B, C, M, H, W]``)."""
    _check_x(x, "x", "lrn_tangent")
    _check_like(xd, "xd", "lrn_tangent", x, x.shape)
    _check_hyper("lrn_tangent", size, alpha, beta, k)
    return _run("lrn_tangent", x.device, backend, xd, x, size, float(alpha), float(beta), float(k))


def lrn_backward(g: Tensor, x: Tensor, size: int, alpha: float = 1e-4, beta: float = 0.75,
                 k: float = 1.0, *, backend: Optional[str] = None) -> Tensor:
    """Adjoint of :func:`lrn` at ``x`` for S stacked cotangents.

    Args:
        g: ``[S, B, C, M, H, W]`` gradients with respect to ``y`` (S = 1, or 2 for a value and
            its tangent).
        x: ``[B, C, M, H, W]``, the forward's input.
    Returns:
        ``[S, B, C, M, H, W]``: the gradients with respect to ``x``.
    """
    _check_x(x, "x", "lrn_backward")
    _check_x(g, "g", "lrn_backward", 6)
    _check_like(g, "g", "lrn_backward", x, (g.shape[0],) + tuple(x.shape))
    _check_hyper("lrn_backward", size, alpha, beta, k)
    return _run("lrn_backward", x.device, backend, g, x, size, float(alpha), float(beta), float(k))


# ----------------------------------------------------------------------------------- backends
_backend.register("lrn", "reference", None, lrn_reference)
_backend.register("lrn_tangent", "reference", None, lrn_tangent_reference)
_backend.register("lrn_backward", "reference", None, lrn_backward_reference)


def _register_extension_ops() -> None:
    """Fake kernels and the autograd of the C++ forward (its backward is the C++ adjoint)."""

    @torch.library.register_fake("fastdistill::lrn")
    def _fake(x, size, alpha, beta, k):
        return torch.empty_like(x)

    @torch.library.register_fake("fastdistill::lrn_tangent")
    def _fake_tangent(xd, x, size, alpha, beta, k):
        return torch.empty_like(x)

    @torch.library.register_fake("fastdistill::lrn_backward")
    def _fake_backward(g, x, size, alpha, beta, k):
        return torch.empty_like(g)

    def _ctx(ctx, inputs, output):
        x, ctx.size, ctx.alpha, ctx.beta, ctx.k = inputs
        ctx.save_for_backward(x)

    def _bw(ctx, grad_y):
        (x,) = ctx.saved_tensors
        gx = torch.ops.fastdistill.lrn_backward(grad_y.contiguous().unsqueeze(0), x, ctx.size,
                                                ctx.alpha, ctx.beta, ctx.k)
        return gx[0], None, None, None, None

    torch.library.register_autograd("fastdistill::lrn", _bw, setup_context=_ctx)


if _backend.has_kernel("fastdistill::lrn", "CPU"):
    _register_extension_ops()


for _op in OPS:
    _backend.register_extension(_op)


# ------------------------------------------------------------------------------ triton backend
# First-order derivatives run on the triton kernels: VJP(forward) = backward, VJP of the tangent
# in ẋ = backward, VJP of the backward in ȳ = the tangent per stack entry (the tangent and the
# backward are linear in ẋ / ȳ and each other's transpose). Their dependence on the point x is
# second order (LRN is not linear in x): those VJPs differentiate the plain-PyTorch references
# with autograd (graph kept under create_graph), so the triton backend is differentiable to any
# order, exact in every term.


def _vjp_in_x(reference, v: Tensor, first: Tensor, x: Tensor, hyper) -> Tensor:
    """``∂/∂x ⟨v, reference(first, x, *hyper)⟩`` through autograd of the reference; keeps the
    graph (in ``v``, ``first`` and ``x``) when called under grad mode (``create_graph``)."""
    create = torch.is_grad_enabled()
    with torch.enable_grad():
        if create and x.requires_grad:
            xx, ff, vv = x, first, v
        else:
            xx, ff, vv = x.detach().requires_grad_(True), first.detach(), v.detach()
            create = False
        (gx,) = torch.autograd.grad(reference(ff, xx, *hyper), xx, vv, create_graph=create)
    return gx


class _TritonLrn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, size, alpha, beta, k):
        from .._kernels.lrn import lrn as launch
        ctx.hyper = (size, alpha, beta, k)
        ctx.save_for_backward(x)
        return launch(x, size, alpha, beta, k)

    @staticmethod
    def backward(ctx, grad_y):
        (x,) = ctx.saved_tensors
        gx = _triton_backward(grad_y.contiguous().unsqueeze(0), x, *ctx.hyper)[0]
        return gx, None, None, None, None


class _TritonLrnTangent(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xd, x, size, alpha, beta, k):
        from .._kernels.lrn import lrn_tangent as launch
        ctx.hyper = (size, alpha, beta, k)
        ctx.save_for_backward(xd, x)
        return launch(xd, x, size, alpha, beta, k)

    @staticmethod
    def backward(ctx, grad):
        xd, x = ctx.saved_tensors
        grad = grad.contiguous()
        gxd = gx = None
        if ctx.needs_input_grad[0]:
            gxd = _triton_backward(grad.unsqueeze(0), x, *ctx.hyper)[0]
        if ctx.needs_input_grad[1]:
            gx = _vjp_in_x(lrn_tangent_reference, grad, xd, x, ctx.hyper)
        return gxd, gx, None, None, None, None


class _TritonLrnBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g, x, size, alpha, beta, k):
        from .._kernels.lrn import lrn_backward as launch
        ctx.hyper = (size, alpha, beta, k)
        ctx.save_for_backward(g, x)
        return launch(g, x, size, alpha, beta, k)

    @staticmethod
    def backward(ctx, grad):
        g, x = ctx.saved_tensors
        grad = grad.contiguous()
        gg = gx = None
        if ctx.needs_input_grad[0]:
            gg = torch.stack([_triton_tangent(grad[s], x, *ctx.hyper) for s in range(grad.shape[0])])
        if ctx.needs_input_grad[1]:
            gx = _vjp_in_x(lrn_backward_reference, grad, g, x, ctx.hyper)
        return gg, gx, None, None, None, None


def _triton_forward(x, size, alpha, beta, k):
    if needs_grad(x):
        return _TritonLrn.apply(x, size, alpha, beta, k)
    from .._kernels.lrn import lrn as launch
    return launch(x, size, alpha, beta, k)


def _triton_tangent(xd, x, size, alpha, beta, k):
    if needs_grad(xd, x):
        return _TritonLrnTangent.apply(xd, x, size, alpha, beta, k)
    from .._kernels.lrn import lrn_tangent as launch
    return launch(xd, x, size, alpha, beta, k)


def _triton_backward(g, x, size, alpha, beta, k):
    if needs_grad(g, x):
        return _TritonLrnBackward.apply(g, x, size, alpha, beta, k)
    from .._kernels.lrn import lrn_backward as launch
    return launch(g, x, size, alpha, beta, k)


_backend.register("lrn", "triton", {"cuda", "cpu"}, _triton_forward)
_backend.register("lrn_tangent", "triton", {"cuda", "cpu"}, _triton_tangent)
_backend.register("lrn_backward", "triton", {"cuda", "cpu"}, _triton_backward)
