"""The idx file format of MNIST and Fashion-MNIST: read, write and find the four standard files.

An idx file is ``0x00 0x00 <type> <ndim>``, then ``ndim`` big-endian uint32 sizes, then the
array in C order, big-endian. MNIST images are type 0x08 (uint8) with ``ndim = 3``
(``[N, 28, 28]``, magic 2051); labels are uint8 with ``ndim = 1`` (``[N]``, magic 2049).
Files may be gzip'd; the gzip magic, not the file name, decides.

Example::

    >>> import numpy as np, tempfile, os
    >>> from fastdistill.data.idx import read_idx, write_idx
    >>> p = os.path.join(tempfile.mkdtemp(), "train-labels-idx1-ubyte.gz")
    >>> _ = write_idx(p, np.array([3, 1, 4], dtype=np.uint8))
    >>> read_idx(p).tolist()
    [3, 1, 4]
"""
from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np

from ..errors import DataError

__all__ = ["read_idx", "write_idx", "find_idx_files", "read_idx_dataset", "IDX_STEMS"]

PathLike = Union[str, os.PathLike]

# idx type code -> big-endian numpy dtype
_CODES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"),
          0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
_DTYPE_TO_CODE = {np.dtype(d).newbyteorder("=").str if np.dtype(d).itemsize > 1 else np.dtype(d).str: c
                  for c, d in _CODES.items()}

#: split -> (images file stem, labels file stem), the standard MNIST/Fashion-MNIST names.
IDX_STEMS = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _read_bytes(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror}); check the path and its permissions") from None
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: corrupt or truncated gzip ({e}); delete it and download it again") from None


def read_idx(path: PathLike) -> np.ndarray:
    """Read one idx file (plain or gzip'd).

    Args:
        path: the file.

    Returns:
        A C-contiguous, writable array in native byte order with the file's shape, e.g. uint8
        ``[N, 28, 28]`` for images and uint8 ``[N]`` for labels.

    Raises:
        DataError: unreadable, bad gzip, wrong magic number, truncated or over-long payload.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _CODES or not 1 <= data[3] <= 8:
        magic = data[:4].hex() if len(data) >= 4 else "(file shorter than 4 bytes)"
        raise DataError(f"{path}: wrong magic number {magic}, not an idx file; point root= at the "
                        f"standard idx files (e.g. train-images-idx3-ubyte.gz)")
    dtype, ndim = _CODES[data[2]], data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated idx header; delete it and download it again")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        what = "truncated" if len(data) - header < expected else "has trailing bytes"
        raise DataError(f"{path}: idx payload {what} ({len(data) - header} bytes, header says "
                        f"{expected} for shape {list(shape)}); delete it and download it again")
    arr = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def write_idx(path: PathLike, array, compress: Optional[bool] = None) -> Path:
    """Write ``array`` as an idx file (the inverse of :func:`read_idx`).

    Args:
        path: destination; parent directories are created.
        array: numpy array or torch tensor of dtype uint8, int8, int16, int32, float32 or
            float64 with 1 to 8 dimensions, e.g. uint8 images ``[N, H, W]`` or labels ``[N]``.
        compress: gzip the file; default: whether ``path`` ends in ``.gz``.

    Returns:
        ``Path(path)``.

    Raises:
        DataError: unsupported dtype or number of dimensions.
    """
    path = Path(path)
    if hasattr(array, "detach"):  # torch.Tensor
        array = array.detach().cpu().numpy()
    array = np.asarray(array)
    key = array.dtype.newbyteorder("=").str if array.dtype.itemsize > 1 else array.dtype.str
    if key not in _DTYPE_TO_CODE or not 1 <= array.ndim <= 8:
        raise DataError(f"write_idx: cannot store a {array.ndim}-d {array.dtype} array; use uint8 "
                        f"(images [N, H, W] or labels [N]) or int8/16/32, float32/64 with 1-8 dims")
    code = _DTYPE_TO_CODE[key]
    payload = (bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
               + np.ascontiguousarray(array, dtype=_CODES[code]).tobytes())
    if compress is None:
        compress = path.name.endswith(".gz")
    if compress:
        payload = gzip.compress(payload, mtime=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(payload)
    return path


def _candidates(stem: str) -> Sequence[str]:
    dotted = stem.replace("-idx", ".idx")  # the names Windows tools give the unpacked files
    return (stem + ".gz", stem, dotted + ".gz", dotted)


def find_idx_files(root: PathLike, subdirs: Sequence[str] = ()) -> Dict[str, Tuple[Path, Path]]:
    """Locate the four standard idx files under ``root``.

    Args:
        root: directory holding ``train-images-idx3-ubyte[.gz]``, ``train-labels-idx1-ubyte[.gz]``,
            ``t10k-images-idx3-ubyte[.gz]``, ``t10k-labels-idx1-ubyte[.gz]``.
        subdirs: other places below ``root`` to look (e.g. torchvision's ``MNIST/raw``).

    Returns:
        ``{"train": (images, labels), "test": (images, labels)}``.

    Raises:
        DataError: ``root`` missing, or a file not found in any of the places.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"{root}: no such directory; pass root= a folder with the four idx files "
                        f"(train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-...)")
    dirs = [root] + [root / s for s in subdirs]
    found = {}
    for split, stems in IDX_STEMS.items():
        pair = []
        for stem in stems:
            hit = next((d / c for d in dirs for c in _candidates(stem) if (d / c).is_file()), None)
            if hit is None:
                raise DataError(f"{root}: no {stem}[.gz] found; put the four standard idx files "
                                f"(train/t10k images and labels) in this folder")
            pair.append(hit)
        found[split] = tuple(pair)
    return found


def read_idx_dataset(files: Dict[str, Tuple[Path, Path]], image_shape: Tuple[int, int] = (28, 28),
                     num_classes: int = 10) -> Dict[str, np.ndarray]:
    """Read and validate an idx image dataset.

    Args:
        files: from :func:`find_idx_files`.
        image_shape: expected ``(H, W)``.
        num_classes: labels must lie in ``[0, num_classes)``.

    Returns:
        ``{"train_x": uint8 [N, H, W], "train_y": uint8 [N], "test_x": ..., "test_y": ...}``.

    Raises:
        DataError: wrong dtype/shape, mismatched image/label counts, labels out of range.
    """
    out = {}
    for split, (img_path, lab_path) in files.items():
        x, y = read_idx(img_path), read_idx(lab_path)
        if x.dtype != np.uint8 or x.ndim != 3 or tuple(x.shape[1:]) != tuple(image_shape):
            raise DataError(f"{img_path}: expected uint8 images [N, {image_shape[0]}, {image_shape[1]}], "
                            f"got {x.dtype} {list(x.shape)}; check this is the right dataset file")
        if y.dtype != np.uint8 or y.ndim != 1:
            raise DataError(f"{lab_path}: expected uint8 labels [N], got {y.dtype} {list(y.shape)}; "
                            f"check this is the right dataset file")
        if len(x) != len(y):
            raise DataError(f"{img_path}: {len(x)} images but {lab_path.name} has {len(y)} labels; "
                            f"one of the two files is from another dataset or damaged")
        if len(y) and int(y.max()) >= num_classes:
            raise DataError(f"{lab_path}: label {int(y.max())} outside [0, {num_classes}); check this is "
                            f"the right dataset file")
        out[f"{split}_x"], out[f"{split}_y"] = x, y
    return out
