"""The reproduction harness (fastdistill.repro) end to end on tiny MNIST-format files."""
import pytest
import torch

from fastdistill import repro
from fastdistill.data import load_dataset


def test_every_scale_sets_the_same_knobs():
    keys = set(repro.SCALES["paper"])
    assert all(set(sc) == keys for sc in repro.SCALES.values())


@pytest.fixture
def small_ctx(tmp_path, root, monkeypatch):
    """The ``small`` scale shrunk further to seconds (its decay period is kept)."""
    tiny = dict(repro.SCALES["small"], iterations=4, eval_models=2, sets=2, select_models=2, select_sets=1,
                pool_n=5, pool_heldout=2, pool_epochs=0.5)
    monkeypatch.setitem(repro.SCALES, "small", tiny)
    said = []
    ctx = repro.Context(tmp_path, "small", progress=said.append)
    ctx._data["mnist"] = load_dataset("mnist", root)
    return ctx, said


def test_small_scale_attack_trains_its_pool_first_and_uses_the_short_schedule(small_ctx):
    ctx, said = small_ctx
    rec = repro.run_setting(ctx, "attack-dd")
    pool = ctx.result("pool-mnist")                      # the dependency ran first, at this scale
    assert pool["scale"] == "small" and pool["n_models"] == 5
    assert said.index("[pool-mnist] LeNet pool on MNIST (1 epoch SGD each); source test accuracy (small scale)") \
        < said.index("[attack-dd] DD poisoning, 10 images, 1 GD step, random pre-trained (small scale)")
    cfg = torch.load(ctx.path("attack-dd", "pt"), weights_only=False)["config"]
    assert (cfg["decay_epochs"], cfg["iterations"], cfg["pool_heldout"], cfg["n_nets"]) == (17.07, 4, 2, 4)
    assert rec["scale"] == "small" and rec["n_models"] == 2          # the held-out pool models
    assert "4 iterations (small scale), StepLR every 17.07 epochs" in rec["protocol"]
    assert 0.0 <= rec["k_to_t"] <= 1.0 and 0.0 <= rec["mean"] <= 1.0
    # a second call finds the record of this scale and does not run again
    said.clear()
    assert repro.run_setting(ctx, "attack-dd") == rec and said == []


def test_paper_and_reduced_scales_keep_the_settings_own_decay(tmp_path, root):
    ctx = repro.Context(tmp_path, "reduced", progress=lambda m: None)
    ctx._data["mnist"] = load_dataset("mnist", root)
    rec = repro.run_setting(ctx, "mnist-sldd-fixed-10")
    cfg = torch.load(ctx.path("mnist-sldd-fixed-10", "pt"), weights_only=False)["config"]
    assert cfg["decay_epochs"] == 40.0 and cfg["iterations"] == 20
    assert "StepLR" not in rec["protocol"] and "20 iterations (reduced scale)" in rec["protocol"]


def test_one_centroid_per_class_is_one_set_the_class_means(tmp_path, root):
    ctx = repro.Context(tmp_path, "reduced", progress=lambda m: None)
    ds = load_dataset("mnist", root)
    (km, kl), = repro._baseline_sets(ctx, ds, "kmeans", 1, 1, 5)     # not five copies of it
    (av, al), = repro._baseline_sets(ctx, ds, "average", 1, 1, 5)
    assert torch.allclose(km, av, atol=1e-5) and torch.equal(kl, al)
    assert len(repro._baseline_sets(ctx, ds, "kmeans", 2, 1, 3)) == 3   # k ≥ 2: draws differ


def test_a_setting_held_by_another_process_is_skipped_or_waited_for_never_run_twice(tmp_path, root):
    import fcntl
    import threading
    import time

    said = []
    ctx = repro.Context(tmp_path, "reduced", progress=said.append)
    ctx._data["mnist"] = load_dataset("mnist", root)
    with open(ctx.path("mnist-average", "lock"), "a") as other:     # another process's run of it
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert repro.run_setting(ctx, "mnist-average", wait=False) is None
        assert ctx.result("mnist-average") is None
        assert said == [f"[mnist-average] skipped: another process is running it "
                        f"({ctx.path('mnist-average', 'lock')} is held)"]
    # wait=True: the waiter blocks on the lock, then finds the other run's record and does not rerun
    said.clear()
    got = []
    with open(ctx.path("mnist-average", "lock"), "a") as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        waiter = threading.Thread(target=lambda: got.append(repro.run_setting(ctx, "mnist-average")))
        waiter.start()
        for _ in range(3000):
            if said:
                break
            time.sleep(0.01)
        assert said == ["[mnist-average] another process is running it; waiting for it to finish"]
        elsewhere = repro.Context(tmp_path / "elsewhere", "reduced", progress=lambda m: None)
        elsewhere._data["mnist"] = ctx._data["mnist"]
        rec = repro.run_setting(elsewhere, "mnist-average")             # the other process's run
        ctx.path("mnist-average", "json").write_text(elsewhere.path("mnist-average", "json").read_text())
        assert waiter.is_alive()
    waiter.join(timeout=60)
    assert got == [ctx.result("mnist-average")] and got[0]["mean"] == rec["mean"]
    assert len(said) == 1                                             # it never ran the setting itself
    assert not elsewhere.path("mnist-average", "json.tmp").exists()


def test_random_init_networks_per_iteration_follow_the_setting_at_paper_scale_and_the_scale_elsewhere(tmp_path, root):
    ds = load_dataset("mnist", root)
    n = {sc: {k: repro._distill_config(repro.Context(tmp_path / sc, sc, progress=lambda m: None),
                                       repro.SETTINGS[k], ds).n_nets
              for k in ("mnist-sldd-random-100", "fashion-sldd-random-100", "attack-dd",
                        "adapt-m2f-random-pretrained", "mnist-sldd-fixed-10")}
         for sc in ("paper", "small", "reduced")}
    # SLDD random init: one θ_0 per iteration at paper scale (the SLDD code's run options)
    assert n["paper"] == {"mnist-sldd-random-100": 1, "fashion-sldd-random-100": 1, "attack-dd": 4,
                          "adapt-m2f-random-pretrained": 4, "mnist-sldd-fixed-10": 1}
    assert set(n["small"].values()) == {4, 1} and n["small"]["mnist-sldd-random-100"] == 4
    assert n["reduced"]["mnist-sldd-random-100"] == 2 and n["reduced"]["mnist-sldd-fixed-10"] == 1
