"""The ``checkpointed`` strategy: same meta-gradient as ``stored``, bounded stored states.

The schedules are checked on their own (optimal forward-step count against a brute-force
dynamic programme, O(log T) snapshots at T = 10,000 with a gradient-free stand-in for the
inner loop) and end to end against ``stored`` and finite differences in float64.
"""
import math
from functools import lru_cache

import pytest
import torch
from torch import nn

from fastdistill.backgrad import make_outer_loss, meta_gradient
from fastdistill.backgrad.checkpointed import (_binomial, _uniform, binomial_cost, binomial_split,
                                               repetitions, uniform_segment)
from fastdistill.errors import ConfigError
from fastdistill.models import LeNet, ModuleModel

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # the test machines are shared: one intra-op thread is faster and quieter than two
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def tiny(T, *, S=3, n=4, momentum=False, soft=False, seed=0):
    """A 6→5→3 tanh MLP problem in float64 (P = 53)."""
    g = torch.Generator().manual_seed(seed)
    model = ModuleModel(nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).to(F64), (6,), 3)
    th0 = model.init("xavier", g, dtype=F64) + 0.1 * torch.randn(model.num_params, generator=g, dtype=F64)
    x = torch.randn(S, n, 6, generator=g, dtype=F64)
    y = (torch.randn(S, n, 3, generator=g, dtype=F64).softmax(-1) if soft
         else torch.randint(0, 3, (S, n), generator=g))
    lrs = 0.1 + 0.4 * torch.rand(T, generator=g, dtype=F64)
    betas = 0.4 + 0.5 * torch.rand(T, generator=g, dtype=F64) if momentum else None
    outer = make_outer_loss(model, torch.randn(16, 6, generator=g, dtype=F64),
                            torch.randint(0, 3, (16,), generator=g))
    return model, th0, x, y, lrs, betas, outer


def grads(out):
    return {k: getattr(out, k) for k in ("data", "labels", "lrs", "betas", "theta0")
            if getattr(out, k) is not None}


def assert_same(ref, out):
    a, b = grads(ref), grads(out)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-10, atol=1e-14, msg=k)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-12, atol=0)


# -- the schedules ---------------------------------------------------------------------------------
@lru_cache(maxsize=None)
def dp_cost(l, s):
    """Brute force: fewest forward steps to reverse l steps from one state with s snapshots."""
    if l <= 1:
        return 0
    if s == 1:
        return l * (l - 1) // 2
    return min(j + dp_cost(l - j, s - 1) + dp_cost(j, s) for j in range(1, l))


@pytest.mark.parametrize("s", [1, 2, 3, 4, 6])
def test_binomial_cost_and_split_are_optimal(s):
    for l in range(1, 70):
        assert binomial_cost(l, s) == dp_cost(l, s), (l, s)
        if l >= 2 and s >= 2:
            j = binomial_split(l, s)
            assert 1 <= j < l
            assert j + binomial_cost(l - j, s - 1) + binomial_cost(j, s) == dp_cost(l, s), (l, s, j)


class _CountingRun:
    """Stand-in for the inner loop: states are tiny tensors holding t, steps are counted."""

    def __init__(self):
        self.forward_steps, self.reversed = 0, []

    def advance(self, st, t):
        assert int(st[0]) == t
        self.forward_steps += 1
        return (torch.tensor(t + 1), None)

    def advance_to(self, st, a, b):
        for t in range(a, b):
            st = self.advance(st, t)
        return st

    def reverse(self, st, t):
        assert int(st[0]) == t
        if not self.reversed:  # the real run advances θ_{T−1} → θ_T here
            self.forward_steps += 1
        self.reversed.append(t)


@pytest.mark.parametrize("T,s", [(1, 1), (2, 1), (10, 3), (17, 4), (1000, 11), (10_000, 15), (10_000, 100)])
def test_binomial_schedule_order_memory_and_cost(T, s):
    run = _CountingRun()
    peak = _binomial(run, (torch.tensor(0), None), T, s)
    assert run.reversed == list(range(T - 1, -1, -1))
    assert peak <= s
    assert run.forward_steps == binomial_cost(T, s) + 1
    r = repetitions(T, s)
    assert run.forward_steps <= r * T + 1
    if T == 10_000 and s == 15:  # O(log T) snapshots (⌈log2 T⌉ + 1), O(T log T) steps
        assert s == math.ceil(math.log2(T)) + 1 and r == 5


@pytest.mark.parametrize("T,budget", [(1, None), (17, None), (100, None), (100, 30), (10_000, None)])
def test_uniform_schedule_order_memory_and_cost(T, budget):
    k = uniform_segment(T, budget)
    run = _CountingRun()
    peak = _uniform(run, (torch.tensor(0), None), T, k)
    assert run.reversed == list(range(T - 1, -1, -1))
    assert peak <= -(-T // k) + k - 1
    if budget is not None:
        assert peak <= budget
    if budget is None and T > 1:
        assert peak <= 2 * math.isqrt(T) + 1
    assert run.forward_steps == 2 * T - (-(-T // k))  # T − 1 + 1, then each segment once more


def test_uniform_budget_too_small_is_explained():
    with pytest.raises(ConfigError, match="binomial"):
        uniform_segment(100, 10)


# -- end to end --------------------------------------------------------------------------------------
CASES = [dict(schedule="uniform"), dict(schedule="binomial"), dict(schedule="binomial", max_states=1),
         dict(schedule="binomial", max_states=2), dict(schedule="uniform", max_states=8)]


@pytest.mark.parametrize("momentum", [False, True], ids=["gd", "sgdm"])
@pytest.mark.parametrize("T", [1, 2, 9, 13])
def test_equals_stored(T, momentum):
    model, th0, x, y, lrs, betas, outer = tiny(T, momentum=momentum, soft=T % 2 == 1)
    ref = meta_gradient(model, th0, x, y, lrs, outer, betas=betas, strategy="stored")
    for opts in CASES:
        if opts.get("max_states") == 8 and T < 9:
            continue
        out = meta_gradient(model, th0, x, y, lrs, outer, betas=betas, strategy="checkpointed", **opts)
        assert_same(ref, out)
        # the recomputed states use stored's arithmetic, so the result is even bit-identical
        for k, v in grads(ref).items():
            assert torch.equal(grads(out)[k], v), (opts, k)
        st = out.stats
        assert st["peak_states"] <= st["max_states"]
        if opts["schedule"] == "binomial":
            assert st["forward_steps"] == binomial_cost(T, st["max_states"]) + 1


def test_lenet_equals_stored():
    m = LeNet()
    g = torch.Generator().manual_seed(1)
    th0 = m.init("xavier", g, dtype=F64)
    x = torch.randn(2, 2, 1, 28, 28, generator=g, dtype=F64)
    y = torch.tensor([[0, 1], [2, 3]])
    lrs = torch.full((5,), 0.02, dtype=F64)
    outer = make_outer_loss(m, torch.randn(8, 1, 28, 28, generator=g, dtype=F64), torch.arange(8))
    ref = meta_gradient(m, th0, x, y, lrs, outer, strategy="stored")
    for opts in (dict(schedule="binomial", max_states=2), dict(schedule="uniform")):
        out = meta_gradient(m, th0, x, y, lrs, outer, strategy="checkpointed", **opts)
        assert_same(ref, out)
        assert out.stats["stored_bytes"] < ref.stats["stored_bytes"]
        # both on LeNet's explicit engine, with the same per-step arithmetic: bit-identical
        assert out.stats["engine"] == ref.stats["engine"] == "lenet-explicit"
        for k, v in grads(ref).items():
            assert torch.equal(grads(out)[k], v), (opts, k)
    slow = meta_gradient(m, th0, x, y, lrs, outer, strategy="checkpointed", engine="autograd")
    assert slow.stats["engine"] == "autograd"
    assert_same(ref, slow)


def test_memory_budget_in_bytes():
    model, th0, x, y, lrs, betas, outer = tiny(20, momentum=True)
    state = 2 * th0.numel() * 8  # (θ, v) in float64
    out = meta_gradient(model, th0, x, y, lrs, outer, betas=betas, strategy="checkpointed",
                        memory_budget=4 * state + 7)
    assert out.stats["max_states"] == 4 and out.stats["stored_bytes"] <= 4 * state
    with pytest.raises(ConfigError, match="below one stored state"):
        meta_gradient(model, th0, x, y, lrs, outer, betas=betas, strategy="checkpointed",
                      memory_budget=state - 1)


@pytest.mark.parametrize("opts,match", [
    (dict(schedule="revolve"), "unknown checkpoint schedule"),
    (dict(max_states=3, memory_budget=10**6), "not both"),
    (dict(max_states=0), "positive integer"),
    (dict(schedule="uniform", max_states=4), "uniform schedule needs at least"),
])
def test_bad_options(opts, match):
    model, th0, x, y, lrs, betas, outer = tiny(30)
    with pytest.raises(ConfigError, match=match):
        meta_gradient(model, th0, x, y, lrs, outer, strategy="checkpointed", **opts)


def test_finite_differences():
    """Central differences of L along random directions, for every input of the unroll."""
    T = 6
    model, th0, x, y, lrs, _, outer = tiny(T, S=2, n=3, soft=True, seed=3)
    out = meta_gradient(model, th0, x, y, lrs, outer, strategy="checkpointed", max_states=2)
    base = dict(theta0=th0, data=x, labels=y, lrs=lrs)
    g = torch.Generator().manual_seed(7)

    def L(**kw):
        a = {**base, **kw}
        return meta_gradient(model, a["theta0"], a["data"], a["labels"], a["lrs"], outer,
                             strategy="checkpointed", max_states=2).loss.item()

    eps = 1e-6
    for name, value in base.items():
        d = torch.randn(value.shape, generator=g, dtype=F64)
        fd = (L(**{name: value + eps * d}) - L(**{name: value - eps * d})) / (2 * eps)
        an = float((getattr(out, name) * d).sum())
        assert abs(fd - an) <= 1e-6 * max(1.0, abs(an)), (name, fd, an)
