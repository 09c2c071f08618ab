"""Evaluation benchmark: one LeNet pass over MNIST's 10,000 test images, ``apply`` vs ``predict``.

Every reported accuracy (held-out models, baselines, validation) is such a pass, and DD's
baselines run thousands of them. ``LeNet.predict`` returns ``apply``'s values bitwise
(``tests/test_models.py``) with the 2×2 max-pool computed as a max of the window corners instead
of ``F.max_pool2d``. Run::

    nice -n 5 .venv/bin/python -m pytest benches/bench_eval.py --benchmark-only \\
        --benchmark-columns=median,iqr,rounds

The problem: float32 LeNet (P = 61,706), xavier θ from seed 0, 10,000 N(0, 1) images of 1×28×28,
:func:`fastdistill.evaluate.accuracy`'s batch of 2,500; one torch thread unless
``FASTDISTILL_BENCH_THREADS`` says otherwise. Memory is not measured: in both paths the largest
tensor is conv1's activation (2,500 × 6 × 28 × 28 floats, 47 MB); ``predict`` adds two
quarter-size intermediates of the pooling.
"""
from __future__ import annotations

import os

import pytest
import torch

from fastdistill.evaluate import accuracy
from fastdistill.models import LeNet
from fastdistill.models.base import FunctionalModel


class _ApplyOnly(LeNet):
    """LeNet whose ``predict`` is the base class's (``apply`` under no_grad): the reference."""

    predict = FunctionalModel.predict


@pytest.fixture(scope="module")
def problem():
    torch.set_num_threads(int(os.environ.get("FASTDISTILL_BENCH_THREADS", "1")))
    g = torch.Generator().manual_seed(0)
    m = LeNet()
    th = m.init("xavier", g)
    x = torch.randn(10000, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (10000,), generator=g)
    return m, th, x, y


@pytest.mark.parametrize("path", ["apply", "predict"])
def test_eval_pass(benchmark, problem, path):
    m, th, x, y = problem
    model = _ApplyOnly() if path == "apply" else m
    acc = benchmark.pedantic(accuracy, args=(model, th, x, y), rounds=7, warmup_rounds=1)
    assert acc == accuracy(_ApplyOnly(), th, x, y)
