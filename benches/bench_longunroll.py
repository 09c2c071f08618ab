"""Long-unroll benchmark (issue 3): every back-gradient strategy at T ∈ {10, 100, 1000, 10000}.

Two ways to run it::

    # the table in benches/RESULTS.md: one fresh child process per (variant, T), run one after
    # the other; time and peak memory side by side, info-buffer bytes in their own column
    nice -n 10 .venv/bin/python benches/bench_longunroll.py --run 10,100,1000,10000 \\
        --json /tmp/longunroll.json
    .venv/bin/python benches/bench_longunroll.py --table /tmp/longunroll.json

    # pytest-benchmark timing in-process (T from FASTDISTILL_BENCH_T, default 10,100)
    nice -n 10 .venv/bin/python -m pytest benches/bench_longunroll.py --benchmark-only \\
        --benchmark-group-by=param:T --benchmark-columns=median,iqr,rounds

The problem is the one of ``bench_unroll.py`` (issue 2), so the figures line up: LeNet on MNIST
shapes (P = 61,706, float32), θ_0 xavier-normal (seed 0), **S = 1 distilled step of 10 images
replayed for T epochs**, constant η_t = α_t = 0.02, β_t = 0.9 for the momentum variants, DD's
outer loss on a real batch of 1024 random images. One meta-iteration = one ``meta_gradient``
call returning ∂L/∂x̃ and ∂L/∂η (and ∂L/∂β), ``need_theta0=False``.

Variants (``VARIANTS``): ``autograd``, ``stored``, ``checkpointed`` with the uniform (√T) and the
binomial schedule at its default ⌈log2 T⌉ + 1 snapshots and at ⌈√T⌉ snapshots (plain GD); and
``stored`` and ``reversible`` for SGD with momentum. A case whose predicted engine memory
(``MEMORY_MODEL``) exceeds ``FASTDISTILL_BENCH_MEM_CAP_MB`` (default 6144) is skipped with the
prediction printed, never run into the ground.

What a child measures (fresh process, ``FASTDISTILL_BENCH_THREADS`` threads, default 1 on the
shared 2-core machines): it builds the problem, runs the same variant once at T = 1 (imports,
oneDNN buffers, the outer loss's ~40 MB graph), records its peak RSS (``VmHWM``), then runs the T case
(median of ``rounds`` runs: 3 up to T = 100, else 1) and records:

* ``ms_inner`` -- wall milliseconds per inner step (the meta-iteration's time / T), and
  ``cpu_ms_inner`` -- the same in process CPU time, which the other users' load inflates less;
* ``rss_peak`` -- peak resident set of the child (absolute; includes the ~0.3 GB PyTorch runtime);
  ``rss_growth`` -- what the T run added over the T = 1 run's peak;
* ``engine_bytes`` -- what the strategy keeps for its reverse pass (``stats["stored_bytes"]``:
  θ_t states for stored/checkpointed, the int64 Θ and V for reversible) *without* the
  information buffer, which is ``info_bytes`` (``stats["info_buffer_bytes"]``), reported apart.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Dict, Optional

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from fastdistill._memory import cpu_model, peak_rss_bytes  # noqa: E402
from fastdistill.backgrad import STRATEGIES, make_outer_loss, meta_gradient  # noqa: E402
from fastdistill.backgrad.auto import step_graph_bytes  # noqa: E402
from fastdistill.backgrad.common import InnerProblem  # noqa: E402
from fastdistill.models import LeNet  # noqa: E402

IMAGES_PER_STEP, STEPS, REAL_BATCH, LR, BETA, SEED = 10, 1, 1024, 0.02, 0.9, 0
DTYPE = torch.float32
THREADS = int(os.environ.get("FASTDISTILL_BENCH_THREADS", "1"))
MEM_CAP_BYTES = int(float(os.environ.get("FASTDISTILL_BENCH_MEM_CAP_MB", "6144")) * 2**20)


@dataclass(frozen=True)
class Variant:
    strategy: str
    momentum: bool = False
    options: Callable[[int], dict] = field(default=lambda T: {})  # meta_gradient options at T


VARIANTS: Dict[str, Variant] = {
    "autograd": Variant("autograd"),
    "stored": Variant("stored"),
    "ckpt-uniform": Variant("checkpointed", options=lambda T: {"schedule": "uniform"}),
    "ckpt-binomial-log": Variant("checkpointed", options=lambda T: {"schedule": "binomial"}),
    "ckpt-binomial-sqrt": Variant("checkpointed", options=lambda T: {
        "schedule": "binomial", "max_states": max(1, math.isqrt(T - 1) + 1 if T > 1 else 1)}),
    "stored-sgdm": Variant("stored", momentum=True),
    "reversible": Variant("reversible", momentum=True),
}

#: variant -> predicted engine bytes from (T, one step's graph bytes, one state's bytes)
MEMORY_MODEL: Dict[str, Callable[[int, int, int], int]] = {
    "autograd": lambda T, G, state: T * (G + state),
    "stored": lambda T, G, state: T * state + 2 * G,
    "stored-sgdm": lambda T, G, state: T * state + 2 * G,
}


def make_problem(T: int, momentum: bool):
    gen = torch.Generator().manual_seed(SEED)
    model = LeNet()
    theta0 = model.init("xavier", gen, dtype=DTYPE)
    data = torch.randn(STEPS, IMAGES_PER_STEP, *model.input_shape, generator=gen, dtype=DTYPE)
    labels = torch.arange(IMAGES_PER_STEP).remainder(10).repeat(STEPS, 1)
    real_x = torch.randn(REAL_BATCH, *model.input_shape, generator=gen, dtype=DTYPE)
    real_y = torch.randint(0, 10, (REAL_BATCH,), generator=gen)
    lrs = torch.full((T,), LR, dtype=DTYPE)
    betas = torch.full((T,), BETA, dtype=DTYPE) if momentum else None
    return model, theta0, data, labels, lrs, betas, make_outer_loss(model, real_x, real_y)


def run_meta(problem, variant: Variant, T: int):
    model, theta0, data, labels, lrs, betas, outer = problem
    return meta_gradient(model, theta0, data, labels, lrs, outer, betas=betas,
                         strategy=variant.strategy, need_theta0=False, **variant.options(T))


def skip_reason(name: str, T: int) -> Optional[str]:
    predict = MEMORY_MODEL.get(name)
    if predict is None:
        return None
    model, theta0, data, labels, lrs, betas, _ = make_problem(1, VARIANTS[name].momentum)
    G = step_graph_bytes(InnerProblem(model, data, labels, lrs, betas), theta0)
    state = theta0.numel() * theta0.element_size() * (2 if VARIANTS[name].momentum else 1)
    need = predict(T, G, state)
    if need > MEM_CAP_BYTES:
        return (f"predicted {need / 2**20:,.0f} MB > cap {MEM_CAP_BYTES / 2**20:,.0f} MB "
                f"(one step's graph {G / 2**20:.2f} MB, one state {state / 2**10:.0f} KB)")
    return None


def _maxrss() -> int:
    # VmHWM, not ru_maxrss: Linux carries the parent's ru_maxrss into this child across exec
    return peak_rss_bytes()


def child(cfg: dict) -> dict:
    torch.set_num_threads(cfg["threads"])
    name, T = cfg["variant"], cfg["T"]
    variant = VARIANTS[name]
    run_meta(make_problem(1, variant.momentum), variant, 1)
    rss_warm = _maxrss()
    problem = make_problem(T, variant.momentum)
    rounds = 3 if T <= 100 else 1
    walls, cpus = [], []
    for _ in range(rounds):
        w, c = time.perf_counter(), time.process_time()
        out = run_meta(problem, variant, T)
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    if not torch.isfinite(out.loss):
        raise FloatingPointError(f"{name} at T={T} diverged")
    st = out.stats
    info = st.get("info_buffer_bytes")
    return {
        "variant": name, "strategy": variant.strategy, "T": T, "rounds": rounds,
        "ms_inner": statistics.median(walls) * 1e3 / T, "cpu_ms_inner": statistics.median(cpus) * 1e3 / T,
        "rss_warm": rss_warm, "rss_peak": _maxrss(), "rss_growth": _maxrss() - rss_warm,
        "engine_bytes": None if st.get("stored_bytes") is None else st["stored_bytes"] - (info or 0),
        "info_bytes": info, "info_bits_per_param_step": st.get("info_bits_per_param_step"),
        "extra_forward_steps": st.get("extra_forward_steps"), "max_states": st.get("max_states"),
        "loss": float(out.loss), "loadavg": os.getloadavg()[0],
    }


def run_child(name: str, T: int, timeout: float = 3 * 3600) -> dict:
    cfg = {"variant": name, "T": T, "threads": THREADS}
    env = dict(os.environ, PYTHONPATH=str(REPO))
    res = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(cfg)],
                         capture_output=True, text=True, env=env, timeout=timeout, cwd=str(REPO))
    if res.returncode != 0:
        raise RuntimeError(f"child {cfg} failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def run_all(Ts, names, out_json: str) -> None:
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="minutes"), "cpu": cpu_model(),
            "cores": os.cpu_count(), "torch": torch.__version__, "threads": THREADS,
            "command": " ".join(sys.argv)}
    rows = []
    for T in Ts:
        for name in names:
            reason = skip_reason(name, T)
            row = {"variant": name, "T": T, "skipped": reason} if reason else run_child(name, T)
            rows.append(row)
            print(json.dumps(row), flush=True)
            Path(out_json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


def markdown_table(path: str) -> str:
    doc = json.loads(Path(path).read_text())
    MB = 2**20
    f = lambda v, d=MB, nd=1: "–" if v is None else f"{v / d:,.{nd}f}"  # noqa: E731
    lines = ["| T | variant | ms / inner step (wall) | CPU ms / inner step | × stored (CPU) | "
             "peak RSS MB | RSS growth MB | engine MB (no buffer) | info buffer MB (bits/param/step) "
             "| extra fwd steps |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    rows = doc["rows"]
    ref = {(r["T"], r["variant"]): r for r in rows}
    for r in rows:
        T, name = r["T"], r["variant"]
        if r.get("skipped"):
            lines.append(f"| {T} | {name} | skipped: {r['skipped']} | | | | | | | |")
            continue
        base = ref.get((T, "stored-sgdm" if VARIANTS[name].momentum else "stored"))
        ratio = "–" if not base or base.get("skipped") else f"{r['cpu_ms_inner'] / base['cpu_ms_inner']:.2f}"
        info = "–" if r["info_bytes"] is None else \
            f"{r['info_bytes'] / MB:,.2f} ({r['info_bits_per_param_step']:.3f})"
        lines.append(f"| {T} | {name} | {r['ms_inner']:,.1f} | {r['cpu_ms_inner']:,.1f} | {ratio} | "
                     f"{f(r['rss_peak'], MB, 0)} | {f(r['rss_growth'])} | {f(r['engine_bytes'])} | "
                     f"{info} | {r['extra_forward_steps'] if r['extra_forward_steps'] is not None else '–'} |")
    return "\n".join(lines)


# -- pytest-benchmark: in-process timing --------------------------------------------------------
T_VALUES = [int(v) for v in os.environ.get("FASTDISTILL_BENCH_T", "10,100").split(",") if v.strip()]
CASES = [(T, n) for T in T_VALUES for n in VARIANTS]


@pytest.fixture(scope="module", autouse=True)
def _threads():
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("T,variant", CASES, ids=[f"T{T}-{n}" for T, n in CASES])
def test_longunroll(benchmark, T, variant):
    v = VARIANTS[variant]
    if v.strategy not in STRATEGIES:
        pytest.skip(f"strategy {v.strategy!r} is not registered")
    reason = skip_reason(variant, T)
    if reason:
        pytest.skip(reason)
    problem = make_problem(T, v.momentum)
    rounds = max(1, min(5, 200 // T))
    out = benchmark.pedantic(run_meta, args=(problem, v, T), rounds=rounds, iterations=1,
                             warmup_rounds=1 if rounds >= 3 else 0)
    assert torch.isfinite(out.loss)
    median = benchmark.stats.stats.median
    benchmark.extra_info.update({
        "variant": variant, "strategy": v.strategy, "T": T, "ms_per_inner_step": median * 1e3 / T,
        "stored_bytes": out.stats.get("stored_bytes"), "info_buffer_bytes": out.stats.get("info_buffer_bytes"),
        "extra_forward_steps": out.stats.get("extra_forward_steps"), "threads": THREADS,
        "cpu": cpu_model(), "torch": torch.__version__, "dtype": "float32"})


def main(argv) -> int:
    if len(argv) == 2 and argv[0] == "--child":
        print(json.dumps(child(json.loads(argv[1]))))
        return 0
    if len(argv) >= 2 and argv[0] == "--run":
        Ts = [int(v) for v in argv[1].split(",")]
        out = argv[argv.index("--json") + 1] if "--json" in argv else "/tmp/longunroll.json"
        names = argv[argv.index("--variants") + 1].split(",") if "--variants" in argv else list(VARIANTS)
        run_all(Ts, names, out)
        print(markdown_table(out))
        return 0
    if len(argv) == 2 and argv[0] == "--table":
        print(markdown_table(argv[1]))
        return 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
