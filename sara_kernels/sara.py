"""The SaRA method around the sparse-delta layers: selection, freezing, progressive re-selection.

model = apply_sara(unet, SaRAConfig(threshold=2e-3))          # convert + select + freeze
optimizer = SparseAdamW(sparse_parameters(model), lr=paper_learning_rate(2e-3))
progressive = ProgressiveReselection(model, optimizer, total_steps=5000)  # re-select half-way
for batch in data:
    loss = ...; loss.backward(); optimizer.step(); optimizer.zero_grad(); progressive.step()
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from sara_kernels import _checks, reference
from sara_kernels.nn import SparseDeltaConv2d, SparseDeltaLinear, _SparseDeltaMixin, mark_merged

DEFAULT_THRESHOLD = 2e-3

_NORM_TYPES = (
    nn.GroupNorm,
    nn.LayerNorm,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
)


@dataclasses.dataclass
class SaRAConfig:
    """How to select the trainable entries.

    Give one selection rule (the default is the paper's global threshold θ = 2e-3):

    Attributes:
        threshold: train every entry with ``|w| < threshold`` (global, absolute).
        fraction: or train this share of the targeted layers' entries (smallest ``|w|`` first).
        count: or train exactly this many entries.
        budget_scope: ``"global"`` (one magnitude cut across all targeted layers, like the
            threshold rule) or ``"per_layer"`` (each layer gets ``fraction`` of its entries, or
            ``count`` entries each).
        target_modules: module names or regexes to convert (None: every Linear and Conv2d). A
            string entry matches a module whose full name equals it, ends with ``"." + it``, or
            fully matches it as a regex.
        exclude_modules: names or regexes never to convert (same matching).
        train_bias: keep every bias trainable (off by default, as in the paper).
        train_norm: keep normalisation layers' affine parameters trainable (off by default).
        progressive_at: when :class:`ProgressiveReselection` re-selects: a fraction of the total
            steps in (0, 1) (the paper: 0.5) or a step number; None disables it.
        reset_state_on_reselect: reset Adam moments at re-selection (the official code's
            behaviour, kept for ablations); by default the survivors' moments carry over.
    """

    threshold: float | None = None
    fraction: float | None = None
    count: int | None = None
    budget_scope: str = "global"
    target_modules: Sequence[str] | str | None = None
    exclude_modules: Sequence[str] | str | None = None
    train_bias: bool = False
    train_norm: bool = False
    progressive_at: float | int | None = None
    reset_state_on_reselect: bool = False

    def __post_init__(self):
        given = [n for n in ("threshold", "fraction", "count") if getattr(self, n) is not None]
        if len(given) > 1:
            raise ValueError(f"SaRAConfig: give one of threshold, fraction or count, got {', '.join(given)}")
        if not given:
            self.threshold = DEFAULT_THRESHOLD
        if self.threshold is not None:
            if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)):
                raise TypeError(
                    f"SaRAConfig: threshold must be a number, got {type(self.threshold).__name__}"
                )
            if not (math.isfinite(self.threshold) and self.threshold > 0):
                raise ValueError(
                    f"SaRAConfig: threshold must be a positive finite number, got {self.threshold}"
                )
            self.threshold = float(self.threshold)
        if self.fraction is not None:
            if isinstance(self.fraction, bool) or not isinstance(self.fraction, (int, float)):
                raise TypeError(f"SaRAConfig: fraction must be a number, got {type(self.fraction).__name__}")
            if not (0 < self.fraction <= 1):
                raise ValueError(f"SaRAConfig: fraction must lie in (0, 1], got {self.fraction}")
            self.fraction = float(self.fraction)
        if self.count is not None:
            if isinstance(self.count, bool) or not isinstance(self.count, int):
                raise TypeError(f"SaRAConfig: count must be an int, got {type(self.count).__name__}")
            if self.count <= 0:
                raise ValueError(f"SaRAConfig: count must be positive, got {self.count}")
        if self.budget_scope not in ("global", "per_layer"):
            raise ValueError(
                f"SaRAConfig: budget_scope must be 'global' or 'per_layer', got {self.budget_scope!r}"
            )
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = [value]
            if value is not None:
                value = list(value)
                if not all(isinstance(v, str) for v in value):
                    raise TypeError(f"SaRAConfig: {name} must be a string or a list of strings")
                for pattern in value:
                    try:
                        re.compile(pattern)
                    except re.error as error:
                        raise ValueError(
                            f"SaRAConfig: {name} entry {pattern!r} is not a valid regex: {error}"
                        ) from None
            setattr(self, name, value)
        if self.progressive_at is not None:
            p = self.progressive_at
            ok = (isinstance(p, float) and 0 < p < 1) or (
                isinstance(p, int) and not isinstance(p, bool) and p > 0
            )
            if not ok:
                raise ValueError(
                    f"SaRAConfig: progressive_at must be a fraction in (0, 1) or a positive step number, got {p!r}"
                )


@dataclasses.dataclass
class LayerSelection:
    name: str
    kind: str  # "linear" | "conv2d"
    shape: tuple[int, ...]
    numel: int
    k: int


@dataclasses.dataclass
class SaRASummary:
    """What :func:`apply_sara` selected."""

    layers: list[LayerSelection]
    total_k: int
    targeted_entries: int
    model_parameters: int
    threshold: float | None

    @property
    def share_of_targeted(self) -> float:
        return self.total_k / max(1, self.targeted_entries)

    @property
    def share_of_model(self) -> float:
        return self.total_k / max(1, self.model_parameters)

    def __str__(self) -> str:
        lines = [f"{'layer':<60} {'kind':<7} {'k':>10} {'density':>8}"]
        for layer in self.layers:
            lines.append(f"{layer.name:<60} {layer.kind:<7} {layer.k:>10} {layer.k / layer.numel:>8.2%}")
        lines.append(
            f"total: {self.total_k} trainable entries = {self.share_of_targeted:.2%} of the "
            f"{self.targeted_entries} targeted weights, {self.share_of_model:.2%} of the model's "
            f"{self.model_parameters} parameters"
            + (f" (threshold {self.threshold:.3g})" if self.threshold is not None else "")
        )
        return "\n".join(lines)


def _matches(name: str, patterns: Sequence[str]) -> bool:
    for pattern in patterns:
        if name == pattern or name.endswith("." + pattern) or re.fullmatch(pattern, name):
            return True
    return False


def _targets(model: nn.Module, config: SaRAConfig) -> list[tuple[str, nn.Module]]:
    found = []
    for name, module in model.named_modules():
        if isinstance(module, _SparseDeltaMixin):
            raise ValueError(
                f"apply_sara: layer {name!r} is already a sparse-delta layer; apply_sara converts a "
                "dense model once (use merge_and_unload first to start over)"
            )
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        if isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear):
            # nn.MultiheadAttention reads out_proj.weight directly, bypassing the layer's forward,
            # so a delta there would never receive a gradient.
            continue
        if config.target_modules is not None and not _matches(name, config.target_modules):
            continue
        if config.exclude_modules is not None and _matches(name, config.exclude_modules):
            continue
        found.append((name, module))
    if not found:
        if config.target_modules is not None:
            raise ValueError(
                f"apply_sara: target_modules {config.target_modules} match no nn.Linear or nn.Conv2d "
                "layer of the model (names are those of model.named_modules())"
            )
        raise ValueError("apply_sara: the model has no nn.Linear or nn.Conv2d layer to adapt")
    return found


def _float_bits(t: torch.Tensor) -> torch.Tensor:
    """|t| as int32 bit patterns (monotone in the value for non-negative floats)."""
    return t.detach().reshape(-1).abs().float().view(torch.int32)


def _global_kth_magnitude(weights: list[torch.Tensor], k: int) -> float:
    """The k-th smallest |w| over several tensors, without concatenating them (bisection on the
    float32 bit patterns: at most 32 counting passes)."""
    lo, hi = 0, 0x7F800000  # +0.0 .. +inf
    while lo < hi:
        mid = (lo + hi) // 2
        count = sum(int((_float_bits(w) <= mid).sum()) for w in weights)
        if count >= k:
            hi = mid
        else:
            lo = mid + 1
    return float(torch.tensor([lo], dtype=torch.int32).view(torch.float32))


def _select_global_count(weights: list[torch.Tensor], k: int) -> tuple[list[torch.Tensor], float]:
    """Exactly k indices over all weights: every |w| below the k-th value, then ties in layer order
    and index order. Returns the indices and the k-th magnitude."""
    kth = _global_kth_magnitude(weights, k)
    kth_bits = int(torch.tensor([kth], dtype=torch.float32).view(torch.int32))
    chosen = []
    remaining_ties = k - sum(int((_float_bits(w) < kth_bits).sum()) for w in weights)
    for w in weights:
        bits = _float_bits(w)
        below = torch.nonzero(bits < kth_bits).flatten()
        ties = torch.nonzero(bits == kth_bits).flatten()
        take = ties[: max(0, remaining_ties)]
        remaining_ties -= take.numel()
        index = torch.cat([below, take]).sort().values
        chosen.append(index.to(reference.index_dtype_for(w.numel())))
    return chosen, kth


def _next_float32_above(value: float) -> float:
    """The smallest float32 above ``value`` (a float32 magnitude), as a Python float.

    Re-selection compares fp32 magnitudes with the threshold, which torch rounds to fp32: a
    threshold one float64 ulp above ``value`` would round back to ``value`` and drop the entries
    sitting exactly at the cut."""
    v = torch.tensor(value, dtype=torch.float32)
    return float(torch.nextafter(v, torch.tensor(math.inf, dtype=torch.float32)))


def apply_sara(model: nn.Module, config: SaRAConfig | None = None) -> nn.Module:
    """Convert ``model``'s Linear/Conv2d layers to sparse-delta layers in place, select the
    trainable entries and freeze everything else.

    Args:
        model: any ``nn.Module`` (a diffusers UNet, a transformer, ...).
        config: :class:`SaRAConfig` (default: the paper's global threshold 2e-3).

    Returns:
        ``model`` (modified in place); ``model.sara_summary`` holds a :class:`SaRASummary` and
        ``model.sara_config`` the config.

    Raises:
        ValueError: if no layer matches, or the rule selects no entry at all (the message gives
            the largest threshold tried and the smallest ``|w|`` seen).
    """
    config = config if config is not None else SaRAConfig()
    if not isinstance(config, SaRAConfig):
        raise TypeError(f"apply_sara: config must be a SaRAConfig, got {type(config).__name__}")
    targets = _targets(model, config)
    weights = [module.weight for _, module in targets]
    targeted_entries = sum(w.numel() for w in weights)
    smallest = min(float(w.detach().abs().min()) for w in weights)

    thresholds: list[float | None]
    if config.threshold is not None:
        with torch.no_grad():
            indices = [
                torch.ops.sara_kernels.select_small_magnitude(w.detach(), config.threshold, None)
                for w in weights
            ]
        thresholds = [config.threshold] * len(weights)
        tried = config.threshold
    elif config.budget_scope == "global":
        k = config.count if config.count is not None else int(round(config.fraction * targeted_entries))
        if k > targeted_entries:
            raise ValueError(
                f"apply_sara: count={k} exceeds the {targeted_entries} entries of the targeted layers"
            )
        with torch.no_grad():
            indices, kth = _select_global_count(weights, k) if k > 0 else ([None] * len(weights), 0.0)
        indices = [i if i is not None else torch.empty(0, dtype=torch.int32) for i in indices]
        # "Still below" at re-selection: strictly above the largest selected magnitude is out.
        tried = _next_float32_above(kth)
        thresholds = [tried] * len(weights)
    else:
        indices, thresholds = [], []
        for w in weights:
            k = config.count if config.count is not None else int(round(config.fraction * w.numel()))
            k = min(k, w.numel())
            with torch.no_grad():
                index = torch.ops.sara_kernels.select_small_magnitude(w.detach(), None, k)
                kth = float(w.detach().reshape(-1)[index.long()].abs().max()) if k else 0.0
            indices.append(index)
            thresholds.append(_next_float32_above(kth))
        tried = max(thresholds) if thresholds else None

    total_k = sum(int(i.numel()) for i in indices)
    if total_k == 0:
        raise ValueError(
            f"apply_sara: the selection rule selects no entry (largest threshold tried: {tried:.6g}; "
            f"smallest |w| seen: {smallest:.6g}); raise the threshold above {smallest:.6g} or give a "
            "fraction/count budget"
        )

    # Freeze everything, then convert (the deltas are created trainable).
    for p in model.parameters():
        p.requires_grad_(False)
    layers = []
    for (name, module), index, threshold in zip(targets, indices, thresholds, strict=True):
        cls = SparseDeltaLinear if isinstance(module, nn.Linear) else SparseDeltaConv2d
        new = cls.from_dense(module, index=index.to(module.weight.device))
        new.sparse_threshold = threshold
        _replace_module(model, name, new)
        if name == "":
            model = new
        layers.append(
            LayerSelection(
                name,
                "linear" if cls is SparseDeltaLinear else "conv2d",
                tuple(module.weight.shape),
                module.weight.numel(),
                int(index.numel()),
            )
        )
    if config.train_bias:
        for module in model.modules():
            bias = getattr(module, "bias", None)
            if isinstance(bias, nn.Parameter):
                bias.requires_grad_(True)
    if config.train_norm:
        for module in model.modules():
            if isinstance(module, _NORM_TYPES):
                for p in module.parameters(recurse=False):
                    p.requires_grad_(True)
    summary = SaRASummary(
        layers=layers,
        total_k=total_k,
        targeted_entries=targeted_entries,
        model_parameters=sum(p.numel() for p in model.parameters() if not _is_delta_param(model, p)),
        threshold=config.threshold,
    )
    model.sara_config = config
    model.sara_summary = summary
    return model


def _is_delta_param(model: nn.Module, p: torch.Tensor) -> bool:
    return any(p is m.sparse_delta for m in model.modules() if isinstance(m, _SparseDeltaMixin))


def _replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    if name == "":
        return
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def sparse_layers(model: nn.Module) -> Iterator[tuple[str, _SparseDeltaMixin]]:
    """(name, layer) for every sparse-delta layer of ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, _SparseDeltaMixin):
            yield name, module


def sparse_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable deltas of ``model``'s sparse-delta layers, for the optimizer."""
    params = [m.sparse_delta for _, m in sparse_layers(model) if m.sparse_delta.requires_grad]
    if not params:
        raise ValueError("sparse_parameters: the model has no sparse-delta layer (call apply_sara first)")
    return params


@dataclasses.dataclass
class ReselectionSummary:
    kept: int
    frozen: int
    per_layer: dict[str, tuple[int, int]]  # name -> (kept, frozen)

    def __str__(self) -> str:
        total = self.kept + self.frozen
        return (
            f"re-selection: {self.kept} of {total} entries stay trainable ({self.kept / max(1, total):.1%}); "
            f"{self.frozen} frozen with their learned delta"
        )


#: :func:`reselect_` warns when it keeps fewer than this share of the trained entries.
RESELECT_WARN_SHARE = 0.1


@torch.no_grad()
def reselect_(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    threshold: float | None = None,
    *,
    reset_state: bool | None = None,
) -> ReselectionSummary:
    """Progressive parameter adjustment: keep training only the entries whose current ``|w|`` is
    still below the threshold; freeze the others with their learned delta (kept in the adapter).

    Args:
        model: a model converted by :func:`apply_sara` (or holding sparse-delta layers).
        optimizer: the optimizer over the deltas; the survivors' Adam moments are carried over
            (gathered), so training continues without a lost step. Pass it whenever it has state.
        threshold: θ for the rule (default: the threshold each layer was selected with).
        reset_state: reset the moments instead (the official code's behaviour; default from
            ``model.sara_config.reset_state_on_reselect``).

    Warns (``UserWarning``) when it keeps fewer than ``RESELECT_WARN_SHARE`` (10%) of the
    entries: then the second stage trains almost nothing.

    Returns:
        A :class:`ReselectionSummary`. Deltas keep their identity (the optimizer's param groups
        stay valid); a DDP wrapper must be rebuilt after it, since parameter sizes change.
    """
    layers = list(sparse_layers(model))
    if not layers:
        raise ValueError("reselect_: the model has no sparse-delta layer (call apply_sara first)")
    if threshold is not None and not (
        isinstance(threshold, (int, float)) and threshold > 0 and math.isfinite(threshold)
    ):
        raise ValueError(f"reselect_: threshold must be a positive finite number, got {threshold!r}")
    if reset_state is None:
        config = getattr(model, "sara_config", None)
        reset_state = bool(config.reset_state_on_reselect) if isinstance(config, SaRAConfig) else False
    trained = any(bool((layer.sparse_delta != 0).any()) for _, layer in layers)
    if not trained:
        raise RuntimeError(
            "reselect_: no delta has changed from 0 yet; re-selection is meant after some training "
            "(the paper re-selects half-way)"
        )
    kept_total = frozen_total = 0
    per_layer = {}
    thetas = set()
    for name, layer in layers:
        theta = threshold if threshold is not None else layer.sparse_threshold
        thetas.add(theta)
        if theta is None:
            raise ValueError(
                f"reselect_: layer {name!r} was built with an explicit index and no threshold; pass threshold="
            )
        layer._maybe_merge()
        index = layer.sparse_index
        current = layer.weight.view(-1)[index.long()].float().abs()
        keep = current < theta
        drop = ~keep
        delta = layer.sparse_delta
        if bool(drop.any()):
            frozen_index = torch.cat([layer.sparse_frozen_index, index[drop]])
            order = torch.argsort(frozen_index)
            layer.sparse_frozen_index = frozen_index[order].contiguous()
            layer.sparse_frozen_base = torch.cat([layer.sparse_frozen_base, layer.sparse_base[drop]])[order]
            layer.sparse_frozen_delta = torch.cat([layer.sparse_frozen_delta, delta.detach()[drop]])[order]
        new_index = index[keep].contiguous()
        _checks.mark_index_checked(new_index, layer.weight.numel())
        layer.sparse_index = new_index
        layer.sparse_base = layer.sparse_base[keep].contiguous()
        survivors = delta.data[keep].contiguous()
        # Resize the delta in place so optimizers and user references stay valid. Autograd caches a
        # leaf's AccumulateGrad node with the old shape while any earlier graph still holds it
        # (e.g. the last loss tensor), and set_data resets that cache only on a dtype/device
        # change: pass through fp64 so the next backward gets a node with the new shape.
        delta.data = survivors.double()
        delta.data = survivors
        delta.grad = None
        if optimizer is not None and delta in optimizer.state:
            state = optimizer.state[delta]
            for key, value in list(state.items()):
                if isinstance(value, torch.Tensor) and value.shape == keep.shape:
                    state[key] = torch.zeros_like(value[keep]) if reset_state else value[keep].contiguous()
            if reset_state and "step" in state:
                state["step"] = (
                    torch.zeros_like(state["step"]) if isinstance(state["step"], torch.Tensor) else 0
                )
        kept, frozen = int(keep.sum()), int(drop.sum())
        per_layer[name] = (kept, frozen)
        kept_total += kept
        frozen_total += frozen
        mark_merged(delta)
    total = kept_total + frozen_total
    if total and kept_total < RESELECT_WARN_SHARE * total:
        known = sorted(float(t) for t in thetas if t is not None)
        shown = f"{known[0]:.3g}" if known[0] == known[-1] else f"{known[0]:.3g} to {known[-1]:.3g} by layer"
        warnings.warn(
            f"reselect_: only {kept_total} of {total} trained entries ({kept_total / total:.1%}) are still "
            f"below the threshold ({shown}) and stay trainable; the other {frozen_total} are frozen with "
            "their learned delta. The first stage moved almost every entry past the threshold, which "
            "happens when the learning rate is large next to it (the paper ties the two: "
            "paper_learning_rate). In a short run, re-select later (ProgressiveReselection(at=...)) "
            "or not at all.",
            stacklevel=3,  # the caller of reselect_ (through torch.no_grad's wrapper)
        )
    return ReselectionSummary(kept_total, frozen_total, per_layer)


class ProgressiveReselection:
    """Call :meth:`step` once per optimizer step; it runs :func:`reselect_` at the configured step.

    Args:
        model, optimizer: as for :func:`reselect_`.
        total_steps: the run's length; needed when ``at`` is a fraction.
        at: a fraction of ``total_steps`` in (0, 1) or a step number (default:
            ``model.sara_config.progressive_at``, else 0.5 as in the paper).
        threshold, reset_state: passed to :func:`reselect_`.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        total_steps: int | None = None,
        at: float | int | None = None,
        threshold: float | None = None,
        reset_state: bool | None = None,
    ):
        config = getattr(model, "sara_config", None)
        if at is None:
            at = config.progressive_at if isinstance(config, SaRAConfig) and config.progressive_at else 0.5
        if isinstance(at, float):
            if not 0 < at < 1:
                raise ValueError(f"ProgressiveReselection: a fractional 'at' must lie in (0, 1), got {at}")
            if total_steps is None or total_steps <= 0:
                raise ValueError("ProgressiveReselection: total_steps is needed when 'at' is a fraction")
            at = max(1, int(round(at * total_steps)))
        if not isinstance(at, int) or at <= 0:
            raise ValueError(f"ProgressiveReselection: 'at' must be a positive step number, got {at!r}")
        self.model, self.optimizer, self.at = model, optimizer, at
        self.threshold, self.reset_state = threshold, reset_state
        self.steps = 0
        self.summary: ReselectionSummary | None = None

    def step(self) -> bool:
        """Count one optimizer step; re-select when the count reaches ``at``. Returns True then."""
        self.steps += 1
        if self.steps == self.at:
            self.summary = reselect_(self.model, self.optimizer, self.threshold, reset_state=self.reset_state)
            return True
        return False

    def state_dict(self) -> dict:
        return {"steps": self.steps, "at": self.at}

    def load_state_dict(self, state: dict) -> None:
        self.steps, self.at = int(state["steps"]), int(state["at"])


__all__ = [
    "DEFAULT_THRESHOLD",
    "ProgressiveReselection",
    "ReselectionSummary",
    "SaRAConfig",
    "SaRASummary",
    "apply_sara",
    "reselect_",
    "sparse_layers",
    "sparse_parameters",
]
