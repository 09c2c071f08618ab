"""One distillation run end to end: config → data → :class:`Distiller` → evaluation → run folder.

This is what ``fastdistill distill`` calls, and the few-lines way to do the same from Python::

    from fastdistill import DistillConfig
    from fastdistill.runner import run_distillation

    run = run_distillation(DistillConfig(dataset="mnist", iterations=2000), out="runs/mnist-fixed")
    print(run.report)                 # 12.34% -> 93.21% (1 model)
    run.distilled.data.shape          # [S, k·C, 1, 28, 28]

The run folder holds ``checkpoint.pt`` (written every ``checkpoint_every`` iterations and at the
end, atomically), and once the run finishes ``distilled.pt``/``distilled.npz`` (the distilled
set, see :mod:`fastdistill.io`), ``metrics.json`` and ``distilled.png``.

Failure behaviour:

* a :class:`~fastdistill.errors.DivergenceError` (NaN/inf, exploding learning rate) leaves the
  last good checkpoint untouched: the Distiller never saves the state that diverged;
* Ctrl-C (SIGINT, main thread) lets the current meta-iteration finish, saves a checkpoint and
  raises :class:`Interrupted`; a second Ctrl-C aborts at once, keeping the last periodic one.
  Resuming (``resume=True``) continues bit-exactly where the checkpoint left off.
"""
from __future__ import annotations

import dataclasses
import json
import math
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

import torch

from .distill import DistillConfig, Distiller, DistillResult
from .errors import ConfigError, DataError, DivergenceError, FastDistillError, ShapeError
from .evaluate import EvalReport, evaluate_distilled, heldout_inits
from .io import _first_line
from .io import (BEST_FILE, BEST_METRICS_FILE, CHECKPOINT_FILE, DISTILLED_FILE, GRID_FILE, METRICS_FILE,
                 METRICS_FORMAT, NPZ_FILE,
                 DistilledSet, dataset_info_dict, load_distilled, save_distilled,
                 save_distilled_grid, save_metrics, save_npz)
from ._memory import peak_rss_bytes
from .models import build_model

__all__ = ["run_distillation", "evaluate_saved", "RunOutput", "EvalOutput", "Interrupted",
           "default_out_dir", "read_checkpoint", "backend_info", "PERIODIC_EVAL_MODELS",
           "HISTORY_POINTS"]

#: seconds between progress lines when there is no progress bar
HEARTBEAT_S = 60.0

#: held-out models used by the periodic (``eval_every``) evaluation of a random-init run; the
#: final evaluation uses all ``eval_models``.
PERIODIC_EVAL_MODELS = 20
#: at most this many history records go to metrics.json (evaluations are always kept).
HISTORY_POINTS = 200

Log = Optional[Callable[[str], None]]


class Interrupted(KeyboardInterrupt):
    """The run was interrupted (Ctrl-C).

    Attributes:
        checkpoint: the checkpoint to resume from (None if none was ever written).
        iteration: the iteration that checkpoint holds (None if unknown).
        saved: whether the checkpoint was written at the moment of the interruption (False: the
            run was aborted mid-step and the last periodic checkpoint is the one left).
    """

    def __init__(self, checkpoint: Optional[Path], iteration: Optional[int], saved: bool):
        super().__init__(f"interrupted (checkpoint {checkpoint}, iteration {iteration})")
        self.checkpoint, self.iteration, self.saved = checkpoint, iteration, saved


@dataclass
class RunOutput:
    """What :func:`run_distillation` returns."""

    out: Path
    result: DistillResult
    distilled: DistilledSet
    report: EvalReport
    metrics: Dict[str, Any]
    paths: Dict[str, Path] = field(default_factory=dict)


@dataclass
class EvalOutput:
    """What :func:`evaluate_saved` returns; ``summary`` is what ``fastdistill evaluate`` writes."""

    report: EvalReport
    summary: Dict[str, Any]
    distilled: DistilledSet


def default_out_dir(config: DistillConfig, root: Union[str, Path] = "runs") -> Path:
    """``runs/<dataset>-<mode>-<YYYYmmdd-HHMMSS>``."""
    return Path(root) / f"{config.dataset}-{config.mode}-{datetime.now():%Y%m%d-%H%M%S}"


def read_checkpoint(path: Union[str, Path]) -> Dict[str, Any]:
    """Load a Distiller checkpoint as plain data (``weights_only=True``: no code is unpickled).

    Raises:
        FastDistillError: missing, unreadable or not a checkpoint.
    """
    from .distill import CHECKPOINT_FORMAT

    path = Path(path)
    if not path.is_file():
        raise FastDistillError(f"no checkpoint at {path}")
    try:
        s = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, overwritten with garbage, another program's pickle
        raise FastDistillError(f"checkpoint {path} is unreadable ({type(e).__name__}: {_first_line(e)}); "
                               f"delete it to start over") from None
    if not isinstance(s, dict) or s.get("format") != CHECKPOINT_FORMAT:
        raise FastDistillError(f"{path} is not a fastdistill checkpoint")
    return s


def _backend_module():
    try:
        from . import _backend  # the backend registry (optional: absent in a minimal install)
    except ImportError:
        return None
    return _backend


def backend_info(used: bool = False) -> Optional[Dict[str, Any]]:
    """What the backend registry reports, JSON-ready, or None without one.

    ``used=False``: :func:`fastdistill._backend.available_backends` (per backend: available, why,
    its ops; and what ``auto`` picks per op). ``used=True``: additionally the backend that ran each
    op since the last ``reset_usage()`` and why (``_backend.last_used()``), for a run's metrics.
    """
    from .io import _plain

    mod = _backend_module()
    if mod is None:
        return None
    out: Dict[str, Any] = {}
    try:
        if callable(getattr(mod, "available_backends", None)):
            out.update(_plain(mod.available_backends()))
        if used and callable(getattr(mod, "last_used", None)):
            out["used"] = _plain(mod.last_used())
    except Exception as e:  # reporting must never break a finished run
        out["error"] = f"{type(e).__name__}: {_first_line(e)}"
    return out or None


def _reset_backend_usage() -> None:
    mod = _backend_module()
    if mod is not None and callable(getattr(mod, "reset_usage", None)):
        mod.reset_usage()


def _load_data(name: str, root: Optional[str]):
    from .data import load_dataset
    return load_dataset(name, root=root)


# -- evaluation --------------------------------------------------------------------------------
def _inits(model, cfg: DistillConfig, theta0, n: int, heldout: bool, seed: Optional[int] = None):
    """The evaluation's θ_0 (DD protocol): the distillation's own θ_0 for fixed init, else ``n``
    held-out draws that distillation never saw (``heldout`` forces the latter for fixed init)."""
    dtype = getattr(torch, cfg.dtype)
    mode = cfg.mode
    if heldout and mode in ("fixed", "fixed-pretrained"):
        mode = "random" if mode == "fixed" else "random-pretrained"
    if mode == "fixed":
        if theta0 is None:
            raise ShapeError("a fixed-init distilled set needs its θ_0, and none is stored")
        return [theta0]
    if mode == "random":
        return heldout_inits(model, cfg.init, n, cfg.seed if seed is None else seed, gain=cfg.init_gain,
                             dtype=dtype)
    from .pretrain import evaluation_inits  # the pre-trained modes: held-out pool models
    return evaluation_inits(dataclasses.replace(cfg, mode=mode), model, n, theta0=theta0, dtype=dtype)


def _eval(model, cfg, data, labels, lrs, betas, theta0, test_x, test_y, n, *, heldout=False,
          seed=None, progress=False, desc="evaluating") -> EvalReport:
    inits = _inits(model, cfg, theta0, n, heldout, seed)
    total = len(inits) if isinstance(inits, list) else n
    bar = None
    if progress and total > 1:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, desc=desc, unit="model", file=sys.stderr, leave=False, dynamic_ncols=True)
    try:
        return evaluate_distilled(model, data, labels, lrs, test_x, test_y,
                                  inits, betas=betas,
                                  progress=(lambda i, r: bar.update(1)) if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()


def _model_for(name: str, num_classes: int, x, dataset: str):
    """build_model, with a model that cannot take the dataset's images reported as a usage error."""
    C, H = int(x.shape[1]), int(x.shape[2])
    try:
        return build_model(name, num_classes, C, H)
    except ConfigError:
        raise
    except (ValueError, RuntimeError) as e:
        raise ConfigError(f"model {name} does not fit {dataset} ({C}×{H}×{H} images, {num_classes} "
                          f"classes): {e}") from None


def split_validation(train_x, train_y, size: int, seed: int):
    """``(train_x, train_y, val_x, val_y)``: ``size`` training images drawn without replacement by
    a generator of their own (seed + 7919, a stream no other part of a run uses), the rest kept in
    order. The validation images never reach the outer batches; they only rank iterates."""
    n = len(train_x)
    if not 0 < size < n:
        raise ConfigError(f"val_size must lie between 1 and {n - 1} (the training set has {n} images), got {size}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7919))
    val = perm[:size]
    keep = torch.ones(n, dtype=torch.bool)
    keep[val] = False
    return train_x[keep], train_y[keep], train_x[val], train_y[val]


def _check_dataset(ds, name: str) -> None:
    for attr in ("train_x", "train_y", "test_x", "test_y", "info"):
        if not hasattr(ds, attr):
            raise DataError(f"dataset {name!r} has no {attr}; load it with fastdistill.data.load_dataset")
    x, y = ds.train_x, ds.train_y
    if x.dim() != 4 or y.dim() != 1 or len(x) != len(y) or ds.test_x.dim() != 4 \
            or len(ds.test_x) != len(ds.test_y) or ds.test_x.shape[1:] != x.shape[1:]:
        raise ShapeError(f"dataset {name!r}: expected train/test images [N, C, H, W] with N labels, got "
                         f"{list(x.shape)}/{list(y.shape)} and {list(ds.test_x.shape)}/"
                         f"{list(ds.test_y.shape)}")
    if len(ds.test_x) == 0:
        raise DataError(f"dataset {name!r} has an empty test split")
    for split, t in (("train", x), ("test", ds.test_x)):
        if not torch.isfinite(t).all():
            raise DataError(f"dataset {name!r}: the {split} images contain NaN or inf")


# -- interruption ------------------------------------------------------------------------------
class _StopRequested(BaseException):
    """Raised from the step callback, between meta-iterations, after the first Ctrl-C."""


class _SigintGuard:
    """First Ctrl-C: ask the loop to stop after the current meta-iteration. Second: abort now."""

    def __init__(self, log: Log):
        self.log, self.requested, self.installed, self.prev = log, False, False, None

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if self.log:
            self.log("interrupted: finishing this meta-iteration to save a checkpoint "
                     "(Ctrl-C again to abort without saving)")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.prev = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._handler)
            self.installed = True
        return self

    def __exit__(self, *exc):
        if self.installed:
            signal.signal(signal.SIGINT, self.prev if self.prev is not None else signal.default_int_handler)
        return False


def _fmt_duration(seconds: float) -> str:
    """``"42 s"``, ``"7.5 min"`` or ``"2.3 h"``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


@contextmanager
def _threads(n: int):
    """``torch.set_num_threads(n)`` for the duration (0: leave as is); restored afterwards."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _subsample(history: List[Dict[str, Any]], k: int = HISTORY_POINTS) -> List[Dict[str, Any]]:
    """At most ``k`` plain records, evenly spaced, plus every evaluation and the last record."""
    if len(history) <= k:
        keep = range(len(history))
    else:
        stride = len(history) / k
        keep = {int(i * stride) for i in range(k)} | {len(history) - 1}
        keep |= {i for i, r in enumerate(history) if "eval_acc" in r}
        keep = sorted(keep)
    return [dict(history[i]) for i in keep]


# -- the run -----------------------------------------------------------------------------------
def run_distillation(config: Optional[DistillConfig] = None, out: Union[str, Path, None] = None, *,
                     resume: bool = False, overwrite: bool = False, dataset: Any = None,
                     progress: bool = False, log: Log = None) -> RunOutput:
    """Distil, evaluate and write the run folder.

    Args:
        config: the run's settings (default: ``DistillConfig()``; with ``resume`` and no config,
            the checkpoint's own settings).
        out: the run folder (default: :func:`default_out_dir`).
        resume: continue from ``out/checkpoint.pt``; the settings that change the optimisation
            must equal the checkpoint's (``iterations``, ``eval_*``, ``checkpoint_every``,
            ``threads``, ``data_root`` may differ), and the result is bit-identical to an
            uninterrupted run.
        overwrite: allow starting afresh in a folder that already holds a run.
        dataset: a loaded dataset (``fastdistill.data`` API: ``.info``, ``.train_x`` …); default:
            ``load_dataset(config.dataset, root=config.data_root)``.
        progress: show a tqdm bar on stderr (loss, mean learning rate, last evaluated accuracy).
        log: where progress messages go (e.g. ``print``); None for silence.
    Returns:
        :class:`RunOutput`: the folder, the :class:`DistillResult`, the stored
        :class:`~fastdistill.io.DistilledSet`, the final :class:`EvalReport`, the metrics and the
        written paths.
    Raises:
        ConfigError: invalid settings, a folder that already holds a run, settings that differ
            from the checkpoint's.
        DataError / ShapeError: missing or corrupt data, shapes that do not fit the model.
        DivergenceError: NaN/inf or an exploding learning rate; the last good checkpoint is kept
            and the message says which iteration it holds.
        FastDistillError: a missing or corrupt checkpoint on resume.
        Interrupted: Ctrl-C; see the class.
    """
    t_start = time.perf_counter()
    if resume:
        if out is None:
            raise ConfigError("resume needs the run folder (out=...) that holds checkpoint.pt")
        ckpt = Path(out) / CHECKPOINT_FILE
        state = read_checkpoint(ckpt)
        if config is None:
            config = DistillConfig.from_dict(state["config"])
        start_iteration = int(state["iteration"])
        del state
    else:
        config = config if config is not None else DistillConfig()
        start_iteration = 0
    cfg = config
    cfg.validate()
    out = Path(out) if out is not None else default_out_dir(cfg)
    ckpt = out / CHECKPOINT_FILE
    if not resume and not overwrite:
        taken = [n for n in (CHECKPOINT_FILE, DISTILLED_FILE) if (out / n).exists()]
        if taken:
            raise ConfigError(f"{out} already holds a run ({taken[0]}); continue it with --resume "
                              f"(resume=True), start over with --overwrite (overwrite=True), or choose "
                              f"another output folder")
    say = log or (lambda s: None)

    with _threads(cfg.threads):
        _reset_backend_usage()
        ds = dataset if dataset is not None else _load_data(cfg.dataset, cfg.data_root)
        _check_dataset(ds, cfg.dataset)
        info = ds.info
        train_x, train_y, val_x, val_y = ds.train_x, ds.train_y, None, None
        if cfg.val_size:
            train_x, train_y, val_x, val_y = split_validation(train_x, train_y, int(cfg.val_size), cfg.seed)
        distiller = Distiller(cfg, train_x, train_y, info.num_classes,
                              model=_model_for(cfg.model, info.num_classes, train_x, cfg.dataset))
        if resume:
            distiller.load_checkpoint(ckpt)
        model = distiller.model
        test_x, test_y = ds.test_x, ds.test_y
        n_periodic = min(cfg.eval_models, PERIODIC_EVAL_MODELS)

        # val_size > 0: the best iterate by validation accuracy so far (best.json / best.pt
        # survive an interruption; a resumed run continues the comparison)
        best: Dict[str, Any] = {}
        if cfg.val_size and resume and (out / BEST_METRICS_FILE).exists():
            best = json.loads((out / BEST_METRICS_FILE).read_text(encoding="utf-8"))

        def consider_best(d: Distiller, rec: Dict[str, Any]) -> None:
            rep = _eval(model, cfg, d.data.detach(), d.train_labels(), d.lrs(), d.betas(), d.theta0,
                        val_x, val_y, n_periodic)
            rec["val_acc"] = rep.summary()["acc_after_mean"]
            if best and rec["val_acc"] <= best["val_acc"]:
                return
            out.mkdir(parents=True, exist_ok=True)
            save_distilled(out / BEST_FILE, DistilledSet.from_result(d.result(), info, cfg.model))
            best.clear()
            best.update({"iteration": d.iteration, "val_acc": rec["val_acc"], "val_size": int(cfg.val_size),
                         "eval_acc": rec.get("eval_acc"), "eval_models": rec.get("eval_models"),
                         "file": BEST_FILE})
            save_metrics(out / BEST_METRICS_FILE, best)

        def periodic(d: Distiller) -> Dict[str, float]:
            rep = _eval(model, cfg, d.data.detach(), d.train_labels(), d.lrs(), d.betas(), d.theta0,
                        test_x, test_y, n_periodic)
            s = rep.summary()
            rec = {"eval_acc": s["acc_after_mean"], "eval_acc_std": s["acc_after_std"],
                   "eval_models": s["n_models"]}
            if val_x is not None:
                consider_best(d, rec)
            return rec

        bar = None
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=distiller.iterations, initial=distiller.iteration, desc="distilling",
                       unit="it", file=sys.stderr, dynamic_ncols=True)
            say = (lambda s: bar.write(s, file=sys.stderr)) if log else say
        guard = _SigintGuard(say)
        last_acc: List[Optional[float]] = [None]
        # without a bar (stderr not a terminal: a log file, nohup, CI) a line at least every
        # HEARTBEAT_S seconds says how far the run is and when it should end
        beat = {"i": distiller.iteration, "last": time.perf_counter()}

        def on_step(rec: Dict[str, Any]) -> None:
            now = time.perf_counter()
            if "eval_acc" in rec:
                last_acc[0] = rec["eval_acc"]
                if bar is None:
                    val = f", validation {100 * rec['val_acc']:.2f}%" if "val_acc" in rec else ""
                    say(f"iteration {rec['iteration']}/{distiller.iterations}: loss {rec['loss']:.4f}, "
                        f"mean lr {rec['lr_mean']:.4g}, accuracy {100 * rec['eval_acc']:.2f}%{val}")
                    beat.update(i=rec["iteration"], last=now)
            elif bar is None and now - beat["last"] >= HEARTBEAT_S:
                # the rate since the previous line (a suspended or slowed process shows it)
                per_it = (now - beat["last"]) / max(rec["iteration"] - beat["i"], 1)
                say(f"iteration {rec['iteration']}/{distiller.iterations}: loss {rec['loss']:.4f}, "
                    f"mean lr {rec['lr_mean']:.4g}, {per_it:.3g} s/it, about "
                    f"{_fmt_duration(per_it * (distiller.iterations - rec['iteration']))} left")
                beat.update(i=rec["iteration"], last=now)
            if bar is not None:
                post = {"loss": f"{rec['loss']:.4f}", "lr": f"{rec['lr_mean']:.3g}"}
                if last_acc[0] is not None:
                    post["acc"] = f"{100 * last_acc[0]:.1f}%"
                bar.set_postfix(post, refresh=False)
                bar.update(1)
            if guard.requested:
                raise _StopRequested

        if resume:
            say(f"resuming {out} at iteration {distiller.iteration}/{distiller.iterations}")
        try:
            with guard:
                distiller.run(checkpoint_path=ckpt, on_step=on_step,
                              evaluate_fn=periodic if cfg.eval_every else None)
        except _StopRequested:
            distiller.save_checkpoint(ckpt)  # between iterations: a consistent state
            raise Interrupted(ckpt, distiller.iteration, saved=True) from None
        except KeyboardInterrupt:
            kept = _checkpoint_iteration(ckpt)
            raise Interrupted(ckpt if kept is not None else None, kept, saved=False) from None
        except DivergenceError as e:
            kept = _checkpoint_iteration(ckpt)
            where = (f"the last good checkpoint (iteration {kept}) is kept at {ckpt}" if kept is not None
                     else f"no checkpoint was written before it (checkpoint_every={cfg.checkpoint_every})")
            if best:
                where += (f"; the best iterate by validation so far (iteration {best['iteration']}, "
                          f"{100 * best['val_acc']:.2f}%) is kept at {out / BEST_FILE} (fastdistill "
                          "evaluate takes it)")
            tries = "a smaller lr0 or outer_lr, an earlier outer-lr decay (decay_epochs)"
            if e.above_max_lr:
                tries += ", a larger max_lr"
            raise DivergenceError(f"{e}; {where}. A fresh run may avoid it: try {tries}, or another "
                                  "seed", above_max_lr=e.above_max_lr) from None
        finally:
            if bar is not None:
                bar.close()

        if val_x is not None:  # the last iterate competes too
            consider_best(distiller, {})
            say(f"best iterate on the {cfg.val_size} validation images: iteration {best['iteration']} "
                f"(validation accuracy {100 * best['val_acc']:.2f}%), kept in {out / BEST_FILE}")
        say(f"evaluating on {'the fixed θ_0' if cfg.fixed_init else f'{cfg.eval_models} held-out models'}")
        t_eval = time.perf_counter()
        try:
            result = distiller.result()
            report = _eval(model, cfg, result.data, result.labels, result.lrs, result.betas,
                           result.theta0, test_x, test_y, cfg.eval_models, progress=progress)
            attack = _attack(model, cfg, result, test_x, test_y)
        except KeyboardInterrupt:
            raise Interrupted(ckpt, distiller.iteration, saved=True) from None
        eval_s = time.perf_counter() - t_eval

        metrics = _metrics(cfg, distiller, report, info, eval_s, time.perf_counter() - t_start,
                           start_iteration if resume else None, model)
        if attack is not None:
            metrics["attack"] = attack
        if best:
            if best["iteration"] == distiller.iteration:  # the last iterate won: its test figure is the report's
                s = report.summary()
                best.update(eval_acc=s["acc_after_mean"], eval_models=s["n_models"])
                save_metrics(out / BEST_METRICS_FILE, best)
            metrics["best"] = dict(best)
        result.metrics = {k: v for k, v in metrics.items() if k != "history"}
        distilled = DistilledSet.from_result(result, info, cfg.model)
        paths = {"checkpoint": ckpt,
                 "distilled": save_distilled(out / DISTILLED_FILE, distilled),
                 "npz": save_npz(out / NPZ_FILE, distilled),
                 "metrics": save_metrics(out / METRICS_FILE, metrics),
                 "grid": save_distilled_grid(out / GRID_FILE, distilled)}
    return RunOutput(out=out, result=result, distilled=distilled, report=report, metrics=metrics,
                     paths=paths)


def _attack(model, cfg: DistillConfig, result: DistillResult, test_x, test_y) -> Optional[Dict[str, Any]]:
    """The poisoning metrics (acc w.r.t. modified labels, K→T rate) for ``objective="poison"``."""
    if cfg.objective != "poison":
        return None
    from .poison import evaluate_attack
    rep = evaluate_attack(model, result.data, result.labels, result.lrs, test_x, test_y,
                          _inits(model, cfg, result.theta0, cfg.eval_models, False), cfg.attack_class,
                          cfg.target_class)
    return rep.summary()


def _checkpoint_iteration(path: Path) -> Optional[int]:
    """The iteration a checkpoint on disk holds, or None if there is none (or it is unreadable)."""
    try:
        return int(read_checkpoint(path)["iteration"])
    except FastDistillError:
        return None


def _metrics(cfg: DistillConfig, d: Distiller, report: EvalReport, info, eval_s: float,
             wall_s: float, resumed_from: Optional[int], model) -> Dict[str, Any]:
    from . import __version__

    last = d.history[-1] if d.history else {}
    return {
        "format": METRICS_FORMAT,
        "dataset": dataset_info_dict(info),
        "model": cfg.model, "num_params": int(model.num_params), "mode": cfg.mode,
        "steps": cfg.steps, "epochs": cfg.epochs, "T": cfg.T,
        "images": int(d.data.shape[0] * d.data.shape[1]),
        "eval": {**report.summary(), "heldout": not cfg.fixed_init, "seed": cfg.seed},
        "per_model": {"before": list(report.before), "after": list(report.after)},
        "iterations": d.iteration, "final_loss": last.get("loss"),
        "lrs": d.lrs().tolist(), "betas": None if d.betas() is None else d.betas().tolist(),
        "backgrad": cfg.backgrad, "backend": backend_info(used=True),
        "distill_time_s": d.elapsed, "eval_time_s": eval_s, "wall_time_s": wall_s,
        "resumed_from_iteration": resumed_from,
        # the back-gradient's own reverse-pass storage (θ_t states, or fixed-point Θ, V and the
        # information buffer for reversible), the largest over the run's iterations
        "engine_bytes_max": max((h.get("engine_bytes", 0) for h in d.history), default=0),
        "info_buffer_bytes_max": max((h.get("info_buffer_bytes", 0) for h in d.history), default=0),
        # the whole process (dataset, PyTorch runtime, model, engine) at its peak (VmHWM)
        "peak_rss_bytes": peak_rss_bytes(),
        "threads": torch.get_num_threads(), "device": "cpu",
        "versions": {"fastdistill": __version__, "torch": str(torch.__version__),
                     "python": sys.version.split()[0]},
        "config": cfg.to_dict(),
        "history": _subsample(d.history),
    }


# -- re-evaluating a saved set -----------------------------------------------------------------
def evaluate_saved(path: Union[str, Path], *, dataset: Optional[str] = None,
                   data_root: Optional[str] = None, eval_models: Optional[int] = None,
                   seed: Optional[int] = None, heldout: bool = False, data: Any = None,
                   progress: bool = False, threads: int = 0) -> EvalOutput:
    """Re-run the DD evaluation of a saved distilled set.

    Fixed-init sets are evaluated on their stored θ_0 (this reproduces the run's own number
    exactly); random-init sets (or any set with ``heldout=True``) on ``eval_models`` held-out
    models drawn with ``seed`` (default: the run's).

    Args:
        path: a run folder, ``distilled.pt`` or ``distilled.npz``.
        dataset, data_root: the real test set (default: the one the set was distilled from).
        data: an already loaded dataset (overrides ``dataset``/``data_root``).
    Raises:
        DataError / ShapeError: unreadable set, or a dataset that does not fit it.
    """
    dset = load_distilled(path)
    cfg = dset.config
    name = dataset or dset.dataset.get("name") or cfg.dataset
    if eval_models is not None and eval_models < 1:
        raise ConfigError(f"eval_models must be at least 1, got {eval_models}")
    n = eval_models if eval_models is not None else cfg.eval_models
    with _threads(threads):
        ds = data if data is not None else _load_data(name, data_root if data_root is not None else cfg.data_root)
        _check_dataset(ds, name)
        info = ds.info
        C, H = int(ds.test_x.shape[1]), int(ds.test_x.shape[2])
        if (C, H) != tuple(dset.data.shape[2:4]) or info.num_classes != dset.dataset.get("num_classes",
                                                                                        info.num_classes):
            raise ShapeError(f"the distilled set is {list(dset.data.shape[2:])} images of "
                             f"{dset.dataset.get('num_classes')} classes, but {name} has "
                             f"{[C, H, H]} images of {info.num_classes} classes")
        model = _model_for(dset.model, info.num_classes, ds.test_x, name)
        if dset.theta0 is not None:
            model.check_theta(dset.theta0)
        report = _eval(model, cfg, dset.data, dset.labels, dset.lrs, dset.betas, dset.theta0,
                       ds.test_x, ds.test_y, n, heldout=heldout, seed=seed, progress=progress)
    used_heldout = heldout or not cfg.fixed_init
    summary = {"path": str(path), "dataset": name, "model": dset.model, "mode": cfg.mode,
               "heldout": used_heldout, "seed": (cfg.seed if seed is None else seed) if used_heldout else None,
               **report.summary(), "per_model": {"before": report.before, "after": report.after},
               "stored": dset.metrics.get("eval")}
    return EvalOutput(report=report, summary=summary, distilled=dset)
