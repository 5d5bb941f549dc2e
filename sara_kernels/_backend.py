"""Which backend runs each op, and how a user forces one.

Four backends implement every op:

* ``reference`` -- pure PyTorch (``sara_kernels/reference.py``); runs on any device, the test oracle.
* ``cpu``       -- C++/OpenMP kernels in the compiled extension (``csrc/cpu``), CPU tensors.
* ``cuda``      -- CUDA C++ kernels in the compiled extension (``csrc/cuda``), CUDA tensors.
* ``triton``    -- Triton kernels (``sara_kernels/triton``), CUDA tensors; also CPU tensors when
  ``TRITON_INTERPRET=1`` (the Triton interpreter, used by the tests).

Without a forced backend each call takes the first available of ``cpu`` then ``reference`` on CPU
tensors, and ``cuda``, ``triton``, ``reference`` on CUDA tensors: the dispatcher runs the native
kernel registered under the op's CPU or CUDA key directly, and the reference (the op's
``CompositeExplicitAutograd`` kernel) wherever none is. ``SARA_KERNELS_BACKEND=<name>`` (read at
import) or the :func:`use_backend` context manager forces one: the forced backend's kernels are
registered over the CPU and CUDA keys while it is in force, so the default path pays nothing for
the option. Forcing a backend that cannot run the call is an error that says why (never a silent
fallback).
"""

from __future__ import annotations

import contextlib
import enum
import functools
import importlib
import os
import threading
import warnings
from collections.abc import Iterator

import torch

from sara_kernels import _checks

BACKENDS = ("reference", "cpu", "cuda", "triton")
ENV_BACKEND = "SARA_KERNELS_BACKEND"

#: The kernel ops (selection on Triton uses torch ops on any device): those with a validator.
OPS = tuple(_checks.VALIDATORS)


# ---------------------------------------------------------------------------------------------
# Compiled extension
# ---------------------------------------------------------------------------------------------
_native_error: str | None = None
_native_loaded = False
try:  # The compiled extension registers its kernels under the ``sara_kernels`` ops on import.
    importlib.import_module("sara_kernels._C")

    _native_loaded = True
except ImportError as error:  # pragma: no cover - exercised when the extension is not built
    _native_error = (
        f"the compiled extension sara_kernels._C could not be imported ({error}); the 'cpu' and "
        "'cuda' backends are unavailable and ops run on 'reference' (and 'triton' on CUDA). "
        "Build it with `pip install --no-build-isolation .` in an environment that has torch."
    )
    warnings.warn(_native_error, RuntimeWarning, stacklevel=2)


def native_available(device_type: str) -> bool:
    """Whether the compiled extension has kernels for ``device_type`` ('cpu' or 'cuda')."""
    if device_type == "cpu":
        return _native_loaded
    if device_type == "cuda":
        return _native_loaded and _native_cuda()
    return False


@functools.cache
def _native_cuda() -> bool:
    """Whether the extension was built with CUDA kernels (asked once the ops are declared, before
    sara_kernels._ops registers its own CUDA kernels where there are none)."""
    return _native_loaded and torch._C._dispatch_has_kernel_for_dispatch_key(
        "sara_kernels::sampled_weight_grad_linear", "CUDA"
    )


def native_setting(name: str, value: int | None = None) -> int:
    """Read (or set, returning the previous value) one of the native kernels' settings:
    ``grad_variant``, ``index_checks`` (the calling thread's: 0 off, 1 async, 2 sync, -1 the
    default; set it with :func:`sara_kernels.index_checks`), ``index_checks_default`` or
    ``workspace_bytes`` (0: the default bound). 0 without the compiled extension."""
    if not _native_loaded:
        return 0
    return int(torch.ops.sara_kernels._setting(name, value))


@contextlib.contextmanager
def native_settings(**values: int) -> Iterator[None]:
    """Set native settings inside the block (process-wide), e.g.
    ``native_settings(workspace_bytes=4096)``: the tests shrink the workspace to reach the chunked
    paths on small shapes."""
    previous = {name: native_setting(name, value) for name, value in values.items()}
    try:
        yield
    finally:
        for name, value in previous.items():
            native_setting(name, value)


# ---------------------------------------------------------------------------------------------
# Triton
# ---------------------------------------------------------------------------------------------
_triton_module = None
_triton_error: str | None = None


def _load_triton():
    global _triton_module, _triton_error
    if _triton_module is None and _triton_error is None:
        try:
            _triton_module = importlib.import_module("sara_kernels.triton")
        except Exception as error:  # ImportError, or a triton that fails to initialise
            _triton_error = f"{type(error).__name__}: {error}"
    return _triton_module


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available(device_type: str) -> bool:
    """Triton runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1``."""
    if device_type == "cuda":
        ok = torch.cuda.is_available() or triton_interpret()
    elif device_type == "cpu":
        ok = triton_interpret()
    else:
        ok = False
    return ok and _load_triton() is not None


def _available(backend: str, device_type: str) -> bool:
    if backend == "reference":
        return True
    if backend in ("cpu", "cuda"):
        return backend == device_type and native_available(device_type)
    if backend == "triton":
        return triton_available(device_type)
    return False


def _why_unavailable(backend: str, device_type: str) -> str:
    if backend in ("cpu", "cuda"):
        if backend != device_type:
            return f"the '{backend}' backend runs only on {backend} tensors"
        if not _native_loaded:
            return _native_error or "the compiled extension is not loaded"
        return "the compiled extension was built without CUDA kernels"
    if backend == "triton":
        if device_type == "cpu" and not triton_interpret():
            return "Triton runs on CPU tensors only under TRITON_INTERPRET=1"
        if device_type not in ("cpu", "cuda"):
            return f"Triton has no kernels for device type '{device_type}'"
        _load_triton()
        return f"triton could not be imported ({_triton_error})"
    return "unknown reason"


# ---------------------------------------------------------------------------------------------
# Forcing
# ---------------------------------------------------------------------------------------------
def _check_name(name: str, where: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{where}: unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return name


#: use_backend's blocks in force, the latest entered last (process-wide): one entry per block,
#: removed by that block on exit, so blocks in several threads may end in any order.
_forced_blocks: list[list[str]] = []
_env_forced: str | None = None
_library = None  # the override kernels in force (for forced_backend()), or None
_override_lock = threading.RLock()


def forced_backend() -> str | None:
    """The backend forced by :func:`use_backend` (the latest block still in force) or
    ``SARA_KERNELS_BACKEND``, if any."""
    if _forced_blocks:
        return _forced_blocks[-1][0]
    return _env_forced


def _reinstall() -> None:
    """Make the registered override kernels those of forced_backend(): one library at a time, so
    an inner block (a native backend, or auto) is never shadowed by an outer one's kernels."""
    global _library
    if _library is not None:
        _library._destroy()
        _library = None
    _library = _install(forced_backend())


def _env_backend() -> str | None:
    env = os.environ.get(ENV_BACKEND, "").strip().lower()
    if env in ("", "auto"):
        return None
    return _check_name(env, f"environment variable {ENV_BACKEND}")


def _install(name: str | None):
    """Register the Python kernels of a forced backend over the CPU and CUDA keys (or nothing for
    auto and the native backends, which are the default kernels); returns the library to destroy."""
    if name in (None, "auto"):
        return None
    from sara_kernels import _ops

    return _ops.override_library(name)


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Force every op called inside the block onto one backend (process-wide, for tests and
    benchmarks).

    Args:
        name: ``"reference"``, ``"cpu"``, ``"cuda"``, ``"triton"``, or ``None``/``"auto"`` for the
            automatic choice (this also overrides ``SARA_KERNELS_BACKEND``).

    Example::

        with sara_kernels.use_backend("reference"):
            grad = sara_kernels.ops.sampled_weight_grad_linear(dy, x, index, 64, 32)
    """
    if name is not None and name != "auto":
        _check_name(name, "use_backend")
    block = ["auto" if name is None else name]
    with _override_lock:
        _forced_blocks.append(block)
        _reinstall()
    try:
        yield
    finally:
        with _override_lock:
            # This block's own entry (by identity), wherever it stands now.
            del _forced_blocks[next(i for i, b in enumerate(_forced_blocks) if b is block)]
            _reinstall()


def _auto_order(device_type: str) -> tuple[str, ...]:
    if device_type == "cpu":
        return ("cpu", "reference")
    if device_type == "cuda":
        return ("cuda", "triton", "reference")
    return ("reference",)


def select_backend(op: str, device: torch.device) -> str:
    """The backend that ``op`` will run on for tensors on ``device`` (raises if a forced one can't)."""
    device_type = torch.device(device).type
    forced = forced_backend()
    if forced is not None and forced != "auto":
        if not _available(forced, device_type):
            raise RuntimeError(
                f"sara_kernels.{op}: backend '{forced}' was forced but cannot run on {device_type} "
                f"tensors: {_why_unavailable(forced, device_type)}"
            )
        return forced
    for backend in _auto_order(device_type):
        if _available(backend, device_type):
            return backend
    return "reference"  # pragma: no cover - reference is always available


def backends() -> dict:
    """What is built and importable, and which backend each op will use on each device.

    Returns:
        A dict with ``available`` (backend -> bool or reason), ``native`` (extension status),
        ``triton`` (import status), ``forced`` (the forced backend or None) and ``ops``
        (device -> op -> backend). Devices listed: ``cpu`` and, when CUDA is available, ``cuda``.
    """
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    triton_cuda = triton_available("cuda") if torch.cuda.is_available() else False
    info = {
        "torch": torch.__version__,
        "native": {
            "loaded": _native_loaded,
            "cuda_kernels": _native_cuda(),
            "error": _native_error,
        },
        "triton": {
            "importable": _load_triton() is not None,
            "interpret": triton_interpret(),
            "error": _triton_error,
        },
        "available": {
            "reference": True,
            "cpu": native_available("cpu"),
            "cuda": native_available("cuda") and torch.cuda.is_available(),
            "triton": triton_cuda or triton_available("cpu"),
        },
        "forced": forced_backend(),
        "ops": {},
    }
    for device in devices:
        try:
            info["ops"][device] = {op: select_backend(op, torch.device(device)) for op in OPS}
        except RuntimeError as error:
            info["ops"][device] = {"error": str(error)}
    try:
        forced_variant = next(k for k, v in GRAD_VARIANTS.items() if v == sampled_grad_variant())
    except ValueError as error:  # a bad SARA_KERNELS_GRAD_VARIANT: reported, not raised
        forced_variant = f"error: {error}"
    info["grad_variant"] = {
        "forced": forced_variant,
        "last": last_grad_variants(),
        "auto_rules": GRAD_VARIANT_RULES,
    }
    return info


# ---------------------------------------------------------------------------------------------
# Sampled-gradient variant (native backends): which algorithm computes the selected entries
# ---------------------------------------------------------------------------------------------
#: 0 = auto (by density and shape), 1 = direct (one dot product per selected entry, no dense
#: workspace; on the Triton backend its kernel), 2 = gemm (dense GEMM over bounded chunks of rows,
#: then gather), 3 = tiled (CUDA native, linear only: the entries' dot products over operands
#: staged in shared memory).
class GradVariant(enum.IntEnum):
    AUTO = 0
    DIRECT = 1
    GEMM = 2
    TILED = 3


GRAD_VARIANTS = {v.name.lower(): int(v) for v in GradVariant}

ENV_GRAD_VARIANT = "SARA_KERNELS_GRAD_VARIANT"
_SAMPLED_OPS = ("sampled_weight_grad_linear", "sampled_weight_grad_conv2d")

#: What 'auto' picks, per native backend (the measured crossovers live next to the kernels:
#: csrc/cpu/sampled_grad_*.cpp and csrc/cuda/sampled_grad_*.cu).
GRAD_VARIANT_RULES = {
    "cpu": {
        "sampled_weight_grad_linear": "gemm at >= 12% density over the rows the entries span, else direct",
        "sampled_weight_grad_conv2d": "gemm at >= 10% density over the output channels the entries span "
        "(and enough columns per channel), else direct",
    },
    "cuda": {
        "sampled_weight_grad_linear": "tiled below 0.3% density when in_features >= 1024 and every row fits "
        "shared memory, else gemm",
        "sampled_weight_grad_conv2d": "fp16/bf16: direct below 0.25% + 0.07 / sqrt(N*P*Q) density, else gemm "
        "(cuDNN); fp32/fp64: direct below 1.5%, else gemm",
    },
    "triton": {
        "sampled_weight_grad_linear": "gemm (cuBLAS over bounded row chunks, then a gather)",
        "sampled_weight_grad_conv2d": "direct (the Triton kernel) below 0.1% + 0.07 / sqrt(N*P*Q) density, "
        "else gemm (the dense weight gradient, then a gather)",
    },
}


_BACKEND_CODES = {1: "cpu", 2: "cuda", 3: "reference", 4: "triton"}


def last_run(op: str) -> tuple[str | None, str | None]:
    """(backend, variant) op ran on last: the native kernels record it, and so do the Python
    kernels (reference, Triton) through the same record."""
    if not _native_loaded:
        return _python_runs.get(op, (None, None))
    backend, variant = (int(v) for v in torch.ops.sara_kernels._last_run(op))
    names = {v: k for k, v in GRAD_VARIANTS.items()}
    return _BACKEND_CODES.get(backend), (names.get(variant) if variant > 0 else None)


_python_runs: dict[str, tuple[str, str | None]] = {}


def record_run(op: str, backend: str) -> None:
    """What a Python kernel records before it runs (the native kernels record in C++)."""
    if _native_loaded:
        code = next(c for c, n in _BACKEND_CODES.items() if n == backend)
        torch.ops.sara_kernels._last_run(op, code)
    else:
        _python_runs[op] = (backend, None)


def last_grad_variants() -> dict:
    """The variant ('direct', 'gemm', 'tiled') each native sampled-gradient op ran last, on any
    device: what auto picked for the latest call. None before the first call, after a Python
    backend ran it, or without the compiled extension."""
    return {op: last_run(op)[1] for op in _SAMPLED_OPS}


def _env_variant() -> int:
    name = os.environ.get(ENV_GRAD_VARIANT, "auto").strip().lower() or "auto"
    if name not in GRAD_VARIANTS:
        raise ValueError(
            f"environment variable {ENV_GRAD_VARIANT}={name!r}; expected one of {', '.join(GRAD_VARIANTS)}"
        )
    return GRAD_VARIANTS[name]


_variant = 0  # the forced variant (mirrors the native setting)


def sampled_grad_variant() -> int:
    return _variant


def _set_variant(value: int) -> int:
    global _variant
    previous, _variant = _variant, int(value)
    native_setting("grad_variant", _variant)
    return previous


@contextlib.contextmanager
def use_grad_variant(name: str) -> Iterator[None]:
    """Force the sampled-gradient algorithm ('auto', 'direct', 'gemm' or 'tiled') process-wide;
    for tests and benchmarks.

    'tiled' exists for the linear gradient on CUDA only; the other kernels reject it by name.
    """
    if name not in GRAD_VARIANTS:
        raise ValueError(
            f"use_grad_variant: unknown variant {name!r}; expected one of {', '.join(GRAD_VARIANTS)}"
        )
    previous = _set_variant(GRAD_VARIANTS[name])
    try:
        yield
    finally:
        _set_variant(previous)


def _apply_environment() -> None:
    """Read the environment once, at import: the forced backend, variant and native index checks."""
    global _env_forced
    _set_variant(_env_variant())
    native_setting("index_checks_default", int(_checks.DEFAULT_INDEX_CHECKS))
    _env_forced = _env_backend()
    _reinstall()
