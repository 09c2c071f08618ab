"""Helpers the ops share."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def needs_grad(*tensors: Optional[Tensor]) -> bool:
    """True when autograd records and any of ``tensors`` (None entries ignored) requires grad:
    then an op must run a differentiable path."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
