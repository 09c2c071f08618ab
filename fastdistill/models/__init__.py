"""Functional models and the registry that builds them by name."""
from __future__ import annotations

from typing import Callable, Dict

from ..errors import ConfigError
from .base import INIT_SCHEMES, FunctionalModel, ParamSpec
from .lenet import AlexCifarNet, AlexCifarNetModule, LeNet, LeNetModule
from .module import ModuleModel

__all__ = ["FunctionalModel", "ParamSpec", "INIT_SCHEMES", "LeNet", "AlexCifarNet",
           "LeNetModule", "AlexCifarNetModule", "ModuleModel", "MODELS", "build_model"]

#: name -> constructor(num_classes, in_channels, image_size); later issues add convnet, textcnn.
MODELS: Dict[str, Callable[..., FunctionalModel]] = {
    "lenet": lambda num_classes, in_channels, image_size: LeNet(num_classes, in_channels, image_size),
    "alexcifarnet": lambda num_classes, in_channels, image_size: AlexCifarNet(num_classes, in_channels, image_size),
}


def build_model(name: str, num_classes: int, in_channels: int, image_size: int) -> FunctionalModel:
    """Build a registered functional model by name (``lenet``, ``alexcifarnet``)."""
    key = name.lower()
    if key not in MODELS:
        raise ConfigError(f"unknown model {name!r}; choose one of {', '.join(sorted(MODELS))}")
    return MODELS[key](num_classes, in_channels, image_size)
