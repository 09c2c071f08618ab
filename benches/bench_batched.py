"""Batched multi-network inner loop (issue 5 item 1) against the per-network loop, CPU.

Run (the figures in ``benches/RESULTS.md`` come from this command)::

    nice -n 10 .venv/bin/python -m pytest benches/bench_batched.py --benchmark-only \\
        --benchmark-group-by=param:case --benchmark-columns=median,iqr,rounds \\
        --benchmark-json=/tmp/batched.json
    .venv/bin/python benches/bench_batched.py --table /tmp/batched.json   # markdown table
    .venv/bin/python benches/bench_batched.py --sgemm     # the day's 1024² sgemm rate, 1 and 2 threads

Two cases, each with the reference beside the fast paths in one group:

* ``step-K{K}`` -- one **network-step** for K networks: the forward step (``g = ∇_θ ℓ``) and the
  reverse step (``g``, the HVP ``H λ`` and ``∇_x̃ (λ·g)``) of plain GD, LeNet, n = 10 MNIST-shaped
  images, float32. ``reference``: K × (``stored``'s ``_grad`` + ``reverse_gd_step``), the
  engine's per-network code on per-step double backward; ``batched-autograd``: all K through
  ``batched_apply`` and double backward; ``batched-torch``: the explicit LeNet engine on torch
  ops (``lenet_step``'s reference backend: batched GEMMs over K + the C++ layer ops);
  ``batched``: the same engine on ``lenet_step``'s C++ backend (one network per thread, the
  whole step fused, sequential BLAS). Reported per network-step (÷ K) and in
  GFLOP/s, with the FLOPs of one reference network-step counted by
  ``torch.utils.flop_counter.FlopCounterMode`` (GEMMs and convolutions, backward included) --
  the same useful work for every implementation.
* ``meta-K{K}`` -- one random-init DD meta-iteration: K networks from their own xavier θ_0,
  S = 10 distilled steps of 10 images, E = 3 epochs (T = 30), η = 0.02, outer loss on a real
  batch of 1024 (random N(0, 1) images, random labels), ∂L/∂x̃ and ∂L/∂η averaged over the K
  networks. ``reference``: :func:`meta_gradient_batched_reference` (K ``stored`` unrolls one
  after another on per-step double backward); ``batched-torch`` / ``batched``:
  :func:`meta_gradient_batched` with ``lenet_step`` forced to its reference backend / on the C++
  backend (the default; its outer loss then also runs the C++ step, in 32-image chunks).
* ``outer-K{K}`` -- DD's outer loss alone, ``(L, ∇_θ L)`` of K networks on the 1024 real images:
  ``per-network`` (K autograd passes through ``model.apply``, oneDNN convolutions) against
  ``batched`` (the C++ step in chunks of ``OUTER_IMAGES_PER_NET`` images per network).

On a loaded shared machine wall time mostly measures the scheduler; with one thread,
``--benchmark-timer=time.process_time`` measures the CPU time the process actually got (what
``benches/RESULTS.md`` reports next to wall-clock figures).

Environment knobs: ``FASTDISTILL_BENCH_THREADS`` (default 2), ``FASTDISTILL_BENCH_K`` (network-step
K values, default ``1,4,16,64``), ``FASTDISTILL_BENCH_META_K`` (default ``4,16``). The machine is
shared: read the ratio within a group (same run, interleaved in time), not the absolute figure;
``extra_info`` records the 1-minute load average around each test.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from fastdistill import _backend  # noqa: E402
from fastdistill._memory import cpu_model  # noqa: E402
from fastdistill.backgrad import (make_batched_outer_loss, meta_gradient_batched,  # noqa: E402
                                  meta_gradient_batched_reference)
from fastdistill.backgrad.common import InnerProblem  # noqa: E402
from fastdistill.backgrad.stored import _grad, reverse_gd_step  # noqa: E402
from fastdistill.models import LeNet  # noqa: E402
from fastdistill.models.batched import LeNetBatchedEngine, batched_engine  # noqa: E402

THREADS = int(os.environ.get("FASTDISTILL_BENCH_THREADS", "2"))
STEP_K = [int(k) for k in os.environ.get("FASTDISTILL_BENCH_K", "1,4,16,64").split(",") if k.strip()]
META_K = [int(k) for k in os.environ.get("FASTDISTILL_BENCH_META_K", "4,16").split(",") if k.strip()]
OUTER_K = [int(k) for k in os.environ.get("FASTDISTILL_BENCH_OUTER_K", "4").split(",") if k.strip()]
N_IMAGES, S, E, REAL_BATCH, LR, SEED = 10, 10, 3, 1024, 0.02, 0
DTYPE = torch.float32
STEP_IMPLS = ("reference", "batched-autograd", "batched-torch", "batched")
META_IMPLS = ("reference", "batched-torch", "batched")
OUTER_IMPLS = ("per-network", "batched")


def thetas(model: LeNet, K: int) -> torch.Tensor:
    return torch.stack([model.init("xavier", torch.Generator().manual_seed(SEED + 1 + k), dtype=DTYPE)
                        for k in range(K)])


# -- one network-step ------------------------------------------------------------------------
def step_problem(K: int):
    gen = torch.Generator().manual_seed(SEED)
    m = LeNet()
    x = torch.randn(1, N_IMAGES, *m.input_shape, generator=gen, dtype=DTYPE)
    y = torch.arange(N_IMAGES).remainder(10).view(1, -1)
    lam = 1e-2 * torch.randn(K, m.num_params, generator=gen, dtype=DTYPE)
    prob = InnerProblem(m, x, y, torch.full((1,), LR, dtype=DTYPE))
    return m, thetas(m, K), prob, lam


def reference_steps(prob: InnerProblem, th: torch.Tensor, lam: torch.Tensor):
    """K × (forward step + reverse step), one network at a time."""
    out = None
    for k in range(th.shape[0]):
        _grad(prob, th[k], 0)
        acc = {"data": torch.zeros_like(prob.data), "labels": None, "lrs": torch.zeros(1, dtype=DTYPE)}
        out = reverse_gd_step(prob, th[k], 0, lam[k], acc)
    return out


def batched_steps(engine, prob: InnerProblem, th: torch.Tensor, lam: torch.Tensor):
    x, y = prob.data[0], prob.labels[0]
    engine.loss_grad(th, x, y)
    return engine.loss_grad_hvp(th, x, y, lam, need_x=True, need_y=False)


_FLOPS = {}


def network_step_flops() -> int:
    """FLOPs of one reference network-step (counted once)."""
    if "step" not in _FLOPS:
        from torch.utils.flop_counter import FlopCounterMode
        _, th, prob, lam = step_problem(1)
        with FlopCounterMode(display=False) as fc:
            reference_steps(prob, th, lam)
        _FLOPS["step"] = int(fc.get_total_flops())
    return _FLOPS["step"]


# -- one meta-iteration ----------------------------------------------------------------------
def meta_problem(K: int):
    gen = torch.Generator().manual_seed(SEED)
    m = LeNet()
    data = torch.randn(S, N_IMAGES, *m.input_shape, generator=gen, dtype=DTYPE)
    labels = torch.arange(N_IMAGES).remainder(10).repeat(S, 1)
    real_x = torch.randn(REAL_BATCH, *m.input_shape, generator=gen, dtype=DTYPE)
    real_y = torch.randint(0, 10, (REAL_BATCH,), generator=gen)
    lrs = torch.full((S * E,), LR, dtype=DTYPE)
    return m, thetas(m, K), data, labels, lrs, make_batched_outer_loss(m, real_x, real_y)


def run_meta(impl: str, m, th0, data, labels, lrs, outer):
    if impl == "reference":
        return meta_gradient_batched_reference(m, th0, data, labels, lrs, outer, need_theta0=False)
    with _backend.use_backend("reference" if impl == "batched-torch" else "auto", op="lenet_step"):
        return meta_gradient_batched(m, th0, data, labels, lrs, outer, need_theta0=False)


# -- the suite -------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def _threads():
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


def _info(benchmark, **kw):
    if kw.get("impl", "").startswith("batched-") or kw.get("impl") == "batched":
        used = _backend.last_used("lenet_step")
        kw["lenet_step_backend"] = used.backend if used is not None and kw["impl"] != "batched-autograd" else None
    benchmark.extra_info.update({"dtype": str(DTYPE).replace("torch.", ""), "torch": torch.__version__,
                                 "threads": torch.get_num_threads(), "cpu": cpu_model(),
                                 "cores": os.cpu_count(), **kw})


STEP_CASES = [(K, impl) for K in STEP_K for impl in STEP_IMPLS]


@pytest.mark.parametrize("case,K,impl", [(f"step-K{K}", K, i) for K, i in STEP_CASES],
                         ids=[f"step-K{K}-{i}" for K, i in STEP_CASES])
def test_network_step(benchmark, case, K, impl):
    m, th, prob, lam = step_problem(K)
    if impl == "reference":
        fn, args = reference_steps, (prob, th, lam)
    elif impl == "batched-autograd":
        fn, args = batched_steps, (batched_engine(m, "autograd"), prob, th, lam)
    else:
        fn, args = batched_steps, (LeNetBatchedEngine(m, backend="reference" if impl == "batched-torch" else None),
                                   prob, th, lam)
    rounds = max(5, min(30, 240 // K))
    load0 = os.getloadavg()[0]
    benchmark.pedantic(fn, args=args, rounds=rounds, warmup_rounds=1, iterations=1)
    med = benchmark.stats.stats.median
    flops = network_step_flops()
    _info(benchmark, case=case, K=K, impl=impl, images_per_step=N_IMAGES,
          ms_per_network_step=med * 1e3 / K, flops_per_network_step=flops,
          gflops=flops * K / med / 1e9, loadavg_1m_before=load0, loadavg_1m_after=os.getloadavg()[0])


META_CASES = [(K, impl) for K in META_K for impl in META_IMPLS]


@pytest.mark.parametrize("case,K,impl", [(f"meta-K{K}", K, i) for K, i in META_CASES],
                         ids=[f"meta-K{K}-{i}" for K, i in META_CASES])
def test_meta_iteration(benchmark, case, K, impl):
    args = meta_problem(K)
    load0 = os.getloadavg()[0]
    out = benchmark.pedantic(run_meta, args=(impl,) + args, rounds=3, warmup_rounds=1, iterations=1)
    assert torch.isfinite(out.loss)
    med = benchmark.stats.stats.median
    _info(benchmark, case=case, K=K, impl=impl, T=S * E, S=S, E=E, images_per_step=N_IMAGES,
          real_batch=REAL_BATCH, ms_per_meta_iteration=med * 1e3, ms_per_network=med * 1e3 / K,
          loadavg_1m_before=load0, loadavg_1m_after=os.getloadavg()[0])


OUTER_CASES = [(K, impl) for K in OUTER_K for impl in OUTER_IMPLS]


@pytest.mark.parametrize("case,K,impl", [(f"outer-K{K}", K, i) for K, i in OUTER_CASES],
                         ids=[f"outer-K{K}-{i}" for K, i in OUTER_CASES])
def test_outer_loss(benchmark, case, K, impl):
    m, th, _, _, _, outer = meta_problem(K)
    loss = make_batched_outer_loss(m, outer.x, outer.y, mode=impl)
    eng = LeNetBatchedEngine(m)
    load0 = os.getloadavg()[0]
    L, _ = benchmark.pedantic(loss.loss_grad, args=(th, eng), rounds=5, warmup_rounds=1, iterations=1)
    assert torch.isfinite(L).all()
    med = benchmark.stats.stats.median
    _info(benchmark, case=case, K=K, impl=impl, real_batch=REAL_BATCH, ms_per_network=med * 1e3 / K,
          loadavg_1m_before=load0, loadavg_1m_after=os.getloadavg()[0])


# -- the table for RESULTS.md ----------------------------------------------------------------
def markdown_table(bench_json: str) -> str:
    benches = json.loads(Path(bench_json).read_text())["benchmarks"]
    rows = {(b["extra_info"]["case"], b["extra_info"]["impl"]): b for b in benches}
    timer = benches[0]["options"].get("timer", "?")
    out = [f"timer: `{timer}`, threads: {benches[0]['extra_info']['threads']}", "",
           "| K | implementation | ms / network-step (median; IQR of the K-step call, rounds) | "
           "GFLOP/s | speed-up vs reference | load 1 min |", "|---:|---|---:|---:|---:|---:|"]
    for K in sorted({b["extra_info"]["K"] for b in benches if b["extra_info"]["case"].startswith("step")}):
        ref = rows.get((f"step-K{K}", "reference"))
        for impl in STEP_IMPLS:
            b = rows.get((f"step-K{K}", impl))
            if b is None:
                continue
            e, s = b["extra_info"], b["stats"]
            up = "–" if ref is None else f"{ref['stats']['median'] / s['median']:.2f}×"
            out.append(f"| {K} | {impl} | {e['ms_per_network_step']:.2f} ({s['iqr'] * 1e3:.1f} ms, "
                       f"{s['rounds']}) | {e['gflops']:.1f} | {up} | {e['loadavg_1m_before']:.1f} |")
    out += ["", "| K | implementation | ms / meta-iteration (median; IQR, rounds) | ms / network | "
            "speed-up vs reference | load 1 min |", "|---:|---|---:|---:|---:|---:|"]
    for K in sorted({b["extra_info"]["K"] for b in benches if b["extra_info"]["case"].startswith("meta")}):
        ref = rows.get((f"meta-K{K}", "reference"))
        for impl in META_IMPLS:
            b = rows.get((f"meta-K{K}", impl))
            if b is None:
                continue
            e, s = b["extra_info"], b["stats"]
            up = "–" if ref is None else f"{ref['stats']['median'] / s['median']:.2f}×"
            out.append(f"| {K} | {impl} | {s['median'] * 1e3:,.0f} ({s['iqr'] * 1e3:,.0f}, {s['rounds']}) | "
                       f"{e['ms_per_network']:.0f} | {up} | {e['loadavg_1m_before']:.1f} |")
    outer = sorted({b["extra_info"]["K"] for b in benches if b["extra_info"]["case"].startswith("outer")})
    if outer:
        out += ["", "| K | outer loss | ms (median; IQR, rounds) | ms / network | speed-up vs per-network |",
                "|---:|---|---:|---:|---:|"]
    for K in outer:
        ref = rows.get((f"outer-K{K}", "per-network"))
        for impl in OUTER_IMPLS:
            b = rows.get((f"outer-K{K}", impl))
            if b is None:
                continue
            e, st = b["extra_info"], b["stats"]
            up = "–" if ref is None else f"{ref['stats']['median'] / st['median']:.2f}×"
            out.append(f"| {K} | {impl} | {st['median'] * 1e3:,.0f} ({st['iqr'] * 1e3:,.0f}, {st['rounds']}) | "
                       f"{e['ms_per_network']:.0f} | {up} |")
    return "\n".join(out)


def sgemm_rate(threads: int, n: int = 1024, calls: int = 20) -> float:
    """This machine's float32 matrix rate in GFLOP/s: the mean of ``calls`` ``n × n`` products on
    ``threads`` torch threads (after 3 warm-up calls); RESULTS.md quotes it to say how fast the
    day's VM was."""
    import time
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    for _ in range(3):
        a @ b
    t0 = time.perf_counter()
    for _ in range(calls):
        a @ b
    return 2 * n ** 3 * calls / (time.perf_counter() - t0) / 1e9


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--table":
        print(markdown_table(sys.argv[2]))
        sys.exit(0)
    if len(sys.argv) == 2 and sys.argv[1] == "--sgemm":
        for th in (1, 2):
            print(f"1024² sgemm, {th} thread(s): {sgemm_rate(th):.0f} GFLOP/s (mean of 20 calls)")
        sys.exit(0)
    print(__doc__)
    sys.exit(2)
