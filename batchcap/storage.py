"""Where data lives: local paths, and the object stores fsspec knows (``s3://``, ``gs://``, ``az://``, ``hf://``).

The one filesystem layer of batchcap. ``inputs.py`` reads manifests and walks prefixes with it,
``fetch.py`` reads items, ``output.py`` writes parts, the final table, the summary and the lock.

- **Which URLs**: the object stores of :data:`OBJECT_STORES` (and ``memory://``, fsspec's in-process
  store, for tests). http(s) stays with batchcap's own HTTP client (``fetch.py``); other fsspec
  protocols (``file``, ``zip``, ``sftp``, chained ``a::b`` URLs ...) are refused, so a manifest row
  can neither name a host to connect to nor reach around ``--root`` through a wrapper filesystem.
- **Credentials** come the standard way of each store, never from batchcap options or rows:
  environment (``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL``, ``GOOGLE_APPLICATION_CREDENTIALS``,
  ``AZURE_STORAGE_ACCOUNT_NAME`` / ``..._KEY``, ``HF_TOKEN``), config files (``~/.aws``, gcloud, fsspec's
  ``~/.config/fsspec``), instance roles. Every message that leaves this module goes through
  :func:`scrub`, which blanks the values of credential variables and signed-URL parameters.
- **Processes**: a filesystem object is created lazily, once per process (:func:`filesystem` keys its
  cache by pid), so nothing holding a client or credentials is ever pickled to a Ray worker: each
  worker builds its own from its own environment.
- **Writes**: a local file goes through :func:`batchcap.fsutil.atomic_write` (temp name, fsync,
  rename); an object is written with one PUT (an object store shows the old object or the new one,
  never part of it). :func:`create_exclusive` creates an object only if it is absent (S3's
  ``If-None-Match: *``, GCS's generation match, Azure's ``overwrite=False``) for the output lock.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import posixpath
import re
import threading
from collections.abc import Iterator
from typing import IO, Any

from .fsutil import atomic_path, atomic_write

log = logging.getLogger(__name__)

# scheme -> the extra that installs its fsspec backend (None: installed with batchcap)
OBJECT_STORES: dict[str, str | None] = {
    "s3": "s3", "s3a": "s3",
    "gs": "gcs", "gcs": "gcs",
    "az": "azure", "abfs": "azure", "abfss": "azure",
    "hf": None,
    "memory": None,  # fsspec's in-process store: tests, notebooks
}
_BACKENDS = {"s3": "s3fs", "gcs": "gcsfs", "azure": "adlfs"}
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")


class StorageError(OSError):
    """An object-store operation failed (an OSError, like a local I/O failure); ``message`` is one line,
    safe to log (no credentials)."""

    def __init__(self, message: str, *, retryable: bool = False, auth: bool = False, missing: bool = False):
        super().__init__(message)
        self.message = message
        self.retryable = retryable
        self.auth = auth  # credentials missing, wrong or not allowed: the same for every object of the store
        self.missing = missing


class TooLarge(Exception):
    """An object bigger than the caller's cap."""


# --- URLs ------------------------------------------------------------------------------------

def scheme(source: str) -> str | None:
    match = _SCHEME.match(source)
    return match.group(1).lower() if match else None


def is_remote(source: str) -> bool:
    """Whether ``source`` is a URL of an object store this module reads and writes."""
    return scheme(source) in OBJECT_STORES and "::" not in source


def join(base: str, *names: str) -> str:
    """``base`` / names, for paths and URLs alike."""
    if not is_remote(base):
        return os.path.join(base, *names)
    out = base.rstrip("/")
    for name in names:
        out += "/" + name.strip("/")
    return out


def resolve(base: str, relative: str) -> str:
    """A manifest's relative path against its remote prefix, ``..`` as in paths: the bucket is the root, so
    ``..`` stops there as at ``/`` (``../../other/x.png`` from ``s3://b/in/`` read another bucket's
    ``other/x.png``), and a leading ``/`` starts from the bucket's top."""
    head, _, rest = base.partition("://")
    bucket, _, prefix = rest.rstrip("/").partition("/")
    joined = posixpath.normpath(posixpath.join("/", prefix, relative))
    return f"{head}://{bucket}{joined}"


def parent(url: str) -> str:
    if not is_remote(url):
        return os.path.dirname(os.path.abspath(url))
    head, _, _ = url.rstrip("/").rpartition("/")
    return head if "://" in head and not head.endswith(":/") else url.rstrip("/")


def basename(url: str) -> str:
    return url.rstrip("/").rpartition("/")[2] if is_remote(url) else os.path.basename(url)


# --- secrets -----------------------------------------------------------------------------------

_SECRET_NAME = re.compile(r"(SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|ACCESS_KEY|ACCOUNT_KEY|STORAGE_KEY|SAS|"
                          r"CONNECTION_STRING|PRIVATE_KEY|API_KEY)", re.IGNORECASE)
_SECRET_PARAM = re.compile(r"((?:sig|signature|x-amz-signature|x-amz-credential|x-amz-security-token|"
                           r"x-goog-signature|x-goog-credential|token|access_token|sv|se|sp)=)[^&\s'\"]+",
                           re.IGNORECASE)


def scrub(text: str) -> str:
    """``text`` without credentials: values of credential-like environment variables (8+ characters) and
    the parameters of signed URLs / SAS tokens are replaced by ``***``."""
    for name, value in os.environ.items():
        if len(value) >= 8 and _SECRET_NAME.search(name) and value in text:
            text = text.replace(value, "***")
    return _SECRET_PARAM.sub(r"\1***", text)


# --- filesystems ---------------------------------------------------------------------------------

_FS: dict[tuple[int, str], Any] = {}
_FS_LOCK = threading.Lock()


def _defaults(protocol: str) -> dict[str, Any]:
    """batchcap's own defaults for a backend, where the user's fsspec config says nothing."""
    import fsspec.config

    user = fsspec.config.conf.get(protocol, {})
    if protocol in ("s3", "s3a") and "config_kwargs" not in user:
        # botocore pools 10 connections by default: fetch threads (64 for images) would queue on them
        return {"config_kwargs": {"max_pool_connections": 128}}
    return {}


def filesystem(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) for an object-store URL; one filesystem per protocol and process."""
    protocol = scheme(url)
    if protocol is None or not is_remote(url):
        raise StorageError(f"not an object-store URL: {url}")
    key = (os.getpid(), protocol)
    fs = _FS.get(key)
    if fs is None:
        with _FS_LOCK:
            fs = _FS.get(key)
            if fs is None:
                import fsspec

                try:
                    fs = fsspec.filesystem(protocol, **_defaults(protocol))
                except ImportError as exc:
                    extra = OBJECT_STORES.get(protocol)
                    hint = (f"pip install 'batchcap[{extra}]' (or {_BACKENDS[extra]})" if extra
                            else f"pip install the fsspec backend for {protocol}://")
                    raise StorageError(f"{protocol}:// URLs need {hint}") from exc
                except Exception as exc:  # a bad fsspec config, a backend that cannot start
                    raise StorageError(f"cannot open {protocol}:// storage: {describe(exc)}") from exc
                _FS[key] = fs
    return fs, fs._strip_protocol(url)


def reset() -> None:
    """Forget the filesystems of this process (tests that change credentials or endpoints)."""
    with _FS_LOCK:
        for fs in _FS.values():
            type(fs).clear_instance_cache()  # fsspec keeps its own instances, keyed by arguments only
        _FS.clear()


# --- errors --------------------------------------------------------------------------------------

_FINAL = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError, FileExistsError,
          ValueError, TypeError, NotImplementedError, ImportError)
_AUTH_NAMES = ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError",
               "DefaultCredentialsError", "ClientAuthenticationError", "RefreshError", "InvalidConfigError",
               "ProfileNotFound")


def describe(exc: BaseException) -> str:
    """One line about ``exc``, without credentials."""
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    name = type(exc).__name__
    return scrub(f"{name}: {first}" if first and name not in ("OSError", "FileNotFoundError", "PermissionError")
                 else first or name)


def classify(exc: BaseException, url: str) -> StorageError:
    """A :class:`StorageError` with a short, actionable message for ``exc`` raised on ``url``."""
    if isinstance(exc, StorageError):
        return exc
    name = type(exc).__name__
    detail = describe(exc)
    if isinstance(exc, FileNotFoundError):
        return StorageError(f"object not found: {url}", missing=True)
    if isinstance(exc, PermissionError) or name in _AUTH_NAMES:
        what = "no credentials found" if "Credentials" in name or "credentials" in detail.lower() else \
            f"access denied ({detail})" if detail and detail != "Forbidden" else "access denied"
        return StorageError(f"{what} for {url} ({_credential_hint(url)})", auth=True)
    if isinstance(exc, IsADirectoryError):
        return StorageError(f"is a folder (prefix), not an object: {url}")
    if isinstance(exc, _FINAL):
        return StorageError(f"cannot read {url}: {detail}")
    return StorageError(f"{detail} ({url})", retryable=True)


def _credential_hint(url: str) -> str:
    protocol = scheme(url) or ""
    if protocol in ("s3", "s3a"):
        return "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ~/.aws or the instance role"
    if protocol in ("gs", "gcs"):
        return "check GOOGLE_APPLICATION_CREDENTIALS or gcloud auth application-default login"
    if protocol in ("az", "abfs", "abfss"):
        return "check AZURE_STORAGE_ACCOUNT_NAME and AZURE_STORAGE_ACCOUNT_KEY / a SAS token / az login"
    if protocol == "hf":
        return "check HF_TOKEN or huggingface-cli login"
    return "check the store's credentials"


# --- reading -----------------------------------------------------------------------------------

def read_range(url: str, max_bytes: int | None = None, timeout: float | None = None) -> bytes:
    """The object's bytes, at most ``max_bytes`` (:class:`TooLarge` beyond), in one ranged GET where the
    store has ranges: the cap is enforced by the server, nothing past it is transferred. ``timeout``
    bounds the whole read on async backends (s3fs, gcsfs, adlfs). Raises :class:`StorageError`."""
    try:
        fs, path = filesystem(url)
        end = None if max_bytes is None else max_bytes + 1
        try:
            data = _call(fs, "cat_file", path, timeout, start=0 if end is not None else None, end=end)
        except OSError as exc:
            if exc.errno != errno.EINVAL or "range" not in str(exc).lower():
                raise
            # S3 answers a range over an empty object with 416 "range not satisfiable"
            if _call(fs, "size", path, timeout) != 0:
                raise
            data = b""
    except StorageError:
        raise
    except Exception as exc:  # noqa: BLE001 - backends raise anything; classify() sorts it
        if _is_timeout(exc):
            raise StorageError(f"timed out (not read within {timeout:g}s): {url}", retryable=True) from None
        error = classify(exc, url)
        if error.missing and _is_prefix(url):  # a manifest row naming a folder of objects: say so
            error = StorageError(f"is a folder (prefix), not an object: {url}")
        raise error from None
    if max_bytes is not None and len(data) > max_bytes:
        raise TooLarge(url)
    return bytes(data)


def _is_prefix(url: str) -> bool:
    """Whether ``url``, which is no object, is a prefix that holds objects (one listing, on failure only)."""
    try:
        found = info(url)
    except StorageError:
        return False
    return found is not None and found.get("type") == "directory"


def _call(fs: Any, method: str, path: str, timeout: float | None, **kwargs: Any) -> Any:
    """``fs.method(path, **kwargs)``, bounded by ``timeout`` on async filesystems (the coroutine is cancelled)."""
    if timeout is not None and getattr(fs, "async_impl", False) and getattr(fs, "loop", None) is not None:
        from fsspec.asyn import sync

        return sync(fs.loop, getattr(fs, "_" + method), path, timeout=max(0.001, timeout), **kwargs)
    return getattr(fs, method)(path, **kwargs)


def _is_timeout(exc: BaseException) -> bool:
    import asyncio

    from fsspec.exceptions import FSTimeoutError

    return isinstance(exc, (FSTimeoutError, asyncio.TimeoutError, TimeoutError))


@contextlib.contextmanager
def _classified(url: str) -> Iterator[None]:
    """Backends raise anything: a StorageError passes, everything else becomes one (see classify)."""
    try:
        yield
    except StorageError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise classify(exc, url) from None


def open_read(url: str) -> IO[bytes]:
    """A streaming binary file object on the object (for pyarrow, csv, copies)."""
    with _classified(url):
        fs, path = filesystem(url)
        return fs.open(path, "rb")


def info(url: str) -> dict[str, Any] | None:
    """The object's or prefix's metadata (``type`` is ``file`` or ``directory``), None if there is nothing."""
    try:
        fs, path = filesystem(url)
        fs.invalidate_cache(path)  # another process may have written it since this one listed its prefix
        return fs.info(path)
    except FileNotFoundError:
        return None
    except StorageError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise classify(exc, url) from None


def exists(target: str) -> bool:
    if not is_remote(target):
        return os.path.exists(target)
    return info(target) is not None


def is_file(url: str) -> bool:
    found = info(url)
    return found is not None and found.get("type") == "file"


def walk(url: str) -> Iterator[str]:
    """The objects under the prefix ``url``, as URLs, sorted, hidden names (a part starting with ``.``) skipped."""
    with _classified(url):
        fs, path = filesystem(url)
        fs.invalidate_cache(path.rstrip("/"))
        found = fs.find(path.rstrip("/"), withdirs=False, detail=False)
    root = path.rstrip("/")
    head = url.rstrip("/")
    for key in sorted(found):
        rel = key[len(root):].lstrip("/") if key.startswith(root) else key
        if not rel or any(part.startswith(".") for part in rel.split("/")):
            continue
        yield head + "/" + rel


def download(url: str, local: str) -> str:
    """Copy an object to the local file ``local`` (atomically: a crash leaves no half file)."""
    with _classified(url):
        fs, path = filesystem(url)
        with atomic_path(local) as tmp:
            fs.get_file(path, tmp)
    return local


# --- writing -----------------------------------------------------------------------------------

def write_bytes(target: str, data: bytes | str) -> str:
    """Write a whole file or object: locally through ``atomic_write``, remotely as one PUT."""
    if not is_remote(target):
        return atomic_write(target, data)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    with _classified(target):
        fs, path = filesystem(target)
        fs.pipe_file(path, payload)
    return target


def upload(local: str, url: str) -> str:
    """Copy the local file ``local`` to the object ``url`` (one PUT; a multipart upload for files over
    100 MiB, which the store also shows only once complete)."""
    with _classified(url):
        fs, path = filesystem(url)
        fs.put_file(local, path)
    return url


def remove(target: str, recursive: bool = False) -> None:
    """Remove a file / object (``recursive``: everything under the prefix); absent is fine."""
    if not is_remote(target):
        with contextlib.suppress(FileNotFoundError):
            os.remove(target)
        return
    with _classified(target), contextlib.suppress(FileNotFoundError):
        fs, path = filesystem(target)
        fs.rm(path, recursive=recursive)


class NoConditionalWrite(Exception):
    """The store cannot create an object only if it is absent."""


def create_exclusive(url: str, data: bytes) -> bool:
    """Create the object only if it does not exist: True if this call created it, False if it was there.

    Raises :class:`NoConditionalWrite` where the backend has no such write (the caller then falls back
    to a documented single-writer rule).
    """
    try:
        fs, path = filesystem(url)
        fs.pipe_file(path, data, mode="create")
        return True
    except FileExistsError:
        return False
    except (TypeError, NotImplementedError) as exc:
        raise NoConditionalWrite(describe(exc)) from None
    except StorageError:
        raise
    except Exception as exc:  # noqa: BLE001
        text = str(exc)
        if "PreconditionFailed" in text or "pre-condition" in text.lower() or "412" in text:
            return False
        if "NotImplemented" in text or "not implemented" in text.lower():
            raise NoConditionalWrite(describe(exc)) from None
        raise classify(exc, url) from None
