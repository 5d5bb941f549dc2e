"""Atomic safetensors files (no pickle): adapters, training states and EMA states."""

from __future__ import annotations

import os
import uuid

import torch


def safetensors_module():
    try:
        import safetensors.torch  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("sara_kernels needs the 'safetensors' package: pip install safetensors") from exc
    import safetensors

    return safetensors


def atomic_save_file(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str]) -> None:
    """Write a safetensors file atomically: to a temporary file in the same directory, flushed to
    disk (fsync) and renamed over ``path`` (``os.replace``), so ``path`` holds either the old file
    or the complete new one, never a partial file; on failure the temporary file is removed."""
    safetensors = safetensors_module()
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")
    # Created with O_EXCL and mode 0o666 so the final file gets the usual umask permissions.
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        safetensors.torch.save_file(tensors, tmp, metadata=metadata)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_directory(directory)


def fsync_directory(directory: str) -> None:
    """Make the rename durable (POSIX); best effort where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_file(path: str, error: type[Exception], what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors on CPU, metadata) of a safetensors file; a missing, non-regular, truncated or
    garbage file is ``error`` naming ``what`` and the path."""
    safetensors = safetensors_module()
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist")
    if not os.path.isfile(path):
        raise error(f"{what} {path!r} is not a regular file")
    try:
        with safetensors.safe_open(path, framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as exc:  # SafetensorError and friends: truncated, garbage, not safetensors
        raise error(
            f"{what} {path!r} is not a safetensors file or is corrupted: {type(exc).__name__}: {exc}"
        ) from exc
    return tensors, metadata


def unique_storage(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """safetensors refuses tensors that share memory (modules sharing a weight share their sparse
    state): keep the first key of each, and map the others to it."""
    kept: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for key, t in tensors.items():
        where = (
            (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), t.dtype, tuple(t.shape))
            if t.numel()
            else None
        )
        if where is not None and where in seen:
            aliases[key] = seen[where]
            continue
        if where is not None:
            seen[where] = key
        kept[key] = t.detach().cpu().contiguous()
    return kept, aliases
