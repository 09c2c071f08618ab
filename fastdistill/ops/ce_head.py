"""``ce_head``: the softmax cross-entropy head of K networks with its gradient and R-operator
tangent, as the batched LeNet engine's loss needs it (the engine calls it).

Maths, per network k, image column j, classes c (targets ỹ need not sum to one: soft labels;
σ = Σ_c ỹ_c, scale s, logit tangent ż = R{z})::

    ℓ_k      = −s Σ_j Σ_c ỹ_cj log softmax(z_·j)_c
    δz       = ∂ℓ/∂z = s (p σ − ỹ)
    δż       = R{δz} = s · p ⊙ (ż − ⟨p, ż⟩) · σ
    R{∇_ỹ ℓ} = R{−s log p} = −s (ż − ⟨p, ż⟩)

:func:`ce_head_reference` is the specification, the fallback and the test oracle: the same torch
code the engine issued before it called this op. :func:`ce_head` picks a backend:
``reference`` (any device), ``triton`` (``kernels/ce_head.py``: one pass over z, ỹ, ż; equal to
the reference to round-off) or ``cuda`` (``csrc/cuda/ce_head.cu``, the extension's
``fastdistill::ce_head`` / ``ce_head_tangent``: one warp per image column, fixed-order
reductions in double and no atomics, so reruns are bit-identical). ``auto`` takes triton on
CUDA (cuda when triton is missing) and the reference elsewhere (there is no C++ CPU kernel).
The outputs are themselves derivatives: the triton and cuda backends are not differentiable and
raise when autograd would need them (the reference is differentiable).
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from .. import _backend
from ..errors import ConfigError, ShapeError
from ._autograd import needs_grad

__all__ = ["ce_head", "ce_head_reference"]

OP = "ce_head"
_DTYPES = (torch.float32, torch.float64)


def ce_head_reference(z: Tensor, Y: Tensor, scale: Union[float, Tensor], zd: Optional[Tensor] = None
                      ) -> Tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
    """Plain-PyTorch ``(ℓ [K], δz, δż, R{∇_ỹ ℓ})`` (the last two None without ``zd``)."""
    logp = torch.log_softmax(z, dim=1)
    p = logp.exp()
    ysum = Y.sum(1, keepdim=True)
    loss, dz = -(Y * logp).sum((1, 2)) * scale, (p * ysum - Y) * scale
    if zd is None:
        return loss, dz, None, None
    centred = zd - (p * zd).sum(1, keepdim=True)                    # ż − ⟨p, ż⟩
    return loss, dz, p * centred * ysum * scale, -centred * scale


def ce_head(z: Tensor, Y: Tensor, scale: Union[float, Tensor], zd: Optional[Tensor] = None, *,
            backend: Optional[str] = None
            ) -> Tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
    """Softmax cross-entropy of K networks, its logit gradient and their tangents, fused.

    Args:
        z: ``[K, O, n]`` logits (classes on dim 1, images on dim 2), float32/float64.
        Y: ``[K, O, n]`` or ``[1, O, n]`` (shared by every network) float targets, one-hot or
            soft; same dtype and device as ``z``.
        scale: s, a float or a one-element tensor (e.g. 1/n for the mean over images).
        zd: optional ``[K, O, n]`` logit tangent ż.
        backend: force ``"reference"``, ``"triton"`` or ``"cuda"`` (default: the registry's
            choice).
    Returns:
        ``(loss [K], dz [K, O, n], dzd, dY)`` with ``dzd`` = δż and ``dY`` = R{∇_ỹ ℓ} (per
        network, ``[K, O, n]``; sum over K for shared targets), both None without ``zd``.
    Raises:
        ShapeError: wrong shapes, dtypes or devices.
        ConfigError: the triton or cuda backend while autograd records through an input.
        BackendUnavailableError: a forced backend cannot run here.

    Example::

        >>> import torch
        >>> loss, dz, _, _ = ce_head(torch.zeros(1, 2, 1), torch.tensor([[[1.0], [0.0]]]), 1.0)
        >>> round(loss.item(), 4), dz.flatten().tolist()
        (0.6931, [-0.5, 0.5])
    """
    if not isinstance(z, Tensor) or z.dim() != 3 or z.dtype not in _DTYPES:
        raise ShapeError(f"{OP}: z must be a float32/float64 [K, O, n] tensor, got "
                         f"{getattr(z, 'dtype', type(z))} {list(getattr(z, 'shape', []))}")
    K, O, n = z.shape
    if not isinstance(Y, Tensor) or Y.dim() != 3 or Y.shape[0] not in (1, K) \
            or Y.shape[1:] != z.shape[1:] or Y.dtype != z.dtype or Y.device != z.device:
        raise ShapeError(f"{OP}: Y must be [{K} or 1, {O}, {n}] ({z.dtype}, {z.device}), got "
                         f"{list(getattr(Y, 'shape', []))} ({getattr(Y, 'dtype', type(Y))})")
    if zd is not None and (not isinstance(zd, Tensor) or zd.shape != z.shape
                           or zd.dtype != z.dtype or zd.device != z.device):
        raise ShapeError(f"{OP}: zd must match z ({list(z.shape)}, {z.dtype}, {z.device}), got "
                         f"{list(getattr(zd, 'shape', []))} ({getattr(zd, 'dtype', type(zd))})")
    if isinstance(scale, Tensor) and scale.numel() != 1:
        raise ShapeError(f"{OP}: scale must be a scalar, got shape {list(scale.shape)}")
    name, fn, _ = _backend.resolve(OP, z.device, backend)
    if name != "reference":
        z, Y = z.contiguous(), Y.contiguous()
        zd = None if zd is None else zd.contiguous()
    return fn(z, Y, scale, zd)


# ----------------------------------------------------------------------------------- backends
def _run_reference(z, Y, scale, zd):
    return ce_head_reference(z, Y, scale, zd)


def _scale_of(backend: str, z, Y, scale, zd) -> Tensor:
    """The scale as a 0-d tensor of z's dtype on z's device (the kernels read it there);
    raises ConfigError when autograd would have to differentiate the (non-differentiable)
    ``backend``."""
    if isinstance(scale, Tensor):
        if torch.is_grad_enabled() and scale.requires_grad:
            raise ConfigError(f"{OP}: the {backend} backend is not differentiable; use "
                              "backend='reference' to differentiate through it")
        s = scale.detach().reshape(()).to(device=z.device, dtype=z.dtype)
    else:
        s = torch.tensor(float(scale), dtype=z.dtype, device=z.device)
    if needs_grad(z, Y, zd):
        raise ConfigError(f"{OP}: the {backend} backend is not differentiable; use "
                          "backend='reference' (or torch.no_grad()) to differentiate through it")
    return s


def _run_triton(z, Y, scale, zd):
    s = _scale_of("triton", z, Y, scale, zd)
    from .._kernels.ce_head import MAX_CLASSES, ce_head as launch
    if z.shape[1] > MAX_CLASSES:
        raise ShapeError(f"{OP}: the triton kernel holds one column per tile: at most "
                         f"{MAX_CLASSES} classes, got {z.shape[1]}")
    return launch(z, Y, s, zd)


def _run_cuda(z, Y, scale, zd):
    s = _scale_of("cuda", z, Y, scale, zd)
    if zd is None:
        loss, dz = torch.ops.fastdistill.ce_head(z, Y, s)
        return loss, dz, None, None
    loss, dz, dzd, dY = torch.ops.fastdistill.ce_head_tangent(z, Y, s, zd)
    return loss, dz, dzd, dY


def _register_extension_ops() -> None:
    """Fake kernels of the CUDA ops (no autograd: the outputs are already derivatives)."""

    @torch.library.register_fake("fastdistill::ce_head")
    def _fake(z, Y, scale):
        return z.new_empty(z.shape[:1]), torch.empty_like(z)

    @torch.library.register_fake("fastdistill::ce_head_tangent")
    def _fake_tangent(z, Y, scale, zd):
        return z.new_empty(z.shape[:1]), torch.empty_like(z), torch.empty_like(z), torch.empty_like(z)


if _backend.has_kernel("fastdistill::ce_head", "CUDA"):
    _register_extension_ops()


_backend.register(OP, "reference", None, _run_reference)
_backend.register(OP, "triton", {"cuda", "cpu"}, _run_triton)
# CUDA only (no cpp backend: there is no CPU kernel to register, see the module docstring).
_backend.register(OP, "cuda", {"cuda"}, _run_cuda, available=_backend.kernel_probe("ce_head", "CUDA"))
