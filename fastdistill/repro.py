"""The reproduction table: every setting of the two DD papers that runs on the data available here,
next to the paper's number, with the protocol, the number of held-out models and the wall time.

Each setting runs on its own and leaves ``<results>/<key>.json`` (plus the distilled set
``<key>.pt`` and, for distillations, a resumable checkpoint ``<key>.<scale>.ckpt``); ``table`` renders
whatever has been measured and marks the rest "not yet run". Nothing is estimated or copied:
a cell holds a number only when a run produced it, and the run's scale is printed beside it.
Invocations may share a results folder: a setting runs under an flock on ``<key>.lock``, so one
that is running elsewhere is skipped (``run``) or waited for (a dependency), never run twice.

Scales:

* ``paper`` — the papers' protocol: 400 outer epochs, 200 held-out models, 10 real-image sets,
  2000 + 200 pool models. One deviation, stated in the protocol column: the baselines' best
  lr × epochs is chosen on 20 separate selection models and the first 2 sets instead of on the
  200 reported models (the paper's own choice costs ~40 h per baseline on this machine).
* ``small`` — the paper's protocol with fewer models and a shorter outer schedule, for what a
  session of this CPU can finish: pools of 240 models (200 to distil, 40 held out), 40 held-out
  models, 4,000 meta-iterations with StepLR ×0.5 every 17.07 epochs (four halvings); sets, the
  selection protocol and the full test set as at paper scale. Labelled "small" in the table.
* ``reduced`` — the same code paths with few models, sets and iterations, to validate the
  machinery; its numbers are labelled "reduced" and are not the paper's protocol.

Command line::

    python -m fastdistill.repro list                       # settings, dependencies, expected wall
    python -m fastdistill.repro run KEY ... [--scale small|reduced] [--results DIR]
    python -m fastdistill.repro table [--results DIR] [--out FILE]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

try:
    import fcntl
except ImportError:                                  # not POSIX: no cross-process lock
    fcntl = None

import torch

from . import baselines as B
from .distill import DistillConfig, Distiller
from .errors import ConfigError, FastDistillError
from .evaluate import accuracy, evaluate_distilled, heldout_inits
from .models import build_model
from .poison import best_poison_baseline, evaluate_attack, relabel
from .pretrain import (evaluation_inits, finetune_full, load_pool, partial_path, pretrain_pool,
                       save_pool_and_drop_partial)

__all__ = ["Setting", "SETTINGS", "SCALES", "run_setting", "render_table", "main"]

DEFAULT_RESULTS = "runs/repro"

#: what every scale changes; everything else is fixed by the setting
SCALES: Dict[str, Dict[str, Any]] = {
    "paper": dict(iterations=None, decay_epochs=None, eval_models=200, sets=10, select_models=20, select_sets=2,
                  select_test=None, report_test=None, n_nets=None, pool_n=2200, pool_heldout=200, pool_epochs=1.0,
                  opt_candidates=50, opt_keep=10, opt_score_models=20, finetune_models=20,
                  finetune_epochs=1.0),
    "small": dict(iterations=4000, decay_epochs=17.07, eval_models=40, sets=10, select_models=20,
                  select_sets=2, select_test=None, report_test=None, n_nets=4, pool_n=240, pool_heldout=40,
                  pool_epochs=1.0, opt_candidates=50, opt_keep=10, opt_score_models=20, finetune_models=20,
                  finetune_epochs=1.0),
    "reduced": dict(iterations=20, decay_epochs=None, eval_models=3, sets=2, select_models=2, select_sets=1,
                    select_test=1000, report_test=2000, n_nets=2, pool_n=6, pool_heldout=3,
                    pool_epochs=0.05, opt_candidates=4, opt_keep=2, opt_score_models=2,
                    finetune_models=2, finetune_epochs=0.05),
}

ATTACK = (1, 7)  # attacked class K, target class T (MNIST: "1" → "7")


@dataclass
class Setting:
    """One row of the table.

    ``kind`` picks the runner; ``params`` its arguments; ``paper`` the published number (or
    "—" when the paper has none for this dataset); ``needs`` the settings whose outputs it
    cannot run without (a model pool; run first when missing); ``learned_from`` the distilled
    setting whose learned rates join the baselines' lr grid when it has been run; ``expected``
    the wall time at paper scale on this machine, from measured per-step costs (see
    scripts/reproduce.sh).
    """

    key: str
    group: str
    title: str
    paper: str
    kind: str
    params: Dict[str, Any] = field(default_factory=dict)
    needs: Tuple[str, ...] = ()
    learned_from: Optional[str] = None
    expected: str = ""


BASELINES = (("random", "random-real", "random real", "~3 h"),
             ("optimized", "optimized-real", "optimized real (best 10 of 50 random sets)", "~4 h"),
             ("kmeans", "kmeans", "k-means centroids", "~3 h"),
             ("average", "average", "average real image per class, reused in every step", "~40 min"))


def _dataset_rows(ds: str, tag: str, group: str, paper: Dict[str, str]) -> List[Setting]:
    """SLDD's four MNIST settings and DD's Table 1 baselines on one dataset."""
    soft = dict(dataset=ds, soft_labels=True)
    rows = [
        Setting(f"{tag}-sldd-fixed-10", group, "SLDD fixed init, 10 images (1 step × 3 epochs)",
                paper.get("f10", "—"), "distill", dict(soft, mode="fixed", steps=1), expected="~4.5 h"),
        Setting(f"{tag}-sldd-fixed-5", group, "SLDD fixed init, 5 images for 10 classes (1 step × 3 epochs)",
                paper.get("f5", "—"), "distill", dict(soft, mode="fixed", steps=1, label_classes=[0, 1, 2, 3, 4]),
                expected="~4 h"),
        Setting(f"{tag}-sldd-fixed-100", group, "SLDD fixed init, 100 images (10 steps × 3 epochs)",
                paper.get("f100", "—"), "distill", dict(soft, mode="fixed", steps=10), expected="~11.5 h"),
        # one fresh θ_0 per iteration, as the SLDD code's run-option files for its random-init runs set
        Setting(f"{tag}-sldd-random-100", group, "SLDD random init, 100 images (10 steps × 3 epochs)",
                paper.get("r100", "—"), "distill", dict(soft, mode="random", steps=10, n_nets=1), expected="~3 h"),
    ]
    for method, key, title, exp in BASELINES:
        per = "" if method == "average" else ", 10 per class over 10 steps"
        rows.append(Setting(f"{tag}-{key}", group, f"{title}{per}",
                            paper.get(key, "—"), "baseline", dict(dataset=ds, method=method, steps=10, per_class=10),
                            learned_from=f"{tag}-sldd-random-100", expected=exp))
    rows += [
        Setting(f"{tag}-knn-random", group, "k-NN with 10 random real images per class", paper.get("knn-random", "—"),
                "knn", dict(dataset=ds, per_class=10, method="random"), expected="~2 min"),
        Setting(f"{tag}-knn-kmeans", group, "k-NN with 10 k-means centroids per class", paper.get("knn-kmeans", "—"),
                "knn", dict(dataset=ds, per_class=10, method="kmeans"), expected="~10 min"),
    ]
    return rows


def _adaptation_rows(src: str, dst: str, tag: str, group: str) -> List[Setting]:
    """DD §4.2 adaptation (paper: MNIST/USPS/SVHN, here MNIST ↔ Fashion-MNIST): no paper number."""
    pool = f"pool-{src}"
    rows = [
        Setting(f"{tag}-fixed-pretrained", group, "DD fixed pre-trained, 100 images (10 steps × 3 epochs)", "—",
                "distill", dict(dataset=dst, mode="fixed-pretrained", steps=10, pool_from=pool), (pool,),
                expected="~11.5 h"),
        Setting(f"{tag}-random-pretrained", group, "DD random pre-trained, 100 images (10 steps × 3 epochs)", "—",
                "distill", dict(dataset=dst, mode="random-pretrained", steps=10, pool_from=pool), (pool,),
                expected="~45 h"),
    ]
    for method, key, title, exp in BASELINES:
        rows.append(Setting(f"{tag}-{key}", group, f"{title}, from held-out pre-trained models", "—", "baseline",
                            dict(dataset=dst, method=method, steps=10, per_class=10, pool_from=pool), (pool,),
                            learned_from=f"{tag}-random-pretrained", expected=exp))
    rows += [
        Setting(f"{tag}-no-adaptation", group, "no adaptation (source models on the target test set)", "—",
                "noadapt", dict(dataset=dst, pool_from=pool), (pool,), expected="~12 min"),
        Setting(f"{tag}-finetune-full", group, "fine-tune on the full target training set (1 epoch SGD)", "—",
                "finetune", dict(dataset=dst, pool_from=pool), (pool,), expected="~15 min"),
    ]
    return rows


def _settings() -> List[Setting]:
    mnist = {"f10": "96.13", "f5": "91.56", "f100": "98.6", "r100": "82.75 ± 2.75", "random-real": "68.6 ± 9.8",
             "optimized-real": "73.0 ± 7.6", "kmeans": "76.4 ± 9.5", "average": "77.1 ± 2.7",
             "knn-random": "71.5 ± 2.1", "knn-kmeans": "92.2 ± 0.1"}
    rows = _dataset_rows("mnist", "mnist", "MNIST", mnist)
    rows += _dataset_rows("fashion-mnist", "fashion", "Fashion-MNIST", {})
    rows += [
        Setting("pool-mnist", "pools", "LeNet pool on MNIST (1 epoch SGD each); source test accuracy", "—",
                "pool", dict(dataset="mnist"), expected="~20 h (2200 models)"),
        Setting("pool-fashion-mnist", "pools", "LeNet pool on Fashion-MNIST; source test accuracy", "—",
                "pool", dict(dataset="fashion-mnist"), expected="~20 h (2200 models)"),
    ]
    rows += _adaptation_rows("mnist", "fashion-mnist", "adapt-m2f", "MNIST → Fashion-MNIST")
    rows += _adaptation_rows("fashion-mnist", "mnist", "adapt-f2m", "Fashion-MNIST → MNIST")
    K, T = ATTACK
    group = f"attack {K}→{T} (MNIST)"
    rows.append(Setting("attack-dd", group, "DD poisoning, 10 images, 1 GD step, random pre-trained", "—",
                        "distill", dict(dataset="mnist", mode="random-pretrained", steps=1, epochs=1,
                                        pool_from="pool-mnist", objective="poison", attack_class=K, target_class=T),
                        ("pool-mnist",), expected="~10 h"))
    for method, key, title, exp in (("random", "random-real", "random real", "~2 h"),
                                    ("kmeans", "kmeans", "k-means centroids", "~2 h"),
                                    ("average", "average", "average real", "~25 min")):
        rows.append(Setting(f"attack-{key}", group, f"{title}, 1 per class, {K} relabelled {T}, 1 GD step", "—",
                            "attack-baseline", dict(dataset="mnist", method=method, pool_from="pool-mnist"),
                            ("pool-mnist",), expected=exp))
    return rows


SETTINGS: Dict[str, Setting] = {s.key: s for s in _settings()}


# -- running -----------------------------------------------------------------------------------
class Context:
    """Shared state of one ``run`` invocation: scale, results folder, loaded datasets."""

    def __init__(self, results: Path, scale: str, seed: int = 0, progress: Optional[Callable[[str], None]] = None):
        if scale not in SCALES:
            raise ConfigError(f"unknown scale {scale!r}; choose one of {', '.join(SCALES)}")
        self.results, self.scale, self.sc, self.seed = Path(results), scale, SCALES[scale], seed
        self.results.mkdir(parents=True, exist_ok=True)
        # flushed: runs last hours and their output usually goes to a log file
        self.say = progress or (lambda m: print(m, flush=True))
        self.force = False
        self._data: Dict[str, Any] = {}

    def data(self, name: str):
        if name not in self._data:
            from .data import load_dataset
            self._data[name] = load_dataset(name)
        return self._data[name]

    def test(self, ds) -> Tuple[torch.Tensor, torch.Tensor, str]:
        """The reported test images: all, or the first ``report_test`` (reduced scale)."""
        n = self.sc["report_test"]
        if not n:
            return ds.test_x, ds.test_y, ""
        return ds.test_x[:n], ds.test_y[:n], f"; first {n} test images only"

    def model(self, ds):
        i = ds.info
        return build_model("lenet", i.num_classes, ds.train_x.shape[1], ds.train_x.shape[2])

    def path(self, key: str, ext: str) -> Path:
        return self.results / f"{key}.{ext}"

    def result(self, key: str) -> Optional[Dict[str, Any]]:
        p = self.path(key, "json")
        return json.loads(p.read_text()) if p.exists() else None

    def pool_file(self, key: str) -> Path:
        return self.path(key, "pool.pt")

    def learned_lrs(self, key: str) -> Optional[torch.Tensor]:
        p = self.path(key, "pt")
        if not p.exists():
            return None
        return torch.load(p, map_location="cpu", weights_only=True)["lrs"]


def _ms(v: Sequence[float]) -> Tuple[float, float]:
    return (statistics.fmean(v), statistics.pstdev(v) if len(v) > 1 else 0.0) if v else (float("nan"),) * 2


def _run_pool(ctx: Context, s: Setting) -> Dict[str, Any]:
    ds = ctx.data(s.params["dataset"])
    m = ctx.model(ds)
    sc = ctx.sc
    tx, ty, sub = ctx.test(ds)
    pool = pretrain_pool(m, ds.train_x, ds.train_y, sc["pool_n"], epochs=sc["pool_epochs"], lr=0.01,
                         momentum=0.9, batch=64, seed=ctx.seed, test_x=tx, test_y=ty,
                         meta={"dataset": ds.info.name},
                         progress=lambda i, a: ctx.say(f"  pool model {i + 1}/{sc['pool_n']}: {100 * a:.2f}%"),
                         partial=partial_path(ctx.pool_file(s.key)))
    save_pool_and_drop_partial(pool, ctx.pool_file(s.key))
    mean, std = _ms(pool.meta["test_acc"])
    return dict(mean=mean, std=std, n_models=len(pool), protocol=(
        f"{len(pool)} LeNets, SGD lr 0.01 momentum 0.9 batch 64, {sc['pool_epochs']} epoch(s); source test "
        f"accuracy{sub}"))


def _pool_for(ctx: Context, s: Setting):
    key = s.params["pool_from"]
    return load_pool(ctx.pool_file(key)), str(ctx.pool_file(key))


def _distill_config(ctx: Context, s: Setting, ds) -> DistillConfig:
    """The DistillConfig of distillation setting ``s`` at ``ctx``'s scale."""
    p = dict(s.params)
    p.pop("dataset")
    pool_from = p.pop("pool_from", None)
    sc = ctx.sc
    kw = dict(p, dataset=ds.info.name, iterations=sc["iterations"], eval_models=sc["eval_models"],
              seed=ctx.seed, checkpoint_every=200)
    if sc["decay_epochs"] is not None:
        kw["decay_epochs"] = sc["decay_epochs"]
    if kw.get("mode", "fixed") in ("random", "random-pretrained"):
        # paper scale (n_nets None): the setting's own count, else 4; other scales: theirs
        own = kw.pop("n_nets", 4)
        kw["n_nets"] = own if sc["n_nets"] is None else sc["n_nets"]
    if pool_from:
        kw["pool"] = str(ctx.pool_file(pool_from))
        kw["pool_heldout"] = sc["pool_heldout"]
    return DistillConfig(**kw)


def _run_distill(ctx: Context, s: Setting) -> Dict[str, Any]:
    ds, sc = ctx.data(s.params["dataset"]), ctx.sc
    cfg = _distill_config(ctx, s, ds)
    m = ctx.model(ds)
    d = Distiller(cfg, ds.train_x, ds.train_y, ds.info.num_classes, model=m)
    ck = ctx.path(s.key, f"{ctx.scale}.ckpt")
    if ck.exists() and ctx.force:
        ck.unlink()
    if ck.exists():
        d.load_checkpoint(ck)
        ctx.say(f"  resumed at iteration {d.iteration}")
    every = max(1, d.iterations // 20)
    d.run(checkpoint_path=ck, on_step=lambda r: (r["iteration"] % every == 0) and ctx.say(
        f"  it {r['iteration']}/{d.iterations} loss {r['loss']:.4f}"))
    r = d.result()
    torch.save({"data": r.data, "labels": r.labels, "lrs": r.lrs, "config": cfg.to_dict()},
               ctx.path(s.key, "pt"))
    thetas = evaluation_inits(cfg, m, sc["eval_models"], theta0=r.theta0)
    tx, ty, sub = ctx.test(ds)
    iters = f"{d.iterations} iterations" + ("" if sc["iterations"] is None else f" ({ctx.scale} scale)")
    if sc["decay_epochs"] is not None:
        iters += f", StepLR every {cfg.decay_epochs:g} epochs"
    if cfg.objective == "poison":
        K, T = cfg.attack_class, cfg.target_class
        rep = evaluate_attack(m, r.data, r.labels, r.lrs, tx, ty, thetas, K, T).summary()
        return dict(mean=rep["acc_modified_after_mean"], std=rep["acc_modified_after_std"],
                    k_to_t=rep["k_to_t_after_mean"], k_to_t_std=rep["k_to_t_after_std"],
                    before=rep["acc_modified_before_mean"], n_models=len(thetas), distill_s=d.elapsed,
                    protocol=f"{iters}, n_nets {cfg.n_nets}; accuracy w.r.t. modified labels (and {K}→{T} "
                             f"rate) after 1 step on held-out pool models{sub}")
    rep = evaluate_distilled(m, r.data, r.labels, r.lrs, tx, ty, thetas)
    sm = rep.summary()
    held = "the distillation θ_0" if cfg.fixed_init else "held-out models"
    return dict(mean=sm["acc_after_mean"], std=sm["acc_after_std"], before=sm["acc_before_mean"],
                n_models=rep.n_models, distill_s=d.elapsed,
                protocol=f"DD protocol: {iters}" + (f", n_nets {cfg.n_nets}" if not cfg.fixed_init else "")
                         + f"; test accuracy after the distilled steps on {held}{sub}")


def _eval_thetas(ctx: Context, s: Setting, m, n: int, select: bool):
    """Reported (held-out) or selection θ_0 for a baseline: Xavier draws, or pool models."""
    if "pool_from" in s.params:
        pool, _ = _pool_for(ctx, s)
        tr, held = pool.split(ctx.sc["pool_heldout"])
        idx = tr[:n] if select else held[:n]
        return [pool.thetas[i] for i in idx]
    seed = ctx.seed + (7919 if select else 0)
    return list(heldout_inits(m, "xavier", n, seed))


def _baseline_sets(ctx: Context, ds, method: str, per_class: int, steps: int, n_sets: int, m=None,
                   score_thetas=None, choice=None, learned=None):
    C, x, y = ds.info.num_classes, ds.train_x, ds.train_y
    g = torch.Generator().manual_seed(ctx.seed + 17)
    if method == "random":
        return [B.random_real(x, y, C, per_class, steps, g) for _ in range(n_sets)]
    if method == "kmeans":
        if per_class == 1:   # one centroid per class is the class mean whatever the draw: one set
            return [B.kmeans_real(x, y, C, 1, steps, g)]
        return [B.kmeans_real(x, y, C, per_class, steps, g) for _ in range(n_sets)]
    if method == "average":
        return [B.average_real(x, y, C, steps)]
    if method == "optimized":
        sc = ctx.sc
        kept, _ = B.optimized_real(m, x, y, C, per_class, steps, score_thetas, choice["lr"], choice["epochs"],
                                   learned_lrs=learned, candidates=sc["opt_candidates"], keep=sc["opt_keep"],
                                   generator=g, progress=ctx.say)
        return kept
    raise ConfigError(f"unknown baseline method {method!r}")


def _run_baseline(ctx: Context, s: Setting) -> Dict[str, Any]:
    p, sc = s.params, ctx.sc
    ds = ctx.data(p["dataset"])
    m = ctx.model(ds)
    learned = ctx.learned_lrs(s.learned_from) if s.learned_from else None
    thetas = _eval_thetas(ctx, s, m, sc["eval_models"], select=False)
    sel = _eval_thetas(ctx, s, m, sc["select_models"], select=True)
    sel_test = None
    if sc["select_test"]:
        sel_test = (ds.test_x[:sc["select_test"]], ds.test_y[:sc["select_test"]])
    method = p["method"]
    extra = ""
    if method == "optimized":
        # score candidate sets with the best setting of random real (the paper does not say which)
        sx, sy = sel_test if sel_test is not None else (ds.test_x, ds.test_y)
        rr = B.evaluate_training_baseline("random real", m,
                                          _baseline_sets(ctx, ds, "random", p["per_class"], p["steps"], sc["select_sets"]),
                                          sx, sy, sel, learned_lrs=learned, progress=ctx.say)
        sets = _baseline_sets(ctx, ds, method, p["per_class"], p["steps"], 0, m,
                              score_thetas=sel[:sc["opt_score_models"]], choice=rr.choice, learned=learned)
        extra = (f"; {sc['opt_keep']} best of {sc['opt_candidates']} random sets scored on "
                 f"{min(len(sel), sc['opt_score_models'])} models × 1024 training images with {rr.choice}")
    else:
        sets = _baseline_sets(ctx, ds, method, p["per_class"], p["steps"], sc["sets"])
    tx, ty, sub = ctx.test(ds)
    res = B.evaluate_training_baseline(s.title, m, sets, tx, ty, thetas, learned_lrs=learned,
                                       select_theta0s=sel, select_sets=sc["select_sets"], select_test=sel_test,
                                       progress=ctx.say)
    lr_note = "" if learned is not None else "; 'learned' rate option omitted (no distilled run yet)"
    return dict(mean=res.mean, std=res.std, n_models=res.n_models, n_sets=res.n_sets, choice=res.choice,
                grid=res.grid, protocol=res.protocol + extra + lr_note + sub)


def _run_knn(ctx: Context, s: Setting) -> Dict[str, Any]:
    p = s.params
    ds = ctx.data(p["dataset"])
    sets = _baseline_sets(ctx, ds, p["method"], p["per_class"], 1, ctx.sc["sets"])
    res = B.knn_baseline(s.title, sets, ds.test_x, ds.test_y)
    return dict(mean=res.mean, std=res.std, n_models=0, n_sets=res.n_sets, choice=res.choice, grid=res.grid,
                protocol=res.protocol + f" ({res.n_sets} sets)")


def _run_noadapt(ctx: Context, s: Setting) -> Dict[str, Any]:
    ds = ctx.data(s.params["dataset"])
    m = ctx.model(ds)
    ths = _eval_thetas(ctx, s, m, ctx.sc["eval_models"], select=False)
    tx, ty, sub = ctx.test(ds)
    accs = [accuracy(m, th, tx, ty) for th in ths]
    mean, std = _ms(accs)
    return dict(mean=mean, std=std, n_models=len(accs), protocol="held-out source models, target test set" + sub)


def _run_finetune(ctx: Context, s: Setting) -> Dict[str, Any]:
    ds = ctx.data(s.params["dataset"])
    m = ctx.model(ds)
    sc = ctx.sc
    ths = _eval_thetas(ctx, s, m, sc["finetune_models"], select=False)
    tx, ty, sub = ctx.test(ds)
    r = finetune_full(m, ths, ds.train_x, ds.train_y, tx, ty, epochs=sc["finetune_epochs"],
                      lr=0.01, momentum=0.9, batch=64, seed=ctx.seed)
    return dict(mean=r["acc_after_mean"], std=r["acc_after_std"], n_models=r["n_models"],
                protocol=f"SGD lr 0.01 momentum 0.9 batch 64, {sc['finetune_epochs']} epoch(s) on all target "
                         "training images, from held-out source models" + sub)


def _run_attack_baseline(ctx: Context, s: Setting) -> Dict[str, Any]:
    p, sc = s.params, ctx.sc
    ds = ctx.data(p["dataset"])
    m = ctx.model(ds)
    K, T = ATTACK
    sets = [(d, relabel(l, K, T)) for d, l in _baseline_sets(ctx, ds, p["method"], 1, 1, sc["sets"])]
    thetas = _eval_thetas(ctx, s, m, sc["eval_models"], select=False)
    sel = _eval_thetas(ctx, s, m, sc["select_models"], select=True)
    tx, ty, sub = ctx.test(ds)
    out = best_poison_baseline(m, sets, tx, ty, thetas, K, T, B.LR_GRID,
                               select_theta0s=sel, select_sets=sc["select_sets"])
    if out["report"] is None:
        return dict(mean=float("nan"), std=float("nan"), n_models=len(thetas), n_sets=len(sets),
                    grid=out["grid"], protocol=f"no rate sent ≥ 10 % of class {K} to {T}")
    sm = out["report"].summary()
    return dict(mean=sm["acc_modified_after_mean"], std=sm["acc_modified_after_std"],
                k_to_t=sm["k_to_t_after_mean"], k_to_t_std=sm["k_to_t_after_std"], n_models=len(thetas),
                n_sets=len(sets), choice={"lr": out["lr"]}, grid=out["grid"],
                protocol=f"1 GD step; lr ∈ {list(B.LR_GRID)} with the highest accuracy w.r.t. modified labels "
                         f"among rates sending ≥ 10 % of class {K} to {T} (paper rule), chosen on "
                         f"{out['selected_on']} pool models of the distillation split; reported on held-out ones{sub}")


RUNNERS = {"pool": _run_pool, "distill": _run_distill, "baseline": _run_baseline, "knn": _run_knn,
           "noadapt": _run_noadapt, "finetune": _run_finetune, "attack-baseline": _run_attack_baseline}


def _machine() -> str:
    return f"{platform.node()} ({os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads)"


def _load() -> float:
    return round(os.getloadavg()[0], 1) if hasattr(os, "getloadavg") else float("nan")


@contextlib.contextmanager
def _key_lock(ctx: Context, key: str, wait: bool) -> Iterator[bool]:
    """Hold ``<results>/<key>.lock`` while ``key`` runs, so that two invocations sharing a results
    folder never run one setting twice. Yields True once held; False when another process holds
    it and ``wait`` is False. The lock is an flock: it goes with its process, so a crashed run
    leaves no stale lock behind (the empty file stays)."""
    if fcntl is None:
        yield True
        return
    with open(ctx.path(key, "lock"), "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                yield False
                return
            ctx.say(f"[{key}] another process is running it; waiting for it to finish")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def run_setting(ctx: Context, key: str, *, force: bool = False, wait: bool = True,
                _stack: Tuple[str, ...] = ()) -> Optional[Dict[str, Any]]:
    """Run ``key`` (and, first, any missing dependency); write and return its result record.

    When another process is running ``key`` in the same results folder, wait for it and return its
    record (``wait=True``; dependencies always wait), or say so and return None (``wait=False``)."""
    if key not in SETTINGS:
        raise ConfigError(f"unknown setting {key!r}; `python -m fastdistill.repro list` shows them")
    s = SETTINGS[key]

    def done() -> Optional[Dict[str, Any]]:
        old = ctx.result(key)
        return old if old is not None and old.get("scale") == ctx.scale and not force else None

    old = done()
    if old is not None:
        return old
    with _key_lock(ctx, key, wait) as held:
        if not held:
            ctx.say(f"[{key}] skipped: another process is running it ({ctx.path(key, 'lock')} is held)")
            return None
        old = done()                                 # it may have finished while this one waited
        if old is not None:
            return old
        for dep in s.needs:                          # each returns at once when its record exists
            if dep not in _stack:
                run_setting(ctx, dep, _stack=_stack + (key,))
        ctx.say(f"[{key}] {s.title} ({ctx.scale} scale)")
        t0, load = time.perf_counter(), _load()
        ctx.force = force
        rec = RUNNERS[s.kind](ctx, s)
        rec.update(key=key, scale=ctx.scale, wall_s=time.perf_counter() - t0, machine=_machine(), load=load,
                   date=time.strftime("%Y-%m-%d %H:%M"),
                   command=" ".join(["python -m fastdistill.repro"] + sys.argv[1:]))
        tmp = ctx.path(key, "json.tmp")              # whole or absent: another process may read it now
        tmp.write_text(json.dumps(rec, indent=1, default=str))
        os.replace(tmp, ctx.path(key, "json"))
    ctx.say(f"[{key}] {_fmt(rec)} in {rec['wall_s']:.0f} s")
    return rec


# -- the table -----------------------------------------------------------------------------------
def _pct(v) -> str:
    return "nan" if v is None or v != v else f"{100 * v:.2f}"


def _fmt(rec: Dict[str, Any]) -> str:
    n = rec.get("n_models", 0)
    core = _pct(rec["mean"]) + (f" ± {_pct(rec['std'])}" if (n > 1 or rec.get("n_sets", 1) > 1) else "")
    if "k_to_t" in rec:
        core += f" ({ATTACK[0]}→{ATTACK[1]}: {_pct(rec['k_to_t'])} ± {_pct(rec['k_to_t_std'])})"
    return core


def _wall(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def render_table(results: Path) -> str:
    """Markdown of every setting; measured cells from ``results``, the rest "not yet run"."""
    ctx_results = Path(results)
    lines = ["| group | setting | paper (%) | ours (%) | protocol | held-out models | wall time | scale |",
             "|---|---|---|---|---|---|---|---|"]
    machines, loads = set(), []
    for s in SETTINGS.values():
        p = ctx_results / f"{s.key}.json"
        if not p.exists():
            lines.append(f"| {s.group} | {s.title} | {s.paper} | not yet run | — | — | expected {s.expected} | — |")
            continue
        rec = json.loads(p.read_text())
        machines.add(rec.get("machine", "?"))
        loads.append(rec.get("load", float("nan")))
        n, sets = rec.get("n_models", 0), rec.get("n_sets", 1)
        held = (f"{n}" + (f" × {sets} sets" if sets > 1 else "")) if n else f"none ({sets} reference sets)"
        lines.append(f"| {s.group} | {s.title} | {s.paper} | {_fmt(rec)} | {rec['protocol']} | {held} | "
                     f"{_wall(rec['wall_s'])} | {rec['scale']} |")
    head = ["# Reproduction table", "",
            "Generated by `python -m fastdistill.repro table` from the records in "
            f"`{results}`. \"reduced\" rows validate the machinery with few models/iterations and are "
            "not the paper's protocol; \"not yet run\" rows have no measurement (their expected wall "
            "time at paper scale is given instead). Means ± population std in %.", ""]
    if machines:
        known = [v for v in loads if v == v]
        load = f"; 1-min load average {min(known)}–{max(known)} when the runs started" if known else ""
        head += ["Machine: " + "; ".join(sorted(machines)) + load + ".", ""]
    return "\n".join(head + lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastdistill.repro", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="list the settings")
    r = sub.add_parser("run", help="run settings (missing dependencies first)")
    r.add_argument("keys", nargs="+", help="setting keys, or 'all'")
    r.add_argument("--scale", default="paper", choices=sorted(SCALES))
    r.add_argument("--force", action="store_true", help="rerun even if a record of this scale exists")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    t = sub.add_parser("table", help="render the markdown table")
    t.add_argument("--out", default=None, help="write to this file (default: stdout)")
    for q in (r, t):
        q.add_argument("--results", default=DEFAULT_RESULTS, help=f"records folder (default {DEFAULT_RESULTS})")
    a = ap.parse_args(argv)
    try:
        if a.cmd == "list":
            for s in SETTINGS.values():
                dep = f"  needs: {', '.join(s.needs)}" if s.needs else ""
                print(f"{s.key:34s} {s.title}  [paper {s.paper}; expected {s.expected}]{dep}")
            return 0
        if a.cmd == "table":
            md = render_table(Path(a.results))
            if a.out:
                Path(a.out).write_text(md)
            else:
                print(md, end="")
            return 0
        if a.threads:
            torch.set_num_threads(a.threads)
        ctx = Context(Path(a.results), a.scale, a.seed)
        keys = list(SETTINGS) if a.keys == ["all"] else a.keys
        for k in keys:
            run_setting(ctx, k, force=a.force, wait=False)
        return 0
    except FastDistillError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
