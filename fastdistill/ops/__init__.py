"""Hot ops of the inner loop, one module per op.

Each ``<op>.py`` holds ``<op>_reference`` (plain differentiable PyTorch: the specification, the
fallback and the test oracle) and the public ``<op>()``, which picks a backend through
:mod:`fastdistill._backend` and records which one ran.
"""
from .gd_update import gd_update, gd_update_reference

__all__ = ["gd_update", "gd_update_reference"]
