"""Pre-training benchmark: K LeNets trained by minibatch SGD, one at a time vs all K at once.

A model pool for the pre-trained settings (DD §3.5–3.6) is 2,200 LeNets, each one epoch of
MNIST in batches of 64 (938 SGD steps). ``loop`` is :func:`fastdistill.pretrain.train_model`
per network (autograd through ``model.apply``: the reference); ``batched`` is
:func:`fastdistill.pretrain.train_models` (every step's K gradients from LeNet's explicit engine,
the C++ ``lenet_step`` on CPU: one network per thread). Both run the same recipe with the same
generators; their per-step gradients agree to float round-off (``tests/test_pretrain.py``
checks whole trainings in float64), but float32 SGD is chaotic (a ReLU or pool decision flipped
by round-off parts two trajectories by ~1e-5 within a few steps), so this test asserts that
both paths' networks reach the same training loss (rtol 1e-3) and records the largest weight
difference. Run::

    nice -n 5 .venv/bin/python -m pytest benches/bench_pretrain.py --benchmark-only \\
        --benchmark-columns=median,iqr,rounds --benchmark-timer=time.process_time

The problem: K = 16 float32 LeNets (xavier θ_0 from seeds 0..15), 1,920 N(0, 1) images of
1×28×28 with random labels, batch 64, one epoch = 30 SGD steps (momentum 0.9, lr 0.01); one
torch thread unless ``FASTDISTILL_BENCH_THREADS`` says otherwise (``FASTDISTILL_BENCH_K`` sets
K). Reported per round (K networks × 30 steps); ``extra_info`` holds the ms per network-step
and the growth of the process's peak RSS during the test (``VmHWM`` after a reset; 0 where
the reference's peak was already higher, so read it as an upper bound of the extra memory).
"""
from __future__ import annotations

import os
import statistics

import pytest
import torch

from fastdistill._memory import current_rss_bytes, peak_rss_bytes, reset_peak_rss
from fastdistill.backgrad.common import inner_loss
from fastdistill.models import LeNet
from fastdistill.pretrain import train_model, train_models

STEPS, BATCH = 30, 64


@pytest.fixture(scope="module")
def problem():
    torch.set_num_threads(int(os.environ.get("FASTDISTILL_BENCH_THREADS", "1")))
    K = int(os.environ.get("FASTDISTILL_BENCH_K", "16"))
    m = LeNet()
    th0 = torch.stack([m.init("xavier", torch.Generator().manual_seed(s)) for s in range(K)])
    g = torch.Generator().manual_seed(123)
    x = torch.randn(STEPS * BATCH, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (STEPS * BATCH,), generator=g)
    return m, th0, x, y


def _loop(m, th0, x, y):
    return torch.stack([train_model(m, th0[k], x, y, lr=0.01, batch=BATCH,
                                    generator=torch.Generator().manual_seed(1000 + k))
                        for k in range(len(th0))])


def _batched(m, th0, x, y):
    return train_models(m, th0, x, y, lr=0.01, batch=BATCH,
                        generators=[torch.Generator().manual_seed(1000 + k) for k in range(len(th0))])


@pytest.mark.parametrize("path", ["loop", "batched"])
def test_pretrain_epoch(benchmark, problem, path):
    m, th0, x, y = problem
    fn = _loop if path == "loop" else _batched
    base = current_rss_bytes() or 0
    reset_peak_rss()
    out = benchmark.pedantic(fn, args=(m, th0, x, y), rounds=5, warmup_rounds=1)
    benchmark.extra_info["peak_rss_growth_mb"] = round(max(0, peak_rss_bytes() - base) / 2**20, 1)
    benchmark.extra_info["ms_per_network_step"] = round(
        1e3 * statistics.median(benchmark.stats.stats.data) / (len(th0) * STEPS), 3)
    benchmark.extra_info["K"] = len(th0)
    if path == "batched":   # the fast path is only worth timing if it trains equally good networks
        ref = _loop(m, th0, x, y)
        loss = lambda th: torch.stack([inner_loss(m.predict(t, x), y) for t in th])  # noqa: E731
        benchmark.extra_info["max_weight_diff"] = float((out - ref).abs().max())
        torch.testing.assert_close(loss(out), loss(ref), rtol=1e-3, atol=0)
