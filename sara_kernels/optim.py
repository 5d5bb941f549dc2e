"""``SparseAdamW``: AdamW over the k-sized deltas with the fused op (update + weight write-back).

State per delta: ``step`` (a Python float; a tensor from a checkpoint is accepted), ``exp_avg`` and
``exp_avg_sq`` (fp32, k entries). The arithmetic is torch.optim.AdamW's (bias correction;
decoupled weight decay, which here pulls the delta toward 0, i.e. the weight toward its
pre-trained value). Parameters that are not sparse deltas (a bias or norm layer kept trainable)
get the same AdamW arithmetic without the write-back.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from sara_kernels import _checks, _ops, reference  # noqa: F401  (_ops registers the ops)
from sara_kernels.nn import layer_of, mark_merged


def paper_learning_rate(threshold: float) -> float:
    """The SaRA paper's learning-rate rule (Eq. 12): ``lr = 1e-3 * exp(-350 * threshold)``.

    Example: ``paper_learning_rate(2e-3) == 4.97e-4``.
    """
    if not (isinstance(threshold, (int, float)) and threshold > 0 and math.isfinite(threshold)):
        raise ValueError(f"paper_learning_rate: threshold must be a positive number, got {threshold!r}")
    return 1e-3 * math.exp(-350.0 * threshold)


class SparseAdamW(torch.optim.Optimizer):
    """AdamW for sparse deltas: one fused kernel updates delta and its moments and writes
    ``base + delta`` into the layer's frozen weight.

    Args:
        params: the deltas (``sara_kernels.sparse_parameters(model)``) or param groups; other
            trainable tensors are allowed (plain AdamW on them).
        lr, betas, eps, weight_decay, maximize: as ``torch.optim.AdamW`` (weight_decay default 1e-2).
        foreach: ``None``/``True`` (default) updates every layer of a device in one call
            (:func:`sara_kernels.ops.sparse_adamw_multi_`: a few kernel launches per step instead of
            one per layer); ``False`` calls :func:`sara_kernels.ops.sparse_adamw_` once per layer.
            Both give the same numbers.

    Works with param groups, LR schedulers, ``state_dict()``/``load_state_dict()`` (a resumed run
    follows the same trajectory bit for bit) and ``zero_grad(set_to_none=True)``.
    """

    #: The fused step writes the merged weight (the global post-step hook in sara_kernels.nn then has
    #: nothing to merge).
    _sara_kernels_writes_back = True

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
    ):
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise ValueError(f"SparseAdamW: betas must be a pair of numbers, got {betas!r}")
        _checks.AdamWHyper(lr, betas[0], betas[1], eps, weight_decay).check("SparseAdamW")
        if foreach not in (None, True, False):
            raise ValueError(f"SparseAdamW: foreach must be None, True or False, got {foreach!r}")
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, maximize=maximize, foreach=foreach
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.dtype != torch.float32:
                    raise TypeError(
                        f"SparseAdamW: parameters must be fp32 (sparse deltas are); got {p.dtype} "
                        f"for a parameter of shape {tuple(p.shape)}"
                    )

    def _init_state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if len(state) == 0:
            state["step"] = 0.0
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for i, group in enumerate(self.param_groups):
            beta1, beta2 = group["betas"]
            # Read from the group on every step (a scheduler or the user may have changed them):
            # a NaN or out-of-range value is an error naming the group, never a NaN weight.
            adamw = _checks.AdamWHyper(
                group["lr"], beta1, beta2, group["eps"], group["weight_decay"], group["maximize"]
            )
            adamw.check(f"SparseAdamW (param_groups[{i}])")
            hyper = adamw.scalars()
            fused = []  # (delta, its layer, grad, state): the fused update + write-back
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if grad.is_sparse:
                    raise RuntimeError("SparseAdamW: sparse (COO) gradients are not supported")
                state = self._init_state(p)
                layer = layer_of(p)
                if (
                    layer is not None
                    and not getattr(layer, "_sara_merges_locally", False)
                    and p.dim() == 1
                    and grad.dtype == torch.float32
                    and grad.shape == p.shape
                ):
                    fused.append((p, layer, grad, state))
                else:
                    step = state["step"] = float(state["step"]) + 1.0
                    reference.adamw_update_(
                        p, grad, state["exp_avg"], state["exp_avg_sq"], step=step, **hyper
                    )
                    if layer is not None:
                        layer.merge_()  # e.g. a weight sharded by FSDP2: the layer merges its shard
            if fused:
                self._fused_step(fused, hyper, group.get("foreach"))
        return loss

    def _fused_step(self, fused: list, hyper: dict, foreach: bool | None) -> None:
        # The fused ops (their kernels check every set: on the CPU and CUDA in C++, in one call).
        sets = []
        for p, layer, grad, state in fused:
            # A replaced or resized weight is an error, never a stray write; a weight left unmerged
            # (unmerge_, a write the layer has not merged yet) is merged first: the fused step
            # writes only the trainable slots.
            layer._maybe_merge()
            # The step count is a Python float here (a tensor increment per layer costs more than
            # the update of a small layer); a tensor from an older checkpoint converts on its first step.
            step = state["step"] = float(state["step"]) + 1.0
            tensors = (
                layer.sparse_index,
                layer.sparse_base,
                p,
                grad.contiguous(),
                state["exp_avg"],
                state["exp_avg_sq"],
            )
            frozen = layer.frozen_count
            if frozen:
                # Entries frozen by re-selection sit in the last slots: step only the first k (their
                # delta, gradient and moments stay 0, and the weight keeps their merged value).
                k = p.numel() - frozen
                tensors = tuple(t[:k] for t in tensors)
            sets.append((layer.weight, *tensors, step))
        one_by_one = sets
        if foreach is not False:
            # One call for all the sets of a device (a few kernel launches on CUDA, one parallel
            # range on the CPU), unless two layers share a weight (tied weights run one by one).
            by_device: dict = {}
            for entry in sets:
                by_device.setdefault(entry[0].device, []).append(entry)
            one_by_one = []
            for entries in by_device.values():
                if len({entry[0].data_ptr() for entry in entries}) == len(entries):
                    columns = list(zip(*entries, strict=True))
                    _adamw_multi(*columns[:7], steps=columns[7], **hyper)
                else:
                    one_by_one.extend(entries)
        for weight, index, base, delta, grad, exp_avg, exp_avg_sq, step in one_by_one:
            _adamw(weight, index, base, delta, grad, exp_avg, exp_avg_sq, step=step, **hyper)
        for p, _, _, _ in fused:
            mark_merged(p)  # the weight holds base + delta: no re-merge before the forward


_adamw = torch.ops.sara_kernels.sparse_adamw_.default
_adamw_multi = torch.ops.sara_kernels.sparse_adamw_multi_.default

__all__ = ["SparseAdamW", "paper_learning_rate"]
