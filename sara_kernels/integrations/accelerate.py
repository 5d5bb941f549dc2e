"""🤗 accelerate checkpointing for SaRA runs: ``accelerator.save_state`` / ``load_state`` hooks.

diffusers' training scripts register hooks that ``save_pretrained`` the UNet into
``checkpoint-N/unet`` and load it back with a plain ``UNet2DConditionModel.from_pretrained`` +
``load_state_dict``; on a SaRA model that drops the sparse state. Replace both hooks with one call::

    from sara_kernels.integrations.accelerate import register_checkpoint_hooks

    register_checkpoint_hooks(accelerator, ema=ema_unet)   # ema: a SparseEMA, or None

Per SaRA model, ``save_state`` then writes into ``<output_dir>/<subfolder>/``:

* ``sara_training_state.safetensors``: the trained state (:mod:`sara_kernels.training_state`);
* with ``save_dense`` (default) and a diffusers model: the merged model as plain diffusers files
  (``save_pretrained`` under :func:`sara_kernels.dense_state_dict`), which diffusers opens without
  sara_kernels and without unexpected keys;

and ``sara_ema.safetensors`` in ``<output_dir>`` for the EMA. ``load_state`` loads the training
state into the (same way converted) model and the EMA; accelerate itself restores the optimizer,
the LR scheduler, the RNG states and whatever ``register_for_checkpointing`` holds (register the
:class:`~sara_kernels.ProgressiveReselection` there). A resumed run is bit-identical to an
uninterrupted one, across a re-selection too. Models without sparse-delta layers are left to
accelerate.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from torch import nn

from sara_kernels import nn as sk_nn
from sara_kernels.training_state import FILE_NAME, load_training_state, save_training_state

#: The EMA's file in a checkpoint folder.
EMA_FILE_NAME = "sara_ema.safetensors"


def _has_sparse_layers(model: nn.Module) -> bool:
    return any(isinstance(m, sk_nn._SparseDeltaMixin) for m in model.modules())


def default_subfolder(model: nn.Module) -> str:
    """``unet`` for a UNet, ``transformer`` for a transformer (diffusers' pipeline folder names),
    ``model`` otherwise."""
    name = type(model).__name__.lower()
    if "unet" in name:
        return "unet"
    if "transformer" in name:
        return "transformer"
    return "model"


def _subfolders(models: list[nn.Module], subfolders: Sequence[str] | None) -> list[str]:
    if subfolders is not None:
        if len(subfolders) != len(models):
            raise ValueError(
                f"sara_kernels accelerate hooks: {len(subfolders)} subfolders for {len(models)} SaRA models"
            )
        return list(subfolders)
    names = [default_subfolder(m) for m in models]
    return [f"{n}_{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]


def _is_main_process(accelerator) -> bool:
    if accelerator is not None:
        return bool(accelerator.is_main_process)
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def save_model_hook(
    accelerator=None, *, ema=None, subfolders: Sequence[str] | None = None, save_dense: bool = True
):
    """A hook for ``accelerator.register_save_state_pre_hook``: see the module docs."""

    def hook(models, weights, output_dir):
        picked = [
            (i, sk_nn.unwrap_model(m))
            for i, m in enumerate(models)
            if _has_sparse_layers(sk_nn.unwrap_model(m))
        ]
        folders = _subfolders([m for _, m in picked], subfolders)
        if _is_main_process(accelerator):
            for (_, model), folder in zip(picked, folders, strict=True):
                where = os.path.join(output_dir, folder)
                os.makedirs(where, exist_ok=True)
                save_training_state(model, os.path.join(where, FILE_NAME))
                if save_dense and hasattr(model, "save_pretrained"):
                    with sk_nn.dense_state_dict():
                        model.save_pretrained(where)
            if ema is not None:
                ema.save(os.path.join(output_dir, EMA_FILE_NAME))
        for i, _ in sorted(picked, reverse=True):  # accelerate does not save these again
            if i < len(weights):
                weights.pop(i)

    return hook


def load_model_hook(accelerator=None, *, ema=None, subfolders: Sequence[str] | None = None):
    """A hook for ``accelerator.register_load_state_pre_hook``: see the module docs."""

    def hook(models, input_dir):
        picked = [
            (i, sk_nn.unwrap_model(m))
            for i, m in enumerate(models)
            if _has_sparse_layers(sk_nn.unwrap_model(m))
        ]
        folders = _subfolders([m for _, m in picked], subfolders)
        loaded = []
        for (i, model), folder in zip(picked, folders, strict=True):
            path = os.path.join(input_dir, folder, FILE_NAME)
            if not os.path.exists(path):
                continue  # a checkpoint accelerate wrote itself (model.safetensors): accelerate loads it
            load_training_state(model, path)
            loaded.append(i)
        for i in sorted(loaded, reverse=True):  # accelerate does not load these again
            models.pop(i)
        if ema is not None:
            path = os.path.join(input_dir, EMA_FILE_NAME)
            if not os.path.exists(path):
                raise FileNotFoundError(
                    f"the checkpoint {input_dir!r} has no EMA state ({EMA_FILE_NAME}); it was saved without one"
                )
            ema.load(path)

    return hook


def register_checkpoint_hooks(
    accelerator, *, ema=None, subfolders: Sequence[str] | None = None, save_dense: bool = True
):
    """Register :func:`save_model_hook` and :func:`load_model_hook` on ``accelerator``.

    Args:
        accelerator: the ``accelerate.Accelerator``.
        ema: a :class:`~sara_kernels.SparseEMA` to checkpoint with the run, or None.
        subfolders: the folder name per SaRA model (default: ``unet`` / ``transformer`` / ``model``).
        save_dense: also write the merged model as plain diffusers files (diffusers models only).

    Returns:
        The two hook handles (``.remove()`` unregisters).
    """
    return (
        accelerator.register_save_state_pre_hook(
            save_model_hook(accelerator, ema=ema, subfolders=subfolders, save_dense=save_dense)
        ),
        accelerator.register_load_state_pre_hook(
            load_model_hook(accelerator, ema=ema, subfolders=subfolders)
        ),
    )


__all__ = [
    "EMA_FILE_NAME",
    "default_subfolder",
    "load_model_hook",
    "register_checkpoint_hooks",
    "save_model_hook",
]
