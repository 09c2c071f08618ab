"""DD's outer loop: reproducibility, gradients through softplus, errors, checkpoint round trip."""
import math

import pytest
import torch
import torch.nn.functional as F

from fastdistill.backgrad import make_outer_loss, meta_gradient
from fastdistill.distill import DistillConfig, Distiller, inverse_softplus
from fastdistill.errors import ConfigError, DivergenceError, ShapeError
from fastdistill.evaluate import evaluate_distilled, heldout_inits, train_on_distilled


@pytest.fixture(scope="module")
def toy():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(80) % 10
    # class-dependent blobs so that distillation can make progress
    centers = torch.randn(10, 1, 28, 28, generator=g)
    x = centers[y] + 0.5 * torch.randn(80, 1, 28, 28, generator=g)
    return x, y


def test_inverse_softplus():
    for v in (0.001, 0.02, 1.0, 30.0):
        assert abs(F.softplus(torch.tensor(inverse_softplus(v), dtype=torch.float64)).item() - v) < 1e-12
    with pytest.raises(ConfigError):
        inverse_softplus(0.0)


def test_seeded_runs_are_reproducible(toy):
    x, y = toy
    cfg = DistillConfig(iterations=3, real_batch=32, steps=2, epochs=2)
    a, b = Distiller(cfg, x, y, 10), Distiller(cfg, x, y, 10)
    a.run(); b.run()
    assert torch.equal(a.data, b.data) and torch.equal(a.raw_lrs, b.raw_lrs)
    c = Distiller(DistillConfig(iterations=3, real_batch=32, steps=2, epochs=2, seed=1), x, y, 10)
    c.run()
    assert not torch.equal(a.data, c.data)


def test_step_gradient_is_meta_gradient_through_softplus(toy):
    """The gradient the Distiller hands Adam equals autograd through η = softplus(ρ)."""
    x, y = toy
    cfg = DistillConfig(iterations=1, real_batch=16, steps=1, epochs=2, dtype="float64")
    d = Distiller(cfg, x, y, 10)
    # replay the batch the step will draw
    state = d.batches.state()
    idx = d.batches.next()
    d.batches.load(state)
    rho = d.raw_lrs.detach().clone().requires_grad_(True)
    data0 = d.data.detach().clone()
    out = meta_gradient(d.model, d.theta0, data0, d.labels, F.softplus(rho).detach(),
                        make_outer_loss(d.model, d.train_x[idx], d.train_y[idx]), strategy="autograd")
    F.softplus(rho).backward(out.lrs)
    opt_step = d.opt.step
    seen = {}

    def capture(*a, **k):
        seen["data"] = d.data.grad.clone()
        seen["rho"] = d.raw_lrs.grad.clone()
        return opt_step(*a, **k)

    d.opt.step = capture
    d.step()
    assert torch.allclose(seen["data"], out.data, rtol=1e-10, atol=1e-14)
    assert torch.allclose(seen["rho"], rho.grad, rtol=1e-10, atol=1e-14)


def test_distillation_improves_on_separable_toy(toy):
    x, y = toy
    cfg = DistillConfig(iterations=40, real_batch=40, steps=1, epochs=3, outer_lr=0.05)
    d = Distiller(cfg, x, y, 10)
    first = d.step()["loss"]
    d.run()
    r = d.result()
    assert d.history[-1]["loss"] < first
    rep = evaluate_distilled(d.model, r.data, r.labels, r.lrs, x, y, [r.theta0])
    assert rep.after[0] >= rep.before[0] + 0.15


def test_random_init_uses_fresh_nets_and_heldout_stream(toy):
    x, y = toy
    cfg = DistillConfig(mode="random", iterations=2, real_batch=16, n_nets=2, steps=1, epochs=1)
    d = Distiller(cfg, x, y, 10)
    assert d.theta0 is None
    d.run()
    held = list(heldout_inits(d.model, "xavier", 2, cfg.seed))
    g = torch.Generator().manual_seed(cfg.seed + 1)
    used = [d.model.init("xavier", g) for _ in range(4)]
    assert all(not torch.equal(h, u) for h in held for u in used)


def test_evaluate_protocol_matches_manual_training(toy):
    x, y = toy
    cfg = DistillConfig(iterations=2, real_batch=16)
    d = Distiller(cfg, x, y, 10)
    d.run()
    r = d.result()
    th = r.theta0.clone()
    for t in range(3):
        p = th.clone().requires_grad_(True)
        loss = F.cross_entropy(d.model.apply(p, r.data[0]), r.labels[0])
        g, = torch.autograd.grad(loss, p)
        th = th - r.lrs[t] * g
    assert torch.allclose(train_on_distilled(d.model, r.theta0, r.data, r.labels, r.lrs), th)
    acc = int((d.model.apply(th, x).argmax(1) == y).sum()) / len(y)
    rep = evaluate_distilled(d.model, r.data, r.labels, r.lrs, x, y, [r.theta0])
    assert abs(rep.after[0] - acc) < 1e-9


def test_checkpoint_resume_bit_exact(toy, tmp_path):
    x, y = toy
    cfg = DistillConfig(mode="random", iterations=4, real_batch=16, n_nets=2, steps=2, epochs=1)
    full = Distiller(cfg, x, y, 10)
    full.run()
    half = Distiller(DistillConfig(**{**cfg.to_dict(), "iterations": 2, "outer_betas": (0.5, 0.999)}), x, y, 10)
    half.run(checkpoint_path=tmp_path / "c.pt")
    resumed = Distiller(cfg, x, y, 10)
    resumed.load_checkpoint(tmp_path / "c.pt")
    assert resumed.iteration == 2
    resumed.run()
    assert torch.equal(resumed.data, full.data) and torch.equal(resumed.raw_lrs, full.raw_lrs)


def test_config_errors(toy):
    x, y = toy
    for bad in ({"mode": "sometimes"}, {"init": "zeros"}, {"backgrad": "magic"}, {"steps": 0},
                {"lr0": -1.0}, {"inner_optimizer": "adam"}, {"dtype": "float16"}):
        with pytest.raises(ConfigError):
            Distiller(DistillConfig(iterations=1, **bad), x, y, 10)


def test_shape_and_empty_class_errors(toy):
    x, y = toy
    with pytest.raises(ShapeError):
        Distiller(DistillConfig(iterations=1), x[:, :, :20], y, 10)
    with pytest.raises(ShapeError, match="no training examples"):
        Distiller(DistillConfig(iterations=1), x[y != 3], y[y != 3], 10)


def test_exploding_learning_rate_is_divergence(toy):
    x, y = toy
    d = Distiller(DistillConfig(iterations=5, real_batch=16, max_lr=0.0201, outer_lr=0.5), x, y, 10)
    with pytest.raises(DivergenceError, match="exploded"):
        d.run()


def test_momentum_inner_loop_reversible_matches_stored_and_reports_its_memory(toy):
    """DD with --inner-optimizer sgdm: the reversible step follows the stored one (its β is the
    nearest rational with denominator ≤ 2^16, θ rounded to 2^-52: measured 3e-10 here), and the history
    says what each engine kept: T states of (θ, v) for stored; Θ, V and the buffer for reversible."""
    x, y = toy
    recs, ds = {}, {}
    for strategy in ("stored", "reversible"):
        cfg = DistillConfig(iterations=2, real_batch=32, steps=2, epochs=3, inner_optimizer="sgdm",
                            backgrad=strategy, dtype="float64")
        d = Distiller(cfg, x, y, 10)
        recs[strategy] = [d.step() for _ in range(2)]
        ds[strategy] = d
    a, b = ds["stored"], ds["reversible"]
    assert (a.data - b.data).abs().max() / a.data.abs().max() < 1e-8
    assert torch.allclose(a.betas(), b.betas(), rtol=1e-9) and not torch.equal(a.betas(), a.betas().new_full((6,), 0.5))
    P = a.model.num_params
    assert all(r["engine_bytes"] == 6 * 2 * P * 8 and r["info_buffer_bytes"] == 0 for r in recs["stored"])
    for r in recs["reversible"]:
        assert 0 < r["info_buffer_bytes"] < r["engine_bytes"] == r["info_buffer_bytes"] + 16 * P
