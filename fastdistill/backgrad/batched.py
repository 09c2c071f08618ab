"""``batched``: the stored strategy for K networks at once (random-init DD's inner loops).

Random-init dataset distillation averages the meta-gradient over K networks, each unrolled from
its own θ_0^k on the same distilled data. The per-network loop runs K tiny-batch unrolls one
after another; here the K unrolls advance together, one batched computation per inner step
(:mod:`fastdistill.models.batched`), forward and reverse:

Forward, for t = 0 … T−1 (all k at once; θ_t kept, as in ``stored``)::

    g_t^k = ∇_θ ℓ(f(x̃_{s(k,t)}; θ_t^k), ỹ_{s(k,t)})
    GD:        θ_{t+1}^k = θ_t^k − η_t g_t^k
    momentum:  v_{t+1}^k = β_t v_t^k − (1−β_t) g_t^k,  θ_{t+1}^k = θ_t^k + α_t v_{t+1}^k

Reverse (GD), λ^k = ∇L_k(θ_T^k), for t = T−1 … 0 -- invariant: at the top of step t, ``lam[k]``
holds ∂L_k/∂θ_{t+1}^k::

    ∂L/∂η_t   = −Σ_k λ^k · g_t^k / K
    ∂L/∂x̃_s  += −η_t Σ_k ∇_x̃ (λ^k · g_t^k) / K       (one batched R-op pass gives all k)
    ∂L/∂ỹ_s  += −η_t Σ_k ∇_ỹ (λ^k · g_t^k) / K
    λ^k       = λ^k − η_t H_t^k λ^k

Momentum follows :func:`fastdistill.backgrad.stored.reverse_sgdm_step` row by row. With the
default ``reduce="mean"`` the results are the gradients of the average outer loss
``(1/K) Σ_k L_k`` with respect to the shared quantities (data, labels, lrs, betas); ∂/∂θ_0 is per
network (``theta0[k] = ∂L_k/∂θ_0^k``).

Memory: T·K·P stored states (T·K·2P with momentum) plus one batched step's buffers.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor

from .. import _backend
from ..errors import ConfigError, ShapeError
from ..models.base import FunctionalModel
from ..models.batched import batched_apply, batched_engine, batched_inner_loss, supports_batched
from .common import InnerProblem, MetaGradient, check_finite, inner_loss

__all__ = ["meta_gradient_batched", "meta_gradient_batched_reference", "BatchedOuterLoss",
           "make_batched_outer_loss"]

#: images × networks evaluated together by the outer loss (bounds its memory to ~150 MB in fp32)
OUTER_CHUNK = 1024
#: real images per network per call of the C++ step in the outer loss: small enough for each
#: network's activations to stay in cache (measured best of 8..1024 on the 2-core dev CPU)
OUTER_IMAGES_PER_NET = 32


class BatchedOuterLoss:
    """DD's outer objective for K networks: ``L_k(θ_k) = CE(f(x_real; θ_k), y_real)``.

    ``loss(thetas [K, P]) -> [K]`` (differentiable), ``single(θ [P]) -> scalar`` (the same
    objective through ``model.apply``, what :func:`make_outer_loss` returns), and
    :meth:`loss_grad` (values and ∇_θ for all K networks).

    ``mode`` picks how :meth:`loss_grad` runs: ``"per-network"`` (K autograd passes through
    ``model.apply``), ``"batched"`` (the batched engine, ``chunk // K`` real examples at a time)
    or ``"auto"`` (default): batched when the engine is LeNet's explicit one on its C++ backend
    (``lenet_step``, :data:`OUTER_IMAGES_PER_NET` real images per network per call: 85 vs 160
    CPU-ms per network at DD's 1024 real images, K = 4, one thread, the ``outer`` case of
    ``benches/bench_batched.py``) and there are at least as many networks as torch threads
    (the step runs one network per thread; with fewer, oneDNN's multi-threaded convolutions of
    the per-network pass win), per-network otherwise (on the torch layer ops the batched engine
    loses to oneDNN's large convolutions).
    """

    batched = True

    def __init__(self, model: FunctionalModel, x: Tensor, y: Tensor, chunk: Optional[int] = None,
                 mode: str = "auto"):
        model.check_input(x)
        if len(x) != len(y):
            raise ShapeError(f"outer batch has {len(x)} inputs but {len(y)} labels")
        if mode not in ("auto", "per-network", "batched"):
            raise ConfigError(f"outer-loss mode must be 'auto', 'per-network' or 'batched', got {mode!r}")
        self.model, self.x, self.y, self.mode = model, x, y, mode
        self.chunk = None if chunk is None else int(chunk)

    def __call__(self, thetas: Tensor) -> Tensor:
        return batched_inner_loss(batched_apply(self.model, thetas, self.x), self.y)

    def single(self, theta: Tensor) -> Tensor:
        return inner_loss(self.model.apply(theta, self.x), self.y)

    def loss_grad(self, thetas: Tensor, engine) -> tuple:
        """``(L [K], ∇_θ L [K, P])`` (see ``mode``)."""
        K, N = thetas.shape[0], len(self.x)
        cpp = _runs_lenet_step_cpp(engine, thetas.device)
        mode = self.mode
        if mode == "auto":  # the C++ step runs one network per thread: K ≥ threads keeps all busy
            mode = "batched" if cpp and K >= torch.get_num_threads() else "per-network"
        if mode == "per-network":
            return _per_network_loss_grad([self.single] * K, thetas)
        if self.chunk is not None:
            step = max(1, self.chunk // K)
        else:
            step = OUTER_IMAGES_PER_NET if cpp else max(1, OUTER_CHUNK // K)
        total_L, total_g = None, None
        for a in range(0, N, step):
            L, g = engine.loss_grad(thetas, self.x[a:a + step], self.y[a:a + step], scale=1.0 / N)
            total_L = L if total_L is None else total_L + L
            total_g = g if total_g is None else total_g + g
        return total_L, total_g


def make_batched_outer_loss(model: FunctionalModel, x: Tensor, y: Tensor,
                            chunk: Optional[int] = None, mode: str = "auto") -> BatchedOuterLoss:
    """The batched twin of :func:`fastdistill.backgrad.make_outer_loss` (``chunk``: networks ×
    images per engine call; default :data:`OUTER_IMAGES_PER_NET` per network on the C++ step,
    else :data:`OUTER_CHUNK` in all)."""
    return BatchedOuterLoss(model, x, y, chunk, mode)


def _runs_lenet_step_cpp(engine, device) -> bool:
    """Whether ``engine`` computes through ``lenet_step``'s C++ backend on ``device``."""
    if getattr(engine, "name", None) != "lenet-explicit" or engine.O == 1:
        return False
    from ..ops.lenet_step import OP
    try:
        return _backend.resolve(OP, device, engine.backend)[0] == "cpp"
    except Exception:  # noqa: BLE001 - an unavailable forced backend fails later, with its message
        return False


def _per_network_loss_grad(fns, theta_T: Tensor):
    Ls, lams = [], []
    for k, fn in enumerate(fns):
        th = theta_T[k].detach().requires_grad_(True)
        with torch.enable_grad():
            Lk = fn(th)
            g, = torch.autograd.grad(Lk, th)
        Ls.append(Lk.detach())
        lams.append(g)
    return torch.stack(Ls), torch.stack(lams)


OuterLosses = Union[BatchedOuterLoss, Callable[[Tensor], Tensor], Sequence[Callable[[Tensor], Tensor]]]


def _per_network_outer(outer_loss: OuterLosses, K: int):
    """One ``L(θ [P]) -> scalar`` per network."""
    if isinstance(outer_loss, BatchedOuterLoss):
        return [outer_loss.single] * K
    if callable(outer_loss):
        return [outer_loss] * K
    losses = list(outer_loss)
    if len(losses) != K:
        raise ShapeError(f"got {len(losses)} outer losses for {K} networks")
    return losses


def _outer_grad(outer_loss: OuterLosses, theta_T: Tensor, engine):
    if isinstance(outer_loss, BatchedOuterLoss):
        L, lam = outer_loss.loss_grad(theta_T, engine)
    else:
        L, lam = _per_network_loss_grad(_per_network_outer(outer_loss, theta_T.shape[0]), theta_T)
    check_finite(L, "the outer loss")
    return L, lam


def _check_orders(orders: Optional[Tensor], K: int, T: int, S: int) -> Optional[Tensor]:
    if orders is None:
        return None
    if orders.dtype != torch.long or tuple(orders.shape) != (K, T):
        raise ShapeError(f"orders must be an int64 [K, T] = [{K}, {T}] tensor of step indices, got "
                         f"{orders.dtype} {list(orders.shape)}")
    if len(orders) and (orders.min() < 0 or orders.max() >= S):
        raise ShapeError(f"orders must index the {S} distilled steps, got range "
                         f"[{int(orders.min())}, {int(orders.max())}]")
    return orders


def meta_gradient_batched(model: FunctionalModel, theta0s: Tensor, data: Tensor, labels: Tensor,
                          lrs: Tensor, outer_loss: OuterLosses, *, betas: Optional[Tensor] = None,
                          orders: Optional[Tensor] = None, reduce: str = "mean",
                          engine: str = "auto", need_data: bool = True, need_labels: bool = True,
                          need_theta0: bool = True) -> MetaGradient:
    """Unroll K networks together and return their (averaged) exact meta-gradient.

    The result equals :func:`meta_gradient_batched_reference` (K calls of
    :func:`~fastdistill.backgrad.meta_gradient`) up to floating-point summation order.

    Args:
        model: :class:`~fastdistill.models.LeNet` or :class:`~fastdistill.models.AlexCifarNet`
            (:func:`~fastdistill.models.batched.supports_batched`).
        theta0s: θ_0^k, ``[K, P]`` (rows may repeat for a fixed init).
        data: x̃, ``[S, n, *input_shape]``.
        labels: ỹ, ``[S, n]`` int64 or ``[S, n, C]`` float (soft).
        lrs: η_t (α_t for momentum), ``[T]``.
        outer_loss: a :class:`BatchedOuterLoss` (fast: evaluated for all K at once), one
            callable ``L(θ [P]) -> scalar`` used for every network, or a sequence of K of them.
        betas: β_t, ``[T]``, for SGD with momentum (as :func:`meta_gradient`).
        orders: optional int64 ``[K, T]``: network k trains at step t on ``data[orders[k, t]]``
            (its own data order); default ``t mod S`` for every network.
        reduce: ``"mean"`` (average the shared gradients over networks) or ``"none"``
            (``data``/``labels`` ``[K, ...]``, ``lrs``/``betas`` ``[K, T]``).
        engine: ``"auto"`` (explicit LeNet engine when possible), ``"autograd"``, or
            ``"lenet-explicit"`` (:func:`~fastdistill.models.batched.batched_engine`).
        need_*: skip gradients the caller does not need.
    Returns:
        :class:`MetaGradient`: ``loss`` = mean_k L_k, ``theta_T`` ``[K, P]``, ``theta0``
        ``[K, P]`` (per network), the reduced gradients, and ``stats`` with ``losses`` ``[K]``,
        ``K``, ``engine``, ``stored_bytes``, ``recomputed_steps``.
    Raises:
        ConfigError: an unsupported model, engine or ``reduce``; ShapeError: inconsistent shapes;
        DivergenceError: a non-finite learning rate, state or outer loss.

    Example::

        >>> import torch
        >>> from fastdistill.models import LeNet
        >>> from fastdistill.backgrad import meta_gradient_batched, make_batched_outer_loss
        >>> m = LeNet()
        >>> th0 = torch.stack([m.init("xavier", torch.Generator().manual_seed(k)) for k in range(4)])
        >>> x = torch.randn(1, 10, 1, 28, 28); y = torch.arange(10).view(1, 10)
        >>> L = make_batched_outer_loss(m, torch.randn(64, 1, 28, 28), torch.arange(64) % 10)
        >>> out = meta_gradient_batched(m, th0, x, y, torch.full((3,), 0.02), L)
        >>> out.data.shape, out.stats["losses"].shape
        (torch.Size([1, 10, 1, 28, 28]), torch.Size([4]))
    """
    if reduce not in ("mean", "none"):
        raise ConfigError(f"reduce must be 'mean' or 'none', got {reduce!r}")
    if not supports_batched(model):
        raise ConfigError(f"{model.name} has no batched form; use meta_gradient per network")
    if theta0s.dim() != 2 or theta0s.shape[1] != model.num_params:
        raise ShapeError(f"θ_0 for K networks must be [K, {model.num_params}], got {list(theta0s.shape)}")
    prob = InnerProblem(model, data, labels, lrs, betas)
    eng = batched_engine(model, engine)
    _backend.reset_usage(getattr(eng, "OPS", ()))   # the stats report what ran in this call only
    K, T, S = theta0s.shape[0], prob.T, prob.steps
    orders = _check_orders(orders, K, T, S)
    per_net = orders is not None or reduce == "none"
    need_labels = need_labels and prob.soft
    X, Y = prob.data.detach(), prob.labels.detach()
    lr = prob.lrs.detach()
    beta = prob.betas.detach() if prob.momentum else None

    def batch(t):
        """(x, y) of step t: shared ``[n, ...]``, or per network ``[K, n, ...]``."""
        if orders is not None:
            return X[orders[:, t]], Y[orders[:, t]]
        x, y = X[t % S], Y[t % S]
        if per_net:
            return x.expand((K,) + tuple(x.shape)), y.expand((K,) + tuple(y.shape))
        return x, y

    # -- forward: keep θ_t (and v_t) -----------------------------------------------------------
    th = theta0s.detach().clone()
    v = torch.zeros_like(th) if prob.momentum else None
    kept = []
    for t in range(T):
        kept.append((th, v))
        x, y = batch(t)
        _, g = eng.loss_grad(th, x, y)
        if prob.momentum:
            v = beta[t] * v - (1 - beta[t]) * g
            th = th + lr[t] * v
        else:
            th = th - lr[t] * g
    check_finite(th, "θ_T after the inner loop")
    theta_T = th
    L, lam = _outer_grad(outer_loss, theta_T, eng)

    # -- reverse ----------------------------------------------------------------------------
    acc_shape = lambda ref: ((K,) if per_net else ()) + tuple(ref.shape)  # noqa: E731
    gdata = torch.zeros(acc_shape(X), dtype=X.dtype) if need_data else None
    glab = torch.zeros(acc_shape(Y), dtype=Y.dtype) if need_labels else None
    glr = torch.zeros((K, T), dtype=lr.dtype)
    gbeta = torch.zeros((K, T), dtype=lr.dtype) if prob.momentum else None
    rows = torch.arange(K)

    def accumulate(acc, grad, t, coef):
        # acc -= coef · grad into the step(s) that step t trained on
        if acc is None or grad is None:
            return
        if orders is None:
            (acc[:, t % S] if per_net else acc[t % S]).sub_(coef * grad)
        else:   # per network, its own step index; (k, s) pairs are distinct, no write races
            acc.index_put_((rows, orders[:, t]), -coef * grad, accumulate=True)

    dv = torch.zeros_like(lam) if prob.momentum else None
    v_next = v
    for t in range(T - 1, -1, -1):
        # top of step t: lam = ∂L_k/∂θ_{t+1} (and dv = ∂L_k/∂v_{t+1}, v_next = v_{t+1}), rows k
        th_t, v_t = kept[t]
        x, y = batch(t)
        if prob.momentum:
            a, b = lr[t], beta[t]
            glr[:, t] = (lam * v_next).sum(1)
            dv = dv + a * lam
            g, hv, gx, gy = eng.loss_grad_hvp(th_t, x, y, dv, need_x=need_data, need_y=need_labels)
            gbeta[:, t] = (dv * (v_t + g)).sum(1)
            lam = lam - (1 - b) * hv
            accumulate(gdata, gx, t, 1 - b)
            accumulate(glab, gy, t, 1 - b)
            dv = b * dv
            v_next = v_t
        else:
            eta = lr[t]
            g, hv, gx, gy = eng.loss_grad_hvp(th_t, x, y, lam, need_x=need_data, need_y=need_labels)
            glr[:, t] = -(g * lam).sum(1)
            accumulate(gdata, gx, t, eta)
            accumulate(glab, gy, t, eta)
            lam = lam - eta * hv

    if reduce == "mean":
        k = 1.0 / K
        if per_net:
            gdata = gdata.sum(0) * k if gdata is not None else None
            glab = glab.sum(0) * k if glab is not None else None
        else:
            gdata = gdata * k if gdata is not None else None
            glab = glab * k if glab is not None else None
        glr = glr.sum(0) * k
        gbeta = gbeta.sum(0) * k if gbeta is not None else None
    per_state = theta0s.shape[1] * theta0s.element_size() * (2 if prob.momentum else 1)
    return MetaGradient(loss=L.mean(), theta_T=theta_T, data=gdata, labels=glab, lrs=glr,
                        betas=gbeta, theta0=lam if need_theta0 else None,
                        stats={"strategy": "batched", "engine": eng.name, "K": K, "losses": L,
                               "stored_bytes": T * K * per_state, "recomputed_steps": T,
                               "backends": _op_backends(eng)})


def _op_backends(engine) -> dict:
    """Which backend ran each layer op of the engine (``_backend.last_used``; the engine's ops
    are forgotten when a meta-gradient call starts, so this is what ran in that call)."""
    ops = getattr(engine, "OPS", ())
    used = {op: _backend.last_used(op) for op in ops}
    return {op: c.backend for op, c in used.items() if c is not None}


def meta_gradient_batched_reference(model: FunctionalModel, theta0s: Tensor, data: Tensor,
                                    labels: Tensor, lrs: Tensor, outer_loss: OuterLosses, *,
                                    betas: Optional[Tensor] = None, orders: Optional[Tensor] = None,
                                    reduce: str = "mean", strategy: str = "stored",
                                    need_data: bool = True, need_labels: bool = True,
                                    need_theta0: bool = True) -> MetaGradient:
    """The plain twin of :func:`meta_gradient_batched`: K calls of ``meta_gradient``, one per
    network, with ``strategy`` (``stored`` by default, on its per-step autograd engine, never
    the explicit LeNet engine this function is the reference for; ``autograd`` is the oracle in
    tests).

    Any model works. With ``orders``, network k's data are ``data[orders[k]]`` (T steps) and its
    data/label gradients are added back to the steps they came from.
    """
    from . import meta_gradient  # the package entry point (imports this module)

    if reduce not in ("mean", "none"):
        raise ConfigError(f"reduce must be 'mean' or 'none', got {reduce!r}")
    if theta0s.dim() != 2:
        raise ShapeError(f"θ_0 for K networks must be [K, P], got {list(theta0s.shape)}")
    K = theta0s.shape[0]
    prob = InnerProblem(model, data, labels, lrs, betas)
    orders = _check_orders(orders, K, prob.T, prob.steps)
    need_labels = need_labels and prob.soft
    outers = _per_network_outer(outer_loss, K)
    outs = []
    for k in range(K):
        d, y = (data, labels) if orders is None else (data[orders[k]], labels[orders[k]])
        o = meta_gradient(model, theta0s[k], d, y, lrs, outers[k], betas=betas, strategy=strategy,
                          need_data=need_data, need_labels=need_labels, need_theta0=need_theta0,
                          **({"engine": "autograd"} if strategy == "stored" else {}))
        if orders is not None:
            if o.data is not None:
                o.data = torch.zeros_like(data).index_add_(0, orders[k], o.data)
            if o.labels is not None:
                o.labels = torch.zeros_like(labels).index_add_(0, orders[k], o.labels)
        outs.append(o)

    def stack(name):
        vals = [getattr(o, name) for o in outs]
        if vals[0] is None:
            return None
        s = torch.stack(vals)
        return s.mean(0) if reduce == "mean" else s

    L = torch.stack([o.loss for o in outs])
    return MetaGradient(loss=L.mean(), theta_T=torch.stack([o.theta_T for o in outs]),
                        data=stack("data"), labels=stack("labels"), lrs=stack("lrs"),
                        betas=stack("betas"),
                        theta0=torch.stack([o.theta0 for o in outs]) if need_theta0 else None,
                        stats={"strategy": f"reference-loop/{strategy}", "engine": "per-network",
                               "K": K, "losses": L,
                               "stored_bytes": sum((o.stats.get("stored_bytes") or 0) for o in outs),
                               "recomputed_steps": sum(o.stats.get("recomputed_steps", 0) for o in outs)})
