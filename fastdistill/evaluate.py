"""DD's evaluation protocol (ALGORITHMS.md §5).

Each held-out model starts at its own θ_0, takes the T distilled steps with the learned rates
(plain GD, or momentum SGD when ``betas`` are given), and is tested on the real test set:
accuracy at step 0 and after the last step, mean ± std over the models (the one model for
fixed init). Held-out initialisations come from a generator stream that distillation never uses.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Iterable, List, Optional

import torch
from torch import Tensor

from .backgrad.common import InnerProblem, inner_loss
from .models.base import FunctionalModel

__all__ = ["train_on_distilled", "accuracy", "evaluate_distilled", "EvalReport", "heldout_inits",
           "HELDOUT_SEED_OFFSET"]

#: held-out models are drawn from ``Generator().manual_seed(seed + HELDOUT_SEED_OFFSET)``;
#: distillation draws from seeds ``seed`` … ``seed + 2``, so the streams never coincide.
HELDOUT_SEED_OFFSET = 1_000_003


@torch.no_grad()
def accuracy(model: FunctionalModel, theta: Tensor, x: Tensor, y: Tensor, batch: int = 2500) -> float:
    """Top-1 accuracy of f(·; θ) on (x, y); one-logit models threshold at 0."""
    correct = 0
    for i in range(0, len(x), batch):
        z = model.predict(theta, x[i:i + batch].to(theta.dtype))
        pred = (z[:, 0] > 0).long() if z.shape[1] == 1 else z.argmax(1)
        correct += int((pred == y[i:i + batch]).sum())
    return correct / max(1, len(x))


def train_on_distilled(model: FunctionalModel, theta0: Tensor, data: Tensor, labels: Tensor,
                       lrs: Tensor, betas: Optional[Tensor] = None) -> Tensor:
    """θ_T after the T distilled steps (step t uses batch t mod S and rate lrs[t]); no graph."""
    prob = InnerProblem(model, data.detach(), labels.detach(), lrs.detach(),
                        None if betas is None else betas.detach())
    th = theta0.detach().clone()
    v = torch.zeros_like(th) if betas is not None else None
    for t in range(prob.T):
        p = th.requires_grad_(True)
        with torch.enable_grad():
            g, = torch.autograd.grad(prob.loss_at(p, t), p)
        th = th.detach()
        if v is None:
            th = th - prob.lrs[t] * g
        else:
            v = prob.betas[t] * v - (1 - prob.betas[t]) * g
            th = th + prob.lrs[t] * v
    return th.detach()


@dataclass
class EvalReport:
    """Accuracies of the held-out models before and after training on the distilled set."""

    before: List[float] = field(default_factory=list)
    after: List[float] = field(default_factory=list)
    protocol: str = "dd"

    @property
    def n_models(self) -> int:
        return len(self.after)

    @staticmethod
    def _ms(v):
        if not v:
            return float("nan"), float("nan")
        return statistics.fmean(v), (statistics.pstdev(v) if len(v) > 1 else 0.0)

    def summary(self) -> dict:
        bm, bs = self._ms(self.before)
        am, as_ = self._ms(self.after)
        return {"protocol": self.protocol, "n_models": self.n_models, "acc_before_mean": bm,
                "acc_before_std": bs, "acc_after_mean": am, "acc_after_std": as_}

    def __str__(self) -> str:
        s = self.summary()
        if self.n_models == 1:
            return f"{100 * s['acc_before_mean']:.2f}% -> {100 * s['acc_after_mean']:.2f}% (1 model)"
        return (f"{100 * s['acc_before_mean']:.2f} ± {100 * s['acc_before_std']:.2f}% -> "
                f"{100 * s['acc_after_mean']:.2f} ± {100 * s['acc_after_std']:.2f}% "
                f"over {self.n_models} held-out models")


def heldout_inits(model: FunctionalModel, scheme: str, n: int, seed: int, *, gain=None,
                  dtype=torch.float32) -> Iterable[Tensor]:
    """``n`` held-out θ_0 draws, from a stream distillation never touches."""
    g = torch.Generator().manual_seed(seed + HELDOUT_SEED_OFFSET)
    for _ in range(n):
        yield model.init(scheme, g, gain=gain, dtype=dtype)


def evaluate_distilled(model: FunctionalModel, data: Tensor, labels: Tensor, lrs: Tensor,
                       test_x: Tensor, test_y: Tensor, theta0s: Iterable[Tensor], *,
                       betas: Optional[Tensor] = None, progress=None) -> EvalReport:
    """Train every θ_0 in ``theta0s`` on the distilled set and test it (DD protocol).

    Args:
        data, labels, lrs, betas: the distilled set (``[S, n, ...]``, ``[S, n]`` or ``[S, n, C]``,
            ``[T]``).
        test_x, test_y: the real test set.
        theta0s: the held-out initialisations (e.g. :func:`heldout_inits`, or ``[θ_0]`` for
            fixed init).
        progress: optional callable(i, report) after each model.
    Returns:
        :class:`EvalReport` with per-model accuracies; ``str()`` gives ``mean ± std``.
    """
    rep = EvalReport()
    for i, th0 in enumerate(theta0s):
        th0 = th0.to(data.dtype)
        rep.before.append(accuracy(model, th0, test_x, test_y))
        thT = train_on_distilled(model, th0, data, labels, lrs, betas)
        rep.after.append(accuracy(model, thT, test_x, test_y) if torch.isfinite(thT).all() else 0.0)
        if progress is not None:
            progress(i, rep)
    return rep
