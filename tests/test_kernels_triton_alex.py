"""The Triton backends of AlexCifarNet's layer ops, maxpool3s2 and lrn (+ tangents, backwards).
On CPU (interpreter): forced ``backend="triton"`` against the references over several programs
with tails (BLOCK shrunk), odd and even planes, ties, ±inf, NaN and ±0 (max-pool: bit for bit),
float32 LRN within half an ulp of the exact value, the triton backends' higher-order
derivatives in float64, determinism and reads/writes inside the tensors. On CUDA (marked
``cuda``, skipped without a GPU): device results against the CPU reference."""
import os

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

from fastdistill import _backend

triton = pytest.importorskip("triton")

# CPU tensors reach triton only through the interpreter (conftest sets it without a GPU)
interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="CPU tensors need the Triton interpreter")

from fastdistill.ops.lrn import (ALEXCIFARNET_LRN, lrn, lrn_backward,  # noqa: E402
                                 lrn_backward_reference, lrn_reference, lrn_tangent,
                                 lrn_tangent_reference)
from fastdistill.ops.maxpool3s2 import (maxpool3s2, maxpool3s2_backward,  # noqa: E402
                                        maxpool3s2_backward_reference, maxpool3s2_reference,
                                        maxpool3s2_tangent, maxpool3s2_tangent_reference,
                                        pooled_size)

CPP_LRN = _backend.has_kernel("fastdistill::lrn", "CPU")
HYPER = ALEXCIFARNET_LRN
LRN_FUNCS = {"forward": (lrn, lrn_reference), "tangent": (lrn_tangent, lrn_tangent_reference),
             "backward": (lrn_backward, lrn_backward_reference)}


@pytest.fixture(autouse=True)
def _no_forced_backend(monkeypatch):
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)


@pytest.fixture
def small_blocks(monkeypatch):
    """BLOCK 16: every launch below runs several programs and a masked tail."""
    from fastdistill._kernels import lrn as k_lrn
    from fastdistill._kernels import maxpool3s2 as k_pool
    monkeypatch.setattr(k_pool, "BLOCK", 16)
    monkeypatch.setattr(k_lrn, "BLOCK", 16)


def _bitwise(a, b):
    """Same dtype, shape and bits (NaN payloads and the sign of zero included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.is_floating_point:
        itype = torch.int64 if a.dtype == torch.float64 else torch.int32
        a, b = a.contiguous().view(itype), b.contiguous().view(itype)
    return torch.equal(a.cpu(), b.cpu())


# ----------------------------------------------------------------------------------- maxpool
def _pool_data(shape, dtype, seed=0):
    """Random planes with exact ties (zeros), ±0 ties, −inf-only windows, two NaNs in a window,
    a tie across windows and a pixel that wins all four windows covering it."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(shape, generator=g, dtype=dtype)
    if shape[2] >= 5 and shape[3] >= 5:
        z[0, 0, :3, :] = 0.0
        z[0, 0, 3, 3] = 50.0                          # odd row and column: wins 4 windows
        z[-1, -1, :4, :4] = float("-inf")
        z[-1, -1, 4, 0] = float("inf")
        z[-1, -2, :3, :3] = -0.0
        z[-1, -2, 1, 1] = 0.0
        z[-1, 0, 1, 1] = z[-1, 0, 2, 2] = float("nan")
        z[0, -1, 3, 0] = z[0, -1, 3, 1]
    return z, g


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (1, 2, 2, 1), (3, 2, 7, 9), (2, 3, 6, 8), (2, 2, 5, 6)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_maxpool3s2_equals_reference_bitwise(small_blocks, dtype, shape):
    z, g = _pool_data(shape, dtype)
    p, idx = maxpool3s2(z, backend="triton")
    rp, ridx = maxpool3s2_reference(z)
    assert p.shape == (shape[0], shape[1], pooled_size(shape[2]), pooled_size(shape[3]))
    assert _bitwise(idx, ridx) and _bitwise(p, rp)
    zd = torch.randn(z.shape, generator=g, dtype=dtype)
    assert _bitwise(maxpool3s2_tangent(zd, idx, backend="triton"), maxpool3s2_tangent_reference(zd, idx))
    d = torch.randn((2,) + tuple(p.shape), generator=g, dtype=dtype)
    H, W = shape[2:]
    dz = maxpool3s2_backward(d, idx, H, W, backend="triton")
    assert _bitwise(dz, maxpool3s2_backward_reference(d, idx, H, W))
    assert _backend.last_used("maxpool3s2_backward").backend == "triton"
    if shape[2] >= 5:                                 # the multi-window sums were exercised
        wins = maxpool3s2_backward_reference(torch.ones_like(d[:1]), idx, H, W)
        assert wins.max() == 4


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_maxpool3s2_edge_planes(dtype):
    """Planes that are all −inf, all NaN, constant (every window a tie: the first in-image
    pixel wins), +inf and signed zeros; indices also checked against the rule itself."""
    inf, nan = float("inf"), float("nan")
    H, W = 5, 4
    planes = [torch.full((H, W), -inf), torch.full((H, W), nan), torch.full((H, W), 2.0),
              torch.tensor([[-0.0, 0.0, -0.0, 0.0]] * H), torch.tensor([[inf, 1.0, inf, -inf]] * H)]
    z = torch.stack(planes).to(dtype).view(1, len(planes), H, W)
    p, idx = maxpool3s2(z, backend="triton")
    rp, ridx = maxpool3s2_reference(z)
    assert _bitwise(idx, ridx) and _bitwise(p, rp)
    h, w = pooled_size(H), pooled_size(W)
    first = torch.tensor([[max(2 * i - 1, 0) * W + max(2 * j - 1, 0) for j in range(w)] for i in range(h)])
    assert torch.equal(idx[0, 0], first) and torch.equal(idx[0, 2], first)
    last_nan = torch.tensor([[min(2 * i + 1, H - 1) * W + min(2 * j + 1, W - 1) for j in range(w)]
                             for i in range(h)])
    assert torch.equal(idx[0, 1], last_nan)


@interpreted
def test_maxpool3s2_higher_order_float64():
    """The forward's backward is the triton backward, whose backward is the triton tangent
    (gradgradcheck runs all three); the tangent and the backward are checked on their own."""
    g = torch.Generator().manual_seed(5)
    z = torch.randn(2, 1, 5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    fn = lambda t: maxpool3s2(t, backend="triton")[0]  # noqa: E731
    assert gradcheck(fn, (z,), fast_mode=True)
    assert gradgradcheck(fn, (z,), fast_mode=True)
    p, idx = maxpool3s2_reference(z.detach())
    zd = torch.randn(z.shape, generator=g, dtype=torch.float64, requires_grad=True)
    assert gradgradcheck(lambda t: maxpool3s2_tangent(t, idx, backend="triton"), (zd,), fast_mode=True)
    d = torch.randn((2,) + tuple(p.shape), generator=g, dtype=torch.float64, requires_grad=True)
    assert gradgradcheck(lambda t: maxpool3s2_backward(t, idx, 5, 4, backend="triton"), (d,),
                         fast_mode=True)
    (gz,) = torch.autograd.grad(fn(z), z, p)         # the value of a first derivative too
    assert _bitwise(gz, maxpool3s2_backward_reference(p.unsqueeze(0), idx, 5, 4)[0])


def _in_guarded_buffer(t, canary, pad=64):
    buf = torch.full((t.numel() + 2 * pad,), canary, dtype=t.dtype)
    buf[pad:pad + t.numel()] = t.reshape(-1)
    return buf, buf[pad:pad + t.numel()].view(t.shape)


@interpreted
def test_maxpool3s2_deterministic_and_in_bounds(small_blocks):
    """Inputs are views into buffers with canaries around them (a read outside would change a
    maximum or a sum); two backward runs are bit-identical."""
    z, g = _pool_data((2, 3, 7, 6), torch.float32, seed=3)
    zbuf, zview = _in_guarded_buffer(z, 1e30)
    p, idx = maxpool3s2(zview, backend="triton")
    rp, ridx = maxpool3s2_reference(z)
    assert _bitwise(idx, ridx) and _bitwise(p, rp)
    zd = torch.randn(z.shape, generator=g)
    _, zdview = _in_guarded_buffer(zd, 1e30)
    assert _bitwise(maxpool3s2_tangent(zdview, idx, backend="triton"), maxpool3s2_tangent_reference(zd, idx))
    d = torch.randn((2,) + tuple(p.shape), generator=g)
    _, dview = _in_guarded_buffer(d, 1e30)
    one = maxpool3s2_backward(dview, idx, 7, 6, backend="triton")
    two = maxpool3s2_backward(dview, idx, 7, 6, backend="triton")
    assert _bitwise(one, two) and _bitwise(one, maxpool3s2_backward_reference(d, idx, 7, 6))
    assert (zbuf[:64] == 1e30).all() and (zbuf[-64:] == 1e30).all()


# --------------------------------------------------------------------------------------- lrn
def _lrn_inputs(which, shape, dtype, seed=0, scale=3.0):
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
    return float((a.detach().double() - b.detach().double()).abs().max())


@interpreted
@pytest.mark.parametrize("which", list(LRN_FUNCS))
@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 1), (2, 3, 1, 2, 5), (1, 7, 2, 3, 3)],
                         ids=lambda s: "x".join(map(str, s)))
def test_lrn_equals_reference(small_blocks, which, shape):
    """float64 to a few ulp of the reference; float32 within half an ulp (+ float64 noise) of
    the exact value of its float32 inputs: the kernels round once, at the end."""
    fn, ref = LRN_FUNCS[which]
    args64 = _lrn_inputs(which, shape, torch.float64)
    want = ref(*args64, **HYPER)
    got64 = fn(*args64, **HYPER, backend="triton")
    assert got64.dtype == torch.float64 and got64.shape == want.shape
    assert _max_err(got64, want) <= 1e-14 * float(want.abs().max())
    assert _backend.last_used(f"lrn{'' if which == 'forward' else '_' + which}").backend == "triton"
    args32 = tuple(a.float() for a in args64)
    truth = ref(*(a.double() for a in args32), **HYPER)
    got32 = fn(*args32, **HYPER, backend="triton")
    assert got32.dtype == torch.float32
    bound = 2.0 ** -24 * truth.abs() + 1e-14 * float(truth.abs().max())
    assert ((got32.double() - truth).abs() <= bound).all(), _max_err(got32, truth)
    if CPP_LRN:  # the same float64 expressions in the same order as the C++ kernel: bitwise
        assert _bitwise(got64, fn(*args64, **HYPER, backend="cpp"))
        assert _bitwise(got32, fn(*args32, **HYPER, backend="cpp"))


@interpreted
@pytest.mark.parametrize("size", [1, 2, 3, 5, 8])
def test_lrn_other_window_sizes_and_hyperparameters(size):
    """Odd and even windows (size//2 before, (size−1)//2 after), wider than C = 6 too; β = 0.6
    (the exp/log path) and β = 0.75 (square roots) with a large α."""
    for beta in (0.6, 0.75):
        hyper = dict(size=size, alpha=0.3, beta=beta, k=2.0)
        for which, (fn, ref) in LRN_FUNCS.items():
            args = _lrn_inputs(which, (2, 6, 1, 2, 3), torch.float64, seed=size, scale=1.0)
            want = ref(*args, **hyper)
            assert _max_err(fn(*args, **hyper, backend="triton"), want) <= 1e-14 * float(want.abs().max())


def _first_and_second_order(fn, inputs, g):
    """``(vjp, ∂/∂(inputs, v) ⟨w, vjp⟩)`` of ``fn`` at ``inputs`` for random v and w; the VJP
    must carry a graph in every input (a detached or missing term fails here, where
    gradgradcheck ignores outputs that do not require grad)."""
    out = fn(*inputs)
    v = torch.randn(out.shape, generator=g, dtype=out.dtype, requires_grad=True)
    first = torch.autograd.grad(out, inputs, v, create_graph=True)
    ws = [torch.randn(f.shape, generator=g, dtype=f.dtype) for f in first]
    total = sum((f * w).sum() for f, w in zip(first, ws) if f.requires_grad)
    wrt = tuple(inputs) + (v,)
    second = torch.autograd.grad(total, wrt, allow_unused=True)
    return first, [torch.zeros_like(t) if s is None else s for s, t in zip(second, wrt)]


@interpreted
def test_lrn_higher_order_float64():
    """Through the triton backend: gradcheck and gradgradcheck of lrn (its backward is the
    triton backward), of the tangent in ẋ and x and of the backward in ȳ and x (their x terms
    go through the reference), and first and second derivatives equal the reference's."""
    hyper = dict(size=3, alpha=0.5, beta=0.75, k=1.0)       # a large α: the cross terms matter
    g = torch.Generator().manual_seed(7)
    shape = (1, 4, 1, 1, 2)
    x = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
    xd = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
    gy = torch.randn((2,) + shape, generator=g, dtype=torch.float64, requires_grad=True)
    cases = [(lambda t: lrn(t, **hyper, backend="triton"), lambda t: lrn_reference(t, **hyper), (x,)),
             (lambda u, t: lrn_tangent(u, t, **hyper, backend="triton"),
              lambda u, t: lrn_tangent_reference(u, t, **hyper), (xd, x)),
             (lambda u, t: lrn_backward(u, t, **hyper, backend="triton"),
              lambda u, t: lrn_backward_reference(u, t, **hyper), (gy, x))]
    for fn, ref, inputs in cases:
        assert gradcheck(fn, inputs, fast_mode=True)
        assert gradgradcheck(fn, inputs, fast_mode=True)
        seed = int(torch.randint(1 << 30, (1,), generator=g))
        first, second = _first_and_second_order(fn, inputs, torch.Generator().manual_seed(seed))
        first_r, second_r = _first_and_second_order(ref, inputs, torch.Generator().manual_seed(seed))
        assert all(f.requires_grad for f in first)
        for a, b in zip(first, first_r):
            assert _max_err(a, b) <= 1e-14 * float(b.detach().abs().max())
        for a, b in zip(second, second_r):
            assert _max_err(a, b) <= 1e-13 * float(b.abs().max().clamp_min(1e-300))


@interpreted
def test_lrn_deterministic_and_in_bounds(small_blocks):
    """Views into canary-guarded buffers (a read outside would change the result); two runs
    are bit-identical."""
    for which, (fn, ref) in LRN_FUNCS.items():
        args = _lrn_inputs(which, (2, 5, 1, 3, 2), torch.float32, seed=5)
        bufs, views = zip(*(_in_guarded_buffer(a, 1e30) for a in args))
        one, two = fn(*views, **HYPER, backend="triton"), fn(*views, **HYPER, backend="triton")
        assert _bitwise(one, two) and one.isfinite().all()
        truth = ref(*(a.double() for a in args), **HYPER)
        assert _max_err(one, truth) <= 1e-6 * float(truth.abs().max())
        for buf in bufs:
            assert (buf[:64] == 1e30).all() and (buf[-64:] == 1e30).all()


# -------------------------------------------------------------------------------------- CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_cuda_maxpool3s2_equals_the_reference_bitwise(dtype):
    for shape in [(1, 1, 1, 1), (1, 1, 2, 1), (7, 3, 11, 13), (4, 2, 8, 8), (64, 2, 32, 32),
                  (64, 2, 16, 16), (3, 1000, 9, 6)]:
        z, g = _pool_data(shape, dtype)
        p, idx = maxpool3s2(z.cuda(), backend="triton")
        rp, ridx = maxpool3s2_reference(z)
        assert _bitwise(idx, ridx) and _bitwise(p, rp)
        zd = torch.randn(z.shape, generator=g, dtype=dtype)
        got = maxpool3s2_tangent(zd.cuda(), idx, backend="triton")
        assert _bitwise(got, maxpool3s2_tangent_reference(zd, ridx))
        d = torch.randn((2,) + tuple(rp.shape), generator=g, dtype=dtype)
        H, W = shape[2:]
        dz = maxpool3s2_backward(d.cuda(), idx, H, W, backend="triton")
        assert _bitwise(dz, maxpool3s2_backward_reference(d, ridx, H, W))
        assert _bitwise(maxpool3s2_backward(d.cuda(), idx, H, W, backend="triton"), dz)  # deterministic
    z = torch.randn(2, 3, 5, 4, device="cuda", dtype=torch.float64, requires_grad=True)
    assert gradgradcheck(lambda t: maxpool3s2(t, backend="triton")[0], (z,), fast_mode=True)


@pytest.mark.cuda
def test_cuda_lrn_equals_the_reference():
    cuda_kernels = _backend.has_kernel("fastdistill::lrn", "CUDA")
    for shape in [(1, 1, 1, 1, 1), (2, 3, 1, 2, 5), (3, 7, 5, 3, 11), (1, 64, 2, 16, 16),
                  (2, 64, 2, 16, 16), (1, 16, 100, 8, 8)]:
        for which, (fn, ref) in LRN_FUNCS.items():
            args64 = _lrn_inputs(which, shape, torch.float64)
            want = ref(*args64, **HYPER)
            got64 = fn(*(a.cuda() for a in args64), **HYPER, backend="triton")
            assert _max_err(got64.cpu(), want) <= 1e-14 * float(want.abs().max())
            args32 = tuple(a.float() for a in args64)
            truth = ref(*(a.double() for a in args32), **HYPER)
            got32 = fn(*(a.cuda() for a in args32), **HYPER, backend="triton")
            bound = 2.0 ** -24 * truth.abs() + 1e-14 * float(truth.abs().max())
            assert ((got32.cpu().double() - truth).abs() <= bound).all(), _max_err(got32.cpu(), truth)
            assert _bitwise(fn(*(a.cuda() for a in args32), **HYPER, backend="triton"), got32)
            if cuda_kernels:  # the CUDA kernels' expressions, IEEE sqrt/division, no FMA: bitwise
                assert _bitwise(got32, fn(*(a.cuda() for a in args32), **HYPER, backend="cuda"))
    hyper = dict(size=5, alpha=0.3, beta=0.6, k=2.0)                 # the exp/log path
    for which, (fn, ref) in LRN_FUNCS.items():
        args = _lrn_inputs(which, (2, 6, 3, 4, 5), torch.float64, seed=1, scale=1.0)
        want = ref(*args, **hyper)
        got = fn(*(a.cuda() for a in args), **hyper, backend="triton")
        assert _max_err(got.cpu(), want) <= 1e-14 * float(want.abs().max())
    x = torch.randn(1, 4, 1, 1, 2, device="cuda", dtype=torch.float64, requires_grad=True)
    assert gradgradcheck(lambda t: lrn(t, size=3, alpha=0.5, beta=0.75, k=1.0, backend="triton"), (x,),
                         fast_mode=True)


@pytest.mark.cuda
def test_cuda_auto_picks_triton_for_alex_ops():
    maxpool3s2(torch.randn(2, 3, 5, 5, device="cuda"))
    assert _backend.last_used("maxpool3s2").backend == "triton"
    lrn(torch.randn(1, 4, 2, 3, 3, device="cuda"), **HYPER)
    assert _backend.last_used("lrn").backend == "triton"
