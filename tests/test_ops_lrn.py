"""lrn (+ tangent, backward): every backend equals the reference (float64 to ~1e-12; float32
within PyTorch's own float32 error), the references equal autograd of F.local_response_norm,
registered correctly (opcheck), in bounds, deterministic, and bad arguments fail clearly."""
import doctest
import importlib

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

from fastdistill import _backend
from fastdistill.errors import ShapeError
from fastdistill.ops.lrn import (ALEXCIFARNET_LRN, lrn, lrn_backward, lrn_backward_reference,
                                 lrn_reference, lrn_tangent, lrn_tangent_reference)

CPP = _backend.has_kernel("fastdistill::lrn", "CPU")
BACKENDS = ["reference",
            pytest.param("cpp", marks=pytest.mark.skipif(not CPP, reason="fastdistill._C without lrn"))]
# (B, C, M, H, W): ones, fewer channels than the window, a prime, a power of two, and both of
# AlexCifarNet's LRNs on CIFAR (64 channels of 16×16 maps; M = 2 images, 1 and 2 networks)
SHAPES = [(1, 1, 1, 1, 1), (2, 3, 1, 2, 5), (3, 7, 5, 3, 11), (2, 16, 2, 8, 8), (1, 64, 2, 16, 16),
          (2, 64, 2, 16, 16)]
HYPER = ALEXCIFARNET_LRN
FUNCS = {"forward": (lrn, lrn_reference), "tangent": (lrn_tangent, lrn_tangent_reference),
         "backward": (lrn_backward, lrn_backward_reference)}


@pytest.fixture(autouse=True)
def _no_forced_backend(monkeypatch):
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)


def _inputs(which, shape, dtype, seed=0, scale=3.0):
    """Arguments of ``which`` (inputs scaled so that the normaliser is far from 1)."""
    g = torch.Generator().manual_seed(seed)
    x = scale * torch.randn(shape, generator=g, dtype=torch.float64)
    if which == "forward":
        args = (x,)
    elif which == "tangent":
        args = (torch.randn(shape, generator=g, dtype=torch.float64), x)
    else:
        args = (torch.randn((2,) + tuple(shape), generator=g, dtype=torch.float64), x)
    return tuple(a.to(dtype) for a in args)


def _max_err(a, b):
    return float((a.double() - b.double()).abs().max())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", list(FUNCS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_equals_reference(backend, which, shape):
    fn, ref = FUNCS[which]
    args64 = _inputs(which, shape, torch.float64)
    want = ref(*args64, **HYPER)
    got64 = fn(*args64, **HYPER, backend=backend)
    assert got64.dtype == torch.float64 and got64.shape == want.shape
    assert _max_err(got64, want) <= 1e-12 * float(want.abs().max())
    assert _backend.last_used(f"lrn{'' if which == 'forward' else '_' + which}").backend == backend
    # float32: the same float32-representable inputs; judged against PyTorch's float32 error
    args32 = tuple(a.float() for a in args64)
    truth = ref(*(a.double() for a in args32), **HYPER)
    got32 = fn(*args32, **HYPER, backend=backend)
    assert got32.dtype == torch.float32
    torch_err = _max_err(ref(*args32, **HYPER), truth)
    ulp = torch.finfo(torch.float32).eps * float(truth.abs().max())
    assert _max_err(got32, truth) <= 2 * torch_err + ulp


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size", [1, 2, 3, 5, 8])
def test_other_window_sizes_and_hyperparameters(backend, size):
    """Odd and even windows (PyTorch pads size//2 before, (size−1)//2 after), wider than C too."""
    hyper = dict(size=size, alpha=0.3, beta=0.6, k=2.0)
    for which, (fn, ref) in FUNCS.items():
        args = _inputs(which, (2, 6, 2, 3, 3), torch.float64, seed=size, scale=1.0)
        want = ref(*args, **hyper)
        assert _max_err(fn(*args, **hyper, backend=backend), want) <= 1e-12 * float(want.abs().max())


def test_reference_is_local_response_norm_and_its_derivatives():
    """lrn_reference is F.local_response_norm on [B, C, M, H, W] (per network, over C), and the
    tangent/backward references are its JVP/VJP (float64)."""
    x, xd = _inputs("tangent", (2, 9, 3, 4, 5), torch.float64, seed=1)[::-1]
    y = lrn_reference(x, **HYPER)
    B, C, M, H, W = x.shape
    per_image = F.local_response_norm(x.permute(0, 2, 1, 3, 4).reshape(B * M, C, H, W), **HYPER)
    assert torch.allclose(y, per_image.reshape(B, M, C, H, W).permute(0, 2, 1, 3, 4), rtol=1e-15, atol=0)
    assert torch.allclose(y, torch.nn.LocalResponseNorm(4, 0.001 / 9, 0.75, 1.0)(x), rtol=0, atol=0)
    _, jvp = torch.func.jvp(lambda t: F.local_response_norm(t, **HYPER), (x,), (xd,))
    assert torch.allclose(lrn_tangent_reference(xd, x, **HYPER), jvp, rtol=1e-13, atol=1e-15)
    g = torch.randn((2,) + tuple(x.shape), dtype=x.dtype, generator=torch.Generator().manual_seed(2))
    xx = x.clone().requires_grad_(True)
    yy = F.local_response_norm(xx, **HYPER)
    vjp = torch.stack([torch.autograd.grad(yy, xx, g[s], retain_graph=True)[0] for s in range(2)])
    assert torch.allclose(lrn_backward_reference(g, x, **HYPER), vjp, rtol=1e-13, atol=1e-15)
    # the derivative terms matter: a "y = x / D with D constant" tangent would be far off
    assert _max_err(xd / (y / x), jvp) > 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    hyper = dict(size=4, alpha=0.5, beta=0.75, k=1.0)     # a large α: the cross terms matter
    x = torch.randn((1, 5, 2, 2, 3), dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    assert gradcheck(lambda t: lrn(t, **hyper, backend=backend), (x.requires_grad_(True),))
    assert gradcheck(lambda t: lrn_reference(t, **hyper), (x,), check_forward_ad=True)


@pytest.mark.skipif(not CPP, reason="fastdistill._C without lrn")
def test_opcheck():
    xd, x = _inputs("tangent", (2, 5, 2, 3, 3), torch.float64, seed=4)
    g = torch.randn((2,) + tuple(x.shape), dtype=x.dtype)
    h = (4, 0.001 / 9, 0.75, 1.0)
    torch.library.opcheck(torch.ops.fastdistill.lrn.default, (x.clone().requires_grad_(True),) + h)
    torch.library.opcheck(torch.ops.fastdistill.lrn_tangent.default, (xd, x) + h)
    torch.library.opcheck(torch.ops.fastdistill.lrn_backward.default, (g, x) + h)


def _in_guarded_buffer(t, canary=1e30, pad=1024):
    buf = torch.full((t.numel() + 2 * pad,), canary, dtype=t.dtype)
    buf[pad:pad + t.numel()] = t.reshape(-1)
    return buf, buf[pad:pad + t.numel()].view(t.shape)


@pytest.mark.parametrize("backend", BACKENDS)
def test_guard_padding_and_determinism(backend):
    """Inputs are views into buffers with canaries around them: a read outside the view would
    change the result, a write outside would change a canary. Two runs are bit-identical."""
    canary = 1e30
    for which, (fn, ref) in FUNCS.items():
        args = _inputs(which, (2, 64, 2, 16, 16), torch.float32, seed=5)
        bufs, views = zip(*(_in_guarded_buffer(a, canary) for a in args))
        one, two = fn(*views, **HYPER, backend=backend), fn(*views, **HYPER, backend=backend)
        assert torch.equal(one, two) and torch.equal(one, fn(*args, **HYPER, backend=backend))
        assert one.isfinite().all()
        for buf in bufs:
            assert (buf[:1024] == canary).all() and (buf[-1024:] == canary).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_input_is_handled(backend):
    xd, x = _inputs("tangent", (2, 6, 3, 5, 4), torch.float64, seed=6)
    xt, xdt = x.transpose(3, 4), xd.transpose(3, 4)        # [2, 6, 3, 4, 5] views
    assert not xt.is_contiguous()
    assert torch.equal(lrn(xt, **HYPER, backend=backend), lrn(xt.contiguous(), **HYPER, backend=backend))
    assert torch.equal(lrn_tangent(xdt, xt, **HYPER, backend=backend),
                       lrn_tangent(xdt.contiguous(), xt.contiguous(), **HYPER, backend=backend))


def test_shape_errors():
    xd, x = _inputs("tangent", (1, 4, 2, 3, 3), torch.float32)
    with pytest.raises(ShapeError, match="5 dimensions"):
        lrn(x[0], **HYPER)                                  # [C, M, H, W]: no network axis
    with pytest.raises(ShapeError, match="float32/float64"):
        lrn(x.half(), **HYPER)
    with pytest.raises(ShapeError, match="size"):
        lrn(x, 0)
    with pytest.raises(ShapeError, match="xd must be"):
        lrn_tangent(xd[:, :2], x, **HYPER)
    with pytest.raises(ShapeError, match="xd must be"):
        lrn_tangent(xd.double(), x, **HYPER)
    with pytest.raises(ShapeError, match="6 dimensions"):
        lrn_backward(xd, x, **HYPER)                        # g without its stack dimension
    with pytest.raises(ShapeError, match="g must be"):
        lrn_backward(xd[:, :3].unsqueeze(0), x, **HYPER)


@pytest.mark.skipif(not CPP, reason="fastdistill._C without lrn")
def test_cpp_entry_points_check_their_arguments():
    xd, x = _inputs("tangent", (1, 4, 2, 3, 3), torch.float32)
    ops, h = torch.ops.fastdistill, (4, 0.001 / 9, 0.75, 1.0)
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.lrn(x.transpose(3, 4), *h)
    with pytest.raises(RuntimeError, match="5 dimensions"):
        ops.lrn(x[0], *h)
    with pytest.raises(RuntimeError, match="size must be"):
        ops.lrn(x, 0, *h[1:])
    with pytest.raises(RuntimeError, match="shape of x"):
        ops.lrn_tangent(xd[:, :2].contiguous(), x, *h)
    with pytest.raises(RuntimeError, match="g must be"):
        ops.lrn_backward(xd[:, :2].contiguous().unsqueeze(0), x, *h)
    with pytest.raises(RuntimeError, match="one dtype"):
        ops.lrn_backward(xd.double().unsqueeze(0), x, *h)


def test_docstring_examples():
    mod = importlib.import_module("fastdistill.ops.lrn")  # the package re-exports the function
    res = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert res.attempted > 0 and res.failed == 0


@pytest.mark.cuda
def test_cuda_equals_reference():
    if not _backend.has_kernel("fastdistill::lrn", "CUDA"):
        pytest.skip("fastdistill._C was built without CUDA kernels")
    for shape in SHAPES:
        for which, (fn, ref) in FUNCS.items():
            args64 = _inputs(which, shape, torch.float64)
            want = ref(*args64, **HYPER)
            got = fn(*(a.cuda() for a in args64), **HYPER, backend="cuda")
            assert _max_err(got.cpu(), want) <= 1e-12 * float(want.abs().max())
            args32 = tuple(a.float() for a in args64)
            truth = ref(*(a.double() for a in args32), **HYPER)
            torch_err = _max_err(ref(*args32, **HYPER), truth)
            ulp = torch.finfo(torch.float32).eps * float(truth.abs().max())
            got32 = fn(*(a.cuda() for a in args32), **HYPER, backend="cuda")
            assert _max_err(got32.cpu(), truth) <= 2 * torch_err + ulp
            assert torch.equal(fn(*(a.cuda() for a in args32), **HYPER, backend="cuda"), got32)
