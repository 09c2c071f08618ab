"""``linear_relu_tangent``: one batched linear layer (+ ReLU) of K networks and its R-operator
tangent, as the batched LeNet engine's fully connected layers need them.

Maths, per network k, with columns the n images (Pearlmutter's R-operator in direction
v = (V, ḃ) of the layer's parameters, ḣ the input's tangent)::

    z = W h + b,       out = relu(z)          (relu=False: out = z)
    ż = V h + W ḣ + ḃ,   ṫ = ż · [z > 0]        (relu=False: ṫ = ż)

:func:`linear_relu_tangent_reference` is the specification, the fallback and the test oracle
(two ``baddbmm``; ``LeNetBatchedEngine._forward`` runs its layers through this op);
:func:`linear_relu_tangent` picks a backend: ``reference`` (any device), ``triton``
(``kernels/linear_relu_tangent.py``: one kernel reading h, ḣ, W, V once; equal to the reference to
round-off, not bitwise) or ``cuda`` (``csrc/cuda/linear_relu_tangent.cu``, the extension's
``fastdistill::linear_relu`` / ``linear_relu_tangent``: a shared-memory tiled kernel, bias, ReLU
and mask fused, every output accumulated in double in ascending F_in order, so reruns are
bit-identical). ``auto`` takes triton on CUDA (cuda when triton is missing) and the reference
elsewhere (there is no C++ CPU kernel: on CPU the two GEMMs are already torch's). Every backend
is differentiable: the triton and cuda backends' backward is plain PyTorch (below), so it can be
differentiated again.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _backend
from ..errors import ShapeError

__all__ = ["linear_relu_tangent", "linear_relu_tangent_reference"]

OP = "linear_relu_tangent"
_DTYPES = (torch.float32, torch.float64)


def linear_relu_tangent_reference(h: Tensor, hd: Optional[Tensor], W: Tensor, V: Optional[Tensor],
                                  b: Tensor, bd: Optional[Tensor], relu: bool = True
                                  ) -> Tuple[Tensor, Optional[Tensor]]:
    """Plain-PyTorch ``(out, ṫ)`` (``ṫ`` None without a tangent); differentiable."""
    out = torch.baddbmm(b.unsqueeze(2), W, h)
    if relu:
        out = torch.relu(out)
    if hd is None:
        return out, None
    zd = torch.baddbmm(bd.unsqueeze(2), torch.cat([V, W], 2), torch.cat([h, hd], 1))
    return out, (zd * (out > 0) if relu else zd)


def linear_relu_tangent(h: Tensor, hd: Optional[Tensor], W: Tensor, V: Optional[Tensor],
                        b: Tensor, bd: Optional[Tensor], *, relu: bool = True,
                        backend: Optional[str] = None) -> Tuple[Tensor, Optional[Tensor]]:
    """A batched linear layer (+ ReLU) and its forward-mode tangent, fused.

    Args:
        h: ``[K, F_in, n]`` layer inputs of K networks (columns are images), float32/float64.
        hd: ``[K, F_in, n]`` their tangent ḣ, or None (then ``V`` and ``bd`` must be None too:
            the plain layer).
        W: ``[K, F_out, F_in]`` weights; V: ``[K, F_out, F_in]`` their direction (or None).
        b: ``[K, F_out]`` biases; bd: ``[K, F_out]`` their direction ḃ (or None).
        relu: apply the ReLU (hidden layers) or not (the logits).
        backend: force ``"reference"``, ``"triton"`` or ``"cuda"`` (default: the registry's
            choice).
    Returns:
        ``(out, ṫ)``: ``[K, F_out, n]`` each; ``out = relu(W h + b)``,
        ``ṫ = (V h + W ḣ + ḃ) · [W h + b > 0]`` (without the mask when ``relu=False``), ṫ None
        without a tangent.
    Raises:
        ShapeError: mismatched shapes, dtypes or devices, a non-float dtype, or only some of
            hd, V, bd given.
        BackendUnavailableError: a forced backend cannot run here.

    Example::

        >>> import torch
        >>> h, W, b = torch.ones(1, 2, 3), torch.tensor([[[1.0, -2.0]]]), torch.tensor([[0.5]])
        >>> out, td = linear_relu_tangent(h, torch.ones(1, 2, 3), W, torch.ones(1, 1, 2), b,
        ...                               torch.zeros(1, 1), relu=False)
        >>> out.flatten().tolist(), td.flatten().tolist()
        ([-0.5, -0.5, -0.5], [1.0, 1.0, 1.0])
    """
    if not isinstance(h, Tensor) or h.dim() != 3 or h.dtype not in _DTYPES:
        raise ShapeError(f"{OP}: h must be a float32/float64 [K, F_in, n] tensor, got "
                         f"{getattr(h, 'dtype', type(h))} {list(getattr(h, 'shape', []))}")
    K, F_in, n = h.shape
    if not isinstance(W, Tensor) or W.dim() != 3 or W.shape[0] != K or W.shape[2] != F_in:
        raise ShapeError(f"{OP}: W must be [{K}, F_out, {F_in}], got "
                         f"{list(getattr(W, 'shape', []))}")
    F_out = W.shape[1]
    tangent = [t is not None for t in (hd, V, bd)]
    if any(tangent) and not all(tangent):
        raise ShapeError(f"{OP}: give all of hd, V, bd (the tangent) or none of them")
    want = [("W", W, (K, F_out, F_in)), ("b", b, (K, F_out))]
    if all(tangent):
        want += [("hd", hd, (K, F_in, n)), ("V", V, (K, F_out, F_in)), ("bd", bd, (K, F_out))]
    for name, t, shape in want:
        if not isinstance(t, Tensor) or tuple(t.shape) != shape or t.dtype != h.dtype \
                or t.device != h.device:
            raise ShapeError(f"{OP}: {name} must be {list(shape)} ({h.dtype}, {h.device}), got "
                             f"{list(getattr(t, 'shape', []))} ({getattr(t, 'dtype', type(t))}, "
                             f"{getattr(t, 'device', None)})")
    name, fn, _ = _backend.resolve(OP, h.device, backend)
    args = (h, hd, W, V, b, bd)
    if name != "reference":
        args = tuple(None if t is None else t.contiguous() for t in args)
    return fn(*args, bool(relu))


# ------------------------------------------------------------------------------ the backward
def _backward(g_out: Optional[Tensor], g_td: Optional[Tensor], h, hd, W, V, out, relu: bool,
              needs):
    """VJP of ``(out, ṫ)`` in plain PyTorch (the masks [z > 0] are constant almost everywhere).

    With δz = ḡ_out · m and δż = ḡ_ṫ · m (m = [z > 0], or 1 without the ReLU):
    ∂W = δz hᵀ + δż ḣᵀ, ∂V = δż hᵀ, ∂h = Wᵀ δz + Vᵀ δż, ∂ḣ = Wᵀ δż, ∂b = Σ_n δz, ∂ḃ = Σ_n δż.
    """
    mask = (out > 0).to(out.dtype) if relu else None
    dz = None if g_out is None else (g_out * mask if relu else g_out)
    dzd = None if (g_td is None or hd is None) else (g_td * mask if relu else g_td)
    zeros = lambda t: torch.zeros_like(t)  # noqa: E731
    dz_ = dz if dz is not None else zeros(out)
    d_h = d_hd = d_W = d_V = d_b = d_bd = None
    if needs[0]:
        d_h = torch.bmm(W.transpose(1, 2), dz_)
        if dzd is not None:
            d_h = torch.baddbmm(d_h, V.transpose(1, 2), dzd)
    if needs[1] and hd is not None:
        d_hd = torch.bmm(W.transpose(1, 2), dzd) if dzd is not None else torch.zeros_like(hd)
    if needs[2]:
        d_W = torch.bmm(dz_, h.transpose(1, 2))
        if dzd is not None:
            d_W = torch.baddbmm(d_W, dzd, hd.transpose(1, 2))
    if needs[3] and V is not None:
        d_V = torch.bmm(dzd, h.transpose(1, 2)) if dzd is not None else torch.zeros_like(V)
    if needs[4]:
        d_b = dz_.sum(2)
    if needs[5] and hd is not None:
        d_bd = dzd.sum(2) if dzd is not None else torch.zeros_like(out[..., 0])
    return d_h, d_hd, d_W, d_V, d_b, d_bd


# ----------------------------------------------------------------------------------- backends
def _run_reference(h, hd, W, V, b, bd, relu):
    return linear_relu_tangent_reference(h, hd, W, V, b, bd, relu)


class _TritonLinearReluTangent(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, hd, W, V, b, bd, relu):
        from .._kernels.linear_relu_tangent import linear_relu_tangent as launch
        out, td = launch(h, hd, W, V, b, bd, relu)
        ctx.relu = relu
        ctx.save_for_backward(h, hd, W, V, out)
        if td is None:
            return out
        return out, td

    @staticmethod
    def backward(ctx, *grads):
        h, hd, W, V, out = ctx.saved_tensors
        g_out, g_td = grads if len(grads) == 2 else (grads[0], None)
        return _backward(g_out, g_td, h, hd, W, V, out, ctx.relu, ctx.needs_input_grad[:6]) \
            + (None,)


def _run_triton(h, hd, W, V, b, bd, relu):
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (h, hd, W, V, b, bd)):
        res = _TritonLinearReluTangent.apply(h, hd, W, V, b, bd, relu)
        return res if hd is not None else (res, None)
    from .._kernels.linear_relu_tangent import linear_relu_tangent as launch
    return launch(h, hd, W, V, b, bd, relu)


def _run_cuda(h, hd, W, V, b, bd, relu):
    ops = torch.ops.fastdistill
    if hd is None:
        return ops.linear_relu(h, W, b, relu), None
    out, td = ops.linear_relu_tangent(h, hd, W, V, b, bd, relu)
    return out, td


def _register_extension_ops() -> None:
    """Fake kernels and the autograd of the CUDA ops (their backward is :func:`_backward`)."""

    def _out_shape(h, W):
        return (h.shape[0], W.shape[1], h.shape[2])

    @torch.library.register_fake("fastdistill::linear_relu")
    def _fake(h, W, b, relu):
        return h.new_empty(_out_shape(h, W))

    @torch.library.register_fake("fastdistill::linear_relu_tangent")
    def _fake_tangent(h, hd, W, V, b, bd, relu):
        return h.new_empty(_out_shape(h, W)), h.new_empty(_out_shape(h, W))

    def _ctx(ctx, inputs, output):
        h, W, _, ctx.relu = inputs
        ctx.save_for_backward(h, W, output)

    def _bw(ctx, g_out):
        h, W, out = ctx.saved_tensors
        need_h, need_W, need_b = ctx.needs_input_grad[:3]
        d_h, _, d_W, _, d_b, _ = _backward(g_out, None, h, None, W, None, out, ctx.relu,
                                           (need_h, False, need_W, False, need_b, False))
        return d_h, d_W, d_b, None

    def _ctx_tangent(ctx, inputs, output):
        h, hd, W, V, _, _, ctx.relu = inputs
        ctx.save_for_backward(h, hd, W, V, output[0])

    def _bw_tangent(ctx, g_out, g_td):
        h, hd, W, V, out = ctx.saved_tensors
        return _backward(g_out, g_td, h, hd, W, V, out, ctx.relu, ctx.needs_input_grad[:6]) \
            + (None,)

    torch.library.register_autograd("fastdistill::linear_relu", _bw, setup_context=_ctx)
    torch.library.register_autograd("fastdistill::linear_relu_tangent", _bw_tangent,
                                    setup_context=_ctx_tangent)


if _backend.has_kernel("fastdistill::linear_relu_tangent", "CUDA"):
    _register_extension_ops()


_backend.register(OP, "reference", None, _run_reference)
_backend.register(OP, "triton", {"cuda", "cpu"}, _run_triton)
# CUDA only (no cpp backend: there is no CPU kernel to register, see the module docstring).
_backend.register(OP, "cuda", {"cuda"}, _run_cuda,
                  available=_backend.kernel_probe("linear_relu_tangent", "CUDA"))
