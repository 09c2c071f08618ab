"""``gd_update``: the plain-GD inner-loop step ``θ_{t+1} = θ_t − η_t g_t`` in one pass.

:func:`gd_update_reference` is the specification, the fallback and the test oracle;
:func:`gd_update` checks its arguments once, picks a backend through
:mod:`fastdistill._backend` (reference / cpp / triton / cuda) and records which one ran.
Every backend is bitwise equal to the reference (no fused multiply-add) and differentiable in
θ, g and η to any order (the backward is plain PyTorch, so the double backward of the
back-gradient engine works through it).
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from .. import _backend
from ..errors import ConfigError, ShapeError

__all__ = ["gd_update", "gd_update_reference"]

OP = "gd_update"
_DTYPES = (torch.float32, torch.float64)


def gd_update_reference(theta: Tensor, grad: Tensor, lr: Tensor, *,
                        out: Optional[Tensor] = None) -> Tensor:
    """Plain-PyTorch ``theta − lr · grad`` (differentiable; ``out=`` like ``torch.sub``)."""
    if out is None:
        return theta - lr * grad
    return torch.sub(theta, lr * grad, out=out)


def gd_update(theta: Tensor, grad: Tensor, lr: Union[Tensor, float], *,
              out: Optional[Tensor] = None, backend: Optional[str] = None) -> Tensor:
    """One gradient-descent step ``θ_{t+1} = θ_t − η_t g_t`` (DD's inner update).

    Args:
        theta: θ_t, any shape (usually the flat ``[P]`` parameter vector); float32 or float64.
        grad: g_t = ∇_θ ℓ(θ_t), same shape, dtype and device as ``theta``.
        lr: η_t, a float or a one-element tensor (it is cast to ``theta``'s dtype and device;
            gradients flow back to it when it requires grad).
        out: optional preallocated contiguous result with ``theta``'s shape/dtype/device; it may
            be ``theta`` itself (an in-place step). Not allowed while autograd records.
        backend: force ``"reference"``, ``"cpp"``, ``"triton"`` or ``"cuda"`` (default: the
            :func:`fastdistill._backend.use_backend` context, ``FASTDISTILL_BACKEND``, or auto).
    Returns:
        θ_{t+1}: a new contiguous tensor shaped like ``theta`` (``out`` when given).
    Raises:
        ShapeError: mismatched shapes/dtypes/devices, a non-float dtype, a non-scalar ``lr``.
        ConfigError: ``out=`` while any input requires grad.
        BackendUnavailableError: the forced backend cannot run here.

    Non-contiguous ``theta``/``grad`` are copied to contiguous memory first.

    Example::

        >>> import torch
        >>> from fastdistill.ops import gd_update
        >>> gd_update(torch.tensor([1.0, 2.0]), torch.tensor([0.5, -1.0]), 0.1)
        tensor([0.9500, 2.1000])
    """
    if not isinstance(theta, Tensor) or not isinstance(grad, Tensor):
        raise ShapeError("gd_update: theta and grad must be tensors")
    if theta.dtype not in _DTYPES:
        raise ShapeError(f"gd_update: theta must be float32 or float64, got {theta.dtype}")
    if grad.shape != theta.shape or grad.dtype != theta.dtype or grad.device != theta.device:
        raise ShapeError(f"gd_update: grad must match theta ({tuple(theta.shape)}, {theta.dtype}, "
                         f"{theta.device}); got ({tuple(grad.shape)}, {grad.dtype}, {grad.device})")
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ShapeError(f"gd_update: lr must be a scalar, got shape {tuple(lr.shape)}")
        if lr.dim() != 0:
            lr = lr.reshape(())
        if lr.dtype != theta.dtype or lr.device != theta.device:
            lr = lr.to(device=theta.device, dtype=theta.dtype)
    else:
        lr = torch.tensor(float(lr), dtype=theta.dtype, device=theta.device)
    if out is not None:
        if out.shape != theta.shape or out.dtype != theta.dtype or out.device != theta.device:
            raise ShapeError(f"gd_update: out must match theta ({tuple(theta.shape)}, "
                             f"{theta.dtype}, {theta.device}); got ({tuple(out.shape)}, "
                             f"{out.dtype}, {out.device})")
        if not out.is_contiguous():
            raise ShapeError("gd_update: out must be contiguous")
        if torch.is_grad_enabled() and (theta.requires_grad or grad.requires_grad
                                        or lr.requires_grad):
            raise ConfigError("gd_update: out= is not differentiable; drop out= or run under "
                              "torch.no_grad()")
    name, fn, _ = _backend.resolve(OP, theta.device, backend)
    if name != "reference":
        theta = theta.contiguous()
        grad = grad.contiguous()
    return fn(theta, grad, lr, out)


# ------------------------------------------------------------------------------ the backward
def _backward(grad_out: Tensor, grad: Tensor, lr: Tensor, needs):
    """VJP of ``θ − η g``: dθ = ḡ, dg = −η ḡ, dη = −Σ g ḡ (plain PyTorch: twice differentiable)."""
    d_theta = grad_out if needs[0] else None
    d_grad = -(lr * grad_out) if needs[1] else None
    d_lr = -(grad * grad_out).sum() if needs[2] else None
    return d_theta, d_grad, d_lr


# ----------------------------------------------------------------------- reference backend
def _run_reference(theta, grad, lr, out):
    return gd_update_reference(theta, grad, lr, out=out)


_backend.register(OP, "reference", None, _run_reference)


# ------------------------------------------- cpp / cuda backends: torch.ops.fastdistill.gd_update
def _run_dispatcher(theta, grad, lr, out):
    if out is None:
        return torch.ops.fastdistill.gd_update.default(theta, grad, lr)
    torch.ops.fastdistill.gd_update_out.default(theta, grad, lr, out)
    return out


def _register_extension_op() -> None:
    """Fake kernels (shape propagation for opcheck / torch.compile) and autograd of the C++ op."""

    @torch.library.register_fake("fastdistill::gd_update")
    def _fake(theta, grad, lr):
        torch._check(grad.shape == theta.shape, lambda: "gd_update: grad must match theta")
        torch._check(lr.dim() == 0, lambda: "gd_update: lr must be 0-d")
        return torch.empty_like(theta, memory_format=torch.contiguous_format)

    @torch.library.register_fake("fastdistill::gd_update_out")
    def _fake_out(theta, grad, lr, out):
        torch._check(grad.shape == theta.shape, lambda: "gd_update: grad must match theta")
        torch._check(out.shape == theta.shape, lambda: "gd_update: out must match theta")

    def setup_context(ctx, inputs, output):
        _, grad, lr = inputs
        ctx.save_for_backward(grad, lr)

    def backward(ctx, grad_out):
        grad, lr = ctx.saved_tensors
        return _backward(grad_out, grad, lr, ctx.needs_input_grad)

    torch.library.register_autograd("fastdistill::gd_update", backward,
                                    setup_context=setup_context)


if _backend.has_kernel("fastdistill::gd_update", "CPU"):
    _register_extension_op()
_backend.register_extension(OP, _run_dispatcher)


# ------------------------------------------------------------------------------ triton backend
class _TritonGdUpdate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, theta, grad, lr):
        from .._kernels.gd_update import gd_update as launch
        ctx.save_for_backward(grad, lr)
        return launch(theta, grad, lr)

    @staticmethod
    def backward(ctx, grad_out):
        grad, lr = ctx.saved_tensors
        return _backward(grad_out, grad, lr, ctx.needs_input_grad)


def _run_triton(theta, grad, lr, out):
    if out is not None or not (torch.is_grad_enabled() and
                               (theta.requires_grad or grad.requires_grad or lr.requires_grad)):
        from .._kernels.gd_update import gd_update as launch
        return launch(theta, grad, lr, out)
    return _TritonGdUpdate.apply(theta, grad, lr)


_backend.register(OP, "triton", {"cuda", "cpu"}, _run_triton)
