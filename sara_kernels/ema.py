"""``SparseEMA``: an exponential moving average of a SaRA model's trained state, k-sized.

diffusers' ``EMAModel`` keeps a shadow copy of every parameter, frozen or not: over a SaRA model that
is a second dense model (20x the trained state), and built from a separately loaded dense UNet it
pairs its shadows with the SaRA model's parameters by position, which do not match. ``SparseEMA``
keeps one fp32 value per adapted entry (4 bytes per entry; ``store()`` adds 4 more while a
validation runs) plus a copy of any other trainable parameter (a bias or norm kept trainable), with
``EMAModel``'s method names and decay schedule, so a diffusers training script swaps it in::

    ema = sara_kernels.SparseEMA(unet, decay=0.9999)   # instead of EMAModel(ema_unet.parameters(), ...)
    ema.to(accelerator.device)
    ...
    if accelerator.sync_gradients:
        ema.step(unet.parameters())
    ...
    ema.store(unet.parameters())       # validation with the EMA weights
    ema.copy_to(unet.parameters())
    log_validation(...)
    ema.restore(unet.parameters())     # bit for bit the training weights again

The average runs over each entry's *total* learned delta (trainable and frozen by re-selection), so
``copy_to`` makes the weights ``base + EMA(delta)``; re-selection reorders the model's slots and the
EMA follows. ``state_dict()``/``load_state_dict()`` and ``save()``/``load()`` (a safetensors file)
round-trip it; :mod:`sara_kernels.integrations.accelerate` checkpoints it with the run.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable

import torch
from torch import nn

from sara_kernels import nn as sk_nn
from sara_kernels._io import atomic_save_file, read_file
from sara_kernels._version import __version__

FORMAT_NAME = "sara_kernels.ema"
FORMAT_VERSION = "1"


class EMAStateError(ValueError):
    """An EMA state (file or dict) is invalid or does not fit the model."""


def _unique_sparse_layers(model: nn.Module) -> list[tuple[str, sk_nn._SparseDeltaMixin]]:
    found, seen = [], set()
    for name, module in model.named_modules():
        if isinstance(module, sk_nn._SparseDeltaMixin) and id(module.sparse_delta) not in seen:
            seen.add(id(module.sparse_delta))
            found.append((name, module))
    return found


class SparseEMA:
    """EMA of the deltas (and other trainable parameters) of a model with sparse-delta layers.

    Args:
        model: the SaRA model (unwrapped or wrapped in DDP / accelerate: the layers are found
            through ``.module``).
        decay, min_decay, update_after_step, use_ema_warmup, inv_gamma, power: as diffusers'
            ``EMAModel``: the decay at optimization step ``t`` (counted by :meth:`step`) is
            ``min(decay, (1 + s) / (10 + s))`` with ``s = t - update_after_step - 1`` (or the warmup
            ``1 - (1 + s / inv_gamma) ** -power``), at least ``min_decay``, and 0 while ``s <= 0``.

    Memory: 4 bytes per adapted entry, plus the other trainable parameters' size.
    """

    def __init__(
        self,
        model: nn.Module,
        decay: float = 0.9999,
        min_decay: float = 0.0,
        update_after_step: int = 0,
        use_ema_warmup: bool = False,
        inv_gamma: float = 1.0,
        power: float = 2 / 3,
    ):
        if isinstance(model, nn.Module) is False:
            raise TypeError(
                "SparseEMA: pass the model (an nn.Module with sparse-delta layers), not its parameters"
            )
        for name, value in (("decay", decay), ("min_decay", min_decay)):
            if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
                raise ValueError(f"SparseEMA: {name} must lie in [0, 1], got {value!r}")
        if min_decay > decay:
            raise ValueError(f"SparseEMA: min_decay={min_decay} exceeds decay={decay}")
        if not (isinstance(update_after_step, int) and update_after_step >= 0):
            raise ValueError(
                f"SparseEMA: update_after_step must be a non-negative int, got {update_after_step!r}"
            )
        if not (math.isfinite(inv_gamma) and inv_gamma > 0 and math.isfinite(power) and power > 0):
            raise ValueError(f"SparseEMA: inv_gamma and power must be positive, got {inv_gamma}, {power}")
        model = sk_nn.unwrap_model(model)  # DDP / accelerate / torch.compile wrappers
        self.model = model
        self.decay, self.min_decay = float(decay), float(min_decay)
        self.update_after_step = update_after_step
        self.use_ema_warmup, self.inv_gamma, self.power = bool(use_ema_warmup), float(inv_gamma), float(power)
        self.optimization_step = 0
        self.cur_decay_value: float | None = None
        self._layers = _unique_sparse_layers(model)
        if not self._layers:
            raise ValueError(
                f"SparseEMA: {type(model).__name__} has no sparse-delta layer (call apply_sara first)"
            )
        deltas = {id(layer.sparse_delta) for _, layer in self._layers}
        self._params = [
            (name, p) for name, p in model.named_parameters() if p.requires_grad and id(p) not in deltas
        ]
        with torch.no_grad():
            self.shadow = {name: layer.total_delta() for name, layer in self._layers}
            self.shadow_params = {name: p.detach().clone() for name, p in self._params}
        self._stored: dict | None = None
        self._name_of = {id(layer.sparse_delta): name for name, layer in self._layers}
        for _, layer in self._layers:
            sk_nn.follow_slots(layer.sparse_delta, self)

    # -- the average ----------------------------------------------------------------------------
    def get_decay(self, optimization_step: int) -> float:
        """The decay at an optimization step (diffusers' ``EMAModel.get_decay``)."""
        step = max(0, optimization_step - self.update_after_step - 1)
        if step <= 0:
            return 0.0
        if self.use_ema_warmup:
            value = 1 - (1 + step / self.inv_gamma) ** -self.power
        else:
            value = (1 + step) / (10 + step)
        return max(min(value, self.decay), self.min_decay)

    def _check_parameters(self, parameters: Iterable | None, what: str) -> None:
        """``parameters`` (diffusers' calling convention) must be this model's; it is not needed."""
        if parameters is None:
            return
        if isinstance(parameters, nn.Module):
            parameters = parameters.parameters()
        ours = {id(layer.sparse_delta) for _, layer in self._layers}
        given = [p for p in parameters if isinstance(p, sk_nn.DeltaParameter)]
        if {id(p) for p in given} != ours:
            raise ValueError(
                f"SparseEMA.{what}: the parameters given are not those of the model this EMA tracks "
                f"({len(given)} sparse deltas given, {len(ours)} tracked); pass the same model's "
                "parameters (or nothing)"
            )

    @torch.no_grad()
    def step(self, parameters: Iterable | None = None) -> None:
        """One EMA update (call it after each optimizer step that updated the weights)."""
        self._check_parameters(parameters, "step")
        self.optimization_step += 1
        decay = self.get_decay(self.optimization_step)
        self.cur_decay_value = decay
        weight = 1.0 - decay
        shadows, targets = [], []
        for name, layer in self._layers:
            shadow = self.shadow[name]
            delta = layer.sparse_delta.detach()
            frozen = layer.sparse_frozen_delta
            k = delta.numel() - frozen.numel()
            if frozen.numel():
                shadows += [shadow[:k], shadow[k:]]
                targets += [delta[:k], frozen + delta[k:]]
            else:
                shadows.append(shadow)
                targets.append(delta)
        for name, p in self._params:
            shadows.append(self.shadow_params[name])
            targets.append(p.detach().to(self.shadow_params[name].dtype))
        if weight == 1.0:
            torch._foreach_copy_(shadows, targets)
        elif weight > 0.0:
            torch._foreach_lerp_(shadows, targets, weight)

    @torch.no_grad()
    def copy_to(self, parameters: Iterable | None = None) -> None:
        """Make the model's weights the EMA's: ``base + EMA(delta)`` at every adapted entry (and the
        EMA of the other trainable parameters)."""
        self._check_parameters(parameters, "copy_to")
        for name, layer in self._layers:
            layer.set_total_delta_(self.shadow[name])
        for name, p in self._params:
            p.copy_(self.shadow_params[name])

    @torch.no_grad()
    def store(self, parameters: Iterable | None = None) -> None:
        """Save the current (training) state, to :meth:`restore` after a validation with the EMA."""
        self._check_parameters(parameters, "store")
        self._stored = {
            "layers": {name: layer.total_delta() for name, layer in self._layers},
            "params": {name: p.detach().clone() for name, p in self._params},
        }

    @torch.no_grad()
    def restore(self, parameters: Iterable | None = None) -> None:
        """Put back the state saved by :meth:`store`, bit for bit."""
        self._check_parameters(parameters, "restore")
        if self._stored is None:
            raise RuntimeError("SparseEMA.restore: nothing stored; call store() before copy_to()")
        for name, layer in self._layers:
            layer.set_total_delta_(self._stored["layers"][name])
        for name, p in self._params:
            p.copy_(self._stored["params"][name])
        self._stored = None

    def _sara_follow_slots(self, delta: torch.Tensor, source: torch.Tensor, k: int) -> None:
        """Re-selection or a load reordered a layer's slots: the averages move with their entries
        (a new entry starts at its current delta)."""
        name = self._name_of.get(id(delta))
        layer = sk_nn.layer_of(delta)
        if name is None or layer is None:
            return
        source = source.to(self.shadow[name].device)
        valid = source >= 0
        for store in (self.shadow, self._stored["layers"] if self._stored is not None else None):
            if store is None:
                continue
            moved = layer.total_delta().to(store[name].device)
            moved[valid] = store[name][source[valid]]
            store[name] = moved

    def to(self, device=None, dtype=None, non_blocking: bool = False) -> SparseEMA:
        """Move the averages (deltas stay fp32; other trainable parameters' averages take ``dtype``
        when given and floating). ``non_blocking`` as in ``Tensor.to`` (with ``pin_memory``, for
        ``--offload_ema`` in diffusers' scripts)."""

        def move(s: torch.Tensor, cast: bool) -> torch.Tensor:
            if cast and dtype is not None and s.is_floating_point():
                return s.to(device=device, dtype=dtype, non_blocking=non_blocking)
            return s.to(device=device, non_blocking=non_blocking)

        self.shadow = {name: move(s, False) for name, s in self.shadow.items()}
        self.shadow_params = {name: move(s, True) for name, s in self.shadow_params.items()}
        return self

    def pin_memory(self) -> None:
        """Pin the averages in host memory (diffusers' ``EMAModel.pin_memory``; needs a CUDA build
        and device), so that ``to(device, non_blocking=True)`` overlaps with compute."""
        self.shadow = {name: s.pin_memory() for name, s in self.shadow.items()}
        self.shadow_params = {name: s.pin_memory() for name, s in self.shadow_params.items()}

    # -- persistence ----------------------------------------------------------------------------
    def _config(self) -> dict:
        return {
            "decay": self.decay,
            "min_decay": self.min_decay,
            "optimization_step": self.optimization_step,
            "update_after_step": self.update_after_step,
            "use_ema_warmup": self.use_ema_warmup,
            "inv_gamma": self.inv_gamma,
            "power": self.power,
        }

    def state_dict(self) -> dict:
        """The schedule and the averages; each layer's average with the layer's index (slot order),
        so a load can check (and, for the same entries in another order, restore) the alignment."""
        return {
            **self._config(),
            "shadow": {name: s.clone() for name, s in self.shadow.items()},
            "index": {name: layer.sparse_index.clone() for name, layer in self._layers},
            "params": {name: s.clone() for name, s in self.shadow_params.items()},
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Load :meth:`state_dict` output; everything is checked before anything changes."""
        try:
            config = {key: state[key] for key in self._config()}
            shadows, indices, params = dict(state["shadow"]), dict(state["index"]), dict(state["params"])
        except (KeyError, TypeError) as exc:
            raise EMAStateError(
                f"SparseEMA.load_state_dict: not a SparseEMA state ({exc!r} missing)"
            ) from None
        names = [name for name, _ in self._layers]
        if sorted(shadows) != sorted(names) or sorted(indices) != sorted(names):
            raise EMAStateError(
                "SparseEMA.load_state_dict: the state covers other layers than this model's "
                f"(missing: {sorted(set(names) - set(shadows))[:5]}, extra: {sorted(set(shadows) - set(names))[:5]})"
            )
        if sorted(params) != sorted(name for name, _ in self._params):
            raise EMAStateError(
                "SparseEMA.load_state_dict: the state's other trainable parameters differ from this model's "
                f"({sorted(params)[:5]} vs {[n for n, _ in self._params][:5]})"
            )
        new_shadow = {}
        for name, layer in self._layers:
            shadow, index = shadows[name], indices[name]
            n = layer.adapted_count
            if not isinstance(shadow, torch.Tensor) or shadow.shape != (n,) or shadow.dtype != torch.float32:
                raise EMAStateError(
                    f"SparseEMA.load_state_dict: layer {name!r}: the average must be fp32 [{n}]"
                )
            if not bool(torch.isfinite(shadow).all()):
                raise EMAStateError(
                    f"SparseEMA.load_state_dict: layer {name!r}: the average holds NaN or inf"
                )
            mine = layer.sparse_index.detach().long().cpu()
            theirs = index.detach().long().cpu()
            if torch.equal(mine, theirs):
                new_shadow[name] = shadow.to(layer.sparse_delta.device).clone()
                continue
            source = sk_nn._slot_sources(theirs, mine)
            if bool((source < 0).any()):
                raise EMAStateError(
                    f"SparseEMA.load_state_dict: layer {name!r}: the state averages other entries than the "
                    "layer adapts (load the model's checkpoint of the same run first)"
                )
            new_shadow[name] = shadow[source].to(layer.sparse_delta.device)
        new_params = {}
        for name, p in self._params:
            value = params[name]
            if not isinstance(value, torch.Tensor) or value.shape != p.shape:
                raise EMAStateError(f"SparseEMA.load_state_dict: parameter {name!r} has the wrong shape")
            new_params[name] = value.to(device=p.device).clone()
        self.decay, self.min_decay = float(config["decay"]), float(config["min_decay"])
        self.optimization_step = int(config["optimization_step"])
        self.update_after_step = int(config["update_after_step"])
        self.use_ema_warmup = bool(config["use_ema_warmup"])
        self.inv_gamma, self.power = float(config["inv_gamma"]), float(config["power"])
        self.shadow, self.shadow_params = new_shadow, new_params

    def save(self, path: str | os.PathLike) -> None:
        """Write :meth:`state_dict` to a safetensors file (atomically; no pickle)."""
        state = self.state_dict()
        tensors = {f"shadow/{n}": t for n, t in state["shadow"].items()}
        tensors.update({f"index/{n}": t for n, t in state["index"].items()})
        tensors.update({f"params/{n}": t for n, t in state["params"].items()})
        metadata = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "sara_kernels_version": __version__,
            "config": json.dumps(self._config()),
        }
        atomic_save_file(
            {k: t.detach().cpu().contiguous() for k, t in tensors.items()}, os.fspath(path), metadata
        )

    def load(self, path: str | os.PathLike) -> None:
        """Load a file written by :meth:`save` (checked like :meth:`load_state_dict`)."""
        path = os.fspath(path)
        tensors, metadata = read_file(path, "EMA state", EMAStateError)
        if metadata.get("format") != FORMAT_NAME or metadata.get("format_version") != FORMAT_VERSION:
            raise EMAStateError(
                f"{path!r} is not a sara_kernels EMA state (format {metadata.get('format')!r}, "
                f"version {metadata.get('format_version')!r})"
            )
        try:
            config = json.loads(metadata["config"])
            if not isinstance(config, dict):
                raise ValueError("config is not an object")
        except (KeyError, ValueError) as exc:
            raise EMAStateError(f"{path!r}: bad EMA metadata ({exc})") from None
        state = {**config, "shadow": {}, "index": {}, "params": {}}
        for key, t in tensors.items():
            part, _, name = key.partition("/")
            if part not in ("shadow", "index", "params"):
                raise EMAStateError(f"{path!r}: unexpected tensor {key!r}")
            state[part][name] = t
        self.load_state_dict(state)


__all__ = ["EMAStateError", "SparseEMA"]
