"""K networks' inner steps on a GPU (issue 5): the per-network eager loop, ``torch.func.vmap`` and
the batched engine, side by side in one run. Skipped where CUDA is unavailable.

Run on the lent GPU (``scripts/gpu_check.sh`` runs this after the cuda-marked tests)::

    .venv/bin/python -m pytest benches/bench_gpu.py --benchmark-only \\
        --benchmark-group-by=param:case --benchmark-columns=median,iqr,rounds \\
        --benchmark-json=$OUT/gpu.json
    .venv/bin/python benches/bench_gpu.py --table $OUT/gpu.json     # markdown for RESULTS.md

One **network-step** is the same work as in ``bench_batched.py``: the forward step
(``g = ∇_θ ℓ``) and the reverse step (``g``, the HVP ``H λ`` and ``∇_x̃ (λ·g)``) of plain GD, LeNet,
n = 10 MNIST-shaped images, float32, for each of K networks with their own θ and λ. Implementations:

* ``reference``: K × (``stored``'s ``_grad`` + the double backward of ``reverse_gd_step``), one
  network after another (the eager loop everyone ships);
* ``vmap``: one ``torch.func.vmap`` over the K networks of ``grad`` and ``grad`` of ``λ·grad``
  (the HVP and the mixed term in one reverse-over-reverse pass);
* ``batched``: LeNet's explicit batched engine (``LeNetBatchedEngine``; on CUDA its layer ops, the
  fully connected layers and the loss head included, run on the registry's auto choice, Triton
  first), batched GEMMs over K for the convolutions;
* ``batched-cuda``: the same with the layer ops forced to the hand-written CUDA backend
  (``use_backend("cuda", op)`` for each op in ``LAYER_OPS`` and ``CUDA_ONLY_OPS``; ``cpp`` for
  ``LAYER_OPS`` on the CPU), which is how
  auto's choice between Triton and CUDA is checked.

Before timing, every implementation's ``(g, H λ, ∇_x̃)`` is compared with the reference's at
float32 tolerance (an implementation that disagrees fails instead of being timed). Reported per
network-step, with network-steps per second and TFLOP/s over the reference's FLOPs
(``FlopCounterMode``), against the card's float32 (non-tensor-core) datasheet peak where the
card is in ``PEAK_FP32`` (TF32 is off: ``torch.backends.cuda.matmul.allow_tf32`` and
``torch.backends.cudnn.allow_tf32``, which defaults to True, are set False for the module).

Knobs: ``FASTDISTILL_BENCH_K`` (default ``1,4,16,64,256``), ``FASTDISTILL_BENCH_IMPLS`` (default
all four), ``FASTDISTILL_BENCH_DEVICE`` (default ``cuda``; ``cpu`` runs the same suite on the CPU,
which is how it is smoke-tested without a GPU), ``FASTDISTILL_BENCH_THREADS`` (CPU threads; default
torch's).
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from fastdistill import _backend  # noqa: E402
from fastdistill.backgrad.common import InnerProblem  # noqa: E402
from fastdistill.backgrad.stored import _grad, _grad_hvp  # noqa: E402
from fastdistill.models import LeNet  # noqa: E402
from fastdistill.models.batched import LeNetBatchedEngine  # noqa: E402

DEVICE = torch.device(os.environ.get("FASTDISTILL_BENCH_DEVICE", "cuda"))
STEP_K = [int(k) for k in os.environ.get("FASTDISTILL_BENCH_K", "1,4,16,64,256").split(",") if k.strip()]
IMPLS = tuple(i for i in os.environ.get("FASTDISTILL_BENCH_IMPLS",
                                        "reference,vmap,batched,batched-cuda").split(",") if i.strip())
N_IMAGES, LR, SEED = 10, 0.02, 0
#: the engine's layer ops with a CUDA (and C++) backend; lenet_step has none on CUDA
LAYER_OPS = ("im2col5", "col2im5", "pool2_relu", "pool2_relu_tangent", "pool2_relu_backward")
#: the engine's layer ops with a CUDA backend but no C++ one (on CPU they run torch's GEMMs)
CUDA_ONLY_OPS = ("linear_relu_tangent", "ce_head")
DTYPE = torch.float32
#: float32 peak without tensor cores, TFLOP/s (vendor datasheets, SXM parts)
PEAK_FP32 = {"H100": 67.0, "H200": 67.0, "A100": 19.5, "L40S": 91.6, "V100": 15.7}

if DEVICE.type == "cuda" and not torch.cuda.is_available() and __name__ != "__main__":
    pytest.skip("no CUDA device (bench_gpu.py needs a GPU, or FASTDISTILL_BENCH_DEVICE=cpu)",
                allow_module_level=True)


@pytest.fixture(scope="module", autouse=True)
def _threads_and_precision():
    before = torch.get_num_threads(), torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.set_num_threads(int(os.environ.get("FASTDISTILL_BENCH_THREADS", str(before[0]))))
    # full float32 everywhere: cuDNN convolutions default to TF32 (10-bit mantissa), matmuls not
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.set_num_threads(before[0])
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before[1:]


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def device_name() -> str:
    return torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else "cpu"


def peak_tflops():
    name = device_name()
    return next((v for k, v in PEAK_FP32.items() if k in name), None)


def problem(K: int):
    gen = torch.Generator().manual_seed(SEED)
    m = LeNet()
    x = torch.randn(1, N_IMAGES, *m.input_shape, generator=gen, dtype=DTYPE)
    y = torch.arange(N_IMAGES).remainder(10).view(1, -1)
    th = torch.stack([m.init("xavier", torch.Generator().manual_seed(SEED + 1 + k), dtype=DTYPE)
                      for k in range(K)])
    lam = 1e-2 * torch.randn(K, m.num_params, generator=gen, dtype=DTYPE)
    prob = InnerProblem(m, x.to(DEVICE), y.to(DEVICE), torch.full((1,), LR, dtype=DTYPE, device=DEVICE))
    return m, th.to(DEVICE), prob, lam.to(DEVICE)


# -- the implementations: each returns (g [K, P], H λ [K, P], ∇_x̃ Σ_k λ_k·g_k [n, C, H, W]) ------
def reference_steps(m, prob, th, lam):
    gs, hvs, dx = [], [], torch.zeros_like(prob.data[0])
    acc = {"data": prob.data, "labels": None}  # asks _grad_hvp for the mixed x̃ term
    for k in range(th.shape[0]):
        gs.append(_grad(prob, th[k], 0))
        # reverse_gd_step's work: g, H λ and ∇_x̃ (λ·g) by per-step double backward
        _, hv, gx, _ = _grad_hvp(prob, th[k], 0, lam[k], acc, True, None)
        hvs.append(hv)
        dx += gx
    _sync()
    return torch.stack(gs), torch.stack(hvs), dx


def make_vmap(m, prob):
    x, y = prob.data[0], prob.labels[0]

    def loss(th, xx):
        return F.cross_entropy(m.apply(th, xx), y)

    def lam_dot_g(th, xx, lam):
        return torch.dot(lam, torch.func.grad(loss)(th, xx))

    def one(th, lam):
        g = torch.func.grad(loss)(th, x)
        hv, gx = torch.func.grad(lam_dot_g, argnums=(0, 1))(th, x, lam)
        return g, hv, gx

    batched = torch.func.vmap(one)

    def run(th, lam):
        g, hv, gx = batched(th, lam)
        out = (g, hv, gx.sum(0))
        _sync()
        return out
    return run


def make_batched(m, prob, ops_backend=None):
    eng = LeNetBatchedEngine(m)
    x, y = prob.data[0], prob.labels[0]

    def run(th, lam):
        def go():
            _, g = eng.loss_grad(th, x, y)
            _, hv, gx, _ = eng.loss_grad_hvp(th, x, y, lam, need_x=True, need_y=False)
            return g, hv, gx
        with contextlib.ExitStack() as stack:
            forced = () if ops_backend is None else \
                LAYER_OPS + (CUDA_ONLY_OPS if ops_backend == "cuda" else ())
            for op in forced:
                stack.enter_context(_backend.use_backend(ops_backend, op))
            out = go()
        _sync()
        return out
    return run


def implementation(impl: str, m, prob):
    if impl == "reference":
        return lambda th, lam: reference_steps(m, prob, th, lam)
    if impl == "vmap":
        return make_vmap(m, prob)
    if impl == "batched":
        return make_batched(m, prob)
    if impl == "batched-cuda":
        return make_batched(m, prob, "cuda" if DEVICE.type == "cuda" else "cpp")
    raise ValueError(f"unknown implementation {impl!r}")


_FLOPS = {}


def network_step_flops() -> int:
    if "step" not in _FLOPS:
        from torch.utils.flop_counter import FlopCounterMode
        m, th, prob, lam = problem(1)
        with FlopCounterMode(display=False) as fc:
            reference_steps(m, prob, th, lam)
        _FLOPS["step"] = int(fc.get_total_flops())
    return _FLOPS["step"]


def _close(a, b, what):
    err = float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
    assert err < 1e-4, f"{what}: relative error {err:.2e} against the reference"


CASES = [(K, impl) for K in STEP_K for impl in IMPLS]


@pytest.mark.parametrize("case,K,impl", [(f"step-K{K}", K, i) for K, i in CASES],
                         ids=[f"step-K{K}-{i}" for K, i in CASES])
def test_network_step(benchmark, case, K, impl):
    _backend.reset_usage()
    m, th, prob, lam = problem(K)
    fn = implementation(impl, m, prob)
    if impl != "reference":  # agree first, then time
        ref = reference_steps(m, prob, th, lam)
        for what, a, b in zip(("g", "H λ", "∇_x̃"), fn(th, lam), ref):
            _close(a, b, f"{impl} {what}")
    rounds = max(5, min(50, 400 // K))
    benchmark.pedantic(fn, args=(th, lam), rounds=rounds, warmup_rounds=2, iterations=1)
    med = benchmark.stats.stats.median
    flops = network_step_flops()
    tflops = flops * K / med / 1e12
    peak = peak_tflops()
    benchmark.extra_info.update({
        "case": case, "K": K, "impl": impl, "device": device_name(), "torch": torch.__version__,
        "dtype": "float32", "images_per_step": N_IMAGES, "ms_per_network_step": med * 1e3 / K,
        "network_steps_per_s": K / med, "flops_per_network_step": flops, "tflops": tflops,
        "peak_fp32_tflops": peak, "fraction_of_peak": None if peak is None else tflops / peak,
        "layer_backends": {op: (c.backend if c is not None else None) for op in
                           ("pool2_relu", "im2col5", "lenet_step") for c in [_backend.last_used(op)]},
    })


# -- the table for RESULTS.md ----------------------------------------------------------------
def markdown_table(bench_json: str) -> str:
    benches = json.loads(Path(bench_json).read_text())["benchmarks"]
    rows = {(b["extra_info"]["K"], b["extra_info"]["impl"]): b for b in benches}
    dev = benches[0]["extra_info"]["device"]
    out = [f"device: {dev}", "",
           "| K | implementation | ms / network-step (median; rounds) | network-steps / s | TFLOP/s "
           "(% of FP32 peak) | vs reference | vs vmap | layer backends |",
           "|---:|---|---:|---:|---:|---:|---:|---|"]
    for K in sorted({k for k, _ in rows}):
        ref, vm = rows.get((K, "reference")), rows.get((K, "vmap"))
        for impl in IMPLS:
            b = rows.get((K, impl))
            if b is None:
                continue
            e, s = b["extra_info"], b["stats"]
            frac = "" if e["fraction_of_peak"] is None else f" ({100 * e['fraction_of_peak']:.1f} %)"
            up = "–" if ref is None else f"{ref['stats']['median'] / s['median']:.1f}×"
            upv = "–" if vm is None else f"{vm['stats']['median'] / s['median']:.1f}×"
            be = ", ".join(f"{k}={v}" for k, v in e["layer_backends"].items() if v) or "–"
            out.append(f"| {K} | {impl} | {e['ms_per_network_step']:.3f} ({s['rounds']}) | "
                       f"{e['network_steps_per_s']:,.0f} | {e['tflops']:.3f}{frac} | {up} | {upv} | {be} |")
    return "\n".join(out)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--table":
        print(markdown_table(sys.argv[2]))
    else:
        sys.exit(f"usage: {sys.argv[0]} --table BENCH.json")
