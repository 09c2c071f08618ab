"""Run outputs: the distilled-set files, the metrics JSON and the PNG grid (no data, no training)."""
import json
import math

import numpy as np
import pytest
import torch

from fastdistill.distill import DistillConfig
from fastdistill.errors import DataError, ShapeError
from fastdistill.io import (DISTILLED_FORMAT, DistilledSet, atomic_write, dataset_info_dict,
                            grid_layout, load_distilled, load_metrics, make_grid_image, row_titles,
                            save_distilled, save_grid, save_metrics, save_npz)

INFO = {"name": "fashion-mnist", "num_classes": 10, "in_channels": 1, "image_size": 28,
        "mean": (0.2860,), "std": (0.3530,), "class_names": ("T-shirt/top", "Trouser", "Pullover",
                                                            "Dress", "Coat", "Sandal", "Shirt",
                                                            "Sneaker", "Bag", "Ankle boot")}


def _set(steps=2, epochs=3, betas=False, theta0=True):
    g = torch.Generator().manual_seed(0)
    n = 10
    return DistilledSet(
        data=torch.randn(steps, n, 1, 28, 28, generator=g),
        labels=torch.arange(n).repeat(steps, 1), lrs=torch.rand(steps * epochs, generator=g) / 10,
        betas=torch.rand(steps * epochs, generator=g) if betas else None,
        theta0=torch.randn(123, generator=g) if theta0 else None,
        config=DistillConfig(dataset="fashion-mnist", steps=steps, epochs=epochs),
        dataset=dataset_info_dict(INFO), model="lenet",
        metrics={"eval": {"acc_after_mean": 0.5, "acc_after_std": float("nan")}})


def test_distilled_pt_is_plain_and_round_trips(tmp_path):
    ds = _set(betas=True)
    p = save_distilled(tmp_path / "d.pt", ds)
    raw = torch.load(p, weights_only=True)  # no fastdistill classes inside
    assert raw["format"] == DISTILLED_FORMAT
    assert raw["dataset"]["mean"] == [pytest.approx(0.2860)] and raw["dataset"]["class_names"][9] == "Ankle boot"
    assert raw["config"] == ds.config.to_dict() and raw["model"] == "lenet"
    assert (raw["steps"], raw["epochs"]) == (2, 3)
    back = load_distilled(p)
    for k in ("data", "labels", "lrs", "betas", "theta0"):
        assert torch.equal(getattr(back, k), getattr(ds, k)), k
    assert back.config == ds.config and back.epochs == 3
    assert math.isnan(back.metrics["eval"]["acc_after_std"])
    assert not (tmp_path / "d.pt.tmp").exists()


def test_npz_holds_the_same_arrays_without_pickle(tmp_path):
    ds = _set(theta0=False)
    p = save_npz(tmp_path / "d.npz", ds)
    with np.load(p, allow_pickle=False) as z:
        assert np.array_equal(z["data"], ds.data.numpy()) and np.array_equal(z["lrs"], ds.lrs.numpy())
        assert "theta0" not in z.files and "betas" not in z.files
        meta = json.loads(str(z["meta"]))
    assert meta["dataset"]["name"] == "fashion-mnist" and meta["config"]["steps"] == 2
    assert meta["metrics"]["eval"]["acc_after_std"] is None  # strict JSON inside
    back = load_distilled(p)
    assert torch.equal(back.data, ds.data) and back.theta0 is None and back.config == ds.config


def test_load_distilled_from_run_folder_and_bad_files(tmp_path):
    save_distilled(tmp_path / "distilled.pt", _set())
    assert load_distilled(tmp_path).steps == 2
    with pytest.raises(DataError, match="no such file"):
        load_distilled(tmp_path / "nope.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no distilled.pt"):
        load_distilled(tmp_path / "empty")
    (tmp_path / "garbage.pt").write_bytes(b"\x00not a zip" * 10)
    with pytest.raises(DataError, match="unreadable"):
        load_distilled(tmp_path / "garbage.pt")
    torch.save({"format": "something/else"}, tmp_path / "other.pt")
    with pytest.raises(DataError, match="not a fastdistill distilled set"):
        load_distilled(tmp_path / "other.pt")


@pytest.mark.parametrize("field,value,match", [
    ("labels", torch.zeros(3, 10, dtype=torch.long), "labels must be"),
    ("lrs", torch.ones(5), "lrs must be"),
    ("data", torch.zeros(2, 10, 28, 28), "data must be"),
    ("lrs", torch.tensor([0.1, float("nan"), 0.1, 0.1, 0.1, 0.1]), "NaN"),
])
def test_wrong_shapes_are_rejected_on_save_and_load(tmp_path, field, value, match):
    ds = _set()
    blob = ds.to_dict()
    setattr(ds, field, value)
    with pytest.raises(ShapeError, match=match):
        save_distilled(tmp_path / "x.pt", ds)
    blob[field] = value
    torch.save(blob, tmp_path / "y.pt")
    with pytest.raises(ShapeError, match=match):
        load_distilled(tmp_path / "y.pt")


def test_metrics_json_is_strict(tmp_path):
    p = save_metrics(tmp_path / "m.json", {"a": float("nan"), "b": [1.0, float("inf")],
                                           "t": torch.tensor([1.5, 2.5]), "c": (1, 2)})
    text = p.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"a": None, "b": [1.0, None], "t": [1.5, 2.5], "c": [1, 2]}
    assert load_metrics(tmp_path / "m.json")["t"] == [1.5, 2.5]


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    p = tmp_path / "f.txt"
    p.write_text("old")

    def boom(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")
    with pytest.raises(RuntimeError):
        atomic_write(p, boom)
    assert p.read_text() == "old" and not (tmp_path / "f.txt.tmp").exists()


def test_row_titles_show_every_epoch_rate_of_a_step():
    lrs = torch.tensor([0.031, 0.5, 0.027, 0.6, 0.019, 0.7])  # S=2, E=3: step 1 uses t = 0, 2, 4
    assert row_titles(lrs, 2) == ["step 1: η=0.031,0.027,0.019", "step 2: η=0.5,0.6,0.7"]
    t = row_titles(lrs, 2, betas=torch.full((6,), 0.5), greek=False)
    assert t[0] == "step 1: lr=0.031,0.027,0.019  beta=0.5,0.5,0.5"


def test_grid_size_pixels_and_captions(tmp_path):
    S, n = 2, 10
    g = grid_layout(S, n, 28, 28)
    # scale 3 (≥ 80 px tiles): width 4 + 10·(84 + 4), height 4 + 2·(16 + 84 + 14 + 4)
    assert (g["scale"], g["width"], g["height"]) == (3, 884, 240)
    assert grid_layout(1, 4, 32, 32)["tile_w"] == 96
    # tile (s, j) is flat at the pixel value j/9 after denormalisation with mean/std
    m, sd = 0.2860, 0.3530
    pix = torch.arange(n, dtype=torch.float32) / 9
    data = ((pix - m) / sd).view(1, n, 1, 1, 1).expand(S, n, 1, 28, 28).clone()
    p = save_grid(tmp_path / "g.png", data, torch.arange(n).repeat(S, 1), torch.full((S * 3,), 0.02),
                  mean=[m], std=[sd], class_names=INFO["class_names"])
    from PIL import Image
    im = Image.open(p).convert("RGB")
    assert im.size == (884, 240)
    a = np.asarray(im)
    for s in range(S):
        y = 4 + s * g["row_h"] + 16 + 40  # inside the tile
        for j in range(n):
            x = 4 + j * 88 + 40
            assert tuple(a[y, x]) == (round(255 * j / 9),) * 3, (s, j)
        header = a[4 + s * g["row_h"]:4 + s * g["row_h"] + 16, 4:200]
        caption = a[4 + s * g["row_h"] + 100:4 + s * g["row_h"] + 114, 4:88]
        assert (header < 128).any() and (caption < 128).any()  # text was drawn
    # RGB data, no statistics: per-image stretch, still the right size
    im2 = make_grid_image(torch.randn(1, 3, 3, 32, 32), torch.tensor([[0, 1, 2]]), torch.ones(2))
    assert im2.size == (4 + 3 * 100, 4 + 16 + 96 + 14 + 4)
