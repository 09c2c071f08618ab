"""The poisoning objective K→T: relabelling, metrics with known answers, the Distiller's outer
loss, a tiny end-to-end attack on a pool of trained models, and the baseline rule."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastdistill.backgrad import make_outer_loss
from fastdistill.baselines import random_real
from fastdistill.distill import DistillConfig, Distiller
from fastdistill.errors import ConfigError, ShapeError
from fastdistill.models import ModuleModel
from fastdistill.poison import (attack_metrics, best_poison_baseline, evaluate_attack, poison_outer_loss,
                                relabel)
from fastdistill.pretrain import pretrain_pool, save_pool


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread avoids oversubscription on a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

C = 3


def linear_model(dtype=torch.float32):
    torch.manual_seed(0)
    return ModuleModel(nn.Sequential(nn.Flatten(), nn.Linear(C, C)).to(dtype), (1, 1, C), C)


def blobs(n_per=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.cat([4 * torch.eye(C)[c] + 0.5 * torch.randn(n_per, C, generator=g) for c in range(C)])
    return x.view(-1, 1, 1, C), torch.arange(C).repeat_interleave(n_per)


def test_relabel():
    y = torch.tensor([0, 1, 2, 1, 0])
    assert relabel(y, 1, 2).tolist() == [0, 2, 2, 2, 0]
    assert y.tolist() == [0, 1, 2, 1, 0]
    with pytest.raises(ConfigError, match="must differ"):
        relabel(y, 1, 1)
    with pytest.raises(ConfigError, match="not a class index"):
        relabel(y, -1, 2)


def test_attack_metrics_known_answer():
    m = linear_model()
    identity = torch.cat([torch.eye(C).reshape(-1), torch.zeros(C)])   # prediction = argmax(input)
    # predictions [2, 0, 1, 2]; true [0, 0, 1, 2]; modified labels (0 ↦ 2) [2, 2, 1, 2]
    x = torch.tensor([[0, 0, 1.0], [1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]]).view(4, 1, 1, C)
    y = torch.tensor([0, 0, 1, 2])
    assert attack_metrics(m, identity, x, y, K=0, T=2) == {"acc_modified": 0.75, "k_to_t": 0.5}
    assert attack_metrics(m, identity, x, y, K=1, T=0) == {"acc_modified": 0.5, "k_to_t": 0.0}
    with pytest.raises(ShapeError, match="no images of the attacked class 1"):
        attack_metrics(m, identity, x[[0, 1, 3]], y[[0, 1, 3]], K=1, T=0)


def test_poison_outer_loss_is_ce_on_relabelled_data():
    m = linear_model(torch.float64)
    x, y = blobs()
    th = m.init("xavier", torch.Generator().manual_seed(1), dtype=torch.float64)
    L = poison_outer_loss(0, 1)(m, x.double(), y)(th)
    ref = F.cross_entropy(m.apply(th, x.double()), torch.where(y == 0, 1, y))
    assert torch.equal(L, ref) and not torch.equal(L, make_outer_loss(m, x.double(), y)(th))


def test_distiller_poison_objective_equals_ce_on_relabelled_data():
    m = linear_model(torch.float64)
    x, y = blobs()
    base = dict(dtype="float64", iterations=1, real_batch=10 ** 6, lr0=0.1)
    a = Distiller(DistillConfig(objective="poison", attack_class=0, target_class=2, **base), x, y, C, model=m)
    b = Distiller(DistillConfig(**base), x, y, C, model=m,      # the same through the outer_fn hook
                  outer_fn=lambda model, xr, yr: make_outer_loss(model, xr, relabel(yr, 0, 2)))
    a.step()
    b.step()
    torch.testing.assert_close(a.data.grad, b.data.grad, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(a.raw_lrs.grad, b.raw_lrs.grad, rtol=1e-12, atol=1e-14)
    with pytest.raises(ConfigError, match="distinct attack_class"):
        DistillConfig(objective="poison", attack_class=1, target_class=1).validate()
    with pytest.raises(ConfigError, match="attack_class 5 is not a class index"):
        Distiller(DistillConfig(objective="poison", attack_class=5, target_class=1, **base), x, y, C, model=m)


def test_one_step_attack_on_a_pool_flips_class_k(tmp_path):
    m = linear_model()
    x, y = blobs()
    tx, ty = blobs(seed=1)
    pool = pretrain_pool(m, x, y, 8, epochs=2, lr=0.1, batch=16, seed=0)
    save_pool(pool, tmp_path / "pool.pt")
    cfg = DistillConfig(mode="random-pretrained", pool=str(tmp_path / "pool.pt"), pool_heldout=3,
                        objective="poison", attack_class=0, target_class=1, steps=1, epochs=1,
                        n_nets=2, iterations=40, real_batch=60, lr0=1.0, outer_lr=0.2)
    d = Distiller(cfg, x, y, C, model=m)
    d.run()
    r = d.result()
    held = [pool.thetas[i] for i in pool.split(3)[1]]
    rep = evaluate_attack(m, r.data, r.labels, r.lrs, tx, ty, held, 0, 1)
    s = rep.summary()
    assert rep.n_models == 3
    assert s["k_to_t_before_mean"] < 0.1 and s["k_to_t_after_mean"] > 0.8
    assert s["acc_modified_after_mean"] > 0.85 > s["acc_modified_before_mean"]
    assert "0→1" in str(rep)


def test_best_poison_baseline_rule():
    m = linear_model()
    x, y = blobs()
    tx, ty = blobs(seed=1)
    pool = pretrain_pool(m, x, y, 2, epochs=2, lr=0.1, batch=16, seed=0)
    data, labels = random_real(x, y, C, 5, generator=torch.Generator().manual_seed(0))
    labels = relabel(labels, 0, 1)
    out = best_poison_baseline(m, [(data, labels)], tx, ty, list(pool.thetas), 0, 1, lr_grid=(0.0, 1.0, 30.0))
    grid = {lr: (acc, flip) for lr, acc, flip in out["grid"]}
    assert grid[0.0][1] < 0.1                           # lr 0 changes nothing: not eligible
    eligible = [lr for lr, (acc, flip) in grid.items() if flip >= 0.1]
    assert out["lr"] == max(eligible, key=lambda lr: grid[lr][0])
    sep = best_poison_baseline(m, [(data, labels)] * 2, tx, ty, list(pool.thetas), 0, 1, lr_grid=(0.0, 1.0, 30.0),
                               select_theta0s=list(pool.thetas[:1]), select_sets=1)
    assert "separate" in sep["selected_on"] and sep["report"].n_models == 4   # 2 models × 2 sets reported
    none = best_poison_baseline(m, [(data, labels)], tx, ty, list(pool.thetas), 0, 1, lr_grid=(0.0,))
    assert none["lr"] is None and none["report"] is None
