"""Shared pieces of the back-gradient strategies: the problem, the inner loss, the result."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import DivergenceError, ShapeError
from ..models.base import FunctionalModel

__all__ = ["InnerProblem", "MetaGradient", "inner_loss", "make_outer_loss", "check_finite"]


def inner_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """The inner training loss ℓ.

    * hard labels (integer ``[n]``): cross-entropy; with one output logit, BCE-with-logits
      against labels in {0, 1};
    * soft labels (float ``[n, C]``): ``−Σ_c ỹ_c log softmax(z)_c`` averaged over the batch
      (SLDD; ỹ is used as given, unconstrained); with one output, BCE-with-logits against
      ``ỹ[:, 0]``.
    """
    if labels.is_floating_point():
        if logits.shape[1] == 1:
            return F.binary_cross_entropy_with_logits(logits[:, 0], labels.reshape(len(labels), -1)[:, 0])
        return -(labels * F.log_softmax(logits, dim=1)).sum(1).mean()
    if logits.shape[1] == 1:
        return F.binary_cross_entropy_with_logits(logits[:, 0], labels.to(logits.dtype))
    return F.cross_entropy(logits, labels)


class OuterLoss:
    """DD's outer objective ``L(θ) = CE(f(x_real; θ), y_real)`` (BCE for one-logit models).

    Calling it gives the differentiable scalar (``model.apply`` and autograd);
    :meth:`value_and_grad` gives ``(L, ∇_θ L)`` without a graph through LeNet's fused C++ step
    when that runs here and wins (``lenet_step`` on CPU with one torch thread, in chunks of real
    images; no large temporaries per call), else None -- the back-gradient strategies then
    differentiate the call. On the dev CPU it took ``fastdistill distill --mode fixed
    --iterations 60 --threads 1`` from 9.7 to 7.9 s of distillation.
    """

    def __init__(self, model: FunctionalModel, x: Tensor, y: Tensor):
        self.model, self.x, self.y = model, x, y

    def __call__(self, theta: Tensor) -> Tensor:
        return inner_loss(self.model.apply(theta, self.x), self.y)

    def value_and_grad(self, theta: Tensor) -> Optional[Tuple[Tensor, Tensor]]:
        from ..models.batched import LeNetBatchedEngine
        from ..models.lenet import LeNet
        from .batched import BatchedOuterLoss, _runs_lenet_step_cpp
        if not isinstance(self.model, LeNet) or self.y.is_floating_point():
            return None
        eng = LeNetBatchedEngine(self.model)
        # one network: the C++ step runs on one thread, so it only wins with one torch thread
        if torch.get_num_threads() != 1 or not _runs_lenet_step_cpp(eng, theta.device):
            return None
        L, g = BatchedOuterLoss(self.model, self.x, self.y, mode="batched").loss_grad(
            theta.detach().reshape(1, -1), eng)
        return L[0], g[0]


def make_outer_loss(model: FunctionalModel, x: Tensor, y: Tensor) -> OuterLoss:
    """DD's outer objective ``L(θ) = CE(f(x_real; θ), y_real)`` as an :class:`OuterLoss`."""
    return OuterLoss(model, x, y)


def check_finite(value: Tensor, what: str) -> None:
    if not torch.isfinite(value).all():
        raise DivergenceError(f"{what} is not finite (NaN or inf): the inner learning rates or the "
                              "synthetic data have diverged")


@dataclass
class InnerProblem:
    """The unrolled inner loop, in the paper's symbols.

    Attributes:
        model: the functional network f(x; θ).
        data: x̃, shape ``[S, n, *model.input_shape]``; step ``t`` trains on ``data[t % S]``.
        labels: ỹ, ``[S, n]`` integer class labels (hard) or ``[S, n, C]`` float (soft).
        lrs: η (GD) or α (momentum), shape ``[T]``, positive; ``T = S × epochs``.
        betas: ``None`` for plain GD; for SGD with momentum, β_t in (0, 1), shape ``[T]``:
            ``v ← β v − (1−β) g``, ``θ ← θ + α v``.
    """

    model: FunctionalModel
    data: Tensor
    labels: Tensor
    lrs: Tensor
    betas: Optional[Tensor] = None

    def __post_init__(self):
        m = self.model
        if self.data.dim() < 2 or tuple(self.data.shape[2:]) != tuple(m.input_shape):
            raise ShapeError(f"synthetic data must be [steps, n, {', '.join(map(str, m.input_shape))}]"
                             f" for {m.name}, got {list(self.data.shape)}")
        S, n = self.data.shape[:2]
        if self.soft:
            if tuple(self.labels.shape[:2]) != (S, n) or self.labels.dim() != 3:
                raise ShapeError(f"soft labels must be [steps, n, classes] = [{S}, {n}, C], got "
                                 f"{list(self.labels.shape)}")
            if self.labels.shape[2] != m.num_outputs and not (m.num_outputs == 1 and self.labels.shape[2] in (1, 2)):
                raise ShapeError(f"soft labels have {self.labels.shape[2]} classes but {m.name} has "
                                 f"{m.num_outputs} outputs")
        else:
            if tuple(self.labels.shape) != (S, n):
                raise ShapeError(f"hard labels must be [steps, n] = [{S}, {n}], got {list(self.labels.shape)}")
            hi = 2 if m.num_outputs == 1 else m.num_outputs
            if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= hi):
                raise ShapeError(f"hard labels must lie in [0, {hi}), got range "
                                 f"[{int(self.labels.min())}, {int(self.labels.max())}]")
        if self.lrs.dim() != 1 or len(self.lrs) == 0:
            raise ShapeError(f"learning rates must be a non-empty vector [T], got {list(self.lrs.shape)}")
        if self.betas is not None and tuple(self.betas.shape) != tuple(self.lrs.shape):
            raise ShapeError(f"betas must have the shape of lrs {list(self.lrs.shape)}, got {list(self.betas.shape)}")
        check_finite(self.lrs, "an inner learning rate")
        check_finite(self.data, "the synthetic data")

    @property
    def soft(self) -> bool:
        return self.labels.is_floating_point()

    @property
    def steps(self) -> int:
        return int(self.data.shape[0])

    @property
    def T(self) -> int:
        return int(self.lrs.shape[0])

    @property
    def momentum(self) -> bool:
        return self.betas is not None

    def loss_at(self, theta: Tensor, t: int, x: Optional[Tensor] = None, y: Optional[Tensor] = None) -> Tensor:
        """ℓ(f(x̃_{t mod S}; θ), ỹ_{t mod S}); ``x``/``y`` override the batch (for grad tracking)."""
        s = t % self.steps
        x = self.data[s] if x is None else x
        y = self.labels[s] if y is None else y
        return inner_loss(self.model.apply(theta, x), y)


@dataclass
class MetaGradient:
    """What every strategy returns.

    Attributes:
        loss: the outer loss L(θ_T) (detached scalar).
        theta_T: the final weights (detached).
        data: ∂L/∂x̃, shape of ``data`` (None if not requested).
        labels: ∂L/∂ỹ for soft labels (None for hard labels or if not requested).
        lrs: ∂L/∂η (or ∂L/∂α for momentum), ``[T]``.
        betas: ∂L/∂β for momentum, else None.
        theta0: ∂L/∂θ_0 (None if not requested).
        stats: strategy facts: ``strategy``, ``stored_bytes`` (states kept for the reverse pass),
            ``recomputed_steps``, and strategy-specific entries.
    """

    loss: Tensor
    theta_T: Tensor
    data: Optional[Tensor]
    labels: Optional[Tensor]
    lrs: Tensor
    betas: Optional[Tensor] = None
    theta0: Optional[Tensor] = None
    stats: Dict[str, Any] = field(default_factory=dict)
