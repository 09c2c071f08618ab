"""fixedpoint_mul / fixedpoint_unmul: the exact information-buffer step of ``reversible``.

The reference is checked against Python's unbounded integers; every backend is checked against
the reference bitwise on random int64 inputs (the full int64 range, ±2^61 states, words at and
past the spill threshold), unmul∘mul is the identity bit for bit, runs are deterministic, writes
stay inside their slices, and bad arguments raise clear errors.
"""
import doctest
import importlib

import pytest
import torch

from fastdistill import _backend
from fastdistill.backgrad.fixedpoint import STATE_LIMIT, InfoBuffer
from fastdistill.errors import BackendUnavailableError, ConfigError, ShapeError
from fastdistill.ops.fixedpoint_mul import (MAX_DENOMINATOR, fixedpoint_mul, fixedpoint_mul_reference,
                                            fixedpoint_unmul, fixedpoint_unmul_reference,
                                            spill_threshold)

CPP = _backend.has_kernel("fastdistill::fixedpoint_mul", "CPU")
TRITON = _backend._triton_module()[0] is not None
I64_MIN, I64_MAX = -(1 << 63), (1 << 63) - 1
FLOOR = 89  # the floor F of β = 9/10

needs_cpp = pytest.mark.skipif(not CPP, reason="fastdistill._C not built (or without fixedpoint_mul)")
needs_triton = pytest.mark.skipif(not TRITON, reason="triton not installed")
CPU_BACKENDS = ["reference", pytest.param("cpp", marks=needs_cpp),
                pytest.param("triton", marks=needs_triton)]
# β = n/d: momentum 0.9, the smallest numerator, the extremes of the denominator range
PAIRS = [(9, 10), (1, 2), (65535, 65536), (3, 7), (1, MAX_DENOMINATOR),
         (MAX_DENOMINATOR - 1, MAX_DENOMINATOR)]
# one, a prime, LeNet's parameter count; the Triton interpreter is slow: a prime past one block
SIZES = {"reference": [1, 13, 61706], "cpp": [1, 13, 61706], "triton": [1, 13, 4099]}


@pytest.fixture(autouse=True)
def _no_forced_backend(monkeypatch):
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)


def _randint(lo, hi, size, gen):
    return torch.randint(lo, hi, (size,), generator=gen, dtype=torch.int64)


def _inputs(P, n, d, seed=0):
    """States X and live words c mixing every regime: full int64 range, |X| < 2^61 (the range
    of the reversible strategy, both signs), words in [F, S) and ≥ S, and the edge values."""
    gen = torch.Generator().manual_seed(seed)
    S = spill_threshold(n, d)
    X = torch.cat([_randint(I64_MIN, I64_MAX, P, gen), _randint(-STATE_LIMIT + 1, STATE_LIMIT, P, gen),
                   _randint(-(1 << 20), 1 << 20, P, gen)])
    c = torch.cat([_randint(I64_MIN, I64_MAX, P, gen), _randint(FLOOR, S, P, gen),
                   _randint(S - 50, I64_MAX, P, gen)])
    pick = torch.randperm(3 * P, generator=gen)[:P]
    X, c = X[pick].contiguous(), c[pick].contiguous()
    edges_x = [I64_MIN, I64_MAX, -1, 0, 1, STATE_LIMIT - 1, -STATE_LIMIT + 1, -d, d * 7 + 3]
    edges_c = [I64_MIN, I64_MAX, 0, 1, FLOOR, S - 1, S, S + 1, -1]
    k = min(P, len(edges_x))
    X[:k], c[:k] = torch.tensor(edges_x[:k]), torch.tensor(edges_c[:k])
    return X, c


def _wrap(v):
    return (v + (1 << 63)) % (1 << 64) - (1 << 63)


def _exact_mul(x, c, n, d, floor, threshold):
    c = floor if c >= threshold else c
    q, e = divmod(c, n)          # Python's divmod is floor division on unbounded integers
    X, r = divmod(x * n + e, d)
    return _wrap(X), _wrap(q * d + r)


def _exact_unmul(x, c, n, d):
    q, r = divmod(c, d)
    X, e = divmod(x * d + r, n)
    return _wrap(X), _wrap(q * n + e)


def _equal(got, want):
    return all(torch.equal(g, w) for g, w in zip(got, want))


# ------------------------------------------------------------------------- the specification
@pytest.mark.parametrize("n,d", PAIRS)
def test_reference_is_exact_integer_arithmetic(n, d):
    """The limb/float64 reference equals unbounded-integer floor arithmetic mod 2^64."""
    X, c = _inputs(400, n, d, seed=n)
    S = spill_threshold(n, d)
    Xm, cm = fixedpoint_mul_reference(X, c, n, d, FLOOR, S)
    Xu, cu = fixedpoint_unmul_reference(X, c, n, d)
    for i, (x, w) in enumerate(zip(X.tolist(), c.tolist())):
        assert (Xm[i].item(), cm[i].item()) == _exact_mul(x, w, n, d, FLOOR, S), (x, w)
        assert (Xu[i].item(), cu[i].item()) == _exact_unmul(x, w, n, d), (x, w)


def test_below_the_spill_threshold_no_word_overflows():
    for n, d in PAIRS:
        S = spill_threshold(n, d)
        assert (S - 1) // n * d + d - 1 <= I64_MAX   # the largest new word from c < S fits
        assert (S + n) // n * d + d - 1 > I64_MAX    # n words further one may not: S is tight


# ------------------------------------------------------------------- every backend, bitwise
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("n,d", PAIRS)
def test_matches_reference_bitwise(backend, n, d):
    for P in SIZES[backend]:
        X, c = _inputs(P, n, d, seed=P + d)
        want = fixedpoint_mul_reference(X, c, n, d, FLOOR, spill_threshold(n, d))
        got = fixedpoint_mul(X, c, n, d, floor=FLOOR, backend=backend)
        assert _backend.last_used("fixedpoint_mul").backend == backend
        assert all(t.dtype == torch.int64 and t.shape == X.shape for t in got)
        assert _equal(got, want), (P, [(g != w).sum().item() for g, w in zip(got, want)])
        want = fixedpoint_unmul_reference(X, c, n, d)
        got = fixedpoint_unmul(X, c, n, d, backend=backend)
        assert _backend.last_used("fixedpoint_unmul").backend == backend
        assert _equal(got, want), (P, [(g != w).sum().item() for g, w in zip(got, want)])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_custom_threshold_and_floor(backend):
    n, d = 9, 10
    X, c = _inputs(997, n, d, seed=3)
    for floor, threshold in [(1, 2), (1000, 1 << 40), (FLOOR, I64_MAX)]:
        want = fixedpoint_mul_reference(X, c, n, d, floor, threshold)
        got = fixedpoint_mul(X, c, n, d, floor=floor, threshold=threshold, backend=backend)
        assert _equal(got, want)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("n,d", PAIRS)
def test_unmul_inverts_mul_bitwise(backend, n, d):
    """For any int64 X and any word below S, unmul(mul(X, c)) = (X, c); words ≥ S come back as F."""
    P = 2053
    gen = torch.Generator().manual_seed(d)
    S = spill_threshold(n, d)
    X, _ = _inputs(P, n, d, seed=d)
    c = torch.cat([_randint(0, FLOOR, 16, gen), _randint(FLOOR, S, P - 32, gen),
                   torch.full((8,), S - 1), _randint(S, I64_MAX, 8, gen)])
    Xm, cm = fixedpoint_mul(X, c, n, d, floor=FLOOR, backend=backend)
    Xu, cu = fixedpoint_unmul(Xm, cm, n, d, backend=backend)
    assert torch.equal(Xu, X)
    assert torch.equal(cu, torch.where(c >= S, FLOOR, c))
    grows = c[: P - 8] >= FLOOR
    assert bool((cm[: P - 8][grows] > c[: P - 8][grows]).all())   # the live word strictly grows


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_deterministic(backend):
    X, c = _inputs(3001, 65535, 65536, seed=5)
    first = fixedpoint_mul(X, c, 65535, 65536, floor=FLOOR, backend=backend)
    for _ in range(2):
        assert _equal(fixedpoint_mul(X, c, 65535, 65536, floor=FLOOR, backend=backend), first)
    first = fixedpoint_unmul(X, c, 65535, 65536, backend=backend)
    assert _equal(fixedpoint_unmul(X, c, 65535, 65536, backend=backend), first)


@needs_cpp
def test_cpp_several_threads_same_result():
    # at::parallel_for splits above the grain size: compare 1 thread with 2
    X, c = _inputs(100_003, 9, 10, seed=11)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = (fixedpoint_mul(X, c, 9, 10, floor=FLOOR, backend="cpp"),
               fixedpoint_unmul(X, c, 9, 10, backend="cpp"))
        torch.set_num_threads(2)
        two = (fixedpoint_mul(X, c, 9, 10, floor=FLOOR, backend="cpp"),
               fixedpoint_unmul(X, c, 9, 10, backend="cpp"))
    finally:
        torch.set_num_threads(old)
    assert _equal(one[0], two[0]) and _equal(one[1], two[1])
    assert _equal(one[0], fixedpoint_mul_reference(X, c, 9, 10, FLOOR, spill_threshold(9, 10)))


# --------------------------------------------------------------------- memory: out=, padding
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("op", ["mul", "unmul"])
@pytest.mark.parametrize("P", [1, 1000, 1025])
def test_out_stays_inside_its_slice(backend, op, P):
    """Guard ("canary") padding around the outputs and the inputs catches out-of-bounds accesses."""
    pad, canary = 2048, -1234567
    X, c = _inputs(P, 9, 10, seed=P)
    X0, c0 = X.clone(), c.clone()

    def guarded(x):
        buf = torch.full((P + 2 * pad,), canary, dtype=torch.int64)
        buf[pad:pad + P] = x
        return buf, buf[pad:pad + P]

    zeros = torch.zeros(P, dtype=torch.int64)
    bufs = [guarded(t) for t in (X, c, zeros, zeros)]
    (_, Xv), (_, cv), (_, Xo), (_, co) = bufs
    if op == "mul":
        ret = fixedpoint_mul(Xv, cv, 9, 10, floor=FLOOR, out=(Xo, co), backend=backend)
        want = fixedpoint_mul_reference(X0, c0, 9, 10, FLOOR, spill_threshold(9, 10))
    else:
        ret = fixedpoint_unmul(Xv, cv, 9, 10, out=(Xo, co), backend=backend)
        want = fixedpoint_unmul_reference(X0, c0, 9, 10)
    assert ret[0].data_ptr() == Xo.data_ptr() and ret[1].data_ptr() == co.data_ptr()
    assert _equal((Xo, co), want)
    for buf, _ in bufs:
        assert bool((buf[:pad] == canary).all()) and bool((buf[pad + P:] == canary).all())
    assert torch.equal(Xv, X0) and torch.equal(cv, c0)  # inputs untouched


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_in_place_step(backend):
    X, c = _inputs(1537, 9, 10, seed=2)
    want = fixedpoint_mul_reference(X, c, 9, 10, FLOOR, spill_threshold(9, 10))
    got = fixedpoint_mul(X, c, 9, 10, floor=FLOOR, out=(X, c), backend=backend)
    assert got[0] is X and got[1] is c and _equal((X, c), want)
    back = fixedpoint_unmul_reference(X, c, 9, 10)
    fixedpoint_unmul(X, c, 9, 10, out=(c, X), backend=backend)  # swapped aliases work as well
    assert torch.equal(c, back[0]) and torch.equal(X, back[1])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_contiguous_and_multidim_inputs(backend):
    X, c = _inputs(2 * 301, 9, 10, seed=4)
    Xs, cs = X[::2], c.view(301, 2).t()[1]
    assert not Xs.is_contiguous() and not cs.is_contiguous()
    got = fixedpoint_mul(Xs, cs, 9, 10, floor=FLOOR, backend=backend)
    assert got[0].is_contiguous()
    assert _equal(got, fixedpoint_mul_reference(Xs.contiguous(), cs.contiguous(), 9, 10, FLOOR,
                                                spill_threshold(9, 10)))
    got = fixedpoint_unmul(X.view(7, 86), c.view(7, 86), 9, 10, backend=backend)
    assert got[0].shape == (7, 86)
    assert _equal(got, [t.view(7, 86) for t in fixedpoint_unmul_reference(X, c, 9, 10)])
    empty = torch.empty(0, dtype=torch.int64)
    got = fixedpoint_mul(empty, empty, 9, 10, floor=FLOOR, backend=backend)
    assert all(t.numel() == 0 for t in got)


# --------------------------------------------------------------------- the reversible buffer
@needs_cpp
def test_info_buffer_runs_on_cpp_and_matches_the_reference_with_spills():
    """300 steps of β = 1/2 (a spill every ~60 steps) and back: the buffer's words, stack and
    records are the same whichever backend runs the step, and auto picks cpp on CPU."""
    P, T = 777, 300
    gen = torch.Generator().manual_seed(0)
    pairs = [(1, 2) if t % 3 else (9, 10) for t in range(T)]
    X0 = _randint(-STATE_LIMIT + 1, STATE_LIMIT, P, gen)
    runs = {}
    for backend in ("reference", "auto"):
        with _backend.use_backend(backend):
            buf, X = InfoBuffer(P, pairs), X0.clone()
            for t, (n, d) in enumerate(pairs):
                X = buf.mul(X, n, d, t)
            after = (X.clone(), buf.live.clone(), buf.stack.size, list(buf.counts))
            used = _backend.last_used("fixedpoint_mul").backend
            for t in range(T - 1, -1, -1):
                X = buf.unmul(X, *pairs[t], t)
            assert torch.equal(X, X0)
            buf.assert_empty()
        runs[backend] = after, used
    assert runs["reference"][1] == "reference" and runs["auto"][1] == "cpp"
    ref, auto = runs["reference"][0], runs["auto"][0]
    assert ref[2] > 0 and ref[2:] == auto[2:]
    assert torch.equal(ref[0], auto[0]) and torch.equal(ref[1], auto[1])


def test_auto_on_cpu_records_its_choice():
    X, c = _inputs(10, 9, 10)
    fixedpoint_mul(X, c, 9, 10, floor=FLOOR)
    choice = _backend.last_used("fixedpoint_mul")
    assert choice.backend == ("cpp" if CPP else "reference")
    assert choice.reason.startswith("auto on cpu")


def test_forcing_unavailable_backend_raises(monkeypatch):
    X, c = _inputs(10, 9, 10)
    with pytest.raises(BackendUnavailableError, match="cuda"):
        fixedpoint_mul(X, c, 9, 10, floor=FLOOR, backend="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    _backend.clear_cache()
    with pytest.raises(BackendUnavailableError, match="(CUDA device|not importable)"):
        fixedpoint_unmul(X, c, 9, 10, backend="triton")


def test_docstring_examples():
    mod = importlib.import_module("fastdistill.ops.fixedpoint_mul")
    res = doctest.testmod(mod, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert res.attempted > 0 and res.failed == 0


# -------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_argument_errors(backend):
    X, c = _inputs(8, 9, 10)
    mul = lambda *a, **k: fixedpoint_mul(*a, backend=backend, **{"floor": FLOOR, **k})  # noqa: E731
    with pytest.raises(ShapeError, match="X must be int64"):
        mul(X.double(), c, 9, 10)
    with pytest.raises(ShapeError, match="c must be int64"):
        fixedpoint_unmul(X, c.int(), 9, 10, backend=backend)
    with pytest.raises(ShapeError, match="c must match X"):
        mul(X, c[:7], 9, 10)
    with pytest.raises(ShapeError, match="tensors"):
        fixedpoint_unmul(X.tolist(), c, 9, 10, backend=backend)
    for n, d in [(10, 10), (11, 10), (0, 10), (-1, 10), (1, MAX_DENOMINATOR + 1)]:
        with pytest.raises(ConfigError, match="0 < n < d ≤ 2\\^20"):
            mul(X, c, n, d)
        with pytest.raises(ConfigError, match="0 < n < d ≤ 2\\^20"):
            fixedpoint_unmul(X, c, n, d, backend=backend)
    for bad in (0.9, True, "9"):
        with pytest.raises(ConfigError, match="n must be an integer"):
            mul(X, c, bad, 10)
    with pytest.raises(ConfigError, match="floor < threshold"):
        mul(X, c, 9, 10, floor=100, threshold=100)
    with pytest.raises(ConfigError, match="floor < threshold"):
        mul(X, c, 9, 10, floor=0)
    with pytest.raises(ConfigError, match="floor < threshold"):
        mul(X, c, 9, 10, threshold=1 << 63)
    with pytest.raises(ShapeError, match="pair of tensors"):
        mul(X, c, 9, 10, out=torch.empty_like(X))
    with pytest.raises(ShapeError, match="X_out must match"):
        mul(X, c, 9, 10, out=(torch.empty(7, dtype=torch.int64), torch.empty_like(c)))
    with pytest.raises(ShapeError, match="c_out must match"):
        mul(X, c, 9, 10, out=(torch.empty_like(X), torch.empty_like(c, dtype=torch.float64)))
    with pytest.raises(ShapeError, match="contiguous"):
        mul(X, c, 9, 10, out=(torch.empty(8, 2, dtype=torch.int64)[:, 0], torch.empty_like(c)))
    with pytest.raises(ShapeError, match="different tensors"):
        Y = torch.empty_like(X)
        fixedpoint_unmul(X, c, 9, 10, out=(Y, Y), backend=backend)


# ------------------------------------------------------------------- the C++ op itself
@needs_cpp
def test_opcheck():
    X, c = _inputs(17, 9, 10)
    S = spill_threshold(9, 10)
    ops = torch.ops.fastdistill
    torch.library.opcheck(ops.fixedpoint_mul.default, (X, c, 9, 10, FLOOR, S))
    torch.library.opcheck(ops.fixedpoint_unmul.default, (X, c, 9, 10))
    torch.library.opcheck(ops.fixedpoint_mul_out.default,
                          (X, c, 9, 10, FLOOR, S, torch.empty_like(X), torch.empty_like(c)))
    torch.library.opcheck(ops.fixedpoint_unmul_out.default,
                          (X, c, 9, 10, torch.empty_like(X), torch.empty_like(c)))


@needs_cpp
def test_cpp_op_checks_its_arguments():
    ops = torch.ops.fastdistill
    X, c = _inputs(12, 9, 10)
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.fixedpoint_mul.default(X[::2], c[::2], 9, 10, FLOOR, 1 << 40)
    with pytest.raises(RuntimeError, match="shape of X"):
        ops.fixedpoint_unmul.default(X, c[:5], 9, 10)
    with pytest.raises(RuntimeError, match="int64"):
        ops.fixedpoint_unmul.default(X.double(), c, 9, 10)
    with pytest.raises(RuntimeError, match="0 < n < d"):
        ops.fixedpoint_unmul.default(X, c, 10, 9)
    with pytest.raises(RuntimeError, match="0 < n < d"):
        ops.fixedpoint_mul.default(X, c, 1, MAX_DENOMINATOR + 1, FLOOR, 1 << 40)
    with pytest.raises(RuntimeError, match="floor < threshold"):
        ops.fixedpoint_mul.default(X, c, 9, 10, 0, 1 << 40)
    with pytest.raises(RuntimeError, match="shape of X"):
        ops.fixedpoint_mul_out.default(X, c, 9, 10, FLOOR, 1 << 40, torch.empty(3, dtype=torch.int64),
                                       torch.empty_like(c))
    with pytest.raises(RuntimeError, match="different tensors"):
        ops.fixedpoint_unmul_out.default(X, c, 9, 10, X, X)


# ------------------------------------------------------------------------------ on a GPU
GPU_BACKENDS = ["triton", "cuda"]


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("n,d", PAIRS)
def test_cuda_matches_reference_bitwise(backend, n, d):
    if backend == "cuda" and not _backend.has_kernel("fastdistill::fixedpoint_mul", "CUDA"):
        pytest.skip("fastdistill._C has no CUDA kernels (built against a CPU torch?)")
    for P in (1, 13, 61706, 1_000_003):
        X, c = _inputs(P, n, d, seed=P)
        S = spill_threshold(n, d)
        want_m = fixedpoint_mul_reference(X, c, n, d, FLOOR, S)
        want_u = fixedpoint_unmul_reference(X, c, n, d)
        Xg, cg = X.cuda(), c.cuda()
        got_m = fixedpoint_mul(Xg, cg, n, d, floor=FLOOR, backend=backend)
        got_u = fixedpoint_unmul(Xg, cg, n, d, backend=backend)
        assert _equal([t.cpu() for t in got_m], want_m)
        assert _equal([t.cpu() for t in got_u], want_u)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cuda_out_guard(backend):
    if backend == "cuda" and not _backend.has_kernel("fastdistill::fixedpoint_mul", "CUDA"):
        pytest.skip("fastdistill._C has no CUDA kernels")
    P, pad, canary = 70_001, 4096, -1234567
    X, c = _inputs(P, 9, 10)
    buf = torch.full((2, P + 2 * pad), canary, dtype=torch.int64, device="cuda")
    fixedpoint_mul(X.cuda(), c.cuda(), 9, 10, floor=FLOOR,
                   out=(buf[0, pad:pad + P], buf[1, pad:pad + P]), backend=backend)
    want = fixedpoint_mul_reference(X, c, 9, 10, FLOOR, spill_threshold(9, 10))
    assert _equal((buf[0, pad:pad + P].cpu(), buf[1, pad:pad + P].cpu()), want)
    assert bool((buf[:, :pad] == canary).all()) and bool((buf[:, pad + P:] == canary).all())
