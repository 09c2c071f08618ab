"""Memory of the back-gradient strategies, counted, not timed (issue 2).

The claim (ALGORITHMS.md §4): ``stored`` keeps θ_t (P numbers) per step and only one step's
double-backward graph at a time, while ``autograd`` keeps every step's graph alive. We count the
bytes autograd saves for backward with ``torch.autograd.graph.saved_tensors_hooks`` (live and peak,
per unique storage, the test's own inputs excluded) on a tiny LeNet problem at several T.
The meter (``fastdistill._memory.SavedTensorMeter``) is the one ``benches/bench_unroll.py`` reports.
"""
from __future__ import annotations

import pytest
import torch

from fastdistill._memory import SavedTensorMeter
from fastdistill.backgrad import make_outer_loss, meta_gradient
from fastdistill.models import LeNet


MODEL = LeNet()
P = MODEL.num_params


def _peak(strategy: str, T: int):
    """(peak saved-for-backward bytes, bytes still held afterwards, stats) of one meta-iteration
    on a tiny problem: 2 images per step (S = 1, E = T), an outer batch of 8, float32."""
    gen = torch.Generator().manual_seed(0)
    theta0 = MODEL.init("xavier", gen)
    x = torch.randn(1, 2, 1, 28, 28, generator=gen)
    y = torch.tensor([[3, 7]])
    xr, yr = torch.randn(8, 1, 28, 28, generator=gen), torch.randint(0, 10, (8,), generator=gen)
    lrs = torch.full((T,), 0.02)
    with SavedTensorMeter(exclude=(theta0, x, y, lrs, xr, yr)) as meter:
        out = meta_gradient(MODEL, theta0, x, y, lrs, make_outer_loss(MODEL, xr, yr),
                            strategy=strategy, need_theta0=False)
    assert torch.isfinite(out.loss)
    return meter.peak, meter.live, out.stats


@pytest.fixture(scope="module")
def peaks():
    # byte counts do not depend on threads; one thread keeps this fast on a loaded machine
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {(s, T): _peak(s, T) for s in ("autograd", "stored") for T in (5, 10, 20)}
    finally:
        torch.set_num_threads(before)


def test_meter_counts_unique_storages_and_releases_them():
    x = torch.randn(1000, requires_grad=True)
    w = torch.randn(1000)
    with SavedTensorMeter() as meter:
        loss = (x * x).sum()  # saves x twice: one storage
        assert meter.live == 4000
        (w * x).sum().backward(retain_graph=False)  # saves w and x: w is new
        assert meter.peak == 8000
    del loss
    assert meter.live == 0, "graph freed, nothing should be held"
    with SavedTensorMeter(exclude=(x,)) as meter:
        (x * x).sum().backward()
    assert meter.peak == 0


def test_graphs_are_freed(peaks):
    for key, (_, live, _) in peaks.items():
        assert live == 0, f"{key}: {live} bytes of graph outlived the meta-iteration"


def test_stored_keeps_theta_t_not_graphs(peaks):
    state = P * 4
    step = (peaks["autograd", 10][0] - peaks["autograd", 5][0]) / 5
    for T in (5, 10, 20):
        assert peaks["stored", T][2]["stored_bytes"] == T * state
    growth = peaks["stored", 20][0] - peaks["stored", 5][0]
    # 15 more steps may not add even a twentieth of one step's graph (exactly 0 today); keeping
    # every step's graph, or even just every θ_t inside the graph, adds ≥ 15 × P·4 bytes
    assert abs(growth) <= 0.05 * step, f"stored graph grew by {growth} bytes from T=5 to T=20"
    # all-in, stored at T=20 needs less than autograd's graph alone
    assert peaks["stored", 20][0] + 20 * state < peaks["autograd", 20][0]


def test_autograd_graph_grows_linearly_with_T(peaks):
    a5, a10, a20 = (peaks["autograd", T][0] for T in (5, 10, 20))
    first, second = (a10 - a5) / 5, (a20 - a10) / 10
    # every step keeps at least θ_{t+1} plus its activations alive
    assert first > P * 4, f"autograd grows by {first:.0f} B/step, less than θ (P·4 = {P * 4})"
    assert second == pytest.approx(first, rel=0.05), (first, second)


def test_peak_rss_meter_sees_this_process_and_resets():
    """VmHWM rises with a real allocation and can be reset (the benches' child-process meter).

    Measured in a fresh child, as the benches do: inside this long-lived test process an earlier
    peak, or freed-but-resident heap, can hide a 64 MiB allocation."""
    import json
    import subprocess
    import sys

    code = (
        "import json, numpy as np\n"
        "from fastdistill._memory import current_rss_bytes, peak_rss_bytes, reset_peak_rss\n"
        "ok = current_rss_bytes() is not None and reset_peak_rss()\n"
        "base = peak_rss_bytes()\n"
        "a = np.ones(64 * 2**20 // 8)\n"
        "grown = peak_rss_bytes()\n"
        "del a\n"
        "reset = reset_peak_rss()\n"
        "print(json.dumps(dict(ok=ok, base=base, grown=grown, reset=reset, after=peak_rss_bytes())))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    if not r["ok"]:
        pytest.skip("needs Linux /proc/self/status and clear_refs")
    assert r["grown"] >= r["base"] + 60 * 2**20
    assert r["reset"] and r["after"] < r["base"] + 32 * 2**20  # back near the current RSS
