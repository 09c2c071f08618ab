"""Dataset Distillation (Wang et al. 2018, Algorithm 1): multi-step, multi-epoch, fixed or random init.

Pseudo-code, with this module's names::

    x̃ ~ N(0, 1)  [steps, k·C, ...]          # Distiller.data
    ρ_t = log(expm1(η_0)), t < T = S·E       # Distiller.raw_lrs, η_t = softplus(ρ_t)
    for it in range(iterations):
        x, y = next real batch (1024)
        for j in range(n_nets):              # fixed init: the same θ_0; random: fresh θ_0 ~ p(θ_0)
            L_j, ∇_j = meta_gradient(θ_0^j, x̃, ỹ, η, L(θ) = CE(f(x; θ), y))
        x̃, ρ ← Adam(mean_j ∇_j)              # StepLR halves the rate every 40 epochs

Everything that decides the result is in :class:`DistillConfig`; a run is reproducible from its
config and seed, and resumable from its last checkpoint.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .backgrad import (STRATEGIES, make_batched_outer_loss, make_outer_loss, meta_gradient,
                       meta_gradient_batched)
from .errors import ConfigError, DivergenceError, FastDistillError, ShapeError
from .models import INIT_SCHEMES, FunctionalModel, build_model
from .models.batched import supports_batched

__all__ = ["DistillConfig", "Distiller", "DistillResult", "distill", "inverse_softplus",
           "hard_labels", "initial_labels", "top_labels", "MODES"]

CHECKPOINT_FORMAT = "fastdistill.checkpoint/v1"

#: p(θ_0): ``fixed``/``random`` draw from ``init``; the ``*-pretrained`` modes draw from a model
#: pool (:mod:`.pretrain`): one pool model, or a fresh pool model per use.
MODES = ("fixed", "random", "fixed-pretrained", "random-pretrained")


def inverse_softplus(y: float) -> float:
    """ρ with softplus(ρ) = y (y > 0)."""
    if not y > 0:
        raise ConfigError(f"initial learning rate must be positive, got {y}")
    return y + math.log(-math.expm1(-y))


def hard_labels(num_classes: int, images_per_class: int, steps: int) -> Tensor:
    """ỹ for hard labels: each step holds ``images_per_class`` copies of every class, [S, k·C]."""
    return torch.arange(num_classes).repeat_interleave(images_per_class).repeat(steps, 1)


def initial_labels(num_classes: int, images_per_class: int, steps: int,
                   label_classes: Optional[List[int]] = None) -> Tensor:
    """The class each distilled image starts as, ``[S, n]`` int64.

    Without ``label_classes``: :func:`hard_labels`. With it, every step holds one image per
    entry (``n = len(label_classes)``), which allows fewer images than classes (SLDD: 5 images
    for 10 classes, e.g. ``[0, 2, 4, 6, 8]``).

    Raises:
        ConfigError: an empty list, or a class index outside ``[0, num_classes)``.
    """
    if label_classes is None:
        return hard_labels(num_classes, images_per_class, steps)
    cls = list(label_classes)
    if not cls:
        raise ConfigError("label_classes is empty; give the initial class of every image in a step")
    bad = [k for k in cls if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < num_classes]
    if bad:
        raise ConfigError(f"unknown class index {bad[0]!r} in label_classes; the dataset has "
                          f"{num_classes} classes (0..{num_classes - 1})")
    return torch.tensor(cls, dtype=torch.long).repeat(steps, 1)


def top_labels(labels: Tensor, k: int = 3) -> List[List[tuple]]:
    """Per distilled image (flattened over steps), its ``k`` largest label entries.

    ``labels`` is ``[S, n, C]`` (soft) or ``[S, n]`` (hard, reported as weight 1.0).
    Returns a list of ``[(class, weight), ...]``, for captions such as "3:2.1 8:0.9 5:0.4".
    """
    if not labels.is_floating_point():
        return [[(int(c), 1.0)] for c in labels.reshape(-1)]
    flat = labels.detach().reshape(-1, labels.shape[-1])
    v, i = flat.topk(min(k, flat.shape[1]), dim=1)
    return [[(int(c), float(w)) for c, w in zip(ci, vi)] for ci, vi in zip(i, v)]


@dataclass
class DistillConfig:
    """Every knob of a distillation run; the defaults are DD's MNIST/LeNet settings.

    ``iterations`` defaults to ``outer_epochs`` passes over the training set in batches of
    ``real_batch`` (DD: 400 epochs ≈ 23.4k iterations on MNIST); StepLR's step is
    ``decay_epochs`` such passes.
    """

    dataset: str = "mnist"
    data_root: Optional[str] = None
    model: str = "lenet"
    init: str = "xavier"
    init_gain: Optional[float] = None
    mode: str = "fixed"                 # fixed | random | fixed-pretrained | random-pretrained
    steps: int = 1                      # S
    epochs: int = 3                     # E; T = S·E
    images_per_class: int = 1           # k
    n_nets: int = 1                     # networks per meta-iteration (random init)
    lr0: float = 0.02                   # η_0
    outer_lr: float = 0.01
    outer_betas: tuple = (0.5, 0.999)
    decay_epochs: float = 40.0
    decay_factor: float = 0.5
    outer_epochs: float = 400.0
    iterations: Optional[int] = None
    real_batch: int = 1024
    backgrad: str = "stored"
    inner_optimizer: str = "gd"         # gd | sgdm
    momentum0: float = 0.5              # initial β for sgdm
    max_lr: float = 100.0               # a learned η above this is treated as divergence
    seed: int = 0
    eval_models: int = 200              # held-out models for random init
    eval_every: int = 0                 # iterations between evaluations (0: only at the end)
    val_size: int = 0                   # training images held out to pick the best iterate (0: off)
    checkpoint_every: int = 500
    dtype: str = "float32"
    threads: int = 0                    # torch.set_num_threads (0: leave as is)
    data_init: str = "randn"            # randn (DD) | real: x̃ starts as random real images of its class
    batched: bool = True                # n_nets > 1 with stored on LeNet/AlexCifarNet: one batched unroll
    # SLDD (Sucholutsky & Schonlau): learnable labels ỹ [S, n, C], initialised one-hot
    soft_labels: bool = False
    label_softmax: bool = False         # the inner loss sees softmax(ỹ) instead of raw ỹ
    label_classes: Optional[list] = None  # initial class per image of a step (overrides k·C)
    # outer objective: ce (DD) | poison (CE with attack_class relabelled target_class)
    objective: str = "ce"
    attack_class: Optional[int] = None  # K
    target_class: Optional[int] = None  # T
    # pre-trained θ_0 (*-pretrained modes): a pool file from `fastdistill pretrain`
    pool: Optional[str] = None
    pool_heldout: int = 200             # pool models kept for evaluation, never distilled on

    @property
    def fixed_init(self) -> bool:
        """One θ_0 reused throughout (fixed or fixed-pretrained)."""
        return self.mode in ("fixed", "fixed-pretrained")

    def validate(self) -> None:
        if self.data_init not in ("randn", "real"):
            raise ConfigError(f"unknown data_init {self.data_init!r}; choose randn or real")
        if self.mode not in MODES:
            raise ConfigError(f"unknown init mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.mode.endswith("-pretrained") and not self.pool:
            raise ConfigError(f"mode {self.mode} needs a model pool file (pool=...; see `fastdistill pretrain`)")
        if self.label_softmax and not self.soft_labels:
            raise ConfigError("label_softmax needs soft_labels")
        if self.objective not in ("ce", "poison"):
            raise ConfigError(f"unknown objective {self.objective!r}; choose ce or poison")
        if self.objective == "poison" and (self.attack_class is None or self.target_class is None
                                           or self.attack_class == self.target_class):
            raise ConfigError("the poison objective needs distinct attack_class (K) and target_class (T)")
        if self.init not in INIT_SCHEMES:
            raise ConfigError(f"unknown init scheme {self.init!r}; choose one of {', '.join(INIT_SCHEMES)}")
        if self.backgrad not in STRATEGIES:
            raise ConfigError(f"unknown back-gradient strategy {self.backgrad!r}; choose one of "
                              f"{', '.join(sorted(STRATEGIES))}")
        if self.inner_optimizer not in ("gd", "sgdm"):
            raise ConfigError(f"unknown inner optimizer {self.inner_optimizer!r}; choose gd or sgdm")
        if int(self.val_size) < 0:
            raise ConfigError(f"val_size must be 0 (off) or a number of training images, got {self.val_size}")
        if int(self.val_size) > 0 and int(self.eval_every) < 1:
            raise ConfigError("val_size picks the best of the periodic evaluations: set eval_every too")
        for name in ("steps", "epochs", "images_per_class", "n_nets", "real_batch"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 < self.momentum0 < 1:
            raise ConfigError(f"momentum0 must lie in (0, 1), got {self.momentum0}")
        if self.dtype not in ("float32", "float64"):
            raise ConfigError(f"dtype must be float32 or float64, got {self.dtype}")
        inverse_softplus(self.lr0)

    @property
    def T(self) -> int:
        return self.steps * self.epochs

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["outer_betas"] = list(self.outer_betas)
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "DistillConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown config keys {unknown}")
        d = dict(d)
        if "outer_betas" in d:
            d["outer_betas"] = tuple(d["outer_betas"])
        return cls(**d)


@dataclass
class DistillResult:
    """The distilled set and what was measured. ``lrs`` (and ``betas``) are the actual η_t."""

    data: Tensor
    labels: Tensor
    lrs: Tensor
    betas: Optional[Tensor]
    config: DistillConfig
    metrics: Dict[str, Any]
    history: List[Dict[str, float]] = field(default_factory=list)
    theta0: Optional[Tensor] = None      # the fixed θ_0 (fixed init)


class _RealBatches:
    """Shuffled epochs over the real training set; its position is part of the checkpoint."""

    def __init__(self, n: int, batch: int, gen: torch.Generator):
        self.n, self.batch, self.gen = n, min(batch, n), gen
        self.perm, self.pos = torch.randperm(n, generator=gen), 0

    def next(self) -> Tensor:
        if self.pos + self.batch > self.n:
            self.perm, self.pos = torch.randperm(self.n, generator=self.gen), 0
        idx = self.perm[self.pos:self.pos + self.batch]
        self.pos += self.batch
        return idx

    def state(self):
        return {"perm": self.perm, "pos": self.pos, "gen": self.gen.get_state()}

    def load(self, s):
        self.perm, self.pos = s["perm"], int(s["pos"])
        self.gen.set_state(s["gen"])


class Distiller:
    """A distillation run: the learnable synthetic set, its optimiser, and the loop.

    Args:
        config: the run's :class:`DistillConfig`.
        train_x, train_y: the real training set, normalised float ``[N, C, H, W]`` and int64 ``[N]``.
        num_classes: C.
        model: a functional model (default: built from ``config.model``).
        theta0: the fixed θ_0 for ``mode="fixed"`` (default: sampled with the config's seed).
        init_fn: ``generator -> θ_0`` for ``mode="random"`` (default: ``model.init(config.init)``);
            pre-trained pools plug in here (the ``*-pretrained`` modes load ``config.pool``
            through :func:`fastdistill.pretrain.pool_initialisers` when neither hook is given).
        outer_fn: ``(model, x_real, y_real) -> L(θ)`` (default: :func:`make_outer_loss`, or
            :func:`fastdistill.poison.poison_outer_loss` for ``objective="poison"``).
    """

    def __init__(self, config: DistillConfig, train_x: Tensor, train_y: Tensor, num_classes: int,
                 model: Optional[FunctionalModel] = None, theta0: Optional[Tensor] = None,
                 init_fn: Optional[Callable[[torch.Generator], Tensor]] = None,
                 outer_fn: Optional[Callable[..., Callable[[Tensor], Tensor]]] = None):
        config.validate()
        self.cfg = c = config
        self.dtype = getattr(torch, c.dtype)
        if train_x.dim() != 4 or len(train_x) != len(train_y):
            raise ShapeError(f"real data must be [N, C, H, W] with N labels, got {list(train_x.shape)} "
                             f"and {list(train_y.shape)}")
        self.train_x, self.train_y = train_x.to(self.dtype), train_y
        self.num_classes = num_classes
        self.model = model or build_model(c.model, num_classes, train_x.shape[1], train_x.shape[2])
        self.model.check_input(train_x[:1])
        present = torch.bincount(train_y, minlength=num_classes)
        if (present == 0).any():
            empty = torch.nonzero(present == 0).flatten().tolist()
            raise ShapeError(f"classes {empty} have no training examples")
        gen = torch.Generator().manual_seed(c.seed)
        self.init_gen = torch.Generator().manual_seed(c.seed + 1)
        self.batches = _RealBatches(len(train_x), c.real_batch, torch.Generator().manual_seed(c.seed + 2))
        if c.mode.endswith("-pretrained") and theta0 is None and init_fn is None:
            from .pretrain import pool_initialisers
            theta0, init_fn = pool_initialisers(c, self.model, dtype=self.dtype)
        if outer_fn is None and c.objective == "poison":
            from .poison import poison_outer_loss
            for name in ("attack_class", "target_class"):
                if not 0 <= int(getattr(c, name)) < num_classes:
                    raise ConfigError(f"{name} {getattr(c, name)} is not a class index (0..{num_classes - 1})")
            outer_fn = poison_outer_loss(c.attack_class, c.target_class)
        self.outer_fn = outer_fn or make_outer_loss
        self.init_fn = init_fn or (lambda g: self.model.init(c.init, g, gain=c.init_gain, dtype=self.dtype))
        if c.fixed_init:
            self.theta0 = (theta0 if theta0 is not None else self.init_fn(gen)).to(self.dtype)
            self.model.check_theta(self.theta0)
        else:
            self.theta0 = None
        # the class each image starts as, [S, n]; with soft labels, ỹ is learned from its one-hot
        self.labels = initial_labels(num_classes, c.images_per_class, c.steps, c.label_classes)
        n = self.labels.shape[1]
        self.data = torch.randn((c.steps, n) + tuple(self.model.input_shape), generator=gen,
                                dtype=self.dtype)
        if c.data_init == "real":
            # one real training image of the right class per slot, drawn with the run's generator
            for cls in range(num_classes):
                pos = (self.labels == cls).nonzero()
                pool = torch.nonzero(train_y == cls).flatten()
                pick = pool[torch.randint(len(pool), (len(pos),), generator=gen)]
                self.data[pos[:, 0], pos[:, 1]] = self.train_x[pick]
        self.data.requires_grad_(True)
        self.raw_lrs = torch.full((c.T,), inverse_softplus(c.lr0), dtype=self.dtype, requires_grad=True)
        params = [self.data, self.raw_lrs]
        self.raw_labels = None
        if c.soft_labels:
            if self.model.num_outputs == 1:  # binary one-logit model: ỹ is the BCE target
                if c.label_softmax:
                    raise ConfigError("label_softmax needs a model with one output per class")
                raw = self.labels.to(self.dtype).unsqueeze(-1)
            else:
                raw = F.one_hot(self.labels, self.model.num_outputs).to(self.dtype)
            self.raw_labels = raw.requires_grad_(True)
            params.append(self.raw_labels)
        self.raw_betas = None
        if c.inner_optimizer == "sgdm":
            b0 = math.log(c.momentum0 / (1 - c.momentum0))  # β = sigmoid(raw)
            self.raw_betas = torch.full((c.T,), b0, dtype=self.dtype, requires_grad=True)
            params.append(self.raw_betas)
        self.opt = torch.optim.Adam(params, lr=c.outer_lr, betas=tuple(c.outer_betas))
        per_epoch = max(1, len(train_x) // min(c.real_batch, len(train_x)))
        self.iterations = c.iterations if c.iterations is not None else int(round(c.outer_epochs * per_epoch))
        self.sched = torch.optim.lr_scheduler.StepLR(
            self.opt, step_size=max(1, int(round(c.decay_epochs * per_epoch))), gamma=c.decay_factor)
        self.iteration = 0
        self.history: List[Dict[str, float]] = []
        self.elapsed = 0.0

    # -- the learnable quantities --------------------------------------------------------------
    def lrs(self) -> Tensor:
        """η_t = softplus(ρ_t), ``[T]`` (detached)."""
        return F.softplus(self.raw_lrs.detach())

    def betas(self) -> Optional[Tensor]:
        return None if self.raw_betas is None else torch.sigmoid(self.raw_betas.detach())

    def train_labels(self) -> Tensor:
        """ỹ as the inner loop sees it (detached): hard ``[S, n]``, or soft ``[S, n, C]`` (the
        raw learnable matrix, or its softmax over classes with ``label_softmax``)."""
        if self.raw_labels is None:
            return self.labels
        raw = self.raw_labels.detach()
        return torch.softmax(raw, dim=-1) if self.cfg.label_softmax else raw

    # -- one meta-iteration --------------------------------------------------------------------
    def step(self) -> Dict[str, float]:
        c = self.cfg
        idx = self.batches.next()
        outer = self.outer_fn(self.model, self.train_x[idx], self.train_y[idx])
        lrs, betas = self.lrs(), self.betas()
        labels = self.train_labels()
        glab = None if self.raw_labels is None else torch.zeros_like(labels)
        gdata = torch.zeros_like(self.data)
        glr = torch.zeros_like(self.raw_lrs)
        gbeta = None if betas is None else torch.zeros_like(betas)
        losses = []
        kept = {"stored": 0, "info": 0}  # bytes the back-gradient kept for its reverse pass

        def note(stats: Dict[str, Any]) -> None:
            kept["stored"] = max(kept["stored"], int(stats.get("stored_bytes") or 0))
            kept["info"] = max(kept["info"], int(stats.get("info_buffer_bytes") or 0))

        batched = self._batched_meta_gradient(idx, outer, labels, lrs, betas, glab is not None)
        if batched is not None:  # the mean over networks, scaled to the loop's sum
            note(batched.stats)
            losses = [float(v) for v in batched.stats["losses"]]
            gdata += batched.data * c.n_nets
            glr += batched.lrs * c.n_nets
            if glab is not None:
                glab += batched.labels * c.n_nets
            if gbeta is not None:
                gbeta += batched.betas * c.n_nets
        for _ in range(c.n_nets if batched is None else 0):
            th0 = self.theta0 if c.fixed_init else self.init_fn(self.init_gen).to(self.dtype)
            out = meta_gradient(self.model, th0, self.data.detach(), labels, lrs, outer,
                                betas=betas, strategy=c.backgrad, need_theta0=False,
                                need_labels=glab is not None)
            note(out.stats)
            gdata += out.data
            glr += out.lrs
            if glab is not None:
                glab += out.labels
            if gbeta is not None:
                gbeta += out.betas
            losses.append(float(out.loss))
        k = 1.0 / c.n_nets
        self.data.grad = gdata * k
        # chain rule through η = softplus(ρ) and β = sigmoid(b)
        self.raw_lrs.grad = glr * k * torch.sigmoid(self.raw_lrs.detach())
        if gbeta is not None:
            b = betas
            self.raw_betas.grad = gbeta * k * b * (1 - b)
        if glab is not None:
            glab = glab * k
            if c.label_softmax:  # VJP of p = softmax(r): p ⊙ (g − ⟨g, p⟩)
                glab = labels * (glab - (glab * labels).sum(-1, keepdim=True))
            self.raw_labels.grad = glab
        learned = [("synthetic data", self.data), ("learning rates", self.raw_lrs)]
        if self.raw_labels is not None:
            learned.append(("labels", self.raw_labels))
        for name, p in learned:
            if not torch.isfinite(p.grad).all():
                raise DivergenceError(f"the meta-gradient of the {name} is not finite at iteration "
                                      f"{self.iteration}")
        self.opt.step()
        self.sched.step()
        self.iteration += 1
        new_lrs = self.lrs()
        if not torch.isfinite(self.data).all():
            raise DivergenceError(f"the synthetic data became non-finite at iteration {self.iteration}")
        if not torch.isfinite(new_lrs).all() or new_lrs.max() > c.max_lr:
            raise DivergenceError(f"a learned learning rate exploded (max {float(new_lrs.max()):.4g} > "
                                  f"max_lr {c.max_lr}) at iteration {self.iteration}",
                                  above_max_lr=bool(torch.isfinite(new_lrs).all()))
        return {"iteration": self.iteration, "loss": sum(losses) / len(losses),
                "lr_mean": float(new_lrs.mean()), "outer_lr": self.sched.get_last_lr()[0],
                "engine_bytes": kept["stored"], "info_buffer_bytes": kept["info"]}

    def _batched_meta_gradient(self, idx, outer, labels, lrs, betas, need_labels):
        """All n_nets networks in one batched unroll, or None where the per-network loop runs.
        θ_0 draws come from ``init_gen`` in the loop's order, so a run is the same either way."""
        c = self.cfg
        if not (c.batched and c.n_nets > 1 and c.backgrad == "stored" and supports_batched(self.model)):
            return None
        th0s = torch.stack([self.theta0 if c.fixed_init else self.init_fn(self.init_gen).to(self.dtype)
                            for _ in range(c.n_nets)])
        if self.outer_fn is make_outer_loss:  # else: the custom objective runs per network
            outer = make_batched_outer_loss(self.model, self.train_x[idx], self.train_y[idx])
        return meta_gradient_batched(self.model, th0s, self.data.detach(), labels, lrs, outer,
                                     betas=betas, need_theta0=False, need_labels=need_labels)

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT, "config": self.cfg.to_dict(), "iteration": self.iteration,
            "data": self.data.detach().clone(), "raw_lrs": self.raw_lrs.detach().clone(),
            "raw_betas": None if self.raw_betas is None else self.raw_betas.detach().clone(),
            "raw_labels": None if self.raw_labels is None else self.raw_labels.detach().clone(),
            "theta0": self.theta0, "opt": self.opt.state_dict(), "sched": self.sched.state_dict(),
            "init_gen": self.init_gen.get_state(), "batches": self.batches.state(),
            "history": list(self.history), "elapsed": self.elapsed,
        }

    def load_state_dict(self, s: Dict[str, Any]) -> None:
        if s.get("format") != CHECKPOINT_FORMAT:
            raise FastDistillError(f"not a fastdistill checkpoint (format {s.get('format')!r})")
        mine, theirs = self.cfg.to_dict(), dict(s["config"])
        # what may differ on resume: bookkeeping that does not change the optimisation
        free = {"iterations", "eval_every", "checkpoint_every", "eval_models", "threads", "data_root",
                "batched"}
        defaults = DistillConfig().to_dict()  # keys added after the checkpoint was written
        diff = sorted(k for k in mine if k not in free and mine[k] != theirs.get(k, defaults[k]))
        if diff:
            raise ConfigError(f"checkpoint was made with different settings: {', '.join(diff)}")
        with torch.no_grad():
            if s["data"].shape != self.data.shape:
                raise ShapeError("checkpoint data shape does not match the config")
            self.data.copy_(s["data"])
            self.raw_lrs.copy_(s["raw_lrs"])
            if self.raw_betas is not None:
                self.raw_betas.copy_(s["raw_betas"])
            if self.raw_labels is not None:
                self.raw_labels.copy_(s["raw_labels"])
        if s["theta0"] is not None:
            self.theta0 = s["theta0"]
        self.opt.load_state_dict(s["opt"])
        self.sched.load_state_dict(s["sched"])
        self.init_gen.set_state(s["init_gen"])
        self.batches.load(s["batches"])
        self.iteration = int(s["iteration"])
        self.history = list(s["history"])
        self.elapsed = float(s.get("elapsed", 0.0))

    def save_checkpoint(self, path) -> None:
        """Atomically write the run state (a crash mid-write never destroys the last good one)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, path)

    def load_checkpoint(self, path) -> None:
        path = Path(path)
        if not path.exists():
            raise FastDistillError(f"no checkpoint at {path}")
        try:
            s = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # corrupt or truncated file
            raise FastDistillError(f"checkpoint {path} is unreadable ({type(e).__name__}: {e})") from None
        self.load_state_dict(s)

    # -- the loop ------------------------------------------------------------------------------
    def run(self, *, checkpoint_path=None, on_step: Optional[Callable[[Dict[str, float]], None]] = None,
            evaluate_fn: Optional[Callable[["Distiller"], Dict[str, float]]] = None) -> None:
        """Meta-iterate until ``self.iterations``; checkpoint every ``checkpoint_every`` iterations.

        On a :class:`DivergenceError` the last good checkpoint is left untouched and the error
        propagates. ``evaluate_fn(self)`` runs every ``eval_every`` iterations and its metrics
        join the history.
        """
        c = self.cfg
        if c.threads:
            torch.set_num_threads(c.threads)
        while self.iteration < self.iterations:
            t0 = time.perf_counter()
            rec = self.step()
            self.elapsed += time.perf_counter() - t0
            rec["elapsed_s"] = self.elapsed
            if evaluate_fn is not None and c.eval_every and self.iteration % c.eval_every == 0 \
                    and self.iteration < self.iterations:
                rec.update(evaluate_fn(self))
            self.history.append(rec)
            if on_step is not None:
                on_step(rec)
            if checkpoint_path is not None and c.checkpoint_every and self.iteration % c.checkpoint_every == 0:
                self.save_checkpoint(checkpoint_path)
        if checkpoint_path is not None:
            self.save_checkpoint(checkpoint_path)

    def result(self, metrics: Optional[Dict[str, Any]] = None) -> DistillResult:
        return DistillResult(data=self.data.detach().clone(), labels=self.train_labels().clone(),
                             lrs=self.lrs(), betas=self.betas(), config=self.cfg,
                             metrics=dict(metrics or {}), history=list(self.history),
                             theta0=self.theta0)


def distill(config: DistillConfig, train_x: Tensor, train_y: Tensor, num_classes: int,
            **kwargs) -> DistillResult:
    """Run DD from scratch and return the distilled set (no evaluation; see :mod:`.evaluate`).

    Example::

        >>> import torch
        >>> from fastdistill.distill import DistillConfig, distill
        >>> x = torch.randn(64, 1, 28, 28); y = torch.arange(64) % 10
        >>> r = distill(DistillConfig(iterations=2, real_batch=32), x, y, 10)
        >>> r.data.shape, r.lrs.shape
        (torch.Size([1, 10, 1, 28, 28]), torch.Size([3]))
    """
    d = Distiller(config, train_x, train_y, num_classes, **kwargs)
    d.run()
    return d.result()
