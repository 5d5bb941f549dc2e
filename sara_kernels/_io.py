"""Atomic safetensors files (no pickle): adapters, training states and EMA states."""

from __future__ import annotations

import os
import socket
import uuid

import torch


def safetensors_module():
    try:
        import safetensors.torch  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("sara_kernels needs the 'safetensors' package: pip install safetensors") from exc
    import safetensors

    return safetensors


def _temporary_name(path: str) -> str:
    """``.<name>.<pid>@<host>.<random>.tmp`` next to ``path``: the owner can be told dead later."""
    directory, name = os.path.split(os.path.abspath(path))
    return os.path.join(
        directory, f".{name}.{os.getpid()}@{socket.gethostname()}.{uuid.uuid4().hex[:12]}.tmp"
    )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # another user's process, or no way to tell: keep its file
    return True


def remove_stale_temporaries(path: str) -> list[str]:
    """Remove the temporary files that interrupted saves of ``path`` left (the writing process was
    killed, e.g. ``kill -9``, before it could clean up): those of this host whose process is gone.
    Returns the removed paths. Best effort: a directory that cannot be listed is left alone."""
    directory, name = os.path.split(os.path.abspath(path))
    prefix, removed = f".{name}.", []
    try:
        entries = os.listdir(directory)
    except OSError:
        return removed
    host = socket.gethostname()
    for entry in entries:
        if not (entry.startswith(prefix) and entry.endswith(".tmp")):
            continue
        owner = entry[len(prefix) : -len(".tmp")].rsplit(".", 1)[0]  # "<pid>@<host>" (or "<pid>")
        pid_text, _, owner_host = owner.partition("@")
        if not pid_text.isdigit() or (owner_host and owner_host != host) or _pid_alive(int(pid_text)):
            continue
        try:
            os.unlink(os.path.join(directory, entry))
            removed.append(os.path.join(directory, entry))
        except OSError:
            pass
    return removed


def atomic_save_file(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str]) -> None:
    """Write a safetensors file atomically: to a temporary file in the same directory, flushed to
    disk (fsync) and renamed over ``path`` (``os.replace``), so ``path`` holds either the old file
    or the complete new one, never a partial file; on failure the temporary file is removed, and
    the temporary files of earlier saves whose process was killed are removed first."""
    safetensors = safetensors_module()
    directory = os.path.dirname(os.path.abspath(path))
    remove_stale_temporaries(path)
    tmp = _temporary_name(path)
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


def read_file(
    path: str, what: str, error: type[Exception], corrupt=None, shorten=lambda text: text
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors on CPU, metadata) of a safetensors file. Missing: ``FileNotFoundError``; a
    directory or not a regular file (a FIFO would block): ``error``; truncated or not safetensors:
    ``corrupt(why)`` (default ``error``). ``what`` names the file in messages, ``shorten`` trims
    long paths."""
    safetensors = safetensors_module()
    shown = shorten(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} {shown!r} does not exist")
    if os.path.isdir(path):
        raise error(f"{what} {shown!r} is a directory, not a file")
    if not os.path.isfile(path):
        raise error(f"{what} {shown!r} is not a regular file (a FIFO, socket or device?)")
    try:
        with safetensors.safe_open(path, framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as exc:  # SafetensorError and friends: truncated, garbage, not safetensors
        why = f"{type(exc).__name__}: {shorten(str(exc))}"
        if corrupt is not None:
            raise corrupt(why) from exc
        raise error(f"{what} {shown!r} is not a safetensors file or is corrupted: {why}") from exc
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
