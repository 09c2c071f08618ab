"""maxpool3s2 (+ tangent, backward): every backend equals the reference bitwise (ties, -inf and
NaN included), the references equal autograd of F.max_pool2d(·, 3, 2, 1), registered correctly
(opcheck), in bounds, deterministic, and bad arguments fail clearly."""
import doctest
import importlib

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

from fastdistill import _backend
from fastdistill.errors import ShapeError
from fastdistill.ops.maxpool3s2 import (maxpool3s2, maxpool3s2_backward, maxpool3s2_backward_reference,
                                        maxpool3s2_reference, maxpool3s2_tangent,
                                        maxpool3s2_tangent_reference, pooled_size)

CPP = _backend.has_kernel("fastdistill::maxpool3s2", "CPU")
BACKENDS = ["reference",
            pytest.param("cpp", marks=pytest.mark.skipif(not CPP, reason="fastdistill._C without maxpool3s2"))]
# (P, M, H, W): ones, a 2×1 plane, primes (odd sizes: the last window hangs over the edge), a
# power of two, and AlexCifarNet on CIFAR (64 channels, M = 2): conv1 32×32 -> 16×16, conv2 16×16 -> 8×8
SHAPES = [(1, 1, 1, 1), (1, 1, 2, 1), (7, 3, 11, 13), (4, 2, 8, 8), (64, 2, 32, 32), (64, 2, 16, 16)]


@pytest.fixture(autouse=True)
def _no_forced_backend(monkeypatch):
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)


def _data(shape, dtype, seed=0, special=False):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(shape, generator=g, dtype=dtype)
    if special and shape[2] >= 4 and shape[3] >= 4:
        z[0, 0, :3, :] = 0.0                          # exact ties (ReLU's zeros)
        z[-1, -1, :4, :4] = float("-inf")             # windows of -inf only (edge and interior)
        z[-1, -2, :3, :3] = -0.0                      # ±0 ties: the first zero wins, sign kept
        z[-1, -2, 1, 1] = 0.0
        z[-1, 0, 1, 1] = z[-1, 0, 2, 2] = float("nan")  # two NaNs in one window: the last wins
        z[0, -1, 3, 0] = z[0, -1, 3, 1]                # a tie across two windows
    return z, g


def _same(a, b):
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_equals_reference_bitwise(backend, dtype, shape):
    z, g = _data(shape, dtype, special=True)
    p, idx = maxpool3s2(z, backend=backend)
    rp, ridx = maxpool3s2_reference(z)
    assert p.shape == (shape[0], shape[1], pooled_size(shape[2]), pooled_size(shape[3]))
    assert torch.equal(idx, ridx) and _same(p, rp)
    zd = torch.randn(z.shape, generator=g, dtype=dtype)
    assert torch.equal(maxpool3s2_tangent(zd, idx, backend=backend), maxpool3s2_tangent_reference(zd, idx))
    d = torch.randn((2,) + tuple(p.shape), generator=g, dtype=dtype)
    H, W = shape[2:]
    assert torch.equal(maxpool3s2_backward(d, idx, H, W, backend=backend),
                       maxpool3s2_backward_reference(d, idx, H, W))
    assert _backend.last_used("maxpool3s2_backward").backend == backend


def test_reference_is_max_pool2d_and_its_derivatives():
    """The references against F.max_pool2d(z, 3, 2, 1): values, forward-mode tangent and
    reverse-mode gradient (the overlapping windows' sums), with ties, in float64."""
    z, g = _data((5, 3, 9, 8), torch.float64, seed=1)
    z[0, 0, :4, :4] = 0.0
    p, idx = maxpool3s2_reference(z)
    assert torch.equal(p, F.max_pool2d(z, 3, 2, 1))
    zd = torch.randn(z.shape, generator=g, dtype=z.dtype)
    _, jvp = torch.func.jvp(lambda t: F.max_pool2d(t, 3, 2, 1), (z,), (zd,))
    assert torch.equal(maxpool3s2_tangent_reference(zd, idx), jvp)
    zz = z.clone().requires_grad_(True)
    d = torch.randn(p.shape, generator=g, dtype=z.dtype)
    (gz,) = torch.autograd.grad(F.max_pool2d(zz, 3, 2, 1), zz, d)
    assert torch.equal(maxpool3s2_backward_reference(d.unsqueeze(0), idx, 9, 8)[0], gz)
    assert (gz != 0).sum() < d.numel()   # the windows overlap: some pixels won twice


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    z, g = _data((2, 2, 5, 6), torch.float64, seed=2)
    assert gradcheck(lambda t: maxpool3s2(t, backend=backend)[0], (z.requires_grad_(True),))
    p, idx = maxpool3s2_reference(z.detach())
    d = torch.randn((2,) + tuple(p.shape), generator=g, dtype=z.dtype, requires_grad=True)
    assert gradcheck(lambda t: maxpool3s2_backward(t, idx, 5, 6, backend=backend), (d,))
    zd = torch.randn(z.shape, generator=g, dtype=z.dtype, requires_grad=True)
    assert gradcheck(lambda t: maxpool3s2_tangent(t, idx, backend=backend), (zd,))


@pytest.mark.skipif(not CPP, reason="fastdistill._C without maxpool3s2")
def test_opcheck():
    z, g = _data((3, 2, 5, 6), torch.float64, seed=3)
    p, idx = maxpool3s2(z)
    torch.library.opcheck(torch.ops.fastdistill.maxpool3s2.default, (z.clone().requires_grad_(True),))
    torch.library.opcheck(torch.ops.fastdistill.maxpool3s2_tangent.default,
                          (torch.randn_like(z).requires_grad_(True), idx))
    torch.library.opcheck(torch.ops.fastdistill.maxpool3s2_backward.default,
                          (torch.randn((2,) + tuple(p.shape), dtype=p.dtype, requires_grad=True), idx, 5, 6))


def _in_guarded_buffer(t, canary=1e30, pad=1024):
    buf = torch.full((t.numel() + 2 * pad,), canary, dtype=t.dtype)
    buf[pad:pad + t.numel()] = t.reshape(-1)
    return buf, buf[pad:pad + t.numel()].view(t.shape)


@pytest.mark.parametrize("backend", BACKENDS)
def test_guard_padding_and_determinism(backend):
    """Inputs are views into buffers with canaries around them: a read outside the view would
    change the result, a write outside would change a canary. Two runs are bit-identical."""
    canary = 1e30
    z, g = _data((64, 2, 32, 32), torch.float32, seed=4, special=True)
    zbuf, zview = _in_guarded_buffer(z, canary)
    p, idx = maxpool3s2(zview, backend=backend)
    rp, ridx = maxpool3s2_reference(z)
    assert torch.equal(idx, ridx) and _same(p, rp)
    zd = torch.randn(z.shape, generator=g)
    dbuf, zdview = _in_guarded_buffer(zd, canary)
    assert torch.equal(maxpool3s2_tangent(zdview, idx, backend=backend), maxpool3s2_tangent_reference(zd, idx))
    d = torch.randn((2,) + tuple(p.shape), generator=g)
    gbuf, gview = _in_guarded_buffer(d, canary)
    one = maxpool3s2_backward(gview, idx, 32, 32, backend=backend)
    two = maxpool3s2_backward(gview, idx, 32, 32, backend=backend)
    assert torch.equal(one, two) and torch.equal(one, maxpool3s2_backward_reference(d, idx, 32, 32))
    for buf in (zbuf, dbuf, gbuf):
        assert (buf[:1024] == canary).all() and (buf[-1024:] == canary).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_input_is_handled(backend):
    z, g = _data((3, 2, 9, 7), torch.float64, seed=5)
    zt = z.transpose(2, 3)                            # a [3, 2, 7, 9] view, not contiguous
    p, idx = maxpool3s2(zt, backend=backend)
    rp, ridx = maxpool3s2_reference(zt.contiguous())
    assert torch.equal(p, rp) and torch.equal(idx, ridx)
    d = torch.randn((1, 3, 2, idx.shape[3], idx.shape[2]), generator=g, dtype=z.dtype).transpose(3, 4)
    assert torch.equal(maxpool3s2_backward(d, idx, 7, 9, backend=backend),
                       maxpool3s2_backward_reference(d.contiguous(), idx, 7, 9))


def test_shape_errors():
    z, _ = _data((2, 3, 5, 4), torch.float32)
    p, idx = maxpool3s2(z)
    with pytest.raises(ShapeError, match="4 dimensions"):
        maxpool3s2(z[0])
    with pytest.raises(ShapeError, match="float32/float64"):
        maxpool3s2(z.to(torch.float16))
    with pytest.raises(ShapeError, match="idx must be"):
        maxpool3s2_tangent(z[:, :, :2], idx)            # zd of the wrong size
    with pytest.raises(ShapeError, match="int64"):
        maxpool3s2_tangent(z, idx.int())
    with pytest.raises(ShapeError, match="d must be"):
        maxpool3s2_backward(p, idx, 5, 4)               # d without its stack dimension
    with pytest.raises(ShapeError, match="does not pool"):
        maxpool3s2_backward(p.unsqueeze(0), idx, 7, 4)  # 7 rows pool to 4, not 3


@pytest.mark.skipif(not CPP, reason="fastdistill._C without maxpool3s2")
def test_cpp_entry_points_check_their_arguments():
    z, _ = _data((2, 3, 5, 4), torch.float32)
    p, idx = maxpool3s2(z)
    ops = torch.ops.fastdistill
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.maxpool3s2(z.transpose(2, 3))
    with pytest.raises(RuntimeError, match="float32 or float64"):
        ops.maxpool3s2(z.half())
    with pytest.raises(RuntimeError, match="idx out of range"):
        ops.maxpool3s2_tangent(z, idx + 100)
    bad = idx.clone()
    bad[1, 2, 2, 1] = 20                                # one past the 5×4 plane
    with pytest.raises(RuntimeError, match="idx out of range"):
        ops.maxpool3s2_backward(p.unsqueeze(0), bad, 5, 4)
    bad[1, 2, 2, 1] = 0                                 # in the plane, outside its window: the
    assert torch.equal(ops.maxpool3s2_backward(p.unsqueeze(0), bad, 5, 4),   # reference's sum
                       maxpool3s2_backward_reference(p.unsqueeze(0), bad, 5, 4))
    with pytest.raises(RuntimeError, match="does not pool"):
        ops.maxpool3s2_backward(p.unsqueeze(0), idx, 7, 4)
    with pytest.raises(RuntimeError, match="int64"):
        ops.maxpool3s2_tangent(z, idx.int())


def test_docstring_examples():
    mod = importlib.import_module("fastdistill.ops.maxpool3s2")  # the package re-exports the function
    res = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert res.attempted > 0 and res.failed == 0


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_equals_reference(dtype):
    if not _backend.has_kernel("fastdistill::maxpool3s2", "CUDA"):
        pytest.skip("fastdistill._C was built without CUDA kernels")
    for shape in SHAPES:
        z, g = _data(shape, dtype, special=True)
        p, idx = maxpool3s2(z.cuda(), backend="cuda")
        rp, ridx = maxpool3s2_reference(z)
        assert torch.equal(idx.cpu(), ridx) and _same(p.cpu(), rp)
        zd = torch.randn(z.shape, generator=g, dtype=dtype)
        got = maxpool3s2_tangent(zd.cuda(), idx, backend="cuda")
        assert torch.equal(got.cpu(), maxpool3s2_tangent_reference(zd, ridx))
        d = torch.randn((2,) + tuple(rp.shape), generator=g, dtype=dtype)
        H, W = shape[2:]
        dz = maxpool3s2_backward(d.cuda(), idx, H, W, backend="cuda")
        assert torch.equal(dz.cpu(), maxpool3s2_backward_reference(d, ridx, H, W))
        assert torch.equal(maxpool3s2_backward(d.cuda(), idx, H, W, backend="cuda"), dz)  # deterministic
