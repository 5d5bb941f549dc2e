"""The Python autograd formulas.

* The layer ops' backward and forward without the compiled extension (which registers the same
  formulas in C++, ``csrc/autograd.cpp``): :mod:`sara_kernels._ops` registers them then.
* The Conv1d, Conv3d and Embedding layers, which have no op of their own: their autograd Functions
  (the same eagerly and under torch.compile) and their sampled weight gradients, exact reductions
  to the conv2d op (Conv1d, Conv3d per temporal tap) or compositions of torch ops (Embedding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sara_kernels import _checks, reference


def _conv2d_sampler(checked: bool):
    """The conv2d sampled gradient op (the native kernels check their inputs in any case)."""
    return torch.ops.sara_kernels.sampled_weight_grad_conv2d.default


def sampled_weight_grad_conv1d(
    grad_out, x, index, weight_shape, stride, padding, dilation, groups, checked: bool = True
):
    """grad_out: [N, O, L_out], x: [N, C, L], index: [k] into the [O, C/g, K] weight -> [k].

    A Conv1d is a Conv2d of height 1: the inputs gain a unit height dim, the weight is
    ``[O, C/g, 1, K]`` (the same flat index), and the conv2d op computes the entries."""
    if checked:
        _checks.check_conv_nd(
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
        _checks.check_conv_nd(op, 3, grad_out, x, index, weight_shape, stride, padding, dilation, groups)
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


def sparse_linear(x, weight, bias, index, delta):
    op = "sparse_linear"
    _checks.check_sparse_layer(op, x, weight, bias, index, delta)
    if weight.dim() != 2 or x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"sara_kernels.{op}: x {tuple(x.shape)} does not match weight {tuple(weight.shape)} ([out, in])"
        )
    return F.linear(x, weight, bias)


def _setup_layer(op: str, ctx, inputs) -> None:
    x, weight, bias, index, delta = inputs[:5]
    if weight.requires_grad:
        raise RuntimeError(
            f"sara_kernels.{op}: weight requires grad, but this op never forms a dense weight gradient; "
            "freeze the weight (weight.requires_grad_(False)) and train delta"
        )
    need_x, _, need_bias, _, need_delta = ctx.needs_input_grad[:5]
    # delta is read only by a create_graph backward (_weight_of_delta).
    ctx.save_for_backward(
        x if need_delta else None, weight if need_x else None, index, delta if need_delta else None
    )
    ctx.x_shape = x.shape
    ctx.weight_shape = weight.shape
    ctx.delta_dtype = delta.dtype
    ctx.bias_dtype = bias.dtype if bias is not None else None


def linear_setup_context(ctx, inputs, output):
    _setup_layer("sparse_linear", ctx, inputs)


def _weight_of_delta(weight, index, delta):
    """The weight as a function of delta, values unchanged (``weight + scatter(delta - delta)``):
    under create_graph, a gradient built from it depends on delta as the merged weight does."""
    if delta is None or not delta.requires_grad:
        return weight
    flat = weight.detach().reshape(-1).index_add(0, index.long(), (delta - delta.detach()).to(weight.dtype))
    return flat.view(weight.shape)


def linear_backward(ctx, grad):
    x, weight, index, delta = ctx.saved_tensors
    need_x, _, need_bias, _, need_delta = ctx.needs_input_grad
    out_features, in_features = ctx.weight_shape
    # Under create_graph the gradients come from differentiable dense ops (exact higher-order
    # gradients; O(weight) memory on this path only), else from the sampled kernel.
    differentiable = torch.is_grad_enabled()
    grad_x = grad_bias = grad_delta = None
    if need_x:
        w = _weight_of_delta(weight, index, delta) if differentiable else weight
        grad_x = torch.matmul(grad, w.to(grad.dtype))
    if need_bias:
        grad_bias = grad.reshape(-1, out_features).sum(0).to(ctx.bias_dtype)
    if need_delta and differentiable:
        acc = reference.accumulate_dtype(grad, x)
        dense = grad.reshape(-1, out_features).to(acc).t() @ x.reshape(-1, in_features).to(acc)
        grad_delta = dense.reshape(-1)[index.long()].to(ctx.delta_dtype)
    elif need_delta:
        grad_delta = torch.ops.sara_kernels.sampled_weight_grad_linear.default(
            grad, x, index, out_features, in_features
        ).to(ctx.delta_dtype)
    return grad_x, None, grad_bias, None, grad_delta


def sparse_conv2d(x, weight, bias, index, delta, stride, padding, dilation, groups):
    op = "sparse_conv2d"
    _checks.check_sparse_layer(op, x, weight, bias, index, delta)
    if weight.dim() != 4:
        raise ValueError(f"sara_kernels.{op}: weight must be 4-D, got shape {tuple(weight.shape)}")
    _checks.check_conv2d(op, x, weight.shape, stride, padding, dilation, groups)
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


def conv_setup_context(ctx, inputs, output):
    _setup_layer("sparse_conv2d", ctx, inputs)
    ctx.conv_args = tuple(inputs[5:9])


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


_CONV_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _sampled_conv(dims: int):
    """The sampled weight gradient of a ``dims``-D convolution (same arguments as conv2d's)."""
    if dims == 2:
        return torch.ops.sara_kernels.sampled_weight_grad_conv2d.default
    composite = sampled_weight_grad_conv1d if dims == 1 else sampled_weight_grad_conv3d
    return lambda *args: composite(*args, checked=False)


def conv_backward(ctx, grad):
    """Backward of a 1-, 2- or 3-D sparse convolution (the dims follow the weight)."""
    x, weight, index, delta = ctx.saved_tensors
    need_x, _, need_bias, _, need_delta = ctx.needs_input_grad[:5]
    stride, padding, dilation, groups = ctx.conv_args
    dims = len(ctx.weight_shape) - 2
    differentiable = torch.is_grad_enabled()  # create_graph: exact higher-order gradients (dense)
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
        w = _weight_of_delta(weight, index, delta) if differentiable else weight
        grad_x = _CONV_TRANSPOSE[dims](
            grad, w.to(grad.dtype), None, stride, padding, output_padding, groups, dilation
        )
    if need_bias:
        grad_bias = grad.sum((0, *range(2, 2 + dims))).to(ctx.bias_dtype)
    if need_delta and differentiable:
        acc = reference.accumulate_dtype(grad, x)
        dense_weight_grad = {1: torch.nn.grad.conv1d_weight, 2: torch.nn.grad.conv2d_weight}.get(
            dims, torch.nn.grad.conv3d_weight
        )
        dense = dense_weight_grad(
            x.to(acc), list(ctx.weight_shape), grad.to(acc), stride, padding, dilation, groups
        )
        grad_delta = dense.reshape(-1)[index.long()].to(ctx.delta_dtype)
    elif need_delta:
        sampled = _sampled_conv(dims)
        grad_delta = sampled(grad, x, index, list(ctx.weight_shape), stride, padding, dilation, groups).to(
            ctx.delta_dtype
        )
    return grad_x, None, grad_bias, None, grad_delta, None, None, None, None


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


class SparseConvFunction(torch.autograd.Function):
    """The autograd of the 1-D and 3-D sparse convolutions (inputs validated by the layer), the same
    eagerly and under torch.compile: the forward is ``F.conv1d/3d`` on the merged weight, the
    delta's gradient the sampled weight gradient of that convolution (a reduction to the conv2d
    op). Without the compiled extension it also serves Conv2d."""

    @staticmethod
    def forward(ctx, x, weight, bias, index, delta, stride, padding, dilation, groups):
        inputs = (x, weight, bias, index, delta, stride, padding, dilation, groups)
        dims = weight.dim() - 2
        _setup_layer(f"sparse_conv{dims}d", ctx, inputs)
        ctx.conv_args = (stride, padding, dilation, groups)
        return _CONV[dims](x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        return conv_backward(ctx, grad)


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
