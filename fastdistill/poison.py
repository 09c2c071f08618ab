"""The malicious data-poisoning objective of DD (Wang et al. 2018, §3.6) and its metrics.

Given an attacked class K and a target class T, the outer objective is the classification loss
on real data whose K labels are changed to T::

    ℓ_{K→T}(x, θ_1) = CE(f(x_real; θ_1), y_real with K ↦ T)

θ_0 comes from a pool of well-trained models (``mode="random-pretrained"``), and the inner loop
is one GD step (``steps=1, epochs=1``). A good attack keeps every other class correct while
class K flips to T. Metrics, on the real test set after the poisoned step:

* ``acc_modified``: overall accuracy w.r.t. the modified labels (K counted correct when
  predicted T);
* ``k_to_t``: fraction of class-K test images predicted as T.

Baselines apply one GD step on real images whose K labels are changed to T and, as in the
paper, report the setting with the highest ``acc_modified`` among those that send at least
10 % of class K to T (:func:`best_poison_baseline`).
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .backgrad.common import inner_loss
from .errors import ConfigError, ShapeError
from .evaluate import train_on_distilled
from .models.base import FunctionalModel

__all__ = ["relabel", "poison_outer_loss", "attack_metrics", "AttackReport", "evaluate_attack",
           "best_poison_baseline", "MIN_FLIP"]

#: a baseline setting only counts if it sends at least this fraction of class K to T (paper §4.2)
MIN_FLIP = 0.10


def _check_pair(K: int, T: int, num_classes: Optional[int] = None) -> None:
    for name, k in (("attacked class K", K), ("target class T", T)):
        if isinstance(k, bool) or not isinstance(k, int) or k < 0 or (num_classes is not None and k >= num_classes):
            hi = "" if num_classes is None else f" (0..{num_classes - 1})"
            raise ConfigError(f"{name} = {k!r} is not a class index{hi}")
    if K == T:
        raise ConfigError(f"the attacked class and the target class must differ, both are {K}")


def relabel(y: Tensor, K: int, T: int) -> Tensor:
    """A copy of the int64 labels ``y`` with every K replaced by T."""
    _check_pair(K, T)
    if y.is_floating_point():
        raise ShapeError("relabel takes integer class labels")
    return torch.where(y == K, torch.full_like(y, T), y)


def poison_outer_loss(K: int, T: int) -> Callable[[FunctionalModel, Tensor, Tensor], Callable[[Tensor], Tensor]]:
    """An ``outer_fn`` for :class:`~fastdistill.distill.Distiller`: ``L(θ) = CE(f(x; θ), y[K↦T])``.

    Example::

        >>> import torch
        >>> from fastdistill.models import LeNet
        >>> m = LeNet(); th = m.init("xavier", torch.Generator().manual_seed(0))
        >>> L = poison_outer_loss(3, 8)(m, torch.randn(4, 1, 28, 28), torch.tensor([3, 1, 3, 0]))
        >>> L(th).shape
        torch.Size([])
    """
    _check_pair(K, T)

    def make(model: FunctionalModel, x: Tensor, y: Tensor) -> Callable[[Tensor], Tensor]:
        y2 = relabel(y, K, T)
        return lambda theta: inner_loss(model.apply(theta, x), y2)

    return make


@torch.no_grad()
def attack_metrics(model: FunctionalModel, theta: Tensor, x: Tensor, y: Tensor, K: int, T: int,
                   batch: int = 2500) -> Dict[str, float]:
    """``acc_modified`` (accuracy w.r.t. y[K↦T]) and ``k_to_t`` (class-K images predicted T)."""
    _check_pair(K, T)
    nk = int((y == K).sum())
    if nk == 0:
        raise ShapeError(f"the test set has no images of the attacked class {K}")
    y2 = relabel(y, K, T)
    correct = flipped = 0
    for i in range(0, len(x), batch):
        pred = model.predict(theta, x[i:i + batch].to(theta.dtype)).argmax(1)
        correct += int((pred == y2[i:i + batch]).sum())
        flipped += int(((pred == T) & (y[i:i + batch] == K)).sum())
    return {"acc_modified": correct / len(x), "k_to_t": flipped / nk}


def _ms(v: Sequence[float]):
    if not v:
        return float("nan"), float("nan")
    return statistics.fmean(v), (statistics.pstdev(v) if len(v) > 1 else 0.0)


@dataclass
class AttackReport:
    """Per held-out model: metrics before (the clean model) and after the poisoned step(s)."""

    K: int
    T: int
    before: List[Dict[str, float]] = field(default_factory=list)
    after: List[Dict[str, float]] = field(default_factory=list)

    @property
    def n_models(self) -> int:
        return len(self.after)

    def summary(self) -> Dict[str, float]:
        out: Dict[str, float] = {"K": self.K, "T": self.T, "n_models": self.n_models}
        for when, rows in (("before", self.before), ("after", self.after)):
            for key in ("acc_modified", "k_to_t"):
                m, s = _ms([r[key] for r in rows])
                out[f"{key}_{when}_mean"], out[f"{key}_{when}_std"] = m, s
        return out

    def __str__(self) -> str:
        s = self.summary()
        return (f"{self.K}→{self.T}: acc w.r.t. modified labels {100 * s['acc_modified_after_mean']:.2f}"
                f" ± {100 * s['acc_modified_after_std']:.2f}%, class {self.K} predicted {self.T}: "
                f"{100 * s['k_to_t_after_mean']:.2f} ± {100 * s['k_to_t_after_std']:.2f}% "
                f"over {self.n_models} held-out models")


def evaluate_attack(model: FunctionalModel, data: Tensor, labels: Tensor, lrs: Tensor,
                    test_x: Tensor, test_y: Tensor, theta0s: Iterable[Tensor], K: int, T: int,
                    *, with_before: bool = True) -> AttackReport:
    """Apply the poisoned steps to every (well-trained) θ_0 in ``theta0s`` and measure the attack.

    Args:
        data, labels, lrs: the distilled (or baseline) set ``[S, n, ...]``, ``[S, n(, C)]``,
            ``[T]`` — one GD step in the paper's setting.
        theta0s: held-out pre-trained models (never used to distil).
        with_before: also measure the clean models (one more test pass per model).
    Returns:
        :class:`AttackReport`.
    """
    rep = AttackReport(K, T)
    for th0 in theta0s:
        th0 = th0.to(data.dtype)
        if with_before:
            rep.before.append(attack_metrics(model, th0, test_x, test_y, K, T))
        th = train_on_distilled(model, th0, data, labels, lrs)
        if torch.isfinite(th).all():
            rep.after.append(attack_metrics(model, th, test_x, test_y, K, T))
        else:
            rep.after.append({"acc_modified": 0.0, "k_to_t": 0.0})
    return rep


def best_poison_baseline(model: FunctionalModel, sets: Sequence[Tuple[Tensor, Tensor]],
                         test_x: Tensor, test_y: Tensor, theta0s: Sequence[Tensor], K: int, T: int,
                         lr_grid: Sequence[float], min_flip: float = MIN_FLIP, *,
                         select_theta0s: Optional[Sequence[Tensor]] = None,
                         select_sets: Optional[int] = None) -> Dict[str, object]:
    """The paper's rule for real-image poisoning baselines: one GD step on each ``(data, labels)``
    of ``sets`` (labels already changed K ↦ T) from every θ_0, for every rate in ``lr_grid``;
    keep the highest mean ``acc_modified`` among rates whose mean ``k_to_t`` ≥ ``min_flip``
    (means over all set × model pairs).

    By default the rate is chosen on the reported models themselves (the paper); with
    ``select_theta0s`` / ``select_sets`` it is chosen on those and then measured on
    ``theta0s`` × all sets.

    Returns ``{"lr", "report", "grid": [(lr, acc_modified, k_to_t), ...], "selected_on"}``;
    ``lr`` and ``report`` (an :class:`AttackReport` pooling every set × model) are None when no
    rate reaches ``min_flip``.
    """
    if not sets:
        raise ShapeError("no baseline sets to evaluate")
    thetas = list(theta0s)
    sel_th = thetas if select_theta0s is None else list(select_theta0s)
    sel_sets = list(sets) if select_sets is None else list(sets)[:select_sets]
    separate = select_theta0s is not None or select_sets is not None

    def pooled(lr, models, data_sets, before):
        rep = AttackReport(K, T)
        for data, labels in data_sets:
            r = evaluate_attack(model, data, labels, torch.full((1,), float(lr), dtype=data.dtype),
                                test_x, test_y, models, K, T, with_before=before)
            rep.before += r.before
            rep.after += r.after
        return rep

    best, grid = None, []
    for lr in lr_grid:
        rep = pooled(lr, sel_th, sel_sets, False)
        s = rep.summary()
        grid.append((float(lr), s["acc_modified_after_mean"], s["k_to_t_after_mean"]))
        if s["k_to_t_after_mean"] >= min_flip and (best is None or s["acc_modified_after_mean"] > best[1]):
            best = (float(lr), s["acc_modified_after_mean"], rep)
    out = {"lr": None, "report": None, "grid": grid,
           "selected_on": f"{len(sel_th)} model(s) × {len(sel_sets)} set(s)" + (" (separate)" if separate else "")}
    if best is not None:
        out["lr"] = best[0]
        out["report"] = pooled(best[0], thetas, sets, False) if separate else best[2]
    return out
