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
