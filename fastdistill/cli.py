"""The ``fastdistill`` command line: ``distill``, ``evaluate``, ``fetch-data``, ``info``.

Every :class:`~fastdistill.distill.DistillConfig` field is a ``distill`` option
(``images_per_class`` → ``--images-per-class``); its default, type and the choices of the
registries (datasets, models, init schemes, back-gradient strategies) are read from the code at
run time, so the help never drifts from the dataclass.

Errors a user can cause print one line, ``fastdistill: error: …``, on stderr and exit with 2
(usage: bad option, unknown name, settings that contradict the checkpoint) or 1 (runtime:
missing/corrupt data or checkpoint, wrong shapes, divergence); ``--debug`` shows the traceback.
Ctrl-C saves a checkpoint and exits with 130.

Example::

    fastdistill distill --dataset mnist --mode fixed --iterations 2000 --out runs/mnist-fixed
    fastdistill distill --out runs/mnist-fixed --resume --iterations 4000
    fastdistill evaluate runs/mnist-fixed
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from .distill import DistillConfig
from .errors import ConfigError, FastDistillError

__all__ = ["main", "build_parser", "config_from_args"]

PROG = "fastdistill"

#: help text for each DistillConfig field (the default is appended from the dataclass)
_HELP = {
    "dataset": "dataset to distil",
    "data_root": "folder with the dataset files (default: the fastdistill data cache)",
    "model": "network architecture",
    "init": "initialisation scheme of θ_0",
    "init_gain": "gain of the init scheme (default: the scheme's own)",
    "mode": "fixed: one θ_0; random: fresh θ_0 every meta-iteration (fixed | random)",
    "steps": "S, distilled gradient steps (batches of synthetic images)",
    "epochs": "E, passes over the S steps; T = S·E learned learning rates",
    "images_per_class": "k, synthetic images per class in each step",
    "n_nets": "networks per meta-iteration, meta-gradients averaged (random init)",
    "lr0": "initial inner learning rate η_0",
    "outer_lr": "Adam learning rate of the outer loop",
    "outer_betas": "Adam betas of the outer loop",
    "decay_epochs": "StepLR period in epochs of the real training set",
    "decay_factor": "StepLR factor",
    "outer_epochs": "run length in epochs of the real training set (when --iterations is not given)",
    "iterations": "run length in meta-iterations (overrides --outer-epochs; may be raised on --resume)",
    "real_batch": "real images per meta-iteration",
    "backgrad": "back-gradient strategy",
    "inner_optimizer": "inner loop: gd (plain) or sgdm (momentum with learned β)",
    "momentum0": "initial β of the sgdm inner loop",
    "max_lr": "a learned learning rate above this stops the run as diverged",
    "seed": "random seed (synthetic data, θ_0, batches, held-out models)",
    "eval_models": "held-out models of the final evaluation (random init)",
    "val_size": "hold out N training images (a seeded draw, never in the outer batches); every "
                "--eval-every iterations the distilled set is also scored on them, and the best "
                "one so far is kept as best.pt (0: off)",
    "eval_every": "evaluate every N iterations (random init: on min(eval_models, 20) held-out models; 0: only at the end)",
    "checkpoint_every": "write checkpoint.pt every N iterations",
    "dtype": "float32 or float64",
    "threads": "torch threads (0: torch's default)",
    "soft_labels": "learn the labels too (SLDD), initialised one-hot",
    "label_softmax": "the inner loss sees softmax of the learned labels",
    "label_classes": "initial class of each image of a step (overrides k·classes; e.g. 0 2 4 6 8)",
    "objective": "outer objective: ce (DD) or poison (attack_class relabelled target_class)",
    "attack_class": "K, the attacked class of the poison objective",
    "target_class": "T, the class K should be predicted as",
    "pool": "model-pool file for the *-pretrained modes (from fastdistill pretrain)",
    "pool_heldout": "pool models kept for evaluation, never distilled on",
}
_EXCLUSIVE = ("iterations", "outer_epochs")
#: element type of list fields annotated with a bare ``list``
_LIST_ITEMS = {"label_classes": int}


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (and exit status 2)."""

    def error(self, message: str):
        self.exit(2, f"{PROG}: error: {message} (see '{self.prog} --help')\n")


def _registries() -> Dict[str, List[str]]:
    """Valid names, read from the registries now (colleagues register more at import time)."""
    from . import distill
    from .backgrad import STRATEGIES
    from .models import INIT_SCHEMES, MODELS
    try:
        from .data import DATASETS
        datasets = list(DATASETS)
    except ImportError:  # the data package is optional for everything but loading data
        datasets = None
    return {"dataset": datasets, "model": sorted(MODELS), "init": list(INIT_SCHEMES),
            "backgrad": sorted(STRATEGIES), "mode": list(getattr(distill, "MODES", ())) or None}


def _field_comments() -> Dict[str, str]:
    """The trailing ``# comment`` of each DistillConfig field, from its source: the help of a
    field added without a :data:`_HELP` entry is its comment in the dataclass, never empty."""
    import inspect
    import re

    try:
        src = inspect.getsource(DistillConfig)
    except (OSError, TypeError):  # no source (frozen install): fall back to the field name
        return {}
    pat = re.compile(r"^\s+(\w+)\s*:[^=#]+=[^#]*#\s*(.+?)\s*$")
    return {m.group(1): m.group(2) for m in map(pat.match, src.splitlines()) if m}


def _base_type(tp):
    """int for Optional[int], etc."""
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return tp


def _add_config_options(p: argparse.ArgumentParser) -> None:
    """One option per DistillConfig field; default SUPPRESS so we know what was given."""
    hints = typing.get_type_hints(DistillConfig)
    choices = _registries()
    comments = _field_comments()
    group = p.add_argument_group("distillation settings (defaults from DistillConfig)")
    excl = group.add_mutually_exclusive_group()
    for f in dataclasses.fields(DistillConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        tp = _base_type(hints[f.name])
        kw: Dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS,
                              "help": f"{_HELP.get(f.name) or comments.get(f.name, f.name)} (default: {default})"}
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif tp is tuple or typing.get_origin(tp) is tuple:
            kw.update(nargs=len(default), type=type(default[0]),
                      metavar=tuple(f"{f.name.split('_')[-1][0].upper()}{i + 1}" for i in range(len(default))))
        elif tp is list or typing.get_origin(tp) is list:
            elem = (typing.get_args(tp) or (_LIST_ITEMS.get(f.name, str),))[0]
            kw.update(nargs="+", type=elem, metavar={int: "N", float: "X"}.get(elem, "ITEM"))
        else:
            kw["type"] = tp
            if choices.get(f.name):
                kw["choices"] = choices[f.name]
            else:
                kw["metavar"] = {int: "N", float: "X"}.get(tp, f.name.split("_")[-1].upper())
        (excl if f.name in _EXCLUSIVE else group).add_argument(flag, **kw)


def build_parser() -> argparse.ArgumentParser:
    """The full parser (registries are read when this is called)."""
    from . import __version__

    common = _Parser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback on errors")
    p = _Parser(prog=PROG, parents=[common],
                description="Dataset distillation with exact meta-gradients through unrolled training.")
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    d = sub.add_parser("distill", parents=[common], help="distil a dataset (and evaluate it)",
                       description="Distil a dataset into a few synthetic images and learned "
                                   "learning rates (Wang et al. 2018, Algorithm 1), evaluate them "
                                   "and write the run folder.")
    _add_config_options(d)
    r = d.add_argument_group("run folder")
    r.add_argument("--out", type=Path, metavar="DIR",
                   help="run folder (default: runs/<dataset>-<mode>-<timestamp>)")
    r.add_argument("--resume", action="store_true",
                   help="continue from <out>/checkpoint.pt with its settings (options given "
                        "override them; only --iterations, --eval-*, --checkpoint-every, --threads "
                        "and --data-root may differ)")
    r.add_argument("--overwrite", action="store_true", help="start afresh even if <out> holds a run")
    r.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on stderr (default: when stderr is a terminal)")
    d.set_defaults(func=_cmd_distill)

    e = sub.add_parser("evaluate", parents=[common], help="re-evaluate a saved distilled set",
                       description="Train held-out models on a saved distilled set with its learned "
                                   "rates and test them (DD protocol). Fixed-init sets use their "
                                   "stored θ_0 unless --heldout.")
    e.add_argument("path", type=Path, metavar="RUN_DIR|distilled.pt",
                   help="a run folder, distilled.pt or distilled.npz")
    reg = _registries()
    e.add_argument("--dataset", choices=reg["dataset"], help="test set (default: the run's)")
    e.add_argument("--data-root", metavar="DIR", help="folder with the dataset files")
    e.add_argument("--eval-models", type=int, metavar="N", help="held-out models (default: the run's)")
    e.add_argument("--seed", type=int, help="seed of the held-out models (default: the run's)")
    e.add_argument("--heldout", action="store_true",
                   help="evaluate a fixed-init set on random held-out models instead of its θ_0")
    e.add_argument("--output", type=Path, metavar="JSON",
                   help="where to write the result (default: evaluation.json next to the set)")
    e.add_argument("--threads", type=int, default=0, metavar="N", help="torch threads")
    e.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on stderr (default: when stderr is a terminal)")
    e.set_defaults(func=_cmd_evaluate)

    f = sub.add_parser("fetch-data", parents=[common], help="download/unpack a dataset into the cache",
                       description="Fetch a dataset from its offline source into the data cache.")
    f.add_argument("name", help=f"dataset ({', '.join(reg['dataset'] or ['mnist', 'fashion-mnist'])})")
    f.set_defaults(func=_cmd_fetch)

    i = sub.add_parser("info", parents=[common], help="versions, backends, strategies, data cache",
                       description="Show what this installation has available.")
    i.set_defaults(func=_cmd_info)

    from .pretrain import add_pretrain_command  # issue 4: model pools for the pre-trained modes
    add_pretrain_command(sub, common)
    return p


def config_from_args(args: argparse.Namespace, base: Optional[DistillConfig] = None) -> DistillConfig:
    """DistillConfig from the options that were given on top of ``base`` (default: the defaults)."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(DistillConfig)
             if hasattr(args, f.name)}
    if "outer_betas" in given:
        given["outer_betas"] = tuple(given["outer_betas"])
    if base is None:
        return DistillConfig(**given)
    if "outer_epochs" in given and "iterations" not in given:
        given["iterations"] = None  # the two are alternatives: the given one wins
    return dataclasses.replace(base, **given)


def _show_progress(flag: Optional[bool]) -> bool:
    return sys.stderr.isatty() if flag is None else flag


def _log(msg: str) -> None:
    print(f"{PROG}: {msg}", file=sys.stderr, flush=True)


def _pct(v) -> str:
    return "n/a" if v is None or v != v else f"{100 * v:.2f}%"


def _accuracy_text(s: Dict[str, Any]) -> str:
    if s["n_models"] == 1:
        return f"{_pct(s['acc_before_mean'])} -> {_pct(s['acc_after_mean'])} (fixed θ_0)"
    return (f"{_pct(s['acc_before_mean'])} ± {_pct(s['acc_before_std'])} -> "
            f"{_pct(s['acc_after_mean'])} ± {_pct(s['acc_after_std'])} over {s['n_models']} held-out models")


def _cmd_distill(args: argparse.Namespace) -> int:
    from .runner import read_checkpoint, run_distillation

    if args.resume:
        if args.out is None:
            raise ConfigError("--resume needs --out DIR, the folder that holds checkpoint.pt")
        saved = read_checkpoint(args.out / "checkpoint.pt")
        cfg = config_from_args(args, DistillConfig.from_dict(saved["config"]))
    else:
        cfg = config_from_args(args)
    run = run_distillation(cfg, args.out, resume=args.resume, overwrite=args.overwrite,
                           progress=_show_progress(args.progress), log=_log)
    m = run.metrics
    print(f"{PROG}: distilled {cfg.dataset} ({cfg.mode} init, {m['images']} images, T={cfg.T}) in "
          f"{m['iterations']} iterations, {m['distill_time_s']:.1f} s; test accuracy "
          f"{_accuracy_text(m['eval'])}; outputs in {run.out}/ "
          f"({', '.join(p.name for k, p in run.paths.items() if k != 'checkpoint')})", flush=True)
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .io import atomic_write
    from .runner import evaluate_saved

    res = evaluate_saved(args.path, dataset=args.dataset, data_root=args.data_root,
                         eval_models=args.eval_models, seed=args.seed, heldout=args.heldout,
                         progress=_show_progress(args.progress), threads=args.threads)
    where = args.output or ((args.path if args.path.is_dir() else args.path.parent) / "evaluation.json")
    from .io import _json_safe
    text = json.dumps(_json_safe(res.summary), indent=2, allow_nan=False) + "\n"
    atomic_write(where, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    print(f"{PROG}: {res.summary['dataset']} test accuracy {_accuracy_text(res.summary)}; "
          f"written to {where}", flush=True)
    return 0


def _cmd_fetch(args: argparse.Namespace) -> int:
    from .data import fetch

    where = fetch(args.name)
    print(f"{PROG}: {args.name} is ready in {where}", flush=True)
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    import torch

    from . import __version__
    from .runner import backend_info

    reg = _registries()
    lines = [f"fastdistill {__version__}",
             f"torch {torch.__version__} (threads {torch.get_num_threads()}, "
             f"CUDA {'available' if torch.cuda.is_available() else 'not available'})",
             f"python {sys.version.split()[0]}"]
    b = backend_info()
    if b is None:
        lines.append("backends: reference only (no backend registry)")
    else:
        lines.append(f"backends on {b.get('device', '?')}:")
        for name, r in (b.get("backends") or {}).items():
            state = "available" if r.get("available") else "not available"
            ops = f" [{', '.join(r['ops'])}]" if r.get("ops") else ""
            lines.append(f"  {name}: {state}{ops} ({r.get('reason', '')})")
        picks = b.get("auto") or {}
        if picks:
            lines.append("  auto picks: " + ", ".join(f"{op} -> {k or 'none'}" for op, k in picks.items()))
        if "error" in b:
            lines.append(f"  error: {b['error']}")
    lines += [f"back-gradient strategies: {', '.join(reg['backgrad'])}",
              f"models: {', '.join(reg['model'])}", f"init schemes: {', '.join(reg['init'])}"]
    try:
        from .data import data_home
        lines.append(f"data cache: {data_home()}")
        lines += [f"  {name}: {status}" for name, status in _dataset_status(reg["dataset"] or [])]
    except ImportError as e:
        lines.append(f"data: unavailable ({e})")
    print("\n".join(lines), flush=True)
    return 0


def _dataset_status(names: Sequence[str]):
    """(name, where it is or how to get it) for every registered dataset; never downloads."""
    from .data import sources

    probe = getattr(sources, "is_available", None)
    for name in names:
        if callable(probe):
            try:
                yield name, "available" if probe(name) else f"not fetched (fastdistill fetch-data {name})"
            except FastDistillError as e:
                yield name, f"not available ({_one_line(e)})"
            continue
        yield name, _probe_cache(sources, name)


def _probe_cache(sources, name: str) -> str:
    """Look for the cached/system copy the loaders would use, without fetching anything."""
    try:
        if name == "mnist":
            npz = sources.data_home() / "mnist" / sources.MNIST_NPZ
            return f"cached ({npz})" if npz.is_file() else "not fetched (fastdistill fetch-data mnist)"
        if name == "fashion-mnist":
            for d in (sources.FASHION_SYSTEM_DIR, sources._fashion_cache_dir()):
                if sources._fashion_complete(d):
                    return f"available ({d})"
            return "not fetched (fastdistill fetch-data fashion-mnist)"
    except (AttributeError, OSError):  # the data package changed its layout: do not guess
        return "unknown"
    return "no offline source; pass --data-root a folder with its files"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``fastdistill`` script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except SystemExit as e:  # argparse's usage errors (2) and --help/--version (0)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except KeyboardInterrupt as e:
        from .runner import Interrupted
        if debug:
            raise
        if isinstance(e, Interrupted) and e.checkpoint is not None:
            what = "saved" if e.saved else "the last one kept"
            out = Path(e.checkpoint).parent
            _log(f"interrupted at iteration {e.iteration}; checkpoint {what} in {e.checkpoint}; "
                 f"resume with: {PROG} distill --out {out} --resume")
        else:
            _log("interrupted")
        return 130
    except FastDistillError as e:
        if debug:
            raise
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr, flush=True)
        return 2 if isinstance(e, ConfigError) else 1
    except (OSError, MemoryError) as e:
        if debug:
            raise
        print(f"{PROG}: error: {type(e).__name__}: {_one_line(e)}", file=sys.stderr, flush=True)
        return 1
    except Exception as e:  # a bug: say so in one line, the traceback is one flag away
        if debug:
            raise
        print(f"{PROG}: error: internal error {type(e).__name__}: {_one_line(e)} (run again with "
              f"--debug for the traceback and please report it)", file=sys.stderr, flush=True)
        return 1


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__
