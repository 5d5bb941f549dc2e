"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for SaRA models.

FSDP2 shards every parameter it manages on dim 0 (a ``DTensor`` per parameter) and swaps the
module's parameters between the shard and an all-gathered copy around each forward and backward.
A sparse-delta layer keeps its merged state under it this way:

* the dense **weight** (frozen) is sharded by FSDP as usual: each rank holds rows
  ``[start, end)``, and the merged value ``base + delta`` of every adapted entry in those rows is
  written into the rank's **local shard**, so the weight FSDP all-gathers for the forward and the
  backward is the merged one;
* the **deltas** stay replicated (``fully_shard(..., ignored_params=...)``): they are ``n`` fp32
  entries per layer (``n`` = the adapted share of the weight, ~1-5%), their gradients are averaged
  over the mesh right after they are accumulated (one ``all_reduce`` per delta and backward), and
  every rank steps them the same way; each rank then merges the entries of its own rows. The
  index, pre-trained values and frozen deltas are buffers, which FSDP does not shard.

Usage::

    from torch.distributed.fsdp import fully_shard
    from sara_kernels.integrations.fsdp import prepare_fsdp

    model = sara_kernels.apply_sara(model, SaRAConfig(...))
    deltas = prepare_fsdp(model, mesh)             # before fully_shard
    for block in model.blocks:
        fully_shard(block, mesh=mesh, ignored_params=deltas)
    fully_shard(model, mesh=mesh, ignored_params=deltas)
    optimizer = sara_kernels.SparseAdamW(sara_kernels.sparse_parameters(model))

(:func:`shard_sara_model` does the same in one call.) ``SparseAdamW`` and every ``torch.optim``
optimizer work; ``model.state_dict()`` holds the sharded weights (``DTensor``) and the replicated
sparse tensors; :func:`save_adapter` (here) writes the adapter from rank 0. Not supported on a
sharded model: changing the adapted entries (re-selection, ``set_entries_``: errors), loading a
state dict or an adapter (the loaders read the weight as one dense tensor); do those before
:func:`prepare_fsdp`.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from sara_kernels import nn as sk_nn

#: Attribute of a converted layer: the sharded weight FSDP registered (a DTensor Parameter).
_SHARDED = "_sparse_sharded_weight"
#: Attribute of a converted layer: the process group its delta gradients are averaged over.
_GROUP = "_sparse_fsdp_group"

_CLASSES: dict[type, type] = {}


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


class _ShardedSparseMixin:
    """Behaviour of a sparse-delta layer whose weight FSDP2 shards (put in front of its class)."""

    #: Tells SparseAdamW that the fused kernel cannot write this layer's weight (a shard).
    _sara_merges_locally = True

    def __setattr__(self, name, value):
        if name == "sparse_delta" and _is_dtensor(value):
            raise RuntimeError(
                f"{self._label()}: fully_shard would shard its sparse_delta; pass the deltas that "
                "prepare_fsdp returns as fully_shard(..., ignored_params=...)"
            )
        if name == "weight" and "_sparse_weight" in self.__dict__ and isinstance(value, torch.Tensor):
            shape = self.__dict__["_sparse_weight_shape"]
            if tuple(value.shape) != shape:
                raise RuntimeError(
                    f"{self._label()}: a weight of shape {tuple(value.shape)} replaces {shape}"
                )
            if _is_dtensor(value):
                _check_placement(self, value)
                self.__dict__[_SHARDED] = value
            # FSDP swaps the shard and the all-gathered weight in and out of the module.
            nn.Module.__setattr__(self, name, value)
            return
        super().__setattr__(name, value)

    def _check_state(self) -> None:
        delta, index = self._parameters.get("sparse_delta"), self._buffers["sparse_index"]
        if (
            type(delta) is not sk_nn.DeltaParameter
            or delta.dtype != torch.float32
            or delta.shape != index.shape
        ):
            raise RuntimeError(
                f"{self._label()}: sparse_delta was replaced or changed under FSDP; it must stay the "
                f"layer's replicated fp32 DeltaParameter of {index.numel()} entries"
            )

    def _write(self, values_of) -> None:
        """Write ``values_of(slots)`` (the weight's dtype) at the adapted entries of the local shard
        and, inside a forward, of the all-gathered weight."""
        index = self._buffers["sparse_index"].long()
        sharded = self.__dict__.get(_SHARDED)
        current = self._parameters["weight"]
        with torch.no_grad():
            if sharded is not None:
                local = sharded.to_local()
                start = _shard_start(self, sharded)
                columns = local[0].numel() if local.dim() > 1 else 1
                lo, hi = start * columns, start * columns + local.numel()
                slots = torch.nonzero((index >= lo) & (index < hi)).flatten()
                if slots.numel():
                    local.view(-1)[index[slots] - lo] = values_of(slots).to(local.dtype)
            if current is not sharded and not _is_dtensor(current) and current.untyped_storage().size():
                current.view(-1)[index] = values_of(slice(None)).to(current.dtype)

    def merge_(self) -> None:
        base, total = self._buffers["sparse_base"], self.total_delta()
        self._write(lambda slots: base[slots].float() + total[slots])
        if not torch.compiler.is_compiling():
            sk_nn.mark_merged(self._parameters["sparse_delta"])

    def unmerge_(self) -> None:
        base = self._buffers["sparse_base"]
        self._write(lambda slots: base[slots])
        self._parameters["sparse_delta"].__dict__[sk_nn._MERGED] = None

    def _unsupported(self, what: str):
        raise RuntimeError(
            f"{self._label()}: {what} is not supported after prepare_fsdp (the adapted entries are "
            "fixed while the weight is sharded); do it before sharding the model"
        )

    def set_entries_(self, *args, **kwargs):
        self._unsupported("changing the adapted entries (set_entries_, loading a sparse state dict)")

    def freeze_(self, *args, **kwargs):
        self._unsupported("re-selection (freeze_, reselect_)")


def _check_placement(layer, weight) -> None:
    from torch.distributed.tensor import Shard

    placements = tuple(weight.placements)
    if len(placements) != 1 or placements[0] != Shard(0):
        raise RuntimeError(
            f"{layer._label()}: its weight is sharded as {placements}; sara_kernels supports FSDP2's "
            "default, Shard(0) on a 1-D mesh (no shard_placement_fn, no HSDP or tensor parallelism)"
        )


def _shard_start(layer, weight) -> int:
    """First global row of this rank's shard (FSDP2 splits dim 0 as torch.chunk does)."""
    rows, world = weight.shape[0], weight.device_mesh.size()
    rank = weight.device_mesh.get_local_rank()
    chunk = -(-rows // world)
    start = min(rank * chunk, rows)
    local_rows = weight.to_local().shape[0]
    if local_rows != max(0, min(chunk, rows - start)):
        raise RuntimeError(
            f"{layer._label()}: rank {rank} holds {local_rows} of {rows} weight rows, not the even "
            "dim-0 split this layer's merge expects"
        )
    return start


def _sharded_class(cls: type) -> type:
    if cls not in _CLASSES:
        name = f"Sharded{cls.__name__}"
        _CLASSES[cls] = globals()[name] = type(name, (_ShardedSparseMixin, cls), {"__module__": __name__})
    return _CLASSES[cls]


def _average_grad(group):
    def hook(param: torch.Tensor) -> None:
        dist.all_reduce(param.grad, group=group)
        param.grad.div_(dist.get_world_size(group))

    return hook


def prepare_fsdp(model: nn.Module, mesh) -> set[nn.Parameter]:
    """Make ``model``'s sparse-delta layers work under ``fully_shard`` on ``mesh``.

    Call it after ``apply_sara`` and before ``fully_shard``. Each layer then merges into its rank's
    shard of the weight, and its delta's gradient is averaged over ``mesh`` after every backward.

    Args:
        model: a model holding sparse-delta layers, not yet sharded.
        mesh: a 1-D ``DeviceMesh`` (the one given to ``fully_shard``).

    Returns:
        The deltas: pass them as ``fully_shard(..., ignored_params=...)`` on every call.
    """
    if mesh.ndim != 1:
        raise ValueError(f"prepare_fsdp: mesh must be 1-D (FSDP2 without HSDP), got {mesh.ndim} dims")
    layers = [m for m in model.modules() if isinstance(m, sk_nn._SparseDeltaMixin)]
    if not layers:
        raise ValueError(
            f"prepare_fsdp: {type(model).__name__} has no sparse-delta layer; call apply_sara first"
        )
    group = mesh.get_group()
    deltas: dict[int, nn.Parameter] = {}
    for layer in layers:
        if _is_dtensor(layer._parameters["weight"]):
            raise RuntimeError(f"prepare_fsdp: {layer._label()} is already sharded; call prepare_fsdp first")
        if not isinstance(layer, _ShardedSparseMixin):
            layer.__class__ = _sharded_class(type(layer))
        layer.__dict__[_GROUP] = group
        delta = layer._parameters["sparse_delta"]
        if id(delta) not in deltas:  # layers sharing a weight share one delta: one hook
            deltas[id(delta)] = delta
            if delta.requires_grad:
                delta.register_post_accumulate_grad_hook(_average_grad(group))
    return set(deltas.values())


def save_adapter(model: nn.Module, path, **kwargs) -> None:
    """:func:`sara_kernels.save_adapter` for a sharded model; call it on **every** rank (the
    fingerprint of each pre-trained weight all-gathers its shards). Rank 0 of the mesh writes
    ``path``; keyword arguments go to :func:`sara_kernels.save_adapter`."""
    from sara_kernels.adapter import save_adapter as save

    groups = {m.__dict__.get(_GROUP) for m in model.modules() if isinstance(m, _ShardedSparseMixin)}
    if len(groups) != 1:
        raise ValueError("fsdp.save_adapter: the model was not prepared with prepare_fsdp (one mesh)")
    if dist.get_rank(groups.pop()) == 0:
        save(model, path, **kwargs)
    else:
        with tempfile.TemporaryDirectory() as folder:  # same collectives as rank 0, nothing kept
            save(model, os.path.join(folder, "adapter.safetensors"), **kwargs)


def shard_sara_model(
    model: nn.Module, mesh, blocks: Iterable[nn.Module] = (), **fully_shard_kwargs
) -> nn.Module:
    """:func:`prepare_fsdp`, then ``fully_shard`` on each of ``blocks`` and on ``model`` (with the
    deltas added to ``ignored_params``). Extra keyword arguments go to every ``fully_shard`` call.

    Returns:
        ``model`` (now an ``FSDPModule``).
    """
    from torch.distributed.fsdp import fully_shard

    ignored = set(fully_shard_kwargs.pop("ignored_params", None) or ()) | prepare_fsdp(model, mesh)
    for block in blocks:
        fully_shard(block, mesh=mesh, ignored_params=ignored, **fully_shard_kwargs)
    fully_shard(model, mesh=mesh, ignored_params=ignored, **fully_shard_kwargs)
    return model


__all__ = ["prepare_fsdp", "save_adapter", "shard_sara_model"]
