"""Any ``nn.Module`` as a functional model, through ``torch.func.functional_call``."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..errors import ConfigError
from .base import FunctionalModel

__all__ = ["ModuleModel"]


class ModuleModel(FunctionalModel):
    """Wrap a user ``nn.Module`` so the engine can unroll it over a flat θ.

    The module's own parameters are only a template (names, shapes, dtype); ``apply(θ, x)``
    calls the module with θ's views substituted via ``functional_call``. Buffers are passed
    unchanged. A module whose buffers change during a forward pass (BatchNorm running
    statistics in train mode) cannot be unrolled functionally -- the recomputed reverse pass
    would see different statistics than the forward and the meta-gradient would be silently
    wrong -- so it is rejected with :class:`~fastdistill.errors.ConfigError`.

    Args:
        module: the network; its ``training`` flag is used as is.
        input_shape: per-example input shape (needed for the buffer check and input checks).
        num_outputs: logits per example.
    """

    name = "module"

    def __init__(self, module: nn.Module, input_shape: Tuple[int, ...], num_outputs: int):
        self.module = module
        self.input_shape = tuple(input_shape)
        self.num_outputs = int(num_outputs)
        self.name = type(module).__name__
        for mname, sub in module.named_modules():
            if isinstance(sub, nn.modules.batchnorm._BatchNorm) and sub.track_running_stats:
                raise ConfigError(
                    f"{self.name}.{mname or '<root>'} is a BatchNorm that tracks running statistics: "
                    "they change on every inner step and cannot be unrolled functionally; use "
                    "track_running_stats=False, GroupNorm/InstanceNorm, or drop the norm layer")
        named = []
        for pname, p in module.named_parameters():
            kind = "bias" if pname.endswith("bias") else "weight"
            named.append((pname, tuple(p.shape), kind))
        if not named:
            raise ConfigError(f"{self.name} has no parameters to train")
        self._set_specs(named)
        self._buffers = dict(module.named_buffers())
        self._check_buffers_static()

    def _check_buffers_static(self) -> None:
        if not self._buffers:
            return
        before = {k: v.detach().clone() for k, v in self._buffers.items()}
        p = next(self.module.parameters())
        x = torch.zeros((2,) + self.input_shape, dtype=p.dtype, device=p.device)
        with torch.no_grad():
            self.module(x)
        changed = [k for k, v in self._buffers.items() if not torch.equal(v, before[k])]
        for k, v in self._buffers.items():
            v.copy_(before[k])
        if changed:
            raise ConfigError(f"{self.name}: buffers {changed} change during a forward pass; a "
                              "functional unroll would give a wrong meta-gradient")

    def template_theta(self) -> Tensor:
        """The module's current parameters as a flat θ (detached copy)."""
        return torch.cat([p.detach().reshape(-1) for p in self.module.parameters()]).clone()

    def init(self, scheme: str = "xavier", generator: Optional[torch.Generator] = None, *,
             gain=None, dtype=None, device=None) -> Tensor:
        p = next(self.module.parameters())
        return super().init(scheme, generator, gain=gain, dtype=dtype or p.dtype,
                            device=device or p.device)

    def apply(self, theta: Tensor, x: Tensor) -> Tensor:
        params = self.unflatten(theta)
        if self._buffers:
            params = {**params, **self._buffers}
        return functional_call(self.module, params, (x,))
