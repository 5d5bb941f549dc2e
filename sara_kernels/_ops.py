"""Every op declared once: its schema, its fake (meta) kernel, and the Python kernels.

Public ops live in the ``sara_kernels`` namespace (``torch.ops.sara_kernels.<op>``). Kernels per
dispatch key:

* ``CPU`` / ``CUDA``: the compiled extension's C++ kernels (``csrc/cpu``, ``csrc/cuda``), which
  check their inputs in C++ (``csrc/checks.h``); a call is Python -> dispatcher -> C++, once;
* ``Autograd`` / ``AutocastCPU`` / ``AutocastCUDA`` of ``sparse_linear`` and ``sparse_conv2d``:
  ``csrc/autograd.cpp``;
* ``CompositeExplicitAutograd``: the reference (:mod:`sara_kernels.reference`), the kernel
  wherever no native one is registered, after the shared Python validator (:func:`validate`);
* ``CUDA`` without native CUDA kernels: Triton (:mod:`sara_kernels.triton`), same validator.

A forced backend (:func:`sara_kernels.use_backend`) registers its Python kernels over the CPU and
CUDA keys while it is in force (:func:`override_library`). Without the compiled extension the
layer ops' autograd and autocast are registered here in Python, with the same formulas.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sara_kernels import _autograd, _backend, _checks, reference

NAMESPACE = "sara_kernels"
_lib = torch.library.Library(NAMESPACE, "DEF")

# fmt: off
SCHEMAS = {
    "select_small_magnitude":
        "select_small_magnitude(Tensor weight, float? threshold=None, int? k=None) -> Tensor",
    "sampled_weight_grad_linear":
        "sampled_weight_grad_linear(Tensor grad_out, Tensor x, Tensor index, int out_features, "
        "int in_features) -> Tensor",
    "sampled_weight_grad_conv2d":
        "sampled_weight_grad_conv2d(Tensor grad_out, Tensor x, Tensor index, int[] weight_shape, "
        "int[] stride, int[] padding, int[] dilation, int groups) -> Tensor",
    "sparse_linear":
        "sparse_linear(Tensor x, Tensor weight, Tensor? bias, Tensor index, Tensor delta) -> Tensor",
    "sparse_conv2d":
        "sparse_conv2d(Tensor x, Tensor weight, Tensor? bias, Tensor index, Tensor delta, "
        "int[] stride, int[] padding, int[] dilation, int groups) -> Tensor",
    "sparse_adamw_":
        "sparse_adamw_(Tensor(a!) weight, Tensor index, Tensor base, Tensor(b!) delta, Tensor grad, "
        "Tensor(c!) exp_avg, Tensor(d!) exp_avg_sq, *, float step, float lr, float beta1, "
        "float beta2, float eps, float weight_decay, bool maximize=False) -> ()",
    "sparse_adamw_multi_":
        "sparse_adamw_multi_(Tensor(a!)[] weights, Tensor[] indices, Tensor[] bases, Tensor(b!)[] deltas, "
        "Tensor[] grads, Tensor(c!)[] exp_avgs, Tensor(d!)[] exp_avg_sqs, *, float[] steps, float lr, "
        "float beta1, float beta2, float eps, float weight_decay, bool maximize=False) -> ()",
    "scatter_merge_":
        "scatter_merge_(Tensor(a!) weight, Tensor index, Tensor base, Tensor delta, "
        "float alpha=1.0) -> ()",
    "restore_":
        "restore_(Tensor(a!) weight, Tensor index, Tensor base) -> ()",
}
# fmt: on

for _schema in SCHEMAS.values():
    _lib.define(_schema)


class _LastBackend:
    """``last_backend[op]``: the backend op ran on last (native or Python), for tests and benchmarks."""

    def __getitem__(self, op: str) -> str | None:
        return _backend.last_run(op)[0]

    def get(self, op: str, default=None):
        return self[op] or default


last_backend = _LastBackend()


def _qualname(op: str) -> str:
    return f"{NAMESPACE}::{op}"


# ---------------------------------------------------------------------------------------------
# select_small_magnitude
# ---------------------------------------------------------------------------------------------


@torch.library.register_fake(_qualname("select_small_magnitude"), lib=_lib)
def _(weight, threshold=None, k=None):
    numel = weight.numel()
    if k is not None:
        count = k
    else:
        count = torch.library.get_ctx().new_dynamic_size()
    return weight.new_empty((count,), dtype=reference.index_dtype_for(numel))


# ---------------------------------------------------------------------------------------------
# sampled weight gradients
# ---------------------------------------------------------------------------------------------


def _triton_sampled_linear(grad_out, x, index, out_features, in_features):
    g = grad_out.reshape(-1, out_features).contiguous()
    xx = x.reshape(-1, in_features).contiguous()
    return _backend._load_triton().sampled_weight_grad_linear(
        g, xx, index, out_features, in_features, variant=_backend.sampled_grad_variant()
    )


@torch.library.register_fake(_qualname("sampled_weight_grad_linear"), lib=_lib)
def _(grad_out, x, index, out_features, in_features):
    _checks.check_same_device("sampled_weight_grad_linear", grad_out=grad_out, x=x, index=index)
    torch._check(grad_out.shape[-1] == out_features)
    torch._check(x.shape[-1] == in_features)
    return x.new_empty(index.shape, dtype=reference.accumulate_dtype(grad_out, x))


def _triton_sampled_conv2d(grad_out, x, index, weight_shape, stride, padding, dilation, groups):
    args = (list(weight_shape), list(stride), list(padding), list(dilation), groups)
    return _backend._load_triton().sampled_weight_grad_conv2d(
        grad_out.contiguous(), x.contiguous(), index, *args, variant=_backend.sampled_grad_variant()
    )


@torch.library.register_fake(_qualname("sampled_weight_grad_conv2d"), lib=_lib)
def _(grad_out, x, index, weight_shape, stride, padding, dilation, groups):
    _checks.check_same_device("sampled_weight_grad_conv2d", grad_out=grad_out, x=x, index=index)
    return x.new_empty(index.shape, dtype=reference.accumulate_dtype(grad_out, x))


# ---------------------------------------------------------------------------------------------
# Sampled weight gradients of Conv1d, Conv3d and Embedding: exact reductions to the ops above or
# compositions of torch ops (no kernel of their own, so not registered as ops)
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# In-place ops: fused AdamW, merge, restore
# ---------------------------------------------------------------------------------------------


@torch.library.register_fake(_qualname("sparse_adamw_"), lib=_lib)
def _(*tensors, step, **hyper):
    _checks.check_same_device("sparse_adamw_", **dict(zip(_checks.ADAMW_NAMES, tensors, strict=True)))
    return None


@torch.library.register_fake(_qualname("sparse_adamw_multi_"), lib=_lib)
def _(*lists, steps, **hyper):
    _checks.check_same_device(
        "sparse_adamw_multi_",
        **{
            f"{name}[{i}]": t
            for name, values in zip(_checks.ADAMW_LIST_NAMES, lists, strict=True)
            for i, t in enumerate(values)
        },
    )
    return None


@torch.library.register_fake(_qualname("scatter_merge_"), lib=_lib)
def _(weight, index, base, delta, alpha=1.0):
    _checks.check_same_device("scatter_merge_", weight=weight, index=index, base=base, delta=delta)
    return None


@torch.library.register_fake(_qualname("restore_"), lib=_lib)
def _(weight, index, base):
    _checks.check_same_device("restore_", weight=weight, index=index, base=base)
    return None


# ---------------------------------------------------------------------------------------------
# Autograd ops: sparse_linear, sparse_conv2d
# ---------------------------------------------------------------------------------------------


@torch.library.register_fake(_qualname("sparse_linear"), lib=_lib)
def _(x, weight, bias, index, delta):
    _checks.check_same_device("sparse_linear", x=x, weight=weight, bias=bias, index=index, delta=delta)
    torch._check(x.shape[-1] == weight.shape[1])
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.register_fake(_qualname("sparse_conv2d"), lib=_lib)
def _(x, weight, bias, index, delta, stride, padding, dilation, groups):
    _checks.check_same_device("sparse_conv2d", x=x, weight=weight, bias=bias, index=index, delta=delta)
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


# ---------------------------------------------------------------------------------------------
# Autocast: compute as nn.Linear / nn.Conv2d would (x, weight, bias in the autocast dtype; delta
# stays fp32). torch.library.register_autocast takes one fixed dtype; this follows whatever dtype
# the surrounding torch.autocast region asks for.
# ---------------------------------------------------------------------------------------------
def _register_autocast(op_name: str, cast_positions: tuple[int, ...]) -> None:
    op = getattr(torch.ops.sara_kernels, op_name).default
    for device_type in ("cpu", "cuda"):
        key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        key = getattr(torch._C.DispatchKey, key_name)

        def autocast_kernel(*args, _device_type=device_type, _key=key):
            dtype = torch.get_autocast_dtype(_device_type)
            args = list(args)
            for i in cast_positions:
                a = args[i]
                # Autocast's own rule: floating tensors other than fp64, on the autocast device.
                if (
                    isinstance(a, torch.Tensor)
                    and a.is_floating_point()
                    and a.dtype not in (dtype, torch.float64)
                    and a.device.type == _device_type
                ):
                    args[i] = a.to(dtype)
            with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(_key)):
                return op(*args)

        op.py_impl(key)(autocast_kernel)
        _lib.impl(op_name, lambda _keyset, *args, _f=autocast_kernel: _f(*args), key_name, with_keyset=True)


# ---------------------------------------------------------------------------------------------
# Eager fast path for the layers
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# The Python kernels: one shared validator per op, then the backend
# ---------------------------------------------------------------------------------------------
#: Each kernel op's Python validator (the native kernels check the same in C++, csrc/checks.h).


def _triton_or_reference(op: str):
    """The Triton runner of op: the flattening wrappers of the sampled gradients, else the Triton
    kernel of that name, else the reference (selection uses torch ops; an op without a Triton
    kernel runs its reference on the triton backend)."""
    special = {
        "sampled_weight_grad_linear": _triton_sampled_linear,
        "sampled_weight_grad_conv2d": _triton_sampled_conv2d,
    }
    if op in special:
        return special[op]
    return lambda *args, **kwargs: getattr(_backend._load_triton(), op, getattr(reference, op))(
        *args, **kwargs
    )


def validate(op: str, *args, **kwargs) -> None:
    """Run op's Python validator (what the reference and Triton kernels check before they run)."""
    _checks.VALIDATORS[op](*args, **kwargs)


def _python_kernel(op: str):
    """The Python kernel of op: the validator, then the backend :func:`~sara_kernels._backend.select_backend`
    names for the tensors' device (the forced one, which raises when it can't run here; else Triton
    on CUDA, the reference elsewhere), recorded as what ran."""
    validator = _checks.VALIDATORS[op]
    runners = {"reference": getattr(reference, op), "triton": _triton_or_reference(op)}

    def kernel(*args, **kwargs):
        validator(*args, **kwargs)
        first = args[0]
        if isinstance(first, (list, tuple)):  # sparse_adamw_multi_: the first weight's device
            if not first:
                return None
            first = first[0]
        chosen = _backend.select_backend(op, first.device)
        if chosen not in runners:  # a native backend on a device it has no kernel for
            chosen = "reference"
        _backend.record_run(op, chosen)
        return runners[chosen](*args, **kwargs)

    kernel.__name__ = f"{op}_python"
    return kernel


for _op in _checks.VALIDATORS:
    _lib.impl(_op, _python_kernel(_op), "CompositeExplicitAutograd")
    if not _backend.native_available("cuda"):
        _lib.impl(_op, _python_kernel(_op), "CUDA")  # Triton where it runs, else the reference

if not _backend.native_available("cpu"):
    # Without the compiled extension: the layer ops' forward, autograd and autocast in Python.
    _lib.impl("sparse_linear", _autograd.sparse_linear, "CompositeExplicitAutograd")
    _lib.impl("sparse_conv2d", _autograd.sparse_conv2d, "CompositeExplicitAutograd")
    torch.library.register_autograd(
        _qualname("sparse_linear"),
        _autograd.linear_backward,
        setup_context=_autograd.linear_setup_context,
        lib=_lib,
    )
    torch.library.register_autograd(
        _qualname("sparse_conv2d"),
        _autograd.conv_backward,
        setup_context=_autograd.conv_setup_context,
        lib=_lib,
    )
    _register_autocast("sparse_linear", (0, 1, 2))
    _register_autocast("sparse_conv2d", (0, 1, 2))


def override_library(backend: str) -> torch.library.Library:
    """Register ``backend``'s Python kernels over the CPU and CUDA keys of every kernel op (a
    forced backend); destroying the returned library restores the default kernels. A forced native
    backend overrides only the other device's key, whose calls it must refuse."""
    import warnings

    keys = {"cpu": ("CUDA",), "cuda": ("CPU",)}.get(backend, ("CPU", "CUDA"))
    library = torch.library.Library(NAMESPACE, "IMPL")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Oo]verrid")
        for op in _checks.VALIDATORS:
            for key in keys:
                library.impl(op, _python_kernel(op), key)
    return library


_backend._apply_environment()
