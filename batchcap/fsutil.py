"""One way to write a file so that readers see the old content or the new, never half of it."""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import tempfile
from collections.abc import Callable, Iterator
from typing import IO, Any

_TEMP_SUFFIX = ".tmp"
_TEMP_TOKEN_BYTES = 6  # random bytes in a temporary name, written in hex


def temp_name(target_name: str, token: str | None = None) -> str:
    """The name :func:`atomic_path` writes ``target_name`` under first: ``.NAME.<12 hex digits>.tmp``
    (``token`` in place of the random digits: a name as long as a real one, for length checks)."""
    token = secrets.token_hex(_TEMP_TOKEN_BYTES) if token is None else token
    return f".{target_name}.{token}{_TEMP_SUFFIX}"


def longest_temp_name(target_name: str) -> str:
    """A name exactly as long as any temporary name of ``target_name``."""
    return temp_name(target_name, "0" * (2 * _TEMP_TOKEN_BYTES))


@contextlib.contextmanager
def atomic_path(target: str) -> Iterator[str]:
    """A unique temporary path beside ``target``; on success it is fsynced and renamed over it.

    On any error the temporary file is removed and ``target`` is left as it was. The name is unique
    (created exclusively), so concurrent writers of the same target never clobber each other's temp file.
    The file gets the permissions of any new file (0666 less the umask: 0644 usually), not mkstemp's 0600.
    ``target`` may be an object-store URL (``s3://...``, see storage.py): the file is then written in
    the local temp folder and uploaded whole on success (one PUT: the object appears complete or not).
    """
    from . import storage  # here: storage imports this module

    if storage.is_remote(target):
        with _staged_upload(target) as tmp:
            yield tmp
        return
    directory = os.path.dirname(os.path.abspath(target)) or "."
    tmp = _create_unique(directory, os.path.basename(target))
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(directory)


def _create_unique(directory: str, target_name: str) -> str:
    """Create an empty file with a temporary name of ``target_name`` (:func:`temp_name`) no one else has in
    ``directory``, as ``open`` would create it (mode 0666, less the process's umask), and return its path."""
    for _ in range(100):
        path = os.path.join(directory, temp_name(target_name))
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return path
    raise FileExistsError(errno.EEXIST, "no unique temporary name left", os.path.join(directory, target_name))


@contextlib.contextmanager
def _staged_upload(target: str) -> Iterator[str]:
    from . import storage

    fd, tmp = tempfile.mkstemp(prefix="batchcap-upload-", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        storage.upload(tmp, target)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def atomic_write(target: str, data: str | bytes | Callable[[IO[Any]], None], *, encoding: str = "utf-8") -> str:
    """Write ``data`` (text, bytes, or a function that writes to the open file) to ``target`` atomically."""
    with atomic_path(target) as tmp:
        if callable(data):
            with open(tmp, "wb") as f:
                data(f)
        elif isinstance(data, bytes):
            with open(tmp, "wb") as f:
                f.write(data)
        else:
            with open(tmp, "w", encoding=encoding, newline="") as f:
                f.write(data)
    return target


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(directory: str) -> None:
    """Make a rename in ``directory`` durable (a no-op where directories cannot be opened)."""
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
