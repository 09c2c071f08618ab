"""The backend registry: auto order, forcing, loud failures, records."""
import sys

import pytest
import torch

from fastdistill import _backend
from fastdistill._backend import Availability, resolve, use_backend
from fastdistill.errors import BackendUnavailableError, ConfigError
import fastdistill.ops  # noqa: F401  (registers the real ops)

CPP_LOADED = _backend.load_extension()[0] is not None


@pytest.fixture
def toy_op(monkeypatch):
    """A throw-away op ``_toy`` with reference/cpp/triton/cuda implementations tagged by name."""
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    name = "_toy"
    for backend, types in (("reference", None), ("cpp", {"cpu"}), ("triton", {"cuda", "cpu"}),
                           ("cuda", {"cuda"})):
        _backend.register(name, backend, types, lambda b=backend: b)
    yield name
    _backend._REGISTRY.pop(name, None)
    _backend._LAST.pop(name, None)
    _backend.clear_cache()


@pytest.fixture
def no_extension(monkeypatch):
    """Pretend fastdistill._C failed to import."""
    monkeypatch.setattr(_backend, "_EXT", {"module": None, "status": "fastdistill._C not importable (test)"})
    _backend.clear_cache()
    yield
    _backend.clear_cache()


def test_auto_on_cpu_prefers_cpp_then_reference(toy_op):
    backend, fn, reason = resolve(toy_op, "cpu")
    assert backend == ("cpp" if CPP_LOADED else "reference")
    assert fn() == backend
    assert reason.startswith("auto on cpu")


def test_auto_without_extension_falls_back_to_reference_and_says_why(toy_op, no_extension):
    backend, _, reason = resolve(toy_op, torch.device("cpu"))
    assert backend == "reference"
    assert "cpp: fastdistill._C not importable (test)" in reason


def test_auto_never_picks_the_triton_interpreter(toy_op, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _backend.clear_cache()
    for dev in ("cpu", "cuda"):  # a CUDA device type resolves fine without a GPU
        backend, _, reason = resolve(toy_op, dev)
        assert backend != "triton", reason
    # ... but it can be forced explicitly (the tests of every Triton kernel do this)
    if _backend._triton_module()[0] is not None:
        assert resolve(toy_op, "cpu", "triton")[0] == "triton"


def test_triton_without_the_installed_kernels_is_unavailable_and_says_how_to_fix(toy_op, monkeypatch):
    """An uninstalled checkout has triton but no fastdistill._kernels (kernels/ is mapped there
    by setup.py): the triton backend is then unavailable with that reason, not a ModuleNotFoundError
    at the first launch."""
    pytest.importorskip("triton")
    monkeypatch.setattr(_backend, "_TRITON", {})
    monkeypatch.setitem(sys.modules, "fastdistill._kernels", None)   # import raises ImportError
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _backend.clear_cache()
    try:
        mod, status = _backend._triton_module()
        assert mod is None and "fastdistill._kernels" in status and "pip install" in status
        with pytest.raises(BackendUnavailableError, match="fastdistill._kernels"):
            resolve(toy_op, "cpu", "triton")
    finally:
        _backend.clear_cache()
    monkeypatch.undo()
    _backend._TRITON.clear()
    assert _backend._triton_module()[0] is not None   # installed here: the kernels import


def test_forced_backend_wins_and_is_recorded(toy_op):
    backend, fn, reason = resolve(toy_op, "cpu", "reference")
    assert (backend, fn()) == ("reference", "reference")
    assert reason.startswith("requested")
    choice = _backend.last_used(toy_op)
    assert (choice.op, choice.backend, choice.device) == (toy_op, "reference", "cpu")
    assert _backend.last_used()[toy_op]["backend"] == "reference"


@pytest.mark.parametrize("how", ["argument", "context", "env"])
def test_unavailable_forced_backend_raises_with_reason(toy_op, monkeypatch, how):
    if how == "argument":
        call = lambda: resolve(toy_op, "cpu", "cuda")  # noqa: E731
    elif how == "context":
        def call():
            with use_backend("cuda"):
                return resolve(toy_op, "cpu")
    else:
        monkeypatch.setenv(_backend.ENV_VAR, "cuda")
        call = lambda: resolve(toy_op, "cpu")  # noqa: E731
    with pytest.raises(BackendUnavailableError, match="runs on cuda, not cpu"):
        call()


def test_forced_cpp_without_extension_raises(toy_op, no_extension):
    with pytest.raises(BackendUnavailableError, match="not importable"):
        resolve(toy_op, "cpu", "cpp")


def test_forced_backend_the_op_lacks_raises(monkeypatch):
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    _backend.register("_refonly", "reference", None, lambda: "reference")
    try:
        with pytest.raises(BackendUnavailableError, match="has no cpp implementation"):
            resolve("_refonly", "cpu", "cpp")
        # auto still works: there is no silent substitution only when something was *forced*
        assert resolve("_refonly", "cpu")[0] == "reference"
    finally:
        _backend._REGISTRY.pop("_refonly")
        _backend.clear_cache()


def test_op_specific_availability_check(toy_op):
    _backend.register(toy_op, "cpp", {"cpu"}, lambda: "cpp",
                      available=lambda dev: (False, "no kernel for this dtype (test)"))
    if CPP_LOADED:
        with pytest.raises(BackendUnavailableError, match="no kernel for this dtype"):
            resolve(toy_op, "cpu", "cpp")
    assert resolve(toy_op, "cpu")[0] == "reference"
    _backend.register(toy_op, "cpp", {"cpu"}, lambda: "cpp",
                      available=lambda dev: Availability(True, "ok", auto=False))
    assert resolve(toy_op, "cpu")[0] == "reference"  # auto=False: only when forced


def test_precedence_argument_over_context_over_env(toy_op, monkeypatch):
    monkeypatch.setenv(_backend.ENV_VAR, "cuda")  # would fail on CPU if it won
    with use_backend("reference"):
        assert resolve(toy_op, "cpu")[0] == "reference"
        with use_backend("auto", op=toy_op):  # innermost matching block wins
            assert resolve(toy_op, "cpu")[0] == ("cpp" if CPP_LOADED else "reference")
        assert resolve(toy_op, "cpu", "auto")[0] == ("cpp" if CPP_LOADED else "reference")
    with pytest.raises(BackendUnavailableError):
        resolve(toy_op, "cpu")


def test_env_per_op_entries(toy_op, monkeypatch):
    monkeypatch.setenv(_backend.ENV_VAR, f"{toy_op}=reference, cuda")
    assert resolve(toy_op, "cpu")[0] == "reference"
    monkeypatch.setenv(_backend.ENV_VAR, "other_op=reference,cuda")
    with pytest.raises(BackendUnavailableError):
        resolve(toy_op, "cpu")


def test_unknown_names_are_config_errors(toy_op, monkeypatch):
    with pytest.raises(ConfigError):
        resolve(toy_op, "cpu", "fortran")
    with pytest.raises(ConfigError):
        with use_backend("fortran"):
            pass
    with pytest.raises(ConfigError):
        resolve("_no_such_op", "cpu")
    with pytest.raises(ConfigError):
        _backend.register(toy_op, "fortran", None, lambda: None)
    monkeypatch.setenv(_backend.ENV_VAR, "fortran")
    with pytest.raises(ConfigError, match=_backend.ENV_VAR):
        resolve(toy_op, "cpu")


def test_record_and_reset(toy_op):
    choice = _backend.record(toy_op, "reference", "cpu", "chosen by hand")
    assert _backend.last_used(toy_op) == choice
    _backend.reset_usage()
    assert _backend.last_used(toy_op) is None and _backend.last_used() == {}


def test_available_backends_summary():
    info = _backend.available_backends("cpu")
    assert info["device"] == "cpu"
    assert set(info["backends"]) == set(_backend.BACKENDS)
    assert info["backends"]["reference"]["available"] is True
    assert info["backends"]["cpp"]["available"] is CPP_LOADED
    assert info["backends"]["cuda"]["available"] is False
    assert info["backends"]["triton"]["auto"] is False  # no GPU here: never auto
    assert "gd_update" in info["backends"]["reference"]["ops"]
    assert info["auto"]["gd_update"] == ("cpp" if CPP_LOADED else "reference")


@pytest.mark.cuda
def test_auto_on_cuda_prefers_triton(toy_op):
    if _backend._triton_interpreter():
        pytest.skip("TRITON_INTERPRET=1 is set")
    assert resolve(toy_op, "cuda")[0] == "triton"


@pytest.mark.skipif(not CPP_LOADED, reason="fastdistill._C not built")
def test_register_extension_probes_the_named_kernel(monkeypatch):
    """register_extension's cpp backend is available exactly when the extension has the kernel
    it names; a missing kernel makes a forced cpp an error that names it."""
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    try:
        _backend.register("_toy_ext", "reference", None, lambda: "reference")
        _backend.register_extension("_toy_ext", lambda: "cpp", kernel="gd_update", cuda=False)
        assert resolve("_toy_ext", "cpu")[0] == "cpp"
        assert "cuda" not in _backend.registered()["_toy_ext"]
        _backend.register_extension("_toy_ext", lambda: "cpp", kernel="no_such_kernel")
        assert resolve("_toy_ext", "cpu")[0] == "reference"
        with pytest.raises(BackendUnavailableError, match="no_such_kernel"):
            resolve("_toy_ext", "cpu", "cpp")
    finally:
        _backend._REGISTRY.pop("_toy_ext", None)
        _backend._LAST.pop("_toy_ext", None)
        _backend.clear_cache()
