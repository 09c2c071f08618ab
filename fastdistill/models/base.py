"""Functional models: one flat parameter vector θ, a parameter spec and a pure ``apply(θ, x)``.

The unrolled inner loop treats a network as a function of a flat vector ``θ`` of ``P`` numbers so
that every back-gradient strategy (stored θ_t, checkpoints, fixed-point reversal) can keep,
recompute and compare whole parameter states as single tensors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..errors import ConfigError, ShapeError

__all__ = ["ParamSpec", "FunctionalModel", "INIT_SCHEMES"]

INIT_SCHEMES = ("xavier", "xavier-uniform", "kaiming", "normal", "orthogonal", "default")


@dataclass(frozen=True)
class ParamSpec:
    """One named parameter inside the flat vector: ``theta[offset:offset+numel].view(shape)``.

    ``kind`` is ``"weight"`` or ``"bias"`` (or ``"other"``) and ``fan_in`` / ``fan_out`` are the
    fans the initialisation schemes use (for a conv weight ``[out, in, kh, kw]``:
    ``fan_in = in·kh·kw``).
    """

    name: str
    shape: Tuple[int, ...]
    offset: int
    kind: str = "weight"

    @property
    def numel(self) -> int:
        return int(math.prod(self.shape))


def _build_specs(named_shapes: Sequence[Tuple[str, Tuple[int, ...], str]]) -> List[ParamSpec]:
    specs, off = [], 0
    for name, shape, kind in named_shapes:
        s = ParamSpec(name, tuple(int(d) for d in shape), off, kind)
        specs.append(s)
        off += s.numel
    return specs


class FunctionalModel:
    """Base class: a network as ``apply(theta, x) -> logits`` over one flat θ.

    Subclasses set ``self.specs`` (via :meth:`_set_specs`), ``input_shape`` (C, H, W or any
    per-example shape) and ``num_outputs``, and implement :meth:`apply`.

    Attributes:
        specs: the parameters in flat order.
        num_params: P, the length of θ.
        input_shape: per-example input shape, e.g. ``(1, 28, 28)``.
        num_outputs: logits per example (1 for binary tasks).
    """

    name = "functional"
    specs: List[ParamSpec]
    input_shape: Tuple[int, ...]
    num_outputs: int

    def _set_specs(self, named_shapes):
        self.specs = _build_specs(named_shapes)
        self.num_params = sum(s.numel for s in self.specs)

    # -- parameter handling ------------------------------------------------------------------
    def unflatten(self, theta: Tensor) -> Dict[str, Tensor]:
        """Views of θ per parameter name (no copies; differentiable)."""
        self.check_theta(theta)
        return {s.name: theta[s.offset:s.offset + s.numel].view(s.shape) for s in self.specs}

    def flatten(self, params: Dict[str, Tensor]) -> Tensor:
        """Inverse of :meth:`unflatten`: concatenate named tensors into one flat θ."""
        missing = [s.name for s in self.specs if s.name not in params]
        if missing:
            raise ShapeError(f"{self.name}: missing parameters {missing}")
        parts = []
        for s in self.specs:
            p = params[s.name]
            if tuple(p.shape) != s.shape:
                raise ShapeError(f"{self.name}: parameter {s.name} has shape {tuple(p.shape)}, "
                                 f"expected {s.shape}")
            parts.append(p.reshape(-1))
        return torch.cat(parts)

    def check_theta(self, theta: Tensor) -> None:
        if theta.dim() != 1 or theta.numel() != self.num_params:
            raise ShapeError(f"{self.name}: θ must be a flat vector of {self.num_params} numbers, "
                             f"got shape {tuple(theta.shape)}")

    def check_input(self, x: Tensor) -> None:
        if tuple(x.shape[1:]) != tuple(self.input_shape):
            raise ShapeError(f"{self.name}: input must be [N, {', '.join(map(str, self.input_shape))}]"
                             f", got {list(x.shape)}")

    # -- initialisation ----------------------------------------------------------------------
    def init(self, scheme: str = "xavier", generator: Optional[torch.Generator] = None, *,
             gain: Optional[float] = None, dtype: torch.dtype = torch.float32,
             device=None) -> Tensor:
        """Sample θ_0 with one of :data:`INIT_SCHEMES`.

        Args:
            scheme: ``xavier`` (normal, gain 1; DD's default), ``xavier-uniform``, ``kaiming``
                (normal, fan-in), ``normal`` (std ``gain``, default 0.02), ``orthogonal``, or
                ``default`` (PyTorch's own Conv/Linear reset: kaiming-uniform(a=√5) weights and
                uniform(±1/√fan_in) biases). Biases are zero for every scheme but ``default``.
            generator: a ``torch.Generator`` for reproducible draws (CPU generator).
            gain: the scheme's parameter (xavier/orthogonal gain, kaiming negative slope,
                normal std).
        Returns:
            θ_0, shape ``[P]``.
        """
        if scheme not in INIT_SCHEMES:
            raise ConfigError(f"unknown init scheme {scheme!r}; choose one of {', '.join(INIT_SCHEMES)}")
        theta = torch.zeros(self.num_params, dtype=torch.float64)
        weights = {}
        for s in self.specs:
            view = theta[s.offset:s.offset + s.numel].view(s.shape)
            if s.kind == "weight" and len(s.shape) >= 2:
                weights[s.name] = view
                _init_weight(view, scheme, gain, generator)
            elif s.kind == "weight":  # 1-d affine scales (norm layers)
                view.fill_(1.0)
        if scheme == "default":
            for s in self.specs:
                if s.kind == "bias":
                    w = weights.get(s.name[:-len("bias")] + "weight")
                    if w is None:
                        continue
                    fan_in = w[0].numel()
                    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
                    view = theta[s.offset:s.offset + s.numel]
                    view.uniform_(-bound, bound, generator=generator)
        return theta.to(dtype=dtype, device=device)

    # -- forward -----------------------------------------------------------------------------
    def apply(self, theta: Tensor, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def predict(self, theta: Tensor, x: Tensor) -> Tensor:
        """``apply(θ, x)`` without gradients (evaluation). Models may override it with a faster
        forward pass that returns the same values; ``apply`` stays the one to differentiate."""
        with torch.no_grad():
            return self.apply(theta, x)

    def __call__(self, theta: Tensor, x: Tensor) -> Tensor:
        return self.apply(theta, x)

    def describe(self) -> str:
        return f"{self.name}(P={self.num_params}, input={self.input_shape}, outputs={self.num_outputs})"


def _init_weight(w: Tensor, scheme: str, gain: Optional[float], gen) -> None:
    init = nn.init
    if scheme == "xavier":
        init.xavier_normal_(w, gain=1.0 if gain is None else gain, generator=gen)
    elif scheme == "xavier-uniform":
        init.xavier_uniform_(w, gain=1.0 if gain is None else gain, generator=gen)
    elif scheme == "kaiming":
        init.kaiming_normal_(w, a=0.0 if gain is None else gain, mode="fan_in", generator=gen)
    elif scheme == "normal":
        init.normal_(w, 0.0, 0.02 if gain is None else gain, generator=gen)
    elif scheme == "orthogonal":
        init.orthogonal_(w, gain=1.0 if gain is None else gain, generator=gen)
    elif scheme == "default":
        init.kaiming_uniform_(w, a=math.sqrt(5), generator=gen)
