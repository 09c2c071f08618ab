"""``autograd``: keep the whole unrolled graph and differentiate it once (the oracle).

Memory grows with T × (one step's double-backward graph + P); use it for tests and short unrolls.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .common import InnerProblem, MetaGradient, check_finite

__all__ = ["autograd_strategy"]


def autograd_strategy(prob: InnerProblem, theta0: Tensor, outer_loss: Callable[[Tensor], Tensor],
                      *, need_data: bool = True, need_labels: bool = True,
                      need_theta0: bool = True) -> MetaGradient:
    need_labels = need_labels and prob.soft
    th0 = theta0.detach().clone().requires_grad_(True)
    x = prob.data.detach().requires_grad_(need_data)
    y = prob.labels.detach().requires_grad_(need_labels)
    lr = prob.lrs.detach().requires_grad_(True)
    beta = prob.betas.detach().requires_grad_(True) if prob.momentum else None
    S = prob.steps
    th, v = th0, None
    for t in range(prob.T):
        loss = prob.loss_at(th, t, x[t % S], y[t % S])
        g, = torch.autograd.grad(loss, th, create_graph=True)
        if beta is None:
            th = th - lr[t] * g
        else:
            v = (-(1 - beta[t]) * g) if v is None else beta[t] * v - (1 - beta[t]) * g
            th = th + lr[t] * v
    L = outer_loss(th)
    check_finite(L.detach(), "the outer loss")
    named = {"lr": lr, "beta": beta, "th0": th0, "x": x, "y": y}
    named = {k: v for k, v in named.items() if v is not None and v.requires_grad}
    got = dict(zip(named, torch.autograd.grad(L, list(named.values()), allow_unused=True)))
    glr, gbeta, gth0, gx, gy = (got.get(k) for k in ("lr", "beta", "th0", "x", "y"))
    zeros = lambda ref, g: torch.zeros_like(ref) if g is None else g  # noqa: E731
    return MetaGradient(
        loss=L.detach(), theta_T=th.detach(),
        data=zeros(prob.data, gx) if need_data else None,
        labels=zeros(prob.labels, gy) if need_labels else None,
        lrs=glr, betas=gbeta,
        theta0=zeros(theta0, gth0) if need_theta0 else None,
        stats={"strategy": "autograd", "stored_bytes": None, "recomputed_steps": 0})
