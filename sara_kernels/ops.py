"""Typed Python wrappers of the ``torch.ops.sara_kernels`` ops.

Shapes use ``N`` for tokens (all leading dims flattened), ``k`` for selected entries. Indices are
flat positions in ``weight.view(-1)``, int32 (int64 only for weights of 2**31 entries or more),
sorted strictly increasing. Every op runs on the backend chosen by :func:`sara_kernels.backends`
rules (forced with :func:`sara_kernels.use_backend` or ``SARA_KERNELS_BACKEND``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sara_kernels import _autograd, _ops  # noqa: F401  (_ops registers the ops)
from sara_kernels._checks import AdamWHyper

_ops_ns = torch.ops.sara_kernels


def select_small_magnitude(
    weight: torch.Tensor, threshold: float | None = None, k: int | None = None
) -> torch.Tensor:
    """Select the entries to train.

    Args:
        weight: any shape, fp32/bf16/fp16/fp64.
        threshold: select every entry with ``|w| < threshold`` (the paper's rule, e.g. 2e-3).
        k: or select the ``k`` entries of smallest ``|w|``, ties broken by the smaller index.

    Returns:
        int32 ``[k]`` sorted flat indices (int64 when ``weight.numel() >= 2**31``).
    """
    return _ops_ns.select_small_magnitude(weight, threshold, k)


def sampled_weight_grad_linear(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    index: torch.Tensor,
    out_features: int,
    in_features: int,
) -> torch.Tensor:
    """The gradient of a Linear weight at the selected entries only.

    Args:
        grad_out: ``[..., out]`` gradient of the layer output.
        x: ``[..., in]`` layer input (same leading dims and dtype as ``grad_out``).
        index: ``[k]`` flat indices into the ``[out, in]`` weight.

    Returns:
        ``[k]``: entry ``j`` is ``sum_n grad_out[n, r_j] * x[n, c_j]`` with
        ``(r_j, c_j) = divmod(index[j], in_features)``; fp32 (fp64 for fp64 inputs), accumulated
        in fp32 for fp16/bf16 inputs.
    """
    return _ops_ns.sampled_weight_grad_linear(grad_out, x, index, out_features, in_features)


def _ints(op: str, name: str, value: int | Sequence[int], dims: int) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value] * dims
    value = list(value)
    if len(value) == 1:
        value = value * dims
    if len(value) != dims or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ValueError(f"sara_kernels.{op}: {name} must be an int or {dims} ints, got {value}")
    return value


def _geometry(op: str, dims: int, stride, padding, dilation) -> list[list[int]]:
    return [
        _ints(op, n, v, dims) for n, v in (("stride", stride), ("padding", padding), ("dilation", dilation))
    ]


def _sampled_conv(dims: int, doc: str):
    """The public sampled gradient of a ``dims``-D convolution: the conv2d op, or its exact
    reduction to it for 1-D and 3-D (one signature for the three)."""
    op = f"sampled_weight_grad_conv{dims}d"
    run = {1: _autograd.sampled_weight_grad_conv1d, 2: _ops_ns.sampled_weight_grad_conv2d}.get(
        dims, _autograd.sampled_weight_grad_conv3d
    )

    def sampled_weight_grad_conv(
        grad_out: torch.Tensor,
        x: torch.Tensor,
        index: torch.Tensor,
        weight_shape: Sequence[int],
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] = 0,
        dilation: int | Sequence[int] = 1,
        groups: int = 1,
    ) -> torch.Tensor:
        geometry = _geometry(op, dims, stride, padding, dilation)
        return run(grad_out, x, index, [int(s) for s in weight_shape], *geometry, int(groups))

    sampled_weight_grad_conv.__name__ = sampled_weight_grad_conv.__qualname__ = op
    sampled_weight_grad_conv.__doc__ = doc
    return sampled_weight_grad_conv


sampled_weight_grad_conv2d = _sampled_conv(
    2,
    """The gradient of a Conv2d weight at the selected entries only.

    Args:
        grad_out: ``[N, out, P, Q]`` gradient of the convolution output.
        x: ``[N, in, H, W]`` convolution input.
        index: ``[k]`` flat indices into the ``[out, in/groups, kh, kw]`` weight.
        weight_shape, stride, padding, dilation, groups: as for ``torch.nn.functional.conv2d``.

    Returns:
        ``[k]`` fp32 (fp64 for fp64 inputs): ``conv2d_weight_grad.view(-1)[index]``.
    """,
)
sampled_weight_grad_conv1d = _sampled_conv(
    1,
    """The gradient of a Conv1d weight at the selected entries only (the conv2d op, height 1).

    Args:
        grad_out: ``[N, out, L_out]``; x: ``[N, in, L]``; index: ``[k]`` flat indices into the
            ``[out, in/groups, K]`` weight; the rest as for ``torch.nn.functional.conv1d``
            (numeric padding).

    Returns:
        ``[k]`` fp32 (fp64 for fp64 inputs).
    """,
)
sampled_weight_grad_conv3d = _sampled_conv(
    3,
    """The gradient of a Conv3d weight at the selected entries only: per temporal tap, the conv2d
    op over the frames that tap reads, batched over (N, T_out).

    Args:
        grad_out: ``[N, out, T_out, P, Q]``; x: ``[N, in, T, H, W]``; index: ``[k]`` flat indices
            into the ``[out, in/groups, kT, kH, kW]`` weight; the rest as for
            ``torch.nn.functional.conv3d`` (numeric padding).

    Returns:
        ``[k]`` fp32 (fp64 for fp64 inputs).
    """,
)


def sampled_weight_grad_embedding(
    grad_out: torch.Tensor,
    indices: torch.Tensor,
    index: torch.Tensor,
    num_embeddings: int,
    embedding_dim: int,
    padding_idx: int | None = None,
    scale_grad_by_freq: bool = False,
) -> torch.Tensor:
    """The gradient of an Embedding weight at the selected entries only, without a dense ``[V, D]``.

    Args:
        grad_out: ``[..., D]`` gradient of the lookup; indices: ``[...]`` the token ids looked up;
            index: ``[k]`` flat indices into the ``[V, D]`` weight; padding_idx, scale_grad_by_freq:
            as for ``nn.Embedding`` (the padding row gets 0; counts divide the gradient).

    Returns:
        ``[k]`` fp32 (fp64 for fp64 grad_out).
    """
    if padding_idx is not None and padding_idx < 0:
        padding_idx += num_embeddings
    return _autograd.sampled_weight_grad_embedding(
        grad_out,
        indices,
        index,
        int(num_embeddings),
        int(embedding_dim),
        padding_idx,
        bool(scale_grad_by_freq),
    )


def sparse_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    index: torch.Tensor,
    delta: torch.Tensor,
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` whose backward gives the gradient of ``delta``.

    ``weight`` must already hold the merged value ``base + delta`` at ``index`` (the modules keep
    that invariant); ``delta`` enters only through it. Backward returns ``grad_x``, ``grad_bias``
    and ``grad_delta = sampled_weight_grad_linear(grad_out, x, index)``; no dense weight gradient
    is formed, and ``weight`` must not require grad.

    Args:
        x: ``[..., in]``; weight: ``[out, in]`` (frozen); bias: ``[out]`` or None;
        index: ``[k]``; delta: ``[k]`` fp32 (fp64 for gradcheck).
    """
    return _ops_ns.sparse_linear(x, weight, bias, index, delta)


def sparse_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    index: torch.Tensor,
    delta: torch.Tensor,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
) -> torch.Tensor:
    """``F.conv2d`` whose backward gives the gradient of ``delta`` (see :func:`sparse_linear`).

    Args:
        x: ``[N, in, H, W]``; weight: ``[out, in/groups, kh, kw]`` (frozen, merged);
        bias: ``[out]`` or None; index: ``[k]``; delta: ``[k]``.
    """
    geometry = _geometry("sparse_conv2d", 2, stride, padding, dilation)
    return _ops_ns.sparse_conv2d(x, weight, bias, index, delta, *geometry, int(groups))


def sparse_adamw_(
    weight: torch.Tensor,
    index: torch.Tensor,
    base: torch.Tensor,
    delta: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    step: float,
    lr: float, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 1e-2,
    maximize: bool = False,
) -> None:  # fmt: skip
    """One fused AdamW step on the compact vectors, then write the merged value into ``weight``.

    Same arithmetic as ``torch.optim.AdamW`` (bias correction; decoupled weight decay acting on
    ``delta``, i.e. toward the pre-trained value), followed by
    ``weight.view(-1)[index] = (base.float() + delta).to(weight.dtype)``.

    Args:
        weight: dense, contiguous, fp32/bf16/fp16, updated in place at ``index``.
        index: ``[k]``; base: ``[k]`` in ``weight.dtype`` (the pre-trained values).
        delta, grad, exp_avg, exp_avg_sq: ``[k]`` fp32; delta and the moments updated in place.
        step: the step number, counted from 1 (after incrementing).
    """
    hyper = AdamWHyper(lr, beta1, beta2, eps, weight_decay, maximize).scalars()
    _ops_ns.sparse_adamw_(weight, index, base, delta, grad, exp_avg, exp_avg_sq, step=float(step), **hyper)


def sparse_adamw_multi_(
    weights: Sequence[torch.Tensor],
    indices: Sequence[torch.Tensor],
    bases: Sequence[torch.Tensor],
    deltas: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    *,
    steps: Sequence[float],
    lr: float, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 1e-2,
    maximize: bool = False,
) -> None:  # fmt: skip
    """:func:`sparse_adamw_` over many tensor sets (one per layer) in one call.

    Set ``i`` is ``(weights[i], indices[i], bases[i], deltas[i], grads[i], exp_avgs[i],
    exp_avg_sqs[i])`` at step ``steps[i]``; each gets exactly what :func:`sparse_adamw_` would
    compute. The native CPU kernel runs all sets' entries as one parallel range and the CUDA kernel
    packs up to 40 sets into a launch (a UNet's 282 weights: 8 launches instead of 282); the Triton
    and reference backends run the sets one by one. All tensors live on one device, and no tensor
    that the step writes (weight, delta, moments) may appear in two sets.
    """
    if len(weights) == 0 and all(
        len(x) == 0 for x in (indices, bases, deltas, grads, exp_avgs, exp_avg_sqs, steps)
    ):
        return  # nothing to do (and no tensor to dispatch on)
    lists = [list(x) for x in (weights, indices, bases, deltas, grads, exp_avgs, exp_avg_sqs)]
    hyper = AdamWHyper(lr, beta1, beta2, eps, weight_decay, maximize).scalars()
    _ops_ns.sparse_adamw_multi_(*lists, steps=[float(step) for step in steps], **hyper)


def scatter_merge_(
    weight: torch.Tensor,
    index: torch.Tensor,
    base: torch.Tensor,
    delta: torch.Tensor,
    alpha: float = 1.0,
) -> None:
    """``weight.view(-1)[index] = (base + alpha * delta).to(weight.dtype)``, computed in fp32
    (fp64 when ``delta`` or ``weight`` is fp64)."""
    _ops_ns.scatter_merge_(weight, index, base, delta, float(alpha))


def restore_(weight: torch.Tensor, index: torch.Tensor, base: torch.Tensor) -> None:
    """``weight.view(-1)[index] = base``: undo a merge exactly."""
    _ops_ns.restore_(weight, index, base)


__all__ = [
    "restore_",
    "sampled_weight_grad_conv1d",
    "sampled_weight_grad_conv2d",
    "sampled_weight_grad_conv3d",
    "sampled_weight_grad_embedding",
    "sampled_weight_grad_linear",
    "scatter_merge_",
    "select_small_magnitude",
    "sparse_adamw_",
    "sparse_adamw_multi_",
    "sparse_conv2d",
    "sparse_linear",
]
