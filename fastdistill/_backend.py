"""Backend registry: which implementation of each hot op runs on which device, and why.

Every op in :mod:`fastdistill.ops` has a pure-PyTorch ``reference`` implementation and may have
faster ones. Backends:

* ``reference`` -- plain PyTorch, differentiable, every device. Always available.
* ``cpp`` -- the C++ extension ``fastdistill._C`` (``torch.ops.fastdistill.*``), when it was
  built and loads.
* ``triton`` -- Triton kernels (:mod:`fastdistill._kernels`) on a CUDA device. Under the Triton
  CPU interpreter (``TRITON_INTERPRET=1``) it runs on CPU tensors too, but only when explicitly
  requested (tests): ``auto`` never picks the interpreter.
* ``cuda`` -- hand-written CUDA kernels of the extension (built only against a CUDA torch).

``auto`` tries, in order, on CUDA: triton > cuda > cpp (if the op has a CUDA kernel there) >
reference; on CPU: cpp > reference; elsewhere: reference.

A backend is forced, most specific first, by the ``backend=`` argument of an op, by
:func:`use_backend`, or by the environment variable ``FASTDISTILL_BACKEND`` (``"cpp"`` for every
op, or ``"gd_update=triton,cpp"``: per-op entries plus a default). A forced backend that cannot
run raises :class:`~fastdistill.errors.BackendUnavailableError` with the reason; there is no
silent fallback. Every resolution is recorded: :func:`last_used` tells which backend ran each op
and why, so a run can store it next to its results.

Example::

    >>> import torch
    >>> from fastdistill import _backend
    >>> from fastdistill.ops import gd_update
    >>> with _backend.use_backend("reference"):
    ...     _ = gd_update(torch.ones(3), torch.ones(3), 0.5)
    >>> _backend.last_used("gd_update").backend
    'reference'
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, FrozenSet, Iterable, Iterator, Optional, Tuple, Union

import torch

from .errors import BackendUnavailableError, ConfigError

__all__ = ["BACKENDS", "ENV_VAR", "Availability", "BackendChoice", "register", "resolve",
           "use_backend", "record", "last_used", "reset_usage", "available_backends",
           "load_extension", "has_kernel", "registered", "kernel_probe", "register_extension"]

BACKENDS = ("reference", "cpp", "triton", "cuda")
ENV_VAR = "FASTDISTILL_BACKEND"

#: ``auto`` preference per device type; device types not listed use ``_AUTO_DEFAULT``.
_AUTO_ORDER = {
    "cuda": ("triton", "cuda", "cpp", "reference"),
    "cpu": ("cpp", "reference"),
}
_AUTO_DEFAULT = ("cpp", "reference")

DeviceLike = Union[torch.device, str, None]


@dataclass(frozen=True)
class Availability:
    """Whether an implementation can run on a device, why (or why not), and whether ``auto``
    may pick it (``auto=False``: only when explicitly requested, e.g. the Triton interpreter)."""

    ok: bool
    reason: str
    auto: bool = True

    def __bool__(self) -> bool:
        return self.ok


@dataclass(frozen=True)
class BackendChoice:
    """The outcome of one resolution: ``op`` ran on ``backend`` for ``device`` because ``reason``."""

    op: str
    backend: str
    device: str
    reason: str


@dataclass(frozen=True)
class _Impl:
    op: str
    backend: str
    device_types: Optional[FrozenSet[str]]  # None: any device
    fn: Callable[..., Any]
    available: Optional[Callable[[torch.device], Any]]


_REGISTRY: Dict[str, Dict[str, _Impl]] = {}
_CACHE: Dict[tuple, Tuple[str, Callable[..., Any], BackendChoice]] = {}
_LAST: Dict[str, BackendChoice] = {}
_FORCED: contextvars.ContextVar[Tuple[Tuple[Optional[str], str], ...]] = \
    contextvars.ContextVar("fastdistill_forced_backend", default=())
_EXT: Dict[str, Any] = {}
_TRITON: Dict[str, Any] = {}


# ------------------------------------------------------------------------------------ probes
def load_extension() -> Tuple[Optional[Any], str]:
    """Import ``fastdistill._C`` once; return ``(module or None, status line)``."""
    if not _EXT:
        try:
            _EXT["module"] = importlib.import_module("fastdistill._C")
            _EXT["status"] = f"fastdistill._C loaded ({_EXT['module'].__file__})"
        except Exception as exc:  # noqa: BLE001 - any failure means "not usable", with the reason
            _EXT["module"] = None
            _EXT["status"] = (f"fastdistill._C not importable ({type(exc).__name__}: {exc}); "
                              "rebuild with `FASTDISTILL_REQUIRE_EXT=1 bash scripts/install.sh` "
                              "to see why")
    return _EXT["module"], _EXT["status"]


def has_kernel(qualname: str, dispatch_key: str) -> bool:
    """Whether dispatcher op ``qualname`` (e.g. ``"fastdistill::gd_update"``) has a kernel for
    ``dispatch_key`` (``"CPU"``, ``"CUDA"``). False when the op or the extension is missing."""
    if load_extension()[0] is None:
        return False
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(qualname, dispatch_key))
    except RuntimeError:  # the operator does not exist
        return False


def _triton_module() -> Tuple[Optional[Any], str]:
    """``(triton, status)``, or ``(None, why not)``: triton itself, and fastdistill's kernels.

    The kernels live in ``kernels/`` and are installed as ``fastdistill._kernels`` (setup.py's
    ``package_dir``); a checkout run without being installed has triton but not them.
    """
    if not _TRITON:
        try:
            _TRITON["module"] = importlib.import_module("triton")
            _TRITON["status"] = f"triton {_TRITON['module'].__version__}"
        except Exception as exc:  # noqa: BLE001
            _TRITON["module"] = None
            _TRITON["status"] = f"triton not importable ({type(exc).__name__}: {exc})"
        else:
            try:
                importlib.import_module("fastdistill._kernels")
            except ImportError as exc:
                _TRITON["module"] = None
                _TRITON["status"] = (
                    f"{_TRITON['status']} is importable but fastdistill's Triton kernels are not "
                    f"({type(exc).__name__}: {exc}): they are installed from kernels/ as "
                    "fastdistill._kernels; install the checkout (`pip install --no-build-isolation -e .`)")
    return _TRITON["module"], _TRITON["status"]


def _triton_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _probe_backend(backend: str, device: torch.device) -> Availability:
    """Backend-wide availability on ``device`` (op-specific checks come on top)."""
    if backend == "reference":
        return Availability(True, "pure PyTorch reference (always available)")
    if backend == "cpp":
        mod, status = load_extension()
        return Availability(mod is not None, status)
    if backend == "cuda":
        if device.type != "cuda":
            return Availability(False, f"the cuda backend needs a CUDA device, not {device.type}")
        if torch.version.cuda is None:
            return Availability(False, f"torch {torch.__version__} is built without CUDA")
        if not torch.cuda.is_available():
            return Availability(False, "no CUDA device is available")
        mod, status = load_extension()
        return Availability(mod is not None, status)
    if backend == "triton":
        mod, status = _triton_module()
        if mod is None:
            return Availability(False, status)
        if _triton_interpreter():
            return Availability(True, f"{status} CPU interpreter (TRITON_INTERPRET=1): for tests "
                                "only, never picked by auto", auto=False)
        if device.type != "cuda":
            return Availability(False, f"Triton kernels need a CUDA device, not {device.type} "
                                "(tests may set TRITON_INTERPRET=1 before importing the kernels)")
        if not torch.cuda.is_available():
            return Availability(False, "no CUDA device is available")
        return Availability(True, f"{status} on CUDA")
    raise ConfigError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)} or auto")


def _as_availability(value: Any) -> Availability:
    if isinstance(value, Availability):
        return value
    if isinstance(value, tuple):
        return Availability(bool(value[0]), str(value[1]), *(bool(v) for v in value[2:3]))
    return Availability(bool(value), "available" if value else "op-specific check failed")


def _availability(impl: _Impl, device: torch.device) -> Availability:
    if impl.device_types is not None and device.type not in impl.device_types:
        return Availability(False, f"the {impl.backend} implementation of {impl.op} runs on "
                            f"{', '.join(sorted(impl.device_types))}, not {device.type}")
    base = _probe_backend(impl.backend, device)
    if not base.ok or impl.available is None:
        return base
    own = _as_availability(impl.available(device))
    if not own.ok:
        return Availability(False, own.reason)
    return Availability(True, base.reason, base.auto and own.auto)


# ---------------------------------------------------------------------------------- registry
def register(op: str, backend: str, device_types: Optional[Iterable[str]], fn: Callable[..., Any],
             available: Optional[Callable[[torch.device], Any]] = None) -> None:
    """Register ``fn`` as the ``backend`` implementation of ``op``.

    Args:
        op: the op name, e.g. ``"gd_update"`` (one name across ops/, kernels/, csrc/, tests).
        backend: one of :data:`BACKENDS`.
        device_types: device types it runs on (``{"cpu"}``, ``{"cuda"}``); ``None`` for any.
        fn: the implementation; every backend of one op takes the same arguments.
        available: optional ``available(device)`` for op-specific checks on top of the
            backend's own probe; returns a bool, ``(bool, reason)`` or :class:`Availability`.
    Raises:
        ConfigError: unknown backend name.
    """
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    types = None if device_types is None else frozenset(device_types)
    _REGISTRY.setdefault(op, {})[backend] = _Impl(op, backend, types, fn, available)
    _CACHE.clear()


def kernel_probe(kernel: str, dispatch_key: str = "CPU") -> Callable[[torch.device], Tuple[bool, str]]:
    """An ``available`` callback for :func:`register`: whether ``fastdistill._C`` has a
    ``dispatch_key`` kernel of the dispatcher op ``fastdistill::<kernel>``."""
    return lambda device: (has_kernel(f"fastdistill::{kernel}", dispatch_key),
                           f"fastdistill._C was built without a {dispatch_key} kernel of {kernel}")


def register_extension(op: str, fn: Optional[Callable[..., Any]] = None, *, kernel: Optional[str] = None,
                       cuda: bool = True) -> None:
    """Register the extension's backends of ``op``: ``cpp`` on CPU and (``cuda=True``) ``cuda``
    on CUDA, each available when ``fastdistill._C`` has that kernel of ``kernel`` (default: the
    op's own name). ``fn`` defaults to ``torch.ops.fastdistill.<op>`` with the op's arguments."""
    kernel = kernel or op
    call = fn or (lambda *args: getattr(torch.ops.fastdistill, op)(*args))
    register(op, "cpp", {"cpu"}, call, available=kernel_probe(kernel, "CPU"))
    if cuda:
        register(op, "cuda", {"cuda"}, call, available=kernel_probe(kernel, "CUDA"))


def registered() -> Dict[str, Tuple[str, ...]]:
    """``{op: backends registered for it}`` (ops register when :mod:`fastdistill.ops` imports)."""
    return {op: tuple(b for b in BACKENDS if b in impls) for op, impls in _REGISTRY.items()}


def _parse_spec(spec: str, source: str) -> Tuple[Tuple[Optional[str], str], ...]:
    """``"cpp"`` -> ((None, "cpp"),); ``"gd_update=triton,cpp"`` -> (("gd_update", "triton"), (None, "cpp"))."""
    out = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        op, _, name = part.rpartition("=")
        name = name.strip()
        if name not in BACKENDS + ("auto",):
            raise ConfigError(f"{source}: unknown backend {name!r}; choose from "
                              f"{', '.join(BACKENDS)} or auto")
        out.append((op.strip() or None, name))
    return tuple(out)


_ENV_PARSED: Dict[str, Tuple[Tuple[Optional[str], str], ...]] = {}


def _forced(op: str) -> Tuple[str, str]:
    """The backend forced for ``op`` by use_backend or the environment: ``(name, source)``."""
    for entry_op, name in reversed(_FORCED.get()):  # innermost context first
        if entry_op is None or entry_op == op:
            return name, "use_backend()"
    env = os.environ.get(ENV_VAR, "")
    if env:
        if env not in _ENV_PARSED:
            _ENV_PARSED[env] = _parse_spec(env, ENV_VAR)
        entries = _ENV_PARSED[env]
        for entry_op, name in entries:
            if entry_op == op:
                return name, f"{ENV_VAR}={env}"
        for entry_op, name in entries:
            if entry_op is None:
                return name, f"{ENV_VAR}={env}"
    return "auto", "auto"


def _to_device(device: DeviceLike) -> torch.device:
    if device is None:
        return torch.device("cpu")
    if isinstance(device, torch.Tensor):
        return device.device
    return device if isinstance(device, torch.device) else torch.device(device)


def resolve(op: str, device: DeviceLike, requested: Optional[str] = None
            ) -> Tuple[str, Callable[..., Any], str]:
    """Pick the implementation of ``op`` for ``device``; record and return it.

    Args:
        op: a registered op name.
        device: where the op's tensors live (a ``torch.device``, a string or a tensor).
        requested: a backend name, ``"auto"`` or ``None`` (then :func:`use_backend` or
            ``FASTDISTILL_BACKEND`` decide, else ``auto``).
    Returns:
        ``(backend_name, fn, reason)``.
    Raises:
        BackendUnavailableError: a requested backend is not registered for ``op`` or cannot run
            on ``device``.
        ConfigError: unknown op or backend name.
    """
    dev = _to_device(device)
    if requested is None:
        name, source = _forced(op)
    else:
        name, source = requested, "requested"
    key = (op, dev.type, dev.index, name, source, _triton_interpreter())
    hit = _CACHE.get(key)
    if hit is None:
        hit = _CACHE[key] = _resolve_uncached(op, dev, name, source)
    backend, fn, choice = hit
    _LAST[op] = choice
    return backend, fn, choice.reason


def _resolve_uncached(op: str, dev: torch.device, name: str, source: str
                      ) -> Tuple[str, Callable[..., Any], BackendChoice]:
    impls = _REGISTRY.get(op)
    if not impls:
        raise ConfigError(f"unknown op {op!r}; registered: {', '.join(sorted(_REGISTRY)) or 'none'}")
    if name != "auto":
        if name not in BACKENDS:
            raise ConfigError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)} or auto")
        impl = impls.get(name)
        if impl is None:
            raise BackendUnavailableError(
                f"backend {name!r} was requested for {op} ({source}) but {op} has no {name} "
                f"implementation (it has: {', '.join(b for b in BACKENDS if b in impls)})")
        avail = _availability(impl, dev)
        if not avail.ok:
            raise BackendUnavailableError(
                f"backend {name!r} was requested for {op} on {dev} ({source}) but cannot run: "
                f"{avail.reason}")
        return name, impl.fn, BackendChoice(op, name, str(dev), f"{source}: {avail.reason}")
    skipped = []
    for cand in _AUTO_ORDER.get(dev.type, _AUTO_DEFAULT):
        impl = impls.get(cand)
        if impl is None:
            continue
        avail = _availability(impl, dev)
        if avail.ok and avail.auto:
            why = f"auto on {dev.type}: {avail.reason}"
            if skipped:
                why += f" (skipped {'; '.join(skipped)})"
            return cand, impl.fn, BackendChoice(op, cand, str(dev), why)
        skipped.append(f"{cand}: {avail.reason}")
    raise BackendUnavailableError(f"no backend of {op} can run on {dev}: {'; '.join(skipped)}")


@contextlib.contextmanager
def use_backend(name: str, op: Optional[str] = None) -> Iterator[None]:
    """Force backend ``name`` (or ``"auto"``) for ``op`` (default: every op) inside the block.

    Nests; the innermost matching block wins; thread- and task-local (a context variable).
    Takes precedence over ``FASTDISTILL_BACKEND``; an op's ``backend=`` argument overrides it.
    """
    if name not in BACKENDS + ("auto",):
        raise ConfigError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)} or auto")
    token = _FORCED.set(_FORCED.get() + ((op, name),))
    try:
        yield
    finally:
        _FORCED.reset(token)


# ----------------------------------------------------------------------------------- records
def record(op: str, backend: str, device: DeviceLike, reason: str) -> BackendChoice:
    """Record that ``backend`` ran ``op`` on ``device`` because ``reason`` (ops whose choice is
    not a plain :func:`resolve` call use this); returns the stored :class:`BackendChoice`."""
    choice = BackendChoice(op, backend, str(_to_device(device)), reason)
    _LAST[op] = choice
    return choice


def last_used(op: Optional[str] = None):
    """The last :class:`BackendChoice` of ``op`` (None if it never ran), or, without ``op``, a
    dict ``{op: {"backend", "device", "reason"}}`` of every op that ran (JSON-ready)."""
    if op is not None:
        return _LAST.get(op)
    return {k: {"backend": c.backend, "device": c.device, "reason": c.reason}
            for k, c in _LAST.items()}


def reset_usage(ops: Optional[Iterable[str]] = None) -> None:
    """Forget what :func:`last_used` reports (e.g. at the start of a run): for every op, or
    only for ``ops``."""
    if ops is None:
        _LAST.clear()
        return
    for op in ops:
        _LAST.pop(op, None)


def clear_cache() -> None:
    """Drop cached resolutions (after changing availability, e.g. in tests)."""
    _CACHE.clear()
    _ENV_PARSED.clear()


def available_backends(device: DeviceLike = None) -> Dict[str, Any]:
    """Summary for ``fastdistill info``: which backends can run on ``device`` (default: ``cuda``
    when available, else ``cpu``), why, and what ``auto`` picks for each op.

    Returns ``{"device": str, "backends": {backend: {"available": bool, "auto": bool,
    "reason": str, "ops": [op, ...]}}, "auto": {op: backend or None}}`` (JSON-ready).
    """
    importlib.import_module("fastdistill.ops")  # registers every op
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = _to_device(device)
    backends: Dict[str, Any] = {}
    for backend in BACKENDS:
        avail = _probe_backend(backend, dev)
        backends[backend] = {"available": avail.ok, "auto": avail.ok and avail.auto,
                             "reason": avail.reason,
                             "ops": sorted(op for op, impls in _REGISTRY.items() if backend in impls)}
    picks: Dict[str, Optional[str]] = {}
    for op in sorted(_REGISTRY):
        try:
            picks[op] = _resolve_uncached(op, dev, "auto", "auto")[0]
        except BackendUnavailableError:
            picks[op] = None
    return {"device": str(dev), "backends": backends, "auto": picks}
