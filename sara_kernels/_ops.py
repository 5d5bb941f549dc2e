"""Every op's schema, device kernels, fake (meta) kernel and autograd formula, in one place.

Public ops live in the ``sara_kernels`` namespace (``torch.ops.sara_kernels.<op>``). Their CPU and
CUDA kernels are thin Python dispatchers: they check the inputs (errors name the argument), pick a
backend (:mod:`sara_kernels._backend`) and call it:

* ``reference``: :mod:`sara_kernels.reference` (also registered as ``CompositeExplicitAutograd``,
  so it is the kernel on any other device);
* ``cpu`` / ``cuda``: the compiled extension's ops ``torch.ops.sara_kernels_C.<op>``
  (``csrc/cpu``, ``csrc/cuda``);
* ``triton``: :mod:`sara_kernels.triton`.

The native ops take 2-D (linear) or 4-D (conv) contiguous inputs; flattening and layout fixes
happen here, once, for every backend.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sara_kernels import _backend, _checks, reference

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

#: The backend each op ran on last (per process); tests and benchmarks read it.
last_backend: dict[str, str] = {}


def _qualname(op: str) -> str:
    return f"{NAMESPACE}::{op}"


def _native(op: str):
    return getattr(torch.ops.sara_kernels_C, op)


def _triton(op: str):
    return getattr(_backend._load_triton(), op)


def _register_device_kernel(op: str, fn) -> None:
    """The same dispatcher on CPU, CUDA and (as reference) every other device."""
    for key in ("CPU", "CUDA"):
        _lib.impl(op, fn, key)


# ---------------------------------------------------------------------------------------------
# select_small_magnitude
# ---------------------------------------------------------------------------------------------
def _select_small_magnitude(weight, threshold=None, k=None):
    op = "select_small_magnitude"
    _checks.check_tensor(op, "weight", weight, dtypes=_checks.WEIGHT_DTYPES)
    if (threshold is None) == (k is None):
        raise ValueError(f"sara_kernels.{op}: give exactly one of threshold or k")
    if threshold is not None and not (threshold > 0 and threshold == threshold):
        raise ValueError(f"sara_kernels.{op}: threshold must be a positive number, got {threshold}")
    if k is not None and not (0 <= k <= weight.numel()):
        raise ValueError(
            f"sara_kernels.{op}: k={k} must lie in [0, {weight.numel()}] (the weight's entry count)"
        )
    backend = _backend.select_backend(op, weight.device)
    last_backend[op] = backend
    if backend in ("cpu", "cuda"):
        return _native(op)(weight.contiguous(), threshold, k)
    # Selection on the triton backend uses torch ops (a sort / compaction is not worth a kernel).
    return reference.select_small_magnitude(weight, threshold, k)


_register_device_kernel("select_small_magnitude", _select_small_magnitude)
_lib.impl("select_small_magnitude", reference.select_small_magnitude, "CompositeExplicitAutograd")


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
def _check_linear_grad(op, grad_out, x, index, out_features, in_features):
    _checks.check_tensor(op, "grad_out", grad_out, dtypes=_checks.FLOAT_DTYPES)
    _checks.check_tensor(op, "x", x, dtypes=_checks.FLOAT_DTYPES)
    _checks.check_tensor(op, "index", index, dtypes=_checks.INDEX_DTYPES, dim=1)
    if grad_out.dtype != x.dtype:
        raise TypeError(f"sara_kernels.{op}: grad_out is {grad_out.dtype} but x is {x.dtype}")
    if out_features <= 0 or in_features <= 0:
        raise ValueError(
            f"sara_kernels.{op}: out_features={out_features} and in_features={in_features} must be positive"
        )
    if grad_out.dim() == 0 or grad_out.shape[-1] != out_features:
        raise ValueError(
            f"sara_kernels.{op}: grad_out has shape {tuple(grad_out.shape)}; its last dim must be "
            f"out_features={out_features}"
        )
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(
            f"sara_kernels.{op}: x has shape {tuple(x.shape)}; its last dim must be in_features={in_features}"
        )
    if grad_out.shape[:-1] != x.shape[:-1]:
        raise ValueError(
            f"sara_kernels.{op}: grad_out {tuple(grad_out.shape)} and x {tuple(x.shape)} must share "
            "their leading (token) dims"
        )
    _checks.check_same_device(op, grad_out=grad_out, x=x, index=index)


def _sampled_weight_grad_linear(grad_out, x, index, out_features, in_features):
    op = "sampled_weight_grad_linear"
    _check_linear_grad(op, grad_out, x, index, out_features, in_features)
    _checks.check_index(op, index, out_features * in_features)
    return _run_sampled_weight_grad_linear(grad_out, x, index, out_features, in_features)


def _run_sampled_weight_grad_linear(grad_out, x, index, out_features, in_features):
    """Pick the backend and run (inputs already checked)."""
    op = "sampled_weight_grad_linear"
    backend = _backend.select_backend(op, x.device)
    last_backend[op] = backend
    if backend == "reference":
        return reference.sampled_weight_grad_linear(grad_out, x, index, out_features, in_features)
    g = grad_out.reshape(-1, out_features).contiguous()
    xx = x.reshape(-1, in_features).contiguous()
    if backend == "triton":
        return _triton(op)(g, xx, index, out_features, in_features, variant=_backend.sampled_grad_variant())
    return _native(op)(g, xx, index, out_features, in_features, _backend.sampled_grad_variant())


_register_device_kernel("sampled_weight_grad_linear", _sampled_weight_grad_linear)
_lib.impl("sampled_weight_grad_linear", reference.sampled_weight_grad_linear, "CompositeExplicitAutograd")


@torch.library.register_fake(_qualname("sampled_weight_grad_linear"), lib=_lib)
def _(grad_out, x, index, out_features, in_features):
    _checks.check_same_device("sampled_weight_grad_linear", grad_out=grad_out, x=x, index=index)
    torch._check(grad_out.shape[-1] == out_features)
    torch._check(x.shape[-1] == in_features)
    return x.new_empty(index.shape, dtype=reference.accumulate_dtype(grad_out, x))


def _check_conv_grad(op, grad_out, x, index, weight_shape, stride, padding, dilation, groups):
    _checks.check_tensor(op, "grad_out", grad_out, dtypes=_checks.FLOAT_DTYPES, dim=4)
    _checks.check_tensor(op, "x", x, dtypes=_checks.FLOAT_DTYPES, dim=4)
    _checks.check_tensor(op, "index", index, dtypes=_checks.INDEX_DTYPES, dim=1)
    if grad_out.dtype != x.dtype:
        raise TypeError(f"sara_kernels.{op}: grad_out is {grad_out.dtype} but x is {x.dtype}")
    for name, value in (("stride", stride), ("padding", padding), ("dilation", dilation)):
        if len(value) != 2:
            raise ValueError(f"sara_kernels.{op}: {name} must have 2 entries, got {list(value)}")
    _checks.check_conv2d(op, x, weight_shape, stride, padding, dilation, groups, grad_out)
    _checks.check_same_device(op, grad_out=grad_out, x=x, index=index)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _sampled_weight_grad_conv2d(grad_out, x, index, weight_shape, stride, padding, dilation, groups):
    op = "sampled_weight_grad_conv2d"
    _check_conv_grad(op, grad_out, x, index, weight_shape, stride, padding, dilation, groups)
    _checks.check_index(op, index, _numel(weight_shape))
    return _run_sampled_weight_grad_conv2d(
        grad_out, x, index, weight_shape, stride, padding, dilation, groups
    )


def _run_sampled_weight_grad_conv2d(grad_out, x, index, weight_shape, stride, padding, dilation, groups):
    """Pick the backend and run (inputs already checked)."""
    op = "sampled_weight_grad_conv2d"
    backend = _backend.select_backend(op, x.device)
    last_backend[op] = backend
    args = (list(weight_shape), list(stride), list(padding), list(dilation), groups)
    if backend == "reference":
        return reference.sampled_weight_grad_conv2d(grad_out, x, index, *args)
    g, xx = grad_out.contiguous(), x.contiguous()
    if backend == "triton":
        return _triton(op)(g, xx, index, *args, variant=_backend.sampled_grad_variant())
    return _native(op)(g, xx, index, *args, _backend.sampled_grad_variant())


_register_device_kernel("sampled_weight_grad_conv2d", _sampled_weight_grad_conv2d)
_lib.impl("sampled_weight_grad_conv2d", reference.sampled_weight_grad_conv2d, "CompositeExplicitAutograd")


@torch.library.register_fake(_qualname("sampled_weight_grad_conv2d"), lib=_lib)
def _(grad_out, x, index, weight_shape, stride, padding, dilation, groups):
    _checks.check_same_device("sampled_weight_grad_conv2d", grad_out=grad_out, x=x, index=index)
    return x.new_empty(index.shape, dtype=reference.accumulate_dtype(grad_out, x))


# ---------------------------------------------------------------------------------------------
# Sampled weight gradients of Conv1d, Conv3d and Embedding: exact reductions to the ops above or
# compositions of torch ops (no kernel of their own, so not registered as ops)
# ---------------------------------------------------------------------------------------------
def _conv2d_sampler(checked: bool):
    """The conv2d sampled gradient: the registered op (checked, traceable) or the backend directly."""
    return torch.ops.sara_kernels.sampled_weight_grad_conv2d if checked else _run_sampled_weight_grad_conv2d


def _check_conv_nd(op, dims, grad_out, x, index, weight_shape, stride, padding, dilation, groups):
    """The checks of :func:`_check_conv_grad` for a ``dims``-D convolution."""
    _checks.check_tensor(op, "grad_out", grad_out, dtypes=_checks.FLOAT_DTYPES, dim=dims + 2)
    _checks.check_tensor(op, "x", x, dtypes=_checks.FLOAT_DTYPES, dim=dims + 2)
    _checks.check_tensor(op, "index", index, dtypes=_checks.INDEX_DTYPES, dim=1)
    if grad_out.dtype != x.dtype:
        raise TypeError(f"sara_kernels.{op}: grad_out is {grad_out.dtype} but x is {x.dtype}")
    if len(weight_shape) != dims + 2 or any(int(s) <= 0 for s in weight_shape):
        raise ValueError(
            f"sara_kernels.{op}: weight_shape must be {dims + 2} positive ints [out, in/groups, "
            f"kernel...], got {list(weight_shape)}"
        )
    for name, value in (("stride", stride), ("padding", padding), ("dilation", dilation)):
        if len(value) != dims:
            raise ValueError(f"sara_kernels.{op}: {name} must have {dims} entries, got {list(value)}")
    if groups <= 0 or weight_shape[0] % groups != 0 or x.shape[1] != weight_shape[1] * groups:
        raise ValueError(
            f"sara_kernels.{op}: x has {x.shape[1]} channels; weight_shape {list(weight_shape)} with "
            f"groups={groups} needs groups to divide {weight_shape[0]} and "
            f"{weight_shape[1] * groups} channels"
        )
    out = _checks.conv2d_output_size(op, x.shape, weight_shape, stride, padding, dilation)
    expected = (x.shape[0], weight_shape[0], *out)
    if tuple(grad_out.shape) != expected:
        raise ValueError(
            f"sara_kernels.{op}: grad_out has shape {tuple(grad_out.shape)} but the convolution of x "
            f"{tuple(x.shape)} with weight_shape {list(weight_shape)} gives {expected}"
        )
    _checks.check_same_device(op, grad_out=grad_out, x=x, index=index)
    _checks.check_index(op, index, _numel(weight_shape))


def sampled_weight_grad_conv1d(
    grad_out, x, index, weight_shape, stride, padding, dilation, groups, checked: bool = True
):
    """grad_out: [N, O, L_out], x: [N, C, L], index: [k] into the [O, C/g, K] weight -> [k].

    A Conv1d is a Conv2d of height 1: the inputs gain a unit height dim, the weight is
    ``[O, C/g, 1, K]`` (the same flat index), and the conv2d op computes the entries."""
    if checked:
        _check_conv_nd(
            "sampled_weight_grad_conv1d",
            1,
            grad_out,
            x,
            index,
            weight_shape,
            stride,
            padding,
            dilation,
            groups,
        )
    out_channels, in_per_group, kernel = (int(s) for s in weight_shape)
    return _conv2d_sampler(checked)(
        grad_out.unsqueeze(2),
        x.unsqueeze(2),
        index,
        [out_channels, in_per_group, 1, kernel],
        [1, int(stride[0])],
        [0, int(padding[0])],
        [1, int(dilation[0])],
        groups,
    )


def sampled_weight_grad_conv3d(
    grad_out, x, index, weight_shape, stride, padding, dilation, groups, checked: bool = True
):
    """grad_out: [N, O, T_out, P, Q], x: [N, C, T, H, W], index: [k] into the [O, C/g, kT, kH, kW]
    weight -> [k] (fp32, fp64 for fp64 inputs).

    The weight gradient at temporal tap ``t`` is a Conv2d weight gradient over the frames that tap
    reads, ``t * dilation_t + stride_t * j`` for ``j < T_out`` (after temporal padding), batched over
    ``(N, T_out)``. Flat index ``(o, c, t, h, w)`` maps to ``(o, c, h, w)`` of the ``[O, C/g, kH, kW]``
    conv2d weight (this keeps each tap's entries sorted). One conv2d sampled gradient per tap that
    holds selected entries. Extra memory: the input once, frames first (``N * (T + 2 p) * C * H * W``),
    the output gradient once, and one tap's frames when they are not a view.
    """
    op = "sampled_weight_grad_conv3d"
    if checked:
        _check_conv_nd(op, 3, grad_out, x, index, weight_shape, stride, padding, dilation, groups)
    out_channels, in_per_group, taps, kh, kw = (int(s) for s in weight_shape)
    n, channels, frames_in = x.shape[:3]
    t_out = grad_out.shape[2]
    t_stride, t_dilation, t_padding = int(stride[0]), int(dilation[0]), int(padding[0])
    result = torch.zeros(index.shape, dtype=reference.accumulate_dtype(grad_out, x), device=x.device)
    if index.numel() == 0 or n * t_out == 0:
        return result
    # Frames first, temporally padded, in one copy: [N, T + 2 p, C, H, W]. A tap's frames are then a
    # strided slice of dim 1, a view when N == 1 and the stride is 1 (no copy per tap). Transposing
    # per tap instead cost 4x more than the conv2d kernels (SVD's 640-channel temporal conv, CPU).
    x_frames = x.new_zeros((n, frames_in + 2 * t_padding, channels, *x.shape[3:]))
    x_frames[:, t_padding : t_padding + frames_in] = x.transpose(1, 2)
    grad_2d = grad_out.transpose(1, 2).reshape(n * t_out, out_channels, *grad_out.shape[3:])
    flat = index.long()
    plane = kh * kw
    tap_of = (flat // plane) % taps
    # The entries grouped by tap (a stable sort keeps each tap's conv2d indices increasing).
    order = torch.argsort(tap_of, stable=True)
    index_2d = ((flat[order] // (plane * taps)) * plane + flat[order] % plane).to(index.dtype)
    counts = torch.bincount(tap_of, minlength=taps).tolist()
    sampled = _conv2d_sampler(checked)
    parts = []
    for t, part in enumerate(torch.split(index_2d, counts)):
        if part.numel() == 0:
            continue
        start = t * t_dilation
        frames = x_frames[:, start : start + t_stride * (t_out - 1) + 1 : t_stride]  # [N, T_out, C, H, W]
        x_2d = frames.reshape(n * t_out, channels, *x.shape[3:])
        parts.append(
            sampled(
                grad_2d,
                x_2d,
                part,
                [out_channels, in_per_group, kh, kw],
                [int(s) for s in stride[1:]],
                [int(p) for p in padding[1:]],
                [int(d) for d in dilation[1:]],
                groups,
            )
        )
    result[order] = torch.cat(parts).to(result.dtype)
    return result


def sampled_weight_grad_embedding(
    grad_out,
    indices,
    index,
    num_embeddings: int,
    embedding_dim: int,
    padding_idx: int | None = None,
    scale_grad_by_freq: bool = False,
    checked: bool = True,
):
    """grad_out: [..., D], indices: [...] token ids, index: [k] into the [V, D] weight -> [k] fp32
    (fp64 for fp64 grad_out).

    Entry ``(r, c)`` gets the sum of ``grad_out[n, c]`` over the tokens ``n`` equal to ``r`` (divided
    by the count of ``r`` with ``scale_grad_by_freq``; 0 in the ``padding_idx`` row), as
    ``nn.Embedding``'s weight gradient. Memory O(tokens * D + k): the gradient rows of the distinct
    tokens are summed (``index_add_``), and each selected entry finds its row by ``searchsorted``.
    """
    op = "sampled_weight_grad_embedding"
    if checked:
        _checks.check_tensor(op, "grad_out", grad_out, dtypes=_checks.FLOAT_DTYPES)
        _checks.check_tensor(op, "indices", indices, dtypes=_checks.INDEX_DTYPES)
        _checks.check_tensor(op, "index", index, dtypes=_checks.INDEX_DTYPES, dim=1)
        if num_embeddings <= 0 or embedding_dim <= 0:
            raise ValueError(
                f"sara_kernels.{op}: num_embeddings={num_embeddings} and embedding_dim={embedding_dim} "
                "must be positive"
            )
        if tuple(grad_out.shape) != (*indices.shape, embedding_dim):
            raise ValueError(
                f"sara_kernels.{op}: grad_out has shape {tuple(grad_out.shape)} but indices "
                f"{tuple(indices.shape)} with embedding_dim={embedding_dim} need "
                f"{(*indices.shape, embedding_dim)}"
            )
        _checks.check_same_device(op, grad_out=grad_out, indices=indices, index=index)
        _checks.check_range(op, indices.reshape(-1), num_embeddings, name="indices")
        _checks.check_index(op, index, num_embeddings * embedding_dim)
    acc = reference.accumulate_dtype(grad_out)
    tokens = indices.reshape(-1)
    result = torch.zeros(index.shape, dtype=acc, device=grad_out.device)
    if index.numel() == 0 or tokens.numel() == 0:
        return result
    unique, inverse, counts = torch.unique(tokens.long(), return_inverse=True, return_counts=True)
    rows = torch.zeros(unique.numel(), embedding_dim, dtype=acc, device=grad_out.device)
    rows.index_add_(0, inverse, grad_out.reshape(-1, embedding_dim).to(acc))  # [U, D]
    if scale_grad_by_freq:
        rows /= counts.unsqueeze(1).to(acc)
    flat = index.long()
    row, column = flat // embedding_dim, flat % embedding_dim
    position = torch.searchsorted(unique, row).clamp_(max=unique.numel() - 1)
    hit = unique[position] == row
    if padding_idx is not None:
        hit &= row != padding_idx
    return torch.where(hit, rows[position, column], result)


# ---------------------------------------------------------------------------------------------
# In-place ops: fused AdamW, merge, restore
# ---------------------------------------------------------------------------------------------
def _check_weight_side(op, weight, index, base, names=("weight", "index", "base")):
    w, i, b = names
    _checks.check_tensor(op, w, weight, dtypes=_checks.WEIGHT_DTYPES)
    _checks.check_contiguous_weight(op, weight, name=w)
    _checks.check_tensor(op, i, index, dtypes=_checks.INDEX_DTYPES, dim=1)
    _checks.check_tensor(op, b, base, dim=1)
    if base.dtype != weight.dtype:
        raise TypeError(f"sara_kernels.{op}: {b} is {base.dtype} but {w} is {weight.dtype}; they must match")
    if base.shape != index.shape:
        raise ValueError(
            f"sara_kernels.{op}: {b} has shape {tuple(base.shape)} but {i} has {tuple(index.shape)}"
        )


def _check_compact(op, name, t, index, dtypes, index_name="index"):
    _checks.check_tensor(op, name, t, dtypes=dtypes, dim=1)
    if t.shape != index.shape:
        raise ValueError(
            f"sara_kernels.{op}: {name} has shape {tuple(t.shape)} but {index_name} has {tuple(index.shape)}"
        )
    if not t.is_contiguous():
        raise ValueError(f"sara_kernels.{op}: {name} must be contiguous")


_ADAMW_NAMES = ("weight", "index", "base", "delta", "grad", "exp_avg", "exp_avg_sq")
_ADAMW_LIST_NAMES = ("weights", "indices", "bases", "deltas", "grads", "exp_avgs", "exp_avg_sqs")


def check_adamw_hyper(op, lr, beta1, beta2, eps, weight_decay):
    """AdamW's hyperparameters: finite (NaN passes every comparison), betas in [0, 1), lr, eps and
    weight_decay non-negative. Shared by the ops and :class:`~sara_kernels.SparseAdamW`."""
    _checks.check_finite(op, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
    if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
        raise ValueError(f"sara_kernels.{op}: betas must lie in [0, 1), got ({beta1}, {beta2})")
    if lr < 0 or eps < 0 or weight_decay < 0:
        raise ValueError(
            f"sara_kernels.{op}: lr={lr}, eps={eps} and weight_decay={weight_decay} must be non-negative"
        )


def _check_step(op, name, step):
    _checks.check_finite(op, **{name: step})
    if step < 1:
        raise ValueError(f"sara_kernels.{op}: {name} must be >= 1 (AdamW counts from 1), got {step}")


def _check_adamw_set(op, tensors, names=_ADAMW_NAMES):
    """Every check of one (weight, index, base, delta, grad, exp_avg, exp_avg_sq) set; ``names``
    label the tensors in messages."""
    weight, index, base, delta, grad, exp_avg, exp_avg_sq = tensors
    _check_weight_side(op, weight, index, base, names[:3])
    fp32 = (torch.float32,)
    for name, t in zip(names[3:], (delta, grad, exp_avg, exp_avg_sq), strict=True):
        _check_compact(op, name, t, index, fp32, index_name=names[1])
    if weight.dtype == torch.float64:
        raise TypeError(
            f"sara_kernels.{op}: {names[0]} dtype float64 is not supported; use fp32, bf16 or fp16"
        )
    _checks.check_same_device(op, **dict(zip(names, tensors, strict=True)))
    _checks.check_index(op, index, weight.numel(), name=names[1])


def _adamw_written_and_read(sets, names_of):
    """The tensors an AdamW step writes (weight, delta, moments) and reads (index, base, grad)."""
    written, read = {}, {}
    for i, tensors in enumerate(sets):
        names = names_of(i)
        for j in (0, 3, 5, 6):
            written[names[j]] = tensors[j]
        for j in (1, 2, 4):
            read[names[j]] = tensors[j]
    return written, read


def _sparse_adamw_(
    weight,
    index,
    base,
    delta,
    grad,
    exp_avg,
    exp_avg_sq,
    *,
    step,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    maximize=False,
):
    op = "sparse_adamw_"
    tensors = (weight, index, base, delta, grad, exp_avg, exp_avg_sq)
    _check_adamw_set(op, tensors)
    _checks.check_no_overlap(op, *_adamw_written_and_read([tensors], lambda i: _ADAMW_NAMES))
    _check_step(op, "step", step)
    check_adamw_hyper(op, lr, beta1, beta2, eps, weight_decay)
    run_sparse_adamw_(
        weight,
        index,
        base,
        delta,
        grad,
        exp_avg,
        exp_avg_sq,
        step=step,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
        maximize=maximize,
    )


def run_sparse_adamw_(
    weight,
    index,
    base,
    delta,
    grad,
    exp_avg,
    exp_avg_sq,
    *,
    step,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    maximize=False,
):
    """Pick the backend and run the fused step with no Python-side checks: SparseAdamW's fast path,
    for layers that validated their tensors when they were built (the native kernels still check
    shapes and index ranges)."""
    op = "sparse_adamw_"
    backend = _backend.select_backend(op, weight.device)
    last_backend[op] = backend
    scalars = dict(
        step=float(step),
        lr=float(lr),
        beta1=float(beta1),
        beta2=float(beta2),
        eps=float(eps),
        weight_decay=float(weight_decay),
        maximize=bool(maximize),
    )
    if backend == "reference":
        reference.sparse_adamw_(weight, index, base, delta, grad, exp_avg, exp_avg_sq, **scalars)
    elif backend == "triton":
        _triton(op)(weight, index, base, delta, grad, exp_avg, exp_avg_sq, **scalars)
    else:
        _native(op)(weight, index, base, delta, grad, exp_avg, exp_avg_sq, *scalars.values())


_register_device_kernel("sparse_adamw_", _sparse_adamw_)
_lib.impl("sparse_adamw_", reference.sparse_adamw_, "CompositeExplicitAutograd")


@torch.library.register_fake(_qualname("sparse_adamw_"), lib=_lib)
def _(
    weight,
    index,
    base,
    delta,
    grad,
    exp_avg,
    exp_avg_sq,
    *,
    step,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    maximize=False,
):
    names = ("weight", "index", "base", "delta", "grad", "exp_avg", "exp_avg_sq")
    tensors = (weight, index, base, delta, grad, exp_avg, exp_avg_sq)
    _checks.check_same_device("sparse_adamw_", **dict(zip(names, tensors, strict=True)))
    return None


def _sparse_adamw_multi_(
    weights,
    indices,
    bases,
    deltas,
    grads,
    exp_avgs,
    exp_avg_sqs,
    *,
    steps,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    maximize=False,
):
    op = "sparse_adamw_multi_"
    lists = (weights, indices, bases, deltas, grads, exp_avgs, exp_avg_sqs, steps)
    n = len(weights)
    for name, values in zip(_ADAMW_LIST_NAMES[1:] + ("steps",), lists[1:], strict=True):
        if len(values) != n:
            raise ValueError(
                f"sara_kernels.{op}: {name} has {len(values)} entries but weights has {n}; "
                "every list needs one entry per weight"
            )
    check_adamw_hyper(op, lr, beta1, beta2, eps, weight_decay)
    if n == 0:
        return
    for i, tensors in enumerate(zip(*lists[:7], strict=True)):
        names = tuple(f"{name}[{i}]" for name in _ADAMW_LIST_NAMES)
        _check_adamw_set(op, tensors, names)
        if tensors[0].device != weights[0].device:
            raise RuntimeError(
                f"sara_kernels.{op}: weights[{i}] is on {tensors[0].device} but weights[0] is on "
                f"{weights[0].device}; all tensors must be on one device"
            )
        _check_step(op, f"steps[{i}]", steps[i])
    sets = list(zip(*lists[:7], strict=True))
    names_of = lambda i: tuple(f"{name}[{i}]" for name in _ADAMW_LIST_NAMES)  # noqa: E731
    _checks.check_no_overlap(op, *_adamw_written_and_read(sets, names_of))
    run_sparse_adamw_multi_(
        weights,
        indices,
        bases,
        deltas,
        grads,
        exp_avgs,
        exp_avg_sqs,
        steps=steps,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
        maximize=maximize,
    )


def run_sparse_adamw_multi_(
    weights,
    indices,
    bases,
    deltas,
    grads,
    exp_avgs,
    exp_avg_sqs,
    *,
    steps,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    maximize=False,
):
    """Pick the backend (from the first weight's device) and run the multi-tensor step with no
    Python-side checks: SparseAdamW's fast path, for tensor sets whose layers validated them when
    they were built, on one device, with no tensor written twice (the native kernels still check
    shapes and index ranges, and refuse aliasing)."""
    op = "sparse_adamw_multi_"
    if len(weights) == 0:
        return
    backend = _backend.select_backend(op, weights[0].device)
    last_backend[op] = backend
    steps = [float(step) for step in steps]
    scalars = dict(
        lr=float(lr),
        beta1=float(beta1),
        beta2=float(beta2),
        eps=float(eps),
        weight_decay=float(weight_decay),
        maximize=bool(maximize),
    )
    lists = (weights, indices, bases, deltas, grads, exp_avgs, exp_avg_sqs)
    if backend == "reference":
        reference.sparse_adamw_multi_(*lists, steps=steps, **scalars)
    elif backend == "triton":
        _triton(op)(*lists, steps=steps, **scalars)
    else:
        _native(op)(*lists, steps, *scalars.values())


_register_device_kernel("sparse_adamw_multi_", _sparse_adamw_multi_)
_lib.impl("sparse_adamw_multi_", reference.sparse_adamw_multi_, "CompositeExplicitAutograd")


@torch.library.register_fake(_qualname("sparse_adamw_multi_"), lib=_lib)
def _(
    weights,
    indices,
    bases,
    deltas,
    grads,
    exp_avgs,
    exp_avg_sqs,
    *,
    steps,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    maximize=False,
):
    lists = (weights, indices, bases, deltas, grads, exp_avgs, exp_avg_sqs)
    _checks.check_same_device(
        "sparse_adamw_multi_",
        **{
            f"{name}[{i}]": t
            for name, values in zip(_ADAMW_LIST_NAMES, lists, strict=True)
            for i, t in enumerate(values)
        },
    )
    return None


def _scatter_merge_(weight, index, base, delta, alpha=1.0):
    op = "scatter_merge_"
    _check_weight_side(op, weight, index, base)
    _check_compact(op, "delta", delta, index, (torch.float32, torch.float64))
    _checks.check_same_device(op, weight=weight, index=index, base=base, delta=delta)
    _checks.check_no_overlap(op, {"weight": weight}, {"index": index, "base": base, "delta": delta})
    _checks.check_finite(op, alpha=float(alpha))
    _checks.check_index(op, index, weight.numel())
    backend = _backend.select_backend(op, weight.device)
    last_backend[op] = backend
    if backend == "reference":
        reference.scatter_merge_(weight, index, base, delta, alpha)
    elif backend == "triton":
        _triton(op)(weight, index, base, delta, float(alpha))
    else:
        _native(op)(weight, index, base, delta, float(alpha))


_register_device_kernel("scatter_merge_", _scatter_merge_)
_lib.impl("scatter_merge_", reference.scatter_merge_, "CompositeExplicitAutograd")


@torch.library.register_fake(_qualname("scatter_merge_"), lib=_lib)
def _(weight, index, base, delta, alpha=1.0):
    _checks.check_same_device("scatter_merge_", weight=weight, index=index, base=base, delta=delta)
    return None


def _restore_(weight, index, base):
    op = "restore_"
    _check_weight_side(op, weight, index, base)
    _checks.check_same_device(op, weight=weight, index=index, base=base)
    _checks.check_no_overlap(op, {"weight": weight}, {"index": index, "base": base})
    _checks.check_index(op, index, weight.numel())
    backend = _backend.select_backend(op, weight.device)
    last_backend[op] = backend
    if backend == "reference":
        reference.restore_(weight, index, base)
    elif backend == "triton":
        _triton(op)(weight, index, base)
    else:
        _native(op)(weight, index, base)


_register_device_kernel("restore_", _restore_)
_lib.impl("restore_", reference.restore_, "CompositeExplicitAutograd")


@torch.library.register_fake(_qualname("restore_"), lib=_lib)
def _(weight, index, base):
    _checks.check_same_device("restore_", weight=weight, index=index, base=base)
    return None


# ---------------------------------------------------------------------------------------------
# Autograd ops: sparse_linear, sparse_conv2d
# ---------------------------------------------------------------------------------------------
def _check_sparse_layer(op, x, weight, bias, index, delta):
    _checks.check_tensor(op, "x", x, dtypes=_checks.FLOAT_DTYPES)
    _checks.check_tensor(op, "weight", weight, dtypes=_checks.WEIGHT_DTYPES)
    _checks.check_tensor(op, "index", index, dtypes=_checks.INDEX_DTYPES, dim=1)
    _checks.check_tensor(op, "delta", delta, dtypes=(torch.float32, torch.float64), dim=1)
    if delta.shape != index.shape:
        raise ValueError(
            f"sara_kernels.{op}: delta has shape {tuple(delta.shape)} but index has {tuple(index.shape)}"
        )
    if bias is not None:
        _checks.check_tensor(op, "bias", bias, dim=1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(
                f"sara_kernels.{op}: bias has {bias.shape[0]} entries but weight has {weight.shape[0]} outputs"
            )
    _checks.check_same_device(op, x=x, weight=weight, bias=bias, index=index, delta=delta)
    _checks.check_index(op, index, weight.numel())


def _sparse_linear(x, weight, bias, index, delta):
    op = "sparse_linear"
    _check_sparse_layer(op, x, weight, bias, index, delta)
    if weight.dim() != 2 or x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"sara_kernels.{op}: x {tuple(x.shape)} does not match weight {tuple(weight.shape)} ([out, in])"
        )
    return F.linear(x, weight, bias)


_lib.impl("sparse_linear", _sparse_linear, "CompositeExplicitAutograd")


@torch.library.register_fake(_qualname("sparse_linear"), lib=_lib)
def _(x, weight, bias, index, delta):
    _checks.check_same_device("sparse_linear", x=x, weight=weight, bias=bias, index=index, delta=delta)
    torch._check(x.shape[-1] == weight.shape[1])
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _setup_layer(op: str, ctx, inputs) -> None:
    x, weight, bias, index, delta = inputs[:5]
    if weight.requires_grad:
        raise RuntimeError(
            f"sara_kernels.{op}: weight requires grad, but this op never forms a dense weight gradient; "
            "freeze the weight (weight.requires_grad_(False)) and train delta"
        )
    need_x, _, need_bias, _, need_delta = ctx.needs_input_grad[:5]
    ctx.save_for_backward(x if need_delta else None, weight if need_x else None, index)
    ctx.x_shape = x.shape
    ctx.weight_shape = weight.shape
    ctx.delta_dtype = delta.dtype
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _linear_setup_context(ctx, inputs, output):
    _setup_layer("sparse_linear", ctx, inputs)


def _linear_backward(ctx, grad, checked=True):
    x, weight, index = ctx.saved_tensors
    need_x, _, need_bias, _, need_delta = ctx.needs_input_grad
    out_features, in_features = ctx.weight_shape
    grad_x = grad_bias = grad_delta = None
    if need_x:
        grad_x = torch.matmul(grad, weight.to(grad.dtype))
    if need_bias:
        grad_bias = grad.reshape(-1, out_features).sum(0).to(ctx.bias_dtype)
    if need_delta:
        # ``checked``: through the registered op (traceable, inputs checked); else straight to the
        # backend, for the layers' eager path whose shapes and index are known good.
        sampled = (
            torch.ops.sara_kernels.sampled_weight_grad_linear if checked else _run_sampled_weight_grad_linear
        )
        grad_delta = sampled(grad, x, index, out_features, in_features).to(ctx.delta_dtype)
    return grad_x, None, grad_bias, None, grad_delta


torch.library.register_autograd(
    _qualname("sparse_linear"), _linear_backward, setup_context=_linear_setup_context, lib=_lib
)


def _sparse_conv2d(x, weight, bias, index, delta, stride, padding, dilation, groups):
    op = "sparse_conv2d"
    _check_sparse_layer(op, x, weight, bias, index, delta)
    if weight.dim() != 4:
        raise ValueError(f"sara_kernels.{op}: weight must be 4-D, got shape {tuple(weight.shape)}")
    _checks.check_conv2d(op, x, weight.shape, stride, padding, dilation, groups)
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


_lib.impl("sparse_conv2d", _sparse_conv2d, "CompositeExplicitAutograd")


@torch.library.register_fake(_qualname("sparse_conv2d"), lib=_lib)
def _(x, weight, bias, index, delta, stride, padding, dilation, groups):
    _checks.check_same_device("sparse_conv2d", x=x, weight=weight, bias=bias, index=index, delta=delta)
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


def _conv_setup_context(ctx, inputs, output):
    _setup_layer("sparse_conv2d", ctx, inputs)
    ctx.conv_args = tuple(inputs[5:9])


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _sampled_conv(dims: int, checked: bool):
    """The sampled weight gradient of a ``dims``-D convolution (same arguments as conv2d's)."""
    if dims == 2:
        return _conv2d_sampler(checked)
    composite = sampled_weight_grad_conv1d if dims == 1 else sampled_weight_grad_conv3d
    return lambda *args: composite(*args, checked=checked)


def _conv_backward(ctx, grad, checked=True):
    """Backward of a 1-, 2- or 3-D sparse convolution (the dims follow the weight)."""
    x, weight, index = ctx.saved_tensors
    need_x, _, need_bias, _, need_delta = ctx.needs_input_grad[:5]
    stride, padding, dilation, groups = ctx.conv_args
    dims = len(ctx.weight_shape) - 2
    grad_x = grad_bias = grad_delta = None
    if need_x:
        # The input gradient as a transposed convolution: convolution_backward would also allocate
        # a dense (zero) weight-gradient tensor even when it is not asked for.
        output_padding = [
            ctx.x_shape[2 + i]
            - (
                (grad.shape[2 + i] - 1) * stride[i]
                - 2 * padding[i]
                + dilation[i] * (ctx.weight_shape[2 + i] - 1)
                + 1
            )
            for i in range(dims)
        ]
        grad_x = _CONV_TRANSPOSE[dims](
            grad, weight.to(grad.dtype), None, stride, padding, output_padding, groups, dilation
        )
    if need_bias:
        grad_bias = grad.sum((0, *range(2, 2 + dims))).to(ctx.bias_dtype)
    if need_delta:
        sampled = _sampled_conv(dims, checked)
        grad_delta = sampled(grad, x, index, list(ctx.weight_shape), stride, padding, dilation, groups).to(
            ctx.delta_dtype
        )
    return grad_x, None, grad_bias, None, grad_delta, None, None, None, None


torch.library.register_autograd(
    _qualname("sparse_conv2d"), _conv_backward, setup_context=_conv_setup_context, lib=_lib
)


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


_register_autocast("sparse_linear", (0, 1, 2))
_register_autocast("sparse_conv2d", (0, 1, 2))


# ---------------------------------------------------------------------------------------------
# Eager fast path for the layers
# ---------------------------------------------------------------------------------------------
# The registered ops go through torch.library's Python autograd wrapper, the dispatcher and the
# input checks on every call: ~250 us per forward on a 64x64 Linear (vs 34 us for F.linear, one
# thread, measured with a timing loop). The sparse-delta layers validated their index and shapes
# once at construction, so in eager mode they call these autograd Functions instead, with the same
# setup/backward code; under torch.compile they call the registered ops (traceable, no graph break).
def autocast_args(tensors: tuple, device_type: str) -> tuple:
    """Cast floating tensors (not fp64) to the autocast dtype when autocast is on, as nn.Linear's
    own computation would be."""
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(
        t.to(dtype)
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype not in (dtype, torch.float64)
        else t
        for t in tensors
    )


class SparseLinearFunction(torch.autograd.Function):
    """sparse_linear without the op dispatcher (inputs already validated by the layer)."""

    @staticmethod
    def forward(ctx, x, weight, bias, index, delta):
        _setup_layer("sparse_linear", ctx, (x, weight, bias, index, delta))
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        return _linear_backward(ctx, grad, checked=False)


class SparseConvFunction(torch.autograd.Function):
    """sparse_conv2d without the op dispatcher (inputs already validated by the layer), and its 1-D
    and 3-D counterparts: the forward is ``F.conv1d/2d/3d`` (by the weight's dims) on the merged
    weight, the delta's gradient the sampled weight gradient of that convolution."""

    @staticmethod
    def forward(ctx, x, weight, bias, index, delta, stride, padding, dilation, groups):
        inputs = (x, weight, bias, index, delta, stride, padding, dilation, groups)
        dims = weight.dim() - 2
        _setup_layer(f"sparse_conv{dims}d", ctx, inputs)
        ctx.conv_args = (stride, padding, dilation, groups)
        return _CONV[dims](x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        return _conv_backward(ctx, grad, checked=False)


SparseConv2dFunction = SparseConvFunction


class SparseEmbeddingFunction(torch.autograd.Function):
    """``F.embedding`` on the merged weight; the delta's gradient is the embedding weight gradient
    at the selected entries (:func:`sampled_weight_grad_embedding`, never a dense ``[V, D]``)."""

    @staticmethod
    def forward(ctx, indices, weight, index, delta, padding_idx, scale_grad_by_freq):
        if weight.requires_grad:
            raise RuntimeError(
                "sara_kernels.sparse_embedding: weight requires grad, but this op never forms a dense "
                "weight gradient; freeze the weight (weight.requires_grad_(False)) and train delta"
            )
        ctx.save_for_backward(indices, index)
        ctx.weight_shape = weight.shape
        ctx.delta_dtype = delta.dtype
        ctx.padding_idx, ctx.scale_grad_by_freq = padding_idx, scale_grad_by_freq
        return F.embedding(indices, weight, padding_idx, None, 2.0, scale_grad_by_freq, False)

    @staticmethod
    def backward(ctx, grad):
        grad_delta = None
        if ctx.needs_input_grad[3]:
            indices, index = ctx.saved_tensors
            num_embeddings, dim = ctx.weight_shape
            grad_delta = sampled_weight_grad_embedding(
                grad,
                indices,
                index,
                num_embeddings,
                dim,
                ctx.padding_idx,
                ctx.scale_grad_by_freq,
                checked=False,
            ).to(ctx.delta_dtype)
        return None, None, None, grad_delta, None, None
