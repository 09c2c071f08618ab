"""Pre-trained initialisations: pools of models trained on a source dataset (DD §3.5, §3.6).

A *pool* is N networks of one architecture trained on one dataset, stored as a single tensor file
(``[N, P]`` flat weights + metadata). Distillation draws θ_0 from it:

* ``fixed-pretrained``: one pool model is θ_0 for distillation and evaluation (the paper's
  "fixed pre-trained weights");
* ``random-pretrained``: a fresh pool model per use (``n_nets`` per meta-iteration), evaluated
  on *held-out* pool models that distillation never sees (paper: 2000 to distil, 200 to test).

The pool is split by position: the last ``heldout`` models are reserved for testing, the others
are sampled during distillation (:meth:`ModelPool.split`). Adaptation (source → target dataset)
needs nothing more: distil on the target dataset with a pool trained on the source one.

File format (``torch.save``, loaded with ``weights_only=True``)::

    {"format": "fastdistill.pool/v1", "thetas": float32 [N, P], "meta": {model, num_classes,
     in_channels, image_size, dataset, n, epochs, lr, momentum, batch, init, seed, test_acc, ...}}
"""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .backgrad.common import inner_loss
from .errors import ConfigError, DataError, DivergenceError, ShapeError
from .evaluate import accuracy, heldout_inits
from .models import FunctionalModel, build_model
from .models.batched import batched_engine, supports_batched

__all__ = ["POOL_FORMAT", "ModelPool", "train_model", "train_models", "pretrain_pool", "partial_path",
           "save_pool", "save_pool_and_drop_partial", "load_pool", "pool_initialisers", "evaluation_inits",
           "finetune_full"]

POOL_FORMAT = "fastdistill.pool/v1"


@dataclass
class ModelPool:
    """N trained networks of one architecture.

    Attributes:
        thetas: ``[N, P]`` flat weights (float32 on disk).
        meta: how they were made: ``model``, ``num_classes``, ``in_channels``, ``image_size``
            (enough to rebuild the network), ``dataset``, the training settings, and the test
            accuracy of every model on its source dataset (``test_acc``).
    """

    thetas: Tensor
    meta: Dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.thetas.shape[0])

    def build_model(self) -> FunctionalModel:
        m = self.meta
        return build_model(m["model"], int(m["num_classes"]), int(m["in_channels"]), int(m["image_size"]))

    def check_model(self, model: FunctionalModel) -> None:
        """Raise :class:`ShapeError` unless the pool's weights fit ``model``."""
        if self.thetas.shape[1] != model.num_params:
            raise ShapeError(f"the pool holds {self.meta.get('model', '?')} weights with "
                             f"P = {self.thetas.shape[1]}, but {model.name} has P = {model.num_params}")

    def split(self, heldout: int) -> Tuple[List[int], List[int]]:
        """(indices to distil on, held-out indices): the last ``heldout`` models are held out."""
        n = len(self)
        if heldout < 0 or heldout >= n:
            raise ConfigError(f"cannot hold out {heldout} of {n} pool models: at least one must remain "
                              "for distillation (lower pool_heldout or train a larger pool)")
        return list(range(n - heldout)), list(range(n - heldout, n))


# -- training -----------------------------------------------------------------------------------
def train_model(model: FunctionalModel, theta0: Tensor, x: Tensor, y: Tensor, *, epochs: float = 1.0,
                lr: float = 0.01, momentum: float = 0.9, batch: int = 64,
                generator: Optional[torch.Generator] = None) -> Tensor:
    """Minibatch SGD (with momentum) on (x, y) from θ_0; returns the trained flat θ (float32, or
    float64 when θ_0 is float64).

    ``epochs`` may be fractional (``round(epochs·N/batch)`` shuffled minibatches).
    Update: ``v ← μ v + g``, ``θ ← θ − lr·v`` (PyTorch's SGD convention).

    Raises:
        ShapeError: empty or mismatched training set; DivergenceError: the weights became
            non-finite (the message names the learning rate).
    """
    _check_training_set(x, y)
    dt = _train_dtype(theta0)
    th = theta0.detach().clone().to(dt)
    v = torch.zeros_like(th)
    n, b = len(x), min(batch, len(x))
    total = int(round(epochs * n / b))
    perm, pos = torch.randperm(n, generator=generator), 0
    for _ in range(total):
        if pos + b > n:
            perm, pos = torch.randperm(n, generator=generator), 0
        idx = perm[pos:pos + b]
        pos += b
        p = th.requires_grad_(True)
        with torch.enable_grad():
            g, = torch.autograd.grad(inner_loss(model.apply(p, x[idx].to(dt)), y[idx]), p)
        th = th.detach()
        v = momentum * v + g
        th = th - lr * v
    if not torch.isfinite(th).all():
        raise DivergenceError(f"pre-training diverged (non-finite weights) at lr {lr}; lower it")
    return th.detach()


def _train_dtype(theta: Tensor) -> torch.dtype:
    """float64 weights train in float64 (the tests' exact comparisons), anything else in float32."""
    return torch.float64 if theta.dtype == torch.float64 else torch.float32


def _check_training_set(x: Tensor, y: Tensor) -> None:
    if len(x) == 0 or len(x) != len(y):
        raise ShapeError(f"training set must be non-empty with one label per image, got {len(x)} images "
                         f"and {len(y)} labels")


def train_models(model: FunctionalModel, theta0s: Tensor, x: Tensor, y: Tensor, *, epochs: float = 1.0,
                 lr: float = 0.01, momentum: float = 0.9, batch: int = 64,
                 generators: Optional[Sequence[torch.Generator]] = None, engine: str = "auto") -> Tensor:
    """:func:`train_model` for K networks at once: θ_0 ``[K, P]`` → trained ``[K, P]``.

    Network ``k`` follows exactly :func:`train_model`'s recipe with ``generators[k]`` (its own
    shuffled minibatches, the same stream), so its result equals ``train_model(model, theta0s[k],
    ..., generator=generators[k])`` up to float round-off; the K gradients of a step come from one
    batched call (:func:`~fastdistill.models.batched.batched_engine`: LeNet's explicit engine, on
    CPU the C++ step with one network per thread). Models without a batched form (any
    ``nn.Module``) train one after another with :func:`train_model`.

    Raises:
        ShapeError: empty or mismatched training set, or θ_0 not ``[K, P]``, or a generator count
            other than K; DivergenceError: some network's weights became non-finite.
    """
    _check_training_set(x, y)
    if theta0s.dim() != 2 or theta0s.shape[1] != model.num_params:
        raise ShapeError(f"θ_0 of K networks must be [K, {model.num_params}], got {list(theta0s.shape)}")
    K = theta0s.shape[0]
    gens = list(generators) if generators is not None else [None] * K
    if len(gens) != K:
        raise ShapeError(f"{K} networks need {K} generators, got {len(gens)}")
    if not supports_batched(model):
        return torch.stack([train_model(model, theta0s[k], x, y, epochs=epochs, lr=lr, momentum=momentum,
                                        batch=batch, generator=gens[k]) for k in range(K)])
    eng = batched_engine(model, engine)
    dt = _train_dtype(theta0s)
    th = theta0s.detach().clone().to(dt)
    v = torch.zeros_like(th)
    n, b = len(x), min(batch, len(x))
    total = int(round(epochs * n / b))
    perms = [torch.randperm(n, generator=g) for g in gens]
    pos = 0   # every network reshuffles at the same steps (same n and b)
    for _ in range(total):
        if pos + b > n:
            perms, pos = [torch.randperm(n, generator=g) for g in gens], 0
        idx = torch.stack([p[pos:pos + b] for p in perms])          # [K, b]
        pos += b
        _, g = eng.loss_grad(th, x[idx].to(dt), y[idx])
        v = momentum * v + g
        th = th - lr * v
    bad = [k for k in range(K) if not torch.isfinite(th[k]).all()]
    if bad:
        raise DivergenceError(f"pre-training diverged (non-finite weights in {len(bad)} of {K} networks) "
                              f"at lr {lr}; lower it")
    return th


def pretrain_pool(model: FunctionalModel, train_x: Tensor, train_y: Tensor, n: int, *,
                  init: str = "xavier", epochs: float = 1.0, lr: float = 0.01, momentum: float = 0.9,
                  batch: int = 64, seed: int = 0, test_x: Optional[Tensor] = None,
                  test_y: Optional[Tensor] = None, meta: Optional[Dict[str, Any]] = None,
                  progress: Optional[Callable[[int, float], None]] = None, group: int = 16,
                  engine: str = "auto", partial=None) -> ModelPool:
    """Train ``n`` models from independent ``init`` draws (seeded) and return them as a pool.

    Args:
        model: the functional architecture.
        train_x, train_y: the source training set (normalised images, int64 labels).
        n: number of models.
        init, epochs, lr, momentum, batch: how each model is trained (:func:`train_model`).
        seed: model ``i`` uses ``Generator().manual_seed(seed + i)`` for its θ_0 and batch order,
            so pools are reproducible and extendable, whatever ``group`` is.
        test_x, test_y: when given, every model's source test accuracy is stored in the metadata.
        meta: extra metadata (``dataset`` etc.) merged into the pool's.
        progress: ``progress(i, test_acc)`` after each model.
        group: networks trained together (:func:`train_models`); 1 trains them one by one with
            autograd (:func:`train_model`, the reference).
        engine: the batched engine of :func:`train_models`.
        partial: a file that holds the finished models, rewritten after every group (the last
            time with all ``n``); a run that finds one with the same settings resumes after its
            last model. A partial file of other settings is an error, never silently mixed in.
            The caller removes it once the pool is saved (:func:`save_pool_and_drop_partial`).
    """
    if n < 1:
        raise ConfigError(f"a pool needs at least one model, got n = {n}")
    if group < 1:
        raise ConfigError(f"group must be at least 1, got {group}")
    settings = {"model": model.name, "P": int(model.num_params), "init": init, "epochs": epochs, "lr": lr,
                "momentum": momentum, "batch": batch, "seed": seed, "n_train": int(len(train_x))}
    thetas, accs = [], []
    partial = Path(partial) if partial is not None else None
    if partial is not None and partial.exists():
        thetas, accs = _load_partial(partial, settings, n)
    t0 = time.perf_counter()
    for i in range(len(accs)):
        if progress is not None:
            progress(i, accs[i])
    while len(thetas) < n:
        lo = len(thetas)
        ids = range(lo, min(n, lo + group))
        gens = [torch.Generator().manual_seed(seed + i) for i in ids]
        th0 = torch.stack([model.init(init, g).float() for g in gens])
        if group == 1:
            done = train_model(model, th0[0], train_x, train_y, epochs=epochs, lr=lr, momentum=momentum,
                               batch=batch, generator=gens[0]).unsqueeze(0)
        else:
            done = train_models(model, th0, train_x, train_y, epochs=epochs, lr=lr, momentum=momentum,
                                batch=batch, generators=gens, engine=engine)
        for k, i in enumerate(ids):
            thetas.append(done[k])
            acc = accuracy(model, done[k], test_x, test_y) if test_x is not None else float("nan")
            accs.append(acc)
            if progress is not None:
                progress(i, acc)
        if partial is not None:
            _save_partial(partial, settings, thetas, accs)
    info = {"model": model.name, "num_classes": int(getattr(model, "num_classes", model.num_outputs)),
            "in_channels": int(model.input_shape[0]), "image_size": int(model.input_shape[-1]),
            "n": n, "init": init, "epochs": epochs, "lr": lr, "momentum": momentum, "batch": batch,
            "seed": seed, "test_acc": accs, "wall_s": time.perf_counter() - t0}
    info.update(meta or {})
    return ModelPool(torch.stack(thetas).float(), info)


_PARTIAL_FORMAT = "fastdistill.pool-partial/v1"


def _save_partial(path: Path, settings: dict, thetas: List[Tensor], accs: List[float]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"format": _PARTIAL_FORMAT, "settings": settings, "thetas": torch.stack(thetas).float(),
                "test_acc": list(accs)}, tmp)
    os.replace(tmp, path)


def _load_partial(path: Path, settings: dict, n: int) -> Tuple[List[Tensor], List[float]]:
    try:
        s = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise DataError(f"partial pool {path} is unreadable ({type(e).__name__}: {e}); delete it to "
                        "start over") from None
    if not isinstance(s, dict) or s.get("format") != _PARTIAL_FORMAT:
        raise DataError(f"{path} is not a partial pool file; delete it to start over")
    if s.get("settings") != settings:
        diff = sorted(k for k in settings if s.get("settings", {}).get(k) != settings[k])
        raise ConfigError(f"partial pool {path} was trained with other settings ({', '.join(diff)}); "
                          "delete it or pass the same settings")
    th, accs = s["thetas"], list(s["test_acc"])
    if th.dim() != 2 or th.shape[0] != len(accs) or not torch.isfinite(th).all():
        raise DataError(f"partial pool {path} is malformed; delete it to start over")
    if len(accs) > n:
        raise ConfigError(f"partial pool {path} already holds {len(accs)} models, more than n = {n}")
    return list(th.unbind(0)), accs


def partial_path(pool_path) -> Path:
    """Where :func:`pretrain_pool` keeps the finished models of an unfinished pool file."""
    pool_path = Path(pool_path)
    return pool_path.with_name(pool_path.name + ".partial")


def save_pool_and_drop_partial(pool: ModelPool, path) -> None:
    """:func:`save_pool` to ``path``, then remove its :func:`partial_path` file (only then: a crash
    while saving leaves the finished models in the partial file)."""
    save_pool(pool, path)
    partial_path(path).unlink(missing_ok=True)


# -- storage ------------------------------------------------------------------------------------
def save_pool(pool: ModelPool, path) -> None:
    """Atomically write ``pool`` to ``path`` (one ``torch.save`` file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"format": POOL_FORMAT, "thetas": pool.thetas.detach().float().contiguous(),
                "meta": dict(pool.meta)}, tmp)
    os.replace(tmp, path)


def load_pool(path) -> ModelPool:
    """Read a pool file written by :func:`save_pool`.

    Raises:
        DataError: the file is missing, unreadable/corrupt, not a pool, or holds non-finite or
            mis-shaped weights.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no model pool at {path}; create one with `fastdistill pretrain`")
    try:
        s = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, corrupt, or not a torch file at all
        raise DataError(f"model pool {path} is unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(s, dict) or s.get("format") != POOL_FORMAT:
        fmt = s.get("format") if isinstance(s, dict) else type(s).__name__
        raise DataError(f"{path} is not a fastdistill model pool (format {fmt!r}, expected {POOL_FORMAT})")
    th, meta = s.get("thetas"), s.get("meta")
    if not isinstance(th, Tensor) or th.dim() != 2 or th.shape[0] == 0 or not isinstance(meta, dict):
        raise DataError(f"model pool {path} is malformed: expected thetas [N, P] with N ≥ 1 and a meta dict")
    missing = [k for k in ("model", "num_classes", "in_channels", "image_size") if k not in meta]
    if missing:
        raise DataError(f"model pool {path} lacks metadata {missing}")
    if not torch.isfinite(th).all():
        raise DataError(f"model pool {path} holds non-finite weights")
    return ModelPool(th, meta)


# -- θ_0 for distillation and evaluation ---------------------------------------------------------
def pool_initialisers(config, model: FunctionalModel, *, dtype=torch.float32,
                      pool: Optional[ModelPool] = None):
    """``(theta0, init_fn)`` for a :class:`~fastdistill.distill.Distiller` in a pre-trained mode.

    ``fixed-pretrained``: θ_0 is the first distillation-split model, ``init_fn`` None.
    ``random-pretrained``: ``init_fn(generator)`` returns a uniformly drawn distillation-split
    model; held-out models (``config.pool_heldout``) are never drawn.
    """
    pool = pool if pool is not None else load_pool(config.pool)
    pool.check_model(model)
    train_idx, _ = pool.split(config.pool_heldout)
    thetas = pool.thetas
    if config.mode == "fixed-pretrained":
        return thetas[train_idx[0]].to(dtype).clone(), None
    if config.mode == "random-pretrained":
        idx = torch.tensor(train_idx)

        def init_fn(g: torch.Generator) -> Tensor:
            j = int(torch.randint(len(idx), (1,), generator=g))
            return thetas[int(idx[j])].to(dtype).clone()

        return None, init_fn
    raise ConfigError(f"mode {config.mode!r} does not use a model pool")


def evaluation_inits(config, model: FunctionalModel, n: int, *, theta0: Optional[Tensor] = None,
                     pool: Optional[ModelPool] = None, dtype=torch.float32) -> List[Tensor]:
    """The held-out θ_0 of the evaluation protocol for every ``config.mode``.

    fixed / fixed-pretrained: ``[theta0]`` (the distillation's θ_0; for fixed-pretrained it is
    looked up in the pool when not given); random: ``n`` draws from the held-out stream
    (:func:`~fastdistill.evaluate.heldout_inits`); random-pretrained: the first ``n`` held-out
    pool models (fewer if the pool holds fewer: the caller sees ``len()``).
    """
    if config.mode == "fixed":
        if theta0 is None:
            raise ConfigError("fixed init evaluates the distillation's θ_0; pass theta0")
        return [theta0.to(dtype)]
    if config.mode == "random":
        return list(heldout_inits(model, config.init, n, config.seed, gain=config.init_gain, dtype=dtype))
    pool = pool if pool is not None else load_pool(config.pool)
    pool.check_model(model)
    train_idx, held = pool.split(config.pool_heldout)
    if config.mode == "fixed-pretrained":
        return [(theta0 if theta0 is not None else pool.thetas[train_idx[0]]).to(dtype)]
    return [pool.thetas[i].to(dtype) for i in held[:n]]


def finetune_full(model: FunctionalModel, theta0s: Sequence[Tensor], train_x: Tensor, train_y: Tensor,
                  test_x: Tensor, test_y: Tensor, *, epochs: float = 1.0, lr: float = 0.01,
                  momentum: float = 0.9, batch: int = 64, seed: int = 0, group: int = 16) -> Dict[str, Any]:
    """The "train on the full target dataset" reference: fine-tune every θ_0 with SGD on the
    whole target training set (``group`` networks at a time, :func:`train_models`; model ``i``'s
    batches from seed ``seed + i``); returns test accuracies before/after with mean ± std."""
    before, after = [], []
    for lo in range(0, len(theta0s), group):
        chunk = [th0.float() for th0 in theta0s[lo:lo + group]]
        gens = [torch.Generator().manual_seed(seed + lo + k) for k in range(len(chunk))]
        done = train_models(model, torch.stack(chunk), train_x, train_y, epochs=epochs, lr=lr,
                            momentum=momentum, batch=batch, generators=gens)
        for th0, th in zip(chunk, done):
            before.append(accuracy(model, th0, test_x, test_y))
            after.append(accuracy(model, th, test_x, test_y))
    sd = lambda v: statistics.pstdev(v) if len(v) > 1 else 0.0  # noqa: E731
    return {"before": before, "after": after, "n_models": len(after),
            "acc_before_mean": statistics.fmean(before), "acc_before_std": sd(before),
            "acc_after_mean": statistics.fmean(after), "acc_after_std": sd(after)}


# -- command line (`fastdistill pretrain`) ---------------------------------------------------------
def add_pretrain_command(sub, common) -> None:
    """Register ``fastdistill pretrain`` on the CLI's sub-parser set ``sub``."""
    p = sub.add_parser("pretrain", parents=[common], help="train a pool of models on a source dataset",
                       description="Train N networks (independent Xavier draws, minibatch SGD) on a "
                                   "dataset and store them as one pool file for the fixed-/random-"
                                   "pretrained distillation modes (--mode random-pretrained --pool FILE). "
                                   "An interrupted run keeps its finished models in FILE.partial and "
                                   "resumes from them when run again with the same arguments.")
    p.add_argument("dataset", help="source dataset (e.g. mnist, fashion-mnist)")
    p.add_argument("--out", required=True, metavar="FILE", help="pool file to write (e.g. pools/mnist.pt)")
    p.add_argument("--n", type=int, default=20, metavar="N", help="number of models (paper: 2000 + 200 held out)")
    p.add_argument("--model", default="lenet", help="architecture (default lenet)")
    p.add_argument("--init", default="xavier", help="initialisation scheme of every model (default xavier)")
    p.add_argument("--epochs", type=float, default=1.0, metavar="X", help="training epochs per model")
    p.add_argument("--lr", type=float, default=0.01, metavar="X", help="SGD learning rate")
    p.add_argument("--momentum", type=float, default=0.9, metavar="X", help="SGD momentum")
    p.add_argument("--batch", type=int, default=64, metavar="N", help="minibatch size")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="model i uses seed + i")
    p.add_argument("--data-root", metavar="DIR", help="folder with the dataset files")
    p.add_argument("--group", type=int, default=16, metavar="N",
                   help="networks trained together in one batched computation (default 16; 1: one "
                        "at a time with autograd, the reference)")
    p.add_argument("--threads", type=int, default=0, metavar="N", help="torch threads (0: leave as is)")
    p.set_defaults(func=_cmd_pretrain)


def _cmd_pretrain(args) -> int:
    import sys

    from .data import load_dataset
    if args.threads:
        torch.set_num_threads(args.threads)
    ds = load_dataset(args.dataset, args.data_root)
    model = build_model(args.model, ds.info.num_classes, ds.train_x.shape[1], ds.train_x.shape[2])
    t0 = time.perf_counter()

    def say(i, acc):
        print(f"model {i + 1}/{args.n}: test accuracy {100 * acc:.2f}% ({time.perf_counter() - t0:.0f} s)",
              file=sys.stderr, flush=True)

    pool = pretrain_pool(model, ds.train_x, ds.train_y, args.n, init=args.init, epochs=args.epochs,
                         lr=args.lr, momentum=args.momentum, batch=args.batch, seed=args.seed,
                         test_x=ds.test_x, test_y=ds.test_y, meta={"dataset": ds.info.name}, progress=say,
                         group=args.group, partial=partial_path(args.out))
    save_pool_and_drop_partial(pool, args.out)
    accs = pool.meta["test_acc"]
    sd = statistics.pstdev(accs) if len(accs) > 1 else 0.0
    print(f"pool of {len(pool)} {model.name} models on {ds.info.name}: test accuracy "
          f"{100 * statistics.fmean(accs):.2f} ± {100 * sd:.2f}% -> {args.out}")
    return 0
