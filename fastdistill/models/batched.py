"""K networks of one architecture as one computation: θ of shape ``[K, P]``.

Random-init dataset distillation trains several networks per meta-iteration, each from its own
θ_0, on the same tiny batch of distilled images (10 images per step for MNIST). Run one network
at a time and every kernel sees batch 10: the cost is kernel overhead, not arithmetic. Here the K
networks share every kernel launch:

* the first convolution sees the same images in every network, so it is one convolution with
  ``K·C_out`` output channels (one GEMM ``[K·C_out, C·k·k] @ [C·k·k, n·H·W]``);
* later convolutions are grouped by network (``groups=K``, or a batched GEMM over im2col
  patches), and the linear layers are ``torch.baddbmm`` over K.

Two engines compute what the unrolled inner loop needs from K networks at once:

* :class:`AutogradBatchedEngine` -- :func:`batched_apply` and autograd (double backward for the
  Hessian-vector products). Any model :func:`supports_batched` accepts; the oracle for the other.
* :class:`LeNetBatchedEngine` -- LeNet's forward, backward and second-order pass written out
  (Pearlmutter's R-operator: one forward and one backward pass, each carrying a tangent),
  with im2col batched GEMMs. No autograd graph, ~6× fewer kernel launches than double backward.

Both return, for networks ``k = 1..K`` with losses ``ℓ_k(θ_k) = ℓ(f(x_k; θ_k), y_k)``:
``g_k = ∇_θ ℓ_k``, ``H_k v_k``, and the mixed terms ``∇_x Σ_k v_k·g_k`` and ``∇_y Σ_k v_k·g_k``.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError, ShapeError
from ..ops._autograd import needs_grad
from ..ops.ce_head import ce_head
from ..ops.im2col5 import col2im5, im2col5
from ..ops.linear_relu_tangent import linear_relu_tangent
from ..ops.lenet_step import lenet_step
from ..ops.pool2_relu import pool2_relu, pool2_relu_backward, pool2_relu_tangent
from .base import FunctionalModel
from .lenet import AlexCifarNet, LeNet

__all__ = ["supports_batched", "unflatten_batched", "batched_apply", "batched_inner_loss",
           "AutogradBatchedEngine", "LeNetBatchedEngine", "batched_engine", "ENGINES"]

_LRN = dict(size=4, alpha=0.001 / 9.0, beta=0.75, k=1.0)


def supports_batched(model: FunctionalModel) -> bool:
    """True for the architectures with a batched forward (LeNet and AlexCifarNet)."""
    return isinstance(model, (LeNet, AlexCifarNet))


def _check(model: FunctionalModel, thetas: Tensor) -> int:
    if not supports_batched(model):
        raise ConfigError(f"{model.name} has no batched multi-network form; supported: lenet, "
                          "alexcifarnet (use the per-network loop)")
    if thetas.dim() != 2 or thetas.shape[1] != model.num_params:
        raise ShapeError(f"{model.name}: θ for K networks must be [K, {model.num_params}], got "
                         f"{list(thetas.shape)}")
    return int(thetas.shape[0])


def unflatten_batched(model: FunctionalModel, thetas: Tensor) -> Dict[str, Tensor]:
    """Per parameter name, a ``[K, *shape]`` tensor cut from θ ``[K, P]``.

    One ``split`` (not one slice per parameter): its backward is a single concatenation, where
    per-parameter slicing would allocate and add a zero ``[K, P]`` tensor per parameter.
    """
    K = thetas.shape[0]
    parts = torch.split(thetas, [s.numel for s in model.specs], dim=1)
    return {s.name: p.reshape((K,) + s.shape) for s, p in zip(model.specs, parts)}


def _input_nkc(model: FunctionalModel, x: Tensor, K: int) -> Tuple[Tensor, bool]:
    """(x, shared): shared ``[n, *in]`` or per-network ``[K, n, *in]`` inputs, checked."""
    ins = tuple(model.input_shape)
    if tuple(x.shape[1:]) == ins:
        return x, True
    if x.dim() == len(ins) + 2 and x.shape[0] == K and tuple(x.shape[2:]) == ins:
        return x, False
    raise ShapeError(f"{model.name}: input must be [n, {', '.join(map(str, ins))}] (shared by the "
                     f"networks) or [K={K}, n, ...] (one batch per network), got {list(x.shape)}")


def _first_conv(x: Tensor, shared: bool, w: Tensor, b: Tensor, padding: int) -> Tensor:
    """Conv of every network's input with its own filters: ``[n, K·C_out, H', W']``."""
    K = w.shape[0]
    wk = w.reshape((K * w.shape[1],) + tuple(w.shape[2:]))
    if shared:  # same images for every network: one ordinary convolution with K·C_out channels
        return F.conv2d(x, wk, b.reshape(-1), padding=padding)
    n = x.shape[1]
    xk = x.transpose(0, 1).reshape((n, K * x.shape[2]) + tuple(x.shape[3:]))
    return F.conv2d(xk, wk, b.reshape(-1), padding=padding, groups=K)


def _grouped_conv(h: Tensor, w: Tensor, b: Tensor, padding: int) -> Tensor:
    K = w.shape[0]
    return F.conv2d(h, w.reshape((K * w.shape[1],) + tuple(w.shape[2:])), b.reshape(-1),
                    padding=padding, groups=K)


def _lrn(h: Tensor, K: int) -> Tensor:
    # [n, K·C, H, W] is [n·K, C, H, W] in memory: normalising over C never crosses networks
    n, KC, H, W = h.shape
    return F.local_response_norm(h.reshape(n * K, KC // K, H, W), **_LRN).reshape(n, KC, H, W)


def _linear(h: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """``[K, n, in] -> [K, n, out]`` with per-network weights ``[K, out, in]``."""
    return torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))


def batched_apply(model: FunctionalModel, thetas: Tensor, x: Tensor) -> Tensor:
    """Logits of K networks in one computation (differentiable by autograd).

    Args:
        model: a :class:`LeNet` or :class:`AlexCifarNet`.
        thetas: θ, ``[K, P]``; row k holds network k's flat parameters.
        x: ``[n, *input_shape]`` (every network sees the same images) or ``[K, n, *input_shape]``.
    Returns:
        ``[K, n, num_outputs]``; slice k equals ``model.apply(thetas[k], x or x[k])`` up to
        floating-point summation order.
    Raises:
        ConfigError: an unsupported model; ShapeError: θ or x of the wrong shape.

    Example::

        >>> import torch
        >>> from fastdistill.models import LeNet
        >>> m = LeNet(); th = torch.stack([m.init("xavier", torch.Generator().manual_seed(i)) for i in range(4)])
        >>> batched_apply(m, th, torch.randn(10, 1, 28, 28)).shape
        torch.Size([4, 10, 10])
    """
    K = _check(model, thetas)
    x, shared = _input_nkc(model, x, K)
    p = unflatten_batched(model, thetas)
    n = x.shape[0] if shared else x.shape[1]
    if isinstance(model, LeNet):
        h = _first_conv(x, shared, p["conv1.weight"], p["conv1.bias"], model.pad)
        h = F.max_pool2d(F.relu(h), 2)
        h = F.max_pool2d(F.relu(_grouped_conv(h, p["conv2.weight"], p["conv2.bias"], 0)), 2)
    else:
        h = F.relu(_first_conv(x, shared, p["conv1.weight"], p["conv1.bias"], 2))
        h = _lrn(F.max_pool2d(h, 3, 2, 1), K)
        h = F.relu(_grouped_conv(h, p["conv2.weight"], p["conv2.bias"], 2))
        h = F.max_pool2d(_lrn(h, K), 3, 2, 1)
    h = h.reshape(n, K, -1).transpose(0, 1)          # [K, n, features], features in (c, y, x) order
    h = F.relu(_linear(h, p["fc1.weight"], p["fc1.bias"]))
    h = F.relu(_linear(h, p["fc2.weight"], p["fc2.bias"]))
    return _linear(h, p["fc3.weight"], p["fc3.bias"])


def batched_inner_loss(logits: Tensor, labels: Tensor, scale: Optional[float] = None) -> Tensor:
    """Per-network inner loss ℓ_k (as :func:`fastdistill.backgrad.inner_loss`), ``[K]``.

    Args:
        logits: ``[K, n, C]``.
        labels: hard ``[n]`` / ``[K, n]`` int64, or soft ``[n, C]`` / ``[K, n, C]`` float.
        scale: the loss is ``scale · Σ_i ℓ_i``; default ``1/n`` (the mean). Chunked evaluation
            of a large batch passes ``1/N_total``.
    """
    K, n, C = logits.shape
    scale = 1.0 / n if scale is None else scale
    if labels.dim() == (2 if labels.is_floating_point() else 1):
        labels = labels.unsqueeze(0).expand((K,) + tuple(labels.shape))
    if C == 1:  # one-logit binary model: BCE-with-logits
        y = labels.reshape(K, n, -1)[..., 0] if labels.is_floating_point() else labels.to(logits.dtype)
        per = F.binary_cross_entropy_with_logits(logits[..., 0], y, reduction="none")
        return per.sum(1) * scale
    if labels.is_floating_point():
        return -(labels * F.log_softmax(logits, dim=2)).sum((1, 2)) * scale
    per = F.cross_entropy(logits.reshape(K * n, C), labels.reshape(K * n), reduction="none")
    return per.reshape(K, n).sum(1) * scale


# --------------------------------------------------------------------------------------------
# engines
# --------------------------------------------------------------------------------------------
class AutogradBatchedEngine:
    """Gradients and second-order terms of K networks by autograd over :func:`batched_apply`."""

    name = "autograd"

    def __init__(self, model: FunctionalModel):
        if not supports_batched(model):
            raise ConfigError(f"{model.name} has no batched multi-network form")
        self.model = model

    def loss_grad(self, thetas: Tensor, x: Tensor, y: Tensor,
                  scale: Optional[float] = None) -> Tuple[Tensor, Tensor]:
        """``(ℓ [K], ∇_θ ℓ [K, P])`` (no graph kept)."""
        th = thetas.detach().requires_grad_(True)
        with torch.enable_grad():
            losses = batched_inner_loss(batched_apply(self.model, th, x.detach()), y, scale)
            g, = torch.autograd.grad(losses.sum(), th)
        return losses.detach(), g

    def loss_grad_hvp(self, thetas: Tensor, x: Tensor, y: Tensor, v: Tensor, *,
                      need_x: bool = True, need_y: bool = True):
        """``(g, H v, ∇_x Σ_k v_k·g_k, ∇_y Σ_k v_k·g_k)``; the last two None when not needed
        (``need_y`` only for soft labels)."""
        th = thetas.detach().requires_grad_(True)
        xx = x.detach().requires_grad_(need_x)
        yy = y.detach().requires_grad_(need_y and y.is_floating_point())
        with torch.enable_grad():
            losses = batched_inner_loss(batched_apply(self.model, th, xx), yy)
            g, = torch.autograd.grad(losses.sum(), th, create_graph=True)
            inputs = [th] + [z for z in (xx, yy) if z.requires_grad]
            outs = list(torch.autograd.grad(g, inputs, grad_outputs=v, allow_unused=True))
        hv = outs.pop(0)
        gx = outs.pop(0) if xx.requires_grad else None
        gy = outs.pop(0) if yy.requires_grad else None
        if gx is None and need_x:
            gx = torch.zeros_like(x)
        if gy is None and need_y and y.is_floating_point():
            gy = torch.zeros_like(y)
        return g.detach(), hv, gx, gy


class LeNetBatchedEngine:
    """LeNet's gradient and second-order pass for K networks, written out layer by layer.

    Layout: activations are network-major (``[K, C, n, H, W]`` for the convolutions, ``[K, F, n]``
    for the linear layers) so every layer is a GEMM batched over K (im2col for the convolutions;
    conv1 on shared images is a single GEMM for all networks). The memory-bound passes between
    the GEMMs are the ops :func:`~fastdistill.ops.im2col5` / ``col2im5`` and
    :func:`~fastdistill.ops.pool2_relu` (+ tangent, backward), which run on the C++ backend when
    the extension is built (``_backend``'s choice, recorded per op); the fully connected layers
    with their tangents and the softmax-CE head are the ops
    :func:`~fastdistill.ops.linear_relu_tangent` and :func:`~fastdistill.ops.ce_head` (fused
    Triton or CUDA kernels on a GPU; on CPU their reference, the torch expressions this engine
    issued before). Max-pool and ReLU run as pool-then-ReLU (equal values and, with
    PyTorch's first-maximum rule, equal subgradients) and the bias is added after the pool (a
    per-channel constant does not move the maximum).

    Second order by the R-operator (Pearlmutter 1994) in direction v = (Ẇ, ḃ): the forward pass
    carries tangents ``ż = Ẇ h + W ḣ + ḃ`` (ReLU masks and pool indices are constant), the
    backward pass carries ``δż``, and at each layer ``R{∇_W ℓ} = δż hᵀ + δz ḣᵀ`` (the HVP) while
    at the input ``R{∇_x ℓ} = Ẇᵀ δz + Wᵀ δż = ∇_x (v·g)`` (the mixed derivative; at the loss,
    ``R{∇_ỹ ℓ}`` likewise gives ``∇_ỹ (v·g)``). Each tangent pair is stacked into one GEMM
    (``[V | W] @ [h; ḣ]``), so a reverse step issues ~25 GEMMs for all K networks.

    The public methods run through the op :func:`~fastdistill.ops.lenet_step`: on CPU with the
    extension built, its ``cpp`` backend computes the same maths one network per thread with
    every activation cache-resident (2.1× this torch code at K = 16, on one core and on two:
    ``benches/bench_batched.py``); its ``reference`` backend is the torch code of this class (``backend="reference"`` forces
    it). The one-logit (binary) head always runs here.
    """

    name = "lenet-explicit"
    #: the ops it runs through the backend registry (recorded in the results' stats): the whole
    #: step (``lenet_step``: C++ on CPU) and, on its reference backend, the layer ops
    OPS = ("lenet_step", "im2col5", "col2im5", "pool2_relu", "pool2_relu_tangent", "pool2_relu_backward",
           "linear_relu_tangent", "ce_head")

    def __init__(self, model: LeNet, backend: Optional[str] = None):
        if not isinstance(model, LeNet):
            raise ConfigError(f"the explicit batched engine implements LeNet only, not {model.name}")
        self.model = model
        #: forced backend of ``lenet_step`` (None: the registry's choice, C++ when built)
        self.backend = backend
        self.C = model.input_shape[0]
        self.size = model.input_shape[1]
        self.O = model.num_outputs

    # -- parameters --------------------------------------------------------------------------
    def _weights(self, th: Tensor) -> List[Tensor]:
        """[W1 K×6×C·25, b1 K×6, W2 K×16×150, b2, F1 K×120×400, c1, F2, c2, F3, c3]."""
        K = th.shape[0]
        p = torch.split(th, [s.numel for s in self.model.specs], dim=1)
        return [p[0].reshape(K, 6, self.C * 25), p[1], p[2].reshape(K, 16, 150), p[3],
                p[4].reshape(K, 120, 400), p[5], p[6].reshape(K, 84, 120), p[7],
                p[8].reshape(K, self.O, 84), p[9]]

    # -- the loss ----------------------------------------------------------------------------
    def _labels(self, y: Tensor, n: int, dtype) -> Tensor:
        """Targets as ``[K or 1, O, n]`` floats (one-hot for hard multi-class labels)."""
        per_net = y.dim() == (3 if y.is_floating_point() else 2)
        yk = y if per_net else y.unsqueeze(0)
        if self.O == 1:
            t = yk.reshape(yk.shape[0], n, -1)[..., 0] if y.is_floating_point() else yk
            return t.to(dtype).unsqueeze(1)
        if not y.is_floating_point():
            yk = F.one_hot(yk, self.O)
        return yk.to(dtype).transpose(1, 2)

    def _loss_head(self, z: Tensor, Y: Tensor, scale: float):
        """One-logit BCE head: ``(ℓ [K], δz, σ)`` for logits ``z [K, 1, n]``; σ feeds the tangent.

        ``ℓ = s Σ softplus(z) − ỹ z``, ``δz = s (σ − ỹ)`` (softmax CE is the op ``ce_head``).
        """
        sg = torch.sigmoid(z)
        loss = (F.binary_cross_entropy_with_logits(z, Y.expand_as(z), reduction="none")
                .sum((1, 2)) * scale)
        return loss, (sg - Y) * scale, sg

    def _loss_tangent(self, zd: Tensor, sg: Tensor, scale: float):
        """One-logit head: (δż, R{∇_ỹ ℓ}) in the ``[K, 1, n]`` layout."""
        return sg * (1 - sg) * zd * scale, -zd * scale

    def _head(self, z: Tensor, Y: Tensor, scale: float, zd: Optional[Tensor]):
        """``(ℓ, δz, δż, R{∇_ỹ ℓ})`` (the last two None without ``zd``): the op
        :func:`~fastdistill.ops.ce_head` for softmax CE (fused Triton/CUDA kernel on a GPU, its
        torch reference elsewhere), the two methods above for the one-logit head."""
        if self.O != 1:
            # the fused kernels are not differentiable: under autograd the reference runs
            return ce_head(z, Y, scale, zd,
                           backend="reference" if needs_grad(z, Y, zd) else None)
        loss, dz, aux = self._loss_head(z, Y, scale)
        if zd is None:
            return loss, dz, None, None
        return (loss, dz) + self._loss_tangent(zd, aux, scale)

    # -- the passes --------------------------------------------------------------------------
    def _forward(self, th: Tensor, x: Tensor, shared: bool, v: Optional[Tensor]):
        K = th.shape[0]
        n = x.shape[0] if shared else x.shape[1]
        W = self._weights(th)
        V = self._weights(v) if v is not None else None
        tan = V is not None
        S = 2 if tan else 1                                             # value (+ tangent) stack
        c = {"W": W, "V": V, "K": K, "n": n, "shared": shared}
        # conv1: rows (s, k, c_out); the tangent has no ẋ (v moves θ only)
        w1 = torch.stack([W[0], V[0]]) if tan else W[0].unsqueeze(0)     # [S, K, 6, C·25]
        if shared:
            X = im2col5(x.transpose(0, 1).unsqueeze(0), self.model.pad)[0]   # [C·25, n·784]
            Z = w1.reshape(S * K * 6, -1) @ X
        else:
            X = im2col5(x.transpose(1, 2), self.model.pad)                   # [K, C·25, n·784]
            Z = torch.bmm(w1.transpose(0, 1).reshape(K, S * 6, -1), X)
            Z = Z.reshape(K, S, 6, -1).transpose(0, 1).reshape(S * K * 6, -1)
        c["X"] = X
        a1, i1 = pool2_relu(Z[:K * 6].view(K * 6, n, 28, 28), W[1].reshape(-1))  # [K·6, n, 14, 14]
        A = a1.view(K, 6, n, 14, 14)
        if tan:  # [a1 | ȧ1] stacked by channel: one im2col feeds both conv2 GEMMs
            a1d = pool2_relu_tangent(Z[K * 6:].view(K * 6, n, 28, 28), V[1].reshape(-1), i1, a1)
            A = torch.cat([A, a1d.view(K, 6, n, 14, 14)], 1)
        c.update(a1=a1, i1=i1)
        U = im2col5(A, 0)                                               # [K, S·150, n·100]
        c["U"] = U
        z2 = torch.bmm(W[2], U[:, :150])                                # [K, 16, n·100]
        a2, i2 = pool2_relu(z2.view(K * 16, n, 10, 10), W[3].reshape(-1))
        c.update(a2=a2, i2=i2)
        flat = lambda a: a.reshape(K, 16, n, 25).transpose(2, 3).reshape(K, 400, n)  # noqa: E731
        f0 = flat(a2)
        f0d = None
        if tan:
            z2d = torch.bmm(torch.cat([V[2], W[2]], 2), U)              # V2 U + W2 U̇
            f0d = flat(pool2_relu_tangent(z2d.view(K * 16, n, 10, 10), V[3].reshape(-1), i2, a2))

        def lin(i, h, hd, relu):  # relu(W h + b) and its tangent V h + W ḣ + ḃ (masked)
            return linear_relu_tangent(h, hd, W[i], V[i] if tan else None, W[i + 1],
                                       V[i + 1] if tan else None, relu=relu)
        h1, h1d = lin(4, f0, f0d, True)
        h2, h2d = lin(6, h1, h1d, True)
        z, zd = lin(8, h2, h2d, False)                                  # [K, O, n]
        c.update(f0=f0, h1=h1, h2=h2)
        if tan:
            c.update(f0d=f0d, h1d=h1d, h2d=h2d, zd=zd)
        return z, c

    def _backward(self, c, dz: Tensor, dzd: Optional[Tensor], need_x: bool):
        """(∇_θ ℓ, R{∇_θ ℓ} = H v, R{∇_x ℓ}) from ``δz`` (and ``δż``)."""
        W, V, K, n = c["W"], c["V"], c["K"], c["n"]
        tan = dzd is not None
        g, gd = [None] * 10, [None] * 10

        def linear_back(i, d, dd, h, hd, mask):
            # z = W h + b: ∇W = δz hᵀ, ∇b = Σ δz, δh = Wᵀ δz; R{∇W} = δż hᵀ + δz ḣᵀ,
            # R{δh} = Vᵀ δz + Wᵀ δż
            g[i], g[i + 1] = torch.bmm(d, h.transpose(1, 2)), d.sum(2)
            wt = W[i].transpose(1, 2).contiguous()
            if not tan:
                dh = torch.bmm(wt, d)
                return (dh * mask if mask is not None else dh), None
            gd[i] = torch.bmm(torch.cat([dd, d], 2), torch.cat([h, hd], 2).transpose(1, 2))
            gd[i + 1] = dd.sum(2)
            both = torch.bmm(wt, torch.cat([d, dd], 2))                 # [Wᵀ δz | Wᵀ δż]
            dh, dhd = both[..., :n], torch.baddbmm(both[..., n:], V[i].transpose(1, 2), d)
            if mask is not None:
                dh, dhd = dh * mask, dhd * mask
            return dh, dhd

        d, dd = linear_back(8, dz, dzd, c["h2"], c.get("h2d"), c["h2"] > 0)
        d, dd = linear_back(6, d, dd, c["h1"], c.get("h1d"), c["h1"] > 0)
        d, dd = linear_back(4, d, dd, c["f0"], c.get("f0d"), None)
        # pool2 (+bias, ReLU): [K, 400, n] -> [S, K·16, n, 5, 5] -> pre-pool [K, S·16, n·100]
        dp = torch.stack([d, dd]) if tan else d.unsqueeze(0)
        S = dp.shape[0]
        dp = dp.reshape(S, K, 16, 25, n).transpose(3, 4).reshape(S, K * 16, n, 5, 5)
        dz2, gb2 = pool2_relu_backward(dp, c["i2"], c["a2"])
        g[3] = gb2[0]
        D2 = dz2.reshape(S, K, 16, n * 100).transpose(0, 1).reshape(K, S * 16, n * 100)  # δz2 (, δż2)
        U = c["U"]
        G = torch.bmm(D2, U.transpose(1, 2))                            # [K, S·16, S·150]
        g[2] = G[:, :16, :150]
        w2t = W[2].transpose(1, 2).contiguous()
        dA = [col2im5(torch.bmm(w2t, D2[:, :16]), 14, 14, 0)]           # Wᵀ δz2, [K, 6, n, 14, 14]
        if tan:
            gd[3] = gb2[1]
            gd[2] = G[:, 16:, :150] + G[:, :16, 150:]                   # δż U + δz U̇
            vw = torch.cat([V[2], W[2]], 1).transpose(1, 2).contiguous()
            dA.append(col2im5(torch.bmm(vw, D2), 14, 14, 0))            # Vᵀ δz + Wᵀ δż
        # pool1 (+bias, ReLU) back to conv1's output, rows (s, k, c_out)
        dz1, gb1 = pool2_relu_backward(torch.stack(dA).view(S, K * 6, n, 14, 14), c["i1"], c["a1"])
        g[1] = gb1[0]
        D1 = dz1.view(S * K * 6, n * 784)
        X = c["X"]
        dx = None
        if c["shared"]:
            gw = (D1 @ X.t()).reshape(S, K, -1)                         # [S, K, 6·C·25]
            if tan and need_x:  # Σ_k Ẇ1_kᵀ δz1_k + W1_kᵀ δż1_k
                dx = torch.cat([V[0], W[0]]).reshape(2 * K * 6, -1).t() @ D1
        else:
            Dk = D1.reshape(S, K, 6, -1).transpose(0, 1).reshape(K, S * 6, -1)
            gw = torch.bmm(Dk, X.transpose(1, 2)).reshape(K, S, -1).transpose(0, 1)
            if tan and need_x:
                dx = torch.bmm(torch.cat([V[0], W[0]], 1).transpose(1, 2), Dk)
        g[0] = gw[0]
        if tan:
            gd[0], gd[1] = gw[1], gb1[1]
        cat = lambda parts: torch.cat([q.reshape(K, -1) for q in parts], 1)  # noqa: E731
        return cat(g), (cat(gd) if tan else None), dx

    def _input_grad(self, dx: Tensor, shared: bool, n: int) -> Tensor:
        """im2col adjoint at the input: ``[.., C·25, n·784]`` -> the input's layout."""
        hw, pad = self.size, self.model.pad
        if shared:
            return col2im5(dx.unsqueeze(0), hw, hw, pad)[0].transpose(0, 1)
        return col2im5(dx, hw, hw, pad).transpose(1, 2)

    # -- the public interface ----------------------------------------------------------------
    def loss_grad(self, thetas: Tensor, x: Tensor, y: Tensor,
                  scale: Optional[float] = None) -> Tuple[Tensor, Tensor]:
        """``(ℓ [K], ∇_θ ℓ [K, P])`` for K networks; ``scale`` as in :func:`batched_inner_loss`."""
        K = _check(self.model, thetas)
        x, shared = _input_nkc(self.model, x, K)
        n = x.shape[0] if shared else x.shape[1]
        scale = 1.0 / n if scale is None else scale
        with torch.no_grad():
            if self.O == 1:
                return self._loss_grad_torch(thetas.detach(), x.detach(), shared, y, scale)
            loss, g, *_ = lenet_step(thetas.detach(), x.detach(), self._targets(y, n, thetas.dtype),
                                     None, scale=scale, backend=self.backend)
        return loss, g

    def loss_grad_hvp(self, thetas: Tensor, x: Tensor, y: Tensor, v: Tensor, *,
                      need_x: bool = True, need_y: bool = True):
        """``(g, H v, ∇_x Σ_k v_k·g_k, ∇_y Σ_k v_k·g_k)`` (see :class:`AutogradBatchedEngine`)."""
        K = _check(self.model, thetas)
        x, shared = _input_nkc(self.model, x, K)
        if v.shape != thetas.shape:
            raise ShapeError(f"the direction v must have θ's shape {list(thetas.shape)}, got {list(v.shape)}")
        n = x.shape[0] if shared else x.shape[1]
        soft = need_y and y.is_floating_point()
        with torch.no_grad():
            if self.O == 1:
                _, g, hv, gx, gy = self._loss_grad_hvp_torch(thetas.detach(), x.detach(), shared, y,
                                                             v.detach(), 1.0 / n, need_x, need_y)
                return g, hv, gx, gy
            _, g, hv, gx, gy = lenet_step(thetas.detach(), x.detach(), self._targets(y, n, thetas.dtype),
                                          v.detach(), scale=1.0 / n, need_x=need_x, need_y=soft,
                                          backend=self.backend)
        if gy is not None and y.dim() == 2:     # labels shared by the networks: [n, O]
            gy = gy[0]
        return g, hv, gx, gy

    def _targets(self, y: Tensor, n: int, dtype) -> Tensor:
        """Labels as ``lenet_step``'s ``[1 or K, n, O]`` float targets."""
        return self._labels(y, n, dtype).transpose(1, 2).contiguous()

    # -- the same in torch ops (the reference of lenet_step, and the one-logit head) ---------
    def _loss_grad_torch(self, th: Tensor, x: Tensor, shared: bool, y: Tensor, scale: float):
        z, c = self._forward(th, x, shared, None)
        loss, dz, _, _ = self._head(z, self._labels(y, c["n"], z.dtype), scale, None)
        g, _, _ = self._backward(c, dz, None, False)
        return loss, g

    def _loss_grad_hvp_torch(self, th: Tensor, x: Tensor, shared: bool, y: Tensor, v: Tensor,
                             scale: float, need_x: bool, need_y: bool):
        """``(ℓ, g, H v, ∇_x Σ v·g or None, ∇_y Σ v·g or None)``."""
        K = th.shape[0]
        z, c = self._forward(th, x, shared, v)
        n = c["n"]
        loss, dz, dzd, dyk = self._head(z, self._labels(y, n, z.dtype), scale, c["zd"])
        g, hv, dx = self._backward(c, dz, dzd, need_x)
        gx = self._input_grad(dx, shared, n) if need_x else None
        gy = None
        if need_y and y.is_floating_point():
            per_net = y.dim() == 3
            if self.O == 1:   # BCE sees ỹ[..., 0] only
                gy = torch.zeros((K,) + tuple(y.shape[-2:]) if per_net else tuple(y.shape),
                                 dtype=y.dtype, device=y.device)
                gy[..., 0] = dyk[:, 0, :] if per_net else dyk[:, 0, :].sum(0)
            else:
                t = dyk.transpose(1, 2)                             # [K, n, O]
                gy = t if per_net else t.sum(0)
        return loss, g, hv, gx, gy


#: name -> engine class; ``auto`` picks the explicit engine when the model has one
ENGINES = {"autograd": AutogradBatchedEngine, "lenet-explicit": LeNetBatchedEngine}


def batched_engine(model: FunctionalModel, name: str = "auto"):
    """The engine for ``model``: ``auto`` (explicit LeNet when possible, else autograd),
    ``autograd`` or ``lenet-explicit``.

    Raises:
        ConfigError: an unknown engine, a model without a batched form, or an explicitly
            requested engine that does not implement this model.
    """
    if name == "auto":
        return LeNetBatchedEngine(model) if isinstance(model, LeNet) else AutogradBatchedEngine(model)
    if name not in ENGINES:
        raise ConfigError(f"unknown batched engine {name!r}; choose auto, {', '.join(ENGINES)}")
    return ENGINES[name](model)
