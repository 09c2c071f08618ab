"""``val_size``: training images held out to pick the best periodic iterate (best.pt / best.json)."""
import json

import pytest
import torch

from fastdistill import cli
from fastdistill.distill import DistillConfig
from fastdistill.errors import ConfigError
from fastdistill.io import load_distilled
from fastdistill.runner import run_distillation, split_validation


def test_split_is_disjoint_seeded_and_complete():
    x = torch.arange(50.0).view(50, 1, 1, 1)
    y = torch.arange(50) % 10
    tx, ty, vx, vy = split_validation(x, y, 12, seed=3)
    assert len(vx) == 12 and len(tx) == 38
    assert sorted(torch.cat([tx, vx]).flatten().tolist()) == list(range(50))  # a partition
    assert torch.equal(ty, tx.flatten().long() % 10) and torch.equal(vy, vx.flatten().long() % 10)
    again = split_validation(x, y, 12, seed=3)
    assert torch.equal(again[2], vx)
    assert not torch.equal(split_validation(x, y, 12, seed=4)[2], vx)  # the seed chooses the draw
    for bad in (0, 50, 60):
        with pytest.raises(ConfigError, match="val_size"):
            split_validation(x, y, bad, seed=0)


def test_config_needs_eval_every_and_a_non_negative_size():
    with pytest.raises(ConfigError, match="eval_every"):
        DistillConfig(val_size=10).validate()
    with pytest.raises(ConfigError, match="val_size"):
        DistillConfig(val_size=-1, eval_every=2).validate()
    DistillConfig(val_size=10, eval_every=2).validate()


def test_best_iterate_is_kept_and_is_the_validation_maximum(root, tmp_path):
    cfg = DistillConfig(dataset="mnist", data_root=str(root), iterations=7, eval_every=2, val_size=20,
                        eval_models=2, threads=1, lr0=0.1, outer_lr=0.1, steps=2, epochs=2)
    run = run_distillation(cfg, out=tmp_path / "run")
    best = json.loads((tmp_path / "run" / "best.json").read_text())
    vals = {h["iteration"]: h["val_acc"] for h in run.metrics["history"] if "val_acc" in h}
    assert sorted(vals) == [2, 4, 6]
    # the last iterate (7) competes too; ties keep the earlier iterate
    top = max(vals.values())
    assert best["val_acc"] >= top
    if best["iteration"] != 7:
        assert best["val_acc"] == top and best["iteration"] == min(i for i, v in vals.items() if v == top)
    assert run.metrics["best"] == best and best["val_size"] == 20
    saved = load_distilled(tmp_path / "run" / "best.pt")
    if best["iteration"] == 7:
        assert torch.equal(saved.data, run.result.data)
        assert best["eval_acc"] == run.report.summary()["acc_after_mean"]
    else:
        assert not torch.equal(saved.data, run.result.data)  # an earlier iterate, not the last
        assert best["eval_acc"] == next(h["eval_acc"] for h in run.metrics["history"]
                                        if h["iteration"] == best["iteration"])
    # the held-out images are never seen by the outer loop: the same run without them differs
    plain = run_distillation(DistillConfig(**{**cfg.to_dict(), "val_size": 0}), out=tmp_path / "plain")
    assert not torch.equal(plain.result.data, run.result.data)


def test_cli_flag_and_resume_keeps_the_best(root, tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["distill", "--dataset", "mnist", "--data-root", str(root), "--out", str(out),
            "--eval-models", "2", "--threads", "1", "--no-progress", "--eval-every", "2",
            "--val-size", "20", "--lr0", "0.1", "--outer-lr", "0.1"]
    assert cli.main(argv + ["--iterations", "4"]) == 0
    first = json.loads((out / "best.json").read_text())
    err = capsys.readouterr().err
    assert "best iterate on the 20 validation images" in err
    assert "iteration 2/4: " in err and "validation " in err.split("iteration 2/4: ")[1].splitlines()[0]
    assert cli.main(argv[:-4] + ["--resume", "--iterations", "8"]) == 0
    second = json.loads((out / "best.json").read_text())
    assert second["val_acc"] >= first["val_acc"]  # a resumed run only replaces it by a better one
    assert second["iteration"] >= first["iteration"]
    # best.pt is a distilled set like any other: `fastdistill evaluate` takes it
    report = tmp_path / "best-eval.json"
    assert cli.main(["evaluate", str(out / "best.pt"), "--data-root", str(root), "--threads", "1",
                     "--no-progress", "--output", str(report)]) == 0
    # fixed init: the same θ_0 and the same test set, so it reproduces best.json's test figure
    assert json.loads(report.read_text())["acc_after_mean"] == second["eval_acc"]
