"""Baselines on synthetic data with known answers."""
import pytest
import torch
from torch import nn

from fastdistill.baselines import (_lr_cycle, as_steps, average_real, evaluate_training_baseline, kmeans,
                                   kmeans_real, knn_accuracy, knn_baseline, knn_predict,
                                   optimized_real, random_real, train_checkpoints)
from fastdistill.errors import ConfigError, ShapeError
from fastdistill.models import ModuleModel


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread avoids oversubscription on a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def blobs(n_per=50, centres=((0.0, 0.0), (10.0, 0.0), (0.0, 10.0)), spread=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    for c, (a, b) in enumerate(centres):
        xs.append(torch.tensor([a, b]) + spread * torch.randn(n_per, 2, generator=g))
        ys.append(torch.full((n_per,), c))
    return torch.cat(xs).view(-1, 1, 1, 2), torch.cat(ys)


def tiny_model(num_classes=3):
    torch.manual_seed(0)
    return ModuleModel(nn.Sequential(nn.Flatten(), nn.Linear(2, num_classes)), (1, 1, 2), num_classes)


def test_kmeans_finds_well_separated_blob_centres():
    x, y = blobs()
    cent = kmeans(x, 3, torch.Generator().manual_seed(1)).view(3, 2)
    truth = torch.stack([x[y == c].view(-1, 2).mean(0) for c in range(3)])
    # match each true centre to its nearest centroid: a bijection, and exact cluster means
    match = torch.cdist(truth, cent).argmin(1)
    assert sorted(match.tolist()) == [0, 1, 2]
    torch.testing.assert_close(cent[match], truth, rtol=0, atol=1e-5)


def test_kmeans_real_per_class_and_layout():
    # inside every class two sub-blobs: 2 centroids per class recover them
    x, y = blobs(n_per=40, centres=((0, 0), (0, 6), (20, 0), (20, 6)))
    y = y // 2  # classes {0: two blobs near x=0, 1: two blobs near x=20}
    data, labels = kmeans_real(x, y, 2, per_class=2, steps=2, generator=torch.Generator().manual_seed(0))
    assert data.shape == (2, 2, 1, 1, 2) and labels.tolist() == [[0, 1], [0, 1]]
    c0 = sorted(data[:, 0].reshape(2, 2)[:, 1].tolist())
    assert c0 == pytest.approx([0.0, 6.0], abs=0.3)
    assert (data[:, 1].reshape(2, 2)[:, 0] > 15).all()


def test_average_real_is_exact_and_reused_in_every_step():
    x = torch.arange(24, dtype=torch.float64).view(6, 1, 2, 2)
    y = torch.tensor([0, 1, 0, 1, 2, 2])
    data, labels = average_real(x, y, 3, steps=4)
    assert data.shape == (4, 3, 1, 2, 2) and labels.tolist() == [[0, 1, 2]] * 4
    for c in range(3):
        exp = x[y == c].mean(0)
        for s in range(4):
            assert torch.equal(data[s, c], exp)


def test_random_real_draws_distinct_images_of_the_right_class():
    x = torch.arange(60, dtype=torch.float32).view(60, 1, 1, 1)
    y = torch.arange(60) % 3
    data, labels = random_real(x, y, 3, per_class=6, steps=3, generator=torch.Generator().manual_seed(0))
    assert data.shape == (3, 6, 1, 1, 1)
    assert labels.tolist() == [[0, 0, 1, 1, 2, 2]] * 3
    vals = data.flatten().long()
    assert len(set(vals.tolist())) == 18                       # no repeats
    assert torch.equal(vals % 3, labels.flatten())             # image i has class i mod 3


def test_as_steps_layout_matches_hard_labels_order():
    per_class = [torch.tensor([[10.0], [11.0], [12.0], [13.0]]), torch.tensor([[20.0], [21.0], [22.0], [23.0]])]
    data, labels = as_steps(per_class, steps=2)
    assert data.squeeze(-1).tolist() == [[10, 11, 20, 21], [12, 13, 22, 23]]
    assert labels.tolist() == [[0, 0, 1, 1], [0, 0, 1, 1]]


def test_knn_on_separable_toy_set():
    x, y = blobs(seed=0)
    tx, ty = blobs(seed=1)
    for metric in ("l1", "l2"):
        for k in (1, 3):
            assert knn_accuracy(x, y, tx, ty, k, metric) == 1.0
    # hand-made case: l1 and l2 disagree; tie among 3 classes goes to the nearest
    ref = torch.tensor([[0.0, 3.0], [2.0, 2.0], [10.0, 10.0]]).view(3, 1, 1, 2)
    q = torch.zeros(1, 1, 1, 2)
    lab = torch.tensor([0, 1, 2])
    assert knn_predict(ref, lab, q, 1, "l2").item() == 1     # √8 < 3
    assert knn_predict(ref, lab, q, 1, "l1").item() == 0     # 3 < 4
    assert knn_predict(ref, lab, q, 3, "l2").item() == 1     # 1-1-1 tie: nearest wins
    lab2 = torch.tensor([0, 2, 2])
    assert knn_predict(ref, lab2, q, 3, "l2").item() == 2    # majority beats the nearest


def test_knn_baseline_picks_best_setting_and_accepts_step_layout():
    x, y = blobs(seed=0)
    tx, ty = blobs(seed=1)
    sets = [random_real(x, y, 3, 2, steps=2, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    res = knn_baseline("knn", sets, tx, ty)
    assert res.mean == 1.0 and res.n_sets == 3 and len(res.grid) == 4
    assert res.choice["metric"] in ("l1", "l2") and res.choice["k"] in (1, 3)


def test_train_checkpoints_nest_epochs():
    m = tiny_model()
    x, y = blobs()
    data, labels = random_real(x, y, 3, 2, steps=2, generator=torch.Generator().manual_seed(0))
    th0 = m.init("xavier", torch.Generator().manual_seed(0))
    cyc = torch.tensor([0.1, 0.05, 0.2])
    many = train_checkpoints(m, th0, data, labels, cyc, [1, 3])
    one = train_checkpoints(m, th0, data, labels, cyc, [1])
    assert torch.equal(many[1], one[1]) and not torch.equal(many[1], many[3])


def test_training_baseline_selects_the_working_rate():
    m = tiny_model()
    x, y = blobs()
    tx, ty = blobs(seed=2)
    sets = [random_real(x, y, 3, 2, steps=1, generator=torch.Generator().manual_seed(s)) for s in range(2)]
    ths = [m.init("xavier", torch.Generator().manual_seed(s)) for s in range(3)]
    res = evaluate_training_baseline("random real", m, sets, tx, ty, ths, lr_grid=(0.0, 0.5),
                                     epoch_grid=(1, 5))
    assert res.choice == {"lr": 0.5, "epochs": 5}
    assert len(res.accs) == 6 and len(res.set_means) == 2 and len(res.grid) == 4
    assert res.grid["lr=0.0,E=1"] == res.grid["lr=0.0,E=5"]   # lr 0 leaves θ_0 untouched
    assert res.mean > 0.9 > res.grid["lr=0.0,E=1"]
    assert "paper" in res.protocol
    # separate selection models: the reported accuracies are recomputed on the reported models
    sel = evaluate_training_baseline("random real", m, sets, tx, ty, ths[:1], lr_grid=(0.0, 0.5),
                                     epoch_grid=(1, 5), select_theta0s=ths[1:], select_sets=1,
                                     learned_lrs=torch.tensor([0.02]))
    assert len(sel.grid) == 6 and sel.n_models == 1 and len(sel.accs) == 2
    assert "separate" in sel.protocol
    # progress: one line per (selection set, lr) and per reported set
    lines = []
    evaluate_training_baseline("random real", m, sets, tx, ty, ths[:1], lr_grid=(0.0, 0.5), epoch_grid=(1, 5),
                               select_theta0s=ths[1:], select_sets=1, progress=lines.append)
    assert len(lines) == 2 + 2 and "grid set 1/1, lr 0.5" in lines[1] and "reported set 2/2" in lines[3]


def test_optimized_real_keeps_the_best_scored_sets():
    m = tiny_model()
    x, y = blobs()
    ths = [m.init("xavier", torch.Generator().manual_seed(s)) for s in range(2)]
    lines = []
    kept, scores = optimized_real(m, x, y, 3, 1, 1, ths, 0.05, 3, candidates=6, keep=2, score_images=60,
                                  generator=torch.Generator().manual_seed(0), progress=lines.append)
    assert lines == [f"optimized real: scored 6/6 candidate sets (best {max(scores):.2%})"]
    assert len(kept) == 2 and len(scores) == 6
    assert min(sorted(scores)[-2:]) >= sorted(scores)[-3]


def test_bad_inputs_raise_clear_errors():
    x, y = blobs()
    y_missing = y.clone()
    y_missing[y_missing == 1] = 0
    with pytest.raises(ShapeError, match=r"classes \[1\] have no training examples"):
        average_real(x, y_missing, 3)
    with pytest.raises(ShapeError, match="labels must lie in"):
        random_real(x, y, 2, 1)
    with pytest.raises(ShapeError, match="fewer than"):
        random_real(x, y, 3, 51)
    with pytest.raises(ShapeError, match="k-means needs"):
        kmeans(x[:2], 3)
    with pytest.raises(ConfigError, match="metric"):
        knn_predict(x, y, x, 1, "cosine")
    m = tiny_model()
    one = [random_real(x, y, 3, 1)]
    with pytest.raises(ConfigError, match="learned"):
        _lr_cycle("learned", None, torch.float32)
    with pytest.raises(ConfigError, match="no learning-rate options"):
        evaluate_training_baseline("b", m, one, x, y, [m.init()], lr_grid=(), epoch_grid=(1,))
    with pytest.raises(ShapeError, match="no baseline sets"):
        evaluate_training_baseline("b", m, [], x, y, [m.init()])


def test_repro_table_marks_unrun_settings_and_renders_records(tmp_path):
    import json

    from fastdistill.repro import SETTINGS, render_table
    rec = {"key": "mnist-knn-random", "mean": 0.7245, "std": 0.0083, "n_models": 0, "n_sets": 2,
           "protocol": "k-NN test", "wall_s": 8.0, "scale": "reduced", "machine": "box (2 cores)", "load": 3.5}
    (tmp_path / "mnist-knn-random.json").write_text(json.dumps(rec))
    md = render_table(tmp_path)
    row = next(line for line in md.splitlines() if "k-NN with 10 random real" in line and "| MNIST |" in line)
    assert "| 71.5 ± 2.1 | 72.45 ± 0.83 |" in row and "| reduced |" in row and "8 s" in row
    assert md.count("| not yet run |") == len(SETTINGS) - 1
    assert "box (2 cores)" in md
