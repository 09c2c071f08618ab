"""The back-gradient engine: exact meta-gradients through an unrolled inner loop.

One entry point, :func:`meta_gradient`, and a registry of strategies that differ only in how
they bring θ_t back during the reverse pass (ALGORITHMS.md §4):

* ``autograd`` -- the full graph (the oracle; memory grows with T × graph);
* ``stored`` -- θ_t kept per step, each step recomputed in reverse (memory T·P + one step);
* ``checkpointed`` -- θ at a few snapshots, segments recomputed (uniform √T or binomial
  "revolve" schedules, chosen by a memory budget);
* ``reversible`` -- momentum SGD in exactly reversible fixed point (memory O(P) + an
  information buffer of ~log2(1/β) bits per parameter per step);
* ``auto`` -- the fastest of these whose estimated memory fits a budget.

Every strategy returns the same :class:`MetaGradient` and must agree with ``autograd`` to
float64 round-off.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

from torch import Tensor

from ..errors import ConfigError
from ..models.base import FunctionalModel
from .auto import auto_strategy
from .autograd import autograd_strategy
from .checkpointed import checkpointed_strategy
from .common import InnerProblem, MetaGradient, inner_loss, make_outer_loss
from .fixedpoint import FixedPointOverflowError, ReversibilityError
from .reversible import reversible_strategy
from .stored import stored_strategy

__all__ = ["meta_gradient", "STRATEGIES", "register_strategy", "InnerProblem", "MetaGradient",
           "inner_loss", "make_outer_loss", "FixedPointOverflowError", "ReversibilityError"]

#: name -> fn(problem, theta0, outer_loss, *, need_data, need_labels, need_theta0) -> MetaGradient
STRATEGIES: Dict[str, Callable[..., MetaGradient]] = {
    "autograd": autograd_strategy,
    "stored": stored_strategy,
    "checkpointed": checkpointed_strategy,
    "reversible": reversible_strategy,
    "auto": auto_strategy,
}


def register_strategy(name: str, fn: Callable[..., MetaGradient]) -> None:
    """Add a back-gradient strategy under ``name`` (same signature as the built-ins)."""
    STRATEGIES[name] = fn


def meta_gradient(model: FunctionalModel, theta0: Tensor, data: Tensor, labels: Tensor,
                  lrs: Tensor, outer_loss: Callable[[Tensor], Tensor], *,
                  betas: Optional[Tensor] = None, strategy: str = "stored",
                  need_data: bool = True, need_labels: bool = True,
                  need_theta0: bool = True, **options) -> MetaGradient:
    """Unroll T inner steps from θ_0 and return L(θ_T) with its exact gradients.

    Plain GD (``betas=None``): ``θ_{t+1} = θ_t − η_t ∇_θ ℓ(f(x̃_{t mod S}; θ_t), ỹ_{t mod S})``.
    SGD with momentum (``betas`` given): ``v ← β_t v − (1−β_t) g``, ``θ ← θ + α_t v``, v_0 = 0,
    with α = ``lrs``.

    Args:
        model: a :class:`~fastdistill.models.FunctionalModel` (``apply(θ, x)``).
        theta0: θ_0, ``[P]``.
        data: x̃, ``[S, n, *input_shape]`` (S distilled steps of n examples).
        labels: ỹ, ``[S, n]`` int64 (hard) or ``[S, n, C]`` float (soft labels).
        lrs: η_t (or α_t), ``[T]`` with ``T = S × epochs``; positive.
        outer_loss: ``L(θ_T) -> scalar``, e.g. :func:`make_outer_loss` on a real batch.
        betas: β_t in (0, 1), ``[T]``, for the momentum inner loop.
        strategy: a name in :data:`STRATEGIES`.
        need_*: skip gradients the caller does not need.
    Returns:
        :class:`MetaGradient` with ``loss``, ``theta_T`` and ∂L/∂(data, labels, lrs, betas, θ_0).
    Raises:
        ConfigError: unknown strategy; ShapeError: inconsistent shapes;
        DivergenceError: a non-finite learning rate, state or outer loss.

    Example::

        >>> import torch
        >>> from fastdistill.models import LeNet
        >>> from fastdistill.backgrad import meta_gradient, make_outer_loss
        >>> m = LeNet(); th0 = m.init("xavier", torch.Generator().manual_seed(0))
        >>> x = torch.randn(1, 10, 1, 28, 28); y = torch.arange(10).view(1, 10)
        >>> out = meta_gradient(m, th0, x, y, torch.full((3,), 0.02),
        ...                     make_outer_loss(m, torch.randn(8, 1, 28, 28), torch.arange(8)))
        >>> out.data.shape, out.lrs.shape
        (torch.Size([1, 10, 1, 28, 28]), torch.Size([3]))
    """
    if strategy not in STRATEGIES:
        raise ConfigError(f"unknown back-gradient strategy {strategy!r}; choose one of "
                          f"{', '.join(sorted(STRATEGIES))}")
    model.check_theta(theta0)
    prob = InnerProblem(model, data, labels, lrs, betas)
    return STRATEGIES[strategy](prob, theta0, outer_loss, need_data=need_data,
                                need_labels=need_labels, need_theta0=need_theta0, **options)


# K networks unrolled together (random-init DD); its reference is the loop over meta_gradient
from .batched import (BatchedOuterLoss, make_batched_outer_loss, meta_gradient_batched,  # noqa: E402
                      meta_gradient_batched_reference)

__all__ += ["meta_gradient_batched", "meta_gradient_batched_reference", "BatchedOuterLoss",
            "make_batched_outer_loss"]
