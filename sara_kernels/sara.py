"""The SaRA method around the sparse-delta layers: selection, freezing, progressive re-selection.

model = apply_sara(unet, SaRAConfig(threshold=2e-3))          # convert + select + freeze
optimizer = SparseAdamW(sparse_parameters(model), lr=paper_learning_rate(2e-3))
progressive = ProgressiveReselection(model, optimizer, total_steps=5000)  # re-select half-way
for batch in data:
    loss = ...; loss.backward(); optimizer.step(); optimizer.zero_grad(); progressive.step()
"""

from __future__ import annotations

import dataclasses
import fnmatch
import inspect
import math
import re
import warnings
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from sara_kernels import nn as sk_nn
from sara_kernels import reference
from sara_kernels.nn import _SparseDeltaMixin, module_parents

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
    nn.RMSNorm,
)


def _is_norm(module: nn.Module) -> bool:
    """A normalisation layer: torch's, or one whose class is named like one (diffusers' RMSNorm,
    FP32LayerNorm...)."""
    return isinstance(module, _NORM_TYPES) or type(module).__name__.endswith("Norm")


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
        target_modules: module names or regexes to convert (None: every Linear, Conv1d, Conv2d,
            Conv3d and Embedding). A string entry matches a module whose full name equals it, ends
            with ``"." + it``, or fully matches it as a regex.
        exclude_modules: names or regexes never to convert (same matching).
        convert_embeddings: convert ``nn.Embedding`` tables too (on by default: a denoiser's class
            or label embeddings are weights like any other; ``False`` leaves every Embedding
            frozen, e.g. a text encoder's token table, and lists them in the summary).
        train_parameters: names or fnmatch patterns of parameters to train densely (kept
            ``requires_grad=True`` and returned by :func:`sparse_parameters` after the deltas):
            bare parameters that no sparse-delta layer holds, such as the adaLN
            ``scale_shift_table`` of PixArt/Sana/Wan or a learned ``pos_embed``. A pattern matches
            a full parameter name (``model.named_parameters()``) or its end after a dot, so
            ``"scale_shift_table"`` matches every one of them. Each pattern must match something;
            a weight of a converted layer cannot be listed (exclude the layer first).
        train_bias: keep every bias trainable (off by default, as in the paper).
        train_norm: keep normalisation layers' affine parameters trainable (off by default): torch's
            norms and any layer whose class name ends in ``Norm`` (diffusers' ``RMSNorm``...).
        progressive_at: when :class:`ProgressiveReselection` re-selects: a fraction of the total
            steps in (0, 1) (the paper: 0.5) or a step number; None disables it.
        reset_state_on_reselect: reset Adam moments at re-selection (the official code's
            behaviour, kept for ablations); by default the survivors' moments carry over.
        include_zeros: select exact zeros too. By default an entry whose pre-trained value is
            exactly 0 is never selected: a zero is an initialisation (ControlNet's zero
            convolutions, zero-initialised gates), not a small trained weight, and a budget rule
            would otherwise spend most of its entries there (67-98% on a ControlNet) and then
            re-select against a threshold of 0. Layers that are all zeros are listed in the summary.
    """

    threshold: float | None = None
    fraction: float | None = None
    count: int | None = None
    budget_scope: str = "global"
    target_modules: Sequence[str] | str | None = None
    exclude_modules: Sequence[str] | str | None = None
    convert_embeddings: bool = True
    train_parameters: Sequence[str] | str | None = None
    train_bias: bool = False
    train_norm: bool = False
    progressive_at: float | int | None = None
    reset_state_on_reselect: bool = False
    include_zeros: bool = False

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
        if isinstance(self.train_parameters, str):
            self.train_parameters = [self.train_parameters]
        if self.train_parameters is not None:
            self.train_parameters = list(self.train_parameters)
            if not all(isinstance(v, str) and v for v in self.train_parameters):
                raise TypeError(
                    "SaRAConfig: train_parameters must be a string or a list of non-empty strings"
                )
        if not isinstance(self.convert_embeddings, bool):
            raise TypeError(f"SaRAConfig: convert_embeddings must be a bool, got {self.convert_embeddings!r}")
        if not isinstance(self.include_zeros, bool):
            raise TypeError(f"SaRAConfig: include_zeros must be a bool, got {self.include_zeros!r}")
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
    kind: str  # "linear" | "conv1d" | "conv2d" | "conv3d" | "embedding"
    shape: tuple[int, ...]
    numel: int
    k: int
    #: Other names of the same module (reached under several names: converted once, used everywhere).
    aliases: tuple[str, ...] = ()
    #: The layer whose weight, and so whose sparse state, this one shares (tied weights).
    shares_with: str | None = None


@dataclasses.dataclass
class SkippedLayer:
    """A Linear/Conv/Embedding layer that :func:`apply_sara` targeted but did not convert, and why."""

    name: str
    kind: str  # the module's class name
    numel: int
    reason: str


@dataclasses.dataclass
class FrozenParameters:
    """Parameters left frozen and not adapted, grouped by (module type, parameter name, reason)."""

    module_type: str
    parameter: str
    reason: str
    count: int
    numel: int
    #: True when no configuration trains them as SaRA: a module type without a sparse-delta layer or
    #: a bare parameter (train it densely with ``SaRAConfig(train_parameters=...)``). False for the
    #: paper's choices (biases, norms), layers left out by the config and targeted layers that could
    #: not be converted (listed, with their own warning, in :attr:`SaRASummary.skipped`).
    unsupported: bool


#: :func:`apply_sara` warns when the unsupported frozen parameters exceed this share of the model.
FROZEN_WARN_SHARE = 0.05


@dataclasses.dataclass
class SaRASummary:
    """What :func:`apply_sara` selected, and what it left out."""

    layers: list[LayerSelection]
    total_k: int
    targeted_entries: int
    model_parameters: int
    threshold: float | None
    skipped: list[SkippedLayer] = dataclasses.field(default_factory=list)
    #: Exact zeros among the converted layers' weights (not selected unless ``include_zeros``).
    zero_entries: int = 0
    #: Converted layers whose weights are all exact zeros (e.g. ControlNet's zero convolutions).
    zero_layers: list[str] = dataclasses.field(default_factory=list)
    include_zeros: bool = False
    #: Parameters neither adapted nor trained, by module type, name and reason.
    frozen: list[FrozenParameters] = dataclasses.field(default_factory=list)
    #: (name, numel) of the parameters trained densely (``SaRAConfig.train_parameters``).
    trained_parameters: list[tuple[str, int]] = dataclasses.field(default_factory=list)

    @property
    def unsupported_share(self) -> float:
        """Share of the model's parameters frozen because SaRA cannot adapt them as configured."""
        return sum(f.numel for f in self.frozen if f.unsupported) / max(1, self.model_parameters)

    @property
    def share_of_targeted(self) -> float:
        return self.total_k / max(1, self.targeted_entries)

    @property
    def share_of_model(self) -> float:
        return self.total_k / max(1, self.model_parameters)

    def __str__(self) -> str:
        lines = [f"{'layer':<60} {'kind':<9} {'k':>10} {'density':>8}"]
        for layer in self.layers:
            note = f"  (shares {layer.shares_with})" if layer.shares_with else ""
            note += f"  (also {', '.join(layer.aliases)})" if layer.aliases else ""
            lines.append(
                f"{layer.name:<60} {layer.kind:<9} {layer.k:>10} {layer.k / max(1, layer.numel):>8.2%}{note}"
            )
        lines.append(
            f"total: {self.total_k} trainable entries = {self.share_of_targeted:.2%} of the "
            f"{self.targeted_entries} targeted weights, {self.share_of_model:.2%} of the model's "
            f"{self.model_parameters} parameters"
            + (f" (threshold {self.threshold:.3g})" if self.threshold is not None else "")
        )
        if self.zero_entries and not self.include_zeros:
            lines.append(
                f"exact zeros: {self.zero_entries} entries ({self.zero_entries / max(1, self.targeted_entries):.2%} "
                "of the targeted weights) are never selected (SaRAConfig(include_zeros=True) selects them)"
                + (f"; all-zero layers: {', '.join(self.zero_layers)}" if self.zero_layers else "")
            )
        if self.skipped:
            total = sum(s.numel for s in self.skipped)
            lines.append(
                f"not converted: {len(self.skipped)} targeted layer(s), {total} weights "
                f"({total / max(1, self.targeted_entries + total):.2%} of the targeted weights):"
            )
            for s in self.skipped:
                lines.append(f"  {s.name} ({s.kind}, {s.numel} weights): {s.reason}")
        if self.trained_parameters:
            total = sum(n for _, n in self.trained_parameters)
            lines.append(
                f"trained densely (train_parameters): {len(self.trained_parameters)} parameter(s), "
                f"{total} values: " + ", ".join(name for name, _ in self.trained_parameters)
            )
        if self.frozen:
            total = sum(f.numel for f in self.frozen)
            lines.append(
                f"frozen, not adapted: {total} parameters ({total / max(1, self.model_parameters):.2%} of "
                f"the model; {self.unsupported_share:.2%} that SaRA cannot adapt as configured):"
            )
            for f in sorted(self.frozen, key=lambda f: -f.numel):
                lines.append(
                    f"  {f.module_type}.{f.parameter} x{f.count}: {f.numel} "
                    f"({f.numel / max(1, self.model_parameters):.2%}): {f.reason}"
                )
        return "\n".join(lines)


def _matches(name: str, patterns: Sequence[str]) -> bool:
    for pattern in patterns:
        if name == pattern or name.endswith("." + pattern) or re.fullmatch(pattern, name):
            return True
    return False


_PLAIN_FORWARD = {dense: dense.forward for dense in sk_nn.DENSE_TYPES}
_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

#: ``self.<child>.weight`` read as a value (not just its dtype, device or shape) in a method body.
_WEIGHT_READ = re.compile(
    r"self\.(\w+)\.weight\b(?!\s*\.\s*(?:dtype|device|shape|size|ndim|dim|is_\w+|requires_grad|numel|"
    r"nelement|element_size|data_ptr)\b)(?!\s*=[^=])"
)
_READS_BY_TYPE: dict[type, list[tuple[str, str]]] = {}


def _weight_reads(cls: type) -> list[tuple[str, str]]:
    """(``Class.forward``, child attribute) for every ``self.<child>.weight`` that the ``forward``
    of ``cls`` (outside torch.nn) reads as a tensor: a weight consumed outside the child's own
    forward, which a sparse delta on that child would never see (HunyuanDiT's attention pooling
    passes ``q_proj.weight`` to ``F.multi_head_attention_forward``). Only ``forward``: other methods
    (``fuse_projections``, initialisers) do not run in a training step; a weight read elsewhere is
    caught at the first optimizer step instead (a warning names the layers that got no gradient)."""
    if cls not in _READS_BY_TYPE:
        found = []
        for klass in cls.__mro__:
            if klass is object or klass.__module__.startswith("torch."):
                continue
            for name, fn in vars(klass).items():
                if name != "forward" or not inspect.isfunction(fn):
                    continue
                try:
                    source = inspect.getsource(fn)
                except (OSError, TypeError):
                    continue
                found.extend((f"{klass.__name__}.{name}", m.group(1)) for m in _WEIGHT_READ.finditer(source))
        _READS_BY_TYPE[cls] = found
    return _READS_BY_TYPE[cls]


@dataclasses.dataclass
class _Target:
    module: nn.Module
    names: list[str]


_CONVERTIBLE = "nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d or nn.Embedding"


def _plan(model: nn.Module, config: SaRAConfig) -> tuple[list[list[_Target]], list[SkippedLayer]]:
    """Which layers to convert, grouped by shared weight Parameter, and which targeted layers cannot
    be (with the reason). Reads the model; changes nothing."""
    modules: dict[int, _Target] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, _SparseDeltaMixin):
            raise ValueError(
                f"apply_sara: layer {name!r} is already a sparse-delta layer; apply_sara converts a "
                "dense model once (use merge_and_unload first to start over)"
            )
        if id(module) in modules:
            modules[id(module)].names.append(name)
        else:
            modules[id(module)] = _Target(module, [name])

    users: dict[int, list[tuple[_Target, str]]] = {}  # id(parameter) -> every (module, key) holding it
    read_by: dict[int, str] = {}  # id(child) -> where its weight is read outside its forward
    for target in modules.values():
        for key, p in target.module._parameters.items():
            if p is not None:
                users.setdefault(id(p), []).append((target, key))
        for where, child in _weight_reads(type(target.module)):
            sub = target.module._modules.get(child)
            if isinstance(sub, sk_nn.DENSE_TYPES):
                read_by.setdefault(id(sub), where)
        if isinstance(target.module, nn.MultiheadAttention):
            read_by.setdefault(id(target.module.out_proj), "nn.MultiheadAttention.forward")

    candidates: list[_Target] = []
    skipped: list[SkippedLayer] = []
    for target in modules.values():
        module, names = target.module, target.names
        sparse_cls = sk_nn.sparse_type_for(module)
        if sparse_cls is None or (sparse_cls is sk_nn.SparseDeltaEmbedding and not config.convert_embeddings):
            continue
        if config.target_modules is not None and not any(_matches(n, config.target_modules) for n in names):
            continue
        if config.exclude_modules is not None and any(_matches(n, config.exclude_modules) for n in names):
            continue
        base = sparse_cls._dense_type
        weight = module._parameters.get("weight")
        reason = None
        owner = sk_nn.owner_of(weight) if isinstance(weight, nn.Parameter) else None
        if not isinstance(weight, nn.Parameter):
            reason = "its weight is not a parameter (weight_norm or a parametrization computes it)"
        elif owner is not None:
            reason = (
                f"its weight is already adapted by {owner._label()} (a module shared with a model "
                "converted before); convert the models that share it together"
            )
        elif id(module) in read_by:
            reason = f"its weight is read by {read_by[id(module)]} outside the layer's own forward"
        elif type(module).forward is not _PLAIN_FORWARD[base]:
            reason = (
                f"{type(module).__name__} overrides {base.__name__}.forward; converting it would replace "
                "that forward"
            )
        elif isinstance(module, nn.Embedding) and (module.max_norm is not None or module.sparse):
            reason = (
                "max_norm renormalises the weight in the forward"
                if module.max_norm is not None
                else "sparse=True (sparse weight gradients)"
            ) + ", which a sparse-delta Embedding does not support"
        if reason:
            numel = weight.numel() if isinstance(weight, torch.Tensor) else 0
            skipped.append(SkippedLayer(names[0], type(module).__name__, numel, reason))
        else:
            candidates.append(target)

    by_weight: dict[int, list[_Target]] = {}
    for target in candidates:
        by_weight.setdefault(id(target.module.weight), []).append(target)
    groups = []
    for weight_id, group in by_weight.items():
        members = {id(t.module) for t in group}
        others = [(t, key) for t, key in users[weight_id] if id(t.module) not in members or key != "weight"]
        if others:
            other, key = others[0]
            label = f"{other.names[0] or '(the model)'}.{key}"
            for t in group:
                skipped.append(
                    SkippedLayer(
                        t.names[0],
                        type(t.module).__name__,
                        t.module.weight.numel(),
                        f"its weight is shared with {label} ({type(other.module).__name__}), which is not "
                        "converted; training it through one of them only would be wrong",
                    )
                )
            continue
        groups.append(group)

    invalid = []
    for group in groups:
        weight = group[0].module.weight
        if weight.dtype not in _SUPPORTED_DTYPES:
            invalid.append(f"{group[0].names[0]!r} (weight {weight.dtype})")
        elif weight.device.type == "meta":
            invalid.append(f"{group[0].names[0]!r} (weight on the meta device)")
    if invalid:
        shown = ", ".join(invalid[:10]) + (f" and {len(invalid) - 10} more" if len(invalid) > 10 else "")
        raise ValueError(
            f"apply_sara: cannot convert {len(invalid)} targeted layer(s): {shown}. Sparse-delta layers "
            "need materialised fp32, bf16 or fp16 weights: cast or load the model first, or leave these "
            "out with SaRAConfig(exclude_modules=[...]). Nothing was changed"
        )
    if not groups:
        if skipped:
            raise ValueError(
                "apply_sara: every targeted layer is unsuitable: "
                + "; ".join(f"{s.name!r}: {s.reason}" for s in skipped[:5])
            )
        if config.target_modules is not None:
            raise ValueError(
                f"apply_sara: target_modules {config.target_modules} match no {_CONVERTIBLE} layer of "
                "the model (names are those of model.named_modules())"
            )
        raise ValueError(f"apply_sara: the model has no {_CONVERTIBLE} layer to adapt")
    return groups, skipped


# ---------------------------------------------------------------------------------------------
# Selection by magnitude: exact k-th smallest |w| over many tensors by a two-pass radix select
# ---------------------------------------------------------------------------------------------
_EXPONENT_ALL_ONES = 0x7F800000  # +inf; larger patterns are NaN
#: Small layers are processed concatenated, up to this many entries at a time (16 MiB of int32).
_CHUNK_ENTRIES = 1 << 22


def _chunks(weights: list[torch.Tensor], exclude_zeros: bool):
    """Runs of consecutive weights as (bits, valid, [(layer, offset, numel)]): ``bits`` the int32
    patterns of ``|w|`` as fp32 (monotone in the magnitude), ``valid`` False for NaN (and for exact
    zeros when excluded). Small layers are concatenated up to :data:`_CHUNK_ENTRIES` entries (one
    op per chunk instead of per layer); a large layer is a chunk of its own. One chunk at a time
    is alive."""
    group: list[tuple[int, torch.Tensor]] = []
    size = 0

    def make():
        flat = torch.cat([w.detach().reshape(-1).float() for _, w in group])
        bits = flat.abs_().view(torch.int32) & 0x7FFFFFFF
        valid = bits <= _EXPONENT_ALL_ONES
        if exclude_zeros:
            valid &= bits != 0
        spans, offset = [], 0
        for i, w in group:
            spans.append((i, offset, w.numel()))
            offset += w.numel()
        return bits, valid, spans

    for i, w in enumerate(weights):
        if group and (size + w.numel() > _CHUNK_ENTRIES or w.device != group[0][1].device):
            yield make()
            group, size = [], 0
        group.append((i, w))
        size += w.numel()
    if group:
        yield make()


def _kth_smallest_bits(weights: list[torch.Tensor], k: int, exclude_zeros: bool) -> tuple[int, int]:
    """(bit pattern of the k-th smallest magnitude over ``weights`` (1-based ``k``), how many
    selectable entries lie strictly below it): a histogram of the high 16 bits, then one of the
    low 16 bits inside the bin that holds the k-th: two passes, whatever the number of layers."""
    high = torch.zeros(1 << 15, dtype=torch.int64)
    for bits, valid, _ in _chunks(weights, exclude_zeros):
        high += torch.bincount(bits[valid] >> 16, minlength=1 << 15).cpu()
    cum = high.cumsum(0)
    digit = int(torch.searchsorted(cum, torch.tensor(k)))
    below = int(cum[digit - 1]) if digit > 0 else 0
    low = torch.zeros(1 << 16, dtype=torch.int64)
    for bits, valid, _ in _chunks(weights, exclude_zeros):
        picked = bits[valid]
        low += torch.bincount(picked[(picked >> 16) == digit] & 0xFFFF, minlength=1 << 16).cpu()
    cum = low.cumsum(0)
    rest = int(torch.searchsorted(cum, torch.tensor(k - below)))
    return (digit << 16) | rest, below + (int(cum[rest - 1]) if rest > 0 else 0)


def _bits_to_float(bits: int) -> float:
    return float(torch.tensor([bits], dtype=torch.int32).view(torch.float32))


def _select_count(
    weights: list[torch.Tensor], k: int, exclude_zeros: bool
) -> tuple[list[torch.Tensor], float]:
    """Exactly k indices over all weights: every |w| below the k-th value, then ties in layer order
    and index order. Returns the indices and the k-th magnitude. Three passes over the weights;
    temporary memory: one chunk."""
    kth, below = _kth_smallest_bits(weights, k, exclude_zeros)
    ties_left = k - below
    chosen: list[torch.Tensor] = [None] * len(weights)  # type: ignore[list-item]
    for bits, valid, spans in _chunks(weights, exclude_zeros):
        hit = valid & (bits < kth)
        if ties_left > 0:  # ties at the k-th value: in layer order, then index order
            ties = torch.nonzero(valid & (bits == kth)).flatten()[:ties_left]
            hit[ties] = True
            ties_left -= ties.numel()
        positions = torch.nonzero(hit).flatten()
        starts = torch.tensor([offset for _, offset, _ in spans], device=positions.device)
        owner = torch.searchsorted(starts, positions, right=True) - 1
        counts = torch.bincount(owner, minlength=len(spans)).tolist()
        for (i, offset, numel), part in zip(spans, torch.split(positions, counts), strict=True):
            chosen[i] = (part - offset).to(reference.index_dtype_for(numel))
    return chosen, _bits_to_float(kth)


def _next_float32_above(value: float) -> float:
    """The smallest float32 above ``value`` (a float32 magnitude), as a Python float.

    Re-selection compares fp32 magnitudes with the threshold, which torch rounds to fp32: a
    threshold one float64 ulp above ``value`` would round back to ``value`` and drop the entries
    sitting exactly at the cut."""
    v = torch.tensor(value, dtype=torch.float32)
    return float(torch.nextafter(v, torch.tensor(math.inf, dtype=torch.float32)))


def _select(weights: list[torch.Tensor], config: SaRAConfig, zeros: list[int]):
    """(indices, re-selection thresholds, the largest threshold tried) for the config's rule."""
    exclude = not config.include_zeros
    targeted = sum(w.numel() for w in weights)
    available = targeted - (sum(zeros) if exclude else 0)
    select = torch.ops.sara_kernels.select_small_magnitude
    with torch.no_grad():
        if config.threshold is not None:
            indices = []
            for w, z in zip(weights, zeros, strict=True):
                index = select(w.detach(), config.threshold, None)
                if exclude and z:
                    index = index[w.detach().reshape(-1)[index.long()] != 0]
                indices.append(index)
            return indices, [config.threshold] * len(weights), config.threshold
        if config.budget_scope == "global":
            k = config.count if config.count is not None else int(round(config.fraction * targeted))
            if k > available:
                raise ValueError(
                    f"apply_sara: count={k} exceeds the {available} selectable entries of the targeted "
                    "layers"
                    + (" (exact zeros are not selectable; SaRAConfig(include_zeros=True))" if exclude else "")
                )
            if k == 0:
                return [torch.empty(0, dtype=torch.int32) for _ in weights], [0.0] * len(weights), 0.0
            indices, kth = _select_count(weights, k, exclude)
            _warn_zero_cut(kth)
            tried = _next_float32_above(kth)
            return indices, [tried] * len(weights), tried
        indices, thresholds = [], []
        for w, z in zip(weights, zeros, strict=True):
            k = config.count if config.count is not None else int(round(config.fraction * w.numel()))
            k = min(k, w.numel() - (z if exclude else 0))
            if k <= 0:
                index, kth = torch.empty(0, dtype=reference.index_dtype_for(w.numel())), 0.0
            elif exclude and z:
                (index,), kth = _select_count([w], k, True)
            else:
                index = select(w.detach(), None, k)
                kth = float(w.detach().reshape(-1)[index.long()].abs().max())
            indices.append(index)
            thresholds.append(_next_float32_above(kth))
        return indices, thresholds, max(thresholds)


def _warn_zero_cut(kth: float) -> None:
    if kth == 0.0:
        warnings.warn(
            "apply_sara: the budget's cut lies at |w| = 0 (exact zeros fill it): re-selection would "
            "freeze every selected entry that moved at all. Leave zeros out (include_zeros=False, "
            "the default) or use a threshold",
            UserWarning,
            stacklevel=4,
        )


def _matches_parameter(name: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, "*." + pattern)


def _train_parameters(
    model: nn.Module, config: SaRAConfig, groups: list[list[_Target]]
) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every parameter ``config.train_parameters`` names, each once; checked
    (each pattern matches, no converted layer's weight, floating point). Changes nothing."""
    if not config.train_parameters:
        return []
    converted = {id(group[0].module.weight) for group in groups}
    named = list(model.named_parameters())
    found: dict[int, tuple[str, nn.Parameter]] = {}
    for pattern in config.train_parameters:
        hits = [(n, p) for n, p in named if _matches_parameter(n, pattern)]
        if not hits:
            shown = ", ".join(n for n, _ in named[:8]) + (" ..." if len(named) > 8 else "")
            raise ValueError(
                f"apply_sara: train_parameters entry {pattern!r} matches no parameter of the model "
                f"(full names of model.named_parameters(), e.g. {shown})"
            )
        for name, param in hits:
            if id(param) in converted:
                raise ValueError(
                    f"apply_sara: train_parameters entry {pattern!r} matches {name!r}, the weight of a layer "
                    "that apply_sara converts (SaRA trains its small entries); to train it densely, leave "
                    "the layer out with SaRAConfig(exclude_modules=[...])"
                )
            if not param.is_floating_point():
                raise TypeError(
                    f"apply_sara: train_parameters entry {pattern!r} matches {name!r} of dtype "
                    f"{param.dtype}, which cannot be trained"
                )
            found.setdefault(id(param), (name, param))
    return list(found.values())


def _frozen_parameters(
    root: nn.Module, config: SaRAConfig, skipped: list[SkippedLayer]
) -> list[FrozenParameters]:
    """Every parameter of ``root`` that is neither adapted nor trainable, grouped by (module type,
    parameter name, reason)."""
    not_converted = {s.name: s.reason for s in skipped}
    groups: dict[tuple[str, str, str], FrozenParameters] = {}
    seen: set[int] = set()
    for module_name, module in root.named_modules():
        sparse = isinstance(module, _SparseDeltaMixin)
        for key, param in module._parameters.items():
            if param is None or id(param) in seen:
                continue
            seen.add(id(param))
            if param.requires_grad or (sparse and key in ("weight", "sparse_delta")):
                continue  # trained (delta, train_* switches) or adapted
            dense_cls = sk_nn.sparse_type_for(module)
            unsupported = False
            if module_name in not_converted and key == "weight":
                reason = f"not converted: {not_converted[module_name]}"
            elif key == "bias":
                reason = "bias (SaRAConfig(train_bias=True) trains biases)"
            elif _is_norm(module):
                reason = "normalisation layer (SaRAConfig(train_norm=True) trains them)"
            elif dense_cls is sk_nn.SparseDeltaEmbedding and not config.convert_embeddings:
                reason = "Embedding left out (SaRAConfig(convert_embeddings=False))"
            elif dense_cls is not None and key == "weight":
                reason = "layer not targeted (SaRAConfig target_modules / exclude_modules)"
            elif module._modules or key != "weight":
                reason = (
                    "a bare parameter, held by no layer SaRA adapts (SaRAConfig(train_parameters=[...]) "
                    "trains it densely)"
                )
                unsupported = True
            else:
                reason = f"no sparse-delta layer for {type(module).__name__}"
                unsupported = True
            group_key = ((module._dense_type if sparse else type(module)).__name__, key, reason)
            if group_key not in groups:
                groups[group_key] = FrozenParameters(*group_key, 0, 0, unsupported)
            groups[group_key].count += 1
            groups[group_key].numel += param.numel()
    return list(groups.values())


def apply_sara(model: nn.Module, config: SaRAConfig | None = None) -> nn.Module:
    """Convert ``model``'s Linear, Conv1d/2d/3d and Embedding layers to sparse-delta layers in
    place, select the trainable entries and freeze everything else (except the parameters
    ``config.train_parameters`` names, trained densely).

    Everything is checked before anything changes: an error leaves the model as it was. A module
    reached under several names is converted once and replaced everywhere; modules sharing a weight
    Parameter share one delta. Layers that cannot be trained this way are not converted, with a
    warning and a line each in the summary: a weight read outside the layer's own forward
    (``nn.MultiheadAttention``, HunyuanDiT's attention pooling), a subclass with its own
    ``forward``, a weight shared with a module that is not converted, a computed weight. Exact zeros
    are not selected unless ``config.include_zeros``. Runs in time linear in the number of layers.

    Args:
        model: any ``nn.Module`` (a diffusers UNet, a transformer, ...).
        config: :class:`SaRAConfig` (default: the paper's global threshold 2e-3).

    Returns:
        ``model`` (modified in place; the new layer when ``model`` itself is a convertible layer);
        ``model.sara_summary`` holds a :class:`SaRASummary` (with every parameter left frozen and
        why) and ``model.sara_config`` the config. Warns when parameters that SaRA cannot adapt as
        configured (bare parameters, module types without a sparse-delta layer, layers that could
        not be converted) exceed ``FROZEN_WARN_SHARE`` (5%) of the model.

    Raises:
        ValueError: no layer matches, a targeted layer has an unsupported weight, or the rule
            selects no entry at all (the message gives the largest threshold tried and the smallest
            ``|w|`` seen).
    """
    config = config if config is not None else SaRAConfig()
    if not isinstance(config, SaRAConfig):
        raise TypeError(f"apply_sara: config must be a SaRAConfig, got {type(config).__name__}")
    from sara_kernels.multi_adapter import holds_adapters, list_adapters

    holders = holds_adapters(sk_nn.unwrap_model(model))
    if holders:
        where = holders[0]
        names = list_adapters(sk_nn.unwrap_model(model).get_submodule(where))
        raise ValueError(
            f"apply_sara: {'the model' if not where else repr(where)} holds named adapters "
            f"({', '.join(repr(n) for n in names)}); merge_and_unload it to train on top of the active "
            "combination, or delete_adapter them to train the base"
        )
    groups, skipped = _plan(model, config)
    dense_trained = _train_parameters(model, config, groups)
    weights = [group[0].module.weight for group in groups]
    targeted_entries = sum(w.numel() for w in weights)
    with torch.no_grad():
        zeros = [int((w.detach() == 0).sum()) for w in weights]
    indices, thresholds, tried = _select(weights, config, zeros)
    total_k = sum(int(i.numel()) for i in indices)
    if total_k == 0:
        smallest = min(
            float(w.detach().abs()[w.detach() != 0].min()) if z < w.numel() else math.inf
            for w, z in zip(weights, zeros, strict=True)
        )
        raise ValueError(
            f"apply_sara: the selection rule selects no entry (largest threshold tried: {tried:.6g}; "
            f"smallest non-zero |w| seen: {smallest:.6g}); raise the threshold above {smallest:.6g} or "
            "give a fraction/count budget"
        )

    # Everything is validated: freeze, then convert (the deltas are created trainable).
    for p in model.parameters():
        p.requires_grad_(False)
    parents = module_parents(model)
    layers = []
    root = model
    for group, index, threshold in zip(groups, indices, thresholds, strict=True):
        owner_name = None
        for target in group:
            module = target.module
            cls = sk_nn.sparse_type_for(module)
            if owner_name is None:
                new = cls.from_dense(module, index=index.to(module.weight.device), name=target.names[0])
                new.sparse_threshold = threshold
            else:
                new = cls.from_dense(module, name=target.names[0])  # shares the owner's sparse state
            for parent, attr in parents.get(id(module), []):
                setattr(parent, attr, new)
            if module is model:
                root = new
            layers.append(
                LayerSelection(
                    target.names[0],
                    cls.__name__.removeprefix("SparseDelta").lower(),
                    tuple(module.weight.shape),
                    module.weight.numel(),
                    int(index.numel()),
                    aliases=tuple(target.names[1:]),
                    shares_with=owner_name,
                )
            )
            owner_name = owner_name or target.names[0]
    if config.train_bias:
        for module in root.modules():
            bias = getattr(module, "bias", None)
            if isinstance(bias, nn.Parameter):
                bias.requires_grad_(True)
    if config.train_norm:
        for module in root.modules():
            if _is_norm(module):
                for p in module.parameters(recurse=False):
                    p.requires_grad_(True)
    for _, param in dense_trained:
        param.requires_grad_(True)
    deltas = {id(m.sparse_delta) for _, m in sparse_layers(root)}
    zero_layers = [g[0].names[0] for g, w, z in zip(groups, weights, zeros, strict=True) if z == w.numel()]
    summary = SaRASummary(
        layers=layers,
        total_k=total_k,
        targeted_entries=targeted_entries,
        model_parameters=sum(p.numel() for p in root.parameters() if id(p) not in deltas),
        threshold=config.threshold,
        skipped=skipped,
        zero_entries=sum(zeros),
        zero_layers=zero_layers,
        include_zeros=config.include_zeros,
        frozen=_frozen_parameters(root, config, skipped),
        trained_parameters=[(name, param.numel()) for name, param in dense_trained],
    )
    if skipped:
        shown = "; ".join(f"{s.name!r} ({s.kind}): {s.reason}" for s in skipped[:6])
        warnings.warn(
            f"apply_sara: {len(skipped)} targeted layer(s) not converted, so not trained: {shown}"
            + (f"; and {len(skipped) - 6} more" if len(skipped) > 6 else "")
            + " (all listed in model.sara_summary)",
            UserWarning,
            stacklevel=2,
        )
    if zero_layers and not config.include_zeros:
        shown = ", ".join(repr(n) for n in zero_layers[:6]) + (" ..." if len(zero_layers) > 6 else "")
        warnings.warn(
            f"apply_sara: {len(zero_layers)} layer(s) have all-zero weights ({shown}), e.g. a ControlNet's "
            "zero convolutions: SaRA selects no entry there (exact zeros are initialisations, not small "
            "weights). Train such layers densely (set their requires_grad and give them to the "
            "optimizer), or select zeros with SaRAConfig(include_zeros=True)",
            UserWarning,
            stacklevel=2,
        )
    if summary.unsupported_share > FROZEN_WARN_SHARE:
        unsupported = sorted((f for f in summary.frozen if f.unsupported), key=lambda f: -f.numel)
        shown = "; ".join(
            f"{f.module_type}.{f.parameter} x{f.count} ({f.numel}): {f.reason}" for f in unsupported[:4]
        )
        warnings.warn(
            f"apply_sara: {summary.unsupported_share:.1%} of the model's parameters stay frozen because "
            f"SaRA cannot adapt them as configured: {shown} (all listed in model.sara_summary)",
            UserWarning,
            stacklevel=2,
        )
    root.sara_config = config
    root.sara_summary = summary
    return root


def sparse_layers(model: nn.Module) -> Iterator[tuple[str, _SparseDeltaMixin]]:
    """(name, layer) for every sparse-delta layer of ``model`` (layers sharing a weight each appear)."""
    for name, module in model.named_modules():
        if isinstance(module, _SparseDeltaMixin):
            yield name, module


def _unique_layers(model: nn.Module) -> list[tuple[str, _SparseDeltaMixin]]:
    """One (name, layer) per delta: layers sharing a weight share one delta."""
    found, seen = [], set()
    for name, layer in sparse_layers(model):
        if id(layer.sparse_delta) not in seen:
            seen.add(id(layer.sparse_delta))
            found.append((name, layer))
    return found


def sparse_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable deltas of ``model``'s sparse-delta layers, for the optimizer (each once), then
    the parameters that ``SaRAConfig.train_parameters`` trains densely (still requiring grad)."""
    layers = _unique_layers(model)
    if not layers:
        raise ValueError("sparse_parameters: the model has no sparse-delta layer (call apply_sara first)")
    params = [m.sparse_delta for _, m in layers if m.sparse_delta.requires_grad]
    if not params:
        raise ValueError(
            "sparse_parameters: every sparse delta has requires_grad=False (was requires_grad_(False) "
            "called on the model after apply_sara?); set layer.sparse_delta.requires_grad_(True)"
        )
    root = sk_nn.unwrap_model(model)
    summary = getattr(root, "sara_summary", None)
    for name, _ in summary.trained_parameters if isinstance(summary, SaRASummary) else ():
        try:
            param = root.get_parameter(name)
        except AttributeError:
            continue  # the model was changed after apply_sara
        if param.requires_grad:
            params.append(param)
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

    No tensor changes shape (see :mod:`sara_kernels.nn`): the frozen entries move to the last slots
    of each layer with a zero delta, gradient and optimizer state. So an optimizer, a DDP or
    accelerate wrapper and a checkpoint stay valid, ranks stay bit-identical, and nothing needs
    rebuilding. The per-entry state of every optimizer that has stepped the deltas (and of
    ``optimizer``), and of every :class:`~sara_kernels.SparseEMA`, moves with the entries.

    Args:
        model: a model converted by :func:`apply_sara` (or holding sparse-delta layers).
        optimizer: an optimizer over the deltas whose state must follow, if it has not stepped yet
            in this process (e.g. just loaded from a checkpoint); those that stepped are known.
        threshold: θ for the rule (default: the threshold each layer was selected with).
        reset_state: reset the moments instead (the official code's behaviour; default from
            ``model.sara_config.reset_state_on_reselect``).

    Warns (``UserWarning``) when it keeps fewer than ``RESELECT_WARN_SHARE`` (10%) of the
    entries: then the second stage trains almost nothing.

    Returns:
        A :class:`ReselectionSummary`.
    """
    layers = _unique_layers(model)
    if not layers:
        raise ValueError("reselect_: the model has no sparse-delta layer (call apply_sara first)")
    if threshold is not None and not (
        isinstance(threshold, (int, float))
        and not isinstance(threshold, bool)
        and threshold > 0
        and math.isfinite(threshold)
    ):
        raise ValueError(f"reselect_: threshold must be a positive finite number, got {threshold!r}")
    if reset_state is None:
        config = getattr(model, "sara_config", None)
        reset_state = bool(config.reset_state_on_reselect) if isinstance(config, SaRAConfig) else False
    thetas = []
    for name, layer in layers:
        theta = threshold if threshold is not None else layer.sparse_threshold
        if theta is None:
            raise ValueError(
                f"reselect_: layer {name!r} was built with an explicit index and no threshold; pass threshold="
            )
        thetas.append(theta)
    if not any(bool((layer.sparse_delta != 0).any()) for _, layer in layers):
        raise RuntimeError(
            "reselect_: no delta has changed from 0 yet; re-selection is meant after some training "
            "(the paper re-selects half-way)"
        )
    kept_total = frozen_total = 0
    per_layer = {}
    for (name, layer), theta in zip(layers, thetas, strict=True):
        if getattr(layer, "_sara_merges_locally", False):  # a weight sharded by FSDP2
            layer._unsupported("re-selection (reselect_)")
        layer._maybe_merge()
        index, _, _ = layer.trainable_state()
        current = layer.weight.detach().reshape(-1)[index.long()].float().abs()
        kept, frozen = layer.freeze_(current < theta, optimizers=(optimizer,), reset_state=reset_state)
        per_layer[name] = (kept, frozen)
        kept_total += kept
        frozen_total += frozen
    total = kept_total + frozen_total
    if total and kept_total < RESELECT_WARN_SHARE * total:
        known = sorted(float(t) for t in thetas)
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


def _step_number(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"ProgressiveReselection: {name} must be a positive step number, got {value!r}")
    return value


class ProgressiveReselection:
    """Call :meth:`step` once per optimizer step; it runs :func:`reselect_` at the configured step.

    Args:
        model, optimizer: as for :func:`reselect_`.
        total_steps: the run's length; needed when ``at`` is a fraction.
        at: a fraction of ``total_steps`` in (0, 1) or a step number (default:
            ``model.sara_config.progressive_at``, else 0.5 as in the paper). A step number beyond
            ``total_steps`` is an error (it would never fire).
        threshold, reset_state: passed to :func:`reselect_`.

    Checkpoint it with the run (``state_dict``/``load_state_dict``; accelerate:
    ``accelerator.register_for_checkpointing(progressive)``), so a resumed run neither re-selects
    twice nor misses it.
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
        if total_steps is not None:
            total_steps = _step_number(total_steps, "total_steps")
        if isinstance(at, float):
            if not 0 < at < 1:
                raise ValueError(f"ProgressiveReselection: a fractional 'at' must lie in (0, 1), got {at}")
            if total_steps is None:
                raise ValueError("ProgressiveReselection: total_steps is needed when 'at' is a fraction")
            at = max(1, int(round(at * total_steps)))
        at = _step_number(at, "'at'")
        if total_steps is not None and at > total_steps:
            raise ValueError(
                f"ProgressiveReselection: at={at} lies beyond total_steps={total_steps}; it would never run"
            )
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
    "FrozenParameters",
    "SaRAConfig",
    "SaRASummary",
    "SkippedLayer",
    "apply_sara",
    "reselect_",
    "sparse_layers",
    "sparse_parameters",
]
