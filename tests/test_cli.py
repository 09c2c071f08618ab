"""The command line and the run folder, end to end on a tiny idx dataset (60 train / 40 test images).

Most runs call ``fastdistill.cli.main`` in-process (fast); two subprocess runs check the real
exit status and that no traceback reaches the terminal.
"""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fastdistill import cli
from fastdistill.distill import DistillConfig, Distiller
from fastdistill.io import load_distilled
from fastdistill.runner import read_checkpoint

REPO = Path(__file__).resolve().parents[1]


def base(root, out, *extra):
    return ["distill", "--dataset", "mnist", "--data-root", str(root), "--out", str(out),
            "--eval-models", "2", "--threads", "1", "--no-progress", *map(str, extra)]


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("fastdistill: error: ") and "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def fixed_run(root, tmp_path_factory):
    """One finished fixed-init run with S=2, E=2 (T=4 > S), learnable enough to move accuracy."""
    out = tmp_path_factory.mktemp("runs") / "fixed"
    rc = cli.main(base(root, out, "--steps", 2, "--epochs", 2, "--lr0", 0.1, "--outer-lr", 0.1,
                       "--iterations", 5, "--checkpoint-every", 2))
    assert rc == 0
    return out


def test_distill_writes_the_run_folder(fixed_run):
    out = fixed_run
    for name in ("checkpoint.pt", "distilled.pt", "distilled.npz", "metrics.json", "distilled.png"):
        assert (out / name).is_file(), name
    d = torch.load(out / "distilled.pt", weights_only=True)
    assert d["format"] == "fastdistill.distilled/v1" and d["model"] == "lenet"
    assert d["data"].shape == (2, 10, 1, 28, 28) and d["labels"].shape == (2, 10)
    assert d["lrs"].shape == (4,) and d["betas"] is None
    assert d["theta0"].shape == (61706,)  # LeNet's P: fixed init stores its θ_0
    assert d["dataset"]["mean"] == [pytest.approx(0.1307)] and len(d["dataset"]["class_names"]) == 10
    assert d["config"] == DistillConfig(dataset="mnist", data_root=d["config"]["data_root"], steps=2, epochs=2,
                                        lr0=0.1, outer_lr=0.1, iterations=5, checkpoint_every=2,
                                        eval_models=2, threads=1).to_dict()
    with np.load(out / "distilled.npz", allow_pickle=False) as z:
        assert np.array_equal(z["data"], d["data"].numpy()) and np.array_equal(z["theta0"], d["theta0"].numpy())
    m = json.loads((out / "metrics.json").read_text())
    for key in ("config", "eval", "iterations", "wall_time_s", "distill_time_s", "backgrad", "backend",
                "history", "lrs", "per_model"):
        assert key in m, key
    assert m["iterations"] == 5 and m["backgrad"] == "stored" and len(m["history"]) == 5
    # stored keeps θ_t for the T = 4 steps: 4 × P float32; no information buffer; a real peak RSS
    assert m["engine_bytes_max"] == 4 * 61706 * 4 and m["info_buffer_bytes_max"] == 0
    assert all(h["engine_bytes"] == 4 * 61706 * 4 for h in m["history"])
    assert m["peak_rss_bytes"] > 50 * 2**20
    e = m["eval"]
    assert e["n_models"] == 1 and 0 <= e["acc_before_mean"] <= 1 and 0 <= e["acc_after_mean"] <= 1
    assert e["acc_after_mean"] != e["acc_before_mean"]  # the distilled steps changed the model
    assert d["metrics"]["eval"] == e and "history" not in d["metrics"]
    assert read_checkpoint(out / "checkpoint.pt")["iteration"] == 5
    from PIL import Image
    with Image.open(out / "distilled.png") as im:
        assert im.format == "PNG" and im.size == (884, 240)  # see test_io: 2 rows of 10 tiles


def test_final_line_and_refusal_to_clobber(fixed_run, root, capsys):
    rc = cli.main(base(root, fixed_run, "--iterations", 1))
    assert rc == 2
    assert "--resume" in one_error_line(capsys.readouterr().err)
    assert (fixed_run / "distilled.pt").is_file()


def test_evaluate_reproduces_the_stored_fixed_init_accuracy(fixed_run, root, capsys):
    from fastdistill.data import load_dataset
    from fastdistill.evaluate import accuracy, train_on_distilled
    from fastdistill.models import LeNet

    stored = json.loads((fixed_run / "metrics.json").read_text())
    # independently: the stored θ_0, trained on the stored steps with the stored rates
    d, ds, net = load_distilled(fixed_run), load_dataset("mnist", root=root), LeNet()
    direct = {"before": [accuracy(net, d.theta0, ds.test_x, ds.test_y)],
              "after": [accuracy(net, train_on_distilled(net, d.theta0, d.data, d.labels, d.lrs),
                                 ds.test_x, ds.test_y)]}
    assert stored["per_model"] == direct
    assert cli.main(["evaluate", str(fixed_run / "distilled.pt"), "--threads", "1", "--no-progress"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("fastdistill: mnist test accuracy") and "evaluation.json" in line
    ev = json.loads((fixed_run / "evaluation.json").read_text())
    assert ev["per_model"] == stored["per_model"] and ev["heldout"] is False
    assert ev["acc_after_mean"] == stored["eval"]["acc_after_mean"]
    # held-out random models instead of θ_0, written elsewhere
    assert cli.main(["evaluate", str(fixed_run), "--heldout", "--eval-models", "3", "--threads", "1",
                     "--output", str(fixed_run / "heldout.json")]) == 0
    h = json.loads((fixed_run / "heldout.json").read_text())
    assert h["n_models"] == 3 and h["heldout"] is True and h["per_model"]["before"] != ev["per_model"]["before"] * 3


def test_random_mode_with_periodic_evaluation(root, tmp_path):
    out = tmp_path / "r"
    assert cli.main(base(root, out, "--mode", "random", "--n-nets", 2, "--iterations", 3, "--eval-every", 2)) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["eval"]["n_models"] == 2 and m["eval"]["heldout"] is True and len(m["per_model"]["after"]) == 2
    evals = [h for h in m["history"] if "eval_acc" in h]
    assert [h["iteration"] for h in evals] == [2] and evals[0]["eval_models"] == 2
    assert torch.load(out / "distilled.pt", weights_only=True)["theta0"] is None


# -- resume ----------------------------------------------------------------------------------
RESUME_ARGS = ("--mode", "random", "--n-nets", 2, "--steps", 2, "--checkpoint-every", 1, "--lr0", 0.05)


@pytest.fixture(scope="module")
def uninterrupted(root, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "whole"
    assert cli.main(base(root, out, *RESUME_ARGS, "--iterations", 4)) == 0
    return torch.load(out / "distilled.pt", weights_only=True)


def assert_same_distilled(a, b):
    for k in ("data", "labels", "lrs"):
        assert torch.equal(a[k], b[k]), k
    assert a["metrics"]["per_model"] == b["metrics"]["per_model"]


def count_steps(monkeypatch):
    calls, step = {"n": 0}, Distiller.step

    def counted(self):
        calls["n"] += 1
        return step(self)
    monkeypatch.setattr(Distiller, "step", counted)
    return calls


def test_resume_continues_bit_exactly(root, tmp_path, uninterrupted, monkeypatch):
    out = tmp_path / "parts"
    assert cli.main(base(root, out, *RESUME_ARGS, "--iterations", 2)) == 0
    first = torch.load(out / "distilled.pt", weights_only=True)
    assert not torch.equal(first["data"], uninterrupted["data"])
    # only the run folder and the new length: the settings come from the checkpoint
    calls = count_steps(monkeypatch)
    assert cli.main(["distill", "--out", str(out), "--resume", "--iterations", "4", "--no-progress"]) == 0
    assert calls["n"] == 2  # it continued, it did not start over
    resumed = torch.load(out / "distilled.pt", weights_only=True)
    assert_same_distilled(resumed, uninterrupted)
    assert resumed["metrics"]["resumed_from_iteration"] == 2


def test_ctrl_c_saves_a_checkpoint_and_resume_is_bit_exact(root, tmp_path, uninterrupted, monkeypatch, capsys):
    out = tmp_path / "killed"
    step = Distiller.step
    hits = {"n": 2}

    def interrupted_step(self):  # Ctrl-C arrives while iteration 2 is being computed
        rec = step(self)
        if self.iteration == hits["n"]:
            os.kill(os.getpid(), signal.SIGINT)
        return rec
    monkeypatch.setattr(Distiller, "step", interrupted_step)
    assert cli.main(base(root, out, *RESUME_ARGS, "--iterations", 4)) == 130
    err = capsys.readouterr().err
    assert "--resume" in err and "Traceback" not in err
    assert read_checkpoint(out / "checkpoint.pt")["iteration"] == 2
    assert not (out / "distilled.pt").exists()
    monkeypatch.setattr(Distiller, "step", step)
    calls = count_steps(monkeypatch)
    assert cli.main(["distill", "--out", str(out), "--resume", "--no-progress"]) == 0
    assert calls["n"] == 2
    assert_same_distilled(torch.load(out / "distilled.pt", weights_only=True), uninterrupted)


def test_second_ctrl_c_aborts_and_keeps_the_last_periodic_checkpoint(root, tmp_path, monkeypatch, capsys):
    out = tmp_path / "aborted"
    step = Distiller.step

    def twice(self):
        if self.iteration == 2:  # mid-step: the state is not consistent, nothing may be saved
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return step(self)
    monkeypatch.setattr(Distiller, "step", twice)
    assert cli.main(base(root, out, "--iterations", 4, "--checkpoint-every", 1)) == 130
    assert "last one kept" in capsys.readouterr().err
    assert read_checkpoint(out / "checkpoint.pt")["iteration"] == 2


# -- bad input -------------------------------------------------------------------------------
@pytest.mark.parametrize("args,needle", [
    (["--dataset", "imagenet"], "invalid choice: 'imagenet'"),
    (["--model", "vgg"], "invalid choice: 'vgg'"),
    (["--backgrad", "magic"], "invalid choice: 'magic'"),
    (["--mode", "sideways"], "unknown init mode"),
    (["--inner-optimizer", "adam"], "unknown inner optimizer"),
    (["--iterations", "3", "--outer-epochs", "2"], "not allowed with"),
    (["--steps", "many"], "invalid int value"),
    (["--resume"], "--resume needs --out"),
    (["--model", "alexcifarnet", "--data-root", "{root}", "--iterations", "1"], "does not fit mnist"),
])
def test_usage_errors_exit_2_with_one_line(args, needle, root, tmp_path, capsys):
    args = [a.replace("{root}", str(root)) for a in args]
    assert cli.main(["distill", "--out", str(tmp_path / "o"), *args] if "--resume" not in args
                    else ["distill", *args]) == 2
    assert needle in one_error_line(capsys.readouterr().err)


def test_missing_data_file_exits_1(root, tmp_path, capsys):
    partial = tmp_path / "partial"
    partial.mkdir()
    for f in root.iterdir():
        if "t10k-labels" not in f.name:
            (partial / f.name).write_bytes(f.read_bytes())
    assert cli.main(base(partial, tmp_path / "o", "--iterations", 1)) == 1
    assert "t10k-labels-idx1-ubyte" in one_error_line(capsys.readouterr().err)
    (partial / "t10k-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b broken gzip")
    assert cli.main(base(partial, tmp_path / "o", "--iterations", 1)) == 1
    assert "corrupt" in one_error_line(capsys.readouterr().err)


def test_corrupt_checkpoint_and_distilled_set_exit_1(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"PK\x03\x04 truncated")
    assert cli.main(["distill", "--out", str(out), "--resume"]) == 1
    assert "checkpoint" in one_error_line(capsys.readouterr().err) and (out / "checkpoint.pt").exists()
    (out / "distilled.pt").write_bytes(b"garbage")
    assert cli.main(["evaluate", str(out)]) == 1
    assert "unreadable" in one_error_line(capsys.readouterr().err)


def test_divergence_exits_1_and_keeps_the_last_good_checkpoint(root, tmp_path, capsys):
    out = tmp_path / "div"
    # η_0 = 0.001 and Adam steps of 0.5 on ρ: η ≈ 0.0017 after iteration 1, ≈ 0.0027 after 2
    rc = cli.main(base(root, out, "--lr0", 0.001, "--outer-lr", 0.5, "--max-lr", 0.002,
                       "--iterations", 10, "--checkpoint-every", 1))
    assert rc == 1
    line = one_error_line(capsys.readouterr().err)
    assert "exploded" in line and "last good checkpoint" in line and "larger max_lr" in line
    ck = read_checkpoint(out / "checkpoint.pt")  # loadable, and a good state
    assert 1 <= ck["iteration"] < 10
    assert float(torch.nn.functional.softplus(ck["raw_lrs"]).max()) <= 0.002
    assert torch.isfinite(ck["data"]).all() and not (out / "distilled.pt").exists()
    # diverging at once: the inner loop overflows, no checkpoint to keep
    assert cli.main(base(root, tmp_path / "div2", "--lr0", 1e6, "--iterations", 3)) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "not finite" in line and "decay_epochs" in line and "max_lr" not in line
    # with model selection on, the best iterate so far survives and the message says where
    out3 = tmp_path / "div3"
    assert cli.main(base(root, out3, "--lr0", 0.001, "--outer-lr", 0.5, "--max-lr", 0.002,
                         "--iterations", 10, "--val-size", 20, "--eval-every", 1)) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]   # after the periodic line
    assert line.startswith("fastdistill: error: ") and "best iterate by validation" in line
    assert str(out3 / "best.pt") in line
    assert load_distilled(out3 / "best.pt").data.isfinite().all()


def test_real_process_exit_status_and_no_traceback(tmp_path):
    p = subprocess.run([sys.executable, "-m", "fastdistill", "distill", "--data-root",
                        str(tmp_path / "missing"), "--iterations", "1"], capture_output=True, text=True,
                       cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=120)
    assert p.returncode == 1 and "no such directory" in one_error_line(p.stderr)


# -- options, registries, info, Python API ---------------------------------------------------
def test_every_config_field_is_an_option_with_the_dataclass_default():
    import dataclasses

    parser = cli.build_parser()
    args = parser.parse_args(["distill"])
    assert cli.config_from_args(args) == DistillConfig()  # no duplicated defaults
    sub = next(a for a in parser._actions if a.dest == "command").choices["distill"]
    dests = {a.dest for a in sub._actions}
    assert {f.name for f in dataclasses.fields(DistillConfig)} <= dests
    args = parser.parse_args(["distill", "--outer-betas", "0.9", "0.99", "--images-per-class", "3",
                              "--outer-epochs", "2", "--init-gain", "0.5"])
    c = cli.config_from_args(args)
    assert (c.outer_betas, c.images_per_class, c.outer_epochs, c.init_gain) == ((0.9, 0.99), 3, 2.0, 0.5)
    # on resume, a given --outer-epochs replaces the checkpoint's --iterations
    resumed = cli.config_from_args(parser.parse_args(["distill", "--outer-epochs", "5"]),
                                   DistillConfig(iterations=100))
    assert resumed.iterations is None and resumed.outer_epochs == 5.0


def test_strategy_choices_come_from_the_registry_at_run_time(monkeypatch):
    from fastdistill import backgrad

    monkeypatch.setitem(backgrad.STRATEGIES, "checkpointed", backgrad.STRATEGIES["stored"])
    args = cli.build_parser().parse_args(["distill", "--backgrad", "checkpointed"])
    assert cli.config_from_args(args).backgrad == "checkpointed"


def test_fetch_data_errors(capsys):
    assert cli.main(["fetch-data", "cifar10"]) == 1  # no offline source: a clear runtime error
    assert "cifar10" in one_error_line(capsys.readouterr().err)
    assert cli.main(["fetch-data", "imagenet"]) == 2
    assert "unknown dataset" in one_error_line(capsys.readouterr().err)


def test_info_lists_strategies_and_datasets(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    from fastdistill import STRATEGIES, __version__
    assert f"fastdistill {__version__}" in out
    line = next(ln for ln in out.splitlines() if ln.startswith("back-gradient strategies: "))
    assert line.split(": ")[1].split(", ") == sorted(STRATEGIES)
    assert "data cache:" in out and "mnist:" in out and "cifar10:" in out


def test_python_api_in_a_few_lines(root, tmp_path):
    from fastdistill.data import load_dataset
    from fastdistill.runner import run_distillation

    cfg = DistillConfig(dataset="mnist", data_root=str(root), iterations=2, eval_models=2, threads=1)
    run = run_distillation(cfg, out=tmp_path / "api")
    assert run.paths["distilled"] == tmp_path / "api" / "distilled.pt"
    d = load_distilled(tmp_path / "api")
    assert torch.equal(d.data, run.result.data) and torch.equal(d.lrs, run.result.lrs)
    assert d.metrics["eval"]["acc_after_mean"] == run.report.summary()["acc_after_mean"]
    # the same data passed in as an object gives the same run
    run2 = run_distillation(cfg, out=tmp_path / "api2", dataset=load_dataset("mnist", root=root))
    assert torch.equal(run2.result.data, run.result.data)


def test_progress_lines_without_a_bar(root, tmp_path, monkeypatch, capsys):
    """No terminal (--no-progress): a heartbeat line with the rate and the time left, not silence."""
    from fastdistill import runner

    monkeypatch.setattr(runner, "HEARTBEAT_S", 0.0)
    assert cli.main(base(root, tmp_path / "hb", "--iterations", 3)) == 0
    cap = capsys.readouterr()
    beats = [ln for ln in (cap.err + cap.out).splitlines() if " s/it, about " in ln]
    assert [ln.split(":")[1].strip().split()[-1] for ln in beats] == ["1/3", "2/3", "3/3"], beats
