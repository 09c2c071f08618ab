"""Dataset readers (idx files, CIFAR python batches) and the offline sources of the real data.

    >>> from fastdistill.data import load_dataset
    >>> ds = load_dataset("mnist")                  # doctest: +SKIP
    >>> ds.train_x.shape, ds.test_y.shape           # doctest: +SKIP
    (torch.Size([60000, 1, 28, 28]), torch.Size([10000]))

Where the data comes from (no web downloads at run time): see :mod:`fastdistill.data.sources`.
"""
from .datasets import DATASETS, Dataset, DatasetInfo, load_dataset
from .sources import data_home, fetch

__all__ = ["load_dataset", "DATASETS", "Dataset", "DatasetInfo", "fetch", "data_home"]
