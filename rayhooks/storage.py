"""One narrow interface over fsspec, with `str` URLs and retries.

Every path is a URL string (`gs://b/run`, `s3://b/run`, `memory://run`,
`file:///tmp/run` or a bare local path). A `pathlib.Path` would collapse the
`//` of `gs://`, so nothing here takes one.

Writes are whole-object: a file becomes visible complete or not at all. Object
stores give that for free (an upload is finalised at close); on a local disk the
bytes go to a temporary name in the same directory and are renamed into place.
Transient errors (HTTP 5xx/408/429, connection resets, timeouts) are retried
with exponential backoff; anything else is raised at once as a builtin
exception naming the URL.
"""

import contextlib
import dataclasses
import errno
import logging
import os
import random
import shutil
import tempfile
import time
import uuid
from typing import Callable, Iterable, List, Optional

import fsspec
import fsspec.callbacks

from rayhooks import direct_io

_READ_CHUNK = 8 << 20

logger = logging.getLogger("rayhooks")

# Parts of a streamed upload to an object store. gcsfs and s3fs default to 5 MB, one
# request (a round trip) each; 32 MB parts bring a 64 MB checkpoint to 0.94x a single
# PUT of the same bytes (benchmarks/bench_storage.py), for 32 MB of buffer per upload.
_UPLOAD_PART_BYTES = 32 << 20

# S3 error codes AWS documents as worth retrying whatever their HTTP status.
_S3_RETRY_CODES = {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttling",
                   "ThrottlingException", "OperationAborted"}

_TRANSIENT_ERRNOS = {errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.EPIPE,
                     errno.ETIMEDOUT, errno.EAGAIN, errno.EHOSTUNREACH, errno.ENETUNREACH}


def _credentials_help(url: str, exc: BaseException) -> str:
    if url.startswith(("gs://", "gcs://")):
        fix = ("set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file, or run "
               "`gcloud auth application-default login`, or pass storage_options={'token': '/path/key.json'}")
    elif url.startswith(("s3://", "s3a://")):
        fix = ("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or AWS_PROFILE, or pass "
               "storage_options={'key': ..., 'secret': ...}")
    else:
        fix = "pass the store's credentials in storage_options"
    return "no usable credentials (%s); %s. Nothing was written." % (exc, fix)


# gcsfs `token=` values that name a method rather than a key file.
_GCS_TOKEN_METHODS = {"google_default", "cache", "anon", "browser", "cloud"}


def is_credentials_error(exc: BaseException) -> bool:
    """True when the store refused us for want of credentials, which no retry cures."""
    for module, names in (("google.auth.exceptions", ("DefaultCredentialsError", "RefreshError")),
                          ("botocore.exceptions", ("NoCredentialsError", "PartialCredentialsError"))):
        try:
            mod = __import__(module, fromlist=list(names))
        except ImportError:
            continue
        if isinstance(exc, tuple(getattr(mod, n) for n in names if hasattr(mod, n))):
            return True
    code = getattr(exc, "code", None) or getattr(exc, "status", None)
    return code == 401


def is_transient(exc: BaseException) -> bool:
    """True for errors a retry can cure: server-side 5xx, throttling, dropped connections."""
    if is_credentials_error(exc):
        return False
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError,
                        NotADirectoryError, FileExistsError, ValueError, TypeError)):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    try:
        import botocore.exceptions as boto
        # s3fs raises these as botocore made them: a refused or dropped connection, a read timeout.
        if isinstance(exc, (boto.ConnectionError, boto.HTTPClientError)) and not isinstance(exc, boto.SSLError):
            return True
        # S3's error responses s3fs turns into a bare OSError (EIO, EBUSY, EREMOTEIO), with
        # the response as its cause: 5xx (InternalError, SlowDown), throttling, timeouts.
        if isinstance(exc.__cause__, boto.ClientError):
            response = exc.__cause__.response or {}
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if isinstance(status, int) and (status >= 500 and status != 501 or status in (408, 429)) or \
                    response.get("Error", {}).get("Code") in _S3_RETRY_CODES:
                return True
    except ImportError:  # s3fs is optional at run time for non-S3 users
        pass
    try:
        from gcsfs.retry import HttpError, is_retriable
        if isinstance(exc, HttpError) and exc.code == 501:
            return False  # Not Implemented (an emulator's answer to a request it lacks): no retry cures it
        if isinstance(exc, HttpError) or is_retriable(exc):
            return is_retriable(exc)
    except ImportError:  # gcsfs is optional at run time for non-GCS users
        pass
    try:
        import aiohttp
        if isinstance(exc, aiohttp.ClientError):
            return True
    except ImportError:
        pass
    code = getattr(exc, "code", None) or getattr(exc, "status", None)
    if isinstance(code, int) and (code >= 500 and code != 501 or code in (408, 429)):
        return True
    return isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """How transient storage errors are retried: `max_attempts` tries in all."""

    max_attempts: int = 5
    initial_backoff: float = 0.2
    max_backoff: float = 10.0
    multiplier: float = 2.0

    def __post_init__(self):
        if self.max_attempts < 1:
            raise ValueError("RetryPolicy.max_attempts must be >= 1, got %r; use 1 to disable retries."
                             % self.max_attempts)
        if self.initial_backoff < 0 or self.max_backoff < 0:
            raise ValueError("RetryPolicy backoffs must be >= 0 seconds.")
        if self.max_backoff < self.initial_backoff:
            raise ValueError("RetryPolicy.initial_backoff (%r s) is above max_backoff (%r s%s), which caps every "
                             "backoff; raise max_backoff with it"
                             % (self.initial_backoff, self.max_backoff,
                                ", the default" if self.max_backoff == RetryPolicy.max_backoff else ""))

    def backoff(self, attempt: int) -> float:
        base = min(self.max_backoff, self.initial_backoff * self.multiplier ** attempt)
        return base * (0.5 + random.random() / 2)  # jitter: workers must not retry in lockstep


class Storage:
    """A directory at a URL. Constructing one does no I/O."""

    def __init__(self, url: str, storage_options: Optional[dict] = None,
                 retry: Optional[RetryPolicy] = None, sleep: Callable[[float], None] = time.sleep,
                 on_retry: Optional[Callable[[str, BaseException], None]] = None):
        if not isinstance(url, str):
            if isinstance(url, os.PathLike):
                url = os.fspath(url)
            else:
                raise TypeError("storage URL must be a str such as 'gs://bucket/run' or '/tmp/run', got %r"
                                % (url,))
        self.url = url.rstrip("/") if len(url) > 1 else url
        self.storage_options = dict(storage_options or {})
        if retry is not None and not isinstance(retry, RetryPolicy):
            raise TypeError("retry= takes an rh.RetryPolicy(...), got a %s" % type(retry).__name__)
        self.retry = retry or RetryPolicy()
        self._sleep = sleep
        self._on_retry = on_retry
        self._fs = None
        self._root = None

    def __repr__(self):
        return "Storage(%r)" % self.url

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_fs"] = None  # filesystems hold sockets and event loops; rebuild after pickling
        state["_root"] = None
        return state

    # -- resolution -----------------------------------------------------------

    @property
    def fs(self):
        if self._fs is None:
            _check_token_file(self.url, self.storage_options)
            try:
                self._fs, self._root = fsspec.core.url_to_fs(self.url, **self.storage_options)
            except Exception as e:
                if is_credentials_error(e):
                    raise PermissionError("%s: %s" % (self.url, _credentials_help(self.url, e))) from e
                if not isinstance(e, (ValueError, ImportError)):
                    raise
                self._url_to_fs_error(e)
            self._root = self._root.rstrip("/") or self._root
        return self._fs

    def _url_to_fs_error(self, e):
        if isinstance(e, ValueError):
            raise ValueError("%s: %s. Use a URL such as gs://bucket/dir, s3://bucket/dir, "
                             "memory://dir, file:///dir or a local path, and install the "
                             "fsspec implementation for its protocol." % (self.url, e)) from e
        raise ImportError("%s: the fsspec implementation for this protocol is not installed "
                          "(%s); pip install it (gcsfs for gs://, s3fs for s3://)."
                          % (self.url, e)) from e

    @property
    def _is_s3(self) -> bool:
        return bool({"s3", "s3a"} & set(_protocols(self.fs)))

    @property
    def is_local(self) -> bool:
        return "file" in _protocols(self.fs)

    def same_directory(self, other: "Storage") -> bool:
        """Whether `other` names this directory, however spelled ("/x", "file:///x", "./x")."""
        if other.url == self.url:
            return True
        try:
            return set(_protocols(self.fs)) == set(_protocols(other.fs)) and self._path("") == other._path("")
        except Exception:  # noqa: BLE001 -- an unresolvable URL fails later, with its own message
            return False

    @property
    def local_root(self) -> Optional[str]:
        """The directory on this machine, for a local URL; else None."""
        return self._path("") if self.is_local else None

    def _path(self, name: str) -> str:
        self.fs  # noqa: B018 -- sets _root, from the URL, on first use
        return self._root if not name else "%s/%s" % (self._root, name)

    def url_of(self, name: str = "") -> str:
        return self.url if not name else "%s/%s" % (self.url, name)

    def child(self, name: str) -> "Storage":
        return Storage(self.url_of(name), self.storage_options, self.retry, self._sleep, self._on_retry)

    # -- retries --------------------------------------------------------------

    def call(self, what: str, name: str, fn: Callable, *args, **kwargs):
        """Runs `fn`, retrying transient errors; raises with the URL in the message."""
        attempt = 0
        while True:
            try:
                return fn(*args, **kwargs)
            except Exception as exc:  # classified below; non-transient ones re-raise unchanged in kind
                attempt += 1
                if not is_transient(exc) or attempt >= self.retry.max_attempts:
                    raise _with_url(exc, what, self.url_of(name), attempt) from exc
                delay = self.retry.backoff(attempt - 1)
                logger.warning("transient error on %s %s (attempt %d/%d), retrying in %.2fs: %r",
                               what, self.url_of(name), attempt, self.retry.max_attempts, delay, exc)
                if self._on_retry is not None:
                    self._on_retry(self.url_of(name), exc)
                self._sleep(delay)

    # -- operations -----------------------------------------------------------

    def makedirs(self) -> None:
        if self._is_s3:
            return  # S3 has no directories, and s3fs' makedirs creates a missing (misspelt) bucket
        self.call("makedirs", "", self.fs.makedirs, self._path(""), exist_ok=True)

    def write_with(self, name: str, producer: Callable, fresh: bool = False) -> object:
        """Creates `name` from `producer(fileobj)`, atomically; the whole write is retried.

        The producer must be able to run again from the start: a retry restarts
        the object, it never appends to a half-written one. `fresh=True` says
        no complete object of that name exists yet (a new checkpoint's data), so
        an object store may stream straight to it; otherwise the bytes are
        spooled first, and a failing producer leaves the old object untouched.
        """
        return self.call("write", name, self._write_once, name, producer, fresh)

    def _write_once(self, name, producer, fresh=True):
        path = self._path(name)
        if self.is_local:
            tmp = "%s.tmp-%s" % (path, uuid.uuid4().hex[:12])
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            try:
                with direct_io.open_for_write(tmp) as f:  # durable at close: fsynced
                    result = producer(f)
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(tmp)
                raise
            return result
        if not fresh:
            with tempfile.TemporaryFile(prefix="rayhooks-spool-") as spool:
                result = producer(spool)
                spool.seek(0)
                return self._write_once(name, lambda f: (shutil.copyfileobj(spool, f, 8 << 20), result)[1])
        f = self.fs.open(path, "wb", block_size=_UPLOAD_PART_BYTES)
        try:
            result = producer(f)
            f.close()  # uploads the last part and completes the upload: it can fail as well
        except BaseException:
            # Closing would publish the partial object; cancelling the upload
            # leaves whatever was there before untouched.
            with contextlib.suppress(Exception):
                f.discard()
            with contextlib.suppress(AttributeError):  # memory:// files are BytesIO: closed is read-only
                f.closed = True  # a discard that failed must not become a publish from the file's __del__
            raise
        return result

    def sync_directory(self) -> None:
        """Makes the names that local writes here gave durable: a power cut no longer loses a rename.

        A file's fsync keeps its bytes, not its name in the directory. On an object
        store a completed write is durable already, and this does nothing.
        """
        if not self.is_local:
            return
        self.call("sync", "", self._sync_directory_once)

    def _sync_directory_once(self) -> None:
        try:
            fd = os.open(self._path(""), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except (IsADirectoryError, PermissionError):  # a platform that cannot open a directory (Windows)
            return
        try:
            os.fsync(fd)
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF):
                raise  # EIO and the like: the disk did not take it
            # A filesystem that cannot sync a directory (EINVAL): its renames are as durable as it makes them.
        finally:
            os.close(fd)

    def write_bytes(self, name: str, data: bytes) -> None:
        """Writes a small object whole: one PUT on an object store, so a failure changes nothing."""
        if self.is_local:
            self.write_with(name, lambda f: f.write(data))
        else:
            self.call("write", name, self.fs.pipe_file, self._path(name), data)

    def read_bytes(self, name: str) -> bytes:
        return self.call("read", name, self.fs.cat_file, self._path(name))

    def open_read(self, name: str):
        return self.call("open", name, self.fs.open, self._path(name), "rb")

    def exists(self, name: str = "") -> bool:
        return self.call("stat", name, self.fs.exists, self._path(name))

    def size(self, name: str) -> int:
        return self.call("stat", name, self.fs.size, self._path(name))

    def listdir(self) -> List[str]:
        """Names of the files directly under this directory ([] if it does not exist)."""
        try:
            entries = self.call("list", "", self.fs.ls, self._path(""), detail=False)
        except FileNotFoundError:
            return []
        self.fs.invalidate_cache(self._path(""))
        return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries)

    def delete(self, names: Iterable[str]) -> None:
        for name in names:
            try:
                self.call("delete", name, self.fs.rm, self._path(name))
            except FileNotFoundError:
                pass

    def open_uploads(self) -> List[tuple]:
        """S3: the multipart uploads begun directly under this directory and neither completed
        nor aborted, as (name, upload id, when begun in seconds since the epoch). Elsewhere [].

        A write that fails aborts its upload, but not when S3 could not be reached
        then; AWS keeps (and bills) an open upload's parts until it is aborted.
        GCS expires an unfinished resumable upload by itself.
        """
        if not self._is_s3:
            return []
        bucket, _, key = self._path("").partition("/")
        prefix = key + "/" if key else ""
        uploads, page = [], {}
        while True:  # S3 lists 1000 uploads a page
            try:
                listing = self.call("list", "", self.fs.call_s3, "list_multipart_uploads",
                                    Bucket=bucket, Prefix=prefix, **page)
            except PermissionError as e:
                # s3:ListBucketMultipartUploads is a permission of its own, which least-privilege
                # policies (Get/Put/DeleteObject, ListBucket) leave out: nothing to abort then.
                logger.info("%s: unfinished multipart uploads cannot be listed (%s); none aborted", self.url, e)
                return []
            uploads += listing.get("Uploads", [])
            if not listing.get("IsTruncated"):
                break
            page = {"KeyMarker": listing["NextKeyMarker"], "UploadIdMarker": listing["NextUploadIdMarker"]}
        return [(u["Key"][len(prefix):], u["UploadId"], u["Initiated"].timestamp())
                for u in uploads if "/" not in u["Key"][len(prefix):]]

    def abort_upload(self, name: str, upload_id: str) -> None:
        bucket, _, key = self._path(name).partition("/")
        self.call("abort", name, self.fs.abort_mpu, bucket, key, upload_id)

    def abort_uploads(self, doomed: Callable[[str], bool]) -> List[str]:
        """Aborts the open uploads (see `open_uploads`) whose name `doomed(name)` accepts."""
        aborted = []
        for name, upload_id, _ in self.open_uploads():
            if doomed(name):
                self.abort_upload(name, upload_id)
                aborted.append(name)
        return aborted

    def crc32c(self, name: str, on_bytes=None, copy_to: Optional[str] = None) -> tuple:
        """(crc32c, size) of `name`, read once; with `copy_to`, also written to that local path.

        Retried as a whole: a download cut short starts over, checksum and copy both.
        """
        return self.call("download" if copy_to else "read", name, self._crc32c_once, name, on_bytes, copy_to)

    def _crc32c_once(self, name, on_bytes, copy_to):
        if on_bytes is None:
            return self._crc32c_read(name, None, copy_to)
        counted = [0]

        def count(n):
            counted[0] += n
            on_bytes(n)
        try:
            return self._crc32c_read(name, count, copy_to)
        except BaseException:
            if counted[0]:
                on_bytes(-counted[0])  # a retry reads them again: a progress bar must not pass 100%
            raise

    def _crc32c_read(self, name, on_bytes, copy_to):
        import google_crc32c
        import numpy as np
        crc, size = 0, 0
        # Into one reused buffer: a new 8 MB bytes object per chunk costs more than the checksum
        # (its pages are fresh each time); 2.5x faster for a file in the page cache.
        buf = np.empty(_READ_CHUNK, np.uint8)
        with contextlib.ExitStack() as stack:
            f = stack.enter_context(self.fs.open(self._path(name), "rb"))
            out = stack.enter_context(open(copy_to, "wb")) if copy_to else None
            readinto = getattr(f, "readinto", None)
            while True:
                if readinto is not None:
                    n = readinto(buf)
                    chunk = buf[:n]
                else:
                    chunk = f.read(_READ_CHUNK)
                    n = len(chunk)
                if not n:
                    break
                crc = google_crc32c.extend(crc, chunk)
                if out is not None:
                    out.write(chunk)
                size += n
                if on_bytes is not None:
                    on_bytes(n)
        return crc, size

    def get_to_local(self, name: str, local_path: str, on_bytes=None) -> None:
        """Downloads `name`; `on_bytes(n)` hears of the bytes as they arrive."""
        kwargs = {} if on_bytes is None else {"callback": _BytesCallback(on_bytes)}
        self.call("download", name, self.fs.get_file, self._path(name), local_path, **kwargs)

    def check_writable(self) -> None:
        """Fails now, with the URL and a fix, if this directory cannot be written.

        Called from `begin()` so that a typo in a bucket name fails the run at
        once rather than minutes later in a background thread.
        """
        probe = ".rayhooks-probe-%s" % uuid.uuid4().hex[:12]
        self.fs  # noqa: B018 -- a missing-credentials error already says what to do; raise it as is
        try:
            self.makedirs()
            self.write_bytes(probe, b"ok")
            self.delete([probe])
        except PermissionError as e:
            raise PermissionError("%s is not writable (%s); check the credentials of this process "
                                  "and the bucket's or directory's permissions." % (self.url, e)) from e
        except FileNotFoundError as e:
            where = ("that its parent directories can be made" if self.is_local else
                     "that the bucket exists")
            raise FileNotFoundError("%s cannot be created (%s); check %s and the URL is spelled right."
                                    % (self.url, e, where)) from e
        except OSError as e:
            if isinstance(e, (ConnectionError, TimeoutError)) or "connect" in str(e).lower():
                fix = ("check the endpoint, the network and the proxy settings of this process (for an emulator: "
                       "STORAGE_EMULATOR_HOST, or endpoint_url in storage_options)")
            elif self.is_local:
                fix = "check that it is a directory (not a file) on a filesystem this process may write"
            else:
                fix = "check the URL, the bucket and the store's status"
            message = "%s is not writable (%s); %s." % (self.url, e, fix)
            try:
                error = type(e)(message) if type(e).__module__ == "builtins" else OSError(message)
            except TypeError:  # a subclass that wants other arguments
                error = OSError(message)
            raise error from e


class _BytesCallback(fsspec.callbacks.Callback):
    """fsspec's transfer callback, forwarding each increment of bytes to `on_bytes`."""

    def __init__(self, on_bytes):
        super().__init__()
        self._on_bytes = on_bytes

    def relative_update(self, inc=1):
        super().relative_update(inc)
        self._on_bytes(inc)

    def absolute_update(self, value):
        inc = value - (self.value or 0)
        super().absolute_update(value)
        if inc > 0:
            self._on_bytes(inc)


def _protocols(fs) -> tuple:
    proto = fs.protocol
    return (proto,) if isinstance(proto, str) else tuple(proto)


def _check_token_file(url: str, storage_options: dict) -> None:
    """A gcsfs `token` that names a missing key file: say so, rather than let gcsfs send the path as a token."""
    token = storage_options.get("token")
    if (isinstance(token, str) and token not in _GCS_TOKEN_METHODS
            and (token.endswith(".json") or os.sep in token) and not os.path.exists(token)):
        raise FileNotFoundError("%s: the credentials file storage_options['token']=%r does not exist; "
                                "pass the path of a service-account key file, or 'google_default'."
                                % (url, token))


def _with_url(exc: BaseException, what: str, url: str, attempts: int) -> BaseException:
    """The same kind of exception and errno, with the URL and attempt count in its message."""
    if is_credentials_error(exc):
        return PermissionError("%s %s: %s" % (what, url, _credentials_help(url, exc)))
    detail = str(exc)
    if isinstance(exc, OSError) and exc.errno is not None:
        detail = detail.replace("[Errno %d] " % exc.errno, "", 1)  # the new error carries the errno itself
    msg = "%s %s failed after %d attempt(s): %s" % (what, url, attempts, detail)
    if url in detail:
        msg = "%s failed after %d attempt(s): %s" % (what, attempts, detail)
    if type(exc).__module__ == "builtins":
        try:
            # The same builtin kind, and errno, so callers can still tell errors apart (ENOSPC).
            if isinstance(exc, OSError) and exc.errno is not None:
                return type(exc)(exc.errno, msg)
            return type(exc)(msg)
        except TypeError:
            pass
    return OSError(msg)
