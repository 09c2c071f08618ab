"""SLDD soft labels through the Distiller: gradients vs autograd and finite differences (float64),
fewer images than classes, label_softmax, checkpoints and bad inputs."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastdistill.distill import DistillConfig, Distiller, initial_labels, top_labels
from fastdistill.errors import ConfigError, ShapeError
from fastdistill.evaluate import evaluate_distilled
from fastdistill.models import ModuleModel


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread avoids oversubscription on a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

C = 4


def tiny_model():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 6), nn.Tanh(), nn.Linear(6, C)).double()
    return ModuleModel(net, (1, 4, 4), C)


def toy_data(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % C
    x = torch.randn(n, 1, 4, 4, generator=g, dtype=torch.float64) + y.view(-1, 1, 1, 1).double()
    return x, y


def cfg(**kw):
    base = dict(dtype="float64", steps=2, epochs=2, iterations=1, real_batch=10 ** 6, lr0=0.3,
                soft_labels=True, backgrad="stored", checkpoint_every=0)
    base.update(kw)
    return DistillConfig(**base)


def reference_loss(model, theta0s, data, raw_labels, raw_lrs, x, y, softmax):
    """L averaged over θ_0s, by plain autograd through the whole unroll (the oracle)."""
    lab = torch.softmax(raw_labels, -1) if softmax else raw_labels
    lrs = F.softplus(raw_lrs)
    S, total = data.shape[0], 0.0
    for th0 in theta0s:
        th = th0.clone().requires_grad_(True)
        for t in range(len(lrs)):
            s = t % S
            loss = -(lab[s] * F.log_softmax(model.apply(th, data[s]), 1)).sum(1).mean()
            g, = torch.autograd.grad(loss, th, create_graph=True)
            th = th - lrs[t] * g
        total = total + F.cross_entropy(model.apply(th, x), y)
    return total / len(theta0s)


def snapshot_and_step(d):
    data0 = d.data.detach().clone()
    lab0 = d.raw_labels.detach().clone()
    rho0 = d.raw_lrs.detach().clone()
    d.step()
    return data0, lab0, rho0


@pytest.mark.parametrize("softmax", [False, True])
def test_label_gradient_matches_autograd(softmax):
    m = tiny_model()
    x, y = toy_data()
    d = Distiller(cfg(label_softmax=softmax), x, y, C, model=m)
    with torch.no_grad():  # move off the one-hot init so every entry matters
        d.raw_labels.add_(0.3 * torch.randn(d.raw_labels.shape, generator=torch.Generator().manual_seed(1),
                                            dtype=torch.float64))
    th0 = d.theta0
    data0, lab0, rho0 = snapshot_and_step(d)
    X, R, P = data0.requires_grad_(True), lab0.requires_grad_(True), rho0.requires_grad_(True)
    L = reference_loss(m, [th0], X, R, P, x, y, softmax)
    gx, gr, gp = torch.autograd.grad(L, [X, R, P])
    torch.testing.assert_close(d.raw_labels.grad, gr, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(d.data.grad, gx, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(d.raw_lrs.grad, gp, rtol=1e-9, atol=1e-11)
    assert gr.abs().max() > 1e-6  # the test can fail: the label gradient is not trivially zero


@pytest.mark.parametrize("softmax", [False, True])
def test_label_gradient_matches_finite_differences(softmax):
    m = tiny_model()
    x, y = toy_data()
    d = Distiller(cfg(label_softmax=softmax, steps=1, epochs=3), x, y, C, model=m)
    th0 = d.theta0
    data0, lab0, rho0 = snapshot_and_step(d)
    got = d.raw_labels.grad
    eps = 1e-6
    g = torch.Generator().manual_seed(3)
    for _ in range(6):
        i = tuple(int(torch.randint(s, (1,), generator=g)) for s in lab0.shape)
        lp, lm = lab0.clone(), lab0.clone()
        lp[i] += eps
        lm[i] -= eps
        with torch.enable_grad():
            fd = (reference_loss(m, [th0], data0, lp, rho0, x, y, softmax)
                  - reference_loss(m, [th0], data0, lm, rho0, x, y, softmax)) / (2 * eps)
        fd = float(fd.detach())
        assert abs(fd - float(got[i])) <= 1e-7 + 1e-5 * abs(fd), (i, fd, float(got[i]))


def test_random_init_averages_label_gradients_over_nets():
    m = tiny_model()
    x, y = toy_data()
    pool = [m.init("xavier", torch.Generator().manual_seed(s), dtype=torch.float64) for s in (5, 6)]
    calls = []

    def init_fn(g):
        calls.append(1)
        return pool[(len(calls) - 1) % 2].clone()

    d = Distiller(cfg(mode="random", n_nets=2), x, y, C, model=m, init_fn=init_fn)
    data0, lab0, rho0 = snapshot_and_step(d)
    R = lab0.requires_grad_(True)
    gr, = torch.autograd.grad(reference_loss(m, pool, data0, R, rho0, x, y, False), [R])
    torch.testing.assert_close(d.raw_labels.grad, gr, rtol=1e-9, atol=1e-11)


def test_fewer_images_than_classes_runs_and_evaluates():
    m = tiny_model()
    x, y = toy_data()
    d = Distiller(cfg(label_classes=[0, 2], label_softmax=True, iterations=3), x, y, C, model=m)
    assert d.data.shape[:2] == (2, 2)
    torch.testing.assert_close(d.raw_labels[0], F.one_hot(torch.tensor([0, 2]), C).double())
    d.run()
    r = d.result()
    assert r.labels.shape == (2, 2, C) and r.labels.is_floating_point()
    torch.testing.assert_close(r.labels.sum(-1), torch.ones(2, 2, dtype=torch.float64))  # softmax rows
    rep = evaluate_distilled(m, r.data, r.labels, r.lrs, x, y, [r.theta0])
    assert rep.n_models == 1 and 0.0 <= rep.after[0] <= 1.0
    assert not torch.equal(d.raw_labels.detach(), F.one_hot(d.labels, C).double())  # labels learned


def test_checkpoint_restores_learned_labels(tmp_path):
    m = tiny_model()
    x, y = toy_data()
    d = Distiller(cfg(iterations=2), x, y, C, model=m)
    d.run(checkpoint_path=tmp_path / "ck.pt")
    e = Distiller(cfg(iterations=2), x, y, C, model=m)
    e.load_checkpoint(tmp_path / "ck.pt")
    torch.testing.assert_close(e.raw_labels.detach(), d.raw_labels.detach(), rtol=0, atol=0)
    assert e.iteration == 2


def test_bad_label_inputs_raise_clear_errors():
    m = tiny_model()
    x, y = toy_data()
    with pytest.raises(ConfigError, match="unknown class index 7"):
        Distiller(cfg(label_classes=[0, 7]), x, y, C, model=m)
    with pytest.raises(ConfigError, match="unknown class index -1"):
        initial_labels(C, 1, 1, [-1])
    with pytest.raises(ConfigError, match="empty"):
        Distiller(cfg(label_classes=[]), x, y, C, model=m)
    with pytest.raises(ConfigError, match="label_softmax needs soft_labels"):
        cfg(soft_labels=False, label_softmax=True).validate()
    y_missing = y.clone()
    y_missing[y_missing == 3] = 2
    with pytest.raises(ShapeError, match=r"classes \[3\] have no training examples"):
        Distiller(cfg(), x, y_missing, C, model=m)


def test_top_labels_reports_the_largest_entries():
    lab = torch.tensor([[[0.1, 2.0, -1.0, 0.5], [3.0, 0.0, 0.2, 0.1]]])
    tops = top_labels(lab, k=3)
    assert [c for c, _ in tops[0]] == [1, 3, 0]
    assert [c for c, _ in tops[1]] == [0, 2, 3]
    assert top_labels(torch.tensor([[2, 0]])) == [[(2, 1.0)], [(0, 1.0)]]
