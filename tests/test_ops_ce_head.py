"""ce_head: the batched LeNet engine's softmax head runs through it (bitwise its reference), and
the reference has the derivatives it claims (autograd, float64); the triton backend (CPU interpreter here) and the
cuda backend (GPU only) equal it at float32 error (≤ 2× torch's own against float64), closely in
float64, with shared or per-network, soft or one-hot targets; stay inside their inputs and are
deterministic (cuda: bit-identical reruns, opcheck); a forced cuda backend on CPU fails loudly."""
import os

import pytest
import torch
import torch.nn.functional as F

from fastdistill import _backend
from fastdistill.errors import BackendUnavailableError, ConfigError, ShapeError
from fastdistill.models import LeNet
from fastdistill.models.batched import LeNetBatchedEngine
from fastdistill.ops.ce_head import ce_head, ce_head_reference

# triton runs CPU tensors only under the interpreter (conftest sets it without a GPU); the CUDA
# path is tested in tests/test_kernels_triton.py
TRITON = _backend._triton_module()[0] is not None and os.environ.get("TRITON_INTERPRET") == "1"
needs_triton = pytest.mark.skipif(not TRITON, reason="triton or its interpreter unavailable")
# (K, O, n, shared targets): LeNet's 10 classes, ones, primes (padded rows and columns), many images
CASES = [(2, 10, 7, False), (1, 1, 1, False), (3, 10, 13, True), (2, 7, 5, False), (4, 3, 100, True)]
EPS32 = torch.finfo(torch.float32).eps


@pytest.fixture(autouse=True)
def _no_forced_backend(monkeypatch):
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)


def _data(K, O, n, shared, dtype=torch.float32, seed=0, one_hot=False):
    g = torch.Generator().manual_seed(seed)
    z = 3 * torch.randn(K, O, n, generator=g, dtype=dtype)
    zd = torch.randn(K, O, n, generator=g, dtype=dtype)
    k = 1 if shared else K
    if one_hot:
        Y = F.one_hot(torch.randint(O, (k, n), generator=g), O).to(dtype).transpose(1, 2)
    else:
        Y = torch.rand(k, O, n, generator=g, dtype=dtype)          # soft, not normalised
    return z, Y.contiguous(), zd


def _err(x, ref64):
    return (x.double() - ref64).abs().max().item()


@pytest.mark.parametrize("O", [10, 3])
def test_engine_head_is_the_op(O):
    """Bitwise: the engine's softmax head (forward and tangent) is ce_head (two classes run as
    one-logit BCE there, which ce_head does not cover); its derivatives are checked below."""
    eng = LeNetBatchedEngine(LeNet(O))
    assert eng.O == O
    for dtype, shared in ((torch.float32, False), (torch.float64, True)):
        z, Y, zd = _data(3, O, 6, shared, dtype, seed=O)
        scale = 1.0 / 6
        want = ce_head_reference(z, Y, scale, zd)
        _backend.reset_usage(["ce_head"])
        got = eng._head(z, Y, scale, zd)
        assert _backend.last_used("ce_head").backend == "reference"   # CPU: auto's choice
        for g, w in zip(got, want):
            assert torch.equal(g, w)
        loss, dz, none1, none2 = eng._head(z, Y, scale, None)
        assert torch.equal(loss, want[0]) and torch.equal(dz, want[1])
        assert none1 is None and none2 is None


def test_reference_derivatives_with_autograd_float64():
    """δz = ∂ℓ/∂z, δż = jvp of δz along ż, R{∇_ỹ ℓ} = jvp of ∂ℓ/∂ỹ along ż (per network)."""
    z, Y, zd = _data(2, 5, 4, False, torch.float64, seed=1)
    s = 0.25
    loss_fn = lambda zz, yy: ce_head_reference(zz, yy, s)[0].sum()  # noqa: E731
    loss, dz, dzd, dy = ce_head_reference(z, Y, s, zd)
    want = -(Y * torch.log_softmax(z, 1)).sum((1, 2)) * s
    assert torch.allclose(loss, want, rtol=1e-14, atol=0)
    assert torch.allclose(dz, torch.func.grad(loss_fn)(z, Y), rtol=1e-13, atol=1e-15)
    _, jvp_dz = torch.func.jvp(lambda zz: ce_head_reference(zz, Y, s)[1], (z,), (zd,))
    assert torch.allclose(dzd, jvp_dz, rtol=1e-12, atol=1e-15)
    _, jvp_gy = torch.func.jvp(lambda zz: torch.func.grad(loss_fn, argnums=1)(zz, Y), (z,), (zd,))
    assert torch.allclose(dy, jvp_gy, rtol=1e-12, atol=1e-15)


@needs_triton
@pytest.mark.parametrize("one_hot", [False, True])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_triton_float32_error_is_torchs(case, one_hot):
    K, O, n, shared = case
    z, Y, zd = _data(K, O, n, shared, seed=K * O + n, one_hot=one_hot)
    got = ce_head(z, Y, 1.0 / n, zd, backend="triton")
    assert _backend.last_used("ce_head").backend == "triton"
    ref = ce_head_reference(z, Y, 1.0 / n, zd)
    exact = ce_head_reference(z.double(), Y.double(), 1.0 / n, zd.double())
    for g, r, e in zip(got, ref, exact):
        assert g.dtype == torch.float32 and g.shape == e.shape
        atol = 8 * EPS32 * e.abs().max().item()
        assert _err(g, e) <= 2 * _err(r, e) + atol, (_err(g, e), _err(r, e))
    loss, dz, none, none2 = ce_head(z, Y, 1.0 / n, backend="triton")       # no tangent
    assert none is None and none2 is None
    assert torch.equal(loss, got[0]) and torch.equal(dz, got[1])


@needs_triton
@pytest.mark.parametrize("case", CASES[:3], ids=lambda c: "x".join(map(str, c)))
def test_triton_float64(case):
    K, O, n, shared = case
    z, Y, zd = _data(K, O, n, shared, torch.float64, seed=2)
    scale = torch.tensor(1.0 / 3, dtype=torch.float64)     # 1/3 is not an fp32 number
    for g, r in zip(ce_head(z, Y, scale, zd, backend="triton"), ce_head_reference(z, Y, 1.0 / 3, zd)):
        assert g.dtype == torch.float64
        assert (g - r).abs().max() <= 1e-13 * r.abs().max().clamp_min(1)


@needs_triton
def test_guard_padding_and_determinism():
    canary = 1e30
    z, Y, zd = _data(3, 10, 11, False, seed=3)
    views = []
    for t in (z, Y, zd):
        buf = torch.full((t.numel() + 512,), canary)
        buf[256:256 + t.numel()] = t.reshape(-1)
        views.append(buf[256:256 + t.numel()].view(t.shape))
    got = ce_head(*views[:2], 0.1, views[2], backend="triton")
    again = ce_head(z, Y, 0.1, zd, backend="triton")
    for g, a in zip(got, again):
        assert torch.equal(g, a) and g.isfinite().all() and g.abs().max() < 1e3


@needs_triton
def test_triton_refuses_autograd():
    z, Y, zd = _data(1, 3, 2, False)
    with pytest.raises(ConfigError, match="not differentiable"):
        ce_head(z.requires_grad_(True), Y, 1.0, zd, backend="triton")
    with torch.no_grad():
        ce_head(z, Y, 1.0, zd, backend="triton")


def test_auto_picks_reference_on_cpu_and_shape_errors():
    z, Y, zd = _data(2, 4, 3, False)
    ce_head(z, Y, 1.0, zd)
    assert _backend.last_used("ce_head").backend == "reference"
    with pytest.raises(ShapeError):
        ce_head(z, Y[:, :3], 1.0)                      # classes differ
    with pytest.raises(ShapeError):
        ce_head(z, torch.cat([Y, Y, Y]), 1.0)          # 6 target sets for 2 networks
    with pytest.raises(ShapeError):
        ce_head(z, Y, 1.0, zd[:, :, :2])               # tangent shape
    with pytest.raises(ShapeError):
        ce_head(z, Y.double(), 1.0)                    # one dtype
    with pytest.raises(ShapeError):
        ce_head(z, Y, torch.ones(2))                   # scale is a scalar


# ------------------------------------------------------------------------------- cuda backend
CUDA_OPS = ("fastdistill::ce_head", "fastdistill::ce_head_tangent")


def test_cuda_backend_is_cuda_only():
    """Forcing cuda on CPU tensors raises (no silent fallback); there is no cpp backend, and a
    built extension declares the ops without a CPU kernel (on CPU they run the reference)."""
    z, Y, zd = _data(2, 4, 3, False)
    with pytest.raises(BackendUnavailableError, match="cuda"):
        ce_head(z, Y, 1.0, zd, backend="cuda")
    with pytest.raises(BackendUnavailableError, match="no cpp implementation"):
        ce_head(z, Y, 1.0, zd, backend="cpp")
    assert "cuda" in _backend.registered()["ce_head"] and "cpp" not in _backend.registered()["ce_head"]
    if _backend.load_extension()[0] is not None:
        for op in CUDA_OPS:
            name = op.split("::")[1]
            assert str(getattr(torch.ops.fastdistill, name).default._schema).startswith(op + "(")
            assert not _backend.has_kernel(op, "CPU")


def _cuda_kernels():
    if not _backend.has_kernel("fastdistill::ce_head", "CUDA"):
        pytest.skip("fastdistill._C was built without CUDA kernels")


def _cuda(*ts):
    return tuple(None if t is None else t.cuda() for t in ts)


@pytest.mark.cuda
@pytest.mark.parametrize("one_hot", [False, True])
@pytest.mark.parametrize("case", CASES + [(2, 70, 9, False)], ids=lambda c: "x".join(map(str, c)))
def test_cuda_equals_reference(case, one_hot):
    """float32 within 2× torch's own error (against float64), float64 to 1e-13; without a
    tangent the same loss and δz bitwise; reruns bit-identical. O = 70 > 32: several classes
    per lane."""
    _cuda_kernels()
    K, O, n, shared = case
    for dtype in (torch.float32, torch.float64):
        z, Y, zd = _data(K, O, n, shared, dtype, seed=K * O + n, one_hot=one_hot)
        got = ce_head(*_cuda(z, Y), 1.0 / n, zd.cuda(), backend="cuda")
        assert _backend.last_used("ce_head").backend == "cuda"
        ref = ce_head_reference(z, Y, 1.0 / n, zd)
        exact = ce_head_reference(z.double(), Y.double(), torch.tensor(1.0 / n, dtype=dtype).double(),
                                  zd.double())
        for g, r, e in zip(got, ref, exact):
            assert g.dtype == dtype and g.shape == e.shape and g.is_cuda
            if dtype == torch.float32:
                atol = 8 * EPS32 * e.abs().max().item()
                assert _err(g.cpu(), e) <= 2 * _err(r, e) + atol, (_err(g.cpu(), e), _err(r, e))
            else:
                assert _err(g.cpu(), e) <= 1e-13 * max(e.abs().max().item(), 1.0)
        again = ce_head(*_cuda(z, Y), 1.0 / n, zd.cuda(), backend="cuda")
        for g, a in zip(got, again):
            assert torch.equal(g, a)
        loss, dz, none, none2 = ce_head(*_cuda(z, Y), 1.0 / n, backend="cuda")
        assert none is None and none2 is None
        assert torch.equal(loss, got[0]) and torch.equal(dz, got[1])


@pytest.mark.cuda
def test_cuda_tensor_scale_and_guard_padding():
    """A 0-d or one-element CUDA scale is read on the device; inputs are views into buffers of
    1e30 (a read outside a view would show)."""
    _cuda_kernels()
    canary = 1e30
    z, Y, zd = _cuda(*_data(3, 10, 11, False, seed=3))
    views = []
    for t in (z, Y, zd):
        buf = torch.full((t.numel() + 512,), canary, device="cuda")
        buf[256:256 + t.numel()] = t.reshape(-1)
        views.append(buf[256:256 + t.numel()].view(t.shape))
    got = ce_head(*views[:2], torch.tensor([0.1], device="cuda"), views[2], backend="cuda")
    again = ce_head(z, Y, 0.1, zd, backend="cuda")
    for g, a in zip(got, again):
        assert torch.equal(g, a) and g.isfinite().all() and g.abs().max() < 1e3


@pytest.mark.cuda
def test_cuda_refuses_autograd_and_opcheck():
    _cuda_kernels()
    z, Y, zd = _cuda(*_data(2, 10, 7, False, torch.float64, seed=6))
    with pytest.raises(ConfigError, match="not differentiable"):
        ce_head(z.clone().requires_grad_(True), Y, 1.0, zd, backend="cuda")
    s = torch.tensor(1.0 / 7, dtype=torch.float64, device="cuda")
    ops = torch.ops.fastdistill
    torch.library.opcheck(ops.ce_head.default, (z, Y, s))
    torch.library.opcheck(ops.ce_head_tangent.default, (z, Y, s, zd))
    torch.library.opcheck(ops.ce_head_tangent.default, (z, Y[:1].contiguous(), s, zd))   # shared


@pytest.mark.cuda
def test_cuda_entry_points_check_their_arguments():
    _cuda_kernels()
    z, Y, zd = _cuda(*_data(2, 4, 3, False))
    s = torch.tensor(1.0, device="cuda")
    ops = torch.ops.fastdistill
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.ce_head(z.transpose(1, 2).contiguous().transpose(1, 2), Y, s)
    with pytest.raises(RuntimeError, match="Y must be"):
        ops.ce_head(z, Y[:, :3].contiguous(), s)
    with pytest.raises(RuntimeError, match="scale must be a 0-d"):
        ops.ce_head(z, Y, s.reshape(1))
    with pytest.raises(RuntimeError, match="shape of z"):
        ops.ce_head_tangent(z, Y, s, zd[:, :, :2].contiguous())
