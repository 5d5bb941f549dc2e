"""Drop-in sparse-delta layers: ``SparseDeltaLinear(nn.Linear)`` and ``SparseDeltaConv2d(nn.Conv2d)``.

Data model of one adapted layer (k selected entries):

==================  ==========================  =====  ================================================
attribute           dtype                       size   role
==================  ==========================  =====  ================================================
``weight``          base dtype (fp32/bf16/fp16) dense  frozen; always holds ``base + delta`` at the index
``sparse_index``    int32 (int64 if >= 2**31)   k      sorted flat indices into ``weight.view(-1)``
``sparse_base``     base dtype                  k      pre-trained values at the index (exact unmerge)
``sparse_delta``    fp32                        k      the only trainable tensor; starts at 0
==================  ==========================  =====  ================================================

After progressive re-selection (:func:`sara_kernels.reselect_`) the entries that left the
trainable set keep their learned delta in three more buffers, ``sparse_frozen_index``,
``sparse_frozen_base`` and ``sparse_frozen_delta`` (empty until then); they stay merged in
``weight`` and are part of the adapter (:meth:`adapter_state`).

The forward is exactly the dense layer's (no ``W + scatter(delta)`` copy, no merged copy saved for
backward); the backward forms the weight gradient only at the k entries. The fused
:class:`~sara_kernels.optim.SparseAdamW` keeps ``weight`` merged as it steps; with any other
optimizer the layer notices that ``sparse_delta`` changed (its version counter, or a step of a
``torch.optim`` optimizer holding it: fused optimizer kernels do not bump the version counter)
and re-merges in O(k) before the next forward.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from sara_kernels import _checks, _ops, reference
from sara_kernels import ops as sk

#: Attribute set on a delta after its weight was merged: (delta._version) at that time.
_MERGED_VERSION = "_sara_kernels_merged_version"

#: Attribute on a delta: weakref to its layer, so the fused optimizer can write the merged weight in
#: the same kernel. Correctness never depends on it: a delta updated without write-back is
#: re-merged by its layer before the next forward.
_LAYER_REF = "_sara_kernels_layer"


def layer_of(delta: torch.Tensor):
    """The sparse-delta layer that owns ``delta`` (None if unknown, e.g. a deep copy before its
    first forward)."""
    ref = getattr(delta, _LAYER_REF, None)
    layer = ref() if ref is not None else None
    if layer is not None and layer.sparse_delta is delta:
        return layer
    return None


def _register_layer(layer) -> None:
    setattr(layer.sparse_delta, _LAYER_REF, weakref.ref(layer))


def mark_merged(delta: torch.Tensor) -> None:
    """Record that the layer's weight holds ``base + delta`` for the delta's current version."""
    setattr(delta, _MERGED_VERSION, delta._version)


def _invalidate_after_step(optimizer, args, kwargs) -> None:
    """Global ``torch.optim`` step post-hook: fused optimizer kernels (``AdamW(fused=True)``,
    ``SGD(fused=True)``) update parameters without bumping their version counter, so a delta that
    any optimizer stepped is re-merged before the next forward (O(k)); optimizers that write the
    merged weight themselves (:class:`~sara_kernels.optim.SparseAdamW`) opt out."""
    if getattr(optimizer, "_sara_kernels_writes_back", False):
        return
    for group in optimizer.param_groups:
        for p in group["params"]:
            if hasattr(p, _MERGED_VERSION):
                setattr(p, _MERGED_VERSION, None)


register_optimizer_step_post_hook(_invalidate_after_step)


class _SparseDeltaMixin:
    """Shared state and behaviour of the sparse-delta layers."""

    sparse_index: torch.Tensor
    sparse_base: torch.Tensor
    sparse_delta: nn.Parameter

    def _init_sparse(self, index: torch.Tensor | None, threshold: float | None, k: int | None) -> None:
        weight = self.weight
        name = type(self).__name__
        if weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(f"{name}: weight dtype {weight.dtype} is not supported; use fp32, bf16 or fp16")
        if not weight.is_contiguous():
            raise ValueError(f"{name}: weight must be contiguous (indices address weight.view(-1))")
        given = sum(v is not None for v in (index, threshold, k))
        if given > 1:
            raise ValueError(f"{name}: give at most one of index, threshold or k")
        with torch.no_grad():
            if index is None:
                if threshold is not None:
                    index = sk.select_small_magnitude(weight, threshold=threshold)
                elif k is not None:
                    index = sk.select_small_magnitude(weight, k=k)
                else:
                    index = torch.empty(
                        0, dtype=reference.index_dtype_for(weight.numel()), device=weight.device
                    )
            if not isinstance(index, torch.Tensor):
                index = torch.as_tensor(index)
            if index.dtype not in _checks.INDEX_DTYPES:
                raise TypeError(f"{name}: index has dtype {index.dtype}; expected int32 or int64")
            index = index.to(device=weight.device)
            if index.dtype == torch.int64 and weight.numel() < 2**31:
                index = index.to(torch.int32)  # int32 halves the index bytes; int64 only when needed
            index = index.contiguous()
            _checks.mark_index_checked(index, weight.numel())
            base = weight.detach().reshape(-1)[index.long()].clone()
        # weight keeps its storage (the dense module's, not a copy) but is frozen.
        weight.requires_grad_(False)
        self.register_buffer("sparse_index", index)
        self.register_buffer("sparse_base", base)
        self.sparse_delta = nn.Parameter(
            torch.zeros(index.numel(), dtype=torch.float32, device=weight.device)
        )
        self.register_buffer("sparse_frozen_index", index.new_empty(0))
        self.register_buffer("sparse_frozen_base", base.new_empty(0))
        self.register_buffer("sparse_frozen_delta", torch.zeros(0, dtype=torch.float32, device=weight.device))
        #: The |w| threshold this layer was selected with (None when given an explicit index).
        self.sparse_threshold: float | None = threshold
        mark_merged(self.sparse_delta)
        _register_layer(self)

    @classmethod
    def _adopt(cls, module: nn.Module):
        """A new instance of ``cls`` sharing ``module``'s state (parameters, buffers, hooks)."""
        new = cls.__new__(cls)
        state = {}
        for key, value in module.__dict__.items():
            state[key] = value.copy() if isinstance(value, dict) else value
        new.__dict__.update(state)
        return new

    # -- invariant ----------------------------------------------------------------------------
    @property
    def k(self) -> int:
        return self.sparse_index.numel()

    @property
    def density(self) -> float:
        return self.k / max(1, self.weight.numel())

    def merge_(self) -> None:
        """Write ``base + delta`` into ``weight`` at the index (O(k)); done before each forward when
        the delta changed since the last merge."""
        with torch.no_grad():
            sk.scatter_merge_(self.weight, self.sparse_index, self.sparse_base, self.sparse_delta.detach())
            if getattr(self, "_frozen_unmerged", False):
                sk.scatter_merge_(
                    self.weight, self.sparse_frozen_index, self.sparse_frozen_base, self.sparse_frozen_delta
                )
                self._frozen_unmerged = False
        mark_merged(self.sparse_delta)

    def _maybe_merge(self) -> None:
        delta = self.sparse_delta
        if torch.compiler.is_compiling():
            # Inside a compiled graph the version counter (and the _frozen_unmerged flag) is not
            # visible: merge always (O(k)), the entries frozen by re-selection too (after unmerge_).
            with torch.no_grad():
                sk.scatter_merge_(self.weight, self.sparse_index, self.sparse_base, delta.detach())
                if self.sparse_frozen_index.numel():
                    sk.scatter_merge_(
                        self.weight,
                        self.sparse_frozen_index,
                        self.sparse_frozen_base,
                        self.sparse_frozen_delta,
                    )
            return
        if getattr(delta, _MERGED_VERSION, None) != delta._version:
            self.merge_()
        if layer_of(delta) is None:
            _register_layer(self)

    def unmerge_(self) -> None:
        """Restore the pre-trained values at every adapted entry (the deltas are kept); the next
        forward (or :meth:`merge_`) merges them again."""
        with torch.no_grad():
            sk.restore_(self.weight, self.sparse_index, self.sparse_base)
            if self.sparse_frozen_index.numel():
                sk.restore_(self.weight, self.sparse_frozen_index, self.sparse_frozen_base)
        setattr(self.sparse_delta, _MERGED_VERSION, None)
        self._frozen_unmerged = True

    def adapter_state(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every adapted entry, trainable and frozen: (index [n] sorted, delta fp32 [n], base [n])."""
        delta = self.sparse_delta.detach()
        if self.sparse_frozen_index.numel() == 0:
            return self.sparse_index, delta, self.sparse_base
        index = torch.cat([self.sparse_index, self.sparse_frozen_index])
        order = torch.argsort(index)
        return (
            index[order],
            torch.cat([delta, self.sparse_frozen_delta])[order],
            torch.cat([self.sparse_base, self.sparse_frozen_base])[order],
        )

    @property
    def adapted_count(self) -> int:
        """Entries carrying a delta (trainable + frozen by re-selection)."""
        return self.k + self.sparse_frozen_index.numel()

    def _sparse_repr(self) -> str:
        return f"k={self.k}, density={self.density:.2%}"


class SparseDeltaLinear(_SparseDeltaMixin, nn.Linear):
    """``nn.Linear`` whose trainable part is a k-sized delta on selected weight entries.

    Build it from a dense layer with :meth:`from_dense`. ``isinstance(m, nn.Linear)`` holds.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        index: torch.Tensor | None = None,
        threshold: float | None = None,
        k: int | None = None,
    ):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_sparse(index, threshold, k)

    @classmethod
    def from_dense(
        cls,
        linear: nn.Linear,
        index: torch.Tensor | None = None,
        *,
        threshold: float | None = None,
        k: int | None = None,
    ) -> SparseDeltaLinear:
        """Wrap ``linear`` (its weight storage is reused, not copied) with a selection.

        Args:
            linear: the dense layer.
            index: flat indices to train; or ``threshold`` (|w| < threshold) or ``k`` (k smallest |w|).
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"SparseDeltaLinear.from_dense: expected nn.Linear, got {type(linear).__name__}")
        if isinstance(linear, SparseDeltaLinear):
            raise TypeError("SparseDeltaLinear.from_dense: the layer is already a SparseDeltaLinear")
        new = cls._adopt(linear)
        new._init_sparse(index, threshold, k)
        return new

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._maybe_merge()
        if torch.compiler.is_compiling():
            return sk.sparse_linear(input, self.weight, self.bias, self.sparse_index, self.sparse_delta)
        x, weight, bias = _ops.autocast_args((input, self.weight, self.bias), input.device.type)
        return _ops.SparseLinearFunction.apply(x, weight, bias, self.sparse_index, self.sparse_delta)

    def to_dense(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding the merged weight (a copy)."""
        self._maybe_merge()
        dense = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )
        with torch.no_grad():
            dense.weight.copy_(self.weight)
            if self.bias is not None:
                dense.bias.copy_(self.bias)
        return dense

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._sparse_repr()}"


class SparseDeltaConv2d(_SparseDeltaMixin, nn.Conv2d):
    """``nn.Conv2d`` whose trainable part is a k-sized delta on selected weight entries.

    Build it from a dense layer with :meth:`from_dense`. ``isinstance(m, nn.Conv2d)`` holds.
    """

    def __init__(
        self,
        *args,
        index: torch.Tensor | None = None,
        threshold: float | None = None,
        k: int | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self._init_sparse(index, threshold, k)

    @classmethod
    def from_dense(
        cls,
        conv: nn.Conv2d,
        index: torch.Tensor | None = None,
        *,
        threshold: float | None = None,
        k: int | None = None,
    ) -> SparseDeltaConv2d:
        """Wrap ``conv`` (its weight storage is reused, not copied) with a selection."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"SparseDeltaConv2d.from_dense: expected nn.Conv2d, got {type(conv).__name__}")
        if isinstance(conv, SparseDeltaConv2d):
            raise TypeError("SparseDeltaConv2d.from_dense: the layer is already a SparseDeltaConv2d")
        new = cls._adopt(conv)
        new._init_sparse(index, threshold, k)
        return new

    def _padded(self, input: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """Apply non-zero padding modes and string padding as nn.Conv2d does; returns the padding
        left for the convolution itself."""
        if self.padding_mode != "zeros":
            return F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode), [0, 0]
        if isinstance(self.padding, str):
            # "valid" pads nothing; "same" may be asymmetric, which nn.Conv2d precomputes.
            return F.pad(input, self._reversed_padding_repeated_twice), [0, 0]
        return input, list(self.padding)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._maybe_merge()
        input, padding = self._padded(input)
        args = (list(self.stride), padding, list(self.dilation), self.groups)
        if torch.compiler.is_compiling():
            return sk.sparse_conv2d(
                input, self.weight, self.bias, self.sparse_index, self.sparse_delta, *args
            )
        x, weight, bias = _ops.autocast_args((input, self.weight, self.bias), input.device.type)
        return _ops.SparseConv2dFunction.apply(x, weight, bias, self.sparse_index, self.sparse_delta, *args)

    def to_dense(self) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` holding the merged weight (a copy)."""
        self._maybe_merge()
        dense = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            bias=self.bias is not None,
            padding_mode=self.padding_mode,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )
        with torch.no_grad():
            dense.weight.copy_(self.weight)
            if self.bias is not None:
                dense.bias.copy_(self.bias)
        return dense

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._sparse_repr()}"


__all__ = ["SparseDeltaConv2d", "SparseDeltaLinear", "mark_merged"]
