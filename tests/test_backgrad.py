"""The back-gradient engine: every strategy equals full autograd in float64; finite differences."""
import pytest
import torch

from fastdistill.backgrad import STRATEGIES, make_outer_loss, meta_gradient
from fastdistill.errors import ConfigError, DivergenceError, ShapeError
from fastdistill.models import LeNet

torch.set_default_dtype(torch.float32)
RTOL = 1e-10


def _problem(S=2, n=3, T=5, soft=False, seed=0, momentum=False):
    g = torch.Generator().manual_seed(seed)
    m = LeNet()
    th0 = m.init("xavier", g, dtype=torch.float64)
    x = torch.randn(S, n, 1, 28, 28, generator=g, dtype=torch.float64)
    if soft:
        y = torch.randn(S, n, 10, generator=g, dtype=torch.float64)
    else:
        y = torch.randint(0, 10, (S, n), generator=g)
    lrs = 0.01 + 0.05 * torch.rand(T, generator=g, dtype=torch.float64)
    betas = 0.3 + 0.6 * torch.rand(T, generator=g, dtype=torch.float64) if momentum else None
    xr = torch.randn(12, 1, 28, 28, generator=g, dtype=torch.float64)
    yr = torch.randint(0, 10, (12,), generator=g)
    return m, th0, x, y, lrs, betas, make_outer_loss(m, xr, yr)


def _close(a, b):
    assert a is not None and b is not None
    err = ((a - b).norm() / b.norm()).item()
    assert err < RTOL, err


# (strategy, options); stored runs LeNet on its explicit engine by default, so its per-step
# autograd engine is listed too
GD_STRATEGIES = [(s, {}) for s in STRATEGIES if s not in ("autograd", "reversible")] + \
    [("stored", {"engine": "autograd"})]
GD_IDS = [s + "".join(f"-{v}" for v in o.values()) for s, o in GD_STRATEGIES]


@pytest.mark.parametrize("strategy,options", GD_STRATEGIES, ids=GD_IDS)
@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("S,T", [(1, 3), (2, 6), (3, 4)])  # several steps and epochs, T not a multiple of S
def test_gd_strategy_matches_autograd_float64(strategy, options, soft, S, T):
    m, th0, x, y, lrs, _, outer = _problem(S=S, T=T, soft=soft)
    ref = meta_gradient(m, th0, x, y, lrs, outer, strategy="autograd")
    out = meta_gradient(m, th0, x, y, lrs, outer, strategy=strategy, **options)
    assert abs(float(out.loss - ref.loss)) <= 1e-13 * max(1.0, abs(float(ref.loss)))
    _close(out.data, ref.data)
    _close(out.lrs, ref.lrs)
    _close(out.theta0, ref.theta0)
    _close(out.theta_T, ref.theta_T)
    if soft:
        _close(out.labels, ref.labels)
    else:
        assert out.labels is None


@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("engine", ["auto", "autograd"])
def test_stored_momentum_matches_autograd_float64(soft, engine):
    m, th0, x, y, lrs, betas, outer = _problem(S=2, T=5, soft=soft, momentum=True)
    ref = meta_gradient(m, th0, x, y, lrs, outer, betas=betas, strategy="autograd")
    out = meta_gradient(m, th0, x, y, lrs, outer, betas=betas, strategy="stored", engine=engine)
    assert out.stats["engine"] == ("lenet-explicit" if engine == "auto" else "autograd")
    for a, b in ((out.data, ref.data), (out.lrs, ref.lrs), (out.betas, ref.betas), (out.theta0, ref.theta0)):
        _close(a, b)
    if soft:
        _close(out.labels, ref.labels)


class _SmoothNet(torch.nn.Module):
    """Tiny network that is smooth everywhere (tanh, average pooling): finite differences are
    then exact to round-off, so the check can be tight (LeNet's ReLU/max-pool kinks are crossed
    by any ε that float64 resolves for some of its 61,706 coordinates)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 3, 3)
        self.fc = torch.nn.Linear(3 * 3 * 3, 4)

    def forward(self, x):
        h = torch.nn.functional.avg_pool2d(torch.tanh(self.conv(x)), 2)
        return self.fc(h.flatten(1))


def _fd_check(m, th0, x, y, lrs, outer, betas, tol):
    out = meta_gradient(m, th0, x, y, lrs, outer, betas=betas, strategy="stored")
    grads = {"data": out.data, "labels": out.labels, "lrs": out.lrs, "theta0": out.theta0,
             "betas": out.betas}
    base = {"data": x, "labels": y, "lrs": lrs, "theta0": th0, "betas": betas}
    g = torch.Generator().manual_seed(9)

    def L(a):
        return float(meta_gradient(m, a["theta0"], a["data"], a["labels"], a["lrs"], outer,
                                   betas=a["betas"], need_data=False, need_labels=False,
                                   need_theta0=False).loss)

    eps = 1e-6
    checked = 0
    for name, grad in grads.items():
        if grad is None or (name == "labels" and not y.is_floating_point()):
            continue
        d = torch.randn(base[name].shape, generator=g, dtype=torch.float64)
        plus, minus = dict(base), dict(base)
        plus[name] = base[name] + eps * d
        minus[name] = base[name] - eps * d
        fd = (L(plus) - L(minus)) / (2 * eps)
        an = float((grad * d).sum())
        assert abs(fd - an) <= tol * max(abs(an), 1e-3), (name, fd, an)
        checked += 1
    return checked


@pytest.mark.parametrize("momentum", [False, True])
def test_finite_differences_smooth_tiny_problem(momentum):
    """Central differences of L along random directions in x̃, ỹ, η (α, β) and θ_0 (float64)."""
    from fastdistill.models import ModuleModel
    torch.manual_seed(0)
    m = ModuleModel(_SmoothNet().double(), (1, 8, 8), 4)
    g = torch.Generator().manual_seed(1)
    th0 = m.init("xavier", g, dtype=torch.float64)
    x = torch.randn(2, 3, 1, 8, 8, generator=g, dtype=torch.float64)
    y = torch.softmax(torch.randn(2, 3, 4, generator=g, dtype=torch.float64), -1)
    lrs = torch.tensor([0.3, 0.2, 0.4, 0.25], dtype=torch.float64)
    betas = torch.tensor([0.5, 0.8, 0.6, 0.7], dtype=torch.float64) if momentum else None
    outer = make_outer_loss(m, torch.randn(6, 1, 8, 8, generator=g, dtype=torch.float64),
                            torch.randint(0, 4, (6,), generator=g))
    assert _fd_check(m, th0, x, y, lrs, outer, betas, tol=1e-7) == (5 if momentum else 4)


def test_finite_differences_lenet_synthetic_inputs():
    """The same on LeNet for x̃, ỹ and η (θ_0 is covered by the smooth problem above)."""
    m, th0, x, y, lrs, _, outer = _problem(S=2, n=2, T=3, soft=True, seed=5)
    y = torch.softmax(y, dim=-1)
    x = 0.5 * x
    lrs = torch.tensor([0.02, 0.03, 0.01], dtype=torch.float64)
    out = meta_gradient(m, th0, x, y, lrs, outer, strategy="stored")
    g = torch.Generator().manual_seed(9)
    eps = 1e-6

    def L(x_, y_, l_):
        return float(meta_gradient(m, th0, x_, y_, l_, outer, need_data=False, need_labels=False,
                                   need_theta0=False).loss)

    for name, grad in (("data", out.data), ("labels", out.labels), ("lrs", out.lrs)):
        args = {"data": x, "labels": y, "lrs": lrs}
        d = torch.randn(args[name].shape, generator=g, dtype=torch.float64)
        p, q = dict(args), dict(args)
        p[name] = args[name] + eps * d
        q[name] = args[name] - eps * d
        fd = (L(p["data"], p["labels"], p["lrs"]) - L(q["data"], q["labels"], q["lrs"])) / (2 * eps)
        an = float((grad * d).sum())
        # truncation error at LeNet's curvature is ~1e-5 relative; a wrong gradient is off by O(1)
        assert abs(fd - an) <= 1e-4 * max(abs(an), 1e-2), (name, fd, an)


def test_need_flags_skip_gradients():
    m, th0, x, y, lrs, _, outer = _problem()
    out = meta_gradient(m, th0, x, y, lrs, outer, need_data=False, need_theta0=False)
    assert out.data is None and out.theta0 is None and out.lrs.shape == lrs.shape


def test_stored_bytes_is_T_states():
    m, th0, x, y, lrs, _, outer = _problem(T=6)
    out = meta_gradient(m, th0, x, y, lrs, outer)
    assert out.stats["stored_bytes"] == 6 * m.num_params * 8


def test_bad_inputs():
    m, th0, x, y, lrs, _, outer = _problem()
    with pytest.raises(ConfigError, match="unknown back-gradient strategy"):
        meta_gradient(m, th0, x, y, lrs, outer, strategy="magic")
    with pytest.raises(ShapeError, match="synthetic data"):
        meta_gradient(m, th0, x[:, :, :, :27], y, lrs, outer)
    with pytest.raises(ShapeError, match="hard labels"):
        meta_gradient(m, th0, x, y[:, :2], lrs, outer)
    with pytest.raises(ShapeError, match=r"\[0, 10\)"):
        meta_gradient(m, th0, x, y + 10, lrs, outer)
    with pytest.raises(ShapeError, match="θ must be"):
        meta_gradient(m, th0[:-1], x, y, lrs, outer)
    with pytest.raises(DivergenceError):
        meta_gradient(m, th0, x, y, lrs * float("nan"), outer)
    with pytest.raises(DivergenceError, match="not finite"):
        # a huge learning rate sends θ to inf/NaN: reported, not returned
        meta_gradient(m, th0, x * 1e3, y, lrs * 1e30, outer)


def test_stored_engine_choice_and_errors():
    from fastdistill.models import ModuleModel
    m, th0, x, y, lrs, _, outer = _problem(S=1, T=2)
    assert meta_gradient(m, th0, x, y, lrs, outer, strategy="stored").stats["engine"] == "lenet-explicit"
    with pytest.raises(ConfigError, match="unknown engine"):
        meta_gradient(m, th0, x, y, lrs, outer, strategy="stored", engine="fast")
    net = ModuleModel(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10)).double(),
                      input_shape=(1, 28, 28), num_outputs=10)
    th = net.init("xavier", torch.Generator().manual_seed(0), dtype=torch.float64)
    other = make_outer_loss(net, x[0], y[0])
    # any other model: the per-step autograd engine, and a clear error if LeNet's is forced
    assert meta_gradient(net, th, x, y, lrs, other, strategy="stored").stats["engine"] == "autograd"
    with pytest.raises(ConfigError, match="LeNet only"):
        meta_gradient(net, th, x, y, lrs, other, strategy="stored", engine="lenet-explicit")
