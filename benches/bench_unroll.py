"""Unroll benchmark: time per meta-iteration and memory of each back-gradient strategy.

Run (issue 2; the figures in ``benches/RESULTS.md`` come from this command)::

    nice -n 5 .venv/bin/python -m pytest benches/bench_unroll.py --benchmark-only \\
        --benchmark-group-by=param:T --benchmark-columns=median,iqr,rounds \\
        --benchmark-json=/tmp/unroll.json
    .venv/bin/python benches/bench_unroll.py --table /tmp/unroll.json   # markdown table

The problem (ALGORITHMS.md §4, plain GD): LeNet on MNIST shapes (1×28×28, 10 classes, P = 61,706,
float32), θ_0 xavier-normal from a seeded generator, **S = 1 distilled step of n = 10 images
replayed for E = T epochs** (``data[t % S]`` with S = 1), a constant η_t = 0.02, and DD's outer
loss on a real batch of 1024 random N(0, 1) images (already "normalised") with random labels.
One meta-iteration is one :func:`fastdistill.backgrad.meta_gradient` call returning ∂L/∂x̃ and
∂L/∂η (DD's Algorithm 1 learns x̃ and η, not θ_0, so ``need_theta0=False``).
Why S = 1: every inner step costs the same whatever S is (10 images each), and with S = 1 the
memory figures isolate the engine; with S = T the inputs x̃ and their gradient would add another
2 × 31 KB per step to *both* strategies.

Memory, two measures, both taken in a fresh child process per (strategy, T) after the timing
(reported in ``extra_info``; neither is the other):

* **graph bytes** -- the peak of the bytes autograd holds for backward, counted with
  ``torch.autograd.graph.saved_tensors_hooks`` (unique storages; the benchmark's own input
  tensors excluded). This is where ``autograd`` grows with T (every step's double-backward graph
  stays alive) and ``stored`` should not (one step's graph at a time). The stored θ_t are plain
  tensors, not saved-for-backward; they are the engine's ``stats["stored_bytes"]`` (T·P·4 bytes).
  ``graph_bytes_per_step`` = (peak at T − peak at T = 1) / (T − 1).
* **peak RSS** -- the peak resident set (``VmHWM``) of that child: it builds the problem, runs one warm-up
  meta-iteration at T = 1 (imports, oneDNN buffers, the outer-loss graph, which dominates small
  T), then one at T. ``rss_growth`` = peak after T − peak after the warm-up: what the T − 1 extra
  steps cost in real memory, allocator included. It resolves only what rises above the outer
  loss's own peak (~40 MB of graph on 1024 images), so read it at large T.

Timing: ``benchmark.pedantic``, setup outside the timed region, one warm-up round when there are
at least 3 rounds (the module fixture's T = 1, 2 runs warm the process before the first test).
The number of rounds shrinks with T (``ROUND_STEP_BUDGET`` inner steps per test, 1 to 10
rounds). Strategies of one T run back to back and share a group
(``--benchmark-group-by=param:T``): on a shared machine read the ratio, not the absolute figure.

Extending (issue 3): strategies are the names in ``VARIANTS`` that are also registered in
:data:`fastdistill.backgrad.STRATEGIES`; add a :class:`Variant` (e.g. ``reversible`` with
``momentum=True``, ``checkpointed`` with ``options={"schedule": "binomial"}``) and, so that huge
T can be skipped before it runs out of memory, a :data:`MEMORY_MODEL` entry. Environment knobs:

* ``FASTDISTILL_BENCH_STRATEGIES`` -- comma list of variant names (default
  ``autograd,stored,stored-autograd``: stored on LeNet's explicit engine and on per-step autograd);
* ``FASTDISTILL_BENCH_T`` -- comma list of T (default ``3,30,100,300``);
* ``FASTDISTILL_BENCH_MEM_CAP_MB`` -- skip a case whose predicted engine memory exceeds this
  (default 8192);
* ``FASTDISTILL_BENCH_STEP_BUDGET`` -- inner steps per test that set the rounds (default 200);
* ``FASTDISTILL_BENCH_THREADS`` -- ``torch.set_num_threads`` (default 2);
* ``FASTDISTILL_BENCH_MEMORY=0`` -- skip the memory child processes (timing only).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, Optional

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the child process and a bare `pytest` both need the package
    sys.path.insert(0, str(REPO))

from fastdistill._memory import SavedTensorMeter, cpu_model, peak_rss_bytes  # noqa: E402
from fastdistill.backgrad import STRATEGIES, make_outer_loss, meta_gradient  # noqa: E402
from fastdistill.models import LeNet  # noqa: E402

IMAGES_PER_STEP = 10
STEPS = 1  # S: distilled steps; the unroll replays them for E = T / S epochs
REAL_BATCH = 1024
LR = 0.02
BETA = 0.9  # momentum variants only
SEED = 0
DTYPE = torch.float32


def _env_list(name: str, default: str, cast: Callable = str) -> list:
    return [cast(v.strip()) for v in os.environ.get(name, default).split(",") if v.strip()]


T_VALUES = _env_list("FASTDISTILL_BENCH_T", "3,30,100,300", int)
THREADS = int(os.environ.get("FASTDISTILL_BENCH_THREADS", "2"))
MEM_CAP_BYTES = int(float(os.environ.get("FASTDISTILL_BENCH_MEM_CAP_MB", "8192")) * 2**20)
ROUND_STEP_BUDGET = int(os.environ.get("FASTDISTILL_BENCH_STEP_BUDGET", "200"))
MEASURE_MEMORY = os.environ.get("FASTDISTILL_BENCH_MEMORY", "1") != "0"


@dataclass(frozen=True)
class Variant:
    """One benchmarked configuration of the engine: a strategy name plus what it needs."""

    strategy: str
    momentum: bool = False  # SGD with momentum inner loop (betas = BETA) instead of plain GD
    options: Dict[str, object] = field(default_factory=dict)  # extra meta_gradient(**options)


#: every variant this file knows; which ones run is ``FASTDISTILL_BENCH_STRATEGIES``.
VARIANTS: Dict[str, Variant] = {
    "autograd": Variant("autograd"),
    "stored": Variant("stored"),  # LeNet: the explicit engine (stored's default)
    "stored-autograd": Variant("stored", options={"engine": "autograd"}),  # per-step double backward
}
SELECTED = _env_list("FASTDISTILL_BENCH_STRATEGIES", "autograd,stored,stored-autograd")

#: strategy -> predicted engine memory in bytes from (T, one step's graph bytes, one state's
#: bytes); a case predicted above MEM_CAP_BYTES is skipped before it runs. The one-step graph
#: is measured once per session (autograd at T = 2 minus T = 1, hooks on).
MEMORY_MODEL: Dict[str, Callable[[int, int, int], int]] = {
    "autograd": lambda T, step_graph, state: T * step_graph,
    "stored": lambda T, step_graph, state: T * state + step_graph,
}


def rounds_for(T: int) -> int:
    return max(1, min(10, ROUND_STEP_BUDGET // max(T, 1)))


# -- the problem ------------------------------------------------------------------------------
@dataclass
class Problem:
    model: LeNet
    theta0: torch.Tensor
    data: torch.Tensor
    labels: torch.Tensor
    lrs: torch.Tensor
    betas: Optional[torch.Tensor]
    real_x: torch.Tensor
    real_y: torch.Tensor
    outer_loss: Callable[[torch.Tensor], torch.Tensor]

    def inputs(self) -> Iterable[torch.Tensor]:
        """The tensors that exist before a meta-iteration (excluded from graph bytes)."""
        return [t for t in (self.theta0, self.data, self.labels, self.lrs, self.betas,
                            self.real_x, self.real_y) if t is not None]


def make_problem(T: int, momentum: bool = False, seed: int = SEED) -> Problem:
    """The benchmark's inner problem at unroll length T (same data and θ_0 for every T)."""
    gen = torch.Generator().manual_seed(seed)
    model = LeNet()
    theta0 = model.init("xavier", gen, dtype=DTYPE)
    data = torch.randn(STEPS, IMAGES_PER_STEP, *model.input_shape, generator=gen, dtype=DTYPE)
    labels = torch.arange(IMAGES_PER_STEP).remainder(10).repeat(STEPS, 1)
    real_x = torch.randn(REAL_BATCH, *model.input_shape, generator=gen, dtype=DTYPE)
    real_y = torch.randint(0, 10, (REAL_BATCH,), generator=gen)
    return Problem(model, theta0, data, labels, torch.full((T,), LR, dtype=DTYPE),
                   torch.full((T,), BETA, dtype=DTYPE) if momentum else None,
                   real_x, real_y, make_outer_loss(model, real_x, real_y))


def run_meta(p: Problem, variant: Variant):
    """One meta-iteration: L(θ_T) and ∂L/∂x̃, ∂L/∂η (what DD's outer step needs)."""
    return meta_gradient(p.model, p.theta0, p.data, p.labels, p.lrs, p.outer_loss,
                         betas=p.betas, strategy=variant.strategy, need_theta0=False,
                         **variant.options)


# -- memory -----------------------------------------------------------------------------------
def graph_bytes(p: Problem, variant: Variant):
    """(peak saved-for-backward bytes, MetaGradient) of one meta-iteration."""
    with SavedTensorMeter(exclude=p.inputs()) as meter:
        out = run_meta(p, variant)
    return meter.peak, out


def _maxrss_bytes() -> int:
    # VmHWM, not ru_maxrss: Linux carries the parent's ru_maxrss (this pytest process, ~1 GB
    # after autograd at T = 300) into the child across exec, which hid every child's own peak
    return peak_rss_bytes()


def child_memory(cfg: dict) -> dict:
    """In a fresh process: graph bytes and peak RSS of a T = 1 warm-up, then of the T run.

    Both runs have the saved-tensor hooks on; their handles add ~100 bytes per saved tensor to
    the RSS (well under 1 % of autograd's graph), a price paid to avoid a third T run.
    """
    torch.set_num_threads(cfg["threads"])
    variant = Variant(cfg["strategy"], cfg["momentum"], cfg["options"])
    warm, full = make_problem(1, variant.momentum), make_problem(cfg["T"], variant.momentum)
    rss_setup = _maxrss_bytes()
    g_warm, _ = graph_bytes(warm, variant)
    rss_warm = _maxrss_bytes()
    g_peak, out = graph_bytes(full, variant)
    rss_peak = _maxrss_bytes()
    return {"graph_peak_bytes_T1": g_warm, "graph_peak_bytes": g_peak,
            "stored_bytes": out.stats.get("stored_bytes"), "loss": float(out.loss),
            "rss_setup": rss_setup, "rss_warm": rss_warm, "rss_peak": rss_peak,
            "rss_growth": rss_peak - rss_warm}


def measure_memory(variant: Variant, T: int, timeout: float = 1800) -> dict:
    cfg = {"strategy": variant.strategy, "momentum": variant.momentum,
           "options": variant.options, "T": T, "threads": THREADS}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    res = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(cfg)],
                         capture_output=True, text=True, env=env, timeout=timeout, cwd=str(REPO))
    if res.returncode != 0:
        raise RuntimeError(f"memory child for {cfg} failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# -- the table for RESULTS.md -----------------------------------------------------------------
def markdown_table(bench_json: str) -> str:
    """Rows for RESULTS.md from a ``--benchmark-json`` file of this suite."""
    benches = json.loads(Path(bench_json).read_text())["benchmarks"]
    rows = {(b["params"]["T"], b["params"]["strategy"]): b for b in benches}
    MB, KB = 2**20, 2**10
    fmt = lambda v, d, nd=1: "–" if v is None else f"{v / d:,.{nd}f}"  # noqa: E731
    lines = ["| T | strategy | median ms / meta-iter (IQR, rounds) | ms / inner step | "
             "stored ÷ autograd | graph peak MB (hooks) | graph growth KB/step | "
             "stored θ_t MB | peak RSS MB | RSS growth vs T=1 MB (KB/step) |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (T, name), b in sorted(rows.items(), key=lambda kv: (kv[0][0], SELECTED.index(kv[0][1])
                                                             if kv[0][1] in SELECTED else 99)):
        e, s = b["extra_info"], b["stats"]
        ref = rows.get((T, "autograd"))
        ratio = "1" if name == "autograd" or ref is None else \
            f"{s['median'] / ref['stats']['median']:.2f}"
        rss_g = e.get("rss_growth")
        per = None if rss_g is None or T <= 1 else rss_g / (T - 1)
        lines.append(
            f"| {T} | {name} | {s['median'] * 1e3:,.0f} ({s['iqr'] * 1e3:,.0f}, {s['rounds']}) | "
            f"{s['median'] * 1e3 / T:,.1f} | {ratio} | {fmt(e['graph_peak_bytes'], MB)} | "
            f"{fmt(e.get('graph_bytes_per_step'), KB, 0)} | {fmt(e.get('stored_bytes'), MB)} | "
            f"{fmt(e.get('rss_peak'), MB, 0)} | {fmt(rss_g, MB)} ({fmt(per, KB, 0)}) |")
    return "\n".join(lines)


# -- the pytest-benchmark suite ---------------------------------------------------------------
CASES = [(T, name) for T in T_VALUES for name in SELECTED]


@pytest.fixture(scope="module", autouse=True)
def _threads():
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def step_graph_bytes() -> int:
    """One inner step's double-backward graph (autograd, hooks): peak at T = 2 minus T = 1."""
    (g1, _), (g2, _) = (graph_bytes(make_problem(T), VARIANTS["autograd"]) for T in (1, 2))
    return g2 - g1


@pytest.mark.parametrize("T,strategy", CASES, ids=[f"T{T}-{n}" for T, n in CASES])
def test_unroll(benchmark, T, strategy, step_graph_bytes):
    if strategy not in VARIANTS:
        pytest.skip(f"no Variant named {strategy!r} in bench_unroll.VARIANTS")
    variant = VARIANTS[strategy]
    if variant.strategy not in STRATEGIES:
        pytest.skip(f"strategy {variant.strategy!r} is not registered in fastdistill.backgrad")
    P = LeNet().num_params
    state = P * torch.tensor([], dtype=DTYPE).element_size() * (2 if variant.momentum else 1)
    predict = MEMORY_MODEL.get(variant.strategy)
    if predict is not None and predict(T, step_graph_bytes, state) > MEM_CAP_BYTES:
        pytest.skip(f"{strategy} at T={T} would hold ~{predict(T, step_graph_bytes, state) / 2**20:,.0f}"
                    f" MB (> FASTDISTILL_BENCH_MEM_CAP_MB={MEM_CAP_BYTES / 2**20:,.0f})")

    problem = make_problem(T, variant.momentum)
    rounds = rounds_for(T)
    load_before = os.getloadavg()
    result = benchmark.pedantic(run_meta, args=(problem, variant), rounds=rounds,
                                warmup_rounds=1 if rounds >= 3 else 0, iterations=1)
    load_after = os.getloadavg()
    assert torch.isfinite(result.loss), "the benchmark problem diverged"
    mem = measure_memory(variant, T) if MEASURE_MEMORY else {}

    median = benchmark.stats.stats.median if benchmark.stats is not None else None
    g_T, g_1 = mem.get("graph_peak_bytes"), mem.get("graph_peak_bytes_T1")
    benchmark.extra_info.update({
        "strategy": variant.strategy, "variant": strategy, "T": T, "S": STEPS, "E": T // STEPS,
        "images_per_step": IMAGES_PER_STEP, "real_batch": REAL_BATCH, "P": P,
        "dtype": str(DTYPE).replace("torch.", ""),
        "ms_per_meta_iteration": None if median is None else median * 1e3,
        "ms_per_inner_step": None if median is None else median * 1e3 / T,
        **mem,
        "graph_bytes_per_step": (g_T - g_1) / (T - 1) if g_T is not None and T > 1 else None,
        "one_step_graph_bytes_autograd": step_graph_bytes,
        "stored_bytes": result.stats.get("stored_bytes"),
        "state_bytes_per_step": state,
        "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": cpu_model(),
        "cores": os.cpu_count(), "loadavg_1m_before": load_before[0],
        "loadavg_1m_after": load_after[0],
    })


def main(argv) -> int:
    if len(argv) == 2 and argv[0] == "--child":
        print(json.dumps(child_memory(json.loads(argv[1]))))
        return 0
    if len(argv) == 2 and argv[0] == "--table":
        print(markdown_table(argv[1]))
        return 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
