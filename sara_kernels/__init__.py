"""sara_kernels: memory-efficient sparse fine-tuning (SaRA) for PyTorch.

Layers and method:
    SparseDeltaLinear, SparseDeltaConv1d/2d/3d, SparseDeltaEmbedding
                                            drop-in nn.Linear / nn.ConvNd / nn.Embedding with a
                                            k-sized trainable delta
    SaRAConfig, apply_sara                  convert + select + freeze a model in place
    sparse_parameters, SparseAdamW          the deltas and the fused optimizer
    reselect_, ProgressiveReselection       progressive parameter adjustment
    paper_learning_rate                     lr = 1e-3 * exp(-350 * threshold)
    nuclear_norm_loss                       the low-rank constraint on the deltas ("svd" or "polar")
    save_adapter, load_adapter, merge_and_unload   safetensors adapters, scaling/adding, deployment
    set_adapters, disable_adapters, delete_adapter, list_adapters
                                            many resident adapters: switch and mix in O(k) at inference
    SparseEMA                               k-sized EMA of the deltas (diffusers' EMAModel interface)
    save_training_state, load_training_state   checkpoint / resume a run (the trained state only)
    dense_state_dict                        state_dict() of the plain merged model (save_pretrained)
    sara_kernels.integrations.accelerate    accelerator.save_state / load_state hooks

Kernels:
    sara_kernels.ops          the ops (typed wrappers of torch.ops.sara_kernels.*)
    sara_kernels.backends()   what is built and which backend each op uses per device
    sara_kernels.use_backend  context manager forcing a backend ('reference', 'cpu', 'cuda', 'triton')
"""

from sara_kernels import ops
from sara_kernels._backend import BACKENDS, backends, use_backend, use_grad_variant
from sara_kernels._checks import index_checks, set_index_checks
from sara_kernels._version import __version__
from sara_kernels.adapter import load_adapter, merge_and_unload, read_adapter, save_adapter
from sara_kernels.ema import SparseEMA
from sara_kernels.multi_adapter import delete_adapter, disable_adapters, list_adapters, set_adapters
from sara_kernels.nn import (
    DeltaParameter,
    SparseDeltaConv1d,
    SparseDeltaConv2d,
    SparseDeltaConv3d,
    SparseDeltaEmbedding,
    SparseDeltaLinear,
    SparseStateWarning,
    dense_state_dict,
)
from sara_kernels.optim import SparseAdamW, paper_learning_rate
from sara_kernels.regularizers import nuclear_norm_loss
from sara_kernels.sara import (
    ProgressiveReselection,
    SaRAConfig,
    apply_sara,
    reselect_,
    sparse_layers,
    sparse_parameters,
)
from sara_kernels.training_state import load_training_state, save_training_state

__all__ = [
    "BACKENDS",
    "DeltaParameter",
    "ProgressiveReselection",
    "SaRAConfig",
    "SparseAdamW",
    "SparseDeltaConv1d",
    "SparseDeltaConv2d",
    "SparseDeltaConv3d",
    "SparseDeltaEmbedding",
    "SparseDeltaLinear",
    "SparseEMA",
    "SparseStateWarning",
    "__version__",
    "apply_sara",
    "backends",
    "delete_adapter",
    "dense_state_dict",
    "disable_adapters",
    "index_checks",
    "list_adapters",
    "load_adapter",
    "load_training_state",
    "merge_and_unload",
    "nuclear_norm_loss",
    "ops",
    "paper_learning_rate",
    "read_adapter",
    "reselect_",
    "save_adapter",
    "save_training_state",
    "set_adapters",
    "set_index_checks",
    "sparse_layers",
    "sparse_parameters",
    "use_backend",
    "use_grad_variant",
]
