"""Functional models equal their nn.Module twins exactly in float64; init schemes; user modules."""
import math

import pytest
import torch
from torch import nn

from fastdistill.errors import ConfigError, ShapeError
from fastdistill.evaluate import accuracy
from fastdistill.models import (INIT_SCHEMES, AlexCifarNet, AlexCifarNetModule, LeNet, LeNetModule,
                                ModuleModel, build_model)


def _load_module(fm, module, theta):
    params = fm.unflatten(theta)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(params[name])


@pytest.mark.parametrize("num_classes", [10, 2])
def test_lenet_equals_module_float64(num_classes):
    fm = LeNet(num_classes)
    mod = LeNetModule(num_classes).double()
    th = fm.init("xavier", torch.Generator().manual_seed(1), dtype=torch.float64)
    _load_module(fm, mod, th)
    x = torch.randn(7, 1, 28, 28, dtype=torch.float64)
    assert torch.equal(fm.apply(th, x), mod(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("num_classes,channels,size", [(10, 1, 28), (2, 1, 28), (10, 3, 32)])
def test_lenet_predict_equals_apply_bitwise(dtype, num_classes, channels, size):
    # predict's pooling is a max of the window corners; values (not gradients) must be apply's
    fm = LeNet(num_classes, channels, size)
    th = fm.init("xavier", torch.Generator().manual_seed(3), dtype=dtype).requires_grad_(True)
    x = torch.randn(9, channels, size, size, dtype=dtype)
    x[:3] = 0.5            # constant images: tied pooling windows everywhere
    x[3, :, :, ::2] = x[3, :, :, 1::2]   # pairwise-equal columns
    z = fm.predict(th, x)
    assert not z.requires_grad and torch.equal(z, fm.apply(th, x).detach())
    y = torch.randint(0, 2, (9,))
    assert torch.equal(torch.tensor(accuracy(fm, th.detach(), x, y)),
                       torch.tensor(float(((fm.apply(th, x)[:, 0] > 0).long() if num_classes == 2
                                           else fm.apply(th, x).argmax(1)).eq(y).float().mean())))


def test_lenet_parameter_count_and_shapes():
    assert LeNet().num_params == 61706
    assert LeNet(2).num_outputs == 1
    assert LeNet(in_channels=3, image_size=32).input_shape == (3, 32, 32)
    assert AlexCifarNet().num_params == 1756426


def test_alexcifarnet_equals_module_float64():
    fm = AlexCifarNet()
    mod = AlexCifarNetModule().double()
    th = fm.init("xavier", torch.Generator().manual_seed(2), dtype=torch.float64)
    _load_module(fm, mod, th)
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    assert torch.equal(fm.apply(th, x), mod(x))


def test_flatten_unflatten_roundtrip():
    fm = LeNet()
    th = torch.randn(fm.num_params, dtype=torch.float64)
    assert torch.equal(fm.flatten(fm.unflatten(th)), th)


@pytest.mark.parametrize("scheme", INIT_SCHEMES)
def test_init_schemes_statistics_and_reproducibility(scheme):
    fm = LeNet()
    a = fm.init(scheme, torch.Generator().manual_seed(3))
    b = fm.init(scheme, torch.Generator().manual_seed(3))
    c = fm.init(scheme, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    p = fm.unflatten(a)
    w = p["fc1.weight"]  # [120, 400]
    fan_in, fan_out = 400, 120
    expected_std = {
        "xavier": math.sqrt(2.0 / (fan_in + fan_out)),
        "xavier-uniform": math.sqrt(2.0 / (fan_in + fan_out)),
        "kaiming": math.sqrt(2.0 / fan_in),
        "normal": 0.02,
        "default": math.sqrt(1.0 / (3 * fan_in)),  # kaiming_uniform(a=√5): bound = 1/√fan_in
    }
    if scheme == "orthogonal":
        q = w @ w.T  # rows orthonormal (120 ≤ 400)
        assert torch.allclose(q, torch.eye(120), atol=1e-5)
    else:
        assert abs(w.std().item() / expected_std[scheme] - 1) < 0.05
    if scheme == "default":
        assert p["fc1.bias"].abs().max() <= 1 / math.sqrt(fan_in) and p["fc1.bias"].abs().max() > 0
    else:
        assert torch.count_nonzero(p["fc1.bias"]) == 0


def test_unknown_init_and_model():
    with pytest.raises(ConfigError, match="unknown init scheme"):
        LeNet().init("bogus")
    with pytest.raises(ConfigError, match="unknown model"):
        build_model("resnet", 10, 1, 28)


def test_wrong_theta_and_input_shapes():
    fm = LeNet()
    with pytest.raises(ShapeError, match="61706"):
        fm.apply(torch.zeros(5), torch.zeros(1, 1, 28, 28))
    with pytest.raises(ShapeError):
        fm.check_input(torch.zeros(2, 3, 28, 28))


class _Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.norm = nn.GroupNorm(3, 3)
        self.fc = nn.Linear(3 * 26 * 26, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.norm(self.conv(x))).flatten(1))


def test_module_model_matches_module_and_grad():
    mod = _Small().double()
    fm = ModuleModel(mod, (1, 28, 28), 4)
    th = fm.template_theta()
    x = torch.randn(5, 1, 28, 28, dtype=torch.float64)
    assert torch.equal(fm.apply(th, x), mod(x))
    # gradients flow to θ through functional_call
    th = th.requires_grad_(True)
    g, = torch.autograd.grad(fm.apply(th, x).sum(), th)
    mod.zero_grad()
    mod(x).sum().backward()
    ref = torch.cat([p.grad.reshape(-1) for p in mod.parameters()])
    assert torch.allclose(g, ref, rtol=1e-12, atol=1e-14)


def test_module_with_running_stats_rejected():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2 * 26 * 26, 3))
    with pytest.raises(ConfigError, match="running statistics"):
        ModuleModel(net, (1, 28, 28), 3)
    # without running statistics BatchNorm is a pure function of the batch: accepted
    net2 = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2, track_running_stats=False), nn.Flatten(),
                         nn.Linear(2 * 26 * 26, 3))
    fm = ModuleModel(net2, (1, 28, 28), 3)
    assert fm.apply(fm.template_theta(), torch.randn(4, 1, 28, 28)).shape == (4, 3)


class _Counter(nn.Module):
    """A custom module that mutates a buffer in forward (like running statistics)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)
        self.register_buffer("seen", torch.zeros(()))

    def forward(self, x):
        self.seen += len(x)
        return self.fc(x.flatten(1))


def test_module_with_mutating_buffer_rejected():
    with pytest.raises(ConfigError, match="buffers"):
        ModuleModel(_Counter(), (4,), 2)
