"""CIFAR-10 "python version" batches: read (safely), write tiny ones for tests, find a full set.

Each batch (``data_batch_1`` … ``data_batch_5``, ``test_batch``) is a Python-2 ``cPickle``
(protocol 2) of a dict with ``bytes`` keys: ``b"data"`` uint8 ``[10000, 3072]`` (per row the
1024 red, then green, then blue pixels of a 32×32 image, row-major), ``b"labels"`` a list of
ints in 0..9, ``b"batch_label"`` and ``b"filenames"``. ``batches.meta`` holds
``b"label_names"``. The files are read with :func:`fastdistill.data._pickle.safe_load`, which
rebuilds only numeric numpy arrays and plain containers.

Example::

    >>> import numpy as np, tempfile, os
    >>> from fastdistill.data.cifar import read_cifar_batch, write_cifar_batch
    >>> p = os.path.join(tempfile.mkdtemp(), "test_batch")
    >>> _ = write_cifar_batch(p, np.zeros((2, 3, 32, 32), np.uint8), [7, 1])
    >>> x, y = read_cifar_batch(p)
    >>> x.shape, y.tolist()
    ((2, 3, 32, 32), [7, 1])
"""
from __future__ import annotations

import os
import struct
import tarfile
from contextlib import ExitStack
from pathlib import Path
from typing import IO, Any, Callable, Dict, Optional, Sequence, Tuple, Union

import numpy as np

from ..errors import DataError
from ._pickle import safe_load

__all__ = ["read_cifar_batch", "write_cifar_batch", "load_cifar10", "CIFAR10_CLASSES"]

PathLike = Union[str, os.PathLike]

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
META = "batches.meta"
FOLDER = "cifar-10-batches-py"
TARBALL = "cifar-10-python.tar.gz"


def _get(d: Dict[Any, Any], key: str) -> Any:
    """``d[b"key"]`` (the real files) or ``d["key"]`` (batches re-pickled by Python 3)."""
    if key.encode() in d:
        return d[key.encode()]
    return d.get(key)


def _unpickle(f: IO[bytes], source: str) -> Dict[Any, Any]:
    obj = safe_load(f, source=source, encoding="bytes", allow_bytes_globals=True)
    if not isinstance(obj, dict):
        raise DataError(f"{source}: expected a dict, got {type(obj).__name__}; this is not a CIFAR "
                        f"python batch (use the 'python version' of the dataset)")
    return obj


def _parse_batch(obj: Dict[Any, Any], source: str, num_classes: int) -> Tuple[np.ndarray, np.ndarray]:
    data, labels = _get(obj, "data"), _get(obj, "labels")
    hint = "re-download the 'python version' of CIFAR-10"
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = f"{data.dtype} {list(data.shape)}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{source}: 'data' must be uint8 [N, 3072], got {shape}; {hint}")
    if labels is None:
        raise DataError(f"{source}: no 'labels' entry; {hint}")
    try:
        y = np.asarray(labels, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError):
        raise DataError(f"{source}: 'labels' is not a list of integers; {hint}") from None
    if len(y) != len(data):
        raise DataError(f"{source}: {len(data)} images but {len(y)} labels; {hint}")
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise DataError(f"{source}: labels outside [0, {num_classes}); {hint}")
    return np.ascontiguousarray(data.reshape(-1, 3, 32, 32)), y


def read_cifar_batch(path: PathLike, num_classes: int = 10) -> Tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR python batch.

    Args:
        path: e.g. ``.../cifar-10-batches-py/data_batch_1``.
        num_classes: labels must lie in ``[0, num_classes)``.

    Returns:
        ``(images, labels)``: uint8 ``[N, 3, 32, 32]`` (RGB planes) and int64 ``[N]``.

    Raises:
        DataError: unreadable, corrupt or malicious pickle, wrong layout, count mismatch.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            obj = _unpickle(f, str(path))
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror}); check the path and its permissions") from None
    return _parse_batch(obj, str(path), num_classes)


# Python-2 protocol-2 opcodes, written by hand so that test files have the real files' layout
# (BINSTRING keys, numpy.core.multiarray._reconstruct), which Python 3's pickler cannot produce.
def _p2_str(b: bytes) -> bytes:
    return (b"U" + bytes([len(b)]) + b) if len(b) < 256 else (b"T" + struct.pack("<i", len(b)) + b)


def _p2_int(i: int) -> bytes:
    if 0 <= i < 256:
        return b"K" + bytes([i])
    if 0 <= i < 65536:
        return b"M" + struct.pack("<H", i)
    return b"J" + struct.pack("<i", i)


def _p2_uint8_array(a: np.ndarray) -> bytes:
    shape = b"(" + b"".join(_p2_int(s) for s in a.shape) + b"t"
    dtype = b"cnumpy\ndtype\n" + _p2_str(b"u1") + _p2_int(0) + _p2_int(1) + b"\x87R"
    dtype += b"(" + _p2_int(3) + _p2_str(b"|") + b"NNN" + b"J\xff\xff\xff\xffJ\xff\xff\xff\xff" + _p2_int(0) + b"tb"
    state = b"(" + _p2_int(1) + shape + dtype + b"\x89" + _p2_str(np.ascontiguousarray(a).tobytes()) + b"tb"
    return (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + _p2_int(0) + b"\x85"
            + _p2_str(b"b") + b"\x87R" + state)


def _p2_list(items: Sequence[bytes]) -> bytes:
    return b"]" + (b"(" + b"".join(items) + b"e" if items else b"")


def write_cifar_batch(path: PathLike, data, labels: Sequence[int], batch_label: Optional[str] = None,
                      filenames: Optional[Sequence[str]] = None) -> Path:
    """Write a CIFAR python batch in the original Python-2 pickle layout.

    Args:
        path: destination (e.g. ``tmp/cifar-10-batches-py/data_batch_1``); parents are created.
        data: uint8 ``[N, 3, 32, 32]`` or ``[N, 3072]`` (numpy array or torch tensor).
        labels: N ints.
        batch_label: stored as ``b"batch_label"``; default ``"batch <file name>"``.
        filenames: N names stored as ``b"filenames"``; default ``"img_<i>.png"``.

    Returns:
        ``Path(path)``; the file loads with ``pickle.load(f, encoding="bytes")`` and
        :func:`read_cifar_batch`.

    Raises:
        DataError: wrong dtype/shape or label count.
    """
    path = Path(path)
    if hasattr(data, "detach"):
        data = data.detach().cpu().numpy()
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim not in (2, 4) or data.reshape(len(data), -1).shape[1] != 3072:
        raise DataError(f"write_cifar_batch: data must be uint8 [N, 3, 32, 32] or [N, 3072], got "
                        f"{data.dtype} {list(data.shape)}")
    data = data.reshape(len(data), 3072)
    labels = [int(v) for v in labels]
    if len(labels) != len(data):
        raise DataError(f"write_cifar_batch: {len(data)} images but {len(labels)} labels")
    filenames = [f"img_{i}.png" for i in range(len(data))] if filenames is None else list(filenames)
    items = {
        b"batch_label": _p2_str((batch_label or f"batch {path.name}").encode()),
        b"labels": _p2_list([_p2_int(v) for v in labels]),
        b"data": _p2_uint8_array(data),
        b"filenames": _p2_list([_p2_str(str(n).encode()) for n in filenames]),
    }
    body = b"".join(_p2_str(k) + v for k, v in items.items())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x80\x02}(" + body + b"u.")
    return path


def _opener(root: Path, stack: ExitStack) -> Tuple[Callable[[str], Optional[IO[bytes]]], str]:
    """Return ``open(name) -> file or None`` over a folder or the official tarball."""
    tar_path = root if root.is_file() else root / TARBALL
    for d in (root, root / FOLDER):
        if d.is_dir() and (d / TEST_BATCH).is_file():
            return (lambda name: stack.enter_context(open(d / name, "rb")) if (d / name).is_file() else None,
                    str(d))
    if tar_path.is_file():
        try:
            tar = stack.enter_context(tarfile.open(tar_path, "r:*"))
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
        except (tarfile.TarError, OSError, EOFError) as e:
            raise DataError(f"{tar_path}: corrupt or truncated archive ({e}); download it again") from None
        return (lambda name: tar.extractfile(members[name]) if name in members else None), str(tar_path)
    raise DataError(f"{root}: no CIFAR-10 batches found; pass root= the folder holding {FOLDER}/ "
                    f"(data_batch_1..5, test_batch) or {TARBALL}")


def load_cifar10(root: PathLike) -> Tuple[Dict[str, np.ndarray], Tuple[str, ...], str]:
    """Read the full CIFAR-10 python batches from ``root``.

    Args:
        root: a folder holding ``data_batch_1..5`` and ``test_batch``, or holding
            ``cifar-10-batches-py/`` or ``cifar-10-python.tar.gz``, or that tarball itself.

    Returns:
        ``(arrays, class_names, source)``: arrays ``{"train_x": uint8 [50000, 3, 32, 32],
        "train_y": int64 [50000], "test_x": uint8 [10000, 3, 32, 32], "test_y": int64 [10000]}``
        (as many rows as the batches hold), the names from ``batches.meta`` (or the standard ones)
        and where they were read.

    Raises:
        DataError: a batch missing, corrupt or inconsistent.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"{root}: no such file or directory; pass root= the folder holding {FOLDER}/")
    with ExitStack() as stack:
        open_member, where = _opener(root, stack)
        parts = {}
        for split, names in (("train", TRAIN_BATCHES), ("test", (TEST_BATCH,))):
            xs, ys = [], []
            for name in names:
                f = open_member(name)
                if f is None:
                    raise DataError(f"{where}: {name} is missing; CIFAR-10 needs data_batch_1..5 and "
                                    f"test_batch (re-extract {TARBALL})")
                source = f"{where}/{name}"
                x, y = _parse_batch(_unpickle(f, source), source, len(CIFAR10_CLASSES))
                xs.append(x)
                ys.append(y)
            parts[f"{split}_x"], parts[f"{split}_y"] = np.concatenate(xs), np.concatenate(ys)
        names = CIFAR10_CLASSES
        meta = open_member(META)
        if meta is not None:
            got = _get(_unpickle(meta, f"{where}/{META}"), "label_names")
            if isinstance(got, list) and len(got) == len(CIFAR10_CLASSES):
                names = tuple(n.decode("latin-1") if isinstance(n, bytes) else str(n) for n in got)
    return parts, names, where
