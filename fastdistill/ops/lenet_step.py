"""``lenet_step``: LeNet's whole inner step for K networks -- loss, gradient and (with a direction
``v``) the Hessian-vector product and the mixed second derivatives -- as one op.

Maths, for networks k = 1..K with ``ℓ_k(θ_k) = −scale Σ_i Σ_c Y_kic log softmax(f(x_ki; θ_k))_c``::

    g_k  = ∇_θ ℓ_k(θ_k)                      (lenet_step without v)
    hv_k = ∇²_θ ℓ_k(θ_k) v_k                 (with v: also these three)
    dx   = ∇_x Σ_k v_k · g_k                 (x's shape: summed over k when x is shared)
    dY   = ∇_Y Σ_k v_k · g_k                 ([1 or K, n, O])

:func:`lenet_step_reference` is the specification: :class:`~fastdistill.models.batched.LeNetBatchedEngine`'s
layer-by-layer torch code (batched GEMMs over K and the im2col/pool ops). The ``cpp`` backend
(``torch.ops.fastdistill.lenet_grad`` / ``lenet_grad_hvp``, ``csrc/cpu/lenet_step.cpp``) runs the
same maths per network, one network per thread with sequential BLAS, so every network's
activations stay in cache; it is deterministic and its ``g`` is bitwise the same with and without
``v``. It equals the reference to round-off (float64 ~1e-15 relative), not bitwise: the GEMMs are
laid out differently. Multi-class softmax cross-entropy only (O ≥ 2); the one-logit BCE head of
binary models runs in the engine's torch code.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _backend
from ..errors import ShapeError

__all__ = ["lenet_step", "lenet_step_reference", "OP"]

OP = "lenet_step"
_DTYPES = (torch.float32, torch.float64)

Result = Tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor]]


def _model(x: Tensor, Y: Tensor):
    from ..models.lenet import LeNet
    return LeNet(num_classes=int(Y.shape[-1]), in_channels=int(x.shape[-3]), image_size=int(x.shape[-1]))


def lenet_step_reference(theta: Tensor, x: Tensor, Y: Tensor, v: Optional[Tensor], scale: float,
                         need_x: bool = True, need_y: bool = True) -> Result:
    """``(ℓ [K], g [K, P], hv, dx, dY)`` by the engine's torch code (the last three None without v,
    dx/dY None when not needed)."""
    from ..models.batched import LeNetBatchedEngine
    eng = LeNetBatchedEngine(_model(x, Y), backend="reference")
    shared_y = Y.shape[0] == 1
    y = Y[0] if shared_y else Y
    shared = x.dim() == 4
    if v is None:
        loss, g = eng._loss_grad_torch(theta, x, shared, y, scale)
        return loss, g, None, None, None
    loss, g, hv, dx, dy = eng._loss_grad_hvp_torch(theta, x, shared, y, v, scale, need_x, need_y)
    if dy is not None and shared_y:
        dy = dy.unsqueeze(0)
    return loss, g, hv, dx, dy


def lenet_step(theta: Tensor, x: Tensor, Y: Tensor, v: Optional[Tensor] = None, *, scale: float,
               need_x: bool = True, need_y: bool = True, backend: Optional[str] = None) -> Result:
    """One inner step of K LeNets (see the module docstring).

    Args:
        theta: ``[K, P]`` flat parameters, float32/float64.
        x: ``[n, C, H, W]`` (shared by the networks) or ``[K, n, C, H, W]``; LeNet's sizes
            (28 px with pad 2, or 32 px).
        Y: ``[1 or K, n, O]`` float targets (one-hot for hard labels), O ≥ 2.
        v: ``[K, P]`` direction of the second-order terms, or None (loss and gradient only).
        scale: ℓ's factor (``1/n`` for the mean over the images).
        need_x / need_y: compute ``dx`` / ``dY`` (with v).
        backend: force ``"reference"`` or ``"cpp"`` (default: the registry's choice).
    Returns:
        ``(ℓ [K], g [K, P], hv [K, P] | None, dx | None, dY | None)``.
    Raises:
        ShapeError: inconsistent shapes or dtypes. BackendUnavailableError: a forced backend
        cannot run here.

    Example::

        >>> import torch
        >>> from fastdistill.models import LeNet
        >>> m = LeNet(); th = torch.stack([m.init("xavier", torch.Generator().manual_seed(i)) for i in range(2)])
        >>> Y = torch.eye(10).unsqueeze(0)                    # 10 images, one per class
        >>> loss, g, *_ = lenet_step(th, torch.randn(10, 1, 28, 28), Y, scale=0.1)
        >>> loss.shape, g.shape
        (torch.Size([2]), torch.Size([2, 61706]))
    """
    if not isinstance(theta, Tensor) or theta.dim() != 2 or theta.dtype not in _DTYPES:
        raise ShapeError(f"lenet_step: theta must be a float32/float64 [K, P] tensor, got "
                         f"{getattr(theta, 'dtype', type(theta))} {list(getattr(theta, 'shape', []))}")
    K = theta.shape[0]
    if x.dim() not in (4, 5) or (x.dim() == 5 and x.shape[0] != K) or x.dtype != theta.dtype:
        raise ShapeError(f"lenet_step: x must be [n, C, H, W] or [K={K}, n, C, H, W] of θ's dtype, "
                         f"got {x.dtype} {list(x.shape)}")
    n = x.shape[-4]
    if Y.dim() != 3 or Y.shape[0] not in (1, K) or Y.shape[1] != n or Y.shape[2] < 2 or Y.dtype != theta.dtype:
        raise ShapeError(f"lenet_step: Y must be [1 or {K}, {n}, O ≥ 2] targets of θ's dtype, got "
                         f"{Y.dtype} {list(Y.shape)}")
    if v is not None and (v.shape != theta.shape or v.dtype != theta.dtype):
        raise ShapeError(f"lenet_step: v must have θ's shape {list(theta.shape)} and dtype, got "
                         f"{v.dtype} {list(v.shape)}")
    name, fn, _ = _backend.resolve(OP, theta.device, backend)
    return fn(theta, x, Y, v, float(scale), bool(need_x), bool(need_y))


# ----------------------------------------------------------------------------------- backends
def _run_cpp(theta, x, Y, v, scale, need_x, need_y):
    pad = 2 if x.shape[-1] == 28 else 0
    theta, x, Y = theta.contiguous(), x.contiguous(), Y.contiguous()
    if v is None:
        loss, g = torch.ops.fastdistill.lenet_grad(theta, x, Y, scale, pad)
        return loss, g, None, None, None
    loss, g, hv, dx, dy = torch.ops.fastdistill.lenet_grad_hvp(theta, x, Y, v.contiguous(), scale,
                                                               pad, need_x, need_y)
    return loss, g, hv, (dx if need_x else None), (dy if need_y else None)


if _backend.has_kernel("fastdistill::lenet_grad", "CPU"):
    @torch.library.register_fake("fastdistill::lenet_grad")
    def _fake_grad(theta, x, Y, scale, pad):
        return theta.new_empty((theta.shape[0],)), torch.empty_like(theta)

    @torch.library.register_fake("fastdistill::lenet_grad_hvp")
    def _fake_hvp(theta, x, Y, v, scale, pad, need_x, need_y):
        dx = x.new_empty(x.shape) if need_x else x.new_empty((0,))
        dy = Y.new_empty((Y.shape[0], Y.shape[1], Y.shape[2])) if need_y else Y.new_empty((0,))
        return theta.new_empty((theta.shape[0],)), torch.empty_like(theta), torch.empty_like(theta), dx, dy

_backend.register(OP, "reference", None, lenet_step_reference)
_backend.register_extension(OP, _run_cpp, kernel="lenet_grad_hvp", cuda=False)  # CPU only
