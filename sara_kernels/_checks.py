"""Input checks shared by every backend: each error names the op and the argument.

The cheap checks (dtype, device, rank, shape, memory overlap of the tensors an op writes) always
run. The data-dependent index checks (range, strictly increasing order) cost one pass over
``index`` and, on CUDA, one device-to-host sync; :func:`index_checks` turns them off **for the
calling thread** (other threads keep theirs), for callers that validated their index once (the
layers validate an index when it is set through their methods). Whatever the setting, no kernel
ever writes outside its tensor: the native and Triton kernels bounds-check every index they write
through, and the reference backend checks the range before it writes anything.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from collections.abc import Iterator, Sequence

import torch

INDEX_DTYPES = (torch.int32, torch.int64)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

#: The setting of threads that never called set_index_checks (``SARA_KERNELS_CHECK_INDEX=0``: off).
_DEFAULT_INDEX_CHECKS = os.environ.get("SARA_KERNELS_CHECK_INDEX", "1") not in ("0", "false", "off")
_local = threading.local()


def index_checks_enabled() -> bool:
    """Whether the data-dependent index checks run in the calling thread."""
    return getattr(_local, "index_checks", _DEFAULT_INDEX_CHECKS)


def set_index_checks(enabled: bool) -> bool:
    """Enable or disable the data-dependent index checks in the calling thread; returns the
    previous setting. Prefer the context manager :func:`index_checks`."""
    previous = index_checks_enabled()
    _local.index_checks = bool(enabled)
    return previous


@contextlib.contextmanager
def index_checks(enabled: bool) -> Iterator[None]:
    """``with sara_kernels.index_checks(False):`` skips the index checks in this thread only."""
    previous = set_index_checks(enabled)
    try:
        yield
    finally:
        set_index_checks(previous)


def _is_fake(t: torch.Tensor) -> bool:
    return isinstance(t, torch._subclasses.fake_tensor.FakeTensor) or t.device.type == "meta"


def check_tensor(op: str, name: str, t: object, *, dtypes=None, dim: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"sara_kernels.{op}: {name} must be a Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"sara_kernels.{op}: {name} has dtype {t.dtype}; expected one of {names}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"sara_kernels.{op}: {name} must be {dim}-D, got shape {tuple(t.shape)}")


def check_same_device(op: str, **tensors: torch.Tensor | None) -> None:
    items = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise RuntimeError(
                f"sara_kernels.{op}: {name} is on {t.device} but {first_name} is on {first.device}; "
                "all tensors must be on one device"
            )


def check_range(op: str, index: torch.Tensor, numel: int, name: str = "index") -> None:
    """Every entry in [0, numel) (one pass; a host sync on CUDA). The reference backend runs it
    before every read or write whatever the check setting: torch indexing would wrap a negative
    index to the end, and write part of the result before raising on one out of range."""
    if index.numel() == 0 or _is_fake(index):
        return
    lo, hi = torch.aminmax(index)
    lo, hi = int(lo), int(hi)
    if lo < 0 or hi >= numel:
        raise IndexError(
            f"sara_kernels.{op}: {name} holds values in [{lo}, {hi}] but must lie in [0, {numel}) "
            f"(the weight has {numel} entries)"
        )


def check_index(op: str, index: torch.Tensor, numel: int, *, name: str = "index") -> None:
    """index: int32/int64 [k], strictly increasing, every entry in [0, numel)."""
    check_tensor(op, name, index, dtypes=INDEX_DTYPES, dim=1)
    if index.dtype == torch.int32 and numel > 2**31 - 1:
        raise TypeError(
            f"sara_kernels.{op}: {name} is int32 but the weight has {numel} entries (>= 2**31); "
            "use int64 indices"
        )
    if not index_checks_enabled() or index.numel() == 0 or _is_fake(index):
        return
    if torch.compiler.is_compiling():
        return
    if getattr(index, "_sara_kernels_checked", None) == (numel, _version(index)):
        return  # validated by mark_index_checked and not modified since
    check_range(op, index, numel, name)
    if index.numel() > 1 and not bool((index[1:] > index[:-1]).all()):
        raise ValueError(
            f"sara_kernels.{op}: {name} must be sorted in strictly increasing order (no duplicates); "
            "sort it with torch.unique(index) or build it with select_small_magnitude"
        )


def mark_index_checked(index: torch.Tensor, numel: int) -> None:
    """Validate ``index`` for a weight of ``numel`` entries once, and remember it on the tensor.

    Later calls of :func:`check_index` with the same tensor skip the data-dependent pass (and the
    host sync on CUDA) until the tensor is modified in place (its version counter changes).
    """
    previous = getattr(index, "_sara_kernels_checked", None)
    if previous == (numel, _version(index)):
        return
    with index_checks(True):
        check_index("mark_index_checked", index, numel)
    remember_index_checked(index, numel)


def check_finite(op: str, **values: float) -> None:
    """Every scalar hyperparameter is a finite number (NaN passes every ``<`` check)."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"sara_kernels.{op}: {name} must be a number, got {type(value).__name__}")
        if not math.isfinite(value):
            raise ValueError(f"sara_kernels.{op}: {name} must be finite, got {value}")


def _span(t: torch.Tensor) -> tuple[int, int, int] | None:
    """(storage address, first byte, one past the last byte) that ``t`` can touch."""
    if t.numel() == 0:
        return None
    extent = sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride(), strict=True))
    start = t.storage_offset() * t.element_size()
    return t.untyped_storage().data_ptr(), start, start + (extent + 1) * t.element_size()


def check_no_overlap(op: str, written: dict[str, torch.Tensor], read: dict[str, torch.Tensor]) -> None:
    """No tensor an op writes shares memory with another of its arguments (another written one, or
    one it reads): the result would depend on the backend's order of reads and writes. A sweep
    over the byte ranges, sorted: O(n log n) in the number of tensors. The error names the first
    clash in argument order (``written`` first, then ``read``)."""
    intervals = []
    order = 0
    for is_written, tensors in ((True, written), (False, read)):
        for name, t in tensors.items():
            order += 1
            if isinstance(t, torch.Tensor) and not _is_fake(t):
                span = _span(t)
                if span is not None:
                    intervals.append((span[0], span[1], order, span[2], is_written, name))
    intervals.sort()
    clashes = []
    storage = None
    any_end = written_end = -1
    any_at = written_at = (0, "")
    for ptr, start, position, end, is_written, name in intervals:
        if ptr != storage:
            storage, any_end, written_end = ptr, -1, -1
        if start < written_end:
            clashes.append(
                (min(written_at[0], position), max(written_at[0], position), written_at, (position, name))
            )
        elif is_written and start < any_end:
            clashes.append((min(any_at[0], position), max(any_at[0], position), any_at, (position, name)))
        if end > any_end:
            any_end, any_at = end, (position, name)
        if is_written and end > written_end:
            written_end, written_at = end, (position, name)
    if clashes:
        _, _, a, b = min(clashes)
        first, second = sorted((a, b))
        raise ValueError(
            f"sara_kernels.{op}: {second[1]} and {first[1]} share memory; a tensor the op writes must not "
            "overlap any other argument (pass separate tensors, e.g. .clone())"
        )


def remember_index_checked(index: torch.Tensor, numel: int) -> None:
    """Record that the caller validated ``index`` for a weight of ``numel`` entries (range and
    strictly increasing order), as :func:`mark_index_checked` does after validating it."""
    if not index.is_inference():  # an inference tensor has no version counter: checked every call
        index._sara_kernels_checked = (numel, index._version)


def _version(t: torch.Tensor) -> int | None:
    """The version counter, or None for an inference tensor (``torch.inference_mode``), which has
    none (so a remembered check never matches it)."""
    return None if t.is_inference() else t._version


def check_contiguous_weight(op: str, weight: torch.Tensor, name: str = "weight") -> None:
    if not weight.is_contiguous():
        raise ValueError(
            f"sara_kernels.{op}: {name} must be contiguous (indices address {name}.view(-1)); "
            f"got strides {weight.stride()} for shape {tuple(weight.shape)}"
        )


def pair(op: str, name: str, value: int | Sequence[int]) -> list[int]:
    if isinstance(value, int):
        return [value, value]
    value = list(value)
    if len(value) == 1:
        value = value * 2
    if len(value) != 2 or not all(isinstance(v, int) for v in value):
        raise ValueError(f"sara_kernels.{op}: {name} must be an int or a pair of ints, got {value}")
    return value


def conv2d_output_size(
    op: str,
    x_shape: Sequence[int],
    weight_shape: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> tuple[int, ...]:
    if any(s <= 0 for s in stride):
        raise ValueError(f"sara_kernels.{op}: stride must be positive, got {list(stride)}")
    if any(p < 0 for p in padding):
        raise ValueError(f"sara_kernels.{op}: padding must be non-negative, got {list(padding)}")
    if any(d <= 0 for d in dilation):
        raise ValueError(f"sara_kernels.{op}: dilation must be positive, got {list(dilation)}")
    out = []
    for i in range(len(stride)):  # 2 spatial dims for conv2d; conv3d checks 3 the same way
        size = x_shape[2 + i] + 2 * padding[i] - dilation[i] * (weight_shape[2 + i] - 1) - 1
        if size < 0:
            raise ValueError(
                f"sara_kernels.{op}: the kernel {tuple(weight_shape[2:])} (dilation {list(dilation)}) "
                f"is larger than the padded input {tuple(x_shape[2:])} (padding {list(padding)})"
            )
        out.append(size // stride[i] + 1)
    return tuple(out)


def check_conv2d(
    op: str,
    x: torch.Tensor,
    weight_shape: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    grad_out: torch.Tensor | None = None,
) -> None:
    if len(weight_shape) != 4 or any(int(s) <= 0 for s in weight_shape):
        raise ValueError(
            f"sara_kernels.{op}: weight_shape must be 4 positive ints [out, in/groups, kh, kw], "
            f"got {list(weight_shape)}"
        )
    if x.dim() != 4:
        raise ValueError(f"sara_kernels.{op}: x must be 4-D [N, C, H, W], got shape {tuple(x.shape)}")
    if groups <= 0 or weight_shape[0] % groups != 0:
        raise ValueError(
            f"sara_kernels.{op}: groups={groups} must be positive and divide the {weight_shape[0]} "
            "output channels"
        )
    if x.shape[1] != weight_shape[1] * groups:
        raise ValueError(
            f"sara_kernels.{op}: x has {x.shape[1]} channels but weight_shape {list(weight_shape)} "
            f"with groups={groups} expects {weight_shape[1] * groups}"
        )
    oh, ow = conv2d_output_size(op, x.shape, weight_shape, stride, padding, dilation)
    if grad_out is not None:
        expected = (x.shape[0], weight_shape[0], oh, ow)
        if tuple(grad_out.shape) != expected:
            raise ValueError(
                f"sara_kernels.{op}: grad_out has shape {tuple(grad_out.shape)} but the convolution "
                f"of x {tuple(x.shape)} with weight_shape {list(weight_shape)} gives {expected}"
            )
