"""sara_kernels: memory-efficient sparse fine-tuning (SaRA) kernels for PyTorch.

Public API:
    sara_kernels.ops          -- the ops (typed wrappers of torch.ops.sara_kernels.*)
    sara_kernels.backends()   -- what is built and which backend each op uses per device
    sara_kernels.use_backend  -- context manager forcing a backend ('reference', 'cpu', 'cuda', 'triton')
"""

from sara_kernels import ops
from sara_kernels._backend import BACKENDS, backends, use_backend, use_grad_variant
from sara_kernels._checks import index_checks, set_index_checks
from sara_kernels._version import __version__

__all__ = [
    "BACKENDS",
    "__version__",
    "backends",
    "index_checks",
    "ops",
    "set_index_checks",
    "use_backend",
    "use_grad_variant",
]
