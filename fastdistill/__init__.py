"""fastdistill: exact, memory-frugal meta-gradients for dataset distillation.

The public API mirrors the papers' pseudo-code::

    from fastdistill import DistillConfig, Distiller, evaluate_distilled, load_dataset
"""
from .backgrad import STRATEGIES, MetaGradient, make_outer_loss, meta_gradient
from .distill import DistillConfig, Distiller, DistillResult, distill
from .errors import FastDistillError
from .evaluate import EvalReport, evaluate_distilled, heldout_inits
from .models import AlexCifarNet, LeNet, ModuleModel, build_model

__version__ = "0.1.0"

__all__ = ["meta_gradient", "make_outer_loss", "MetaGradient", "STRATEGIES", "DistillConfig",
           "Distiller", "DistillResult", "distill", "evaluate_distilled", "heldout_inits",
           "EvalReport", "LeNet", "AlexCifarNet", "ModuleModel", "build_model", "load_dataset",
           "FastDistillError", "__version__"]


def __getattr__(name):
    if name == "load_dataset":
        from .data import load_dataset
        return load_dataset
    raise AttributeError(name)
