"""Triton backend: the kernels behind ``use_backend("triton")``.

Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (the Triton interpreter; the
tests use it). Triton decides between compiled and interpreted kernels when each ``@triton.jit``
decorator runs, i.e. when this package is first imported, so ``TRITON_INTERPRET`` must be set before
that. Importing this package raises ImportError when triton is missing; ``sara_kernels._backend``
catches it and reports the backend as unavailable.

Inputs arrive validated and laid out by ``sara_kernels._ops`` (dtypes, shapes, devices, sorted
in-range indices; linear inputs flattened to 2-D and contiguous).
"""

from __future__ import annotations

import triton  # noqa: F401  (fail here, with ImportError, when triton is absent)

from sara_kernels.triton.optim import restore_, scatter_merge_, sparse_adamw_, sparse_adamw_multi_
from sara_kernels.triton.sampled_grad import sampled_weight_grad_conv2d, sampled_weight_grad_linear

__all__ = [
    "restore_",
    "sampled_weight_grad_conv2d",
    "sampled_weight_grad_linear",
    "scatter_merge_",
    "sparse_adamw_",
    "sparse_adamw_multi_",
]
