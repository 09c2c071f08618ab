"""The batched multi-network inner loop equals K separate runs (float64).

* forward: ``batched_apply`` equals K ``model.apply`` calls (LeNet 28/32 px, binary, AlexCifarNet;
  shared and per-network inputs);
* engines: the explicit LeNet R-op engine equals autograd's double backward (g, Hv, ∇_x v·g,
  ∇_y v·g) for hard, soft and binary labels;
* meta-gradient: ``meta_gradient_batched`` equals K calls of ``meta_gradient(strategy="autograd")``
  (GD and momentum; data, soft labels, lrs, betas, θ_0; own data orders; ``reduce="none"``);
  finite differences; bit-identical reruns; ``Distiller`` gives the same run either way.
"""
import pytest
import torch

from fastdistill import _backend
from fastdistill.backgrad import (make_batched_outer_loss, make_outer_loss, meta_gradient,
                                  meta_gradient_batched, meta_gradient_batched_reference)
from fastdistill.distill import DistillConfig, Distiller
from fastdistill.errors import ConfigError, ShapeError
from fastdistill.models import AlexCifarNet, LeNet, ModuleModel
from fastdistill.models.batched import (AutogradBatchedEngine, LeNetBatchedEngine, batched_apply,
                                        batched_engine, batched_inner_loss)

F64 = torch.float64
FIELDS = ("loss", "theta_T", "data", "labels", "lrs", "betas", "theta0")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def thetas(model, K, scheme="default", seed=0):
    return torch.stack([model.init(scheme, torch.Generator().manual_seed(seed + k), dtype=F64)
                        for k in range(K)])


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def assert_same(got, ref, rtol, fields=FIELDS):
    for f in fields:
        a, b = getattr(got, f), getattr(ref, f)
        assert (a is None) == (b is None), f
        if a is not None:
            assert a.shape == b.shape, f
            assert rel(a, b) < rtol, f"{f}: relative error {rel(a, b):.3g}"


MODELS = [LeNet(), LeNet(2), LeNet(10, 3, 32)]


# -- forward -----------------------------------------------------------------------------------
@pytest.mark.parametrize("model", MODELS + [AlexCifarNet()], ids=lambda m: m.describe())
@pytest.mark.parametrize("shared", [True, False], ids=["shared-x", "own-x"])
def test_batched_forward_equals_separate_applies(model, shared):
    K, n = (3, 5) if isinstance(model, LeNet) else (2, 2)
    th = thetas(model, K)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(((n,) if shared else (K, n)) + model.input_shape, generator=g, dtype=F64)
    got = batched_apply(model, th, x)
    ref = torch.stack([model.apply(th[k], x if shared else x[k]) for k in range(K)])
    assert got.shape == (K, n, model.num_outputs)
    assert (got - ref).abs().max() < 1e-12 * ref.abs().max()


def test_batched_forward_rejects_bad_input():
    m = LeNet()
    th = thetas(m, 2)
    with pytest.raises(ShapeError):
        batched_apply(m, th[:, :-1], torch.zeros(1, 1, 28, 28, dtype=F64))
    with pytest.raises(ShapeError):
        batched_apply(m, th, torch.zeros(3, 1, 1, 28, 28, dtype=F64))   # K = 3 ≠ 2
    with pytest.raises(ConfigError):
        batched_apply(ModuleModel(torch.nn.Linear(4, 2), (4,), 2), torch.zeros(2, 10), torch.zeros(1, 4))
    with pytest.raises(ConfigError):
        batched_engine(AlexCifarNet(), "lenet-explicit")
    with pytest.raises(ConfigError):
        batched_engine(m, "nope")


def test_batched_inner_loss_matches_inner_loss():
    from fastdistill.backgrad import inner_loss
    g = torch.Generator().manual_seed(2)
    z = torch.randn(3, 4, 10, generator=g, dtype=F64)
    for y in (torch.randint(0, 10, (4,), generator=g), torch.rand(4, 10, generator=g, dtype=F64)):
        ref = torch.stack([inner_loss(z[k], y) for k in range(3)])
        assert torch.allclose(batched_inner_loss(z, y), ref, rtol=1e-14, atol=0)


# -- engines -----------------------------------------------------------------------------------
def _labels(model, n, kind, g, K=None):
    lead = (n,) if K is None else (K, n)
    classes = 2 if model.num_outputs == 1 else model.num_outputs
    if kind == "hard":
        return torch.randint(0, classes, lead, generator=g)
    return torch.rand(lead + (classes,), generator=g, dtype=F64)


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.describe())
@pytest.mark.parametrize("kind", ["hard", "soft"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared-x", "own-x"])
def test_explicit_engine_equals_autograd_double_backward(model, kind, shared):
    K, n = 3, 4
    g = torch.Generator().manual_seed(3)
    th = thetas(model, K)
    x = torch.randn(((n,) if shared else (K, n)) + model.input_shape, generator=g, dtype=F64)
    y = _labels(model, n, kind, g, None if shared else K)
    v = torch.randn(K, model.num_params, generator=g, dtype=F64)
    A, E = AutogradBatchedEngine(model), LeNetBatchedEngine(model)
    la, ga = A.loss_grad(th, x, y)
    le, ge = E.loss_grad(th, x, y)
    assert rel(le, la) < 1e-12 and rel(ge, ga) < 1e-12
    ref, got = A.loss_grad_hvp(th, x, y, v), E.loss_grad_hvp(th, x, y, v)
    for name, a, b in zip(("g", "Hv", "d/dx v·g", "d/dy v·g"), got, ref):
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.shape == b.shape and rel(a, b) < 1e-12, name
    assert (got[3] is None) == (kind == "hard")


def test_engines_equal_per_network_double_backward():
    """The batched HVP row k is network k's own HVP (no mixing between networks)."""
    m = LeNet()
    K, n = 3, 4
    g = torch.Generator().manual_seed(4)
    th = thetas(m, K)
    x = torch.randn((n,) + m.input_shape, generator=g, dtype=F64)
    y = torch.randint(0, 10, (n,), generator=g)
    v = torch.randn(K, m.num_params, generator=g, dtype=F64)
    _, hv, gx, _ = LeNetBatchedEngine(m).loss_grad_hvp(th, x, y, v)
    gx_ref = torch.zeros_like(x)
    for k in range(K):
        t, xx = th[k].clone().requires_grad_(True), x.clone().requires_grad_(True)
        gk, = torch.autograd.grad(torch.nn.functional.cross_entropy(m.apply(t, xx), y), t, create_graph=True)
        hk, gxk = torch.autograd.grad(gk, [t, xx], grad_outputs=v[k])
        assert rel(hv[k], hk) < 1e-12
        gx_ref += gxk
    assert rel(gx, gx_ref) < 1e-12


# -- meta-gradient -----------------------------------------------------------------------------
def _problem(model, K=3, S=2, E=2, n=4, soft=False, momentum=False, seed=5):
    g = torch.Generator().manual_seed(seed)
    T = S * E
    data = torch.randn((S, n) + model.input_shape, generator=g, dtype=F64)
    classes = 2 if model.num_outputs == 1 else model.num_outputs
    if soft:
        labels = torch.rand((S, n, classes), generator=g, dtype=F64)
    else:
        labels = torch.randint(0, classes, (S, n), generator=g)
    lrs = 0.02 + 0.03 * torch.rand(T, generator=g, dtype=F64)
    betas = 0.3 + 0.5 * torch.rand(T, generator=g, dtype=F64) if momentum else None
    xr = torch.randn((12,) + model.input_shape, generator=g, dtype=F64)
    yr = torch.randint(0, classes, (12,), generator=g)
    return thetas(model, K, seed=seed), data, labels, lrs, betas, xr, yr


@pytest.mark.parametrize("momentum", [False, True], ids=["gd", "momentum"])
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
@pytest.mark.parametrize("engine", ["auto", "autograd"])
def test_meta_gradient_batched_equals_separate_autograd_runs(momentum, soft, engine):
    m = LeNet()
    th0, data, labels, lrs, betas, xr, yr = _problem(m, soft=soft, momentum=momentum)
    outer = make_batched_outer_loss(m, xr, yr)
    got = meta_gradient_batched(m, th0, data, labels, lrs, outer, betas=betas, engine=engine)
    outs = [meta_gradient(m, th0[k], data, labels, lrs, make_outer_loss(m, xr, yr), betas=betas,
                          strategy="autograd") for k in range(len(th0))]
    mean = lambda f: torch.stack([getattr(o, f) for o in outs]).mean(0)  # noqa: E731
    assert rel(got.loss, mean("loss")) < 1e-10
    assert rel(got.stats["losses"], torch.stack([o.loss for o in outs])) < 1e-10
    for f in ("data", "lrs") + (("labels",) if soft else ()) + (("betas",) if momentum else ()):
        assert rel(getattr(got, f), mean(f)) < 1e-10, f
    for k, o in enumerate(outs):
        assert rel(got.theta0[k], o.theta0) < 1e-10
        assert rel(got.theta_T[k], o.theta_T) < 1e-10
    assert got.labels is None if not soft else got.labels.shape == labels.shape
    assert got.stats["strategy"] == "batched" and got.stats["K"] == len(th0)
    assert got.stats["engine"] == ("lenet-explicit" if engine == "auto" else "autograd")
    if engine == "auto":   # the ops that ran in this call report their backend, and only those
        if _backend.has_kernel("fastdistill::lenet_grad_hvp", "CPU"):
            assert got.stats["backends"] == {"lenet_step": "cpp"}   # one fused C++ step
        else:   # the reference step issues every layer op
            assert got.stats["backends"] == {op: "reference" for op in LeNetBatchedEngine.OPS}


def test_stats_report_the_layer_ops_of_the_reference_step():
    """Forcing lenet_step's reference: every layer op the torch step issues is reported (and
    stays reported only for the call that ran it)."""
    m = LeNet()
    th0, data, labels, lrs, _, xr, yr = _problem(m, K=2)
    with _backend.use_backend("reference", "lenet_step"):
        got = meta_gradient_batched(m, th0, data, labels, lrs, make_outer_loss(m, xr, yr))
    assert set(got.stats["backends"]) == set(LeNetBatchedEngine.OPS)
    assert got.stats["backends"]["lenet_step"] == "reference"
    if _backend.has_kernel("fastdistill::lenet_grad_hvp", "CPU"):
        again = meta_gradient_batched(m, th0, data, labels, lrs, make_outer_loss(m, xr, yr))
        assert again.stats["backends"] == {"lenet_step": "cpp"}


@pytest.mark.parametrize("momentum", [False, True], ids=["gd", "momentum"])
def test_own_data_orders_and_per_network_results(momentum):
    m = LeNet()
    th0, data, labels, lrs, betas, xr, yr = _problem(m, soft=True, momentum=momentum, seed=6)
    orders = torch.randint(0, data.shape[0], (len(th0), len(lrs)), generator=torch.Generator().manual_seed(7))
    outer = make_batched_outer_loss(m, xr, yr)
    for reduce in ("mean", "none"):
        for o in (None, orders):
            got = meta_gradient_batched(m, th0, data, labels, lrs, outer, betas=betas, orders=o,
                                        reduce=reduce)
            ref = meta_gradient_batched_reference(m, th0, data, labels, lrs, outer, betas=betas,
                                                  orders=o, reduce=reduce, strategy="autograd")
            assert_same(got, ref, 1e-10)
            if reduce == "none":
                assert got.data.shape == (len(th0),) + tuple(data.shape)
                assert got.lrs.shape == (len(th0), len(lrs))


def test_binary_model_and_list_of_outer_losses():
    m = LeNet(2)
    th0, data, labels, lrs, _, xr, yr = _problem(m, K=2, soft=True, seed=8)
    outers = [make_outer_loss(m, xr, yr), make_outer_loss(m, xr[:6], yr[:6])]
    got = meta_gradient_batched(m, th0, data, labels, lrs, outers)
    ref = meta_gradient_batched_reference(m, th0, data, labels, lrs, outers, strategy="autograd")
    assert_same(got, ref, 1e-10)


def test_alexcifarnet_batched_meta_gradient():
    m = AlexCifarNet()
    th0, data, labels, lrs, betas, xr, yr = _problem(m, K=2, S=1, E=2, n=2, soft=True, momentum=True, seed=9)
    outer = make_batched_outer_loss(m, xr[:4], yr[:4])
    got = meta_gradient_batched(m, th0, data, labels, lrs, outer, betas=betas)
    ref = meta_gradient_batched_reference(m, th0, data, labels, lrs, outer, betas=betas,
                                          strategy="autograd")
    assert got.stats["engine"] == "autograd"
    assert_same(got, ref, 1e-10)


def test_finite_differences():
    """Directional derivatives of mean_k L_k along random directions in x̃, ỹ, η.

    ReLU and max-pool make L piecewise smooth: a step of 1e-4 can cross a kink, so the central
    difference uses 1e-6 (float64 round-off in it is ~1e-10).
    """
    m = LeNet()
    th0, data, labels, lrs, _, xr, yr = _problem(m, K=2, S=1, E=2, n=3, soft=True, seed=10)
    outer = make_batched_outer_loss(m, xr, yr)
    got = meta_gradient_batched(m, th0, data, labels, lrs, outer)
    f = lambda d, y, lr: float(meta_gradient_batched(m, th0, d, y, lr, outer).loss)  # noqa: E731
    g = torch.Generator().manual_seed(11)
    eps = 1e-6
    for which, grad in (("data", got.data), ("labels", got.labels), ("lrs", got.lrs)):
        base = {"data": data, "labels": labels, "lrs": lrs}
        u = torch.randn(base[which].shape, generator=g, dtype=F64)
        plus, minus = dict(base), dict(base)
        plus[which], minus[which] = base[which] + eps * u, base[which] - eps * u
        fd = (f(plus["data"], plus["labels"], plus["lrs"]) - f(minus["data"], minus["labels"], minus["lrs"])) / (2 * eps)
        an = float((grad * u).sum())
        assert abs(fd - an) <= 1e-6 * max(1.0, abs(an)), (which, fd, an)


def test_bit_identical_reruns():
    m = LeNet()
    th0, data, labels, lrs, betas, xr, yr = _problem(m, soft=True, momentum=True, seed=12)
    th0, data, lrs, betas = th0.float(), data.float(), lrs.float(), betas.float()
    labels, xr = labels.float(), xr.float()
    outer = make_batched_outer_loss(m, xr, yr)
    a = meta_gradient_batched(m, th0, data, labels, lrs, outer, betas=betas)
    b = meta_gradient_batched(m, th0, data, labels, lrs, outer, betas=betas)
    for f in FIELDS:
        assert torch.equal(getattr(a, f), getattr(b, f)), f


def test_outer_loss_chunking_is_exact():
    m = LeNet()
    th0, *_, xr, yr = _problem(m, seed=13)
    eng = LeNetBatchedEngine(m)
    L1, g1 = make_batched_outer_loss(m, xr, yr, chunk=10_000, mode="batched").loss_grad(th0, eng)
    L2, g2 = make_batched_outer_loss(m, xr, yr, chunk=3 * 5, mode="batched").loss_grad(th0, eng)  # 5 a chunk
    L3, g3 = make_batched_outer_loss(m, xr, yr).loss_grad(th0, eng)                  # per network
    assert rel(L2, L1) < 1e-13 and rel(g2, g1) < 1e-13
    assert rel(L3, L1) < 1e-13 and rel(g3, g1) < 1e-12
    with pytest.raises(ConfigError):
        make_batched_outer_loss(m, xr, yr, mode="fast")


def test_meta_gradient_batched_rejects_bad_arguments():
    m = LeNet()
    th0, data, labels, lrs, *_ = _problem(m, K=2, seed=14)
    outer = make_outer_loss(m, data[0], labels[0])
    with pytest.raises(ShapeError):
        meta_gradient_batched(m, th0[0], data, labels, lrs, outer)
    with pytest.raises(ShapeError):
        meta_gradient_batched(m, th0, data, labels, lrs, outer, orders=torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ShapeError):
        meta_gradient_batched(m, th0, data, labels, lrs, outer,
                              orders=torch.full((2, len(lrs)), 5, dtype=torch.long))
    with pytest.raises(ShapeError):
        meta_gradient_batched(m, th0, data, labels, lrs, [outer])
    with pytest.raises(ConfigError):
        meta_gradient_batched(m, th0, data, labels, lrs, outer, reduce="sum")


# -- Distiller ---------------------------------------------------------------------------------
@pytest.mark.parametrize("opt", ["gd", "sgdm"])
def test_distiller_batched_equals_per_network_loop(opt):
    g = torch.Generator().manual_seed(15)
    x, y = torch.randn(48, 1, 28, 28, generator=g), torch.arange(48) % 10
    runs = {}
    for batched in (True, False):
        cfg = DistillConfig(iterations=2, real_batch=24, mode="random", n_nets=3, batched=batched,
                            dtype="float64", inner_optimizer=opt, soft_labels=True)
        d = Distiller(cfg, x, y, 10)
        recs = [d.step() for _ in range(2)]
        runs[batched] = d, recs
    (a, ra), (b, rb) = runs[True], runs[False]
    assert torch.equal(a.init_gen.get_state(), b.init_gen.get_state())   # the same θ_0 draws
    assert rel(a.data.detach(), b.data.detach()) < 1e-10
    assert rel(a.raw_labels.detach(), b.raw_labels.detach()) < 1e-10
    assert rel(a.lrs(), b.lrs()) < 1e-10
    assert all(abs(p["loss"] - q["loss"]) < 1e-10 for p, q in zip(ra, rb))
