"""pool2_relu (+ tangent, backward): every backend equals the reference (forward and tangent
bitwise, including ties and NaN; backward's bias sum to round-off), matches autograd through
relu→max_pool2d, registered correctly (opcheck), in bounds and deterministic."""
import os

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

from fastdistill import _backend
from fastdistill.errors import ShapeError
from fastdistill.ops.pool2_relu import (pool2_relu, pool2_relu_backward, pool2_relu_backward_reference,
                                        pool2_relu_reference, pool2_relu_tangent,
                                        pool2_relu_tangent_reference)

CPP = _backend.has_kernel("fastdistill::pool2_relu", "CPU")
# triton runs CPU tensors only under the interpreter (conftest sets it without a GPU); the CUDA
# path of the triton backend is tested in tests/test_kernels_triton.py
TRITON = _backend._triton_module()[0] is not None and os.environ.get("TRITON_INTERPRET") == "1"
BACKENDS = ["reference",
            pytest.param("cpp", marks=pytest.mark.skipif(not CPP, reason="fastdistill._C without pool2_relu")),
            pytest.param("triton", marks=pytest.mark.skipif(not TRITON, reason="no triton interpreter"))]
# (P, M, H, W): one plane, a prime count, LeNet's conv1 (K=16: 96 planes) and conv2 maps
SHAPES = [(1, 1, 2, 2), (7, 3, 6, 10), (96, 10, 28, 28), (256, 10, 10, 10)]


@pytest.fixture(autouse=True)
def _no_forced_backend(monkeypatch):
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)


def _data(shape, dtype, seed=0, ties=False):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(shape, generator=g, dtype=dtype)
    if ties:  # exact ties (MNIST's zero background through a conv) and a NaN
        z[0, 0, :2, :] = 0.0
        if z.shape[2] >= 4:
            z[-1, -1, 2, 0] = float("nan")
    b = torch.randn(shape[0], generator=g, dtype=dtype)
    return z, b, g


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_equals_reference(backend, dtype, shape):
    z, b, g = _data(shape, dtype, ties=True)
    a, idx = pool2_relu(z, b, backend=backend)
    ra, ridx = pool2_relu_reference(z, b)
    assert torch.equal(idx, ridx)
    assert torch.equal(a.isnan(), ra.isnan()) and torch.equal(a.nan_to_num(), ra.nan_to_num())
    a, idx = ra.nan_to_num(), ridx               # the tangent/backward at a finite point
    zd, bd = torch.randn(z.shape, generator=g, dtype=dtype), torch.randn(b.shape, generator=g, dtype=dtype)
    assert torch.equal(pool2_relu_tangent(zd, bd, idx, a, backend=backend),
                       pool2_relu_tangent_reference(zd, bd, idx, a))
    d = torch.randn((2,) + tuple(a.shape), generator=g, dtype=dtype)
    dz, db = pool2_relu_backward(d, idx, a, backend=backend)
    rdz, rdb = pool2_relu_backward_reference(d, idx, a)
    assert torch.equal(dz, rdz)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert (db - rdb).abs().max() <= tol * rdb.abs().max().clamp_min(1)
    assert _backend.last_used("pool2_relu_backward").backend == backend


def test_reference_equals_relu_then_pool_with_autograd():
    """pool-then-ReLU with the bias after the pool is the network's ReLU(conv + b) → max-pool,
    in values and (first-maximum subgradient) in gradients, ties included."""
    z, b, g = _data((5, 3, 8, 8), torch.float64, seed=1, ties=False)
    z[0, 0, :4, :4] = 0.0
    zz, bb = z.clone().requires_grad_(True), b.clone().requires_grad_(True)
    out = F.max_pool2d(F.relu(zz + bb.view(-1, 1, 1, 1)), 2)
    d = torch.randn(out.shape, generator=g, dtype=torch.float64)
    gz, gb = torch.autograd.grad(out, [zz, bb], d)
    a, idx = pool2_relu_reference(z, b)
    assert torch.equal(a, out.detach())
    dz, db = pool2_relu_backward_reference(d.unsqueeze(0), idx, a)
    assert torch.equal(dz[0], gz) and torch.allclose(db[0], gb, rtol=1e-14, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tangent_and_gradcheck_float64(backend):
    z, b, g = _data((3, 2, 4, 6), torch.float64, seed=2)
    zd, bd = torch.randn(z.shape, generator=g, dtype=z.dtype), torch.randn(b.shape, generator=g, dtype=z.dtype)
    a, idx = pool2_relu(z, b, backend=backend)
    _, jvp = torch.func.jvp(lambda zz, bb: pool2_relu_reference(zz, bb)[0], (z, b), (zd, bd))
    assert torch.allclose(pool2_relu_tangent(zd, bd, idx, a, backend=backend), jvp, rtol=1e-14, atol=0)
    fn = lambda zz, bb: pool2_relu(zz, bb, backend=backend)[0]  # noqa: E731
    # fast mode (random projections) under the interpreter: a full Jacobian takes ~300 launches
    assert gradcheck(fn, (z.requires_grad_(True), b.requires_grad_(True)), fast_mode=backend == "triton")


@pytest.mark.skipif(not CPP, reason="fastdistill._C without pool2_relu")
def test_opcheck():
    z, b, g = _data((3, 2, 4, 6), torch.float64, seed=3)
    a, idx = pool2_relu(z, b)
    torch.library.opcheck(torch.ops.fastdistill.pool2_relu.default,
                          (z.clone().requires_grad_(True), b.clone().requires_grad_(True)))
    torch.library.opcheck(torch.ops.fastdistill.pool2_relu_tangent.default, (torch.randn_like(z), b, idx, a))
    torch.library.opcheck(torch.ops.fastdistill.pool2_relu_backward.default,
                          (torch.randn((2,) + tuple(a.shape), dtype=a.dtype), idx, a))


@pytest.mark.parametrize("backend", BACKENDS)
def test_guard_padding_and_determinism(backend):
    canary = 1e30
    z, b, g = _data((96, 10, 28, 28), torch.float32, seed=4)
    buf = torch.full((z.numel() + 2048,), canary)
    buf[1024:1024 + z.numel()] = z.reshape(-1)
    view = buf[1024:1024 + z.numel()].view(z.shape)
    a, idx = pool2_relu(view, b, backend=backend)
    ra, ridx = pool2_relu_reference(z, b)
    assert torch.equal(a, ra) and torch.equal(idx, ridx)
    assert (buf[:1024] == canary).all() and (buf[-1024:] == canary).all()
    d = torch.randn((2,) + tuple(a.shape), generator=g)
    one, two = pool2_relu_backward(d, idx, a, backend=backend), pool2_relu_backward(d, idx, a, backend=backend)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


def test_shape_errors():
    z, b, _ = _data((2, 3, 4, 4), torch.float32)
    a, idx = pool2_relu(z, b)
    with pytest.raises(ShapeError):
        pool2_relu(torch.zeros(2, 3, 5, 4), b)            # odd height
    with pytest.raises(ShapeError):
        pool2_relu(z, b[:1])                               # bias per plane
    with pytest.raises(ShapeError):
        pool2_relu_tangent(z[:, :, :2], b, idx, a)         # zd of the wrong size
    with pytest.raises(ShapeError):
        pool2_relu_backward(a, idx, a)                     # d without its stack dimension
    with pytest.raises(ShapeError):
        pool2_relu_backward(a.unsqueeze(0), idx.int(), a)  # idx must be int64


@pytest.mark.skipif(not CPP, reason="fastdistill._C without pool2_relu")
def test_cpp_entry_points_check_their_arguments():
    z, b, _ = _data((2, 3, 4, 4), torch.float32)
    a, idx = pool2_relu(z, b)
    with pytest.raises(RuntimeError, match="even"):
        torch.ops.fastdistill.pool2_relu(torch.zeros(2, 3, 5, 4), b)
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.fastdistill.pool2_relu(z.transpose(2, 3), b)
    with pytest.raises(RuntimeError, match="idx out of range"):
        torch.ops.fastdistill.pool2_relu_backward(a.unsqueeze(0), idx + 100, a)
    with pytest.raises(RuntimeError, match="int64"):
        torch.ops.fastdistill.pool2_relu_tangent(z, b, idx.int(), a)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_equals_reference(dtype):
    if not _backend.has_kernel("fastdistill::pool2_relu", "CUDA"):
        pytest.skip("fastdistill._C was built without CUDA kernels")
    for shape in SHAPES:
        z, b, g = _data(shape, dtype, ties=True)
        a, idx = pool2_relu(z.cuda(), b.cuda(), backend="cuda")
        ra, ridx = pool2_relu_reference(z, b)
        assert torch.equal(idx.cpu(), ridx) and torch.equal(a.cpu().nan_to_num(), ra.nan_to_num())
        a, idx = ra.nan_to_num(), ridx
        zd, bd = torch.randn(z.shape, generator=g, dtype=dtype), torch.randn(b.shape, generator=g, dtype=dtype)
        got = pool2_relu_tangent(zd.cuda(), bd.cuda(), idx.cuda(), a.cuda(), backend="cuda")
        assert torch.equal(got.cpu(), pool2_relu_tangent_reference(zd, bd, idx, a))
        d = torch.randn((2,) + tuple(a.shape), generator=g, dtype=dtype)
        dz, db = pool2_relu_backward(d.cuda(), idx.cuda(), a.cuda(), backend="cuda")
        rdz, rdb = pool2_relu_backward_reference(d, idx, a)
        assert torch.equal(dz.cpu(), rdz)
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        assert (db.cpu() - rdb).abs().max() <= tol * rdb.abs().max().clamp_min(1)
        again = pool2_relu_backward(d.cuda(), idx.cuda(), a.cuda(), backend="cuda")
        assert torch.equal(again[1], db)                                     # deterministic
