"""Many SaRA adapters resident on one model: switch and mix them in O(k), at inference.

A SaRA adapter is k deltas at known weight entries. Loaded under a name
(``load_adapter(model, path, adapter_name="style")``), it stays resident as its file's compact
vectors (index, fp32 delta) instead of being merged for good, and

* :func:`set_adapters` makes the weights ``W0 + Σ wᵢ·ΔPᵢ`` by writing only the entries of the
  adapters that were active and of those that become active;
* :func:`disable_adapters` writes the pre-trained values back, bit for bit;
* :func:`delete_adapter` drops one, :func:`list_adapters` says what is resident and active.

The layers stay plain ``nn.Linear``/``nn.Conv2d``: a forward costs exactly what the base model's
costs, whatever is active. Per layer the registry keeps, besides each adapter's tensors, the
pre-trained values at the union of the resident adapters' entries (in the weight's dtype), which
is what makes :func:`disable_adapters` exact. No dense copy of any weight is made.

The registry owns the weights at those entries: a weight written by anything else after a load
(``load_state_dict``, an optimizer, a direct write) is detected from its version counter at the
next switch and refused, never overwritten with stale pre-trained values. ``model.to(dtype)`` /
``.to(device)`` are followed (the stored pre-trained values are cast or moved at the next switch;
cast before loading to keep them exact for a lossy round trip such as fp32 → fp16 → fp32).

Switching while a forward runs in another thread is refused: a forward through the model holds
the registry's lock only to count itself in and out, and :func:`set_adapters` raises while the
count is not zero; a forward that starts during a switch waits for it. (Forwards through a
submodule called directly, or through a compiled graph with frozen weights
(``torch._inductor.config.freezing``), are not seen: switch outside them.)
"""

from __future__ import annotations

import copy
import math
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from sara_kernels import _checks
from sara_kernels import ops as sk
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
    index: torch.Tensor  # [U] sorted, int32 (int64 for weights of 2**31 entries or more)
    base: torch.Tensor  # [U] weight dtype
    version: int  # weight._version after the registry's last write (or when the slot was made)
    adapters: list[str] = field(default_factory=list)  # names resident on this layer, load order
    weight_ref: Any = None  # weakref to the weight tensor ``version`` belongs to
    shape: tuple[int, ...] = ()  # the weight's shape at the load

    def __getstate__(self):  # deepcopy / pickle: a weakref does not travel (the copy re-verifies)
        state = self.__dict__.copy()
        state["weight_ref"] = None
        return state


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
        self._in_flight = 0
        self._hooks = [
            root.register_forward_pre_hook(self._enter),
            root.register_forward_hook(self._leave, always_call=True),
        ]

    # -- forwards in flight ---------------------------------------------------------------------
    def _enter(self, module, args) -> None:
        with self._lock:
            self._in_flight += 1

    def _leave(self, module, args, output) -> None:
        with self._lock:
            self._in_flight -= 1

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
            elif key == "_in_flight":
                new._in_flight = 0
            else:
                setattr(new, key, copy.deepcopy(value, memo))
        return new

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_lock"] = None
        state["_in_flight"] = 0
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


# ---------------------------------------------------------------------------------------------
# Writing a combination
# ---------------------------------------------------------------------------------------------
def _index_dtype(numel: int) -> torch.dtype:
    return torch.int32 if numel < 2**31 else torch.int64


def _sync(registry: AdapterRegistry, slot: _Slot, fn: str, root: nn.Module) -> None:
    """Check the layer is the one the adapters were loaded into, its weight was not written by
    anything else since; follow a dtype or device change of the weight."""
    label = repr(slot.name) if slot.name else "'' (the model itself)"
    try:
        current = root.get_submodule(slot.name) if slot.name else root
    except AttributeError:
        current = None
    if current is not slot.module:
        raise RuntimeError(
            f"{fn}: layer {label} was replaced since its adapters were loaded; "
            "delete the adapters and load them again"
        )
    weight = slot.module.weight
    if (
        not isinstance(weight, torch.Tensor)
        or not weight.is_contiguous()
        or tuple(weight.shape) != slot.shape
    ):
        raise RuntimeError(
            f"{fn}: the weight of layer {label} is no longer a contiguous tensor of shape {slot.shape} "
            f"(got {tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__})"
        )
    if slot.weight_ref is None or slot.weight_ref() is not weight:
        # A new weight tensor (a deep copy, an unpickled model, load_state_dict(assign=True)) is
        # accepted when it holds what the registry last wrote at every resident entry.
        if _holds_expected(registry, slot, weight):
            slot.weight_ref, slot.version = weakref.ref(weight), weight._version
        else:
            slot.version = -1
    if weight._version != slot.version:
        raise RuntimeError(
            f"{fn}: the weight of layer {label} was written by something other than the adapter functions "
            "since the adapters were loaded (load_state_dict, an optimizer step, a direct write), so its "
            "pre-trained values are unknown at the adapted entries; load the base weights again, or "
            "merge_and_unload(model) to keep the weights as they are"
        )
    device, dtype = weight.device, weight.dtype
    if slot.base.device != device or slot.base.dtype != dtype:
        slot.base = slot.base.to(device=device, dtype=dtype)
    if slot.index.device != device:
        slot.index = slot.index.to(device)
        for name in slot.adapters:
            layers = registry.adapters[name].layers
            positions, delta = layers[slot.name]
            layers[slot.name] = (positions.to(device), delta.to(device))


def _holds_expected(registry: AdapterRegistry, slot: _Slot, weight: torch.Tensor) -> bool:
    """Whether ``weight`` holds, at the slot's entries, the active combination as the registry
    wrote it (cast to the weight's dtype if that changed since): O(U)."""
    with torch.no_grad():
        device = weight.device
        total = torch.zeros(slot.index.numel(), dtype=torch.float32, device=device)
        for name in slot.adapters:
            if name in registry.active:
                w = registry.active[name]
                positions, delta = registry.adapters[name].layers[slot.name]
                total.index_add_(0, positions.to(device), delta.to(device) * w)
        base = slot.base.to(device)
        expected = (base.float() + total).to(base.dtype).to(weight.dtype)
        return bool(torch.equal(weight.detach().reshape(-1)[slot.index.to(device)], expected))


def _write(registry: AdapterRegistry, slot: _Slot, old: dict[str, float], new: dict[str, float]) -> None:
    """Make the weight ``base + Σ w·Δ`` over ``new``, writing only the entries of the adapters in
    ``old`` or ``new`` (every other entry already holds its pre-trained value).

    Two passes, each a gather of k compact values and a scatter into the weight: the entries of
    the adapters leaving the combination get their pre-trained values back, then those of the
    combination are merged (an entry in both is written twice; the switch holds the lock, no
    forward sees the middle). A single adapter needs no union arithmetic; a mix sums its deltas in
    fp32 over the slot's union first, so each entry is rounded once.
    """
    adapters = registry.adapters
    leaving = [n for n in old if n not in new and n in slot.adapters]
    active = [
        (n, new[n]) for n in slot.adapters if n in new
    ]  # load order: the sum does not depend on the call's order
    if not leaving and not active:
        return
    weight = slot.module.weight
    index, base = slot.index, slot.base
    # The positions index the slot's union, whose entries were range- and order-checked when the
    # adapters were read (and the weight's size is checked by _sync): the ops' per-call index
    # pass (about a third of a switch) is skipped.
    with torch.no_grad(), _checks.index_checks(False):
        for name in leaving:
            positions = adapters[name].layers[slot.name][0]
            sk.restore_(weight, index.index_select(0, positions), base.index_select(0, positions))
        if len(active) == 1:
            name, w = active[0]
            positions, delta = adapters[name].layers[slot.name]
            sk.scatter_merge_(
                weight, index.index_select(0, positions), base.index_select(0, positions), delta * w
            )
        elif active:
            size, device = index.numel(), index.device
            total = torch.zeros(size, dtype=torch.float32, device=device)
            # Every resident adapter active: the whole union; else only the entries they own.
            touched = (
                None
                if len(active) == len(slot.adapters)
                else torch.zeros(size, dtype=torch.bool, device=device)
            )
            for name, w in active:
                positions, delta = adapters[name].layers[slot.name]
                total.index_add_(0, positions, delta * w)
                if touched is not None:
                    touched[positions] = True
            if touched is None:
                sk.scatter_merge_(weight, index, base, total)
            else:
                where = touched.nonzero().squeeze(1)
                sk.scatter_merge_(weight, index[where], base[where], total[where])
    slot.version, slot.weight_ref = weight._version, weakref.ref(weight)


def _switch(model: nn.Module, registry: AdapterRegistry, new: dict[str, float], fn: str) -> None:
    """Validate every touched layer, then write: all or nothing. Holds the lock throughout."""
    old = registry.active
    names = set(old) | set(new)
    slots = [s for s in registry.slots.values() if any(n in names for n in s.adapters)]
    for slot in slots:
        _sync(registry, slot, fn, model)
    for slot in slots:
        _write(registry, slot, old, new)
    registry.active = dict(new)


def _locked(registry: AdapterRegistry, fn: str):
    class _Guard:
        def __enter__(self):
            registry._lock.acquire()
            if registry._in_flight:
                registry._lock.release()
                raise RuntimeError(
                    f"{fn}: a forward through the model is running (in another thread, or this call "
                    "comes from inside it); switch adapters between forwards"
                )

        def __exit__(self, *exc):
            registry._lock.release()

    return _Guard()


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
    from sara_kernels.adapter import AdapterError

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
            for slot in registry.slots.values():
                _sync(registry, slot, fn, model)
            owners = {id(slot.module.weight): slot.name for slot in registry.slots.values()}
            for layer_name, module, _, _ in plan:
                if module.weight.is_inference():
                    raise AdapterError(
                        f"{fn}: the weight of layer {layer_name!r} is an inference tensor (the model was "
                        "built or loaded under torch.inference_mode), which does not record writes; "
                        "build the model outside inference_mode (switching inside it is fine)"
                    )
                other = owners.setdefault(id(module.weight), layer_name)
                if other != layer_name:
                    raise AdapterError(
                        f"{fn}: layers {other!r} and {layer_name!r} share one weight tensor; named "
                        "adapters need one layer per weight (load this adapter without adapter_name)"
                    )
            # Everything is checked: from here on the registry changes.
            if name in registry.adapters:
                _delete(model, registry, name, fn)
            _add(model, registry, name, path, plan, weight, combine)
    except BaseException:
        if created and not registry.adapters:
            drop_registry(model)
        raise


def _add(model, registry, name, path, plan, weight, combine) -> None:
    fn = "load_adapter"
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for layer_name, module, index, delta in plan:
        weight_tensor = module.weight
        device = weight_tensor.device
        index_dtype = _index_dtype(weight_tensor.numel())
        index = index.to(device=device, dtype=index_dtype)
        delta = delta.to(device=device, dtype=torch.float32)
        flat = weight_tensor.detach().view(-1)
        slot = registry.slots.get(layer_name)
        if slot is None:
            # Nothing resident here: the weight holds its pre-trained values everywhere.
            slot = _Slot(
                layer_name,
                module,
                index.clone(),
                flat[index].clone(),
                weight_tensor._version,
                weight_ref=weakref.ref(weight_tensor),
                shape=tuple(weight_tensor.shape),
            )
            registry.slots[layer_name] = slot
        else:
            fresh = index[~torch.isin(index, slot.index)]
            if fresh.numel():
                # Entries no resident adapter owns hold their pre-trained values.
                union = torch.cat([slot.index, fresh])
                base = torch.cat([slot.base, flat[fresh]])
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
    _switch(model, registry, new, fn)


def _delete(model: nn.Module, registry: AdapterRegistry, name: str, fn: str) -> None:
    if name in registry.active:
        _switch(model, registry, {n: w for n, w in registry.active.items() if n != name}, fn)
    resident = registry.adapters.pop(name)
    for layer_name in resident.layers:
        slot = registry.slots[layer_name]
        slot.adapters.remove(name)
        if not slot.adapters:
            del registry.slots[layer_name]
            continue
        # Drop the entries only this adapter owned (they hold their pre-trained values now).
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
def _weights(fn: str, names: list[str], weights) -> list[float]:
    if weights is None:
        return [1.0] * len(names)
    if isinstance(weights, (int, float)):
        weights = [weights] * len(names)
    weights = list(weights)
    if len(weights) != len(names):
        raise ValueError(f"{fn}: {len(names)} adapter names but {len(weights)} weights")
    out = []
    for name, w in zip(names, weights, strict=True):
        if isinstance(w, bool) or not isinstance(w, (int, float)):
            raise TypeError(f"{fn}: the weight of {name!r} must be a number, got {type(w).__name__}")
        if not math.isfinite(float(w)):
            raise ValueError(f"{fn}: the weight of {name!r} must be finite, got {w}")
        out.append(float(w))
    return out


def set_adapters(
    model: Any, names: str | Sequence[str], weights: float | Sequence[float] | None = None
) -> None:
    """Make the weights equal to ``base + Σ wᵢ·ΔPᵢ`` over the named resident adapters.

    Only the entries of the adapters active before and after the call are written (O(k) per
    switch, no dense pass); the forward afterwards runs at the base model's speed. Everything is
    checked before anything is written. Adapters add on shared entries in fp32, in the order they
    were loaded (whatever the order of ``names``), and each weight is rounded once
    (``(base + Σ wᵢΔᵢ).to(weight.dtype)``), exactly as loading them in that order with
    ``load_adapter(alpha=wᵢ, combine=True)`` and ``merge_and_unload`` does.

    Args:
        model: the model the adapters were loaded into (or its pipeline).
        names: one adapter name or a list of them (an empty list disables every adapter).
        weights: one weight for all, or one per name (default 1.0 each).

    Raises:
        KeyError: a name is not loaded (e.g. deleted).
        ValueError: duplicate names, a weight count that differs, a non-finite weight.
        RuntimeError: a forward is running; a layer was replaced or its weight written by something
            else since the load.
    """
    fn = "set_adapters"
    root = target_module(model, fn)
    names = [names] if isinstance(names, str) else list(names)
    if len(set(names)) != len(names):
        raise ValueError(f"{fn}: an adapter is named twice in {names}")
    values = _weights(fn, names, weights)
    registry = registry_of(root)
    if registry is None:
        if names:
            raise KeyError(
                f"{fn}: no adapter is loaded in this {type(root).__name__} (load_adapter(..., adapter_name=))"
            )
        return
    registry.check_names(fn, names)
    with _locked(registry, fn):
        _switch(root, registry, dict(zip(names, values, strict=True)), fn)


def disable_adapters(model: Any) -> None:
    """Write the pre-trained values back at every entry an active adapter changed: the base
    weights, bit for bit. The adapters stay resident (:func:`set_adapters` activates them again)."""
    set_adapters(model, [])


def delete_adapter(model: Any, name: str | Sequence[str]) -> None:
    """Remove resident adapter(s); an active one is first taken out of the active combination
    (the others stay active with their weights). Its memory is released."""
    fn = "delete_adapter"
    root = target_module(model, fn)
    names = [name] if isinstance(name, str) else list(name)
    registry = registry_of(root)
    if registry is None:
        raise KeyError(f"{fn}: no adapter is loaded in this {type(root).__name__}")
    registry.check_names(fn, names)
    with _locked(registry, fn):
        for slot in registry.slots.values():
            _sync(registry, slot, fn, root)
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
    "list_adapters",
    "resident_bytes",
    "set_adapters",
]
