"""The Triton kernels beyond the per-op tests. On CPU (interpreter): the multi-program paths
(tails, partial sums, packed small planes) with the blocks shrunk, max-pool edge values (±inf,
several NaN, signed zeros), and the triton backends' higher-order derivatives (their backward
passes call each other). On CUDA (marked ``cuda``, skipped without a GPU): every triton op on
device tensors against the CPU reference, in the precision each promises."""
import os

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

from fastdistill import _backend

triton = pytest.importorskip("triton")

# CPU tensors reach triton only through the interpreter (conftest sets it without a GPU)
interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="CPU tensors need the Triton interpreter")

from fastdistill.ops.ce_head import ce_head, ce_head_reference  # noqa: E402
from fastdistill.ops.im2col5 import col2im5, col2im5_reference, im2col5, im2col5_reference  # noqa: E402
from fastdistill.ops.linear_relu_tangent import (linear_relu_tangent,  # noqa: E402
                                                 linear_relu_tangent_reference)
from fastdistill.ops.pool2_relu import (pool2_relu, pool2_relu_backward,  # noqa: E402
                                        pool2_relu_backward_reference, pool2_relu_reference,
                                        pool2_relu_tangent, pool2_relu_tangent_reference)


@pytest.fixture(autouse=True)
def _no_forced_backend(monkeypatch):
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)


def _same(x, y):
    return torch.equal(x.isnan(), y.isnan()) and torch.equal(x.nan_to_num(), y.nan_to_num())


@interpreted
@pytest.mark.parametrize("block", [64, 8])
@pytest.mark.parametrize("shape", [(3, 5, 6, 10), (13, 2, 2, 2)], ids=lambda s: "x".join(map(str, s)))
def test_pool2_relu_many_programs(monkeypatch, block, shape):
    """BLOCK 64/8: forward and tangent over many programs with a tail; the backward with several
    column blocks per plane (75 outputs) or several planes per program (1 output each)."""
    from fastdistill._kernels import pool2_relu as kernels
    monkeypatch.setattr(kernels, "BLOCK", block)
    g = torch.Generator().manual_seed(block)
    z, b = torch.randn(shape, generator=g), torch.randn(shape[0], generator=g)
    a, idx = pool2_relu(z, b, backend="triton")
    ra, ridx = pool2_relu_reference(z, b)
    assert torch.equal(a, ra) and torch.equal(idx, ridx)
    zd, bd = torch.randn(z.shape, generator=g), torch.randn(b.shape, generator=g)
    assert torch.equal(pool2_relu_tangent(zd, bd, idx, a, backend="triton"),
                       pool2_relu_tangent_reference(zd, bd, idx, a))
    d = torch.randn((2,) + tuple(a.shape), generator=g)
    dz, db = pool2_relu_backward(d, idx, a, backend="triton")
    rdz, rdb = pool2_relu_backward_reference(d, idx, a)
    assert torch.equal(dz, rdz)
    assert (db - rdb).abs().max() <= 1e-5 * rdb.abs().max().clamp_min(1)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_pool2_relu_edge_values(dtype):
    """Windows of ±inf, two NaNs (max_pool2d keeps the last), −0.0 against +0.0 (a tie: the
    first wins), all equal; the ReLU of −inf is NaN in the reference (−inf · 0) and here."""
    inf, nan = float("inf"), float("nan")
    wins = [[-inf, -inf, -inf, -inf], [1.0, inf, inf, 2.0], [nan, 1.0, nan, 3.0],
            [-0.0, 0.0, 0.0, -0.0], [2.0, 2.0, 2.0, 2.0], [-1.0, -3.0, -2.0, -1.0]]
    z = torch.tensor(wins, dtype=dtype).view(-1, 2, 2)            # 6 windows side by side
    z = torch.cat(list(z), 1).view(1, 1, 2, 12)
    for bias in (0.0, 1.5, -2.5):
        b = torch.tensor([bias], dtype=dtype)
        a, idx = pool2_relu(z, b, backend="triton")
        ra, ridx = pool2_relu_reference(z, b)
        assert torch.equal(idx, ridx), (idx, ridx)
        assert _same(a, ra), (a, ra)


@interpreted
def test_pool2_relu_higher_order_float64():
    """The forward's backward is the triton backward, whose own backward is the triton tangent:
    gradgradcheck exercises all three; the tangent and the backward are checked on their own."""
    g = torch.Generator().manual_seed(5)
    z = torch.randn(2, 2, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, generator=g, dtype=torch.float64, requires_grad=True)
    fn = lambda zz, bb: pool2_relu(zz, bb, backend="triton")[0]  # noqa: E731
    assert gradgradcheck(fn, (z, b), fast_mode=True)
    a, idx = pool2_relu_reference(z.detach(), b.detach())
    zd = torch.randn(z.shape, generator=g, dtype=torch.float64, requires_grad=True)
    bd = torch.randn(b.shape, generator=g, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda u, v: pool2_relu_tangent(u, v, idx, a, backend="triton"), (zd, bd),
                     fast_mode=True)
    d = torch.randn((2,) + tuple(a.shape), generator=g, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda u: pool2_relu_backward(u, idx, a, backend="triton"), (d,),
                     fast_mode=True)


@interpreted
@pytest.mark.parametrize("shape", [(2, 3, 3, 7, 9, 1), (1, 1, 1, 5, 5, 2)],
                         ids=lambda s: "x".join(map(str, s)))
def test_im2col5_many_programs(monkeypatch, shape):
    from fastdistill._kernels import im2col5 as kernels
    monkeypatch.setattr(kernels, "BLOCK", 128)
    B, C, M, H, W, pad = shape
    g = torch.Generator().manual_seed(6)
    a = torch.randn(B, C, M, H, W, generator=g)
    d = torch.randn(B, C * 25, M * (H + 2 * pad - 4) * (W + 2 * pad - 4), generator=g)
    assert torch.equal(im2col5(a, pad, backend="triton"), im2col5_reference(a, pad))
    assert torch.equal(col2im5(d, H, W, pad, backend="triton"), col2im5_reference(d, H, W, pad))


@interpreted
def test_im2col5_double_backward_float64():
    g = torch.Generator().manual_seed(7)
    a = torch.randn(1, 1, 2, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    assert gradgradcheck(lambda t: im2col5(t, 1, backend="triton"), (a,), fast_mode=True)
    d = torch.randn(1, 25, 2 * 12, generator=g, dtype=torch.float64, requires_grad=True)
    assert gradgradcheck(lambda t: col2im5(t, 5, 6, 1, backend="triton"), (d,), fast_mode=True)


@interpreted
@pytest.mark.parametrize("tile", [32, 16])
def test_ce_head_many_programs(monkeypatch, tile):
    """Tiles of 2 or 1 columns: the loss is a sum of many per-program partial sums."""
    from fastdistill._kernels import ce_head as kernels
    monkeypatch.setattr(kernels, "_TILE", tile)
    g = torch.Generator().manual_seed(tile)
    z, zd = 3 * torch.randn(2, 10, 9, generator=g), torch.randn(2, 10, 9, generator=g)
    Y = torch.rand(1, 10, 9, generator=g)
    got = ce_head(z, Y, 0.5, zd, backend="triton")
    ref = ce_head_reference(z, Y, 0.5, zd)
    for x, r in zip(got, ref):
        assert (x - r).abs().max() <= 1e-5 * r.abs().max().clamp_min(1)


# ------------------------------------------------------------------------------------- CUDA
EPS32 = torch.finfo(torch.float32).eps


def _float32_error_is_torchs(got, ref32, exact):
    """Lesson 2: the kernel's error ≤ 2× torch's own float32 error + a few ulps (vs float64)."""
    for g, r, e in zip(got, ref32, exact):
        if e is None:
            continue
        g, r = g.double().cpu(), r.double().cpu()
        eg, er = (g - e).abs().max().item(), (r - e).abs().max().item()
        assert eg <= 2 * er + 8 * EPS32 * e.abs().max().item(), (eg, er)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_pool2_relu_and_im2col5_equal_the_reference(dtype):
    g = torch.Generator().manual_seed(0)
    for shape in [(1, 1, 2, 2), (7, 3, 6, 10), (96, 10, 28, 28), (256, 10, 10, 10)]:
        z = torch.randn(shape, generator=g, dtype=dtype)
        z[0, 0, :2, :] = 0.0
        if shape[2] >= 4:
            z[-1, -1, 2, 0] = float("nan")
        b = torch.randn(shape[0], generator=g, dtype=dtype)
        a, idx = pool2_relu(z.cuda(), b.cuda(), backend="triton")
        ra, ridx = pool2_relu_reference(z, b)
        assert torch.equal(idx.cpu(), ridx) and _same(a.cpu(), ra)
        a, idx = ra.nan_to_num(), ridx
        zd = torch.randn(z.shape, generator=g, dtype=dtype)
        bd = torch.randn(b.shape, generator=g, dtype=dtype)
        got = pool2_relu_tangent(zd.cuda(), bd.cuda(), idx.cuda(), a.cuda(), backend="triton")
        assert torch.equal(got.cpu(), pool2_relu_tangent_reference(zd, bd, idx, a))
        d = torch.randn((2,) + tuple(a.shape), generator=g, dtype=dtype)
        dz, db = pool2_relu_backward(d.cuda(), idx.cuda(), a.cuda(), backend="triton")
        rdz, rdb = pool2_relu_backward_reference(d, idx, a)
        assert torch.equal(dz.cpu(), rdz)
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        assert (db.cpu() - rdb).abs().max() <= tol * rdb.abs().max().clamp_min(1)
        again = pool2_relu_backward(d.cuda(), idx.cuda(), a.cuda(), backend="triton")
        assert torch.equal(again[0], dz) and torch.equal(again[1], db)           # deterministic
    for B, C, M, H, W, pad in [(1, 1, 1, 5, 5, 0), (2, 3, 7, 9, 11, 1), (16, 1, 10, 28, 28, 2),
                               (16, 12, 10, 14, 14, 0)]:
        x = torch.randn(B, C, M, H, W, generator=g, dtype=dtype)
        d = torch.randn(B, C * 25, M * (H + 2 * pad - 4) * (W + 2 * pad - 4), generator=g, dtype=dtype)
        assert torch.equal(im2col5(x.cuda(), pad, backend="triton").cpu(), im2col5_reference(x, pad))
        c = col2im5(d.cuda(), H, W, pad, backend="triton")
        assert torch.equal(c.cpu(), col2im5_reference(d, H, W, pad))
        assert torch.equal(c, col2im5(d.cuda(), H, W, pad, backend="triton"))   # deterministic


@pytest.mark.cuda
def test_cuda_linear_relu_tangent_and_ce_head():
    """float32 at torch's error (TF32 would fail this), float64 tight (fp64 tl.dot on the GPU)."""
    g = torch.Generator().manual_seed(1)
    for K, F_in, F_out, n in [(2, 40, 12, 10), (1, 1, 1, 1), (16, 400, 120, 100), (16, 84, 10, 10)]:
        sizes = [(K, F_in, n), (K, F_in, n), (K, F_out, F_in), (K, F_out, F_in), (K, F_out), (K, F_out)]
        args = [torch.randn(s, generator=g) for s in sizes]
        exact = linear_relu_tangent_reference(*[t.double() for t in args])
        got = linear_relu_tangent(*[t.cuda() for t in args], backend="triton")
        torch32 = linear_relu_tangent_reference(*[t.cuda() for t in args])
        _float32_error_is_torchs(got, torch32, exact)
        got64 = linear_relu_tangent(*[t.double().cuda() for t in args], backend="triton")
        for x, e in zip(got64, exact):
            assert (x.cpu() - e).abs().max() <= 1e-12 * e.abs().max().clamp_min(1)
    for K, O, n in [(2, 10, 7), (1, 1, 1), (16, 10, 100), (3, 100, 13)]:
        z, zd = 3 * torch.randn(K, O, n, generator=g), torch.randn(K, O, n, generator=g)
        Y = torch.rand(1, O, n, generator=g)
        exact = ce_head_reference(z.double(), Y.double(), 1.0 / n, zd.double())
        got = ce_head(z.cuda(), Y.cuda(), 1.0 / n, zd.cuda(), backend="triton")
        _float32_error_is_torchs(got, ce_head_reference(z.cuda(), Y.cuda(), 1.0 / n, zd.cuda()), exact)
        got64 = ce_head(z.double().cuda(), Y.double().cuda(), 1.0 / n, zd.double().cuda(),
                        backend="triton")
        for x, e in zip(got64, exact):
            assert (x.cpu() - e).abs().max() <= 1e-12 * e.abs().max().clamp_min(1)


@pytest.mark.cuda
def test_cuda_auto_picks_triton():
    z = torch.randn(2, 3, 4, 4, device="cuda")
    pool2_relu(z, torch.zeros(2, device="cuda"))
    assert _backend.last_used("pool2_relu").backend == "triton"
    ce_head(torch.randn(2, 3, 4, device="cuda"), torch.rand(1, 3, 4, device="cuda"), 1.0)
    assert _backend.last_used("ce_head").backend == "triton"


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_lenet_engine_on_triton_layer_ops(dtype):
    """The batched LeNet engine's torch step (what a GPU runs) with every layer op it issues
    forced to triton (interpreted here) equals the same step on the reference ops, and the step
    reports that triton ran them."""
    import contextlib

    from fastdistill.models import LeNet
    from fastdistill.models.batched import LeNetBatchedEngine
    m, K, n = LeNet(), 2, 3
    g = torch.Generator().manual_seed(11)
    th = torch.stack([m.init("xavier", torch.Generator().manual_seed(k), dtype=dtype)
                      for k in range(K)])
    v = 1e-2 * torch.randn(K, m.num_params, generator=g, dtype=dtype)
    x = torch.randn(n, 1, 28, 28, generator=g, dtype=dtype)
    y = torch.softmax(torch.randn(n, 10, generator=g, dtype=dtype), -1)     # soft labels
    eng = LeNetBatchedEngine(m, backend="reference")
    layer_ops = [op for op in LeNetBatchedEngine.OPS if op != "lenet_step"]
    assert {"linear_relu_tangent", "ce_head"} <= set(layer_ops)

    def run(backend):
        with contextlib.ExitStack() as stack:
            for op in layer_ops:
                stack.enter_context(_backend.use_backend(backend, op))
            out = eng.loss_grad_hvp(th, x, y, v, need_x=True, need_y=True), eng.loss_grad(th, x, y)
        assert all(_backend.last_used(op).backend == backend for op in layer_ops)
        return out
    ref, _ = run("reference")
    got, (_, g1) = run("triton")
    tol = 2e-4 if dtype == torch.float32 else 1e-11
    for a, b in zip(got, ref):
        assert (a - b).abs().max() <= tol * b.abs().max(), (a - b).abs().max()
    assert (g1 - ref[0]).abs().max() <= tol * ref[0].abs().max()


@pytest.mark.cuda
def test_cuda_lenet_engine_runs_every_layer_op_on_the_gpu():
    """On CUDA the engine's step (auto backends) runs every layer op on triton or cuda, never the
    reference, and equals the float64 CPU step to float32 error."""
    from fastdistill.models import LeNet
    from fastdistill.models.batched import LeNetBatchedEngine
    m, K, n = LeNet(), 4, 10
    g = torch.Generator().manual_seed(12)
    th = torch.stack([m.init("xavier", torch.Generator().manual_seed(k), dtype=torch.float64)
                      for k in range(K)])
    v = 1e-2 * torch.randn(K, m.num_params, generator=g, dtype=torch.float64)
    x = torch.randn(n, 1, 28, 28, generator=g, dtype=torch.float64)
    y = torch.arange(n) % 10
    ref = LeNetBatchedEngine(m, backend="reference").loss_grad_hvp(th, x, y, v)
    eng = LeNetBatchedEngine(m)
    got = eng.loss_grad_hvp(th.float().cuda(), x.float().cuda(), y.cuda(), v.float().cuda())
    for op in LeNetBatchedEngine.OPS:
        assert _backend.last_used(op).backend in (("reference",) if op == "lenet_step"
                                                  else ("triton", "cuda")), op
    for a, b in zip(got[:3], ref[:3]):
        assert (a.double().cpu() - b).abs().max() <= 1e-4 * b.abs().max()
