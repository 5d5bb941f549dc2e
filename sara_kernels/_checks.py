"""The Python validator of the reference and Triton kernels: each error names the op and the argument.

The native kernels check the same in C++ (``csrc/checks.h``), with the same messages. The cheap
checks (dtype, device, rank, shape, memory overlap of the tensors an op writes) always run. The
data-dependent index checks (range, strictly increasing order) cost one pass over ``index`` and,
on CUDA, a device-to-host sync. One setting governs them everywhere, with three values
(:class:`IndexChecks`): ``sync`` raises (a host sync on CUDA), ``async`` (the default) raises
where that costs no sync and makes the CUDA kernels assert on the device instead, ``off`` skips
them. ``SARA_KERNELS_CHECK_INDEX`` gives the process default (read at import);
:func:`index_checks` sets it **for the calling thread** (other threads keep theirs), for callers
that validated their index once (the layers validate an index when it is set through their
methods). Whatever the setting, no kernel ever writes outside its tensor: the CPU kernels check
every index (one pass, no sync to save), the CUDA and Triton kernels bounds-check every index
they write through, and the reference backend checks the range before it writes anything.
"""

from __future__ import annotations

import contextlib
import enum
import math
import os
import threading
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch

INDEX_DTYPES = (torch.int32, torch.int64)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class IndexChecks(enum.IntEnum):
    """The values of the index-check setting (the native kernels read the same codes)."""

    OFF = 0
    ASYNC = 1
    SYNC = 2


ENV_INDEX_CHECKS = "SARA_KERNELS_CHECK_INDEX"


def _parse_index_checks(value: object, where: str) -> IndexChecks:
    if isinstance(value, IndexChecks):
        return value
    if isinstance(value, bool):
        return IndexChecks.ASYNC if value else IndexChecks.OFF
    name = str(value).strip().lower()
    aliases = {"": "async", "1": "async", "on": "async", "true": "async", "0": "off", "false": "off"}
    name = aliases.get(name, name)
    if name.upper() not in IndexChecks.__members__:
        raise ValueError(f"{where}: index checks {value!r}; expected sync, async or off (or a bool)")
    return IndexChecks[name.upper()]


#: The process default (``SARA_KERNELS_CHECK_INDEX``, read once at import).
DEFAULT_INDEX_CHECKS = _parse_index_checks(
    os.environ.get(ENV_INDEX_CHECKS, "async"), f"environment variable {ENV_INDEX_CHECKS}"
)
_local = threading.local()


def index_checks_mode() -> IndexChecks:
    """The index checks in force for the calling thread."""
    return getattr(_local, "index_checks", DEFAULT_INDEX_CHECKS)


def index_checks_enabled() -> bool:
    """Whether the data-dependent index checks run in the calling thread (not ``off``)."""
    return index_checks_mode() != IndexChecks.OFF


def set_index_checks(mode: bool | str | IndexChecks) -> bool | IndexChecks:
    """Set the index checks for the calling thread: ``True``/``False``, or ``"sync"``,
    ``"async"``, ``"off"``. Returns the previous setting (a bool when given a bool). Prefer the
    context manager :func:`index_checks`."""
    from sara_kernels import _backend

    previous = index_checks_mode()
    new = _parse_index_checks(mode, "set_index_checks")
    _local.index_checks = new
    _backend.native_setting("index_checks", int(new))
    return previous != IndexChecks.OFF if isinstance(mode, bool) else previous


@contextlib.contextmanager
def index_checks(mode: bool | str | IndexChecks) -> Iterator[None]:
    """``with sara_kernels.index_checks(False):`` skips the index checks in this thread only
    (``"sync"`` makes the CUDA kernels raise instead of asserting on the device)."""
    previous = index_checks_mode()
    set_index_checks(mode)
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


def check_index_width(op: str, index: torch.Tensor, numel: int, *, name: str = "index") -> None:
    """index: int32/int64 [k], wide enough for a weight of numel entries (its values unchecked)."""
    check_tensor(op, name, index, dtypes=INDEX_DTYPES, dim=1)
    if index.dtype == torch.int32 and numel > 2**31 - 1:
        raise TypeError(
            f"sara_kernels.{op}: {name} is int32 but the weight has {numel} entries (>= 2**31); "
            "use int64 indices"
        )


def check_index(op: str, index: torch.Tensor, numel: int, *, name: str = "index") -> None:
    """index: int32/int64 [k], strictly increasing, every entry in [0, numel)."""
    check_index_width(op, index, numel, name=name)
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


# ---------------------------------------------------------------------------------------------
# The ops' Python validators (the native kernels check the same in C++: csrc/checks.h)
# ---------------------------------------------------------------------------------------------
def check_select(weight, threshold=None, k=None):
    op = "select_small_magnitude"
    check_tensor(op, "weight", weight, dtypes=WEIGHT_DTYPES)
    if (threshold is None) == (k is None):
        raise ValueError(f"sara_kernels.{op}: give exactly one of threshold or k")
    if threshold is not None and not (threshold > 0 and threshold == threshold):
        raise ValueError(f"sara_kernels.{op}: threshold must be a positive number, got {threshold}")
    if k is not None and not (0 <= k <= weight.numel()):
        raise ValueError(
            f"sara_kernels.{op}: k={k} must lie in [0, {weight.numel()}] (the weight's entry count)"
        )


def check_linear_grad(op, grad_out, x, index, out_features, in_features):
    check_tensor(op, "grad_out", grad_out, dtypes=FLOAT_DTYPES)
    check_tensor(op, "x", x, dtypes=FLOAT_DTYPES)
    check_tensor(op, "index", index, dtypes=INDEX_DTYPES, dim=1)
    if grad_out.dtype != x.dtype:
        raise TypeError(f"sara_kernels.{op}: grad_out is {grad_out.dtype} but x is {x.dtype}")
    if out_features <= 0 or in_features <= 0:
        raise ValueError(
            f"sara_kernels.{op}: out_features={out_features} and in_features={in_features} must be positive"
        )
    if grad_out.dim() == 0 or grad_out.shape[-1] != out_features:
        raise ValueError(
            f"sara_kernels.{op}: grad_out has shape {tuple(grad_out.shape)}; its last dim must be "
            f"out_features={out_features}"
        )
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(
            f"sara_kernels.{op}: x has shape {tuple(x.shape)}; its last dim must be in_features={in_features}"
        )
    if grad_out.shape[:-1] != x.shape[:-1]:
        raise ValueError(
            f"sara_kernels.{op}: grad_out {tuple(grad_out.shape)} and x {tuple(x.shape)} must share "
            "their leading (token) dims"
        )
    check_same_device(op, grad_out=grad_out, x=x, index=index)


def check_sampled_linear(grad_out, x, index, out_features, in_features):
    op = "sampled_weight_grad_linear"
    check_linear_grad(op, grad_out, x, index, out_features, in_features)
    check_index(op, index, out_features * in_features)


def check_conv_grad(op, grad_out, x, index, weight_shape, stride, padding, dilation, groups):
    check_tensor(op, "grad_out", grad_out, dtypes=FLOAT_DTYPES, dim=4)
    check_tensor(op, "x", x, dtypes=FLOAT_DTYPES, dim=4)
    check_tensor(op, "index", index, dtypes=INDEX_DTYPES, dim=1)
    if grad_out.dtype != x.dtype:
        raise TypeError(f"sara_kernels.{op}: grad_out is {grad_out.dtype} but x is {x.dtype}")
    for name, value in (("stride", stride), ("padding", padding), ("dilation", dilation)):
        if len(value) != 2:
            raise ValueError(f"sara_kernels.{op}: {name} must have 2 entries, got {list(value)}")
    check_conv2d(op, x, weight_shape, stride, padding, dilation, groups, grad_out)
    check_same_device(op, grad_out=grad_out, x=x, index=index)


def numel_of(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def check_sampled_conv2d(grad_out, x, index, weight_shape, stride, padding, dilation, groups):
    op = "sampled_weight_grad_conv2d"
    check_conv_grad(op, grad_out, x, index, weight_shape, stride, padding, dilation, groups)
    check_index(op, index, numel_of(weight_shape))


def check_conv_nd(op, dims, grad_out, x, index, weight_shape, stride, padding, dilation, groups):
    """The checks of :func:`check_conv_grad` for a ``dims``-D convolution."""
    check_tensor(op, "grad_out", grad_out, dtypes=FLOAT_DTYPES, dim=dims + 2)
    check_tensor(op, "x", x, dtypes=FLOAT_DTYPES, dim=dims + 2)
    check_tensor(op, "index", index, dtypes=INDEX_DTYPES, dim=1)
    if grad_out.dtype != x.dtype:
        raise TypeError(f"sara_kernels.{op}: grad_out is {grad_out.dtype} but x is {x.dtype}")
    if len(weight_shape) != dims + 2 or any(int(s) <= 0 for s in weight_shape):
        raise ValueError(
            f"sara_kernels.{op}: weight_shape must be {dims + 2} positive ints [out, in/groups, "
            f"kernel...], got {list(weight_shape)}"
        )
    for name, value in (("stride", stride), ("padding", padding), ("dilation", dilation)):
        if len(value) != dims:
            raise ValueError(f"sara_kernels.{op}: {name} must have {dims} entries, got {list(value)}")
    if groups <= 0 or weight_shape[0] % groups != 0 or x.shape[1] != weight_shape[1] * groups:
        raise ValueError(
            f"sara_kernels.{op}: x has {x.shape[1]} channels; weight_shape {list(weight_shape)} with "
            f"groups={groups} needs groups to divide {weight_shape[0]} and "
            f"{weight_shape[1] * groups} channels"
        )
    out = conv2d_output_size(op, x.shape, weight_shape, stride, padding, dilation)
    expected = (x.shape[0], weight_shape[0], *out)
    if tuple(grad_out.shape) != expected:
        raise ValueError(
            f"sara_kernels.{op}: grad_out has shape {tuple(grad_out.shape)} but the convolution of x "
            f"{tuple(x.shape)} with weight_shape {list(weight_shape)} gives {expected}"
        )
    check_same_device(op, grad_out=grad_out, x=x, index=index)
    check_index(op, index, numel_of(weight_shape))


def check_weight_side(op, weight, index, base, names=("weight", "index", "base")):
    w, i, b = names
    check_tensor(op, w, weight, dtypes=WEIGHT_DTYPES)
    check_contiguous_weight(op, weight, name=w)
    check_tensor(op, i, index, dtypes=INDEX_DTYPES, dim=1)
    check_tensor(op, b, base, dim=1)
    if base.dtype != weight.dtype:
        raise TypeError(f"sara_kernels.{op}: {b} is {base.dtype} but {w} is {weight.dtype}; they must match")
    if base.shape != index.shape:
        raise ValueError(
            f"sara_kernels.{op}: {b} has shape {tuple(base.shape)} but {i} has {tuple(index.shape)}"
        )


def check_compact(op, name, t, index, dtypes, index_name="index"):
    check_tensor(op, name, t, dtypes=dtypes, dim=1)
    if t.shape != index.shape:
        raise ValueError(
            f"sara_kernels.{op}: {name} has shape {tuple(t.shape)} but {index_name} has {tuple(index.shape)}"
        )
    if not t.is_contiguous():
        raise ValueError(f"sara_kernels.{op}: {name} must be contiguous")


ADAMW_NAMES = ("weight", "index", "base", "delta", "grad", "exp_avg", "exp_avg_sq")


ADAMW_LIST_NAMES = ("weights", "indices", "bases", "deltas", "grads", "exp_avgs", "exp_avg_sqs")


class AdamWHyper(NamedTuple):
    """AdamW's hyperparameters as one value (the ops' keyword scalars, in schema order)."""

    lr: float
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 1e-2
    maximize: bool = False

    def check(self, op: str) -> None:
        """Finite (NaN passes every comparison), betas in [0, 1), lr, eps and weight_decay
        non-negative. Shared by the ops' Python validator and :class:`~sara_kernels.SparseAdamW`."""
        lr, beta1, beta2, eps, weight_decay, _ = self
        check_finite(op, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
        if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
            raise ValueError(f"sara_kernels.{op}: betas must lie in [0, 1), got ({beta1}, {beta2})")
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(
                f"sara_kernels.{op}: lr={lr}, eps={eps} and weight_decay={weight_decay} must be non-negative"
            )

    def scalars(self) -> dict:
        """The ops' keyword arguments (floats and a bool, as the schema takes them)."""
        lr, beta1, beta2, eps, weight_decay, maximize = self
        return dict(
            lr=float(lr),
            beta1=float(beta1),
            beta2=float(beta2),
            eps=float(eps),
            weight_decay=float(weight_decay),
            maximize=bool(maximize),
        )


def check_step(op, name, step):
    check_finite(op, **{name: step})
    if step < 1:
        raise ValueError(f"sara_kernels.{op}: {name} must be >= 1 (AdamW counts from 1), got {step}")


def check_adamw_set(op, tensors, names=ADAMW_NAMES):
    """Every check of one (weight, index, base, delta, grad, exp_avg, exp_avg_sq) set; ``names``
    label the tensors in messages."""
    weight, index, base, delta, grad, exp_avg, exp_avg_sq = tensors
    check_weight_side(op, weight, index, base, names[:3])
    fp32 = (torch.float32,)
    for name, t in zip(names[3:], (delta, grad, exp_avg, exp_avg_sq), strict=True):
        check_compact(op, name, t, index, fp32, index_name=names[1])
    if weight.dtype == torch.float64:
        raise TypeError(
            f"sara_kernels.{op}: {names[0]} dtype float64 is not supported; use fp32, bf16 or fp16"
        )
    check_same_device(op, **dict(zip(names, tensors, strict=True)))
    check_index(op, index, weight.numel(), name=names[1])


def adamw_written_and_read(sets, names_of):
    """The tensors an AdamW step writes (weight, delta, moments) and reads (index, base, grad)."""
    written, read = {}, {}
    for i, tensors in enumerate(sets):
        names = names_of(i)
        for j in (0, 3, 5, 6):
            written[names[j]] = tensors[j]
        for j in (1, 2, 4):
            read[names[j]] = tensors[j]
    return written, read


def check_adamw(weight, index, base, delta, grad, exp_avg, exp_avg_sq, *, step, **hyper):
    op = "sparse_adamw_"
    tensors = (weight, index, base, delta, grad, exp_avg, exp_avg_sq)
    check_adamw_set(op, tensors)
    check_no_overlap(op, *adamw_written_and_read([tensors], lambda i: ADAMW_NAMES))
    check_step(op, "step", step)
    AdamWHyper(**hyper).check(op)


def check_adamw_multi(weights, indices, bases, deltas, grads, exp_avgs, exp_avg_sqs, *, steps, **hyper):
    op = "sparse_adamw_multi_"
    lists = (weights, indices, bases, deltas, grads, exp_avgs, exp_avg_sqs, steps)
    n = len(weights)
    for name, values in zip(ADAMW_LIST_NAMES[1:] + ("steps",), lists[1:], strict=True):
        if len(values) != n:
            raise ValueError(
                f"sara_kernels.{op}: {name} has {len(values)} entries but weights has {n}; "
                "every list needs one entry per weight"
            )
    AdamWHyper(**hyper).check(op)
    for i, tensors in enumerate(zip(*lists[:7], strict=True)):
        names = tuple(f"{name}[{i}]" for name in ADAMW_LIST_NAMES)
        check_adamw_set(op, tensors, names)
        if tensors[0].device != weights[0].device:
            raise RuntimeError(
                f"sara_kernels.{op}: weights[{i}] is on {tensors[0].device} but weights[0] is on "
                f"{weights[0].device}; all tensors must be on one device"
            )
        check_step(op, f"steps[{i}]", steps[i])
    sets = list(zip(*lists[:7], strict=True))
    names_of = lambda i: tuple(f"{name}[{i}]" for name in ADAMW_LIST_NAMES)  # noqa: E731
    check_no_overlap(op, *adamw_written_and_read(sets, names_of))


def check_merge(weight, index, base, delta, alpha=1.0):
    op = "scatter_merge_"
    check_weight_side(op, weight, index, base)
    check_compact(op, "delta", delta, index, (torch.float32, torch.float64))
    check_same_device(op, weight=weight, index=index, base=base, delta=delta)
    check_no_overlap(op, {"weight": weight}, {"index": index, "base": base, "delta": delta})
    check_finite(op, alpha=float(alpha))
    check_index(op, index, weight.numel())


def check_restore(weight, index, base):
    op = "restore_"
    check_weight_side(op, weight, index, base)
    check_same_device(op, weight=weight, index=index, base=base)
    check_no_overlap(op, {"weight": weight}, {"index": index, "base": base})
    check_index(op, index, weight.numel())


def check_sparse_layer(op, x, weight, bias, index, delta):
    check_tensor(op, "x", x, dtypes=FLOAT_DTYPES)
    check_tensor(op, "weight", weight, dtypes=WEIGHT_DTYPES)
    check_tensor(op, "index", index, dtypes=INDEX_DTYPES, dim=1)
    check_tensor(op, "delta", delta, dtypes=(torch.float32, torch.float64), dim=1)
    if delta.shape != index.shape:
        raise ValueError(
            f"sara_kernels.{op}: delta has shape {tuple(delta.shape)} but index has {tuple(index.shape)}"
        )
    if bias is not None:
        check_tensor(op, "bias", bias, dim=1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(
                f"sara_kernels.{op}: bias has {bias.shape[0]} entries but weight has {weight.shape[0]} outputs"
            )
    check_same_device(op, x=x, weight=weight, bias=bias, index=index, delta=delta)
    check_index_width(op, index, weight.numel())  # the values: by the sampled gradient that reads them


VALIDATORS = {
    "select_small_magnitude": check_select,
    "sampled_weight_grad_linear": check_sampled_linear,
    "sampled_weight_grad_conv2d": check_sampled_conv2d,
    "sparse_adamw_": check_adamw,
    "sparse_adamw_multi_": check_adamw_multi,
    "scatter_merge_": check_merge,
    "restore_": check_restore,
}
