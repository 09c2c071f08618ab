"""``stored``: keep θ_t (and v_t for momentum), recompute one step at a time in reverse.

Reverse mode for plain GD (ALGORITHMS.md §4), with ``g_t = ∇_θ ℓ(x̃_t, ỹ_t; θ_t)``::

    ∂L/∂η_t  = −λ_{t+1} · g_t
    ∂L/∂x̃_t += −η_t ∇_x̃ (λ_{t+1} · g_t)
    ∂L/∂ỹ_t += −η_t ∇_ỹ (λ_{t+1} · g_t)
    λ_t      = λ_{t+1} − η_t H_t λ_{t+1}

Memory: T·P numbers for the stored states plus one step's double-backward graph, never the
graphs of all steps.

Engines (``engine=``): ``autograd`` recomputes each reverse step with double backward (any
model; the reference). For LeNet, ``auto`` runs the same recursion through the explicit LeNet
engine (:class:`~fastdistill.models.batched.LeNetBatchedEngine` with one network: the gradient
and the R-operator pass written out, no autograd graph), which makes ``stored`` no slower per step
than ``autograd`` instead of 9–46 % slower (``benches/RESULTS.md``). Both give the same gradients
(float64 tests at 1e-10); the engine that ran is ``stats["engine"]``.
"""
from __future__ import annotations

from typing import Callable, List

import torch
from torch import Tensor

from .. import _backend
from ..errors import ConfigError
from .common import InnerProblem, MetaGradient, check_finite

__all__ = ["stored_strategy", "STORED_ENGINES", "explicit_engine", "engine_stats", "reverse_gd_step",
           "reverse_sgdm_step", "forward_states"]


def _grad(prob: InnerProblem, theta: Tensor, t: int, eng=None) -> Tensor:
    """g_t = ∇_θ ℓ(x̃_t, ỹ_t; θ) (no graph): by autograd, or by the explicit engine ``eng``."""
    if eng is not None:
        s = t % prob.steps
        return eng.loss_grad(theta.detach()[None], prob.data[s].detach(), prob.labels[s].detach())[1][0]
    th = theta.detach().requires_grad_(True)
    with torch.enable_grad():
        g, = torch.autograd.grad(prob.loss_at(th, t), th)
    return g


def _grad_hvp(prob: InnerProblem, theta: Tensor, t: int, v: Tensor, acc: dict, need_hvp: bool, eng):
    """``(g_t, H_t v or None, ∇_x̃ (v·g_t) or None, ∇_ỹ (v·g_t) or None)`` at θ, step t's batch;
    the mixed terms only where ``acc`` collects them (soft labels for ỹ)."""
    s = t % prob.steps
    need_x, need_y = acc["data"] is not None, acc["labels"] is not None
    if eng is not None:
        g, hv, gx, gy = eng.loss_grad_hvp(theta.detach()[None], prob.data[s].detach(),
                                          prob.labels[s].detach(), v[None], need_x=need_x, need_y=need_y)
        return g[0], hv[0] if need_hvp else None, gx, gy
    th = theta.detach().requires_grad_(True)
    x = prob.data[s].detach().requires_grad_(need_x)
    y = prob.labels[s].detach().requires_grad_(need_y)
    with torch.enable_grad():
        g, = torch.autograd.grad(prob.loss_at(th, t, x, y), th, create_graph=True)
        inputs = ([th] if need_hvp else []) + [z for z in (x, y) if z.requires_grad]
        outs = list(torch.autograd.grad(g, inputs, grad_outputs=v, allow_unused=True)) if inputs else []
    hv = outs.pop(0) if need_hvp else None
    gx = outs.pop(0) if need_x else None
    gy = outs.pop(0) if need_y else None
    return g.detach(), hv, gx, gy


def forward_states(prob: InnerProblem, theta0: Tensor, keep: Callable[[int], bool] = lambda t: True,
                   eng=None):
    """Run the inner loop without a graph; return (θ_T, v_T, {t: (θ_t, v_t)} for kept t)."""
    th = theta0.detach().clone()
    v = torch.zeros_like(th) if prob.momentum else None
    kept = {}
    for t in range(prob.T):
        if keep(t):
            kept[t] = (th, v if v is not None else None)
        g = _grad(prob, th, t, eng)
        if prob.momentum:
            b = prob.betas[t].detach()
            v = b * v - (1 - b) * g
            th = th + prob.lrs[t].detach() * v
        else:
            th = th - prob.lrs[t].detach() * g
    return th, v, kept


def reverse_gd_step(prob: InnerProblem, theta_t: Tensor, t: int, lam: Tensor, acc: dict,
                    need_hvp: bool = True, eng=None) -> Tensor:
    """One reverse step of plain GD: accumulate ∂L/∂η_t, ∂L/∂x̃, ∂L/∂ỹ into ``acc``; return λ_t.
    ``eng``: the explicit engine (:func:`explicit_engine`) or None for autograd.

    Invariant: on entry ``lam`` holds ∂L/∂θ_{t+1}; on exit the returned tensor holds ∂L/∂θ_t.
    """
    s = t % prob.steps
    eta = prob.lrs[t].detach()
    g, hv, gx, gy = _grad_hvp(prob, theta_t, t, lam, acc, need_hvp, eng)
    acc["lrs"][t] = -(g @ lam)
    if gx is not None:
        acc["data"][s] -= eta * gx
    if gy is not None:
        acc["labels"][s] -= eta * gy
    return lam - eta * hv if need_hvp else lam


def reverse_sgdm_step(prob: InnerProblem, theta_prev: Tensor, v_t: Tensor, t: int,
                      dtheta: Tensor, dv: Tensor, acc: dict, need_hvp: bool = True,
                      v_prev: Tensor = None, eng=None):
    """One reverse step of momentum SGD (Maclaurin et al.'s Algorithm 2 without the exact
    arithmetic): step t maps (θ_t, v_t) to v_{t+1} = β v_t − (1−β) g(θ_t), θ_{t+1} = θ_t + α v_{t+1}.

    Args:
        theta_prev: θ_t (the state the gradient of step t is taken at).
        v_t: v_{t+1}, the velocity *after* step t (``dα_t = dθ · v_{t+1}``).
        dtheta, dv: ∂L/∂θ_{t+1}, ∂L/∂v_{t+1}.
        v_prev: v_t if the caller kept it; otherwise it is recovered as (v_{t+1} + (1−β) g) / β,
            which is only as exact as the arithmetic (the reversible strategy does it exactly).
        eng: the explicit engine (:func:`explicit_engine`) or None for autograd.
    Returns:
        (∂L/∂θ_t, ∂L/∂v_t, v_t).
    """
    s = t % prob.steps
    a, b = prob.lrs[t].detach(), prob.betas[t].detach()
    acc["lrs"][t] = dtheta @ v_t
    dv = dv + a * dtheta
    gd, hv, gx, gy = _grad_hvp(prob, theta_prev, t, dv, acc, need_hvp, eng)
    if v_prev is None:
        v_prev = (v_t + (1 - b) * gd) / b
    acc["betas"][t] = dv @ (v_prev + gd)
    if need_hvp:
        dtheta = dtheta - (1 - b) * hv
    if gx is not None:
        acc["data"][s] -= (1 - b) * gx
    if gy is not None:
        acc["labels"][s] -= (1 - b) * gy
    return dtheta, b * dv, v_prev


def new_accumulators(prob: InnerProblem, need_data: bool, need_labels: bool) -> dict:
    return {
        "data": torch.zeros_like(prob.data) if need_data else None,
        "labels": torch.zeros_like(prob.labels) if (need_labels and prob.soft) else None,
        "lrs": torch.zeros_like(prob.lrs),
        "betas": torch.zeros_like(prob.betas) if prob.momentum else None,
    }


def outer_grad(outer_loss: Callable[[Tensor], Tensor], theta_T: Tensor):
    """``(L(θ_T), ∇L(θ_T))``: the outer loss's own :meth:`~.common.OuterLoss.value_and_grad` when
    it has one that runs here, else autograd through the call."""
    fast = getattr(outer_loss, "value_and_grad", None)
    res = fast(theta_T) if fast is not None else None
    if res is not None:
        check_finite(res[0], "the outer loss")
        return res
    th = theta_T.detach().requires_grad_(True)
    with torch.enable_grad():
        L = outer_loss(th)
        check_finite(L.detach(), "the outer loss")
        lam, = torch.autograd.grad(L, th)
    return L.detach(), lam


STORED_ENGINES = ("auto", "autograd", "lenet-explicit")


def _explicit_engine_fits(prob: InnerProblem) -> bool:
    from ..models.lenet import LeNet
    return isinstance(prob.model, LeNet)


def explicit_engine(prob: InnerProblem, engine: str = "auto"):
    """The explicit LeNet engine that ``engine`` asks for on this problem, or None for per-step
    autograd (``engine="autograd"``, or ``auto`` on a model other than LeNet).

    Raises:
        ConfigError: an unknown engine, or ``lenet-explicit`` for a model that is not LeNet.
    """
    if engine not in STORED_ENGINES:
        raise ConfigError(f"unknown engine {engine!r}; choose one of {', '.join(STORED_ENGINES)}")
    fits = _explicit_engine_fits(prob)
    if engine == "lenet-explicit" and not fits:
        raise ConfigError(f"engine 'lenet-explicit' implements LeNet only, not {prob.model.name}")
    if engine == "autograd" or not fits:
        return None
    from ..models.batched import batched_engine
    eng = batched_engine(prob.model, "lenet-explicit")
    _backend.reset_usage(eng.OPS)   # the run's stats report what ran in this run only
    return eng


def stored_strategy(prob: InnerProblem, theta0: Tensor, outer_loss: Callable[[Tensor], Tensor],
                    *, need_data: bool = True, need_labels: bool = True,
                    need_theta0: bool = True, engine: str = "auto") -> MetaGradient:
    """Keep θ_t, recompute each step in reverse; ``engine`` as in the module doc.

    Raises:
        ConfigError: an unknown engine, or ``lenet-explicit`` for a model that is not LeNet.
    """
    eng = explicit_engine(prob, engine)
    theta_T, v_T, kept = forward_states(prob, theta0, eng=eng)
    check_finite(theta_T, "θ_T after the inner loop")
    L, lam = outer_grad(outer_loss, theta_T)
    acc = new_accumulators(prob, need_data, need_labels)
    if prob.momentum:
        dth, dv, v = lam, torch.zeros_like(lam), v_T
        for t in range(prob.T - 1, -1, -1):
            # at the top of step t: dth = ∂L/∂θ_{t+1}, dv = ∂L/∂v_{t+1}, v = v_{t+1}
            dth, dv, v = reverse_sgdm_step(prob, kept[t][0], v, t, dth, dv, acc,
                                           need_hvp=need_theta0 or t > 0, v_prev=kept[t][1], eng=eng)
        lam = dth
    else:
        for t in range(prob.T - 1, -1, -1):
            # top of step t: lam = ∂L/∂θ_{t+1}
            lam = reverse_gd_step(prob, kept[t][0], t, lam, acc, need_hvp=need_theta0 or t > 0, eng=eng)
    P = theta0.numel()
    per_state = P * theta0.element_size() * (2 if prob.momentum else 1)
    return MetaGradient(loss=L, theta_T=theta_T, data=acc["data"], labels=acc["labels"],
                        lrs=acc["lrs"], betas=acc["betas"], theta0=lam if need_theta0 else None,
                        stats={"strategy": "stored", **engine_stats(eng),
                               "stored_bytes": prob.T * per_state, "recomputed_steps": prob.T})


def engine_stats(eng) -> dict:
    """``{"engine": name}`` and, for the explicit engine, which backend ran each layer op."""
    if eng is None:
        return {"engine": "autograd"}
    from .batched import _op_backends
    return {"engine": eng.name, "backends": _op_backends(eng)}

