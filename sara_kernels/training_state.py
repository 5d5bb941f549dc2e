"""Checkpoint and resume a SaRA training run: the model's trained state in one safetensors file.

``model.state_dict()`` of a SaRA model holds everything (the dense weights, merged, and each layer's
``sparse_*`` tensors) and ``load_state_dict`` restores it exactly, after re-selection too. For
checkpoints during a run that is mostly the frozen base model, written again every time. A
*training state* is the part that training changes: every layer's sparse state (index in slot
order, pre-trained values, trainable and frozen deltas), every other trainable parameter and every
buffer, with the config. Loading it into the base model converted the same way (``apply_sara`` with
the same config) restores the run bit for bit; the optimizer's state then loads aligned::

    sara_kernels.save_training_state(unet, "checkpoint-500/unet/sara_training_state.safetensors")
    ...
    unet = apply_sara(UNet2DConditionModel.from_pretrained(base), config)     # a new process
    sara_kernels.load_training_state(unet, "checkpoint-500/unet/sara_training_state.safetensors")

The file is written atomically and holds no pickle. Loading checks every key, shape and the
pre-trained values against the model before it writes anything into a layer: a state for another
base model or another selection is an error that names the layer.
"""

from __future__ import annotations

import dataclasses
import json
import os

import torch
from torch import nn

from sara_kernels import nn as sk_nn
from sara_kernels._io import atomic_save_file, read_file, unique_storage
from sara_kernels._version import __version__

FORMAT_NAME = "sara_kernels.training_state"
FORMAT_VERSION = "1"
#: The file name :mod:`sara_kernels.integrations.accelerate` uses in a checkpoint's model folder.
FILE_NAME = "sara_training_state.safetensors"
_SPARSE_NAMES = set(sk_nn.SPARSE_KEYS) | {"sparse_frozen_index", "sparse_frozen_base"}


class TrainingStateError(ValueError):
    """A training-state file is invalid, or does not fit the model it is loaded into."""


def training_state_keys(model: nn.Module) -> list[str]:
    """The ``state_dict`` keys a training state holds: the sparse state of every sparse-delta layer,
    the trainable parameters and every buffer (the frozen dense weights are left out)."""
    model = sk_nn.unwrap_model(model)
    if not any(isinstance(m, sk_nn._SparseDeltaMixin) for m in model.modules()):
        raise TrainingStateError(
            f"{type(model).__name__} has no sparse-delta layer: a training state is for a SaRA model "
            "(call apply_sara first)"
        )
    keep = set()
    for prefix, module in model.named_modules(remove_duplicate=False):
        dot = f"{prefix}." if prefix else ""
        for name, p in module._parameters.items():
            if p is not None and (p.requires_grad or isinstance(p, sk_nn.DeltaParameter)):
                keep.add(dot + name)
        for name, b in module._buffers.items():
            if b is not None and name not in module._non_persistent_buffers_set:
                keep.add(dot + name)
    return [key for key in model.state_dict() if key in keep]


def save_training_state(model: nn.Module, path: str | os.PathLike) -> None:
    """Write ``model``'s training state (see the module docs) to ``path``, atomically.

    Args:
        model: a SaRA model (a DDP / accelerate wrapper is unwrapped).
        path: the file (conventionally ``sara_training_state.safetensors``).
    """
    model = sk_nn.unwrap_model(model)
    keys = training_state_keys(model)
    state = model.state_dict()  # merges every layer first
    tensors, aliases = unique_storage({key: state[key] for key in keys})
    config = getattr(model, "sara_config", None)
    metadata = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "sara_kernels_version": __version__,
        "model_class": type(model).__name__,
        "aliases": json.dumps(aliases),
    }
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        metadata["sara_config"] = json.dumps(dataclasses.asdict(config), default=repr)
    path = os.fspath(path)
    if os.path.isdir(path):
        raise TrainingStateError(f"save_training_state: {path!r} is a directory; give a file path")
    atomic_save_file(tensors, path, metadata)


def read_training_state(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors (by ``state_dict`` key, on CPU) and metadata of a training-state file."""
    path = os.fspath(path)
    tensors, metadata = read_file(path, "training state", TrainingStateError)
    if metadata.get("format") != FORMAT_NAME:
        raise TrainingStateError(
            f"{path!r} is not a sara_kernels training state (format {metadata.get('format')!r})"
        )
    if metadata.get("format_version") != FORMAT_VERSION:
        raise TrainingStateError(
            f"{path!r}: training-state format version {metadata.get('format_version')!r} is not supported "
            f"by sara_kernels {__version__} (it reads {FORMAT_VERSION!r})"
        )
    try:
        aliases = json.loads(metadata.get("aliases", "{}"))
        if not isinstance(aliases, dict) or not all(
            isinstance(v, str) and v in tensors for v in aliases.values()
        ):
            raise ValueError("aliases must map keys to stored keys")
    except ValueError as exc:
        raise TrainingStateError(f"{path!r}: bad metadata ({exc})") from None
    for alias, key in aliases.items():
        tensors[alias] = tensors[key]
    return tensors, metadata


def load_training_state(model: nn.Module, path: str | os.PathLike, *, strict: bool = True) -> dict:
    """Load a file written by :func:`save_training_state` into ``model`` (converted from the same
    base model with the same config): each layer adopts the file's entries, slot order and frozen
    split, the other trainable parameters and buffers take the file's values.

    Args:
        model: the SaRA model (a DDP / accelerate wrapper is unwrapped).
        path: the file.
        strict: if True, a key of the model's training state missing from the file, or a key of the
            file the model does not have, is an error; if False they are skipped.

    Returns:
        ``{"missing": [...], "unexpected": [...]}`` (empty when strict).

    Raises:
        FileNotFoundError, TrainingStateError: a bad file, or one that does not fit the model (another
            base model or selection; the message names the key or layer). Nothing is loaded then.
    """
    model = sk_nn.unwrap_model(model)
    tensors, _ = read_training_state(path)
    where = f"load_training_state({os.fspath(path)!r})"
    expected = set(training_state_keys(model))
    missing = sorted(expected - set(tensors))
    unexpected = sorted(set(tensors) - expected)
    if strict and (missing or unexpected):
        raise TrainingStateError(
            f"{where}: the file does not fit {type(model).__name__}: "
            f"{len(missing)} key(s) missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. "
            f"{unexpected[:3]}); convert the base model with the same SaRAConfig, or pass strict=False"
        )
    for key in unexpected:
        tensors.pop(key)
    # Everything is checked before anything is loaded: every layer's sparse state against the
    # layer (entry count, index, pre-trained values), every other tensor's shape.
    problems = []
    current = model.state_dict(keep_vars=True)
    for name, module in model.named_modules():
        if not isinstance(module, sk_nn._SparseDeltaMixin):
            continue
        dot = f"{name}." if name else ""
        sparse = {
            key[len(dot) :]: t
            for key, t in tensors.items()
            if key.startswith(dot) and key[len(dot) :] in _SPARSE_NAMES
        }
        if sparse:
            try:
                module._validate_sparse(sparse, has_weight=f"{dot}weight" in tensors)
            except (TypeError, ValueError, IndexError) as error:
                problems.append(str(error))
    for key, t in tensors.items():
        if key.rsplit(".", 1)[-1] in _SPARSE_NAMES:
            continue
        if key in current and tuple(current[key].shape) != tuple(t.shape):
            problems.append(
                f"{key}: the file holds shape {tuple(t.shape)}, the model {tuple(current[key].shape)}"
            )
    if problems:
        raise TrainingStateError(f"{where}: nothing was loaded: " + "; ".join(problems[:5]))
    model.load_state_dict(tensors, strict=False)
    return {"missing": missing, "unexpected": unexpected}


__all__ = [
    "FILE_NAME",
    "TrainingStateError",
    "load_training_state",
    "read_training_state",
    "save_training_state",
    "training_state_keys",
]
