"""``im2col5`` / ``col2im5``: the 5×5 patches of a stack of image planes, and their adjoint.

The batched LeNet engine (:mod:`fastdistill.models.batched`) runs each convolution of K networks
as one batched GEMM over patches. For ``a`` of shape ``[B, C, M, H, W]`` (B networks, C channels,
M images) and ``pad``, with ``H' = H + 2·pad − 4``::

    im2col5(a)[b, c·25 + 5i + j, (m·H' + y)·W' + x] = a[b, c, m, y + i − pad, x + j − pad]

(zero outside the image): rows in the flattening order of a conv weight ``[out, C, 5, 5]``,
columns image-major. ``col2im5`` is its adjoint (``⟨im2col5(a), d⟩ = ⟨a, col2im5(d)⟩``), the
input gradient of the convolution after its GEMM.

:func:`im2col5_reference` / :func:`col2im5_reference` (strided views; 25 shifted adds) are the
specification and the fallback. The ``cpp`` and ``cuda`` backends (``torch.ops.fastdistill.*``,
csrc/cpu/lenet_ops.cpp, csrc/cuda/lenet_ops.cu) and the ``triton`` backend (kernels/im2col5.py;
col2im5 as a deterministic gather-sum) compute bitwise the same values in one pass (PyTorch's
own ``F.unfold``/``F.fold`` are several times slower at these sizes). Both are differentiable
(each is the other's backward) on every backend.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _backend
from ..errors import ShapeError

__all__ = ["im2col5", "im2col5_reference", "col2im5", "col2im5_reference"]

OP_IM2COL, OP_COL2IM = "im2col5", "col2im5"
_DTYPES = (torch.float32, torch.float64)


def _out_side(H: int, W: int, pad: int, what: str):
    if pad < 0:
        raise ShapeError(f"{what}: pad must be >= 0, got {pad}")
    Ho, Wo = H + 2 * pad - 4, W + 2 * pad - 4
    if H < 1 or W < 1 or Ho < 1 or Wo < 1:
        raise ShapeError(f"{what}: a {H}×{W} image with pad {pad} is smaller than the 5×5 kernel")
    return Ho, Wo


def im2col5_reference(a: Tensor, pad: int = 0) -> Tensor:
    """Plain-PyTorch im2col: ``[B, C, M, H, W] -> [B, C·25, M·H'·W']`` (strided views, one copy)."""
    if pad:
        a = F.pad(a, (pad, pad, pad, pad))
    B, C, M = a.shape[:3]
    u = a.unfold(3, 5, 1).unfold(4, 5, 1)                                # [B, C, M, H', W', 5, 5]
    return u.permute(0, 1, 5, 6, 2, 3, 4).reshape(B, C * 25, M * u.shape[3] * u.shape[4])


def col2im5_reference(d: Tensor, H: int, W: int, pad: int = 0) -> Tensor:
    """Plain-PyTorch adjoint of :func:`im2col5_reference`: 25 shifted adds in (i, j) order."""
    Ho, Wo = _out_side(H, W, pad, "col2im5")
    B, C, M = d.shape[0], d.shape[1] // 25, d.shape[2] // (Ho * Wo)
    d = d.reshape(B, C, 5, 5, M, Ho, Wo)
    out = torch.zeros((B, C, M, H + 2 * pad, W + 2 * pad), dtype=d.dtype, device=d.device)
    for i in range(5):
        for j in range(5):
            out[..., i:i + Ho, j:j + Wo] += d[:, :, i, j]
    return out[..., pad:pad + H, pad:pad + W] if pad else out


def im2col5(a: Tensor, pad: int = 0, *, backend: Optional[str] = None) -> Tensor:
    """5×5 patches of ``a`` (see the module docstring).

    Args:
        a: ``[B, C, M, H, W]``, float32 or float64.
        pad: zero padding on every side (LeNet's conv1 at 28 px: 2).
        backend: force ``"reference"``, ``"cpp"``, ``"cuda"`` or ``"triton"`` (default: the
            registry's choice).
    Returns:
        ``[B, C·25, M·H'·W']``, ``H' = H + 2·pad − 4``.
    Raises:
        ShapeError: not 5-D, not floating point, or smaller than the kernel.
        BackendUnavailableError: a forced backend cannot run here.

    Example::

        >>> import torch
        >>> im2col5(torch.arange(36.0).view(1, 1, 1, 6, 6)).shape
        torch.Size([1, 25, 4])
    """
    if a.dim() != 5 or a.dtype not in _DTYPES:
        raise ShapeError(f"im2col5: a must be a float32/float64 [B, C, M, H, W] tensor, got "
                         f"{a.dtype} {list(a.shape)}")
    _out_side(a.shape[3], a.shape[4], pad, "im2col5")
    name, fn, _ = _backend.resolve(OP_IM2COL, a.device, backend)
    return fn(a if name == "reference" else a.contiguous(), int(pad))


def col2im5(d: Tensor, H: int, W: int, pad: int = 0, *, backend: Optional[str] = None) -> Tensor:
    """Adjoint of :func:`im2col5`: ``[B, C·25, M·H'·W'] -> [B, C, M, H, W]``.

    Raises:
        ShapeError: ``d`` is not ``[B, C·25, M·H'·W']`` for this image size and padding.
    """
    if d.dim() != 3 or d.dtype not in _DTYPES:
        raise ShapeError(f"col2im5: d must be a float32/float64 [B, C·25, L] tensor, got "
                         f"{d.dtype} {list(d.shape)}")
    Ho, Wo = _out_side(int(H), int(W), pad, "col2im5")
    if d.shape[1] % 25 or d.shape[2] % (Ho * Wo):
        raise ShapeError(f"col2im5: d must be [B, C·25, M·{Ho}·{Wo}] for a {H}×{W} image with pad "
                         f"{pad}, got {list(d.shape)}")
    name, fn, _ = _backend.resolve(OP_COL2IM, d.device, backend)
    return fn(d if name == "reference" else d.contiguous(), int(H), int(W), int(pad))


# ----------------------------------------------------------------------------------- backends
_backend.register(OP_IM2COL, "reference", None, im2col5_reference)
_backend.register(OP_COL2IM, "reference", None, col2im5_reference)


def _register_extension_ops() -> None:
    """Fake kernels (shapes for opcheck / torch.compile) and autograd of the C++ ops."""

    @torch.library.register_fake("fastdistill::im2col5")
    def _fake_im2col(a, pad):
        B, C, M, H, W = a.shape
        return a.new_empty((B, C * 25, M * (H + 2 * pad - 4) * (W + 2 * pad - 4)))

    @torch.library.register_fake("fastdistill::col2im5")
    def _fake_col2im(d, H, W, pad):
        Ho, Wo = H + 2 * pad - 4, W + 2 * pad - 4
        return d.new_empty((d.shape[0], d.shape[1] // 25, d.shape[2] // (Ho * Wo), H, W))

    def _ctx_im2col(ctx, inputs, output):
        a, pad = inputs
        ctx.H, ctx.W, ctx.pad = a.shape[3], a.shape[4], pad

    def _bw_im2col(ctx, grad):
        return torch.ops.fastdistill.col2im5(grad.contiguous(), ctx.H, ctx.W, ctx.pad), None

    def _ctx_col2im(ctx, inputs, output):
        ctx.pad = inputs[3]

    def _bw_col2im(ctx, grad):
        return torch.ops.fastdistill.im2col5(grad.contiguous(), ctx.pad), None, None, None

    torch.library.register_autograd("fastdistill::im2col5", _bw_im2col, setup_context=_ctx_im2col)
    torch.library.register_autograd("fastdistill::col2im5", _bw_col2im, setup_context=_ctx_col2im)


if _backend.has_kernel("fastdistill::im2col5", "CPU"):
    _register_extension_ops()
_backend.register_extension(OP_IM2COL)
_backend.register_extension(OP_COL2IM)


# ------------------------------------------------------------------------------ triton backend
# Each op is the other's VJP, so each autograd.Function's backward calls the other triton op
# (differentiable again: any order).
class _TritonIm2col5(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, pad):
        from .._kernels.im2col5 import im2col5 as launch
        ctx.H, ctx.W, ctx.pad = a.shape[3], a.shape[4], pad
        return launch(a, pad)

    @staticmethod
    def backward(ctx, grad):
        return _triton_col2im5(grad.contiguous(), ctx.H, ctx.W, ctx.pad), None


class _TritonCol2im5(torch.autograd.Function):
    @staticmethod
    def forward(ctx, d, H, W, pad):
        from .._kernels.im2col5 import col2im5 as launch
        ctx.pad = pad
        return launch(d, H, W, pad)

    @staticmethod
    def backward(ctx, grad):
        return _triton_im2col5(grad.contiguous(), ctx.pad), None, None, None


def _triton_im2col5(a, pad):
    if torch.is_grad_enabled() and a.requires_grad:
        return _TritonIm2col5.apply(a, pad)
    from .._kernels.im2col5 import im2col5 as launch
    return launch(a, pad)


def _triton_col2im5(d, H, W, pad):
    if torch.is_grad_enabled() and d.requires_grad:
        return _TritonCol2im5.apply(d, H, W, pad)
    from .._kernels.im2col5 import col2im5 as launch
    return launch(d, H, W, pad)


_backend.register(OP_IM2COL, "triton", {"cuda", "cpu"}, _triton_im2col5)
_backend.register(OP_COL2IM, "triton", {"cuda", "cpu"}, _triton_col2im5)
