"""Model pools: training, storage, corrupt/missing files, splits, and pre-trained θ_0 in the Distiller."""
import pytest
import torch
from torch import nn

from fastdistill.distill import DistillConfig, Distiller
from fastdistill.errors import ConfigError, DataError, ShapeError
from fastdistill.evaluate import accuracy
from fastdistill.models import ModuleModel
from fastdistill.pretrain import (ModelPool, evaluation_inits, finetune_full, load_pool, pool_initialisers,
                                  pretrain_pool, save_pool, train_model, train_models)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread avoids oversubscription on a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def blobs(n_per=30, seed=0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[3.0, 0.0], [0.0, 3.0], [-3.0, -3.0]]) + shift
    x = torch.cat([c + 0.5 * torch.randn(n_per, 2, generator=g) for c in centres]).view(-1, 1, 1, 2)
    return x, torch.arange(3).repeat_interleave(n_per)


def tiny_model():
    torch.manual_seed(0)
    return ModuleModel(nn.Sequential(nn.Flatten(), nn.Linear(2, 5), nn.Tanh(), nn.Linear(5, 3)), (1, 1, 2), 3)


@pytest.fixture(scope="module")
def pool():
    m = tiny_model()
    x, y = blobs()
    tx, ty = blobs(seed=1)
    return pretrain_pool(m, x, y, 6, epochs=3, lr=0.1, batch=16, seed=10, test_x=tx, test_y=ty,
                         meta={"dataset": "blobs"})


def test_pool_models_are_trained_distinct_and_reproducible(pool):
    assert pool.thetas.shape == (6, tiny_model().num_params) and len(pool) == 6
    assert min(pool.meta["test_acc"]) > 0.9 and pool.meta["dataset"] == "blobs"
    assert not torch.equal(pool.thetas[0], pool.thetas[1])
    m = tiny_model()
    x, y = blobs()
    again = pretrain_pool(m, x, y, 1, epochs=3, lr=0.1, batch=16, seed=10)
    torch.testing.assert_close(again.thetas[0], pool.thetas[0], rtol=0, atol=0)


def test_save_load_roundtrip(tmp_path, pool):
    save_pool(pool, tmp_path / "p" / "pool.pt")
    back = load_pool(tmp_path / "p" / "pool.pt")
    assert torch.equal(back.thetas, pool.thetas) and back.meta == pool.meta
    assert not (tmp_path / "p" / "pool.pt.tmp").exists()


def test_missing_corrupt_and_foreign_pool_files(tmp_path, pool):
    with pytest.raises(DataError, match="no model pool at"):
        load_pool(tmp_path / "nope.pt")
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"\x00not a torch file" * 10)
    with pytest.raises(DataError, match="unreadable"):
        load_pool(bad)
    good = tmp_path / "good.pt"
    save_pool(pool, good)
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(good.read_bytes()[:200])
    with pytest.raises(DataError, match="unreadable"):
        load_pool(trunc)
    other = tmp_path / "other.pt"
    torch.save({"thetas": pool.thetas}, other)
    with pytest.raises(DataError, match="not a fastdistill model pool"):
        load_pool(other)
    nan = ModelPool(pool.thetas.clone(), dict(pool.meta))
    nan.thetas[0, 0] = float("nan")
    save_pool(nan, tmp_path / "nan.pt")
    with pytest.raises(DataError, match="non-finite"):
        load_pool(tmp_path / "nan.pt")


def test_split_and_initialisers_never_draw_heldout_models(pool):
    tr, held = pool.split(2)
    assert tr == [0, 1, 2, 3] and held == [4, 5]
    with pytest.raises(ConfigError, match="cannot hold out 6 of 6"):
        pool.split(6)
    m = tiny_model()
    cfg = DistillConfig(mode="random-pretrained", pool="unused", pool_heldout=2)
    th0, init_fn = pool_initialisers(cfg, m, pool=pool)
    assert th0 is None
    g = torch.Generator().manual_seed(0)
    drawn = set()
    for _ in range(60):
        th = init_fn(g)
        drawn.add(next(i for i in range(6) if torch.equal(pool.thetas[i], th)))
    assert drawn == {0, 1, 2, 3}
    fixed, fn = pool_initialisers(DistillConfig(mode="fixed-pretrained", pool="unused", pool_heldout=2), m, pool=pool)
    assert fn is None and torch.equal(fixed, pool.thetas[0])
    ev = evaluation_inits(cfg, m, 10, pool=pool)
    assert len(ev) == 2 and torch.equal(ev[0], pool.thetas[4])


def test_pool_that_does_not_fit_the_model(pool):
    big = ModuleModel(nn.Sequential(nn.Flatten(), nn.Linear(2, 3)), (1, 1, 2), 3)
    with pytest.raises(ShapeError, match="P = "):
        pool_initialisers(DistillConfig(mode="fixed-pretrained", pool="x", pool_heldout=1), big, pool=pool)


def test_distiller_adapts_pretrained_weights_from_a_pool_file(tmp_path, pool):
    path = tmp_path / "pool.pt"
    save_pool(pool, path)
    m = tiny_model()
    # target task: the same classes, shifted inputs (a small domain change)
    x, y = blobs(seed=3, shift=1.5)
    with pytest.raises(ConfigError, match="needs a model pool"):
        DistillConfig(mode="random-pretrained").validate()
    with pytest.raises(DataError, match="no model pool"):
        Distiller(DistillConfig(mode="random-pretrained", pool=str(tmp_path / "missing.pt")), x, y, 3, model=m)
    cfg = DistillConfig(mode="random-pretrained", pool=str(path), pool_heldout=2, n_nets=2, iterations=3,
                        real_batch=40, lr0=0.05)
    d = Distiller(cfg, x, y, 3, model=m)
    d.run()
    assert d.theta0 is None and d.iteration == 3
    fd = Distiller(DistillConfig(mode="fixed-pretrained", pool=str(path), pool_heldout=2, iterations=1,
                                 real_batch=40), x, y, 3, model=m)
    assert torch.equal(fd.theta0, pool.thetas[0])
    assert len(evaluation_inits(fd.cfg, m, 5, theta0=fd.theta0)) == 1


def test_finetune_full_and_train_model_errors(pool):
    m = tiny_model()
    x, y = blobs(seed=3, shift=1.5)
    res = finetune_full(m, [pool.thetas[4]], x, y, x, y, epochs=2, lr=0.1, batch=16)
    assert res["n_models"] == 1 and res["acc_after_mean"] >= res["acc_before_mean"]
    assert res["acc_after_mean"] > 0.9
    with pytest.raises(ShapeError, match="non-empty"):
        train_model(m, pool.thetas[0], x[:0], y[:0])
    th = train_model(m, pool.thetas[0], x, y, epochs=0.5, lr=0.0)
    assert torch.equal(th, pool.thetas[0]) and accuracy(m, th, x, y) > 0.3


def _tiny_mnist_like(n=40, seed=0):
    from fastdistill.data.datasets import DATASETS, Dataset
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 10
    x = torch.randn(n, 1, 28, 28, generator=g) + y.view(-1, 1, 1, 1) / 3
    return Dataset(DATASETS["mnist"], x, y, x[:20].clone(), y[:20].clone(), "synthetic")


def test_pretrain_command_writes_a_loadable_pool(tmp_path, monkeypatch, capsys):
    import fastdistill.data as data
    from fastdistill.cli import main
    monkeypatch.setattr(data, "load_dataset", lambda name, root=None: _tiny_mnist_like())
    out = tmp_path / "pools" / "m.pt"
    assert main(["pretrain", "mnist", "--n", "2", "--epochs", "0.5", "--batch", "20", "--out", str(out)]) == 0
    pool = load_pool(out)
    assert len(pool) == 2 and pool.meta["dataset"] == "mnist" and pool.meta["model"] == "lenet"
    assert pool.build_model().num_params == pool.thetas.shape[1] == 61706
    assert "pool of 2 lenet models" in capsys.readouterr().out
    assert main(["pretrain", "mnist", "--n", "0", "--out", str(out)]) == 2
    assert "at least one model" in capsys.readouterr().err


def _lenet_data(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 10
    return torch.randn(n, 1, 28, 28, generator=g) + y.view(-1, 1, 1, 1) / 3, y


def test_train_models_equals_train_model_for_every_network():
    from fastdistill.models import build_model
    m = build_model("lenet", 10, 1, 28)
    x, y = _lenet_data()
    # float64: float32 SGD is chaotic (one ReLU or pool decision flipped by round-off, and the
    # trajectories part by ~1e-5 within a few steps), so the exact comparison runs in float64
    th0 = torch.stack([m.init("xavier", torch.Generator().manual_seed(s)) for s in range(3)]).double()
    gens = lambda: [torch.Generator().manual_seed(100 + k) for k in range(3)]  # noqa: E731
    # 1.5 epochs of batch 32 = 4-5 steps, so the loop reshuffles once in the middle
    many = train_models(m, th0, x, y, epochs=1.5, lr=0.05, momentum=0.9, batch=32, generators=gens())
    assert many.dtype == torch.float64
    for k, g in enumerate(gens()):
        one = train_model(m, th0[k], x, y, epochs=1.5, lr=0.05, momentum=0.9, batch=32, generator=g)
        assert (one - th0[k]).abs().max() > 1e-2          # it really trained
        torch.testing.assert_close(many[k], one, rtol=1e-10, atol=1e-12)
    f32 = train_models(m, th0.float(), x, y, epochs=1.5, lr=0.05, momentum=0.9, batch=32, generators=gens())
    assert f32.dtype == torch.float32
    torch.testing.assert_close(f32.double(), many, rtol=1e-3, atol=1e-4)
    # each network has its own batch order: the same θ_0 with two generators ends elsewhere
    twin = train_models(m, th0[:1].repeat(2, 1), x, y, epochs=1.5, lr=0.05, batch=32, generators=gens()[:2])
    # (a batch-order mistake moves θ by ~1e-2, far beyond the float32 tolerance above)
    assert (twin[0] - twin[1]).abs().max() > 1e-4
    with pytest.raises(ShapeError, match="3 networks need 3 generators"):
        train_models(m, th0, x, y, generators=gens()[:2])
    with pytest.raises(ShapeError, match=r"must be \[K, "):
        train_models(m, th0[0], x, y)
    with pytest.raises(ShapeError, match="non-empty"):
        train_models(m, th0, x[:0], y[:0])


def test_train_models_without_a_batched_form_trains_one_by_one(pool):
    m = tiny_model()
    x, y = blobs(seed=3, shift=1.5)
    gens = lambda: [torch.Generator().manual_seed(7 + k) for k in range(2)]  # noqa: E731
    many = train_models(m, pool.thetas[:2], x, y, epochs=2, lr=0.1, batch=16, generators=gens())
    for k, g in enumerate(gens()):
        assert torch.equal(many[k], train_model(m, pool.thetas[k], x, y, epochs=2, lr=0.1, batch=16, generator=g))


def test_lenet_pool_in_groups_matches_the_one_by_one_reference():
    from fastdistill.models import build_model
    m = build_model("lenet", 10, 1, 28)
    x, y = _lenet_data(64)
    kw = dict(epochs=1, lr=0.02, batch=16, seed=5)
    ref = pretrain_pool(m, x, y, 3, group=1, **kw)
    grouped = pretrain_pool(m, x, y, 3, group=2, **kw)
    # float32: equal up to round-off grown over 4 chaotic steps (a wrong batch order: ~1e-2)
    torch.testing.assert_close(grouped.thetas, ref.thetas, rtol=1e-3, atol=1e-4)
    assert (grouped.thetas - ref.thetas).abs().max() < 1e-4 < (ref.thetas[0] - ref.thetas[1]).abs().max()


def test_interrupted_pool_resumes_from_its_partial_file(tmp_path, monkeypatch):
    from fastdistill.pretrain import partial_path
    m = tiny_model()
    x, y = blobs()
    kw = dict(epochs=2, lr=0.1, batch=16, seed=3, group=2)
    whole = pretrain_pool(m, x, y, 5, **kw)
    part = partial_path(tmp_path / "pool.pt")
    assert part.name == "pool.pt.partial"
    seen = []

    def stop_at_third(i, acc):
        seen.append(i)
        if i == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pretrain_pool(m, x, y, 5, partial=part, progress=stop_at_third, **kw)
    assert part.exists() and seen == [0, 1, 2]
    with pytest.raises(ConfigError, match="other settings .*lr"):
        pretrain_pool(m, x, y, 5, partial=part, **dict(kw, lr=0.2))
    resumed_from = []
    again = pretrain_pool(m, x, y, 5, partial=part, progress=lambda i, a: resumed_from.append(i), **kw)
    assert resumed_from == [0, 1, 2, 3, 4]      # the first two are reported from the file
    assert torch.equal(again.thetas, whole.thetas) and part.exists()   # kept until the pool is saved
    # a crash before the pool file was written: the complete partial file gives the pool back
    # without training (a training run would need θ_0 draws: forbid them)
    monkeypatch.setattr(type(m), "init", lambda *a, **k: pytest.fail("retrained a finished model"))
    assert torch.equal(pretrain_pool(m, x, y, 5, partial=part, **kw).thetas, whole.thetas)
    monkeypatch.undo()
    from fastdistill.pretrain import save_pool_and_drop_partial
    save_pool_and_drop_partial(again, tmp_path / "pool.pt")
    assert not part.exists() and torch.equal(load_pool(tmp_path / "pool.pt").thetas, whole.thetas)
    part.write_bytes(b"junk")
    with pytest.raises(DataError, match="partial pool .* unreadable"):
        pretrain_pool(m, x, y, 5, partial=part, **kw)
    with pytest.raises(ConfigError, match="group must be at least 1"):
        pretrain_pool(m, x, y, 5, group=0)


def test_pretrain_command_resumes_and_refuses_a_foreign_partial_file(tmp_path, monkeypatch, capsys):
    import fastdistill.data as data
    from fastdistill.cli import main
    from fastdistill.pretrain import partial_path
    monkeypatch.setattr(data, "load_dataset", lambda name, root=None: _tiny_mnist_like())
    out = tmp_path / "m.pt"
    args = ["pretrain", "mnist", "--n", "3", "--epochs", "0.5", "--batch", "20", "--group", "2", "--out", str(out)]
    # an interrupted run's file: the first two models of the same settings, then a foreign one
    from fastdistill.models import build_model
    from fastdistill.pretrain import _save_partial
    model = build_model("lenet", 10, 1, 28)
    ds = _tiny_mnist_like()
    first = pretrain_pool(model, ds.train_x, ds.train_y, 2, epochs=0.5, batch=20, group=2)
    settings = {"model": "lenet", "P": model.num_params, "init": "xavier", "epochs": 0.5, "lr": 0.01,
                "momentum": 0.9, "batch": 20, "seed": 0, "n_train": len(ds.train_x)}
    _save_partial(partial_path(out), settings, list(first.thetas), [0.5, 0.5])
    assert main(args) == 0
    pool = load_pool(out)
    assert len(pool) == 3 and torch.equal(pool.thetas[:2], first.thetas) and not partial_path(out).exists()
    assert "model 1/3" in capsys.readouterr().err
    _save_partial(partial_path(out), dict(settings, lr=0.5), list(first.thetas), [0.5, 0.5])
    assert main(args) != 0
    err = capsys.readouterr().err
    assert "other settings (lr)" in err and "Traceback" not in err
