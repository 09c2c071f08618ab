"""Shared pytest setup: Triton interpreter without a GPU, and the ``cuda`` marker."""
import os

import torch

# Must run before any module defining a @triton.jit kernel is imported: Triton reads it at
# decoration time, and without a GPU every launch would otherwise fail ("0 active drivers").
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

# The suite's tensors are tiny: on the 2-core CI machine (often shared) two intra-op threads
# make small ops 10-20x slower than one. FASTDISTILL_TEST_THREADS overrides.
torch.set_num_threads(int(os.environ.get("FASTDISTILL_TEST_THREADS", "1")))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """MNIST-format idx files (shared by the CLI and runner tests): class c has a bright bar at
    rows 2c..2c+1 on a noisy background."""
    import numpy as np

    from fastdistill.data.idx import write_idx

    d = tmp_path_factory.mktemp("tiny-mnist")
    rng = np.random.default_rng(0)
    for split, n in (("train", 60), ("t10k", 40)):
        y = (np.arange(n) % 10).astype(np.uint8)
        x = rng.integers(0, 60, (n, 28, 28), dtype=np.uint8)
        for i, c in enumerate(y):
            x[i, 2 + 2 * c:4 + 2 * c, 4:24] = 250
        write_idx(d / f"{split}-images-idx3-ubyte.gz", x)
        write_idx(d / f"{split}-labels-idx1-ubyte.gz", y)
    return d
