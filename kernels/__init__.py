"""Triton kernels of fastdistill, installed as ``fastdistill._kernels``.

One module per op, named like its reference in ``fastdistill/ops/``. Importing a kernel module
needs triton; without a GPU set ``TRITON_INTERPRET=1`` *before* the import (tests do this in
conftest) or the launches fail. Runtime code reaches these kernels through
:mod:`fastdistill._backend`, never directly.
"""
