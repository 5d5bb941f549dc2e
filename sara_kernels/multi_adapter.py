"""Many SaRA adapters resident on one model: switch and mix them in O(k), at inference.

A SaRA adapter is k deltas at known weight entries. Loaded under a name
(``load_adapter(model, path, adapter_name="style")``), it stays resident as its file's compact
vectors (index, fp32 delta) instead of being merged for good, and

* :func:`set_adapters` makes the weights ``W0 + Σ wᵢ·ΔPᵢ`` by writing only the entries of the
  adapters that were active and of those that become active;
* :func:`disable_adapters` writes the pre-trained values back, bit for bit;
* :func:`delete_adapter` drops one, :func:`list_adapters` says what is resident and active.

The layers stay plain ``nn.Linear``/``nn.Conv*``/``nn.Embedding``: a forward costs exactly what the base model's
costs, whatever is active. Per layer the registry keeps, besides each adapter's tensors, the
pre-trained values at the union of the resident adapters' entries (in the weight's dtype), which
is what makes :func:`disable_adapters` exact. No dense copy of any weight is made.

The registry owns the weights at those entries. Before a switch writes a layer it compares every
resident entry with what the adapter functions last wrote (O(U), the order of the switch itself),
so a weight written by anything else after a load (``load_state_dict``, an optimizer step, a write
through ``.data``, which no version counter sees) is refused, never overwritten with stale
pre-trained values; a layer found holding exactly its pre-trained values (the base weights loaded
again) is taken as holding no adapter. ``model.to(dtype)`` / ``.to(device)`` are followed (the
stored pre-trained values are cast or moved at the next switch; cast before loading to keep them
exact for a lossy round trip such as fp32 → fp16 → fp32), and so is any strided layout of the
weight (``channels_last``).

Switching while a forward runs through the model in another thread is refused: a forward holds
the registry's lock only to count itself in and out, and :func:`set_adapters` raises while another
live thread is inside one; a forward that starts during a switch waits for it. Not seen: forwards
through a submodule called directly, and forwards inside a compiled graph (``torch.compile``
traces the counting hooks away, ``fullgraph=True`` included) — switch between those yourself. A
compiled graph with frozen weights (``torch._inductor.config.freezing``) does not see a switch.
"""

from __future__ import annotations

import contextlib
import copy
import math
import numbers
import threading
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from sara_kernels import _checks
from sara_kernels import ops as sk
from sara_kernels.adapter import AdapterError, AdapterWarning
from sara_kernels.nn import unwrap_model

#: Attribute of the (unwrapped) model that holds its registry.
REGISTRY_ATTR = "_sara_adapters"


def target_module(model: Any, fn: str) -> nn.Module:
    """The module adapters go into: ``model`` itself (unwrapped from DDP / ``torch.compile``), or a
    diffusers pipeline's ``unet`` / ``transformer``."""
    if isinstance(model, nn.Module):
        return unwrap_model(model)
    for attr in ("unet", "transformer"):
        module = getattr(model, attr, None)
        if isinstance(module, nn.Module):
            return unwrap_model(module)
    raise TypeError(
        f"{fn}: expected an nn.Module or a pipeline with a .unet or .transformer, got {type(model).__name__}"
    )


@dataclass
class _Slot:
    """One layer touched by resident adapters: the union of their entries and the pre-trained
    values there."""

    name: str
    module: nn.Module
    index: torch.Tensor  # [U] sorted flat (row-major) indices, int32 (int64 for >= 2**31 entries)
    base: torch.Tensor  # [U] weight dtype
    shape: tuple[int, ...]  # the weight's shape at the load
    adapters: list[str] = field(default_factory=list)  # names resident on this layer, load order


@dataclass
class _Resident:
    name: str
    path: str
    #: layer name -> (positions [k] into the slot's union index, sorted; delta [k] fp32)
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]]

    @property
    def entries(self) -> int:
        return sum(int(index.numel()) for index, _ in self.layers.values())

    @property
    def nbytes(self) -> int:
        return sum(
            i.numel() * i.element_size() + d.numel() * d.element_size() for i, d in self.layers.values()
        )


class AdapterRegistry:
    """The adapters resident on one model (kept at ``model._sara_adapters``; use the functions of
    this module rather than this object)."""

    def __init__(self, root: nn.Module):
        self.slots: dict[str, _Slot] = {}
        self.adapters: dict[str, _Resident] = {}
        self.active: dict[str, float] = {}
        self._lock = threading.Lock()
        self._depth: dict[int, int] = {}  # thread ident -> forwards of the model it is inside
        self._hooks = [
            root.register_forward_pre_hook(self._enter),
            root.register_forward_hook(self._leave, always_call=True),
        ]

    # -- forwards in flight ---------------------------------------------------------------------
    def _enter(self, module, args) -> None:
        if torch.compiler.is_compiling():
            return  # inside a compiled graph (fullgraph=True cannot trace a lock): not counted
        with self._lock:
            thread = threading.get_ident()
            self._depth[thread] = self._depth.get(thread, 0) + 1

    def _leave(self, module, args, output) -> None:
        if torch.compiler.is_compiling():
            return
        with self._lock:
            thread = threading.get_ident()
            depth = self._depth.get(thread, 0) - 1  # never below 0 (a failed hook before ours)
            if depth > 0:
                self._depth[thread] = depth
            else:
                self._depth.pop(thread, None)

    def _forwards_elsewhere(self) -> bool:
        """Whether another live thread is inside a forward of the model (call with the lock held).
        The calling thread's own count is dropped: it is not running a forward while it switches
        (a count left by an interrupted forward, e.g. KeyboardInterrupt, would block it forever)."""
        self._depth.pop(threading.get_ident(), None)
        if not self._depth:
            return False
        alive = {t.ident for t in threading.enumerate()}
        for thread in [t for t in self._depth if t not in alive]:
            del self._depth[thread]  # a thread that died inside a forward
        return bool(self._depth)

    def remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def __deepcopy__(self, memo):
        new = AdapterRegistry.__new__(AdapterRegistry)
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            if key == "_lock":
                new._lock = threading.Lock()
            elif key == "_depth":
                new._depth = {}
            else:
                setattr(new, key, copy.deepcopy(value, memo))
        return new

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_lock"] = None
        state["_depth"] = {}
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # -- helpers --------------------------------------------------------------------------------
    def resident(self, layer_name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(index, pre-trained values) of the entries resident adapters own in a layer, or None."""
        slot = self.slots.get(layer_name)
        return None if slot is None else (slot.index, slot.base)

    def check_names(self, fn: str, names: Sequence[str]) -> None:
        for name in names:
            if name not in self.adapters:
                known = ", ".join(repr(n) for n in self.adapters) or "none"
                raise KeyError(f"{fn}: no adapter named {name!r} is loaded (loaded: {known})")


def registry_of(model: nn.Module) -> AdapterRegistry | None:
    registry = model.__dict__.get(REGISTRY_ATTR)
    return registry if isinstance(registry, AdapterRegistry) else None


def holds_adapters(model: nn.Module) -> list[str]:
    """Names of the modules of ``model`` (itself: '') that hold named adapters."""
    return [name for name, module in model.named_modules() if registry_of(module) is not None]


def _registry_for_write(model: nn.Module) -> AdapterRegistry:
    registry = registry_of(model)
    if registry is None:
        registry = AdapterRegistry(model)
        model.__dict__[REGISTRY_ATTR] = registry
    return registry


def drop_registry(model: nn.Module) -> None:
    """Forget the resident adapters, keeping the weights as they are (``merge_and_unload``)."""
    registry = registry_of(model)
    if registry is not None:
        registry.remove_hooks()
        del model.__dict__[REGISTRY_ATTR]


@contextlib.contextmanager
def _locked(registry: AdapterRegistry, fn: str) -> Iterator[None]:
    """Hold the registry's lock; refuse while a forward runs through the model in another thread
    (a forward that starts meanwhile waits in its pre-hook)."""
    with registry._lock:
        if registry._forwards_elsewhere():
            raise RuntimeError(
                f"{fn}: a forward through the model is running in another thread; switch adapters "
                "between forwards"
            )
        yield


# ---------------------------------------------------------------------------------------------
# Reading and writing weight entries (any strided layout, e.g. channels_last)
# ---------------------------------------------------------------------------------------------
def _index_dtype(numel: int) -> torch.dtype:
    return torch.int32 if numel < 2**31 else torch.int64


def _storage_view(weight: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(a flat view of the memory ``weight`` spans, whether flat indices address it directly)."""
    weight = weight.detach()
    if weight.is_contiguous():
        return weight.view(-1), True
    extent = 1 + sum((size - 1) * stride for size, stride in zip(weight.shape, weight.stride(), strict=True))
    return weight.as_strided((extent,), (1,)), False


def _offsets(weight: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Memory offsets (int64) of the row-major flat indices ``index`` in a strided ``weight``."""
    rest = index.long()
    offsets = torch.zeros_like(rest)
    for size, stride in zip(reversed(weight.shape), reversed(weight.stride()), strict=True):
        offsets += (rest % size) * stride
        rest = rest // size
    return offsets


def _read(weight: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``weight`` at the row-major flat indices ``index`` (a copy), in any layout."""
    flat, direct = _storage_view(weight)
    return flat.index_select(0, index if direct else _offsets(weight, index))


def _merge(weight: torch.Tensor, index: torch.Tensor, base: torch.Tensor, delta: torch.Tensor | None) -> None:
    """``weight[index] = (base + delta).to(weight.dtype)`` in fp32 (``base`` when ``delta`` is
    None): the library's merge and restore ops on a contiguous weight, the same arithmetic through
    memory offsets on any other layout."""
    flat, direct = _storage_view(weight)
    if direct:
        if delta is None:
            sk.restore_(weight, index, base)
        else:
            sk.scatter_merge_(weight, index, base, delta)
        return
    values = base if delta is None else (base.float() + delta).to(weight.dtype)
    flat.index_copy_(0, _offsets(weight, index), values)


def _union_total(registry: AdapterRegistry, slot: _Slot, weights: dict[str, float]) -> torch.Tensor:
    """Σ w·Δ over the slot's union (fp32 ``[U]``), summed in load order: the one place where a
    combination's arithmetic is defined (the writes and the content check both use it)."""
    total = torch.zeros(slot.index.numel(), dtype=torch.float32, device=slot.index.device)
    for name in slot.adapters:
        if name in weights:
            positions, delta = registry.adapters[name].layers[slot.name]
            total.index_add_(0, positions, delta * weights[name])
    return total


def _expected(registry: AdapterRegistry, slot: _Slot, active: dict[str, float]) -> torch.Tensor:
    """The values the slot's entries hold with ``active`` applied, in the stored base's dtype."""
    return (slot.base.float() + _union_total(registry, slot, active)).to(slot.base.dtype)


def _label(name: str) -> str:
    return repr(name) if name else "'' (the model itself)"


def _sync(registry: AdapterRegistry, slot: _Slot, fn: str, root: nn.Module) -> dict[str, float]:
    """Check a layer before writing it, and return the combination it actually holds.

    The layer must be the module the adapters were loaded into, with a weight of the same shape;
    its entries must hold the active combination as the registry wrote it (or the pre-trained
    values: the base weights were loaded again, then the layer holds no adapter). This compares
    every resident entry (O(U)), because a write through ``.data`` or ``torch.no_grad`` copies does
    not show in any counter. A dtype or device change of the weight is followed (the comparison
    is made in the weight's dtype).
    """
    label = _label(slot.name)
    try:
        current = root.get_submodule(slot.name) if slot.name else root
    except AttributeError:
        current = None
    if current is not slot.module:
        raise RuntimeError(
            f"{fn}: layer {label} was replaced since its adapters were loaded; merge_and_unload(model) "
            "drops the resident adapters (keeping the weights as they are), then load them again"
        )
    weight = slot.module.weight
    if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != slot.shape:
        got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise RuntimeError(
            f"{fn}: the weight of layer {label} changed shape since the load: {slot.shape} -> {got}"
        )
    with torch.no_grad():
        if slot.base.device != weight.device:
            slot.index = slot.index.to(weight.device)
            slot.base = slot.base.to(weight.device)
            for name in slot.adapters:
                layers = registry.adapters[name].layers
                positions, delta = layers[slot.name]
                layers[slot.name] = (positions.to(weight.device), delta.to(weight.device))
        held = _read(weight, slot.index)
        if torch.equal(held, _expected(registry, slot, registry.active).to(weight.dtype)):
            state = registry.active
        elif torch.equal(held, slot.base.to(weight.dtype)):
            state = {}
        else:
            raise RuntimeError(
                f"{fn}: the weight of layer {label} was written by something other than the adapter "
                "functions since the adapters were loaded (load_state_dict, an optimizer step, a write "
                "through .data), so its pre-trained values at the adapted entries are unknown; load the "
                "base weights again, or merge_and_unload(model) to keep the weights as they are"
            )
        if slot.base.dtype != weight.dtype:
            slot.base = slot.base.to(weight.dtype)
    return state


def _write(registry: AdapterRegistry, slot: _Slot, old: dict[str, float], new: dict[str, float]) -> None:
    """Make the weight ``base + Σ w·Δ`` over ``new``, writing only the entries of the adapters in
    ``old`` or ``new`` (every other entry already holds its pre-trained value).

    Two passes, each a gather of k compact values and a scatter into the weight: the entries of
    the adapters leaving the combination get their pre-trained values back, then those of the
    combination are merged (an entry in both is written twice; the switch holds the lock, no
    forward sees the middle). A single adapter needs no union arithmetic; a mix sums its deltas in
    fp32 over the slot's union first (in load order), so each entry is rounded once.
    """
    adapters = registry.adapters
    if {n: w for n, w in old.items() if n in slot.adapters} == {
        n: w for n, w in new.items() if n in slot.adapters
    }:
        return  # the layer already holds this combination (checked by _sync)
    leaving = [n for n in old if n not in new and n in slot.adapters]
    active = [(n, new[n]) for n in slot.adapters if n in new]  # load order, whatever the call's order
    if not leaving and not active:
        return
    weight = slot.module.weight
    index, base = slot.index, slot.base
    # The positions index the slot's union, whose entries were range- and order-checked when the
    # adapters were read (and the weight's shape by _sync): the ops' per-call index pass (about a
    # third of a switch) is skipped.
    with torch.no_grad(), _checks.index_checks(False):
        for name in leaving:
            positions = adapters[name].layers[slot.name][0]
            _merge(weight, index.index_select(0, positions), base.index_select(0, positions), None)
        if len(active) == 1:
            name, w = active[0]
            positions, delta = adapters[name].layers[slot.name]
            _merge(weight, index.index_select(0, positions), base.index_select(0, positions), delta * w)
        elif active:
            total = _union_total(registry, slot, dict(active))
            if len(active) == len(slot.adapters):  # every resident adapter active: the whole union
                _merge(weight, index, base, total)
            else:  # only the entries the active adapters own
                touched = torch.zeros(index.numel(), dtype=torch.bool, device=index.device)
                for name, _ in active:
                    touched[adapters[name].layers[slot.name][0]] = True
                where = touched.nonzero().squeeze(1)
                _merge(weight, index[where], base[where], total[where])


def _switch(
    model: nn.Module, registry: AdapterRegistry, new: dict[str, float], fn: str, *, tolerant: bool = False
) -> None:
    """Check every layer the switch touches, then write them: all or nothing (``tolerant``: a layer
    that fails its check is left as it is, with a warning, and the others are written)."""
    old = registry.active
    names = set(old) | set(new)
    plan = []
    for slot in registry.slots.values():
        if any(n in names for n in slot.adapters):
            try:
                plan.append((slot, _sync(registry, slot, fn, model)))
            except RuntimeError as exc:
                if not tolerant:
                    raise
                warnings.warn(f"{exc}; left as it is", AdapterWarning, stacklevel=3)
    for slot, held in plan:
        _write(registry, slot, held, new)
    registry.active = dict(new)


# ---------------------------------------------------------------------------------------------
# Loading (called by adapter.load_adapter after every record was validated)
# ---------------------------------------------------------------------------------------------
def add_resident(
    model: nn.Module,
    name: str,
    path: str,
    plan: list[tuple[str, nn.Module, torch.Tensor, torch.Tensor]],
    weight: float,
    combine: bool,
    replace: bool,
) -> None:
    """Make an adapter resident (``plan``: layer name, module, index, fp32 delta, all checked)
    and active: alone, or added to the active set with ``combine``."""
    fn = "load_adapter"
    created = registry_of(model) is None
    registry = _registry_for_write(model)
    try:
        with _locked(registry, fn):
            if name in registry.adapters and not replace:
                raise AdapterError(
                    f"{fn}: an adapter named {name!r} is already loaded; pass replace=True to replace it, "
                    "or delete_adapter(model, name) first"
                )
            owners = {id(slot.module.weight): slot.name for slot in registry.slots.values()}
            for layer_name, module, _, _ in plan:
                if module.weight.is_inference():
                    raise AdapterError(
                        f"{fn}: the weight of layer {_label(layer_name)} is an inference tensor (the model "
                        "was built or loaded under torch.inference_mode), which cannot be written outside "
                        "it; build the model outside inference_mode (switching inside it is fine)"
                    )
                other = owners.setdefault(id(module.weight), layer_name)
                if other != layer_name:
                    raise AdapterError(
                        f"{fn}: layers {other!r} and {layer_name!r} share one weight tensor; named "
                        "adapters need one layer per weight (load this adapter without adapter_name)"
                    )
                slot = registry.slots.get(layer_name)
                if slot is not None:
                    _sync(registry, slot, fn, model)  # the union's pre-trained values still hold
            # Everything is checked: from here on the registry changes.
            if name in registry.adapters:
                _delete(model, registry, name, fn)
            _add(model, registry, name, path, plan, weight, combine)
    except BaseException:
        if created and not registry.adapters:
            drop_registry(model)
        raise


def _add(model, registry, name, path, plan, weight, combine) -> None:
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    with torch.no_grad():
        for layer_name, module, index, delta in plan:
            weight_tensor = module.weight
            device = weight_tensor.device
            index_dtype = _index_dtype(weight_tensor.numel())
            index = index.to(device=device, dtype=index_dtype)
            delta = delta.to(device=device, dtype=torch.float32)
            slot = registry.slots.get(layer_name)
            if slot is None:
                # Nothing resident here: the weight holds its pre-trained values everywhere.
                base = _read(weight_tensor, index)
                slot = _Slot(layer_name, module, index.clone(), base, tuple(weight_tensor.shape))
                registry.slots[layer_name] = slot
            else:
                fresh = index[~torch.isin(index, slot.index)]
                if fresh.numel():
                    # Entries no resident adapter owns hold their pre-trained values.
                    union = torch.cat([slot.index, fresh])
                    base = torch.cat([slot.base, _read(weight_tensor, fresh)])
                    order = torch.argsort(union)
                    moved = torch.empty_like(order)
                    moved[order] = torch.arange(order.numel(), device=order.device)
                    slot.index, slot.base = union[order], base[order]
                    for other in slot.adapters:  # their positions into the grown union
                        positions, other_delta = registry.adapters[other].layers[layer_name]
                        registry.adapters[other].layers[layer_name] = (
                            moved[positions].to(index_dtype),
                            other_delta,
                        )
            slot.adapters.append(name)
            layers[layer_name] = (torch.searchsorted(slot.index, index).to(index_dtype), delta)
    registry.adapters[name] = _Resident(name, path, layers)
    new = dict(registry.active) if combine else {}
    new[name] = weight
    _switch(model, registry, new, "load_adapter")


def _delete(model: nn.Module, registry: AdapterRegistry, name: str, fn: str) -> None:
    """Drop one adapter: out of the active combination first (a layer whose check fails is left as
    it is, with a warning: deleting is also the way out of a broken state), then its tensors and
    the union entries only it owned."""
    if name in registry.active:
        _switch(model, registry, {n: w for n, w in registry.active.items() if n != name}, fn, tolerant=True)
    resident = registry.adapters.pop(name)
    for layer_name in resident.layers:
        slot = registry.slots[layer_name]
        slot.adapters.remove(name)
        if not slot.adapters:
            del registry.slots[layer_name]
            continue
        keep = torch.zeros(slot.index.numel(), dtype=torch.bool, device=slot.index.device)
        for other in slot.adapters:
            keep[registry.adapters[other].layers[layer_name][0]] = True
        if bool(keep.all()):
            continue
        rank = torch.cumsum(keep, 0) - 1
        slot.index, slot.base = slot.index[keep], slot.base[keep]
        for other in slot.adapters:
            positions, delta = registry.adapters[other].layers[layer_name]
            registry.adapters[other].layers[layer_name] = (rank[positions].to(positions.dtype), delta)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------
def _number(fn: str, name: str, w: Any) -> float:
    if isinstance(w, torch.Tensor) and w.numel() == 1:
        w = w.item()
    if isinstance(w, bool) or not isinstance(w, numbers.Real):
        raise TypeError(f"{fn}: the weight of {name!r} must be a real number, got {type(w).__name__}")
    w = float(w)
    if not math.isfinite(w):
        raise ValueError(f"{fn}: the weight of {name!r} must be finite, got {w}")
    return w


def _names(fn: str, names: Any) -> list[str]:
    names = [names] if isinstance(names, str) else list(names)
    if not all(isinstance(n, str) for n in names):
        raise TypeError(f"{fn}: adapter names must be strings, got {names!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"{fn}: an adapter is named twice in {names}")
    return names


def _weights(fn: str, names: list[str], weights) -> list[float]:
    if weights is None:
        return [1.0] * len(names)
    if isinstance(weights, torch.Tensor):
        weights = weights.reshape(-1).tolist() if weights.dim() else weights.item()
    if isinstance(weights, numbers.Real):
        weights = [weights] * len(names)
    weights = list(weights)
    if len(weights) != len(names):
        raise ValueError(f"{fn}: {len(names)} adapter names but {len(weights)} weights")
    return [_number(fn, n, w) for n, w in zip(names, weights, strict=True)]


def set_adapters(
    model: Any,
    names: str | Sequence[str],
    weights: float | Sequence[float] | None = None,
    *,
    adapter_weights: float | Sequence[float] | None = None,
    _fn: str = "set_adapters",
) -> None:
    """Make the weights equal to ``base + Σ wᵢ·ΔPᵢ`` over the named resident adapters.

    Only the entries of the adapters active before or after the call are written (O(k) per
    switch, no dense pass); the forward afterwards runs at the base model's speed. Everything is
    checked before anything is written, including that every entry the switch touches still
    holds what the adapter functions wrote. Adapters add on shared entries in fp32, in the order
    they were loaded (whatever the order of ``names``), and each weight is rounded once
    (``(base + Σ wᵢΔᵢ).to(weight.dtype)``), exactly as loading them in that order with
    ``load_adapter(alpha=wᵢ, combine=True)`` and ``merge_and_unload`` does.

    Args:
        model: the model the adapters were loaded into (or its pipeline).
        names: one adapter name or a list of them (an empty list disables every adapter).
        weights: one weight for all, or one per name (default 1.0 each); ``adapter_weights`` is
            the same argument under the name diffusers' pipelines use.

    Raises:
        KeyError: a name is not loaded (e.g. deleted).
        ValueError: duplicate names, a weight count that differs, a non-finite weight.
        RuntimeError: a forward is running in another thread; a layer was replaced, or its weight
            resized or written by something else since the load.
    """
    fn = _fn
    if adapter_weights is not None:
        if weights is not None:
            raise TypeError(f"{fn}: give weights or adapter_weights, not both")
        weights = adapter_weights
    root = target_module(model, fn)
    names = _names(fn, names)
    values = _weights(fn, names, weights)
    registry = registry_of(root)
    if registry is None:
        if names:
            raise KeyError(
                f"{fn}: no adapter is loaded in this {type(root).__name__} (load_adapter(..., adapter_name=))"
            )
        return
    new = dict(zip(names, values, strict=True))
    with _locked(registry, fn):
        registry.check_names(fn, names)
        _switch(root, registry, new, fn)


def disable_adapters(model: Any) -> None:
    """Write the pre-trained values back at every entry an active adapter changed: the base
    weights, bit for bit. The adapters stay resident (:func:`set_adapters` activates them again)."""
    set_adapters(model, [], _fn="disable_adapters")


def delete_adapter(model: Any, name: str | Sequence[str]) -> None:
    """Remove resident adapter(s) and release their memory. An active one is first taken out of
    the active combination (the others stay active with their weights); a layer whose weights
    were changed behind the adapter functions' back is left as it is, with a warning."""
    fn = "delete_adapter"
    root = target_module(model, fn)
    names = _names(fn, name)
    registry = registry_of(root)
    if registry is None:
        raise KeyError(f"{fn}: no adapter is loaded in this {type(root).__name__}")
    with _locked(registry, fn):
        registry.check_names(fn, names)
        for n in names:
            _delete(root, registry, n, fn)
    if not registry.adapters:
        drop_registry(root)


def list_adapters(model: Any) -> dict[str, dict[str, Any]]:
    """The resident adapters, in load order: ``{name: {"active": bool, "weight": float | None,
    "path": str, "layers": int, "entries": int, "bytes": int}}`` (``bytes``: the adapter's
    resident index and delta tensors)."""
    root = target_module(model, "list_adapters")
    registry = registry_of(root)
    if registry is None:
        return {}
    with registry._lock:
        return {
            name: {
                "active": name in registry.active,
                "weight": registry.active.get(name),
                "path": resident.path,
                "layers": len(resident.layers),
                "entries": resident.entries,
                "bytes": resident.nbytes,
            }
            for name, resident in registry.adapters.items()
        }


def resident_bytes(model: Any) -> int:
    """Bytes the registry holds: every resident adapter's tensors plus the pre-trained values and
    union index per layer."""
    registry = registry_of(target_module(model, "resident_bytes"))
    if registry is None:
        return 0
    slots = sum(
        s.index.numel() * s.index.element_size() + s.base.numel() * s.base.element_size()
        for s in registry.slots.values()
    )
    return slots + sum(r.nbytes for r in registry.adapters.values())


__all__ = [
    "AdapterRegistry",
    "delete_adapter",
    "disable_adapters",
    "holds_adapters",
    "list_adapters",
    "resident_bytes",
    "set_adapters",
]
