"""Save, load, combine and unload SaRA adapters (safetensors files, no pickle).

An adapter holds, for every sparse-delta layer of a model (:class:`~sara_kernels.nn.SparseDeltaLinear`,
:class:`~sara_kernels.nn.SparseDeltaConv2d`), the adapted entries: their sorted flat indices into
``weight.view(-1)`` and their fp32 deltas (optionally the pre-trained values too). Tensors are keyed
by the module name from ``model.named_modules()``:

=====================  ==================  ==============================================
key                    dtype               content
=====================  ==================  ==============================================
``<name>.index``       int32 (or int64)    ``[n]`` sorted flat indices (trainable + frozen)
``<name>.delta``       fp32                ``[n]`` the deltas
``<name>.base``        weight dtype        ``[n]`` pre-trained values (``include_base=True``)
=====================  ==================  ==============================================

(the model itself, when it is one sparse-delta layer, has the empty name: keys ``index``, ``delta``.)

The file metadata (strings) holds ``format`` (``"sara_kernels.adapter"``), ``format_version``
(``"1"``), ``sara_kernels_version``, ``sara_config`` (the JSON of ``model.sara_config`` when it is a
dataclass), ``layers`` (JSON list of the layer names) and, per layer, ``layer/<name>``: a JSON
record with the layer kind (``linear``/``conv1d``/``conv2d``/``conv3d``/``embedding``), the weight
shape and dtype, the entry count, a SHA-256 of the layer's stored tensors (to detect corruption) and
a *fingerprint* of the pre-trained weight (see :func:`weight_fingerprint`), checked when the adapter
is loaded so that an adapter is not silently applied to a different base model (the fingerprint
also hashes its sample cast to the other float dtypes, so an adapter trained on fp32 weights
matches the same base loaded in fp16 or bf16).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from sara_kernels import _checks
from sara_kernels import nn as sk_nn
from sara_kernels._io import atomic_save_file, read_file
from sara_kernels._version import __version__
from sara_kernels.nn import (
    SparseDeltaConv1d,
    SparseDeltaConv2d,
    SparseDeltaConv3d,
    SparseDeltaEmbedding,
    SparseDeltaLinear,
)

#: ``format`` metadata value of an adapter file.
FORMAT_NAME = "sara_kernels.adapter"
#: ``format_version`` metadata value written (and the only one read) by this version.
FORMAT_VERSION = "1"
#: Name of the fingerprint scheme (stored in each fingerprint, compared on load).
FINGERPRINT_SCHEME = "strided-sample-sha256+abs-sum-fp64/1"
#: At most this many entries, evenly strided over ``weight.view(-1)``, are hashed exactly.
FINGERPRINT_SAMPLES = 65_536
#: Relative tolerance of the fp64 sum of ``|w|`` (summation order differs across devices).
ABS_SUM_RTOL = 1e-6
#: Relative tolerance of the sum of ``|w|`` between a weight and its cast to another float dtype
#: (round to nearest: each entry moves by at most half an ulp, 2**-8 of its magnitude in bf16).
CAST_ABS_SUM_RTOL = 2.0**-8
#: Float dtypes a fingerprint also hashes its sample in (see ``sample_sha256_as``).
_CAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: Entries per chunk for the fp64 sum of ``|w|`` (bounds the temporary memory to 32 MiB).
_CHUNK = 1 << 22

_KINDS: dict[str, tuple[type[nn.Module], type[nn.Module]]] = {
    "linear": (nn.Linear, SparseDeltaLinear),
    "conv1d": (nn.Conv1d, SparseDeltaConv1d),
    "conv2d": (nn.Conv2d, SparseDeltaConv2d),
    "conv3d": (nn.Conv3d, SparseDeltaConv3d),
    "embedding": (nn.Embedding, SparseDeltaEmbedding),
}
_SPARSE_TYPES = tuple(sparse for _, sparse in _KINDS.values())
_SPARSE_WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_DTYPES = {
    str(d).removeprefix("torch."): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64)
}
#: Instance state a sparse-delta layer adds to its dense layer (dropped by merge_and_unload).
_SPARSE_PARAMS = sk_nn.SPARSE_PARAMETERS
_SPARSE_BUFFERS = sk_nn.SPARSE_BUFFERS
_SPARSE_ATTRS = (
    "sparse_threshold",
    "_sparse_weight",
    "_sparse_weight_shape",
    "_sparse_name",
    "_sparse_registered",
)


class AdapterError(ValueError):
    """An adapter file is invalid, or does not fit the model it is loaded into."""


class AdapterWarning(UserWarning):
    """A problem that ``load_adapter(..., strict=False)`` reports and goes past."""


# ---------------------------------------------------------------------------------------------
# Fingerprint of the pre-trained weight
# ---------------------------------------------------------------------------------------------
def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _sample_positions(numel: int) -> torch.Tensor:
    """Evenly strided flat positions (at most FINGERPRINT_SAMPLES), the same on every device."""
    count = min(numel, FINGERPRINT_SAMPLES)
    return torch.arange(count, dtype=torch.int64) * numel // max(count, 1)


def _pretrained_at(
    flat: torch.Tensor, adapted: torch.Tensor, base: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """Pre-trained values of ``flat`` at ``positions`` (a copy): ``base`` where the entry is adapted
    (``adapted`` sorted int64), the weight's own value elsewhere."""
    values = flat[positions]
    if adapted.numel() and positions.numel():
        slot = torch.searchsorted(adapted, positions)
        hit = slot < adapted.numel()
        hit &= adapted[slot.clamp(max=adapted.numel() - 1)] == positions
        values[hit] = base[slot[hit]].to(values.dtype)
    return values


def weight_fingerprint(
    weight: torch.Tensor, index: torch.Tensor | None = None, base: torch.Tensor | None = None
) -> dict[str, Any]:
    """Fingerprint of a pre-trained weight: shape, dtype, a SHA-256 of the bytes of an evenly strided
    sample of at most :data:`FINGERPRINT_SAMPLES` entries (exact), and the fp64 sum of ``|w|``
    (compared with the relative tolerance :data:`ABS_SUM_RTOL`).

    When ``index``/``base`` are given (an adapted layer, whose ``weight`` holds merged values), the
    fingerprint is that of the weight with ``base`` written at ``index``, computed without touching
    ``weight``: the sample is a 64K-entry copy patched at the adapted positions, and the sum runs
    over chunks of :data:`_CHUNK` entries, each copied to fp64 and patched (no dense copy, no
    unmerge/merge, so it is safe in the middle of training).

    Args:
        weight: dense weight (any float dtype, any device).
        index: sorted flat indices of the adapted entries (int32/int64), or None.
        base: pre-trained values at ``index``.

    Returns:
        A JSON-serialisable dict.
    """
    weight = weight.detach()
    if type(weight).__name__ == "DTensor":
        weight = weight.full_tensor()  # a weight sharded by FSDP2: a collective (every rank calls)
    if not weight.is_contiguous():
        weight = weight.contiguous()  # logical (row-major) order, as the indices address it
    flat = weight.reshape(-1)
    numel = flat.numel()
    device = flat.device
    if index is None or index.numel() == 0:
        adapted = torch.empty(0, dtype=torch.int64, device=device)
        base = flat.new_empty(0)
    else:
        if base is None or base.numel() != index.numel():
            raise ValueError("weight_fingerprint: base must give one value per index entry")
        adapted = index.to(device=device, dtype=torch.int64)
        base = base.to(device)
    with torch.no_grad():
        positions = _sample_positions(numel).to(device)
        sample = _pretrained_at(flat, adapted, base, positions)
        sample_bytes = sample.cpu().contiguous().view(torch.uint8).numpy().tobytes()
        total = torch.zeros((), dtype=torch.float64, device=device)
        for start in range(0, numel, _CHUNK):
            stop = min(start + _CHUNK, numel)
            chunk = flat[start:stop].to(torch.float64, copy=True)
            if adapted.numel():
                lo, hi = torch.searchsorted(adapted, torch.tensor([start, stop], device=device)).tolist()
                if hi > lo:
                    chunk[adapted[lo:hi] - start] = base[lo:hi].to(torch.float64)
            total += chunk.abs_().sum()
            del chunk
    return {
        "scheme": FINGERPRINT_SCHEME,
        "shape": list(weight.shape),
        "dtype": _dtype_name(weight.dtype),
        "sample_count": int(positions.numel()),
        "sample_sha256": hashlib.sha256(sample_bytes).hexdigest(),
        # The same sample cast to the other float dtypes: a model loaded in fp16/bf16 (or fp32)
        # matches an adapter trained in another dtype when its weights are the cast ones.
        "sample_sha256_as": {
            _dtype_name(dtype): hashlib.sha256(
                sample.to(dtype).cpu().contiguous().view(torch.uint8).numpy().tobytes()
            ).hexdigest()
            for dtype in _CAST_DTYPES
            if dtype != weight.dtype
        },
        "abs_sum": float(total),
        "sara_kernels_version": __version__,
    }


def fingerprint_differences(expected: dict[str, Any], got: dict[str, Any]) -> list[str]:
    """What differs between two fingerprints (empty list: they match)."""
    diffs = []
    if expected.get("scheme") != got.get("scheme"):
        diffs.append(f"fingerprint scheme {expected.get('scheme')!r} vs {got.get('scheme')!r}")
        return diffs
    if list(expected.get("shape", [])) != list(got.get("shape", [])):
        diffs.append(f"weight shape {tuple(expected.get('shape', []))} vs {tuple(got.get('shape', []))}")
    rtol = ABS_SUM_RTOL
    if expected.get("dtype") != got.get("dtype"):
        cast = (expected.get("sample_sha256_as") or {}).get(got.get("dtype"))
        if not isinstance(cast, str):  # a file from before the cast hashes, or another dtype
            diffs.append(f"weight dtype {expected.get('dtype')} vs {got.get('dtype')}")
        elif (expected.get("sample_count"), cast) != (got.get("sample_count"), got.get("sample_sha256")):
            diffs.append(
                f"sampled entries differ from the adapter's pre-trained weights cast to {got.get('dtype')} "
                f"(the adapter was trained on {expected.get('dtype')} weights)"
            )
        rtol = CAST_ABS_SUM_RTOL
    elif (expected.get("sample_count"), expected.get("sample_sha256")) != (
        got.get("sample_count"),
        got.get("sample_sha256"),
    ):
        diffs.append(
            f"sampled entries differ (sha256 of {expected.get('sample_count')} strided entries "
            f"{str(expected.get('sample_sha256'))[:12]}... vs {str(got.get('sample_sha256'))[:12]}...)"
        )
    a, b = float(expected.get("abs_sum", math.nan)), float(got.get("abs_sum", math.nan))
    if not (abs(a - b) <= rtol * max(abs(a), abs(b)) or a == b):
        diffs.append(f"sum of |w| {a!r} vs {b!r} (relative tolerance {rtol})")
    return diffs


# ---------------------------------------------------------------------------------------------
# Helpers on layers
# ---------------------------------------------------------------------------------------------
def _kind_of(module: nn.Module) -> str | None:
    for kind, (dense, _) in _KINDS.items():
        if isinstance(module, dense):
            return kind
    return None


def _is_sparse(module: nn.Module) -> bool:
    return isinstance(module, _SPARSE_TYPES)


def _pretrained_state(
    module: nn.Module, resident: tuple[torch.Tensor, torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(adapted index int64 sorted, pre-trained values there) of a layer: its own for a
    sparse-delta layer, ``resident`` (the entries named adapters own) for a plain one, else empty."""
    weight = module.weight
    if _is_sparse(module):
        index, _, base = module.adapter_state()
        return index.to(torch.int64), base
    if resident is not None:
        index, base = resident
        return index.to(device=weight.device, dtype=torch.int64), base.to(device=weight.device, dtype=weight.dtype)
    return torch.empty(0, dtype=torch.int64, device=weight.device), weight.detach().new_empty(0)


def _module_fingerprint(module: nn.Module, resident: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, Any]:
    index, base = _pretrained_state(module, resident)
    return weight_fingerprint(module.weight, index, base)


def _carries_adapter(module: nn.Module) -> bool:
    if not _is_sparse(module) or module.adapted_count == 0:
        return False
    _, delta, _ = module.adapter_state()
    return bool((delta != 0).any())


def _replace(parents: dict[int, list[tuple[nn.Module, str]]], old: nn.Module, new: nn.Module) -> None:
    for parent, name in parents.get(id(old), []):
        setattr(parent, name, new)
    parents[id(new)] = parents.pop(id(old), [])


def _prefix(name: str) -> str:
    return f"{name}." if name else ""


def _tensor_digest(*tensors: torch.Tensor | None) -> str:
    h = hashlib.sha256()
    for t in tensors:
        if t is not None:
            h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


#: Longest module name (or path) echoed whole in an error message.
_NAME_SHOWN = 200


def _shorten(text: str) -> str:
    if len(text) <= _NAME_SHOWN:
        return text
    return f"{text[: _NAME_SHOWN // 2]}...{text[-_NAME_SHOWN // 4 :]} ({len(text)} characters)"


def _layer_label(name: str) -> str:
    return repr(_shorten(name)) if name else "'' (the model itself)"


#: Largest metadata string read (a JSON layer record is a few hundred bytes).
_METADATA_LIMIT = 1 << 24


# ---------------------------------------------------------------------------------------------
# save
# ---------------------------------------------------------------------------------------------
def _safetensors():
    try:
        import safetensors.torch  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "sara_kernels.adapter needs the 'safetensors' package: pip install safetensors"
        ) from exc
    import safetensors

    return safetensors


def _sparse_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        if _is_sparse(module):
            yield name, module


def save_adapter(model: nn.Module, path: str | os.PathLike, *, include_base: bool = False) -> None:
    """Write the adapter of every sparse-delta layer of ``model`` to a safetensors file.

    The write is atomic: the file is written to a temporary file in the same directory, flushed to
    disk (fsync) and renamed over ``path`` (``os.replace``), so ``path`` holds either the old file or
    the complete new one, never a partial file; on failure the temporary file is removed.

    Args:
        model: a model holding at least one :class:`~sara_kernels.nn.SparseDeltaLinear` /
            :class:`~sara_kernels.nn.SparseDeltaConv2d` (possibly the model itself).
        path: destination file (conventionally ``*.safetensors``).
        include_base: also store the pre-trained values at the adapted entries (``<name>.base``),
            e.g. to restore them in a model whose weights were merged; on load they are compared
            with the model's pre-trained values.

    Raises:
        AdapterError: the model has no sparse-delta layer, or ``path`` is a directory.
    """
    _safetensors()
    path = os.fspath(path)
    layers, seen = [], set()
    for name, layer in _sparse_layers(model):
        if id(layer.sparse_delta) not in seen:  # layers sharing a weight share one delta: saved once
            seen.add(id(layer.sparse_delta))
            layers.append((name, layer))
    if not layers:
        raise AdapterError(
            f"save_adapter({path!r}): {type(model).__name__} has no sparse-delta layer "
            "(SparseDeltaLinear, SparseDeltaConv1d/2d/3d, SparseDeltaEmbedding); apply SaRA or convert "
            "layers with from_dense first"
        )
    if os.path.isdir(path):
        raise AdapterError(f"save_adapter: {path!r} is a directory; give a file path")

    tensors: dict[str, torch.Tensor] = {}
    metadata: dict[str, str] = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "sara_kernels_version": __version__,
        "layers": json.dumps([name for name, _ in layers]),
    }
    config = getattr(model, "sara_config", None)
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        metadata["sara_config"] = json.dumps(dataclasses.asdict(config), default=repr)
    for name, layer in layers:
        with torch.no_grad():
            index, delta, base = layer.adapter_state()
            index_cpu = index.detach().cpu().contiguous()
            delta_cpu = delta.detach().to(torch.float32).cpu().contiguous()
            base_cpu = base.detach().cpu().contiguous() if include_base else None
        prefix = _prefix(name)
        tensors[prefix + "index"] = index_cpu
        tensors[prefix + "delta"] = delta_cpu
        if base_cpu is not None:
            tensors[prefix + "base"] = base_cpu
        metadata[f"layer/{name}"] = json.dumps(
            {
                "kind": _kind_of(layer),
                "weight_shape": list(layer.weight.shape),
                "weight_dtype": _dtype_name(layer.weight.dtype),
                "entries": int(index_cpu.numel()),
                "has_base": base_cpu is not None,
                "tensors_sha256": _tensor_digest(index_cpu, delta_cpu, base_cpu),
                "fingerprint": weight_fingerprint(layer.weight, index, base),
            }
        )

    atomic_save_file(tensors, path, metadata)


# ---------------------------------------------------------------------------------------------
# read
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Record:
    name: str
    kind: str
    weight_shape: tuple[int, ...]
    weight_dtype: torch.dtype
    fingerprint: dict[str, Any]
    index: torch.Tensor
    delta: torch.Tensor
    base: torch.Tensor | None


def _corrupt(path: str, why: str) -> AdapterError:
    return AdapterError(f"{_shorten(path)!r}: not a sara_kernels adapter or corrupted: {why}")


def _read_records(
    path: str | os.PathLike, allow_nonfinite: bool = False
) -> tuple[list[_Record], dict[str, torch.Tensor], dict[str, str]]:
    path = os.fspath(path)
    tensors, metadata = read_file(
        path, "adapter file", AdapterError, corrupt=lambda why: _corrupt(path, why), shorten=_shorten
    )
    for key, value in metadata.items():
        if len(value) > _METADATA_LIMIT:
            raise _corrupt(path, f"metadata entry {_shorten(key)!r} holds {len(value)} characters")

    fmt = metadata.get("format")
    if fmt is None:
        raise AdapterError(
            f"{path!r}: not a sara_kernels adapter (a safetensors file without the 'format' metadata "
            f"{FORMAT_NAME!r}; metadata keys: {sorted(metadata)})"
        )
    if fmt != FORMAT_NAME:
        raise AdapterError(
            f"{path!r}: not a sara_kernels adapter: format is {fmt!r}, expected {FORMAT_NAME!r}"
        )
    version = metadata.get("format_version")
    if version != FORMAT_VERSION:
        raise AdapterError(
            f"{path!r}: adapter format version {version!r} is not supported by sara_kernels "
            f"{__version__} (it reads version {FORMAT_VERSION!r}; the file was written by sara_kernels "
            f"{metadata.get('sara_kernels_version', '?')})"
        )
    try:
        names = json.loads(metadata["layers"])
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError("'layers' is not a list of names")
        raw = {name: json.loads(metadata[f"layer/{name}"]) for name in names}
        if not all(isinstance(record, dict) for record in raw.values()):
            raise ValueError("a layer record is not a JSON object")
    except RecursionError:  # nesting deeper than the interpreter's recursion limit
        raise _corrupt(path, "layer metadata nested too deeply") from None
    except (KeyError, ValueError) as exc:
        raise _corrupt(path, f"bad layer metadata ({type(exc).__name__}: {_shorten(str(exc))})") from exc

    records = []
    expected_keys = set()
    for name in names:
        info, label, prefix = raw[name], _layer_label(name), _prefix(name)
        try:
            kind = info["kind"]
            shape = tuple(int(s) for s in info["weight_shape"])
            dtype = _DTYPES[info["weight_dtype"]]
            fingerprint = dict(info["fingerprint"])
            has_base = bool(info["has_base"])
            digest = info["tensors_sha256"]
        except (KeyError, TypeError, ValueError) as exc:
            raise _corrupt(path, f"layer {label}: bad metadata record ({type(exc).__name__}: {exc})") from exc
        if kind not in _KINDS:
            raise _corrupt(
                path, f"layer {label}: unknown layer kind {kind!r} (expected one of {', '.join(_KINDS)})"
            )
        keys = [prefix + "index", prefix + "delta"] + ([prefix + "base"] if has_base else [])
        for key in keys:
            if key not in tensors:
                raise _corrupt(path, f"layer {label}: tensor {_shorten(key)!r} is missing")
        expected_keys.update(keys)
        index, delta = tensors[prefix + "index"], tensors[prefix + "delta"]
        base = tensors[prefix + "base"] if has_base else None
        if _tensor_digest(index, delta, base) != digest:
            raise _corrupt(path, f"layer {label}: the stored tensors do not match their SHA-256")
        numel = math.prod(shape)
        if index.dtype not in _checks.INDEX_DTYPES:
            raise AdapterError(
                f"{path!r}: layer {label}: index has dtype {index.dtype}; expected int32 or int64"
            )
        if index.dim() != 1:
            raise AdapterError(f"{path!r}: layer {label}: index must be 1-D, got shape {tuple(index.shape)}")
        if delta.dtype != torch.float32:
            raise AdapterError(f"{path!r}: layer {label}: delta has dtype {delta.dtype}; expected float32")
        if not allow_nonfinite and delta.dim() == 1 and not bool(torch.isfinite(delta).all()):
            bad = int((~torch.isfinite(delta)).sum())
            raise AdapterError(
                f"{_shorten(path)!r}: layer {label}: {bad} of the {delta.numel()} deltas are NaN or infinite "
                "(a diverged run?); pass allow_nonfinite=True to read it anyway"
            )
        if delta.dim() != 1 or delta.numel() != index.numel():
            raise AdapterError(
                f"{path!r}: layer {label}: delta has shape {tuple(delta.shape)} but index has "
                f"{index.numel()} entries"
            )
        if base is not None and (base.dtype != dtype or tuple(base.shape) != tuple(index.shape)):
            raise AdapterError(
                f"{path!r}: layer {label}: base has dtype {base.dtype} and shape {tuple(base.shape)}; "
                f"expected {dtype} and {tuple(index.shape)}"
            )
        if index.numel():
            lo, hi = int(index.min()), int(index.max())
            if lo < 0 or hi >= numel:
                raise AdapterError(
                    f"{path!r}: layer {label}: index holds values in [{lo}, {hi}] but the weight of "
                    f"shape {shape} has {numel} entries"
                )
            if index.numel() > 1 and not bool((index[1:] > index[:-1]).all()):
                raise AdapterError(
                    f"{path!r}: layer {label}: index is not sorted in strictly increasing order"
                )
        records.append(_Record(name, kind, shape, dtype, fingerprint, index, delta, base))
    extra = sorted(set(tensors) - expected_keys)
    if extra:
        raise _corrupt(path, f"tensors not described by the metadata: {[_shorten(e) for e in extra[:5]]}")
    return records, tensors, metadata


def read_adapter(
    path: str | os.PathLike, *, allow_nonfinite: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read and validate an adapter file, without a model.

    Args:
        path: the file written by :func:`save_adapter`.
        allow_nonfinite: accept NaN or infinite deltas (refused by default).

    Returns:
        ``(tensors, metadata)``: the tensors by key (``<name>.index``, ``<name>.delta``,
        ``<name>.base``; on CPU) and the metadata strings as stored (``layer/<name>`` and
        ``sara_config`` are JSON strings).

    Raises:
        FileNotFoundError: no such file.
        AdapterError: not a safetensors file, truncated or corrupted, not a sara_kernels adapter,
            an unsupported format version, or invalid tensors (index dtype/order/range, delta dtype
            or length).
    """
    _, tensors, metadata = _read_records(path, allow_nonfinite)
    return tensors, metadata


# ---------------------------------------------------------------------------------------------
# load
# ---------------------------------------------------------------------------------------------
def _resolve(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name) if name else model
    except AttributeError:
        return None


def _load_into(layer: nn.Module, record: _Record, alpha: float, combine: bool) -> str:
    """Apply one record to a sparse-delta layer (already checked); returns 'replaced'/'combined'."""
    device = layer.weight.device
    new_index = record.index.to(device=device, dtype=torch.int64)
    new_delta = record.delta.to(device) * alpha
    if not _carries_adapter(layer):
        # No adapter yet (no entries or all deltas zero): take the file's selection as is.
        layer.set_entries_(new_index, new_delta)
        layer.sparse_threshold = None
        return "replaced"
    assert combine
    k = layer.k
    index = layer.sparse_index.to(torch.int64)
    total = layer.total_delta()
    trainable_index, frozen_index = index[:k], index[k:]
    frozen_total = total[k:].clone()
    if frozen_index.numel():
        # Entries frozen by progressive re-selection stay frozen and receive the file's delta there.
        in_frozen = torch.isin(new_index, frozen_index)
        frozen_total.index_add_(
            0, torch.searchsorted(frozen_index, new_index[in_frozen]), new_delta[in_frozen]
        )
        new_index, new_delta = new_index[~in_frozen], new_delta[~in_frozen]
    union = torch.unique(torch.cat([trainable_index, new_index]), sorted=True)
    trainable_total = torch.zeros(union.numel(), dtype=torch.float32, device=device)
    trainable_total[torch.searchsorted(union, trainable_index)] = total[:k]
    trainable_total.index_add_(0, torch.searchsorted(union, new_index), new_delta)
    layer.set_entries_(
        torch.cat([union, frozen_index]),
        torch.cat([trainable_total, frozen_total]),
        frozen=frozen_index.numel(),
    )
    return "combined"


def load_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    alpha: float = 1.0,
    strict: bool = True,
    *,
    combine: bool = False,
    allow_nonfinite: bool = False,
    adapter_name: str | None = None,
    replace: bool = False,
) -> dict[str, Any]:
    """Load an adapter into ``model``: the adapted weights become ``P + alpha * ΔP``.

    Every layer named in the file is looked up in ``model`` by its module name and checked (kind,
    weight shape, fingerprint of its pre-trained weight) before anything is changed, so a failing
    load leaves the model untouched. Then, without ``adapter_name``:

    * a plain ``nn.Linear``/``nn.ConvNd``/``nn.Embedding`` is replaced, in its parent(s), by a
      sparse-delta layer built with ``from_dense(index=file_index)`` (the weight storage is
      reused) whose delta is ``alpha * file_delta``, merged into the weight;
    * a sparse-delta layer without an adapter (no entries, or all deltas zero, e.g. fresh from
      ``apply_sara``) takes the file's selection and ``alpha * file_delta``;
    * a sparse-delta layer that already carries an adapter is an error unless ``combine=True``:
      then the adapters add up, ``α₁ΔP₁ + α₂ΔP₂`` — the trainable index becomes the sorted union,
      deltas add on shared entries (entries frozen by progressive re-selection stay frozen and
      receive the file's delta there); the base stays the pre-trained values.

    With ``adapter_name`` (inference: many adapters on one model, see
    :mod:`sara_kernels.multi_adapter`), the layers stay plain and the adapter stays *resident*
    as its file's index and delta tensors, so that :func:`~sara_kernels.set_adapters` can switch
    and mix adapters in O(k) and :func:`~sara_kernels.disable_adapters` restore the base exactly.
    The loaded adapter becomes active alone at weight ``alpha`` (with ``combine=True``: added to
    the adapters already active). The model must not hold sparse-delta layers at those names
    (a model being trained: ``merge_and_unload`` it first).

    Entries saved as frozen become trainable after a load into a fresh model (the file records the
    adapted entries, not which of them were frozen).

    Args:
        model: the base model (or a model with sparse-delta layers, see above), or a diffusers
            pipeline (its ``unet`` or ``transformer``).
        path: a file written by :func:`save_adapter`.
        alpha: scale of the adapter.
        strict: if True, a layer missing from the model or a pre-trained weight that differs from
            the one the adapter was trained on (fingerprint, or the stored base values) is an error;
            if False, they are reported with :class:`AdapterWarning` (missing layers are skipped,
            mismatching layers loaded anyway). A kind or shape mismatch is always an error.
        combine: add to an adapter already loaded (or, with ``adapter_name``, to the active
            adapters) instead of raising (or of replacing the active set).
        allow_nonfinite: load NaN or infinite deltas (refused by default: they poison every forward).
        adapter_name: keep the adapter resident under this name (see above).
        replace: with ``adapter_name``, replace a resident adapter of that name (else an error).

    Returns:
        A summary: ``layers`` (names loaded), ``entries`` (adapted entries loaded), ``converted``
        (dense layers replaced), ``combined``, ``skipped`` (missing layers), ``fingerprint_mismatches``,
        ``alpha``, ``path``, ``adapter_name``.

    Raises:
        FileNotFoundError, AdapterError: see :func:`read_adapter`; a layer missing (strict), of
            another kind or weight shape, a different pre-trained weight (strict), or already
            carrying an adapter (without ``combine``); a name already loaded (without ``replace``).
    """
    from sara_kernels import multi_adapter

    model = multi_adapter.target_module(model, "load_adapter")
    alpha = float(alpha)
    if not math.isfinite(alpha):
        raise ValueError(f"load_adapter: alpha must be finite, got {alpha}")
    registry = multi_adapter.registry_of(model)
    if adapter_name is not None:
        if not isinstance(adapter_name, str) or not adapter_name:
            raise ValueError(f"load_adapter: adapter_name must be a non-empty string, got {adapter_name!r}")
        if registry is not None and adapter_name in registry.adapters and not replace:
            raise AdapterError(
                f"load_adapter: an adapter named {adapter_name!r} is already loaded; pass replace=True to "
                "replace it, or delete_adapter(model, name) first"
            )
    elif replace:
        raise ValueError("load_adapter: replace=True needs an adapter_name")
    records, _, _ = _read_records(path, allow_nonfinite)
    path = os.fspath(path)
    named = adapter_name is not None

    plan: list[tuple[_Record, nn.Module]] = []
    skipped, mismatches = [], []
    for record in records:
        label = _layer_label(record.name)
        module = _resolve(model, record.name)
        if module is None:
            message = f"load_adapter({path!r}): layer {label} is not in the model ({type(model).__name__})"
            if strict:
                raise AdapterError(message + "; pass strict=False to skip it")
            warnings.warn(message + "; skipped", AdapterWarning, stacklevel=2)
            skipped.append(record.name)
            continue
        kind_type = _KINDS[record.kind][0]
        if not isinstance(module, kind_type):
            raise AdapterError(
                f"load_adapter({path!r}): layer {label}: the adapter is for a {kind_type.__name__} "
                f"but the model has a {type(module).__name__} there"
            )
        got_shape = tuple(module.weight.shape)
        if got_shape != record.weight_shape:
            raise AdapterError(
                f"load_adapter({path!r}): layer {label}: weight shape differs: the adapter expects "
                f"{record.weight_shape}, the model has {got_shape}"
            )
        resident = registry.resident(record.name) if registry is not None else None
        if named and _is_sparse(module):
            raise AdapterError(
                f"load_adapter({path!r}, adapter_name={adapter_name!r}): layer {label} is a "
                f"{type(module).__name__} (a model set up for training); named adapters live on plain "
                "layers: merge_and_unload(model) first, or load without adapter_name"
            )
        if not named and resident is not None:
            raise AdapterError(
                f"load_adapter({path!r}): layer {label} holds named adapters "
                f"({', '.join(repr(n) for n in multi_adapter.list_adapters(model))}); load this one with "
                "adapter_name= too, or merge_and_unload(model) first"
            )
        if not named and _carries_adapter(module) and not combine:
            raise AdapterError(
                f"load_adapter({path!r}): layer {label} already carries an adapter; call "
                "merge_and_unload first, or pass combine=True to add this one"
            )
        if record.index.numel() and not _is_sparse(module):
            if module is model and not named:
                raise AdapterError(
                    f"load_adapter({path!r}): the model itself is a plain {type(model).__name__}, which "
                    "cannot be replaced in place; wrap it (e.g. nn.Sequential), convert it with "
                    f"{_KINDS[record.kind][1].__name__}.from_dense first, or load it with adapter_name="
                )
            if module.weight.dtype not in _SPARSE_WEIGHT_DTYPES:
                raise AdapterError(
                    f"load_adapter({path!r}): layer {label}: weight dtype {module.weight.dtype} cannot carry "
                    "an adapter (fp32, bf16 or fp16 only)"
                )
            if not named and not module.weight.is_contiguous():
                raise AdapterError(
                    f"load_adapter({path!r}): layer {label}: the weight is not contiguous (e.g. "
                    "channels_last; the indices address the row-major weight.view(-1)): call "
                    "model.to(memory_format=torch.contiguous_format) first, or load it with adapter_name= "
                    "(named adapters work in any layout)"
                )
        diffs = fingerprint_differences(record.fingerprint, _module_fingerprint(module, resident))
        if record.base is not None and not diffs:
            adapted, base = _pretrained_state(module, resident)
            flat = module.weight.detach().reshape(-1)
            at = record.index.to(device=flat.device, dtype=torch.int64)
            pretrained = _pretrained_at(flat, adapted, base, at).cpu()
            if not torch.equal(pretrained, record.base.to(pretrained.dtype)):  # a cast model: cast base
                diffs.append("the stored pre-trained values (base) differ from the model's")
        if diffs:
            message = (
                f"load_adapter({path!r}): layer {label}: the model's pre-trained weight differs from the "
                f"one this adapter was trained on: " + "; ".join(diffs)
            )
            if strict:
                raise AdapterError(message + " (pass strict=False to load anyway)")
            warnings.warn(message + "; loading anyway", AdapterWarning, stacklevel=2)
            mismatches.append(record.name)
        plan.append((record, module))

    names = [r.name for r, _ in plan]
    if len(set(names)) != len(names) or len({id(m) for _, m in plan}) != len(plan):
        raise AdapterError(f"load_adapter({path!r}): two adapter records resolve to the same layer")
    summary = {
        "path": path,
        "alpha": alpha,
        "layers": names,
        "entries": int(sum(r.index.numel() for r, _ in plan)),
        "converted": [],
        "combined": [],
        "skipped": skipped,
        "fingerprint_mismatches": mismatches,
        "adapter_name": adapter_name,
    }
    if named:
        multi_adapter.add_resident(
            model,
            adapter_name,
            path,
            [(r.name, m, r.index, r.delta) for r, m in plan if r.index.numel()],
            alpha,
            combine=combine,
            replace=replace,
        )
        return summary

    parents = sk_nn.module_parents(model)
    for record, module in plan:
        if _is_sparse(module):
            if record.index.numel() or _carries_adapter(module):
                if _load_into(module, record, alpha, combine) == "combined":
                    summary["combined"].append(record.name)
            continue
        if record.index.numel() == 0:
            continue  # nothing to adapt: keep the dense layer (its fingerprint was checked)
        sparse_cls = _KINDS[record.kind][1]
        index = record.index.to(module.weight.device)
        new = sparse_cls.from_dense(module, index=index, name=record.name)
        new.set_total_delta_(record.delta.to(new.sparse_delta.device) * alpha)
        _replace(parents, module, new)
        summary["converted"].append(record.name)
    return summary


# ---------------------------------------------------------------------------------------------
# merge_and_unload
# ---------------------------------------------------------------------------------------------
def _unload(layer: nn.Module) -> nn.Module:
    """A plain nn.Linear/nn.ConvNd/nn.Embedding sharing ``layer``'s state (merged weight, same
    Parameter and storage, bias, hooks, training flag), without the sparse buffers."""
    layer._maybe_merge()  # the weight holds base + delta at every adapted entry, frozen ones included
    sk_nn.forget_weight(layer.weight)
    dense_cls = layer._dense_type
    new = dense_cls.__new__(dense_cls)
    state = {}
    for key, value in layer.__dict__.items():
        if key in _SPARSE_ATTRS:
            continue
        state[key] = value.copy() if isinstance(value, (dict, set)) else value
    for key in _SPARSE_PARAMS:
        state["_parameters"].pop(key, None)
    for key in _SPARSE_BUFFERS:
        state["_buffers"].pop(key, None)
        state["_non_persistent_buffers_set"].discard(key)
    new.__dict__.update(state)
    new.weight.requires_grad_(True)
    return new


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Replace every sparse-delta layer by a plain ``nn.Linear``/``nn.ConvNd``/``nn.Embedding`` with
    the merged weight.

    The weight Parameter (and its storage) is reused, not copied, and requires grad again, like a
    fresh dense layer; bias, hooks and the training flag carry over. Named adapters
    (``load_adapter(..., adapter_name=)``) are dropped and the active combination stays in the
    weights, as ``fuse_lora`` + ``unload_lora_weights`` would leave them.

    Args:
        model: a model with sparse-delta layers or named adapters, one sparse-delta layer, or a
            diffusers pipeline (its ``unet`` / ``transformer``, which is returned).

    Returns:
        ``model`` with its layers replaced in place; when ``model`` is itself a sparse-delta layer,
        the new plain layer (use the return value).
    """
    from sara_kernels import multi_adapter

    if _is_sparse(model):
        return _unload(model)
    target = multi_adapter.target_module(model, "merge_and_unload")
    multi_adapter.drop_registry(target)  # named adapters: the active combination stays in the weights
    if not isinstance(model, nn.Module):
        model = target  # a pipeline: its unet / transformer
    parents = sk_nn.module_parents(model)
    for module in list(model.modules()):
        if _is_sparse(module) and id(module) in parents:
            _replace(parents, module, _unload(module))
    return model


__all__ = [
    "AdapterError",
    "AdapterWarning",
    "fingerprint_differences",
    "load_adapter",
    "merge_and_unload",
    "read_adapter",
    "save_adapter",
    "weight_fingerprint",
]
