"""``auto``: the fastest exact strategy whose estimated memory fits a budget.

Every strategy returns the same meta-gradient (``reversible``: of its fixed-point trajectory, at
float64 round-off of the others); they differ in memory and time. ``auto`` estimates both for
the problem at hand and runs the fastest candidate that fits ``memory_budget`` bytes.

Memory estimates (bytes; P parameters of ``e`` bytes, a state is θ or (θ, v); ``G`` the bytes
one inner step's differentiable graph saves, *measured* once on step 0 with
``torch.autograd.graph.saved_tensors_hooks``):

* ``autograd``: ``T·(G + state)`` -- every step's graph stays alive;
* ``stored``: ``T·state + 2G`` -- T states and one reverse step's double-backward graph;
* ``checkpointed`` (binomial): ``s·state + 2G`` with the largest ``s`` that fits (s ≥ 1 always
  fits a budget of ``state + 2G``);
* ``reversible`` (momentum only): ``24·P + 3·P·e + buffer + 2G``, the buffer estimated at
  1.6 × the ``log2(1/β)`` bits per parameter per step it must hold.

Time per inner step, in gradient evaluations ``g`` (one forward + backward of the inner loss;
a reverse step, double backward included, costs ~3g on LeNet, see ``benches/``):
autograd ≈ 3.3g, stored = 4g, checkpointed = 4g + (extra forward steps)/T, reversible ≈ 5.3g
(two extra gradients and the integer arithmetic). On LeNet every strategy but ``autograd`` runs
the explicit engine (on CPU the fused C++ step): stored ≈ 1.4g (measured 3.6 vs 8.6 ms per
inner step for autograd at T = 300), checkpointed ≈ 1.4g + (extra forward steps)/T,
reversible ≈ 2.5g (1.8 × stored, the ratio measured on the engine's torch ops). ``auto`` picks the smallest predicted time
among the candidates that fit; the estimates and the choice are reported in ``stats["auto"]``.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional

import torch
from torch import Tensor

from ..errors import ConfigError
from .autograd import autograd_strategy
from .checkpointed import binomial_cost, checkpointed_strategy
from .common import InnerProblem, MetaGradient
from .fixedpoint import rational_betas, theory_bits_per_step
from .reversible import reversible_strategy
from .stored import _explicit_engine_fits, stored_strategy

__all__ = ["auto_strategy", "plan_strategy", "step_graph_bytes", "default_memory_budget"]

#: predicted cost per inner step in gradient evaluations (measured ratios, see module doc)
COST_AUTOGRAD, COST_STORED, COST_REVERSIBLE = 3.3, 4.0, 5.3
COST_STORED_EXPLICIT, COST_REVERSIBLE_EXPLICIT = 1.4, 2.5  # on the explicit LeNet engine


def step_graph_bytes(prob: InnerProblem, theta0: Tensor) -> int:
    """Bytes saved for backward by one differentiable inner step (step 0), counted once per storage."""
    seen: Dict[tuple, int] = {}

    def pack(t: Tensor):
        try:
            key = (t.untyped_storage().data_ptr(), t.device)
            seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
        except RuntimeError:  # tensors without storage (e.g. some views of sparse tensors)
            pass
        return t

    th = theta0.detach().requires_grad_(True)
    x = prob.data[0].detach().requires_grad_(True)
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        g, = torch.autograd.grad(prob.loss_at(th, 0, x=x), th, create_graph=True)
        (th - prob.lrs[0].detach() * g).sum()
    return int(sum(seen.values()))


def default_memory_budget(device: torch.device) -> tuple:
    """Half the memory available now on ``device``: ``(bytes, where it came from)``."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 2, "half of torch.cuda.mem_get_info() free memory"
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 2, "half of MemAvailable in /proc/meminfo"
    except OSError:
        pass
    raise ConfigError("cannot tell how much memory is available here; pass memory_budget=<bytes> "
                      "to the auto strategy")


def plan_strategy(prob: InnerProblem, theta0: Tensor, memory_budget: Optional[int] = None,
                  max_denominator: int = 1 << 16) -> dict:
    """Estimate every exact strategy and choose one. Returns a dict with ``choice``,
    ``options`` (for the chosen strategy), ``budget``, ``budget_source`` and ``estimates``
    (name -> {"bytes", "cost_per_step", "fits"})."""
    source = "memory_budget option"
    if memory_budget is None:
        memory_budget, source = default_memory_budget(theta0.device)
    if int(memory_budget) != memory_budget or memory_budget <= 0:
        raise ConfigError(f"memory_budget must be a positive number of bytes, got {memory_budget!r}")
    budget = int(memory_budget)
    T, P, e = prob.T, theta0.numel(), theta0.element_size()
    state = P * e * (2 if prob.momentum else 1)
    G = step_graph_bytes(prob, theta0)
    explicit = _explicit_engine_fits(prob)
    cost_stored = COST_STORED_EXPLICIT if explicit else COST_STORED
    est = {
        "autograd": {"bytes": T * (G + state), "cost_per_step": COST_AUTOGRAD},
        "stored": {"bytes": T * state + 2 * G, "cost_per_step": cost_stored},
    }
    options: Dict[str, dict] = {"autograd": {}, "stored": {}}
    s = min(T, max(1, (budget - 2 * G) // state))
    extra = binomial_cost(T, s) + 1 - T
    est["checkpointed"] = {"bytes": s * state + 2 * G, "cost_per_step": cost_stored + extra / T,
                           "max_states": s}
    options["checkpointed"] = {"schedule": "binomial", "max_states": s}
    if prob.momentum:
        pairs, _ = rational_betas(prob.betas.detach().cpu().tolist(), max_denominator)
        buffer = math.ceil(1.6 * theory_bits_per_step(pairs) * T * P / 8)
        est["reversible"] = {"bytes": 24 * P + 3 * P * e + buffer + 2 * G,
                             "cost_per_step": COST_REVERSIBLE_EXPLICIT if explicit else COST_REVERSIBLE}
        options["reversible"] = {"max_denominator": max_denominator}
    for v in est.values():
        v["fits"] = v["bytes"] <= budget
    fitting = [k for k, v in est.items() if v["fits"]]
    if not fitting:
        need = min(v["bytes"] for v in est.values())
        raise ConfigError(f"no exact strategy fits memory_budget = {budget} B for T = {T}, P = {P}: "
                          f"the smallest needs about {need} B")
    choice = min(fitting, key=lambda k: est[k]["cost_per_step"])
    return {"choice": choice, "options": options[choice], "budget": budget,
            "budget_source": source, "step_graph_bytes": G, "estimates": est}


_RUN: Dict[str, Callable[..., MetaGradient]] = {
    "autograd": autograd_strategy, "stored": stored_strategy,
    "checkpointed": checkpointed_strategy, "reversible": reversible_strategy,
}


def auto_strategy(prob: InnerProblem, theta0: Tensor, outer_loss: Callable[[Tensor], Tensor],
                  *, need_data: bool = True, need_labels: bool = True, need_theta0: bool = True,
                  memory_budget: Optional[int] = None, max_denominator: int = 1 << 16) -> MetaGradient:
    """Run the fastest exact strategy that fits ``memory_budget`` bytes (default: half the memory
    available on θ_0's device). ``stats["auto"]`` holds the plan (estimates, budget, choice).

    Example::

        >>> import torch
        >>> from fastdistill.models import LeNet
        >>> from fastdistill.backgrad import meta_gradient, make_outer_loss
        >>> m = LeNet(); th0 = m.init("xavier", torch.Generator().manual_seed(0))
        >>> x = torch.randn(1, 10, 1, 28, 28); y = torch.arange(10).view(1, 10)
        >>> outer = make_outer_loss(m, torch.randn(8, 1, 28, 28), torch.arange(8))
        >>> out = meta_gradient(m, th0, x, y, torch.full((20,), 0.02), outer, strategy="auto",
        ...                     memory_budget=8 * 2**20)
        >>> out.stats["auto"]["choice"]      # autograd would need ~25 MB here
        'stored'
    """
    plan = plan_strategy(prob, theta0, memory_budget, max_denominator)
    out = _RUN[plan["choice"]](prob, theta0, outer_loss, need_data=need_data,
                               need_labels=need_labels, need_theta0=need_theta0, **plan["options"])
    out.stats["auto"] = plan
    return out
