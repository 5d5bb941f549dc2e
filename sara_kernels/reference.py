"""Pure-PyTorch implementations of every op: the default kernel on any device and the test oracle.

These favour obvious correctness over memory: the sampled weight gradients form the dense weight
gradient (in fp32, or fp64 for fp64 inputs) and gather from it. The native and Triton backends
compute the same numbers without the dense gradient.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from sara_kernels._checks import AdamWHyper, check_range


def accumulate_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp32 accumulation for fp32/fp16/bf16 inputs; fp64 when any input is fp64."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def index_dtype_for(numel: int) -> torch.dtype:
    return torch.int64 if numel >= 2**31 else torch.int32


def select_small_magnitude(
    weight: torch.Tensor, threshold: float | None = None, k: int | None = None
) -> torch.Tensor:
    """Sorted flat indices of |w| < threshold, or of the k smallest |w| (ties broken by index)."""
    flat = weight.detach().reshape(-1)
    magnitude = flat.abs()
    if threshold is not None:
        index = torch.nonzero(magnitude < threshold).flatten()
    else:
        # A stable sort keeps equal magnitudes in index order, so ties go to the smaller index.
        order = torch.sort(magnitude, stable=True).indices[:k]
        index = torch.sort(order).values
    return index.to(index_dtype_for(flat.numel()))


def sampled_weight_grad_linear(
    grad_out: torch.Tensor, x: torch.Tensor, index: torch.Tensor, out_features: int, in_features: int
) -> torch.Tensor:
    """grad_out: [..., out], x: [..., in], index: [k] -> [k]: (grad_out^T x).view(-1)[index]."""
    check_range("sampled_weight_grad_linear", index, out_features * in_features)
    acc = accumulate_dtype(grad_out, x)
    g = grad_out.reshape(-1, out_features).to(acc)
    xx = x.reshape(-1, in_features).to(acc)
    dense = g.t() @ xx  # [out, in]
    return dense.reshape(-1)[index.long()]


def sampled_weight_grad_conv_nd(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    index: torch.Tensor,
    weight_shape: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> torch.Tensor:
    """grad_out: [N, O, *out], x: [N, C, *in] (1, 2 or 3 spatial dims) -> [k]: the dense weight
    gradient (``torch.nn.grad.conv{1,2,3}d_weight``) at index."""
    dims = len(weight_shape) - 2
    check_range(f"sampled_weight_grad_conv{dims}d", index, math.prod(int(s) for s in weight_shape))
    acc = accumulate_dtype(grad_out, x)
    dense_weight_grad = {1: torch.nn.grad.conv1d_weight, 2: torch.nn.grad.conv2d_weight}.get(
        dims, torch.nn.grad.conv3d_weight
    )
    dense = dense_weight_grad(
        x.to(acc), list(weight_shape), grad_out.to(acc), stride, padding, dilation, groups
    )
    return dense.reshape(-1)[index.long()]


#: grad_out: [N, O, P, Q], x: [N, C, H, W] -> [k]: the conv2d weight gradient at index.
sampled_weight_grad_conv2d = sampled_weight_grad_conv_nd


def sampled_weight_grad_embedding(
    grad_out, indices, index, num_embeddings, embedding_dim, padding_idx, scale
):
    """grad_out: [..., D], indices: [...] -> [k]: torch's dense embedding weight gradient at index
    (``scale``: ``scale_grad_by_freq``)."""
    check_range("sampled_weight_grad_embedding", index, num_embeddings * embedding_dim)
    acc = accumulate_dtype(grad_out)
    dense = torch.ops.aten.embedding_dense_backward(
        grad_out.to(acc).reshape(-1, embedding_dim),
        indices.reshape(-1).long(),
        num_embeddings,
        -1 if padding_idx is None else padding_idx,
        scale,
    )
    return dense.reshape(-1)[index.long()]


def _merged_values(base: torch.Tensor, delta: torch.Tensor, dtype: torch.dtype, alpha: float = 1.0):
    acc = accumulate_dtype(base, delta)
    d = delta.to(acc)
    if alpha != 1.0:
        d = d * alpha
    return (base.to(acc) + d).to(dtype)


def sparse_adamw_(weight, index, base, delta, grad, exp_avg, exp_avg_sq, *, step: float, **hyper) -> None:
    """One AdamW step on the compact vectors, with torch.optim.AdamW's arithmetic, then write back
    (``hyper``: the :class:`~sara_kernels._checks.AdamWHyper` fields)."""
    check_range("sparse_adamw_", index, weight.numel())
    adamw_update_(delta, grad, exp_avg, exp_avg_sq, step=step, **hyper)
    weight.view(-1)[index.long()] = _merged_values(base, delta, weight.dtype)


def sparse_adamw_multi_(
    weights, indices, bases, deltas, grads, exp_avgs, exp_avg_sqs, *, steps, **hyper
) -> None:
    """:func:`sparse_adamw_` on each tensor set in turn, set ``i`` at step ``steps[i]`` (every
    set's index range is checked before any set is written)."""
    for i, (weight, index) in enumerate(zip(weights, indices, strict=True)):
        check_range("sparse_adamw_multi_", index, weight.numel(), name=f"indices[{i}]")
    for weight, index, base, delta, grad, exp_avg, exp_avg_sq, step in zip(
        weights, indices, bases, deltas, grads, exp_avgs, exp_avg_sqs, steps, strict=True
    ):
        sparse_adamw_(weight, index, base, delta, grad, exp_avg, exp_avg_sq, step=step, **hyper)


def adamw_update_(param, grad, exp_avg, exp_avg_sq, *, step: float, **hyper) -> None:
    """torch.optim.AdamW's single-tensor arithmetic on any tensor (bias correction, decoupled decay)."""
    lr, beta1, beta2, eps, weight_decay, maximize = AdamWHyper(**hyper)
    if maximize:
        grad = -grad
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    step_size = lr / (1 - beta1**step)
    denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)


def scatter_merge_(
    weight: torch.Tensor, index: torch.Tensor, base: torch.Tensor, delta: torch.Tensor, alpha: float = 1.0
) -> None:
    """weight.view(-1)[index] = base + alpha * delta (computed in fp32, or fp64 for fp64 inputs)."""
    check_range("scatter_merge_", index, weight.numel())
    weight.view(-1)[index.long()] = _merged_values(base, delta, weight.dtype, alpha)


def restore_(weight: torch.Tensor, index: torch.Tensor, base: torch.Tensor) -> None:
    """weight.view(-1)[index] = base."""
    check_range("restore_", index, weight.numel())
    weight.view(-1)[index.long()] = base.to(weight.dtype)
