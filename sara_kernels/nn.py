"""Drop-in sparse-delta layers: ``SparseDeltaLinear(nn.Linear)``,
``SparseDeltaConv1d/2d/3d(nn.Conv1d/2d/3d)`` and ``SparseDeltaEmbedding(nn.Embedding)``.

Data model of one adapted layer: ``n`` adapted entries held in *slots*; the first ``k`` slots are
trainable, the last ``n - k`` were frozen by progressive re-selection (:func:`sara_kernels.reselect_`):

=======================  ==========================  =====  ==============================================
attribute                dtype                       size   role
=======================  ==========================  =====  ==============================================
``weight``               base dtype (fp32/bf16/fp16) dense  frozen; holds the merged value at every slot
``sparse_index``         int32 (int64 if >= 2**31)   n      flat indices into ``weight.view(-1)``; slots
                                                            ``[0, k)`` and ``[k, n)`` each sorted, disjoint
``sparse_base``          base dtype                  n      pre-trained values (exact unmerge and export)
``sparse_delta``         fp32 (:class:`DeltaParameter`) n   the only trainable tensor; exactly 0 in the
                                                            frozen slots
``sparse_frozen_delta``  fp32                        n - k  learned deltas of the frozen slots
=======================  ==========================  =====  ==============================================

Invariant (checked by the tests after every route that changes a delta)::

    weight.view(-1)[index[j]] == (base[j].float() + delta[j] + frozen[j - k] if j >= k else 0).to(weight.dtype)

**Shapes never change while training.** Re-selection moves the frozen entries to the end of the
slots (a permutation of ``sparse_index``/``sparse_base``, in place) and zeroes their delta, gradient
and optimizer state; a zero entry with zero gradient and zero moments stays exactly zero under every
``torch.optim`` optimizer (weight decay of 0 is 0). So the parameter a DDP reducer, an optimizer or
a checkpoint holds keeps its shape, and ranks stay bit-identical across re-selection. Cost: the
gradient and Adam moments stay ``n``-sized after re-selection (they do not shrink to ``k``).

**The merged invariant is never observably broken.** The forward is exactly the dense layer's (no
``W + scatter(delta)`` copy); the weight is kept merged by whichever route changed the delta:

* :class:`~sara_kernels.optim.SparseAdamW` writes the merged value in the same kernel;
* any other ``torch.optim`` optimizer (fused, foreach or for-loop): a global step post-hook merges
  the deltas it stepped right after ``step()`` (O(n) per layer), so a ``state_dict()`` taken then
  is current;
* in-place ops (``copy_``, ``add_`` under ``no_grad``) bump the version counter: the next forward or
  ``state_dict()`` re-merges;
* writes through ``.data`` (what ``EMAModel.copy_to`` does) do not bump it: ``DeltaParameter``
  notices every ``.data`` access instead and the next forward or ``state_dict()`` re-merges.

Every other change goes through a method of the layer (:meth:`set_entries_`,
:meth:`set_total_delta_`, :meth:`freeze_`, :meth:`merge_`, :meth:`unmerge_`, loading a state dict,
a dtype or device cast); nothing else writes the sparse attributes.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
import weakref
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.weak import WeakIdKeyDictionary

from sara_kernels import _autograd, _checks, _ops, reference  # noqa: F401  (_ops registers the ops)
from sara_kernels import ops as sk

#: Attribute of a delta: its ``_version`` when its layer's weight was last merged (None: stale).
_MERGED = "_sara_kernels_merged_version"
_REGISTERED = "_sara_kernels_registered"

#: Tensors a sparse-delta layer adds to its dense layer, in state-dict order.
SPARSE_PARAMETERS = ("sparse_delta",)
SPARSE_BUFFERS = ("sparse_index", "sparse_base", "sparse_frozen_delta")
SPARSE_KEYS = ("sparse_index", "sparse_base", "sparse_delta", "sparse_frozen_delta")
#: State-dict keys of the layout before fixed slots (trainable and frozen entries apart); still loaded.
_LEGACY_KEYS = ("sparse_frozen_index", "sparse_frozen_base")


class SparseStateWarning(UserWarning):
    """A state change that :mod:`sara_kernels` carried out but could not make exact."""


class DeltaParameter(nn.Parameter):
    """The trainable delta of a sparse-delta layer: an ``nn.Parameter`` that notices ``.data``.

    ``param.data.copy_(x)`` (diffusers' ``EMAModel.copy_to``/``restore``, many hand-written loops)
    writes without bumping the version counter, so a layer could not see the change. Any read or
    assignment of ``.data`` marks the delta stale instead, and its layer re-merges (O(k)) before the
    next forward or ``state_dict()``. Everything else is a plain ``nn.Parameter``.
    """

    @property
    def data(self):  # noqa: D401 - same contract as torch.Tensor.data
        self.__dict__[_MERGED] = None
        return torch._C.TensorBase.data.__get__(self)

    @data.setter
    def data(self, value):
        self.__dict__[_MERGED] = None
        torch._C.TensorBase.data.__set__(self, value)

    def __deepcopy__(self, memo):
        if id(self) in memo:
            return memo[id(self)]
        result = type(self)(_raw(self).clone(memory_format=torch.preserve_format), self.requires_grad)
        memo[id(self)] = result
        return result

    def __reduce_ex__(self, proto):
        # nn.Parameter's pickling rebuilds a plain Parameter and would carry our bookkeeping.
        return (_rebuild_delta_parameter, (torch._C.TensorBase.data.__get__(self), self.requires_grad))

    def __repr__(self):
        return "DeltaParameter containing:\n" + torch.Tensor.__repr__(self.detach())


def _rebuild_delta_parameter(data: torch.Tensor, requires_grad: bool) -> DeltaParameter:
    return DeltaParameter(data, requires_grad)


def _raw(t: torch.Tensor) -> torch.Tensor:
    """``t`` without autograd history and without marking a DeltaParameter stale."""
    return t.detach()


# ---------------------------------------------------------------------------------------------
# Registries. On a delta (its __dict__, which neither pickling nor deepcopy carries over): the
# layers sharing it (tied weights) and the holders of slot-aligned state. Keyed by identity: which
# delta owns a weight Parameter, which optimizers hold delta state.
# ---------------------------------------------------------------------------------------------
_LAYERS = "_sara_kernels_layers"  # on a delta: [weakref(layer), ...]
_HOLDERS = "_sara_kernels_followers"  # on a delta: WeakSet of slot-state holders
_WEIGHT_OWNER: WeakIdKeyDictionary = WeakIdKeyDictionary()  # weight Parameter -> weakref(delta)
_OPTIMIZERS: weakref.WeakSet = weakref.WeakSet()  # optimizers seen stepping a delta
_FIRST_STEP_CHECKED: weakref.WeakSet = weakref.WeakSet()


def layer_of(delta: torch.Tensor):
    """The sparse-delta layer that owns ``delta`` (None if unknown, e.g. a deep copy before its
    first forward)."""
    for ref in delta.__dict__.get(_LAYERS, ()):
        layer = ref()
        if layer is not None and layer._parameters.get("sparse_delta") is delta:
            return layer
    return None


def _group(layer) -> list:
    """Every live layer that shares ``layer``'s delta (tied weights), ``layer`` first."""
    delta = layer._parameters["sparse_delta"]
    found = [layer]
    for ref in delta.__dict__.get(_LAYERS, ()):
        other = ref()
        if other is not None and other is not layer and other._parameters.get("sparse_delta") is delta:
            found.append(other)
    return found


def _register(layer) -> None:
    delta = layer._parameters["sparse_delta"]
    refs = [r for r in delta.__dict__.get(_LAYERS, ()) if r() is not None]
    if not any(r() is layer for r in refs):
        refs.append(weakref.ref(layer))
    delta.__dict__[_LAYERS] = refs
    weight = layer._parameters["weight"]
    _WEIGHT_OWNER[weight] = weakref.ref(delta)
    # What the forward compares to know the layer is registered (a deep copy or an unpickled
    # layer has other ids, so it registers itself again).
    layer.__dict__[_REGISTERED] = (id(layer), id(delta), id(weight))


def module_parents(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """id(child) -> every (parent, attribute name) that holds it (a module may have several)."""
    found: dict[int, list[tuple[nn.Module, str]]] = {}
    for parent in model.modules():
        for name, child in parent._modules.items():
            if child is not None:
                found.setdefault(id(child), []).append((parent, name))
    return found


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside DDP / DataParallel / ``torch.compile`` wrappers (only those: a child that
    happens to be called ``module`` is part of the model)."""
    for _ in range(8):
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif type(model).__name__ == "OptimizedModule" and isinstance(
            getattr(model, "_orig_mod", None), nn.Module
        ):
            model = model._orig_mod
        else:
            break
    return model


def owner_of(weight: torch.Tensor):
    """The live sparse-delta layer that adapts ``weight`` (a weight Parameter), or None."""
    ref = _WEIGHT_OWNER.get(weight)
    delta = ref() if ref is not None else None
    layer = layer_of(delta) if delta is not None else None
    return layer if layer is not None and layer._parameters.get("weight") is weight else None


def forget_weight(weight: torch.Tensor) -> None:
    """The weight is no longer adapted (merge_and_unload): a later conversion starts afresh."""
    _WEIGHT_OWNER.pop(weight, None)


def follow_slots(delta: torch.Tensor, holder) -> None:
    """Register ``holder`` (an object with ``_sara_follow_slots(delta, source, k)``) to be told when
    the slots of ``delta`` are reordered or replaced (re-selection, loading another entry set)."""
    delta.__dict__.setdefault(_HOLDERS, weakref.WeakSet()).add(holder)


def _holders(delta: torch.Tensor) -> list:
    return list(delta.__dict__.get(_HOLDERS, ()))


def mark_merged(delta: torch.Tensor) -> None:
    """Record that the layer's weight holds the merged values for the delta's current version."""
    delta.__dict__[_MERGED] = delta._version


def _is_merged(delta: torch.Tensor) -> bool:
    return delta.__dict__.get(_MERGED) == delta._version


def _unwrap_optimizer(optimizer):
    """The torch optimizer inside wrappers such as accelerate's ``AcceleratedOptimizer``."""
    seen = 0
    while not isinstance(getattr(optimizer, "state", None), dict) or hasattr(optimizer, "optimizer"):
        inner = getattr(optimizer, "optimizer", None)
        if inner is None or seen > 8:
            break
        optimizer, seen = inner, seen + 1
    return optimizer


# ---------------------------------------------------------------------------------------------
# Every torch.optim optimizer: merge right after the step, and say which layers got no gradient
# ---------------------------------------------------------------------------------------------
def _after_optimizer_step(optimizer, args, kwargs) -> None:
    """Global ``torch.optim`` step post-hook.

    * The deltas an optimizer stepped are merged into their weights now (O(k) each), so a
      ``state_dict()`` / ``save_pretrained`` right after ``step()`` is current. Fused kernels
      (``AdamW(fused=True)``) do not bump version counters, so this does not rely on them.
      Optimizers that write the merged weight themselves (:class:`~sara_kernels.optim.SparseAdamW`)
      opt out.
    * The optimizer is remembered (weakly) so that re-selection can reorder its state.
    * On an optimizer's first step with gradients, trainable deltas that received none are named
      in a warning: their layer's forward did not run, or its weight is read outside its forward.
    """
    deltas = [p for group in optimizer.param_groups for p in group["params"] if type(p) is DeltaParameter]
    if not deltas:
        return
    _OPTIMIZERS.add(optimizer)
    if not getattr(optimizer, "_sara_kernels_writes_back", False):
        merged = set()
        for p in deltas:
            if p.grad is None or id(p) in merged:
                continue
            merged.add(id(p))
            layer = layer_of(p)
            if layer is not None:
                layer.merge_()
    if optimizer not in _FIRST_STEP_CHECKED:
        stepped = [p for p in deltas if p.grad is not None]
        if stepped:
            _FIRST_STEP_CHECKED.add(optimizer)
            silent = [p for p in deltas if p.grad is None and p.requires_grad and p.numel()]
            if silent:
                names = [layer_of(p)._label() if layer_of(p) is not None else "?" for p in silent]
                shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
                warnings.warn(
                    f"sara_kernels: {len(silent)} sparse-delta layer(s) received no gradient in the "
                    f"first optimizer step: {shown}. Their forward did not run (an unused branch), or "
                    "their weight is read outside their own forward (e.g. passed to "
                    "F.multi_head_attention_forward), which SaRA cannot train: exclude them "
                    "(SaRAConfig(exclude_modules=...)).",
                    SparseStateWarning,
                    stacklevel=3,
                )


register_optimizer_step_post_hook(_after_optimizer_step)


def _optimizer_states(delta: torch.Tensor, extra=()) -> list[tuple[object, dict]]:
    """(optimizer, its state dict) of every optimizer known to hold state for ``delta``: those seen
    stepping a delta, and ``extra`` (wrappers such as accelerate's are unwrapped)."""
    found, done = [], set()
    for optimizer in list(_OPTIMIZERS) + [o for o in extra if o is not None]:
        optimizer = _unwrap_optimizer(optimizer)
        state = getattr(optimizer, "state", None)
        if isinstance(state, dict) and id(optimizer) not in done and delta in state:
            done.add(id(optimizer))
            found.append((optimizer, state))
    return found


def _follow_optimizer_state(
    delta: torch.Tensor, source: torch.Tensor, k: int, n_old: int, extra=(), reset: bool = False
) -> None:
    """Reorder every known optimizer's per-entry state of ``delta`` to a new slot layout.

    ``source[j]`` is the old slot of new slot ``j`` (-1: a new entry, state 0). Slots ``[k, n)``
    are frozen: their state is zeroed, so the optimizer leaves their (zero) delta at zero. With
    ``reset`` every per-entry tensor is zeroed and the step count restarts.

    Only floating-point ``[n_old]`` tensors can be moved entry by entry. An optimizer that keeps
    anything else for the delta (8-bit optimizers' quantized codes with per-block scales, or any
    layout this does not know) has that delta's state dropped, with a warning: it starts the delta
    afresh at its next step, which is correct, where moving codes between blocks would not be.
    """
    for optimizer, state in _optimizer_states(delta, extra):
        entry = state[delta]
        tensors = {key: v for key, v in entry.items() if isinstance(v, torch.Tensor) and v.dim() > 0}
        movable = {key: v for key, v in tensors.items() if v.shape == (n_old,) and v.is_floating_point()}
        if len(movable) != len(tensors):
            state.pop(delta)
            warnings.warn(
                f"sara_kernels: {type(optimizer).__name__} keeps state that cannot move with the entries "
                f"({', '.join(f'{key} {tuple(v.shape)} {v.dtype}' for key, v in tensors.items() if key not in movable)}): "
                "its state for this delta was reset (moments and step start again)",
                SparseStateWarning,
                stacklevel=4,
            )
            continue
        for key, value in movable.items():
            if reset:
                entry[key] = torch.zeros(source.numel(), dtype=value.dtype, device=value.device)
            else:
                entry[key] = _remap(value, source, k)
        if reset and "step" in entry:
            step = entry["step"]
            entry["step"] = torch.zeros_like(step) if isinstance(step, torch.Tensor) else 0.0


def _remap(value: torch.Tensor, source: torch.Tensor, k: int, fill_frozen: bool = True) -> torch.Tensor:
    source = source.to(value.device)
    valid = source >= 0
    new = torch.zeros(source.numel(), dtype=value.dtype, device=value.device)
    if bool(valid.any()):
        new[valid] = value[source[valid]]
    if fill_frozen:
        new[k:] = 0
    if new.shape == value.shape:
        value.copy_(new)
        return value
    return new


# ---------------------------------------------------------------------------------------------
# state_dict without the sparse tensors (a plain dense model)
# ---------------------------------------------------------------------------------------------
_LOCAL = threading.local()


@contextlib.contextmanager
def dense_state_dict() -> Iterator[None]:
    """Within this block, ``state_dict()`` of any model holding sparse-delta layers returns the keys
    of the plain dense model (merged weights, no ``sparse_*`` keys): what ``save_pretrained`` should
    write for a reader without sara_kernels::

        with sara_kernels.dense_state_dict():
            unet.save_pretrained("checkpoint-500/unet")   # opens in plain diffusers

    The model is not changed. (Per thread.)
    """
    previous = getattr(_LOCAL, "dense", False)
    _LOCAL.dense = True
    try:
        yield
    finally:
        _LOCAL.dense = previous


class _SparseDeltaMixin:
    """Shared state and behaviour of the sparse-delta layers (the only writer of the sparse state)."""

    sparse_index: torch.Tensor
    sparse_base: torch.Tensor
    sparse_delta: DeltaParameter
    sparse_frozen_delta: torch.Tensor

    # -- construction -----------------------------------------------------------------------
    def __init__(
        self,
        *args,
        index: torch.Tensor | None = None,
        threshold: float | None = None,
        k: int | None = None,
        **kwargs,
    ):
        """The dense layer's constructor arguments, then a selection (as for :meth:`from_dense`)."""
        super().__init__(*args, **kwargs)
        self._init_sparse(index, threshold, k)

    def _init_sparse(self, index: torch.Tensor | None, threshold: float | None, k: int | None) -> None:
        self.__dict__.setdefault("_sparse_name", None)
        weight = self._parameters["weight"]
        label = self._label()
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"{label}: the layer has no weight tensor")
        if weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(f"{label}: weight dtype {weight.dtype} is not supported; use fp32, bf16 or fp16")
        if weight.device.type == "meta":
            raise ValueError(f"{label}: the weight is on the meta device; materialise the model first")
        given = sum(v is not None for v in (index, threshold, k))
        if given > 1:
            raise ValueError(f"{label}: give at most one of index, threshold or k")
        if not weight.is_contiguous():
            # channels_last (or any strided) weights: the index addresses the row-major layout, so
            # the layer keeps its weight contiguous (a copy); inputs of any memory format work.
            torch._C.TensorBase.data.__set__(weight, weight.detach().contiguous())
        owner = owner_of(weight)
        if owner is not None:
            self._share_sparse_state(owner, index, threshold, k)
            return
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
            index = self._checked_index(index, weight, what="index", frozen=0)
            base = _raw(weight).reshape(-1)[index.long()].clone()
        weight.requires_grad_(False)
        self.__dict__["_sparse_weight"] = weight
        self.__dict__["_sparse_weight_shape"] = tuple(weight.shape)
        self.register_buffer("sparse_index", index)
        self.register_buffer("sparse_base", base)
        self.sparse_delta = DeltaParameter(
            torch.zeros(index.numel(), dtype=torch.float32, device=weight.device)
        )
        self.register_buffer("sparse_frozen_delta", torch.zeros(0, dtype=torch.float32, device=weight.device))
        #: The |w| threshold this layer was selected with (None when given an explicit index).
        self.sparse_threshold: float | None = threshold
        mark_merged(self.sparse_delta)
        _register(self)

    def _share_sparse_state(self, owner, index, threshold, k) -> None:
        """A second module over an adapted weight Parameter (tied weights) shares the owner's sparse
        state: one delta per weight, trained by both modules' gradients."""
        if index is not None:
            given = torch.as_tensor(index).to(device=owner.sparse_index.device, dtype=torch.int64)
            if not torch.equal(given.sort().values, owner.sparse_index.long().sort().values):
                raise ValueError(
                    f"{self._label()}: its weight is shared with {owner._label()}, which adapts other "
                    "entries; modules sharing a weight share one selection"
                )
        elif threshold is not None or k is not None:
            raise ValueError(
                f"{self._label()}: its weight is shared with {owner._label()}, which is already adapted; "
                "modules sharing a weight share one selection (pass no threshold or k)"
            )
        for name in SPARSE_BUFFERS:
            self._buffers[name] = owner._buffers[name]
        self._parameters["sparse_delta"] = owner._parameters["sparse_delta"]
        self.__dict__["_sparse_weight"] = owner.__dict__["_sparse_weight"]
        self.__dict__["_sparse_weight_shape"] = owner.__dict__["_sparse_weight_shape"]
        self.sparse_threshold = owner.sparse_threshold
        _register(self)

    @classmethod
    def _adopt(cls, module: nn.Module):
        """A new instance of ``cls`` sharing ``module``'s state (parameters, buffers, hooks)."""
        new = cls.__new__(cls)
        state = {}
        for key, value in module.__dict__.items():
            state[key] = value.copy() if isinstance(value, dict) else value
        new.__dict__.update(state)
        return new

    @classmethod
    def from_dense(
        cls,
        module: nn.Module,
        index: torch.Tensor | None = None,
        *,
        threshold: float | None = None,
        k: int | None = None,
        name: str | None = None,
    ):
        """Wrap a dense layer (its weight storage is reused, not copied) with a selection.

        Args:
            module: the dense layer (``nn.Linear`` for :class:`SparseDeltaLinear`, ``nn.Conv2d`` for
                :class:`SparseDeltaConv2d`, ...).
            index: flat indices into ``weight.view(-1)`` to train; or ``threshold`` (|w| < threshold)
                or ``k`` (k smallest |w|).
            name: the layer's name in its model, used in error messages.

        A second layer built over a weight Parameter that is already adapted (tied weights) shares
        the first one's sparse state: one delta per weight. A ``channels_last`` weight is stored
        contiguous (a copy): the index addresses the row-major layout.
        """
        dense = cls._dense_type
        if not isinstance(module, dense):
            raise TypeError(
                f"{cls.__name__}.from_dense: expected {_qualified(dense)}, got {type(module).__name__}"
            )
        if isinstance(module, cls):
            raise TypeError(f"{cls.__name__}.from_dense: the layer is already a {cls.__name__}")
        new = cls._adopt(module)
        new.__dict__["_sparse_name"] = name
        new._init_sparse(index, threshold, k)
        return new

    def _dense_copy(self, dense: nn.Module) -> nn.Module:
        """``dense`` (a new plain layer of this one's configuration) given the merged weight and bias."""
        self._maybe_merge()
        with torch.no_grad():
            dense.weight.copy_(self.weight)
            if getattr(self, "bias", None) is not None:
                dense.bias.copy_(self.bias)
        return dense

    # -- names and checks -------------------------------------------------------------------
    def _label(self) -> str:
        name = self.__dict__.get("_sparse_name")
        return f"{type(self).__name__} {name!r}" if name else type(self).__name__

    def _checked_index(self, index, weight, *, what: str, frozen: int) -> torch.Tensor:
        """``index`` as this layer stores it (int32 below 2**31 entries, contiguous, on the weight's
        device), validated: 1-D integers in range, each segment (trainable, frozen) strictly
        increasing, no entry twice."""
        label = self._label()
        if not isinstance(index, torch.Tensor):
            index = torch.as_tensor(index)
        given = index
        if index.dtype not in _checks.INDEX_DTYPES:
            raise TypeError(f"{label}: {what} has dtype {index.dtype}; expected int32 or int64")
        if index.dim() != 1:
            raise ValueError(f"{label}: {what} must be 1-D, got shape {tuple(index.shape)}")
        numel = weight.numel()
        index = index.to(device=weight.device)
        if index.dtype == torch.int64 and numel < 2**31:
            index = index.to(torch.int32)  # int32 halves the index bytes; int64 only when needed
        index = index.contiguous()
        n = index.numel()
        if not 0 <= frozen <= n:
            raise ValueError(f"{label}: {frozen} frozen entries but {what} has only {n}")
        if n:
            lo, hi = int(index.min()), int(index.max())
            if lo < 0 or hi >= numel:
                raise IndexError(
                    f"{label}: {what} holds values in [{lo}, {hi}] but the weight {tuple(weight.shape)} "
                    f"has {numel} entries"
                )
            for part, (start, stop) in (("trainable", (0, n - frozen)), ("frozen", (n - frozen, n))):
                seg = index[start:stop]
                if seg.numel() > 1 and not bool((seg[1:] > seg[:-1]).all()):
                    raise ValueError(
                        f"{label}: the {part} part of {what} must be sorted in strictly increasing order"
                    )
            if frozen and torch.unique(index).numel() != n:
                raise ValueError(f"{label}: {what} lists an entry both as trainable and as frozen")
        if index is given or index.untyped_storage().data_ptr() == given.untyped_storage().data_ptr():
            index = index.clone()  # the layer owns its index: re-selection permutes it in place
        if frozen == 0:
            _checks.remember_index_checked(index, numel)  # validated just above
        return index

    def _check_state(self) -> None:
        """Cheap consistency checks before the layer's tensors are used (every forward and fused
        step): a replaced, resized or recast weight or delta is an error naming the layer."""
        d = self.__dict__
        params, buffers = d["_parameters"], d["_buffers"]
        weight, delta = params.get("weight"), params.get("sparse_delta")
        if weight is not self.__dict__.get("_sparse_weight"):
            raise RuntimeError(
                f"{self._label()}: its weight was replaced after conversion; a sparse-delta layer's "
                "index addresses the weight it was built on. Call sara_kernels.merge_and_unload first "
                "to change the weight, then convert again"
            )
        if tuple(weight.shape) != self.__dict__["_sparse_weight_shape"] or not weight.is_contiguous():
            raise RuntimeError(
                f"{self._label()}: its weight changed shape or layout to {tuple(weight.shape)} "
                f"(strides {weight.stride()}) after conversion from {self.__dict__['_sparse_weight_shape']}"
            )
        base, index = buffers["sparse_base"], buffers["sparse_index"]
        if type(delta) is not DeltaParameter or delta.dtype != torch.float32 or delta.shape != index.shape:
            raise RuntimeError(
                f"{self._label()}: sparse_delta was replaced or changed ({type(delta).__name__}, "
                f"{getattr(delta, 'dtype', None)}, shape {tuple(getattr(delta, 'shape', ()))}); it must "
                f"stay the layer's fp32 DeltaParameter of {index.numel()} entries. Change it in place, "
                "or through the layer's methods (set_total_delta_, set_entries_)"
            )
        if base.dtype != weight.dtype:
            raise RuntimeError(
                f"{self._label()}: the weight is {weight.dtype} but its pre-trained values are "
                f"{base.dtype}: cast the module (module.to(dtype)), not weight.data"
            )

    def __setstate__(self, state):
        # deepcopy and unpickling: the new delta knows its layer before any forward (the fused
        # optimizer needs it to write the merged weight).
        super().__setstate__(state)
        if isinstance(self._parameters.get("sparse_delta"), DeltaParameter):
            _register(self)

    def __setattr__(self, name, value):
        if name == "weight" and "_sparse_weight" in self.__dict__ and not getattr(_LOCAL, "loading", False):
            if value is not self.__dict__["_sparse_weight"]:
                if type(value).__name__ == "DTensor":  # FSDP2 registers its shard
                    raise RuntimeError(
                        f"{self._label()}: its weight is being sharded (FSDP2 fully_shard); call "
                        "sara_kernels.integrations.fsdp.prepare_fsdp(model, mesh) first and pass the "
                        "deltas it returns as fully_shard(..., ignored_params=...)"
                    )
                raise RuntimeError(
                    f"{self._label()}: cannot assign a new weight to a sparse-delta layer (its index "
                    "addresses the current one); call sara_kernels.merge_and_unload first"
                )
        super().__setattr__(name, value)

    # -- slots --------------------------------------------------------------------------------
    @property
    def adapted_count(self) -> int:
        """Entries carrying a delta (trainable + frozen by re-selection): ``n``."""
        return self._buffers["sparse_index"].numel()

    @property
    def frozen_count(self) -> int:
        return self._buffers["sparse_frozen_delta"].numel()

    @property
    def k(self) -> int:
        """Trainable entries."""
        return self.adapted_count - self.frozen_count

    @property
    def density(self) -> float:
        return self.k / max(1, self.weight.numel())

    @property
    def sparse_frozen_index(self) -> torch.Tensor:
        """Flat indices of the entries frozen by re-selection (a view of ``sparse_index``)."""
        return self._buffers["sparse_index"][self.k :]

    @property
    def sparse_frozen_base(self) -> torch.Tensor:
        """Pre-trained values of the frozen entries (a view of ``sparse_base``)."""
        return self._buffers["sparse_base"][self.k :]

    def _trainable(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(index, delta) of the trainable slots: the whole tensors, or views of their first k."""
        index, delta = self._buffers["sparse_index"], self._parameters["sparse_delta"]
        frozen = self._buffers["sparse_frozen_delta"].numel()
        if frozen == 0:
            return index, delta
        k = index.numel() - frozen
        return index[:k], delta[:k]

    def trainable_state(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(index, base, delta) of the trainable slots (views; delta keeps its autograd link)."""
        k = self.k
        b = self._buffers
        return b["sparse_index"][:k], b["sparse_base"][:k], self._parameters["sparse_delta"][:k]

    def total_delta(self) -> torch.Tensor:
        """The learned delta of every slot, trainable and frozen: fp32 ``[n]`` (a copy)."""
        total = _raw(self._parameters["sparse_delta"]).clone()
        frozen = self._buffers["sparse_frozen_delta"]
        if frozen.numel():
            total[self.k :] += frozen
        return total

    # -- the merged invariant -------------------------------------------------------------------
    def merge_(self) -> None:
        """Write the merged value into ``weight`` at every slot (O(n))."""
        b = self._buffers
        weight, index, base = self._parameters["weight"], b["sparse_index"], b["sparse_base"]
        delta, frozen = _raw(self._parameters["sparse_delta"]), b["sparse_frozen_delta"]
        with torch.no_grad():
            if frozen.numel() == 0:
                sk.scatter_merge_(weight, index, base, delta)
            else:
                k = index.numel() - frozen.numel()
                sk.scatter_merge_(weight, index[:k], base[:k], delta[:k])
                sk.scatter_merge_(weight, index[k:], base[k:], delta[k:] + frozen)
        if not torch.compiler.is_compiling():
            mark_merged(self._parameters["sparse_delta"])

    def _maybe_merge(self) -> None:
        d = self.__dict__
        params = d["_parameters"]
        weight, delta = params["weight"], params["sparse_delta"]
        if torch.compiler.is_compiling():
            # Inside a compiled graph the version counter is not visible: merge always (O(n)).
            self.merge_()
            return
        # The fast path of every forward: the same weight and delta, registered and merged, the
        # weight's shape, layout and dtype unchanged (a delta resized in place is refused by the
        # op, which checks it against the index). Anything else takes the full checks.
        if (
            d.get(_REGISTERED) == (id(self), id(delta), id(weight))
            and weight is d["_sparse_weight"]
            and type(delta) is DeltaParameter
            and delta.__dict__.get(_MERGED) == delta._version
            and weight.shape == d["_sparse_weight_shape"]
            and weight.is_contiguous()
            and weight.dtype is d["_buffers"]["sparse_base"].dtype
        ):
            return
        self._check_state()
        if delta.__dict__.get(_MERGED) != delta._version:
            self.merge_()
        if d.get(_REGISTERED) != (id(self), id(delta), id(weight)):
            _register(self)  # e.g. a deep copy or an unpickled model

    def unmerge_(self) -> None:
        """Restore the pre-trained values at every adapted entry (the deltas are kept); the next
        forward (or :meth:`merge_`) merges them again."""
        b = self._buffers
        weight, index, base = self._parameters["weight"], b["sparse_index"], b["sparse_base"]
        k = self.k
        with torch.no_grad():
            if k == index.numel():
                sk.restore_(weight, index, base)
            else:
                sk.restore_(weight, index[:k], base[:k])
                sk.restore_(weight, index[k:], base[k:])
        self._parameters["sparse_delta"].__dict__[_MERGED] = None

    # -- state changes: the only writers of the sparse tensors ----------------------------------
    def _assign(self, **tensors: torch.Tensor) -> None:
        """Give every layer sharing this state (tied weights) the same new buffer tensors."""
        for layer in _group(self):
            for name, value in tensors.items():
                layer._buffers[name] = value

    def set_total_delta_(self, total: torch.Tensor) -> None:
        """Set the learned delta of every slot (fp32 ``[n]``, slot order): trainable slots into
        ``sparse_delta``, frozen slots into ``sparse_frozen_delta``; then merge."""
        n, k = self.adapted_count, self.k
        if not isinstance(total, torch.Tensor) or total.shape != (n,):
            raise ValueError(
                f"{self._label()}: set_total_delta_ needs a [{n}] tensor, got "
                f"{tuple(total.shape) if isinstance(total, torch.Tensor) else type(total).__name__}"
            )
        delta = self._parameters["sparse_delta"]
        total = total.to(device=delta.device, dtype=torch.float32)
        with torch.no_grad():
            delta.copy_(total)
            if k < n:
                delta[k:] = 0
                self._buffers["sparse_frozen_delta"].copy_(total[k:])
        self.merge_()

    def set_entries_(
        self,
        index: torch.Tensor,
        total_delta: torch.Tensor | None = None,
        *,
        frozen: int = 0,
        base: torch.Tensor | None = None,
        optimizers=(),
    ) -> None:
        """Replace the adapted entries.

        Args:
            index: ``[n]`` flat indices in slot order: the first ``n - frozen`` trainable (sorted),
                then the frozen ones (sorted).
            total_delta: fp32 ``[n]`` learned delta per slot (default 0).
            frozen: how many slots at the end are frozen.
            base: pre-trained values at ``index`` (default: read from the weight after restoring the
                current entries' pre-trained values); when given, the weight must hold them.
            optimizers: optimizers holding state for the delta besides those already seen stepping
                it; their per-entry state follows the entries (0 for new entries).

        The delta Parameter keeps its identity; it keeps its shape when ``n`` does not change (so an
        optimizer or a DDP reducer holding it stays valid), and is resized otherwise.
        """
        weight = self._parameters["weight"]
        index = self._checked_index(index, weight, what="index", frozen=int(frozen))
        n, k = index.numel(), index.numel() - int(frozen)
        if total_delta is None:
            total_delta = torch.zeros(n, dtype=torch.float32, device=weight.device)
        if not isinstance(total_delta, torch.Tensor) or total_delta.shape != (n,):
            raise ValueError(f"{self._label()}: total_delta must have shape [{n}], like the index")
        total_delta = total_delta.to(device=weight.device, dtype=torch.float32)
        if not bool(torch.isfinite(total_delta).all()):
            raise ValueError(f"{self._label()}: the delta holds NaN or infinite values")
        if base is not None:
            if not isinstance(base, torch.Tensor) or base.shape != (n,):
                raise ValueError(f"{self._label()}: base must have shape [{n}], like the index")
            base = base.to(device=weight.device, dtype=weight.dtype)
        old_index = _raw(self._buffers["sparse_index"]).long()
        self.unmerge_()
        with torch.no_grad():
            if base is None:
                base = _raw(weight).reshape(-1)[index.long()].clone()
            # Which old slot each new slot continues (-1: a new entry), for the state that follows.
            source = _slot_sources(old_index, index.long())
            delta = self._parameters["sparse_delta"]
            new_delta = total_delta.clone()
            new_delta[k:] = 0
            if n == delta.numel():
                # In place: an optimizer, a DDP reducer and DDP's buffer list keep valid tensors.
                if self._buffers["sparse_index"].dtype == index.dtype:
                    self._buffers["sparse_index"].copy_(index)
                else:
                    self._assign(sparse_index=index)
                self._buffers["sparse_base"].copy_(base)
                delta.copy_(new_delta)
                if delta.grad is not None:
                    delta.grad = None
            else:
                self._assign(sparse_index=index, sparse_base=base)
                _resize_parameter(delta, new_delta)
            self._assign(sparse_frozen_delta=total_delta[k:].clone())
        _follow_optimizer_state(delta, source, k, old_index.numel(), optimizers)
        for holder in _holders(delta):
            holder._sara_follow_slots(delta, source, k)
        self.merge_()

    def freeze_(self, keep: torch.Tensor, *, optimizers=(), reset_state: bool = False) -> tuple[int, int]:
        """Progressive re-selection on this layer: the trainable slots where ``keep`` (bool ``[k]``)
        is False become frozen with their learned delta.

        The frozen slots move to the end (a permutation of the slots, in place: tensor shapes do not
        change); their delta, gradient and optimizer state become 0, the survivors' state moves with
        them (or is reset with ``reset_state``). The merged weight is unchanged.

        Returns:
            (kept, newly frozen) entry counts.
        """
        k, n = self.k, self.adapted_count
        if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or keep.shape != (k,):
            raise ValueError(f"{self._label()}: freeze_ needs a bool [{k}] mask over the trainable entries")
        keep = keep.to(self._buffers["sparse_index"].device)
        kept = int(keep.sum())
        delta = self._parameters["sparse_delta"]
        if kept == k:
            if reset_state:
                _follow_optimizer_state(delta, torch.arange(n), k, n, optimizers, reset=True)
            return k, 0
        index, base = self._buffers["sparse_index"], self._buffers["sparse_base"]
        delta = self._parameters["sparse_delta"]
        with torch.no_grad():
            total = self.total_delta()
            slots = torch.arange(n, device=index.device)
            survivors = slots[:k][keep]
            frozen_slots = torch.cat([slots[:k][~keep], slots[k:]])
            # The frozen part stays sorted by flat index (a stable sort of two sorted runs).
            frozen_slots = frozen_slots[torch.sort(index[frozen_slots].long(), stable=True).indices]
            order = torch.cat([survivors, frozen_slots])
            index.copy_(index[order])
            base.copy_(base[order])
            total = total[order]
            delta.copy_(total)
            delta[kept:] = 0
            if delta.grad is not None:
                delta.grad.copy_(delta.grad[order])
                delta.grad[kept:] = 0
            self._assign(sparse_frozen_delta=total[kept:].clone())
        _checks.mark_index_checked(index[:kept], self._parameters["weight"].numel())
        _follow_optimizer_state(delta, order, kept, n, optimizers, reset=reset_state)
        for holder in _holders(delta):
            holder._sara_follow_slots(delta, order, kept)
        self.merge_()
        return kept, k - kept

    def adapter_state(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every adapted entry, trainable and frozen, sorted by flat index: (index ``[n]``, delta fp32
        ``[n]``, base ``[n]``)."""
        index, base = self._buffers["sparse_index"], self._buffers["sparse_base"]
        total = self.total_delta()
        if self.frozen_count == 0:
            return index, total, base
        order = torch.argsort(index)
        return index[order], total[order], base[order]

    # -- module protocol: casts, state dicts ---------------------------------------------------
    def _apply(self, fn, recurse=True):
        """``.to()``, ``.half()``, ``.cuda()``...: the weight and the pre-trained values follow
        ``fn``; the deltas stay fp32 (only their device follows), and the weight is re-merged so the
        invariant holds exactly in the new dtype. The weight stays contiguous (channels_last
        requests leave it row-major: the index addresses that layout)."""
        delta = self._parameters["sparse_delta"]
        keep = {
            "sparse_delta": _raw(delta),
            "grad": _raw(delta.grad) if delta.grad is not None else None,
            "sparse_frozen_delta": self._buffers["sparse_frozen_delta"],
        }
        group = _group(self)
        before = {name: self._buffers[name] for name in SPARSE_BUFFERS}
        del self._parameters["sparse_delta"]
        del self._buffers["sparse_frozen_delta"]
        try:
            result = super()._apply(fn, recurse)
        finally:
            self._parameters["sparse_delta"] = delta
            self._buffers["sparse_frozen_delta"] = keep["sparse_frozen_delta"]

        def fp32(original: torch.Tensor) -> torch.Tensor:
            applied = fn(original)
            if applied.dtype != original.dtype:
                applied = original.to(device=applied.device)
            return applied

        new = fp32(keep["sparse_delta"])
        if new is not keep["sparse_delta"]:
            torch._C.TensorBase.data.__set__(delta, new)
        if keep["grad"] is not None:
            delta.grad = fp32(keep["grad"])
        self._buffers["sparse_frozen_delta"] = fp32(keep["sparse_frozen_delta"])
        # Modules sharing a weight share these buffers: a cast or a move gives each module its own
        # new tensor, so point the others (still holding the old one) at this module's.
        for name, old in before.items():
            for other in group[1:]:
                if other._buffers.get(name) is old:
                    other._buffers[name] = self._buffers[name]
        weight = self._parameters["weight"]
        if weight is not None:
            if not weight.is_contiguous():
                torch._C.TensorBase.data.__set__(weight, weight.detach().contiguous())
            self.__dict__["_sparse_weight"] = weight
            weight.requires_grad_(False)
            _register(self)
            if weight.device.type != "meta":
                self.merge_()
        return result

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if not torch.compiler.is_compiling():
            self._maybe_merge()
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if getattr(_LOCAL, "dense", False):
            for name in SPARSE_KEYS:
                destination.pop(prefix + name, None)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        """Loading a state dict keeps the invariant and never loses training.

        * A sara_kernels state dict (``sparse_*`` keys): the layer adopts the checkpoint's entries,
          slot order and frozen split (optimizer state then loads aligned), and re-merges. Without a
          ``weight`` key the checkpoint's pre-trained values must match this model's.
        * A dense state dict (only ``weight``/``bias``, e.g. a plain diffusers checkpoint of the
          merged model): the deltas are recovered as ``weight - pre-trained`` at the adapted entries
          (the frozen split kept), with a :class:`SparseStateWarning`; a weight that differs from the
          pre-trained one outside the adapted entries is an error (it cannot be represented).

        Everything of this layer is checked before anything of it is written: a refused state
        leaves the layer (its weight included) as it was.
        """
        keys = {name: prefix + name for name in SPARSE_KEYS + _LEGACY_KEYS}
        sparse = {name: state_dict.pop(key) for name, key in keys.items() if key in state_dict}
        weight_key = prefix + "weight"
        dense_weight = state_dict.get(weight_key)
        weight = self._parameters["weight"]
        has_weight = isinstance(dense_weight, torch.Tensor)
        before = len(error_msgs)
        parsed, refused = None, False
        if sparse:
            try:
                parsed = self._validate_sparse(sparse, has_weight=has_weight)
            except (TypeError, ValueError, IndexError) as error:
                error_msgs.append(str(error))
                refused = True
        elif has_weight and dense_weight.shape == weight.shape:
            refused = not self._dense_fits(dense_weight, error_msgs)
        if refused and weight_key in state_dict:
            state_dict.pop(weight_key)  # not written: the layer keeps its state
        hidden = {name: self._parameters.pop(name) for name in SPARSE_PARAMETERS}
        hidden_buffers = {name: self._buffers.pop(name) for name in SPARSE_BUFFERS}
        _LOCAL.loading = True
        try:
            super()._load_from_state_dict(
                state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
            )
        finally:
            _LOCAL.loading = False
            self._parameters.update(hidden)
            self._buffers.update(hidden_buffers)
        if refused:
            if weight_key in missing_keys:
                missing_keys.remove(weight_key)
            return
        new_weight = self._parameters["weight"]
        if new_weight is not self.__dict__["_sparse_weight"]:  # load_state_dict(assign=True)
            if tuple(new_weight.shape) != self.__dict__["_sparse_weight_shape"]:
                error_msgs.append(f"{self._label()}: the loaded weight has shape {tuple(new_weight.shape)}")
                return
            new_weight.requires_grad_(False)
            if not new_weight.is_contiguous():
                torch._C.TensorBase.data.__set__(new_weight, new_weight.detach().contiguous())
            self.__dict__["_sparse_weight"] = new_weight
            _register(self)
        if len(error_msgs) > before:  # e.g. another key of this module did not fit
            self.merge_()  # whatever torch loaded, the layer's own state stays merged
            return
        if parsed is not None:
            index, base, total, frozen = parsed
            if has_weight:
                # The weight just loaded is the checkpoint's (merged at its entries, its pre-trained
                # values elsewhere): make unmerging this layer's old entries a no-op, so that
                # set_entries_ keeps the loaded values there and merges the checkpoint's deltas.
                with torch.no_grad():
                    old = _raw(self._buffers["sparse_index"]).long()
                    self._buffers["sparse_base"].copy_(_raw(weight).reshape(-1)[old])
            self.set_entries_(index, total, frozen=frozen, base=base)
        elif has_weight:
            self._load_dense()
        else:
            missing_keys.extend(prefix + name for name in SPARSE_KEYS)

    def _pretrained_at(self, index: torch.Tensor) -> torch.Tensor:
        """The pre-trained values at flat ``index`` (the layer's base where it adapts the entry, the
        weight elsewhere), read without changing anything."""
        flat = _raw(self._parameters["weight"]).reshape(-1)
        index = index.to(device=flat.device, dtype=torch.int64)
        values = flat[index].clone()
        source = _slot_sources(_raw(self._buffers["sparse_index"]).long(), index)
        hit = source >= 0
        values[hit] = self._buffers["sparse_base"][source[hit]]
        return values

    def _validate_sparse(self, sparse: dict, *, has_weight: bool):
        """A checkpoint's sparse state for this layer, checked against the layer: (index, base, total
        delta, frozen count). Raises (naming the layer) for a malformed state, another entry count
        (another selection), a bad index, or, without a weight in the checkpoint, pre-trained values
        that differ from this model's. Changes nothing."""
        label = self._label()
        index, base, total, frozen = _parse_sparse_state(sparse, label)
        n_model = self.adapted_count
        if index.numel() != n_model and n_model != 0:
            raise ValueError(
                f"{label}: the checkpoint adapts {index.numel()} entries but this layer {n_model}: the "
                "model was converted with another selection (SaRAConfig) or from other pre-trained "
                "weights. Convert the base model the same way before loading (resizing would break "
                "an optimizer or a DDP wrapper already holding the delta)"
            )
        weight = self._parameters["weight"]
        index = self._checked_index(index, weight, what="the checkpoint's sparse_index", frozen=frozen)
        base = base.to(device=weight.device, dtype=weight.dtype)
        if not has_weight:
            pretrained = self._pretrained_at(index)
            if not torch.equal(pretrained, base):
                bad = int((pretrained != base).sum())
                raise ValueError(
                    f"{label}: the checkpoint's pre-trained values differ from this model's at {bad} of "
                    f"{base.numel()} adapted entries: it was trained from other base weights"
                )
        return index, base, total.to(weight.device), frozen

    def _dense_fits(self, dense_weight: torch.Tensor, error_msgs: list) -> bool:
        """A dense weight can be loaded if it differs from the pre-trained one only at adapted
        entries (``self.weight`` holds the pre-trained values everywhere else)."""
        with torch.no_grad():
            current = _raw(self._parameters["weight"]).reshape(-1)
            other = dense_weight.detach().to(device=current.device, dtype=current.dtype).reshape(-1)
            differs = torch.nonzero(current != other).flatten()
            if differs.numel():
                adapted = _raw(self._buffers["sparse_index"]).long()
                outside = differs[~torch.isin(differs, adapted)]
                if outside.numel():
                    error_msgs.append(
                        f"{self._label()}: the dense weight in the state dict differs from this layer's "
                        f"pre-trained weight at {outside.numel()} entries outside its {adapted.numel()} "
                        "adapted entries, which a sparse-delta layer cannot represent (a checkpoint of "
                        "another model or another selection). Load a sara_kernels state dict (with its "
                        "sparse_* keys, e.g. sara_kernels.integrations.accelerate), or load the dense "
                        "weights before apply_sara"
                    )
                    return False
        return True

    def _load_dense(self) -> None:
        weight = self._parameters["weight"]
        with torch.no_grad():
            values = _raw(weight).reshape(-1)[_raw(self._buffers["sparse_index"]).long()].float()
            total = values - self._buffers["sparse_base"].float()
        if bool((total != 0).any()):
            warnings.warn(
                "sara_kernels: a dense state dict was loaded into sparse-delta layers: their deltas were "
                "recovered as (weight - pre-trained weight) at the adapted entries, which is exact "
                "for the weight's values but not for the fp32 deltas of bf16/fp16 weights, and "
                "keeps the model's own trainable/frozen split. For an exact resume, load a "
                "sara_kernels state dict (sparse_* keys; sara_kernels.integrations.accelerate "
                "writes one).",
                SparseStateWarning,
                stacklevel=4,
            )
        self.set_total_delta_(total)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._sparse_repr()}"

    def _sparse_repr(self) -> str:
        text = f"k={self.k}, density={self.density:.2%}"
        if self.frozen_count:
            text += f", frozen={self.frozen_count}"
        return text


def _qualified(cls: type) -> str:
    return f"nn.{cls.__name__}" if cls.__module__.startswith("torch.nn") else cls.__name__


def _slot_sources(old_index: torch.Tensor, new_index: torch.Tensor) -> torch.Tensor:
    """For each entry of ``new_index`` (int64), its position in ``old_index`` (int64), or -1."""
    if old_index.numel() == 0 or new_index.numel() == 0:
        return torch.full((new_index.numel(),), -1, dtype=torch.int64, device=new_index.device)
    old_index = old_index.to(new_index.device)
    order = torch.argsort(old_index)
    sorted_old = old_index[order]
    pos = torch.searchsorted(sorted_old, new_index).clamp(max=old_index.numel() - 1)
    hit = sorted_old[pos] == new_index
    return torch.where(hit, order[pos], torch.full_like(pos, -1))


def _resize_parameter(delta: torch.Tensor, values: torch.Tensor) -> None:
    """Give ``delta`` new data of another shape, keeping the Parameter object.

    Autograd caches a leaf's AccumulateGrad node with the old shape while any earlier graph holds
    it, and set_data resets that cache only on a dtype/device change: pass through fp64 so the next
    backward gets a node with the new shape."""
    torch._C.TensorBase.data.__set__(delta, values.double())
    torch._C.TensorBase.data.__set__(delta, values.to(torch.float32).contiguous())
    delta.grad = None
    delta.__dict__[_MERGED] = None


def _parse_sparse_state(sparse: dict, label: str):
    """(index [n], base [n], total delta fp32 [n], frozen count) from a layer's state-dict entries,
    in the current layout or the one before fixed slots (trainable and frozen entries apart)."""
    for name in ("sparse_index", "sparse_base", "sparse_delta"):
        if name not in sparse:
            raise ValueError(f"{label}: the state dict has some sparse_* keys but not {name}")
    index, base, delta = sparse["sparse_index"], sparse["sparse_base"], sparse["sparse_delta"]
    frozen_delta = sparse.get("sparse_frozen_delta")
    for name, t in (("sparse_index", index), ("sparse_base", base), ("sparse_delta", delta)):
        if not isinstance(t, torch.Tensor) or t.dim() != 1:
            raise ValueError(f"{label}: {name} in the state dict must be a 1-D tensor")
    if not delta.is_floating_point() or not base.is_floating_point():
        raise TypeError(f"{label}: sparse_delta and sparse_base must be floating point")
    if frozen_delta is None:
        frozen_delta = torch.zeros(0, dtype=torch.float32)
    if not isinstance(frozen_delta, torch.Tensor) or frozen_delta.dim() != 1:
        raise ValueError(f"{label}: sparse_frozen_delta in the state dict must be a 1-D tensor")
    if "sparse_frozen_index" in sparse or "sparse_frozen_base" in sparse:  # the layout before slots
        frozen_index = sparse.get("sparse_frozen_index")
        frozen_base = sparse.get("sparse_frozen_base")
        if frozen_index is None or frozen_base is None:
            raise ValueError(f"{label}: the state dict has one of sparse_frozen_index/base but not both")
        if not (frozen_index.numel() == frozen_base.numel() == frozen_delta.numel()):
            raise ValueError(f"{label}: the frozen entries' index, base and delta differ in length")
        if not (index.numel() == base.numel() == delta.numel()):
            raise ValueError(f"{label}: sparse_index, sparse_base and sparse_delta differ in length")
        index = torch.cat([index, frozen_index.to(index.dtype)])
        base = torch.cat([base, frozen_base.to(base.dtype)])
        delta = torch.cat([delta.float(), torch.zeros(frozen_delta.numel())])
    if not (index.numel() == base.numel() == delta.numel()):
        raise ValueError(f"{label}: sparse_index, sparse_base and sparse_delta differ in length")
    frozen = frozen_delta.numel()
    if frozen > index.numel():
        raise ValueError(f"{label}: {frozen} frozen deltas but only {index.numel()} entries")
    total = delta.detach().float().clone()
    if frozen:
        total[-frozen:] += frozen_delta.detach().float().to(total.device)
    if not bool(torch.isfinite(total).all()):
        raise ValueError(f"{label}: the checkpoint's deltas hold NaN or infinite values")
    return index.detach(), base.detach(), total, frozen


# The layer ops, called the same way eagerly and under torch.compile: one dispatcher call into the
# C++ autograd kernels (csrc/autograd.cpp).
_sparse_linear = torch.ops.sara_kernels.sparse_linear.default
_sparse_conv2d = torch.ops.sara_kernels.sparse_conv2d.default


class SparseDeltaLinear(_SparseDeltaMixin, nn.Linear):
    """``nn.Linear`` whose trainable part is a k-sized delta on selected weight entries.

    Build it from a dense layer with :meth:`from_dense`. ``isinstance(m, nn.Linear)`` holds.
    """

    _dense_type = nn.Linear

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
        layer = dict(bias=bias, device=device, dtype=dtype)
        super().__init__(in_features, out_features, **layer, index=index, threshold=threshold, k=k)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._maybe_merge()
        p, b = self._parameters, self._buffers
        if b["sparse_frozen_delta"].numel():  # re-selection froze some slots: train the first k
            index, delta = self._trainable()
        else:
            index, delta = b["sparse_index"], p["sparse_delta"]
        return _sparse_linear(input, p["weight"], p["bias"], index, delta)

    def to_dense(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding the merged weight (a copy)."""
        return self._dense_copy(
            nn.Linear(
                self.in_features,
                self.out_features,
                bias=self.bias is not None,
                device=self.weight.device,
                dtype=self.weight.dtype,
            )
        )


class _SparseConvMixin(_SparseDeltaMixin):
    """What the sparse-delta Conv1d/Conv2d/Conv3d share: padding modes, unbatched inputs, to_dense.

    Inputs may be batched ``[N, C, *spatial]`` or unbatched ``[C, *spatial]``, as for ``nn.ConvNd``.
    A ``channels_last`` weight is stored contiguous (a copy): the index addresses the row-major
    layout. Inputs in any memory format work."""

    #: Spatial dims of the convolution.
    _dims: int

    def _padded(self, input: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """Apply non-zero padding modes and string padding as nn.ConvNd does; returns the padding
        left for the convolution itself."""
        if self.padding_mode != "zeros":
            return F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode), [
                0
            ] * self._dims
        if isinstance(self.padding, str):
            # "valid" pads nothing; "same" may be asymmetric, which nn.ConvNd precomputes.
            return F.pad(input, self._reversed_padding_repeated_twice), [0] * self._dims
        return input, list(self.padding)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.dim() == self._dims + 1:  # unbatched [C, *spatial], as nn.ConvNd accepts
            return self.forward(input.unsqueeze(0)).squeeze(0)
        self._maybe_merge()
        index, delta = self._trainable()
        input, padding = self._padded(input)
        args = (list(self.stride), padding, list(self.dilation), self.groups)
        return self._conv(input, index, delta, args)

    def _conv(self, input, index, delta, args):
        """Conv1d / Conv3d: their autograd Function (autocast as nn.ConvNd computes)."""
        x, weight, bias = _autograd.autocast_args((input, self.weight, self.bias), input.device.type)
        return _autograd.SparseConvFunction.apply(x, weight, bias, index, delta, *args)

    def to_dense(self) -> nn.Module:
        """A plain ``nn.Conv1d/2d/3d`` holding the merged weight (a copy)."""
        return self._dense_copy(
            self._dense_type(
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
        )


class SparseDeltaConv1d(_SparseConvMixin, nn.Conv1d):
    """``nn.Conv1d`` whose trainable part is a k-sized delta on selected weight entries.

    Build it from a dense layer with :meth:`from_dense`. ``isinstance(m, nn.Conv1d)`` holds.
    The delta's gradient is the Conv2d sampled gradient with height 1 (the same flat index)."""

    _dense_type = nn.Conv1d
    _dims = 1

    def _conv(self, input, index, delta, args):
        # The exact reduction to the conv2d op: height 1 on the input and the weight.
        stride, padding, dilation, groups = args
        out = _sparse_conv2d(
            input.unsqueeze(2),
            self.weight.unsqueeze(2),
            self.bias,
            index,
            delta,
            [1, *stride],
            [0, *padding],
            [1, *dilation],
            groups,
        )
        return out.squeeze(2)


class SparseDeltaConv2d(_SparseConvMixin, nn.Conv2d):
    """``nn.Conv2d`` whose trainable part is a k-sized delta on selected weight entries.

    Build it from a dense layer with :meth:`from_dense`. ``isinstance(m, nn.Conv2d)`` holds.
    Inputs may be batched ``[N, C, H, W]`` or unbatched ``[C, H, W]``, as for ``nn.Conv2d``.
    """

    _dense_type = nn.Conv2d
    _dims = 2

    def _conv(self, input, index, delta, args):
        p = self._parameters
        return _sparse_conv2d(input, p["weight"], p["bias"], index, delta, *args)


class SparseDeltaConv3d(_SparseConvMixin, nn.Conv3d):
    """``nn.Conv3d`` whose trainable part is a k-sized delta on selected weight entries.

    Build it from a dense layer with :meth:`from_dense`. ``isinstance(m, nn.Conv3d)`` holds.
    The delta's gradient is computed per temporal tap as a Conv2d sampled gradient over the frames
    that tap reads (:func:`sara_kernels.ops.sampled_weight_grad_conv3d`)."""

    _dense_type = nn.Conv3d
    _dims = 3


class SparseDeltaEmbedding(_SparseDeltaMixin, nn.Embedding):
    """``nn.Embedding`` whose trainable part is a k-sized delta on selected table entries.

    Build it from a dense layer with :meth:`from_dense`. ``isinstance(m, nn.Embedding)`` holds.
    Entry ``(r, c)`` gets the sum of the output gradient at column ``c`` over the tokens equal to
    ``r``, computed without a dense ``[V, D]`` gradient. ``padding_idx`` (its row gets no gradient)
    and ``scale_grad_by_freq`` behave as in ``nn.Embedding``. Refused: ``max_norm`` (the forward
    would renormalise rows of the weight in place, outside the merged state) and ``sparse=True``
    (the delta's gradient is dense over the k entries already).
    """

    _dense_type = nn.Embedding

    def _init_sparse(self, index, threshold, k) -> None:
        self.__dict__.setdefault("_sparse_name", None)
        if self.max_norm is not None:
            raise ValueError(
                f"{self._label()}: max_norm={self.max_norm} is not supported: nn.Embedding renormalises "
                "the looked-up rows of the weight in place in its forward, which would overwrite the "
                "merged weight; use an Embedding without max_norm"
            )
        if self.sparse:
            raise ValueError(
                f"{self._label()}: sparse=True (sparse weight gradients) is not supported: the weight is "
                "frozen and the k-sized delta gets a dense gradient; use sparse=False"
            )
        super()._init_sparse(index, threshold, k)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._maybe_merge()
        index, delta = self._trainable()
        return _autograd.SparseEmbeddingFunction.apply(
            input, self.weight, index, delta, self.padding_idx, self.scale_grad_by_freq
        )

    def to_dense(self) -> nn.Embedding:
        """A plain ``nn.Embedding`` holding the merged weight (a copy)."""
        return self._dense_copy(
            nn.Embedding(
                self.num_embeddings,
                self.embedding_dim,
                padding_idx=self.padding_idx,
                max_norm=self.max_norm,
                norm_type=self.norm_type,
                scale_grad_by_freq=self.scale_grad_by_freq,
                sparse=self.sparse,
                device=self.weight.device,
                dtype=self.weight.dtype,
            )
        )


#: Every sparse-delta layer type, and the dense type it converts.
SPARSE_LAYER_TYPES = (
    SparseDeltaLinear,
    SparseDeltaConv1d,
    SparseDeltaConv2d,
    SparseDeltaConv3d,
    SparseDeltaEmbedding,
)
DENSE_TYPES = tuple(cls._dense_type for cls in SPARSE_LAYER_TYPES)


def sparse_type_for(module: nn.Module) -> type | None:
    """The sparse-delta layer type that converts ``module``, an instance (or subclass instance) of
    one of the dense types, which are disjoint (None when there is none)."""
    for cls in SPARSE_LAYER_TYPES:
        if isinstance(module, cls._dense_type):
            return cls
    return None


__all__ = [
    "DeltaParameter",
    "SparseDeltaConv1d",
    "SparseDeltaConv2d",
    "SparseDeltaConv3d",
    "SparseDeltaEmbedding",
    "SparseDeltaLinear",
    "SparseStateWarning",
    "dense_state_dict",
    "follow_slots",
    "layer_of",
    "mark_merged",
]
