"""The ``reversible`` strategy: exact fixed-point momentum SGD, reversed bit for bit.

What is compared with what. The reversible forward pass is *quantised*: θ, v on a 2^-R grid,
β_t replaced by a rational β_q = n/d, θ_0 rounded to the grid. Its gradients are the exact
reverse-mode gradients of the momentum unroll along that quantised trajectory. So the oracle is
autograd through the momentum unroll with β_q, started at the rounded θ_0, in two forms:

* the plain float64 unroll (which rounds differently, at the 1e-16 level at R = 52), and
* the same unroll with each step's rounding residual added as a constant, so autograd follows
  the reversible trajectory exactly (``same_trajectory_autograd``).

Both must agree to rtol 1e-10. With a coarse grid (R = 20) only the second one does, which shows
the comparison is not vacuous: the agreement comes from following the same trajectory.
"""
import math
import random

import pytest
import torch
from torch import nn

from fastdistill.backgrad import make_outer_loss, meta_gradient
from fastdistill.backgrad.common import InnerProblem
from fastdistill.backgrad.fixedpoint import (STATE_LIMIT, FixedPoint, FixedPointOverflowError,
                                             InfoBuffer, ReversibilityError, rational_betas,
                                             theory_bits_per_step)
from fastdistill.backgrad.reversible import ReversibleMomentum
from fastdistill.errors import ConfigError, DivergenceError
from fastdistill.models import LeNet, ModuleModel
from fastdistill.models.base import FunctionalModel

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def tiny(T, *, S=3, n=4, soft=False, seed=0, beta=(0.4, 0.9)):
    """A 6→5→3 tanh MLP momentum problem in float64 (P = 53)."""
    g = torch.Generator().manual_seed(seed)
    model = ModuleModel(nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).to(F64), (6,), 3)
    th0 = model.init("xavier", g, dtype=F64) + 0.1 * torch.randn(model.num_params, generator=g, dtype=F64)
    x = torch.randn(S, n, 6, generator=g, dtype=F64)
    y = (torch.randn(S, n, 3, generator=g, dtype=F64).softmax(-1) if soft
         else torch.randint(0, 3, (S, n), generator=g))
    lrs = 0.1 + 0.4 * torch.rand(T, generator=g, dtype=F64)
    betas = beta[0] + (beta[1] - beta[0]) * torch.rand(T, generator=g, dtype=F64)
    outer = make_outer_loss(model, torch.randn(16, 6, generator=g, dtype=F64),
                            torch.randint(0, 3, (16,), generator=g))
    return model, th0, x, y, lrs, betas, outer


def quantised(th0, betas, radix_bits=52, max_denominator=1 << 16):
    fp = FixedPoint(radix_bits)
    _, bq = rational_betas(betas.tolist(), max_denominator)
    return fp.to_float(fp.to_int(th0, "θ_0"), th0.dtype), torch.tensor(bq, dtype=betas.dtype)


def same_trajectory_autograd(model, th0, x, y, lrs, betas, outer, radix_bits):
    """Autograd through the momentum unroll, pinned to the reversible run's exact states."""
    prob = InnerProblem(model, x, y, lrs, betas)
    rm = ReversibleMomentum(prob, th0, radix_bits=radix_bits)
    theta, vel = {len(lrs): rm.forward()}, {}
    for t, th_t, v_t, v_next in rm.reverse():
        theta[t], vel[t], vel[t + 1] = th_t, v_t, v_next
    _, bq = quantised(th0, betas, radix_bits)
    th0q = theta[0].clone().requires_grad_(True)
    xs = x.clone().requires_grad_(True)
    ys = y.clone().requires_grad_(y.is_floating_point())
    a = lrs.clone().requires_grad_(True)
    b = bq.clone().requires_grad_(True)
    th, v = th0q, torch.zeros_like(th0q)
    S = x.shape[0]
    for t in range(len(lrs)):
        gt, = torch.autograd.grad(prob.loss_at(th, t, xs[t % S], ys[t % S]), th, create_graph=True)
        v = b[t] * v - (1 - b[t]) * gt
        if t + 1 in vel:
            v = v + (vel[t + 1] - v).detach()  # the fixed-point rounding, as a constant
        th = th + a[t] * v
        if t + 1 in theta:
            th = th + (theta[t + 1] - th).detach()
    L = outer(th)
    wrt = [xs, a, b, th0q] + ([ys] if ys.requires_grad else [])
    gs = torch.autograd.grad(L, wrt)
    out = dict(zip(["data", "lrs", "betas", "theta0", "labels"], gs))
    return out, th.detach()


def assert_close_all(ref: dict, out, rtol=1e-10):
    for k, v in ref.items():
        got = getattr(out, k)
        torch.testing.assert_close(got, v, rtol=rtol, atol=1e-14 * float(v.abs().max()), msg=k)


@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_matches_autograd_through_momentum_unroll(soft):
    T = 12
    model, th0, x, y, lrs, betas, outer = tiny(T, soft=soft)
    out = meta_gradient(model, th0, x, y, lrs, outer, betas=betas, strategy="reversible")
    # oracle 1: plain autograd with β_q from the rounded θ_0
    th0q, bq = quantised(th0, betas)
    ref = meta_gradient(model, th0q, x, y, lrs, outer, betas=bq, strategy="autograd")
    assert_close_all({k: getattr(ref, k) for k in ("data", "lrs", "betas", "theta0")
                      + (("labels",) if soft else ())}, out)
    torch.testing.assert_close(out.theta_T, ref.theta_T, rtol=0, atol=1e-13)
    # oracle 2: autograd pinned to the very same quantised trajectory
    ref2, thT2 = same_trajectory_autograd(model, th0, x, y, lrs, betas, outer, 52)
    if not soft:
        ref2.pop("labels", None)
    assert_close_all(ref2, out)
    torch.testing.assert_close(thT2, out.theta_T, rtol=0, atol=1e-15)  # x + (y − x) is y to an ulp


def test_coarse_grid_matches_only_its_own_trajectory():
    """At R = 20 the rounding (1e-6) is visible: plain float autograd disagrees beyond 1e-10,
    autograd along the reversible trajectory still agrees to 1e-10."""
    T = 10
    model, th0, x, y, lrs, betas, outer = tiny(T, seed=1)
    out = meta_gradient(model, th0, x, y, lrs, outer, betas=betas, strategy="reversible", radix_bits=20)
    th0q, bq = quantised(th0, betas, 20)
    plain = meta_gradient(model, th0q, x, y, lrs, outer, betas=bq, strategy="autograd")
    rel = float((plain.data - out.data).abs().max() / plain.data.abs().max())
    assert rel > 1e-8
    ref2, _ = same_trajectory_autograd(model, th0, x, y, lrs, betas, outer, 20)
    ref2.pop("labels", None)
    assert_close_all(ref2, out)


def test_finite_differences():
    """Central differences of the reversible loss itself along random directions."""
    T = 6
    model, th0, x, y, lrs, betas, outer = tiny(T, S=2, n=3, soft=True, seed=3)
    opts = dict(strategy="reversible", max_denominator=1 << 20)
    out = meta_gradient(model, th0, x, y, lrs, outer, betas=betas, **opts)
    base = dict(theta0=th0, data=x, labels=y, lrs=lrs, betas=betas)
    g = torch.Generator().manual_seed(7)

    def L(**kw):
        a = {**base, **kw}
        return meta_gradient(model, a["theta0"], a["data"], a["labels"], a["lrs"], outer,
                             betas=a["betas"], **opts).loss.item()

    eps = 1e-5
    for name, value in base.items():
        d = torch.randn(value.shape, generator=g, dtype=F64)
        fd = (L(**{name: value + eps * d}) - L(**{name: value - eps * d})) / (2 * eps)
        an = float((getattr(out, name) * d).sum())
        assert abs(fd - an) <= 1e-6 * max(1.0, abs(an)), (name, fd, an)


# -- exact arithmetic ----------------------------------------------------------------------------------
def test_rational_multiplication_is_exact_and_within_one_unit():
    rng = random.Random(0)
    P = 64
    vals = [rng.randrange(-(STATE_LIMIT - 1), STATE_LIMIT) for _ in range(P - 6)]
    vals += [STATE_LIMIT - 1, -(STATE_LIMIT - 1), 0, -1, 1, -(1 << 40)]
    pairs = [(1, 2), (9, 10), (99, 100), (65535, 65536), (1, 65536), (40503, 45007), (3, 1 << 20)]
    buf = InfoBuffer(P, pairs)
    X = torch.tensor(vals, dtype=torch.int64)
    history = []
    for t, (n, d) in enumerate(pairs * 30):
        history.append(X)
        Y = buf.mul(X, n, d, t)
        for xi, yi in zip(X.tolist(), Y.tolist()):
            assert -d < xi * n - yi * d < d, (xi, yi, n, d)  # |Y − X·n/d| < 1
        X = Y
    for t in range(len(history) - 1, -1, -1):
        n, d = (pairs * 30)[t]
        X = buf.unmul(X, n, d, t)
        assert torch.equal(X, history[t]), t
    buf.assert_empty()


@pytest.mark.parametrize("beta", [0.5, 0.9, 0.99, "learned"])
def test_buffer_growth_matches_theory(beta):
    """The buffer holds within 2× of log2(1/β) bits per parameter per step; spilled words alone
    (64 bits each) stay within 2× once there are many of them."""
    T, P = 2000, 128
    g = torch.Generator().manual_seed(0)
    betas = (0.5 + 0.49 * torch.rand(T, generator=g, dtype=F64)).tolist() if beta == "learned" else [beta] * T
    pairs, _ = rational_betas(betas)
    buf = InfoBuffer(P, pairs)
    X = torch.randint(-(1 << 50), 1 << 50, (P,), generator=g)
    pushes = []
    for t, (n, d) in enumerate(pairs):
        G = torch.randint(-(1 << 46), 1 << 46, (P,), generator=g)  # stands in for (1−β)·g
        pushes.append(G)
        X = buf.mul(X, n, d, t) - G
    theory = theory_bits_per_step(pairs)
    measured = buf.bits_used() / (P * T)
    assert theory <= 1.01 * measured and measured <= 2 * theory, (measured, theory)
    if buf.spilled_words >= 5 * P:
        assert 64 * buf.spilled_words / (P * T) <= 2 * theory
    for t in range(T - 1, -1, -1):
        n, d = pairs[t]
        X = buf.unmul(X + pushes[t], n, d, t)
    buf.assert_empty()


def lenet_roundtrip(T):
    """T momentum steps of LeNet (one 28×28 image per step, float32, "learned" β in
    [0.85, 0.95] with denominators up to 2^16) forward in fixed point, then all the way back."""
    m = LeNet()
    g = torch.Generator().manual_seed(0)
    th0 = m.init("xavier", g)
    x = torch.randn(4, 1, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (4, 1), generator=g)
    lrs = torch.full((T,), 0.01)
    betas = 0.85 + 0.1 * torch.rand(T, generator=g)
    rm = ReversibleMomentum(InnerProblem(m, x, y, lrs, betas), th0)
    rm.forward()
    assert not torch.equal(rm.theta, rm.theta0_int)
    P = th0.numel()
    spilled, bits = rm.buffer.spilled_words, rm.buffer.bits_used() / (P * T)
    theory = theory_bits_per_step(rm.pairs)
    steps = 0
    for t, th_t, v_t, _ in rm.reverse():  # raises ReversibilityError unless exact
        steps += 1
    assert steps == T
    assert torch.equal(rm.theta, rm.theta0_int) and not bool(rm.v.any())  # Θ_0 and V_0 = 0
    assert torch.equal(th_t, rm.float_state(rm.theta0_int)) and not bool(v_t.any())
    assert rm.buffer.spilled_words == 0
    assert spilled > P  # the chunked buffer really spilled words
    assert theory <= 1.01 * bits <= 2 * theory
    return spilled / P


def test_lenet_1000_steps_recovers_theta0_and_v0_bit_exactly():
    assert lenet_roundtrip(1000) >= 2  # words spilled per parameter


@pytest.mark.slow
def test_lenet_10000_steps_recovers_theta0_and_v0_bit_exactly():
    """~100 s of CPU time (20,000 LeNet gradients + the integer arithmetic on 61,706 numbers)."""
    assert lenet_roundtrip(10_000) >= 20


# -- failures are loud -----------------------------------------------------------------------------------
class _Perturbed(FunctionalModel):
    """Wraps a model; ``hook(call, logits)`` may alter the logits of the ``call``-th synthetic batch."""

    def __init__(self, inner, n, hook):
        self.inner, self.n, self.hook, self.calls = inner, n, hook, 0
        self.specs, self.num_params = inner.specs, inner.num_params
        self.input_shape, self.num_outputs, self.name = inner.input_shape, inner.num_outputs, "perturbed"

    def apply(self, theta, x):
        out = self.inner.apply(theta, x)
        if x.shape[0] == self.n:  # the synthetic batch (the real batch has 16 examples)
            self.calls += 1
            out = self.hook(self.calls, out)
        return out


def test_unreplayed_randomness_is_detected():
    """Noise on every evaluation (e.g. dropout without replaying its draws)."""
    T = 8
    model, th0, x, y, lrs, betas, outer = tiny(T)
    noisy = _Perturbed(model, 4, lambda call, z: z + 1e-9 * torch.randn_like(z))
    with pytest.raises(ReversibilityError, match="bit"):
        meta_gradient(noisy, th0, x, y, lrs, outer, betas=betas, strategy="reversible")


@pytest.mark.parametrize("t0", [0, 5])
def test_one_perturbed_recomputation_is_detected(t0):
    """A single relative 1e-12 change in one recomputed gradient of the reverse pass."""
    T = 12
    model, th0, x, y, lrs, betas, outer = tiny(T)
    # synthetic calls: 1…T forward; reverse step t: recovery gradient, then the HVP's evaluation
    target = T + 2 * (T - 1 - t0) + 1
    flaky = _Perturbed(model, 4, lambda call, z: z * (1 + 1e-12) if call == target else z)
    with pytest.raises(ReversibilityError):
        meta_gradient(flaky, th0, x, y, lrs, outer, betas=betas, strategy="reversible")
    assert flaky.calls >= target


def test_overflow_is_reported_not_wrapped():
    T = 5
    model, th0, x, y, lrs, betas, outer = tiny(T)
    with pytest.raises(FixedPointOverflowError, match="θ_0"):
        meta_gradient(model, th0 + 600.0, x, y, lrs, outer, betas=betas, strategy="reversible")
    # 2^(61−58) = 8: a few large steps leave the range
    with pytest.raises(DivergenceError, match="radix_bits=58"):
        meta_gradient(model, th0, x, y, lrs * 1e4, outer, betas=betas, strategy="reversible",
                      radix_bits=58)
    fp = FixedPoint(52)
    with pytest.raises(FixedPointOverflowError):
        fp.to_int(torch.tensor([0.0, float("nan")]), "v")
    with pytest.raises(FixedPointOverflowError):
        fp.to_int(torch.tensor([512.0]), "v")
    assert int(fp.to_int(torch.tensor([511.9], dtype=F64), "v")) == round(511.9 * 2 ** 52)


@pytest.mark.parametrize("kwargs,match", [
    (dict(betas=None), "needs SGD with momentum"),
    (dict(betas="one"), r"must lie in \(0, 1\)"),
    (dict(radix_bits=0), "radix_bits"),
    (dict(max_denominator=1 << 21), "max_denominator"),
    (dict(betas="close"), "too close to 1|rounds to"),
])
def test_bad_configuration(kwargs, match):
    T = 3
    model, th0, x, y, lrs, betas, outer = tiny(T)
    if kwargs.get("betas") == "one":
        kwargs["betas"] = torch.tensor([0.5, 1.0, 0.5], dtype=F64)
    elif kwargs.get("betas") == "close":
        kwargs["betas"] = torch.tensor([0.5, 1 - 1e-7, 0.5], dtype=F64)
    kw = {"betas": betas, **kwargs}
    with pytest.raises(ConfigError, match=match):
        meta_gradient(model, th0, x, y, lrs, outer, strategy="reversible", **kw)


def test_stats_report_the_buffer():
    T = 20
    model, th0, x, y, lrs, betas, outer = tiny(T, beta=(0.9, 0.9))
    out = meta_gradient(model, th0, x, y, lrs, outer, betas=betas, strategy="reversible")
    st = out.stats
    P = th0.numel()
    assert st["strategy"] == "reversible" and st["radix_bits"] == 52
    assert st["spilled_words"] == 0 and st["info_buffer_bytes"] == 8 * P  # 20 × 0.15 bits: no spill yet
    assert st["stored_bytes"] == st["info_buffer_bytes"] + 16 * P
    assert math.isclose(st["info_bits_theory"], math.log2(10 / 9))
    # after 20 steps the live words are still short, so the floor of c div n shows: loose bounds
    assert 0.5 * st["info_bits_theory"] <= st["info_bits_per_param_step"] <= 2 * st["info_bits_theory"]
    assert st["beta_rounding"] < 1e-15 and st["fixed_point_range"] == 512.0


@pytest.mark.parametrize("engine", ["auto", "autograd"])
def test_lenet_matches_autograd_on_either_engine(engine):
    """LeNet's g_t, H·v and mixed terms come from the explicit engine by default (forward and
    reverse alike); either engine gives autograd's gradients through the quantised unroll."""
    m = LeNet()
    g = torch.Generator().manual_seed(3)
    f64 = torch.float64
    th0 = m.init("xavier", g, dtype=f64)
    x = torch.randn(2, 3, 1, 28, 28, generator=g, dtype=f64)
    y = torch.randint(0, 10, (2, 3), generator=g)
    lrs = 0.01 + 0.04 * torch.rand(5, generator=g, dtype=f64)
    betas = 0.5 + 0.4 * torch.rand(5, generator=g, dtype=f64)
    outer = make_outer_loss(m, torch.randn(8, 1, 28, 28, generator=g, dtype=f64), torch.arange(8))
    out = meta_gradient(m, th0, x, y, lrs, outer, betas=betas, strategy="reversible", engine=engine)
    assert out.stats["engine"] == ("lenet-explicit" if engine == "auto" else "autograd")
    th0q, bq = quantised(th0, betas)
    ref = meta_gradient(m, th0q, x, y, lrs, outer, betas=bq, strategy="autograd")
    assert_close_all({k: getattr(ref, k) for k in ("data", "lrs", "betas", "theta0")}, out)
