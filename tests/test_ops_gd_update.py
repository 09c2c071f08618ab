"""gd_update: every backend equals the reference bitwise, is differentiable, stays in bounds."""
import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

from fastdistill import _backend
from fastdistill.errors import BackendUnavailableError, ConfigError, ShapeError
from fastdistill.ops import gd_update, gd_update_reference

CPP = _backend.load_extension()[0] is not None
TRITON = _backend._triton_module()[0] is not None

# Backends that can run on CPU tensors here (Triton via the interpreter conftest enables).
CPU_BACKENDS = [
    "reference",
    pytest.param("cpp", marks=pytest.mark.skipif(not CPP, reason="fastdistill._C not built")),
    pytest.param("triton", marks=pytest.mark.skipif(not TRITON, reason="triton not installed")),
]
SIZES = [1, 13, 1024, 61706]  # one, a prime, a power of two, LeNet's parameter count
DTYPES = [torch.float32, torch.float64]


def _inputs(n, dtype, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    theta = torch.randn(n, generator=gen, dtype=dtype).to(device)
    grad = torch.randn(n, generator=gen, dtype=dtype).to(device)
    lr = (torch.rand((), generator=gen, dtype=dtype) + 0.01).to(device)
    return theta, grad, lr


@pytest.fixture(autouse=True)
def _no_forced_backend(monkeypatch):
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
def test_matches_reference_bitwise(backend, dtype, n):
    theta, grad, lr = _inputs(n, dtype, seed=n)
    got = gd_update(theta, grad, lr, backend=backend)
    assert _backend.last_used("gd_update").backend == backend
    want = gd_update_reference(theta, grad, lr)
    assert got.dtype == dtype and got.shape == theta.shape
    assert torch.equal(got, want), (got - want).abs().max()
    # a float lr is the same step as a 0-d tensor of theta's dtype
    assert torch.equal(gd_update(theta, grad, float(lr), backend=backend), want)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_multidim_and_lr_shape_1(backend):
    theta, grad, lr = _inputs(6 * 7, torch.float64)
    theta, grad = theta.view(6, 7), grad.view(6, 7)
    got = gd_update(theta, grad, lr.reshape(1), backend=backend)
    assert got.shape == (6, 7) and torch.equal(got, gd_update_reference(theta, grad, lr))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradcheck_float64(backend):
    theta, grad, lr = _inputs(5, torch.float64)
    args = tuple(t.clone().requires_grad_(True) for t in (theta, grad, lr))
    fn = lambda th, g, eta: gd_update(th, g, eta, backend=backend)  # noqa: E731
    assert gradcheck(fn, args)
    assert gradgradcheck(fn, args)  # the back-gradient engine differentiates through the step


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradient_flows_to_float32_lr_of_float64_step(backend):
    theta, grad, _ = _inputs(9, torch.float64)
    lr = torch.tensor(0.25, dtype=torch.float32, requires_grad=True)
    gd_update(theta, grad, lr, backend=backend).sum().backward()
    assert torch.allclose(lr.grad, -grad.sum().float())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("n", [1, 1000, 1025, 61706])
def test_out_stays_inside_its_slice(backend, n):
    """Guard ("canary") padding around out and the inputs catches out-of-bounds accesses."""
    pad, canary = 4096, 1234.5
    theta, grad, lr = _inputs(n, torch.float32, seed=n)

    def guarded(x):
        buf = torch.full((n + 2 * pad,), canary, dtype=x.dtype)
        buf[pad:pad + n] = x
        return buf, buf[pad:pad + n]

    theta_buf, theta_v = guarded(theta)
    grad_buf, grad_v = guarded(grad)
    out_buf, out_v = guarded(torch.zeros(n))
    ret = gd_update(theta_v, grad_v, lr, out=out_v, backend=backend)
    assert ret.data_ptr() == out_v.data_ptr()
    assert torch.equal(out_v, gd_update_reference(theta, grad, lr))
    for buf in (theta_buf, grad_buf, out_buf):
        assert bool((buf[:pad] == canary).all()) and bool((buf[pad + n:] == canary).all())
    assert torch.equal(theta_v, theta) and torch.equal(grad_v, grad)  # inputs untouched


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_in_place_step(backend):
    theta, grad, lr = _inputs(1537, torch.float64)
    want = gd_update_reference(theta, grad, lr)
    got = gd_update(theta, grad, lr, out=theta, backend=backend)
    assert got is theta and torch.equal(theta, want)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_contiguous_inputs_are_handled(backend):
    theta, grad, lr = _inputs(2 * 301, torch.float64)
    theta_nc, grad_nc = theta[::2], grad.view(301, 2).t()[1]  # strides 2, 2
    assert not theta_nc.is_contiguous() and not grad_nc.is_contiguous()
    got = gd_update(theta_nc, grad_nc, lr, backend=backend)
    assert got.is_contiguous()
    assert torch.equal(got, gd_update_reference(theta_nc.contiguous(), grad_nc.contiguous(), lr))


def test_auto_on_cpu_uses_cpp_when_built_and_records_it():
    theta, grad, lr = _inputs(10, torch.float32)
    gd_update(theta, grad, lr)
    choice = _backend.last_used("gd_update")
    assert choice.backend == ("cpp" if CPP else "reference")
    assert choice.device == "cpu" and choice.reason.startswith("auto on cpu")
    with _backend.use_backend("reference"):
        gd_update(theta, grad, lr)
    assert _backend.last_used("gd_update").backend == "reference"


def test_forcing_unavailable_backend_raises():
    theta, grad, lr = _inputs(10, torch.float32)
    with pytest.raises(BackendUnavailableError, match="cuda"):
        gd_update(theta, grad, lr, backend="cuda")


def test_forcing_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    _backend.clear_cache()
    theta, grad, lr = _inputs(10, torch.float32)
    with pytest.raises(BackendUnavailableError, match="(CUDA device|not importable)"):
        gd_update(theta, grad, lr, backend="triton")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_argument_errors(backend):
    theta, grad, lr = _inputs(8, torch.float64)
    with pytest.raises(ShapeError, match="grad must match"):
        gd_update(theta, grad[:7], lr, backend=backend)
    with pytest.raises(ShapeError, match="grad must match"):
        gd_update(theta, grad.float(), lr, backend=backend)
    with pytest.raises(ShapeError, match="float32 or float64"):
        gd_update(theta.long(), grad.long(), lr, backend=backend)
    with pytest.raises(ShapeError, match="scalar"):
        gd_update(theta, grad, torch.ones(2, dtype=torch.float64), backend=backend)
    with pytest.raises(ShapeError, match="out must"):
        gd_update(theta, grad, lr, out=torch.empty(8, 2, dtype=torch.float64)[:, 0], backend=backend)
    with pytest.raises(ConfigError, match="not differentiable"):
        gd_update(theta.requires_grad_(), grad, lr, out=torch.empty_like(grad), backend=backend)


# ------------------------------------------------------------------- the C++ op itself
needs_cpp = pytest.mark.skipif(not CPP, reason="fastdistill._C not built")


@needs_cpp
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_functional(requires_grad):
    theta, grad, lr = _inputs(17, torch.float64)
    args = tuple(t.clone().requires_grad_(requires_grad) for t in (theta, grad, lr))
    torch.library.opcheck(torch.ops.fastdistill.gd_update.default, args)


@needs_cpp
def test_opcheck_out():
    theta, grad, lr = _inputs(17, torch.float32)
    torch.library.opcheck(torch.ops.fastdistill.gd_update_out.default,
                          (theta, grad, lr, torch.empty_like(theta)))


@needs_cpp
def test_cpp_op_checks_its_arguments():
    op = torch.ops.fastdistill.gd_update.default
    theta, grad, lr = _inputs(12, torch.float64)
    with pytest.raises(RuntimeError, match="contiguous"):
        op(theta[::2], grad[::2], lr)
    with pytest.raises(RuntimeError, match="shape"):
        op(theta, grad[:5], lr)
    with pytest.raises(RuntimeError, match="dtype"):
        op(theta, grad.float(), lr)
    with pytest.raises(RuntimeError, match="0-d"):
        op(theta, grad, lr.reshape(1))
    with pytest.raises(RuntimeError, match="float32 or float64"):
        op(theta.long(), grad.long(), lr.long())
    with pytest.raises(RuntimeError, match="out must have the shape"):
        torch.ops.fastdistill.gd_update_out.default(theta, grad, lr, torch.empty(3, dtype=torch.float64))


@needs_cpp
def test_cpp_op_uses_several_threads_without_changing_the_result():
    # at::parallel_for splits above the grain size (32768): compare 1 thread with 2
    theta, grad, lr = _inputs(100_003, torch.float64)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.fastdistill.gd_update.default(theta, grad, lr)
        torch.set_num_threads(2)
        two = torch.ops.fastdistill.gd_update.default(theta, grad, lr)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one, two) and torch.equal(one, gd_update_reference(theta, grad, lr))


# ------------------------------------------------------------------------------ on a GPU
GPU_BACKENDS = ["reference", "triton", "cuda"]


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES + [(1 << 22) + 7])
def test_cuda_matches_reference_bitwise(backend, dtype, n):
    if backend == "cuda" and not _backend.has_kernel("fastdistill::gd_update", "CUDA"):
        pytest.skip("fastdistill._C has no CUDA kernels (built against a CPU torch?)")
    theta, grad, lr = _inputs(n, dtype, device="cuda", seed=n)
    got = gd_update(theta, grad, lr, backend=backend)
    torch.cuda.synchronize()
    assert torch.equal(got, gd_update_reference(theta, grad, lr))


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cuda_out_guard_and_grad(backend):
    if backend == "cuda" and not _backend.has_kernel("fastdistill::gd_update", "CUDA"):
        pytest.skip("fastdistill._C has no CUDA kernels")
    n, pad, canary = 70_001, 4096, 1234.5
    theta, grad, lr = _inputs(n, torch.float32, device="cuda")
    buf = torch.full((n + 2 * pad,), canary, device="cuda")
    gd_update(theta, grad, lr, out=buf[pad:pad + n], backend=backend)
    assert torch.equal(buf[pad:pad + n], gd_update_reference(theta, grad, lr))
    assert bool((buf[:pad] == canary).all()) and bool((buf[pad + n:] == canary).all())
    args = tuple(t[:5].double().clone().requires_grad_(True) for t in (theta, grad))
    args += (lr.double().clone().requires_grad_(True),)
    fn = lambda th, g, eta: gd_update(th, g, eta, backend=backend)  # noqa: E731
    assert gradcheck(fn, args) and gradgradcheck(fn, args)


@pytest.mark.cuda
@pytest.mark.skipif(not TRITON, reason="triton not installed")
def test_cuda_auto_picks_triton():
    theta, grad, lr = _inputs(10, torch.float32, device="cuda")
    gd_update(theta, grad, lr)
    assert _backend.last_used("gd_update").backend == "triton"
