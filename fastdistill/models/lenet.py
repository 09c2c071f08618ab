"""LeNet (DD's MNIST network) and AlexCifarNet (DD's CIFAR-10 network) as functional models."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ShapeError
from .base import FunctionalModel

__all__ = ["LeNet", "AlexCifarNet", "LeNetModule", "AlexCifarNetModule"]


def _max_pool2(h: Tensor) -> Tensor:
    return F.max_pool2d(h, 2)


def _max_pool2_values(h: Tensor) -> Tensor:
    """``F.max_pool2d(h, 2)``'s values as the maximum of the four window corners (bitwise the
    same values: a max rounds nothing), faster on CPU for LeNet's few channels (the whole
    evaluation pass: ``benches/bench_eval.py``). Values only:
    at tied inputs ``torch.maximum`` splits the gradient where max_pool2d routes it to one input,
    so this serves :meth:`LeNet.predict`, never the differentiated :meth:`LeNet.apply`."""
    H, W = h.shape[-2] // 2, h.shape[-1] // 2
    b = h[..., :2 * H, :2 * W].unflatten(-1, (W, 2)).unflatten(-3, (H, 2))
    return torch.maximum(torch.maximum(b[..., 0, :, 0], b[..., 0, :, 1]),
                         torch.maximum(b[..., 1, :, 0], b[..., 1, :, 1]))


class LeNet(FunctionalModel):
    """Conv(c→6,5,pad 2 at 28 px)–ReLU–MaxPool2–Conv(6→16,5)–ReLU–MaxPool2–FC400→120→84→C.

    61,706 parameters for 1×28×28 inputs and C = 10. ``num_classes=2`` builds the binary variant
    with one output (BCE-with-logits loss).
    """

    name = "lenet"

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28):
        if image_size not in (28, 32):
            raise ShapeError(f"LeNet takes 28 or 32 pixel inputs, got {image_size}")
        self.num_classes = num_classes
        self.num_outputs = 1 if num_classes == 2 else num_classes
        self.input_shape = (in_channels, image_size, image_size)
        self.pad = 2 if image_size == 28 else 0
        self._set_specs([
            ("conv1.weight", (6, in_channels, 5, 5), "weight"), ("conv1.bias", (6,), "bias"),
            ("conv2.weight", (16, 6, 5, 5), "weight"), ("conv2.bias", (16,), "bias"),
            ("fc1.weight", (120, 400), "weight"), ("fc1.bias", (120,), "bias"),
            ("fc2.weight", (84, 120), "weight"), ("fc2.bias", (84,), "bias"),
            ("fc3.weight", (self.num_outputs, 84), "weight"), ("fc3.bias", (self.num_outputs,), "bias"),
        ])

    def apply(self, theta: Tensor, x: Tensor) -> Tensor:
        return self._forward(theta, x, _max_pool2)

    def predict(self, theta: Tensor, x: Tensor) -> Tensor:
        with torch.no_grad():
            return self._forward(theta, x, _max_pool2_values)

    def _forward(self, theta: Tensor, x: Tensor, pool) -> Tensor:
        p = self.unflatten(theta)
        h = pool(F.relu(F.conv2d(x, p["conv1.weight"], p["conv1.bias"], padding=self.pad)))
        h = pool(F.relu(F.conv2d(h, p["conv2.weight"], p["conv2.bias"])))
        h = h.flatten(1)
        h = F.relu(F.linear(h, p["fc1.weight"], p["fc1.bias"]))
        h = F.relu(F.linear(h, p["fc2.weight"], p["fc2.bias"]))
        return F.linear(h, p["fc3.weight"], p["fc3.bias"])


class AlexCifarNet(FunctionalModel):
    """DD's CIFAR network: two conv(5×5)/ReLU/MaxPool(3,2,1)/LRN blocks and FC 4096→384→192→C.

    Block 1 is conv–ReLU–pool–LRN, block 2 conv–ReLU–LRN–pool (the original order).
    1,756,426 parameters for 3×32×32 inputs and C = 10.
    """

    name = "alexcifarnet"

    def __init__(self, num_classes: int = 10, in_channels: int = 3, image_size: int = 32):
        if image_size != 32:
            raise ShapeError(f"AlexCifarNet takes 32 pixel inputs, got {image_size}")
        self.num_classes = num_classes
        self.num_outputs = 1 if num_classes == 2 else num_classes
        self.input_shape = (in_channels, 32, 32)
        self._set_specs([
            ("conv1.weight", (64, in_channels, 5, 5), "weight"), ("conv1.bias", (64,), "bias"),
            ("conv2.weight", (64, 64, 5, 5), "weight"), ("conv2.bias", (64,), "bias"),
            ("fc1.weight", (384, 4096), "weight"), ("fc1.bias", (384,), "bias"),
            ("fc2.weight", (192, 384), "weight"), ("fc2.bias", (192,), "bias"),
            ("fc3.weight", (self.num_outputs, 192), "weight"), ("fc3.bias", (self.num_outputs,), "bias"),
        ])

    def apply(self, theta: Tensor, x: Tensor) -> Tensor:
        p = self.unflatten(theta)
        lrn = dict(size=4, alpha=0.001 / 9.0, beta=0.75, k=1.0)
        h = F.relu(F.conv2d(x, p["conv1.weight"], p["conv1.bias"], padding=2))
        h = F.local_response_norm(F.max_pool2d(h, 3, 2, 1), **lrn)
        h = F.relu(F.conv2d(h, p["conv2.weight"], p["conv2.bias"], padding=2))
        h = F.max_pool2d(F.local_response_norm(h, **lrn), 3, 2, 1)
        h = h.flatten(1)
        h = F.relu(F.linear(h, p["fc1.weight"], p["fc1.bias"]))
        h = F.relu(F.linear(h, p["fc2.weight"], p["fc2.bias"]))
        return F.linear(h, p["fc3.weight"], p["fc3.bias"])


# nn.Module twins: the test oracle for the functional forms and a template for user modules.
class LeNetModule(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28):
        super().__init__()
        out = 1 if num_classes == 2 else num_classes
        self.conv1 = nn.Conv2d(in_channels, 6, 5, padding=2 if image_size == 28 else 0)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1, self.fc2, self.fc3 = nn.Linear(400, 120), nn.Linear(120, 84), nn.Linear(84, out)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2).flatten(1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class AlexCifarNetModule(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        out = 1 if num_classes == 2 else num_classes
        self.conv1 = nn.Conv2d(in_channels, 64, 5, padding=2)
        self.conv2 = nn.Conv2d(64, 64, 5, padding=2)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.lrn = nn.LocalResponseNorm(4, 0.001 / 9.0, 0.75, 1.0)
        self.fc1, self.fc2, self.fc3 = nn.Linear(4096, 384), nn.Linear(384, 192), nn.Linear(192, out)

    def forward(self, x):
        x = self.lrn(self.pool(F.relu(self.conv1(x))))
        x = self.pool(self.lrn(F.relu(self.conv2(x)))).flatten(1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))
