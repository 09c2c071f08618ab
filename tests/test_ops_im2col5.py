"""im2col5 / col2im5: every backend equals the reference bitwise, is the adjoint, differentiable,
registered correctly (opcheck), stays inside its buffers and is deterministic."""
import os

import pytest
import torch
from torch.autograd import gradcheck

from fastdistill import _backend
from fastdistill.errors import ShapeError
from fastdistill.ops.im2col5 import col2im5, col2im5_reference, im2col5, im2col5_reference

CPP = _backend.has_kernel("fastdistill::im2col5", "CPU")
# triton runs CPU tensors only under the interpreter (conftest sets it without a GPU); the CUDA
# path of the triton backend is tested in tests/test_kernels_triton.py
TRITON = _backend._triton_module()[0] is not None and os.environ.get("TRITON_INTERPRET") == "1"
BACKENDS = ["reference",
            pytest.param("cpp", marks=pytest.mark.skipif(not CPP, reason="fastdistill._C without im2col5")),
            pytest.param("triton", marks=pytest.mark.skipif(not TRITON, reason="no triton interpreter"))]
# (B, C, M, H, W, pad): ones, a prime, LeNet's conv1 (28 px, pad 2) and conv2 (14 px) planes
SHAPES = [(1, 1, 1, 5, 5, 0), (2, 3, 7, 9, 11, 1), (3, 1, 4, 28, 28, 2), (4, 12, 10, 14, 14, 0),
          (1, 3, 2, 32, 32, 0)]


@pytest.fixture(autouse=True)
def _no_forced_backend(monkeypatch):
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)


def _data(shape, dtype, seed=0):
    B, C, M, H, W, pad = shape
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(B, C, M, H, W, generator=g, dtype=dtype)
    d = torch.randn(B, C * 25, M * (H + 2 * pad - 4) * (W + 2 * pad - 4), generator=g, dtype=dtype)
    return a, d, pad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_equals_reference_bitwise(backend, dtype, shape):
    a, d, pad = _data(shape, dtype)
    u = im2col5(a, pad, backend=backend)
    assert _backend.last_used("im2col5").backend == backend
    assert torch.equal(u, im2col5_reference(a, pad))
    H, W = shape[3:5]
    assert torch.equal(col2im5(d, H, W, pad, backend=backend), col2im5_reference(d, H, W, pad))


def test_reference_is_unfold_and_adjoint():
    """The reference itself against F.unfold, and ⟨im2col a, d⟩ = ⟨a, col2im d⟩ (float64)."""
    a, d, pad = _data((2, 3, 4, 9, 8, 2), torch.float64, seed=1)
    B, C, M, H, W = a.shape
    u = im2col5_reference(a, pad)
    Ho, Wo = H + 2 * pad - 4, W + 2 * pad - 4
    ref = torch.nn.functional.unfold(a.reshape(B * C, M, H, W).transpose(0, 1).reshape(M, B * C, H, W),
                                     5, padding=pad)            # [M, B·C·25, Ho·Wo]
    ref = ref.reshape(M, B, C * 25, Ho * Wo).permute(1, 2, 0, 3).reshape(B, C * 25, M * Ho * Wo)
    assert torch.equal(u, ref)
    lhs, rhs = (u * d).sum(), (a * col2im5_reference(d, H, W, pad)).sum()
    assert abs(float(lhs - rhs)) < 1e-12 * float(d.abs().sum())


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    a, d, pad = _data((1, 1, 2, 5, 6, 1), torch.float64, seed=2)
    fast = backend == "triton"   # random projections: a full Jacobian is ~1000 interpreter launches
    assert gradcheck(lambda t: im2col5(t, pad, backend=backend), (a.requires_grad_(True),), fast_mode=fast)
    assert gradcheck(lambda t: col2im5(t, 5, 6, pad, backend=backend), (d.requires_grad_(True),),
                     fast_mode=fast)


@pytest.mark.skipif(not CPP, reason="fastdistill._C without im2col5")
def test_opcheck():
    a, d, pad = _data((1, 2, 2, 6, 6, 0), torch.float64, seed=3)
    torch.library.opcheck(torch.ops.fastdistill.im2col5.default, (a.requires_grad_(True), pad))
    torch.library.opcheck(torch.ops.fastdistill.col2im5.default, (d.requires_grad_(True), 6, 6, pad))


@pytest.mark.parametrize("backend", BACKENDS)
def test_guard_padding_and_noncontiguous_input(backend):
    """Inputs are views into buffers with canaries around them: a read outside the view would
    change the result, a write would change the canaries."""
    canary = 1e30
    a, d, pad = _data((2, 3, 4, 14, 14, 2), torch.float32, seed=4)
    buf = torch.full((a.numel() + 2048,), canary)
    buf[1024:1024 + a.numel()] = a.reshape(-1)
    view = buf[1024:1024 + a.numel()].view(a.shape)
    assert torch.equal(im2col5(view, pad, backend=backend), im2col5_reference(a, pad))
    dbuf = torch.full((d.numel() + 2048,), canary)
    dbuf[1024:1024 + d.numel()] = d.reshape(-1)
    dview = dbuf[1024:1024 + d.numel()].view(d.shape)
    assert torch.equal(col2im5(dview, 14, 14, pad, backend=backend), col2im5_reference(d, 14, 14, pad))
    assert (buf[:1024] == canary).all() and (buf[-1024:] == canary).all()
    assert (dbuf[:1024] == canary).all() and (dbuf[-1024:] == canary).all()
    at = a.transpose(3, 4).contiguous().transpose(3, 4)   # same values, non-contiguous
    assert torch.equal(im2col5(at, pad, backend=backend), im2col5_reference(a, pad))


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend):
    a, d, pad = _data((4, 6, 10, 14, 14, 0), torch.float32, seed=5)
    assert torch.equal(col2im5(d, 14, 14, 0, backend=backend), col2im5(d, 14, 14, 0, backend=backend))
    assert torch.equal(im2col5(a, 0, backend=backend), im2col5(a, 0, backend=backend))


def test_shape_errors():
    with pytest.raises(ShapeError):
        im2col5(torch.zeros(1, 1, 4, 4))                       # not 5-D
    with pytest.raises(ShapeError):
        im2col5(torch.zeros(1, 1, 1, 4, 4))                    # smaller than the kernel
    with pytest.raises(ShapeError):
        im2col5(torch.zeros(1, 1, 1, 8, 8, dtype=torch.long))
    with pytest.raises(ShapeError):
        col2im5(torch.zeros(1, 24, 16), 8, 8)                  # 24 is not C·25
    with pytest.raises(ShapeError):
        col2im5(torch.zeros(1, 25, 15), 8, 8)                  # 15 is not M·4·4


@pytest.mark.skipif(not CPP, reason="fastdistill._C without im2col5")
def test_cpp_entry_points_check_their_arguments():
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.fastdistill.im2col5(torch.zeros(1, 1, 1, 8, 8).transpose(3, 4), 0)
    with pytest.raises(RuntimeError, match="dimensions"):
        torch.ops.fastdistill.im2col5(torch.zeros(1, 8, 8), 0)
    with pytest.raises(RuntimeError, match="C·25"):
        torch.ops.fastdistill.col2im5(torch.zeros(1, 24, 16), 8, 8, 0)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        torch.ops.fastdistill.col2im5(torch.zeros(1, 25, 16, dtype=torch.int32), 8, 8, 0)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_equals_reference_bitwise(dtype):
    if not _backend.has_kernel("fastdistill::im2col5", "CUDA"):
        pytest.skip("fastdistill._C was built without CUDA kernels")
    for shape in SHAPES:
        a, d, pad = _data(shape, dtype)
        H, W = shape[3:5]
        u = im2col5(a.cuda(), pad, backend="cuda")
        assert torch.equal(u.cpu(), im2col5_reference(a, pad))
        c = col2im5(d.cuda(), H, W, pad, backend="cuda")
        assert torch.equal(c.cpu(), col2im5_reference(d, H, W, pad))
        assert torch.equal(c, col2im5(d.cuda(), H, W, pad, backend="cuda"))   # deterministic
