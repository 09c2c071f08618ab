"""Hot ops of the inner loop, one module per op.

Each ``<op>.py`` holds ``<op>_reference`` (plain differentiable PyTorch: the specification, the
fallback and the test oracle) and the public ``<op>()``, which picks a backend through
:mod:`fastdistill._backend` and records which one ran.
"""
from .ce_head import ce_head, ce_head_reference
from .fixedpoint_mul import (fixedpoint_mul, fixedpoint_mul_reference, fixedpoint_unmul,
                             fixedpoint_unmul_reference)
from .gd_update import gd_update, gd_update_reference
from .im2col5 import col2im5, col2im5_reference, im2col5, im2col5_reference
from .lenet_step import lenet_step, lenet_step_reference
from .linear_relu_tangent import linear_relu_tangent, linear_relu_tangent_reference
from .lrn import (lrn, lrn_backward, lrn_backward_reference, lrn_reference, lrn_tangent,
                  lrn_tangent_reference)
from .maxpool3s2 import (maxpool3s2, maxpool3s2_backward, maxpool3s2_backward_reference,
                         maxpool3s2_reference, maxpool3s2_tangent, maxpool3s2_tangent_reference)
from .pool2_relu import (pool2_relu, pool2_relu_backward, pool2_relu_backward_reference,
                         pool2_relu_reference, pool2_relu_tangent, pool2_relu_tangent_reference)

__all__ = ["ce_head", "ce_head_reference", "fixedpoint_mul", "fixedpoint_mul_reference",
           "fixedpoint_unmul", "fixedpoint_unmul_reference", "gd_update", "gd_update_reference",
           "im2col5", "im2col5_reference", "col2im5", "col2im5_reference",
           "lenet_step", "lenet_step_reference", "linear_relu_tangent", "linear_relu_tangent_reference",
           "pool2_relu", "pool2_relu_reference", "pool2_relu_tangent", "pool2_relu_tangent_reference",
           "pool2_relu_backward", "pool2_relu_backward_reference",
           "lrn", "lrn_reference", "lrn_tangent", "lrn_tangent_reference", "lrn_backward",
           "lrn_backward_reference",
           "maxpool3s2", "maxpool3s2_reference", "maxpool3s2_tangent", "maxpool3s2_tangent_reference",
           "maxpool3s2_backward", "maxpool3s2_backward_reference"]
