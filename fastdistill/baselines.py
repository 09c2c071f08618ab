"""DD's baselines (Wang et al. 2018, §4 and S-1): training on real-image sets, and k-NN.

Training-data baselines use the same number of images and GD steps as the distilled set and are
evaluated like it (:mod:`.evaluate`): held-out θ_0, plain GD over the S steps for E epochs,
test accuracy. Each reports the best combination of

    lr ∈ {learned (the distilled set's η_t), 0.001, 0.003, 0.01, 0.03, 0.1, 0.3} × E ∈ {1, 3, 5}.

* **random real**: ``m`` random training images per class (paper: 10 sets);
* **optimized real**: 50 random sets scored on 20 held-out models and 1024 random training
  images; the best 10 are evaluated;
* **k-means**: per class, ``m`` k-means centroids (paper: 10 runs);
* **average real**: the mean image of each class, the same in every GD step (deterministic).

k-NN baselines classify the test set with the ``m`` images per class as references (random real
or k-means), best of metric ∈ {l1, l2} × K ∈ {1, 3}.

Layout: a set of ``m = S·k`` images per class becomes ``data [S, k·C, ...]`` with step ``s``
holding images ``s·k … s·k+k−1`` of every class, in the class-major order of
:func:`fastdistill.distill.hard_labels`.

The learned-rate option, for a number of epochs that differs from the distillation's, cycles the
learned schedule: step ``t`` uses ``η[t mod len(η)]``. Because every option is such a cycle, the
E = 1 and E = 3 models are the E = 5 run's intermediate states, so one run per (θ_0, lr) scores
all three epoch counts.

Which test data chooses the combination is a parameter (``select_*``): the paper picks the best
on the reported models themselves (optimistic); giving separate selection models records the
cheaper, unbiased variant, and the result's ``protocol`` string says which one ran.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .backgrad.common import inner_loss
from .errors import ConfigError, ShapeError
from .evaluate import accuracy
from .models.base import FunctionalModel

__all__ = ["LR_GRID", "EPOCH_GRID", "KNN_KS", "KNN_METRICS", "class_indices", "as_steps",
           "random_real", "kmeans", "kmeans_real", "average_real", "optimized_real",
           "train_checkpoints", "BaselineResult", "evaluate_training_baseline", "knn_predict",
           "knn_accuracy", "knn_baseline"]

LR_GRID: Tuple[float, ...] = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3)
EPOCH_GRID: Tuple[int, ...] = (1, 3, 5)
KNN_KS: Tuple[int, ...] = (1, 3)
KNN_METRICS: Tuple[str, ...] = ("l1", "l2")

ImageSet = Tuple[Tensor, Tensor]          # (data [S, n, ...], labels [S, n])


# -- building the real-image sets -----------------------------------------------------------------
def class_indices(y: Tensor, num_classes: int) -> List[Tensor]:
    """Indices of every class in ``y``; raises :class:`ShapeError` on an empty or unknown class."""
    if y.is_floating_point() or y.dim() != 1:
        raise ShapeError(f"labels must be int64 [N], got {y.dtype} {list(y.shape)}")
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ShapeError(f"labels must lie in [0, {num_classes}), got [{int(y.min())}, {int(y.max())}]")
    idx = [torch.nonzero(y == c).flatten() for c in range(num_classes)]
    empty = [c for c, i in enumerate(idx) if len(i) == 0]
    if empty:
        raise ShapeError(f"classes {empty} have no training examples")
    return idx


def as_steps(per_class: Sequence[Tensor], steps: int) -> ImageSet:
    """Arrange ``C`` tensors of ``m = S·k`` images each into ``(data [S, k·C, ...], labels [S, k·C])``."""
    m = per_class[0].shape[0]
    if steps < 1 or m % steps or any(p.shape[0] != m for p in per_class):
        raise ShapeError(f"every class needs the same number of images, a multiple of steps={steps}; "
                         f"got {[int(p.shape[0]) for p in per_class]}")
    k, C = m // steps, len(per_class)
    stacked = torch.stack(list(per_class))                    # [C, m, ...]
    stacked = stacked.view(C, steps, k, *stacked.shape[2:])   # [C, S, k, ...]
    data = stacked.transpose(0, 1).reshape(steps, C * k, *stacked.shape[3:])
    labels = torch.arange(C).repeat_interleave(k).repeat(steps, 1)
    return data.contiguous(), labels


def random_real(x: Tensor, y: Tensor, num_classes: int, per_class: int, steps: int = 1,
                generator: Optional[torch.Generator] = None) -> ImageSet:
    """``per_class`` distinct random training images of every class, laid out over ``steps``."""
    sets = []
    for c, idx in enumerate(class_indices(y, num_classes)):
        if len(idx) < per_class:
            raise ShapeError(f"class {c} has {len(idx)} images, fewer than the {per_class} requested")
        sets.append(x[idx[torch.randperm(len(idx), generator=generator)[:per_class]]])
    return as_steps(sets, steps)


def kmeans(x: Tensor, k: int, generator: Optional[torch.Generator] = None, iters: int = 100) -> Tensor:
    """Lloyd's k-means with k-means++ seeding on ``x [N, ...]``; returns ``k`` centroids ``[k, ...]``.

    Stops when no assignment changes (a fixed point of Lloyd's iteration) or after ``iters``
    rounds. Distances use ``‖x‖² − 2 x·c + ‖c‖²`` in ``x``'s dtype; centroid means accumulate in
    float64. An empty cluster is re-seeded with the point farthest from its centroid.
    Raises :class:`ShapeError` if ``k`` exceeds the number of points.
    """
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ShapeError(f"k-means needs 1 ≤ k ≤ N points, got k = {k}, N = {n}")
    pts = x.reshape(n, -1)
    pts64 = pts.double()
    sq = (pts * pts).sum(1)

    def sqdist(c: Tensor) -> Tensor:
        return (sq[:, None] - 2 * pts @ c.T + (c * c).sum(1)[None, :]).clamp_min_(0)

    first = int(torch.randint(n, (1,), generator=generator))
    cent = pts[first:first + 1].clone()
    d2 = sqdist(cent).squeeze(1)
    for _ in range(1, k):  # k-means++: next centre drawn ∝ D(x)²
        w = d2.double() if float(d2.sum()) > 0 else torch.ones(n, dtype=torch.float64)
        j = int(torch.multinomial(w, 1, generator=generator))
        cent = torch.cat([cent, pts[j:j + 1]])
        d2 = torch.minimum(d2, sqdist(pts[j:j + 1]).squeeze(1))
    assign = None
    for _ in range(iters):
        dist = sqdist(cent)
        new_assign = dist.argmin(1)
        if assign is not None and torch.equal(new_assign, assign):
            break
        assign = new_assign
        count = torch.bincount(assign, minlength=k)
        for c in torch.nonzero(count == 0).flatten().tolist():
            far = int(dist.gather(1, assign[:, None]).squeeze(1).argmax())
            assign[far] = c
            count = torch.bincount(assign, minlength=k)
        sums = torch.zeros(k, pts.shape[1], dtype=torch.float64).index_add_(0, assign, pts64)
        cent = (sums / count[:, None].double()).to(pts.dtype)
    return cent.to(x.dtype).view(k, *x.shape[1:])


def kmeans_real(x: Tensor, y: Tensor, num_classes: int, per_class: int, steps: int = 1,
                generator: Optional[torch.Generator] = None, iters: int = 100) -> ImageSet:
    """``per_class`` k-means centroids of every class, laid out over ``steps``."""
    return as_steps([kmeans(x[idx], per_class, generator, iters)
                     for idx in class_indices(y, num_classes)], steps)


def average_real(x: Tensor, y: Tensor, num_classes: int, steps: int = 1) -> ImageSet:
    """The mean image of every class, reused in each of the ``steps`` GD steps: ``[S, C, ...]``."""
    means = torch.stack([x[idx].mean(0) for idx in class_indices(y, num_classes)])
    return means.unsqueeze(0).repeat(steps, *([1] * means.dim())), torch.arange(num_classes).repeat(steps, 1)


# -- training and scoring ---------------------------------------------------------------------
def _lr_cycle(lr: Union[str, float], learned: Optional[Tensor], dtype) -> Tensor:
    if lr == "learned":
        if learned is None:
            raise ConfigError("the 'learned' rate option needs the distilled set's learned rates")
        return learned.detach().to(dtype).reshape(-1)
    return torch.tensor([float(lr)], dtype=dtype)


def train_checkpoints(model: FunctionalModel, theta0: Tensor, data: Tensor, labels: Tensor,
                      lr_cycle: Tensor, epochs: Sequence[int]) -> Dict[int, Tensor]:
    """Plain GD over ``data``'s S steps for ``max(epochs)`` epochs (step t: rate
    ``lr_cycle[t mod len]``); returns θ after ``S·E`` steps for every E in ``epochs``."""
    S = data.shape[0]
    marks = {S * int(e): int(e) for e in epochs}
    th, out = theta0.detach().clone().to(data.dtype), {}
    for t in range(S * max(marks.values())):
        p = th.requires_grad_(True)
        with torch.enable_grad():
            g, = torch.autograd.grad(inner_loss(model.apply(p, data[t % S]), labels[t % S]), p)
        th = (th.detach() - lr_cycle[t % len(lr_cycle)] * g).detach()
        if t + 1 in marks:
            out[marks[t + 1]] = th
    return out


def _acc(model, th, x, y) -> float:
    return accuracy(model, th, x, y) if torch.isfinite(th).all() else 0.0


def _ms(v: Sequence[float]) -> Tuple[float, float]:
    if not v:
        return float("nan"), float("nan")
    return statistics.fmean(v), (statistics.pstdev(v) if len(v) > 1 else 0.0)


@dataclass
class BaselineResult:
    """One baseline's chosen setting and its accuracies.

    ``accs`` holds one test accuracy per (set, model) of the final evaluation; ``set_means`` one
    mean per set; ``grid`` the selection score of every tried setting; ``choice`` the best.
    ``mean``/``std`` are over ``accs`` (all set × model pairs).
    """

    name: str
    choice: Dict[str, object]
    accs: List[float] = field(default_factory=list)
    set_means: List[float] = field(default_factory=list)
    grid: Dict[str, float] = field(default_factory=dict)
    n_models: int = 0
    n_sets: int = 0
    protocol: str = ""

    @property
    def mean(self) -> float:
        return _ms(self.accs)[0]

    @property
    def std(self) -> float:
        return _ms(self.accs)[1]

    def summary(self) -> Dict[str, object]:
        return {"name": self.name, "choice": dict(self.choice), "acc_mean": self.mean,
                "acc_std": self.std, "set_std": _ms(self.set_means)[1], "n_models": self.n_models,
                "n_sets": self.n_sets, "protocol": self.protocol, "grid": dict(self.grid)}

    def __str__(self) -> str:
        ch = ", ".join(f"{k}={v}" for k, v in self.choice.items())
        return (f"{self.name}: {100 * self.mean:.2f} ± {100 * self.std:.2f}% ({ch}; {self.n_sets} set(s) × "
                f"{self.n_models} model(s))")


def evaluate_training_baseline(name: str, model: FunctionalModel, sets: Sequence[ImageSet],
                               test_x: Tensor, test_y: Tensor, theta0s: Sequence[Tensor], *,
                               learned_lrs: Optional[Tensor] = None,
                               lr_grid: Sequence[float] = LR_GRID,
                               epoch_grid: Sequence[int] = EPOCH_GRID,
                               select_theta0s: Optional[Sequence[Tensor]] = None,
                               select_sets: Optional[int] = None,
                               select_test: Optional[Tuple[Tensor, Tensor]] = None,
                               progress: Optional[Callable[[str], None]] = None) -> BaselineResult:
    """Best-of-grid evaluation of real-image training sets (DD's baseline protocol).

    Args:
        sets: one or more ``(data [S, n, ...], labels [S, n])`` (e.g. 10 random-real sets).
        test_x, test_y: the real test set of the reported accuracies.
        theta0s: the held-out θ_0 of the reported accuracies (200 in the paper; ``[θ_0]`` for
            a fixed init).
        learned_lrs: the distilled set's η (adds the ``learned`` option); None skips it.
        select_theta0s, select_sets, select_test: where the grid is scored. Default: on
            ``theta0s``, all sets and the full test set (the paper's choice); the final accuracies
            then reuse the grid runs.
        progress: called with one line after each (set, lr) of the grid and each reported set
            (these runs take up to an hour on a CPU); None is silent.
    Returns:
        :class:`BaselineResult` (accuracies in [0, 1]).
    """
    if not sets:
        raise ShapeError("no baseline sets to evaluate")
    options: List[Union[str, float]] = (["learned"] if learned_lrs is not None else []) + [float(v) for v in lr_grid]
    if not options or not epoch_grid:
        raise ConfigError("no learning-rate options or no epoch counts to evaluate the baseline with")
    thetas = list(theta0s)
    sel_th = thetas if select_theta0s is None else list(select_theta0s)
    sel_sets = list(sets) if select_sets is None else list(sets)[:select_sets]
    sx, sy = (test_x, test_y) if select_test is None else select_test
    paper = select_theta0s is None and select_sets is None and select_test is None
    dtype = sets[0][0].dtype
    say = progress or (lambda _m: None)
    t0 = time.perf_counter()
    scores: Dict[Tuple, List[float]] = {}
    per_run: Dict[Tuple, List[List[float]]] = {}   # (lr, E) -> per set, per model accuracy
    for si, (data, labels) in enumerate(sel_sets):
        for lr in options:
            cyc = _lr_cycle(lr, learned_lrs, dtype)
            for th0 in sel_th:
                for E, th in train_checkpoints(model, th0, data, labels, cyc, epoch_grid).items():
                    a = _acc(model, th, sx, sy)
                    scores.setdefault((lr, E), []).append(a)
                    rows = per_run.setdefault((lr, E), [[] for _ in sel_sets])
                    rows[si].append(a)
            best = max(statistics.fmean(scores[(lr, E)]) for E in epoch_grid)
            say(f"{name}: grid set {si + 1}/{len(sel_sets)}, lr {lr}: best over epochs {best:.2%} "
                f"on {len(sel_th)} model(s) × {si + 1} set(s) so far [{time.perf_counter() - t0:.0f} s]")
    key = max(scores, key=lambda k: statistics.fmean(scores[k]))
    lr, E = key
    grid = {f"lr={k[0]},E={k[1]}": statistics.fmean(v) for k, v in scores.items()}
    res = BaselineResult(name, {"lr": lr, "epochs": E}, grid=grid, n_models=len(thetas), n_sets=len(sets))
    if paper:
        rows = per_run[key]
    else:
        cyc = _lr_cycle(lr, learned_lrs, dtype)
        rows = []
        for i, (d, l) in enumerate(sets):
            rows.append([_acc(model, train_checkpoints(model, th0, d, l, cyc, [E])[E], test_x, test_y)
                         for th0 in thetas])
            say(f"{name}: reported set {i + 1}/{len(sets)} with lr {lr} × {E} epochs: "
                f"{statistics.fmean(rows[-1]):.2%} over {len(thetas)} model(s) [{time.perf_counter() - t0:.0f} s]")
    res.accs = [a for r in rows for a in r]
    res.set_means = [statistics.fmean(r) for r in rows]
    res.protocol = ("best of lr × epochs on the reported models (paper)" if paper else
                    f"best of lr × epochs chosen on {len(sel_th)} separate model(s), {len(sel_sets)} set(s), "
                    f"{len(sx)} test images; reported on {len(thetas)} model(s)")
    return res


def optimized_real(model: FunctionalModel, x: Tensor, y: Tensor, num_classes: int, per_class: int,
                   steps: int, score_theta0s: Sequence[Tensor], lr: Union[str, float], epochs: int, *,
                   learned_lrs: Optional[Tensor] = None, candidates: int = 50, keep: int = 10,
                   score_images: int = 1024, generator: Optional[torch.Generator] = None,
                   progress: Optional[Callable[[str], None]] = None
                   ) -> Tuple[List[ImageSet], List[float]]:
    """The "optimized real" sets: ``candidates`` random-real sets, each scored by the mean
    accuracy of the ``score_theta0s`` models (20 in the paper) trained on it with (lr, epochs)
    and tested on ``score_images`` random training images; returns the best ``keep`` sets and
    all scores (in candidate order)."""
    if not 1 <= keep <= candidates:
        raise ConfigError(f"need 1 ≤ keep ≤ candidates, got keep={keep}, candidates={candidates}")
    pick = torch.randperm(len(x), generator=generator)[:score_images]
    vx, vy = x[pick], y[pick]
    cyc = _lr_cycle(lr, learned_lrs, x.dtype)
    cands, scores = [], []
    for _ in range(candidates):
        s = random_real(x, y, num_classes, per_class, steps, generator)
        accs = [_acc(model, train_checkpoints(model, th0, s[0], s[1], cyc, [epochs])[epochs], vx, vy)
                for th0 in score_theta0s]
        cands.append(s)
        scores.append(statistics.fmean(accs))
        if progress is not None and (len(cands) % 10 == 0 or len(cands) == candidates):
            progress(f"optimized real: scored {len(cands)}/{candidates} candidate sets (best {max(scores):.2%})")
    order = sorted(range(candidates), key=lambda i: -scores[i])[:keep]
    return [cands[i] for i in order], scores


# -- k-NN ---------------------------------------------------------------------------------------
def knn_predict(ref_x: Tensor, ref_y: Tensor, query: Tensor, k: int = 1, metric: str = "l2",
                batch: int = 2048) -> Tensor:
    """k-nearest-neighbour labels of ``query`` against ``(ref_x, ref_y)`` (flattened pixels).

    Majority vote among the ``k`` nearest; a tie goes to the tied class whose nearest member is
    closest. ``metric`` is ``l1`` or ``l2``.
    """
    if metric not in KNN_METRICS:
        raise ConfigError(f"unknown k-NN metric {metric!r}; choose l1 or l2")
    if not 1 <= k <= len(ref_x):
        raise ConfigError(f"k-NN needs 1 ≤ k ≤ {len(ref_x)} references, got k = {k}")
    p = 1.0 if metric == "l1" else 2.0
    R = ref_x.reshape(len(ref_x), -1).double()
    C = int(ref_y.max()) + 1
    out = []
    for i in range(0, len(query), batch):
        d = torch.cdist(query[i:i + batch].reshape(-1, R.shape[1]).double(), R, p=p)
        nn_idx = d.topk(k, dim=1, largest=False).indices          # sorted, nearest first
        lab = ref_y[nn_idx]                                        # [b, k]
        votes = torch.zeros(len(lab), C, dtype=torch.float64).scatter_add_(
            1, lab, torch.ones_like(lab, dtype=torch.float64))
        # tie-break: a small bonus decreasing with the rank of a class's nearest member
        rank_bonus = torch.zeros_like(votes)
        for r in range(k - 1, -1, -1):
            rank_bonus.scatter_(1, lab[:, r:r + 1], torch.full((len(lab), 1), (k - r) / (k + 1.0),
                                                                   dtype=torch.float64))
        out.append((votes + rank_bonus).argmax(1))
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def knn_accuracy(ref_x: Tensor, ref_y: Tensor, test_x: Tensor, test_y: Tensor, k: int = 1,
                 metric: str = "l2") -> float:
    return float((knn_predict(ref_x, ref_y, test_x, k, metric) == test_y).double().mean())


def knn_baseline(name: str, ref_sets: Sequence[Tuple[Tensor, Tensor]], test_x: Tensor, test_y: Tensor,
                 ks: Sequence[int] = KNN_KS, metrics: Sequence[str] = KNN_METRICS) -> BaselineResult:
    """k-NN with each reference set (flat ``[n, ...]`` images and ``[n]`` labels, or a
    ``[S, n, ...]`` training layout), best of metric × K by the mean over sets; ``accs`` are the
    per-set accuracies (k-NN has no model)."""
    if not ref_sets:
        raise ShapeError("no k-NN reference sets")
    flat = []
    for rx, ry in ref_sets:
        if ry.dim() == 2:  # [S, n] training layout -> flat
            rx = rx.reshape(ry.numel(), *rx.shape[2:])
        flat.append((rx, ry.reshape(-1)))
    scores = {(m, k): [knn_accuracy(rx, ry, test_x, test_y, k, m) for rx, ry in flat]
              for m in metrics for k in ks}
    (m, k) = max(scores, key=lambda key: statistics.fmean(scores[key]))
    res = BaselineResult(name, {"metric": m, "k": k},
                         grid={f"{mm},K={kk}": statistics.fmean(v) for (mm, kk), v in scores.items()},
                         n_models=0, n_sets=len(flat),
                         protocol="k-NN on the test set, best of metric × K by the mean over sets")
    res.accs = list(scores[(m, k)])
    res.set_means = list(scores[(m, k)])
    return res
