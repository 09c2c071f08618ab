"""``auto``: the fastest exact strategy whose estimated memory fits the budget."""
import pytest
import torch
from torch import nn

from fastdistill.backgrad import STRATEGIES, make_outer_loss, meta_gradient
from fastdistill.backgrad.auto import plan_strategy, step_graph_bytes
from fastdistill.backgrad.common import InnerProblem
from fastdistill.errors import ConfigError
from fastdistill.models import ModuleModel

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def tiny(T, momentum, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    model = ModuleModel(nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).to(F64), (6,), 3)
    th0 = model.init("xavier", g, dtype=F64)
    x = torch.randn(2, n, 6, generator=g, dtype=F64)
    y = torch.randint(0, 3, (2, n), generator=g)
    lrs = torch.full((T,), 0.2, dtype=F64)
    betas = torch.full((T,), 0.9, dtype=F64) if momentum else None
    outer = make_outer_loss(model, torch.randn(16, 6, generator=g, dtype=F64), torch.randint(0, 3, (16,), generator=g))
    return model, th0, x, y, lrs, betas, outer


def test_registered():
    for name in ("checkpointed", "reversible", "auto"):
        assert name in STRATEGIES


def test_step_graph_bytes_grows_with_the_batch():
    sizes = []
    for n in (4, 64):
        model, th0, x, y, lrs, _, _ = tiny(3, False, n=n)
        sizes.append(step_graph_bytes(InnerProblem(model, x, y, lrs), th0))
    small, big = sizes
    assert 0 < small < big


@pytest.mark.parametrize("momentum", [False, True], ids=["gd", "sgdm"])
def test_choice_follows_the_budget(momentum):
    T = 40
    model, th0, x, y, lrs, betas, outer = tiny(T, momentum)
    prob = InnerProblem(model, x, y, lrs, betas)
    plan = plan_strategy(prob, th0, 1 << 40)
    est = plan["estimates"]
    assert plan["choice"] == "autograd"  # everything fits: the fastest wins
    # just below autograd's estimate, above stored's
    assert est["stored"]["bytes"] < est["autograd"]["bytes"]
    plan = plan_strategy(prob, th0, est["autograd"]["bytes"] - 1)
    assert plan["choice"] == "stored"
    # just below stored: binomial checkpointing with almost T snapshots (≈ one extra step in all)
    plan = plan_strategy(prob, th0, est["stored"]["bytes"] - 1)
    assert plan["choice"] == "checkpointed"
    s = plan["options"]["max_states"]
    assert 1 <= s < T and plan["estimates"]["checkpointed"]["bytes"] <= plan["budget"]
    if momentum:  # with room for only a few snapshots, the reversible unroll is faster
        plan = plan_strategy(prob, th0, est["reversible"]["bytes"])
        assert plan["choice"] == "reversible"
        assert plan["estimates"]["checkpointed"]["cost_per_step"] > est["reversible"]["cost_per_step"]


def test_nothing_fits_is_an_error():
    model, th0, x, y, lrs, betas, outer = tiny(10, False)
    with pytest.raises(ConfigError, match="no exact strategy fits"):
        meta_gradient(model, th0, x, y, lrs, outer, strategy="auto", memory_budget=100)
    with pytest.raises(ConfigError, match="positive"):
        meta_gradient(model, th0, x, y, lrs, outer, strategy="auto", memory_budget=-5)


@pytest.mark.parametrize("momentum", [False, True], ids=["gd", "sgdm"])
def test_runs_the_chosen_strategy(momentum):
    T = 12
    model, th0, x, y, lrs, betas, outer = tiny(T, momentum)
    prob = InnerProblem(model, x, y, lrs, betas)
    est = plan_strategy(prob, th0, 1 << 40)["estimates"]
    budget = est["reversible" if momentum else "stored"]["bytes"] - (0 if momentum else 1)
    out = meta_gradient(model, th0, x, y, lrs, outer, betas=betas, strategy="auto", memory_budget=budget)
    plan = out.stats["auto"]
    assert out.stats["strategy"] == plan["choice"] != "stored"
    ref = meta_gradient(model, th0, x, y, lrs, outer, betas=betas, strategy="stored")
    for k in ("data", "lrs", "theta0") + (("betas",) if momentum else ()):
        torch.testing.assert_close(getattr(out, k), getattr(ref, k), rtol=1e-10, atol=1e-14)


def test_default_budget_is_reported():
    model, th0, x, y, lrs, betas, outer = tiny(5, False)
    out = meta_gradient(model, th0, x, y, lrs, outer, strategy="auto")
    assert out.stats["auto"]["budget"] > 0
    assert "MemAvailable" in out.stats["auto"]["budget_source"]


def test_lenet_prefers_stored_on_its_explicit_engine():
    """On LeNet stored runs the explicit engine, cheaper per step than autograd: with room for
    everything auto chooses stored, not autograd."""
    from fastdistill.backgrad.auto import COST_AUTOGRAD, COST_STORED_EXPLICIT
    from fastdistill.models import LeNet
    m = LeNet()
    th0 = m.init("xavier", torch.Generator().manual_seed(0))
    x, y = torch.randn(1, 4, 1, 28, 28), torch.arange(4).view(1, 4)
    plan = plan_strategy(InnerProblem(m, x, y, torch.full((3,), 0.02)), th0, 1 << 40)
    assert plan["choice"] == "stored" and COST_STORED_EXPLICIT < COST_AUTOGRAD
    assert plan["estimates"]["stored"]["cost_per_step"] == COST_STORED_EXPLICIT
