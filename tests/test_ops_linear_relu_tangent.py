"""linear_relu_tangent: the reference is the layer and its forward-mode derivative (jvp,
gradcheck, float64); the triton backend (CPU interpreter here) and the cuda backend (GPU only)
equal it at float32 error (≤ 2× torch's own, measured against float64), closely in float64, are
differentiable, stay inside their inputs and are deterministic (cuda: bit-identical reruns,
opcheck); a forced cuda backend on CPU tensors fails loudly."""
import os

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

from fastdistill import _backend
from fastdistill.errors import BackendUnavailableError, ShapeError
from fastdistill.ops.linear_relu_tangent import (linear_relu_tangent,
                                                 linear_relu_tangent_reference)

# triton runs CPU tensors only under the interpreter (conftest sets it without a GPU); the CUDA
# path is tested in tests/test_kernels_triton.py
TRITON = _backend._triton_module()[0] is not None and os.environ.get("TRITON_INTERPRET") == "1"
needs_triton = pytest.mark.skipif(not TRITON, reason="triton or its interpreter unavailable")
BACKENDS = ["reference", pytest.param("triton", marks=needs_triton)]
# (K, F_in, F_out, n): the brief's small layer (blocks padded to 16 by masks), ones, primes,
# LeNet's fc1 at 10 images
SHAPES = [(2, 40, 12, 10), (1, 1, 1, 1), (3, 17, 5, 13), (2, 400, 120, 10)]
EPS32 = torch.finfo(torch.float32).eps


@pytest.fixture(autouse=True)
def _no_forced_backend(monkeypatch):
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)


def _data(shape, dtype=torch.float32, seed=0):
    K, F_in, F_out, n = shape
    g = torch.Generator().manual_seed(seed)
    sizes = [(K, F_in, n), (K, F_in, n), (K, F_out, F_in), (K, F_out, F_in), (K, F_out), (K, F_out)]
    return [torch.randn(s, generator=g, dtype=dtype) for s in sizes]   # h, hd, W, V, b, bd


def _err(x, ref64):
    return (x.double() - ref64).abs().max().item()


@needs_triton
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_triton_float32_error_is_torchs(shape, relu):
    """Judged against torch's own float32 error (lesson 2): kernel ≤ 2× torch + a few ulps."""
    args = _data(shape, seed=sum(shape))
    got = linear_relu_tangent(*args, relu=relu, backend="triton")
    assert _backend.last_used("linear_relu_tangent").backend == "triton"
    ref = linear_relu_tangent_reference(*args, relu)
    exact = linear_relu_tangent_reference(*[a.double() for a in args], relu)
    for g, r, e in zip(got, ref, exact):
        assert g.dtype == torch.float32 and g.shape == e.shape
        atol = 8 * EPS32 * e.abs().max().item()
        assert _err(g, e) <= 2 * _err(r, e) + atol, (_err(g, e), _err(r, e))
    # the plain layer (no tangent) is the same kernel without the tangent's dots
    out, none = linear_relu_tangent(args[0], None, args[2], None, args[4], None, relu=relu,
                                    backend="triton")
    assert none is None and torch.equal(out, got[0])


@needs_triton
@pytest.mark.parametrize("shape", SHAPES[:3], ids=lambda s: "x".join(map(str, s)))
def test_triton_float64_computes_in_float64(shape):
    """An fp32 accumulation (or TF32 input rounding) would miss 1e-12 by eight orders."""
    args = _data(shape, torch.float64, seed=1)
    got = linear_relu_tangent(*args, backend="triton")
    ref = linear_relu_tangent_reference(*args)
    for g, r in zip(got, ref):
        assert g.dtype == torch.float64
        assert (g - r).abs().max() <= 1e-12 * r.abs().max().clamp_min(1)


def test_reference_is_the_layer_and_its_jvp():
    """out = relu(W h + b), and ṫ is the forward-mode derivative in direction (ḣ, V, ḃ)."""
    h, hd, W, V, b, bd = _data((2, 7, 5, 3), torch.float64, seed=2)
    for relu in (True, False):
        def f(hh, WW, bb):
            return linear_relu_tangent_reference(hh, None, WW, None, bb, None, relu)[0]
        out, jvp = torch.func.jvp(f, (h, W, b), (hd, V, bd))
        got, td = linear_relu_tangent_reference(h, hd, W, V, b, bd, relu)
        z = torch.einsum("koi,kin->kon", W, h) + b[..., None]
        assert torch.allclose(got, torch.relu(z) if relu else z, rtol=1e-13, atol=1e-13)
        assert torch.equal(got, out) and torch.allclose(td, jvp, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    """Both outputs, all six inputs; twice for the triton backend's plain-PyTorch backward."""
    args = [t.requires_grad_(True) for t in _data((1, 3, 2, 2), torch.float64, seed=3)]
    fn = lambda *a: linear_relu_tangent(*a, backend=backend)  # noqa: E731
    assert gradcheck(fn, args)
    if backend == "triton":
        assert gradgradcheck(fn, args, fast_mode=True)
        plain = lambda h, W, b: linear_relu_tangent(h, None, W, None, b, None, relu=False,  # noqa: E731
                                                    backend=backend)[0]
        assert gradcheck(plain, (args[0], args[2], args[4]))


@needs_triton
def test_guard_padding_noncontiguous_and_determinism():
    """Inputs are views into buffers full of 1e30: a read outside a view would show in the
    result; a transposed input is copied to contiguous memory first."""
    canary = 1e30
    args = _data((2, 40, 12, 10), seed=4)
    views = []
    for t in args:
        buf = torch.full((t.numel() + 512,), canary)
        buf[256:256 + t.numel()] = t.reshape(-1)
        views.append(buf[256:256 + t.numel()].view(t.shape))
    got = linear_relu_tangent(*views, backend="triton")
    again = linear_relu_tangent(*args, backend="triton")
    assert torch.equal(got[0], again[0]) and torch.equal(got[1], again[1])
    assert got[0].abs().max() < 1e3 and got[1].abs().max() < 1e3
    h_t = args[0].transpose(1, 2).contiguous().transpose(1, 2)     # same values, non-contiguous
    nc = linear_relu_tangent(h_t, *args[1:], backend="triton")
    assert torch.equal(nc[0], got[0]) and torch.equal(nc[1], got[1])


def test_auto_picks_reference_on_cpu():
    h, hd, W, V, b, bd = _data((1, 4, 3, 2))
    linear_relu_tangent(h, hd, W, V, b, bd)
    assert _backend.last_used("linear_relu_tangent").backend == "reference"


def test_shape_errors():
    h, hd, W, V, b, bd = _data((2, 4, 3, 5))
    with pytest.raises(ShapeError):
        linear_relu_tangent(h, hd, W, None, b, bd)                 # a partial tangent
    with pytest.raises(ShapeError):
        linear_relu_tangent(h, hd, W[:, :, :3], V, b, bd)          # F_in mismatch
    with pytest.raises(ShapeError):
        linear_relu_tangent(h, hd, W, V, b[:, :2], bd)             # bias per output
    with pytest.raises(ShapeError):
        linear_relu_tangent(h, hd.double(), W, V, b, bd)           # one dtype
    with pytest.raises(ShapeError):
        linear_relu_tangent(h.long(), None, W.long(), None, b.long(), None)


# ------------------------------------------------------------------------------- cuda backend
CUDA_OPS = ("fastdistill::linear_relu", "fastdistill::linear_relu_tangent")


def test_cuda_backend_is_cuda_only():
    """Forcing cuda on CPU tensors raises (no silent fallback); there is no cpp backend, and a
    built extension declares the ops without a CPU kernel (on CPU they run the reference)."""
    h, hd, W, V, b, bd = _data((1, 4, 3, 2))
    with pytest.raises(BackendUnavailableError, match="cuda"):
        linear_relu_tangent(h, hd, W, V, b, bd, backend="cuda")
    with pytest.raises(BackendUnavailableError, match="no cpp implementation"):
        linear_relu_tangent(h, hd, W, V, b, bd, backend="cpp")
    assert "cuda" in _backend.registered()[
        "linear_relu_tangent"] and "cpp" not in _backend.registered()["linear_relu_tangent"]
    if _backend.load_extension()[0] is not None:
        for op in CUDA_OPS:
            name = op.split("::")[1]
            assert str(getattr(torch.ops.fastdistill, name).default._schema).startswith(op + "(")
            assert not _backend.has_kernel(op, "CPU")


def _cuda_kernels():
    if not _backend.has_kernel("fastdistill::linear_relu_tangent", "CUDA"):
        pytest.skip("fastdistill._C was built without CUDA kernels")


@pytest.mark.cuda
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("shape", SHAPES + [(3, 70, 33, 65)], ids=lambda s: "x".join(map(str, s)))
def test_cuda_equals_reference(shape, relu):
    """float32 within 2× torch's own float32 error (both against float64), float64 to 1e-12;
    the plain layer equals the tangent kernel's out bitwise; reruns are bit-identical."""
    _cuda_kernels()
    for dtype in (torch.float32, torch.float64):
        args = _data(shape, dtype, seed=sum(shape) + relu)
        got = linear_relu_tangent(*(a.cuda() for a in args), relu=relu, backend="cuda")
        assert _backend.last_used("linear_relu_tangent").backend == "cuda"
        ref = linear_relu_tangent_reference(*args, relu)
        exact = linear_relu_tangent_reference(*[a.double() for a in args], relu)
        for g, r, e in zip(got, ref, exact):
            assert g.dtype == dtype and g.shape == e.shape and g.is_cuda
            if dtype == torch.float32:
                atol = 8 * EPS32 * e.abs().max().item()
                assert _err(g.cpu(), e) <= 2 * _err(r, e) + atol, (_err(g.cpu(), e), _err(r, e))
            else:
                assert _err(g.cpu(), e) <= 1e-12 * max(e.abs().max().item(), 1.0)
        again = linear_relu_tangent(*(a.cuda() for a in args), relu=relu, backend="cuda")
        assert torch.equal(again[0], got[0]) and torch.equal(again[1], got[1])
        out, none = linear_relu_tangent(args[0].cuda(), None, args[2].cuda(), None, args[4].cuda(),
                                        None, relu=relu, backend="cuda")
        assert none is None and torch.equal(out, got[0])


@pytest.mark.cuda
def test_cuda_guard_padding_noncontiguous_and_determinism():
    """Inputs are views into CUDA buffers full of 1e30 and outputs land in fresh tensors: a read
    outside a view would show in the result; a transposed input is copied first."""
    _cuda_kernels()
    canary = 1e30
    args = [a.cuda() for a in _data((2, 70, 33, 65), seed=4)]
    views = []
    for t in args:
        buf = torch.full((t.numel() + 512,), canary, device="cuda")
        buf[256:256 + t.numel()] = t.reshape(-1)
        views.append(buf[256:256 + t.numel()].view(t.shape))
    got = linear_relu_tangent(*views, backend="cuda")
    again = linear_relu_tangent(*args, backend="cuda")
    assert torch.equal(got[0], again[0]) and torch.equal(got[1], again[1])
    assert got[0].abs().max() < 1e3 and got[1].abs().max() < 1e3
    h_t = args[0].transpose(1, 2).contiguous().transpose(1, 2)
    nc = linear_relu_tangent(h_t, *args[1:], backend="cuda")
    assert torch.equal(nc[0], got[0]) and torch.equal(nc[1], got[1])


@pytest.mark.cuda
def test_cuda_gradcheck_and_opcheck():
    """The cuda ops' dispatcher-level autograd (plain-PyTorch backward) is right to second
    order, and both ops are registered correctly (schema, fake kernel, autograd)."""
    _cuda_kernels()
    args = [t.cuda().requires_grad_(True) for t in _data((1, 3, 2, 2), torch.float64, seed=3)]
    fn = lambda *a: linear_relu_tangent(*a, backend="cuda")  # noqa: E731
    assert gradcheck(fn, args)
    assert gradgradcheck(fn, args, fast_mode=True)
    plain = lambda h, W, b: linear_relu_tangent(h, None, W, None, b, None, relu=False,  # noqa: E731
                                                backend="cuda")[0]
    assert gradcheck(plain, (args[0], args[2], args[4]))
    h, hd, W, V, b, bd = [t.detach().cuda() for t in _data((2, 17, 5, 13), torch.float64, seed=5)]
    ops = torch.ops.fastdistill
    for relu in (True, False):
        torch.library.opcheck(ops.linear_relu.default,
                              (h.requires_grad_(True), W.requires_grad_(True), b, relu))
        torch.library.opcheck(ops.linear_relu_tangent.default,
                              (h, hd.requires_grad_(True), W, V, b, bd, relu))


@pytest.mark.cuda
def test_cuda_entry_points_check_their_arguments():
    _cuda_kernels()
    h, hd, W, V, b, bd = [t.cuda() for t in _data((2, 4, 3, 5))]
    ops = torch.ops.fastdistill
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.linear_relu(h.transpose(1, 2).contiguous().transpose(1, 2), W, b, True)
    with pytest.raises(RuntimeError, match="W must be"):
        ops.linear_relu(h, W[:, :, :3].contiguous(), b, True)
    with pytest.raises(RuntimeError, match="shape of W"):
        ops.linear_relu_tangent(h, hd, W, V[:, :2].contiguous(), b, bd, True)
    with pytest.raises(RuntimeError, match="CUDA tensor"):
        ops.linear_relu(h.cpu(), W, b, True)
