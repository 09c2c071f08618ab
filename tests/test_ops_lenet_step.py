"""lenet_step (LeNet's whole inner step for K networks): the C++ backend equals the reference
(the engine's torch code) and autograd, agrees with finite differences, is deterministic and
independent of K and of the thread count, leaves its inputs alone, and rejects bad shapes."""
import pytest
import torch

from fastdistill import _backend
from fastdistill.errors import ShapeError
from fastdistill.models import LeNet
from fastdistill.models.batched import AutogradBatchedEngine, LeNetBatchedEngine
from fastdistill.ops.lenet_step import lenet_step, lenet_step_reference

CPP = _backend.has_kernel("fastdistill::lenet_grad_hvp", "CPU")
needs_cpp = pytest.mark.skipif(not CPP, reason="fastdistill._C without lenet_step")


@pytest.fixture(autouse=True)
def _no_forced_backend(monkeypatch):
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)


def _problem(K=3, n=10, dtype=torch.float64, channels=1, size=28, shared_x=True, labels="hard",
             seed=0):
    m = LeNet(in_channels=channels, image_size=size)
    g = torch.Generator().manual_seed(seed)
    th = torch.stack([m.init("xavier", torch.Generator().manual_seed(seed + 1 + k), dtype=dtype)
                      for k in range(K)])
    v = 1e-2 * torch.randn(K, m.num_params, generator=g, dtype=dtype)
    xs = (n, channels, size, size) if shared_x else (K, n, channels, size, size)
    x = torch.randn(xs, generator=g, dtype=dtype)
    if labels == "hard":
        Y = torch.nn.functional.one_hot(torch.arange(n) % 10, 10).to(dtype).unsqueeze(0)
    elif labels == "soft":
        Y = torch.softmax(torch.randn(1, n, 10, generator=g, dtype=dtype), -1)
    else:  # per-network soft labels, not normalised (SLDD's labels are unconstrained)
        Y = torch.randn(K, n, 10, generator=g, dtype=dtype)
    return m, th, x, Y, v


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


CASES = [dict(), dict(shared_x=False), dict(labels="soft"), dict(labels="per-net", shared_x=False),
         dict(K=1), dict(n=7, K=2), dict(channels=3, size=32, K=2, n=4)]
IDS = ["shared", "per-net-x", "soft", "per-net-labels", "K1", "n7", "cifar"]


@needs_cpp
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_cpp_equals_reference_float64(case):
    m, th, x, Y, v = _problem(**case)
    n = x.shape[-4]
    got = lenet_step(th, x, Y, v, scale=1.0 / n, backend="cpp")
    assert _backend.last_used("lenet_step").backend == "cpp"
    ref = lenet_step_reference(th, x, Y, v, 1.0 / n)
    for a, b in zip(got, ref):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert _rel(a, b) < 1e-12
    loss, g, *_ = lenet_step(th, x, Y, scale=1.0 / n, backend="cpp")
    assert torch.equal(g, got[1]), "g must be bitwise the same with and without v"
    assert torch.equal(loss, got[0])


@needs_cpp
def test_cpp_float32_within_torch_float32_error():
    """Against float64 ground truth, the C++ float32 result errs about as much as the reference's."""
    m, th, x, Y, v = _problem(K=2, labels="soft")
    exact = lenet_step(th, x, Y, v, scale=0.1, backend="cpp")
    f = lambda t: t.float()  # noqa: E731
    cpp = lenet_step(f(th), f(x), f(Y), f(v), scale=0.1, backend="cpp")
    ref = lenet_step(f(th), f(x), f(Y), f(v), scale=0.1, backend="reference")
    for c, r, e in zip(cpp, ref, exact):
        err_c, err_r = _rel(c.double(), e), _rel(r.double(), e)
        assert err_c <= 3 * err_r + 1e-6, (err_c, err_r)
        assert err_c < 1e-4


@needs_cpp
def test_matches_autograd():
    m, th, x, Y, v = _problem(K=2, labels="soft", shared_x=False)
    _, g, hv, dx, dY = lenet_step(th, x, Y, v, scale=0.1, backend="cpp")
    ag, ahv, adx, ady = AutogradBatchedEngine(m).loss_grad_hvp(th, x, Y[0], v)
    assert _rel(g, ag) < 1e-10 and _rel(hv, ahv) < 1e-10 and _rel(dx, adx) < 1e-10
    assert _rel(dY[0], ady) < 1e-10


@needs_cpp
def test_finite_differences():
    """H v, ∇_x (v·g) and ∇_Y (v·g) against central differences of g (float64)."""
    m, th, x, Y, v = _problem(K=1, n=5, labels="soft")
    _, g, hv, dx, dY = lenet_step(th, x, Y, v, scale=0.2, backend="cpp")
    grad = lambda t, xx, yy: lenet_step(t, xx, yy, scale=0.2, backend="cpp")[1]  # noqa: E731
    eps = 1e-5
    fd = (grad(th + eps * v, x, Y) - grad(th - eps * v, x, Y)) / (2 * eps)
    assert _rel(hv, fd) < 1e-6
    gen = torch.Generator().manual_seed(5)
    ux = torch.randn(x.shape, generator=gen, dtype=x.dtype)
    uy = torch.randn(Y.shape, generator=gen, dtype=Y.dtype)
    vg = lambda xx, yy: (v * grad(th, xx, yy)).sum()  # noqa: E731
    fdx = (vg(x + eps * ux, Y) - vg(x - eps * ux, Y)) / (2 * eps)
    fdy = (vg(x, Y + eps * uy) - vg(x, Y - eps * uy)) / (2 * eps)
    assert abs((dx * ux).sum() - fdx) < 1e-6 * abs(fdx) + 1e-9
    assert abs((dY * uy).sum() - fdy) < 1e-6 * abs(fdy) + 1e-9


@needs_cpp
def test_deterministic_and_independent_of_K_and_threads():
    m, th, x, Y, v = _problem(K=5, dtype=torch.float32, labels="per-net", shared_x=False)
    a = lenet_step(th, x, Y, v, scale=0.1, backend="cpp")
    b = lenet_step(th, x, Y, v, scale=0.1, backend="cpp")
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        c = lenet_step(th, x, Y, v, scale=0.1, backend="cpp")
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(p, q) for p, q in zip(a, c))
    k = 3  # one network alone gives its row of the batch, bit for bit
    one = lenet_step(th[k:k + 1], x[k:k + 1], Y[k:k + 1], v[k:k + 1], scale=0.1, backend="cpp")
    assert all(torch.equal(p[0], q[k]) for p, q in zip(one, a))


@needs_cpp
def test_inputs_untouched_and_opcheck():
    m, th, x, Y, v = _problem(K=2, n=3)
    saved = [t.clone() for t in (th, x, Y, v)]
    lenet_step(th, x, Y, v, scale=1 / 3, backend="cpp")
    assert all(torch.equal(a, b) for a, b in zip(saved, (th, x, Y, v)))
    torch.library.opcheck(torch.ops.fastdistill.lenet_grad.default, (th, x, Y, 1 / 3, 2))
    torch.library.opcheck(torch.ops.fastdistill.lenet_grad_hvp.default, (th, x, Y, v, 1 / 3, 2, True, True))
    torch.library.opcheck(torch.ops.fastdistill.lenet_grad_hvp.default, (th, x, Y, v, 1 / 3, 2, False, False))


def test_engine_routes_through_lenet_step():
    m, th, x, Y, v = _problem(K=2)
    y = torch.arange(10) % 10
    for backend in (["reference", "cpp"] if CPP else ["reference"]):
        eng = LeNetBatchedEngine(m, backend=backend)
        g, hv, gx, gy = eng.loss_grad_hvp(th, x, y, v)
        assert _backend.last_used("lenet_step").backend == backend and gy is None
        ag, ahv, agx, _ = AutogradBatchedEngine(m).loss_grad_hvp(th, x, y, v)
        assert _rel(g, ag) < 1e-10 and _rel(hv, ahv) < 1e-10 and _rel(gx, agx) < 1e-10


@pytest.mark.parametrize("backend", ["reference"] + (["cpp"] if CPP else []))
def test_bad_shapes(backend):
    m, th, x, Y, v = _problem(K=2)
    with pytest.raises(ShapeError, match="theta"):
        lenet_step(th[0], x, Y, scale=0.1, backend=backend)
    with pytest.raises(ShapeError, match="x must be"):
        lenet_step(th, x.float(), Y, scale=0.1, backend=backend)
    with pytest.raises(ShapeError, match="Y must be"):
        lenet_step(th, x, Y[:, :5], scale=0.1, backend=backend)
    with pytest.raises(ShapeError, match="Y must be"):
        lenet_step(th, x, Y[..., :1], scale=0.1, backend=backend)
    with pytest.raises(ShapeError, match="v must"):
        lenet_step(th, x, Y, v[:1], scale=0.1, backend=backend)


@needs_cpp
def test_cpp_checks_parameter_count():
    m, th, x, Y, v = _problem(K=2)
    with pytest.raises(RuntimeError, match="theta must be"):
        torch.ops.fastdistill.lenet_grad(th[:, :-1].contiguous(), x, Y, 0.1, 2)
    with pytest.raises(RuntimeError, match="28×28"):
        torch.ops.fastdistill.lenet_grad(th, x, Y, 0.1, 0)


def test_outer_loss_modes_agree():
    """DD's outer loss on real images: per-network autograd, the batched engine (C++ step in
    chunks of OUTER_IMAGES_PER_NET images when built) and auto give one (L, ∇_θ L)."""
    from fastdistill.backgrad import make_batched_outer_loss
    from fastdistill.backgrad.batched import OUTER_IMAGES_PER_NET, _runs_lenet_step_cpp
    m, th, _, _, _ = _problem(K=3)
    g = torch.Generator().manual_seed(3)
    n = OUTER_IMAGES_PER_NET + 7                                   # more than one chunk
    xr, yr = torch.randn(n, 1, 28, 28, generator=g, dtype=th.dtype), torch.randint(0, 10, (n,), generator=g)
    eng = LeNetBatchedEngine(m)
    assert _runs_lenet_step_cpp(eng, th.device) == CPP       # K = 3 ≥ the suite's one thread
    assert not _runs_lenet_step_cpp(LeNetBatchedEngine(m, backend="reference"), th.device)
    L0, g0 = make_batched_outer_loss(m, xr, yr, mode="per-network").loss_grad(th, eng)
    for mode in ("auto", "batched"):
        L, gr = make_batched_outer_loss(m, xr, yr, mode=mode).loss_grad(th, eng)
        assert _rel(L, L0) < 1e-12 and _rel(gr, g0) < 1e-12


def test_make_outer_loss_value_and_grad():
    """make_outer_loss's fast (L, ∇L) equals autograd through its call, and the strategies'
    outer_grad uses it (C++ when built; None, hence autograd, otherwise)."""
    from fastdistill.backgrad import make_outer_loss
    from fastdistill.backgrad.stored import outer_grad
    m, th, _, _, _ = _problem(K=1)
    g = torch.Generator().manual_seed(4)
    xr, yr = torch.randn(45, 1, 28, 28, generator=g, dtype=th.dtype), torch.randint(0, 10, (45,), generator=g)
    L = make_outer_loss(m, xr, yr)
    t = th[0].clone().requires_grad_(True)
    ref = L(t)
    ref_g, = torch.autograd.grad(ref, t)
    fast = L.value_and_grad(th[0])
    assert (fast is not None) == (CPP and torch.get_num_threads() == 1)
    got = outer_grad(L, th[0])
    assert abs(got[0] - ref.detach()) < 1e-12 and _rel(got[1], ref_g) < 1e-12
    with _backend.use_backend("reference", op="lenet_step"):
        assert L.value_and_grad(th[0]) is None


@needs_cpp
def test_cpp_rejects_oversized_batch():
    """A batch whose patch matrix would overflow the kernel's int indexing is refused up front
    (checked from the shape alone: an expanded, never-materialised input)."""
    m, th, _, Y, _ = _problem(K=1)
    n = 2 ** 31 // (25 * 784) + 1
    x = torch.zeros(1, 1, 28, 28, dtype=th.dtype).expand(n, 1, 28, 28)
    Yn = torch.zeros(1, 1, 10, dtype=th.dtype).expand(1, n, 10)
    with pytest.raises(RuntimeError, match="split the batch"):
        torch.ops.fastdistill.lenet_grad(th, x, Yn, 0.1, 2)
