"""Tier 1/2: `Storage` on file:// and memory://: atomic writes, retries, errors naming the URL."""

import errno
import os
import pathlib
import pickle

import pytest

import rayhooks as rh
from rayhooks.storage import is_transient

NO_WAIT = rh.RetryPolicy(initial_backoff=0)


def _storage(url, sleeps=None, retried=None, retry=NO_WAIT):
    return rh.Storage(url, retry=retry, sleep=(sleeps.append if sleeps is not None else lambda s: None),
                      on_retry=(lambda u, e: retried.append((u, e))) if retried is not None else None)


def test_round_trip(storage_url):
    st = rh.Storage(storage_url)
    assert st.listdir() == []
    assert not st.exists("a.bin")
    st.write_bytes("a.bin", b"hello")
    st.write_bytes("b.bin", b"")
    assert st.read_bytes("a.bin") == b"hello"
    assert st.size("a.bin") == 5
    assert st.exists("a.bin")
    assert st.listdir() == ["a.bin", "b.bin"]
    with st.open_read("a.bin") as f:
        assert f.read() == b"hello"
    st.delete(["a.bin", "never-existed"])
    assert st.listdir() == ["b.bin"]


def test_url_handling(storage_url, tmp_path):
    st = rh.Storage(storage_url + "/")
    assert st.url == storage_url
    assert st.url_of("x") == storage_url + "/x"
    assert st.child("sub").url == storage_url + "/sub"
    if storage_url.startswith("memory://"):
        assert st.local_root is None
    else:
        assert st.local_root == str(tmp_path / "run")
    assert rh.Storage(tmp_path).url == str(tmp_path)  # a PathLike is accepted as its str
    with pytest.raises(TypeError, match="must be a str"):
        rh.Storage(42)


def test_storage_pickles_after_use(storage_url):
    st = rh.Storage(storage_url)
    st.write_bytes("x", b"1")
    clone = pickle.loads(pickle.dumps(st))
    assert clone.url == st.url
    assert clone.read_bytes("x") == b"1"


def test_missing_file_error_names_the_url(storage_url):
    st = rh.Storage(storage_url)
    with pytest.raises(FileNotFoundError) as excinfo:
        st.read_bytes("nope")
    assert storage_url + "/nope" in str(excinfo.value)


def test_write_with_returns_the_producer_result(storage_url):
    st = rh.Storage(storage_url)
    assert st.write_with("f", lambda f: f.write(b"abc") and "done") == "done"
    assert st.read_bytes("f") == b"abc"


def test_failed_producer_leaves_no_file(storage_url):
    """A write is whole or absent: a producer that dies half way leaves neither the file nor a temp file."""
    st = rh.Storage(storage_url)
    st.makedirs()

    def producer(f):
        f.write(b"half of it")
        raise RuntimeError("producer died")

    with pytest.raises(Exception, match="producer died"):
        st.write_with("data", producer)
    assert st.listdir() == []
    assert not st.exists("data")


def test_failed_producer_keeps_the_old_file(storage_url, request):
    """A failed overwrite leaves the previous, complete version (the `checkpoint` state file and
    manifests are rewritten in place, so losing the old version un-commits checkpoints)."""
    st = rh.Storage(storage_url)
    st.write_bytes("data", b"old and complete")

    def producer(f):
        f.write(b"new but")
        raise RuntimeError("producer died")

    with pytest.raises(Exception, match="producer died"):
        st.write_with("data", producer)
    assert st.read_bytes("data") == b"old and complete"
    assert st.listdir() == ["data"]


def test_transient_errors_are_retried(storage_url):
    sleeps, retried, attempts = [], [], []
    st = _storage(storage_url, sleeps, retried)

    def producer(f):
        attempts.append(1)
        f.write(b"attempt %d" % len(attempts))
        if len(attempts) <= 2:
            raise ConnectionError("connection reset by peer")
        return "ok"

    assert st.write_with("obj", producer) == "ok"
    assert len(attempts) == 3
    assert len(sleeps) == 2
    assert [u for u, _ in retried] == [storage_url + "/obj"] * 2
    assert all(isinstance(e, ConnectionError) for _, e in retried)
    assert st.read_bytes("obj") == b"attempt 3"  # a retry restarts the object, never appends
    assert st.listdir() == ["obj"]


def test_retries_give_up_after_max_attempts(storage_url):
    sleeps, attempts = [], []
    st = _storage(storage_url, sleeps, retry=rh.RetryPolicy(max_attempts=3, initial_backoff=0))

    def producer(f):
        attempts.append(1)
        raise TimeoutError("read timed out")

    with pytest.raises(TimeoutError) as excinfo:
        st.write_with("obj", producer)
    assert len(attempts) == 3
    assert len(sleeps) == 2
    assert storage_url + "/obj" in str(excinfo.value)
    assert "3 attempt(s)" in str(excinfo.value)


@pytest.mark.parametrize("error", [ValueError("bad value"), PermissionError("403 Forbidden"),
                                   FileNotFoundError("no such bucket")])
def test_non_transient_errors_are_not_retried(storage_url, error):
    sleeps, attempts = [], []
    st = _storage(storage_url, sleeps)

    def producer(f):
        attempts.append(1)
        raise error

    with pytest.raises(type(error)) as excinfo:
        st.write_with("obj", producer)
    assert len(attempts) == 1
    assert sleeps == []
    assert storage_url + "/obj" in str(excinfo.value)
    assert str(error) in str(excinfo.value)


class _HttpError(Exception):
    def __init__(self, code):
        super().__init__("HTTP %d" % code)
        self.code = code


@pytest.mark.parametrize("error, transient", [
    (ConnectionResetError(), True),
    (ConnectionError(), True),
    (TimeoutError(), True),
    (OSError(errno.ECONNRESET, "reset"), True),
    (OSError(errno.ETIMEDOUT, "timed out"), True),
    (_HttpError(503), True),
    (_HttpError(429), True),
    (_HttpError(408), True),
    (_HttpError(404), False),
    (_HttpError(501), False),  # Not Implemented: the same request gets the same answer
    (_HttpError(403), False),
    (OSError(errno.ENOSPC, "disk full"), False),
    (FileNotFoundError(), False),
    (PermissionError(), False),
    (NotADirectoryError(), False),
    (ValueError(), False),
    (TypeError(), False),
    (RuntimeError(), False),
])
def test_is_transient(error, transient):
    assert is_transient(error) is transient


def test_gcsfs_not_implemented_is_not_retried_though_gcsfs_would():
    from gcsfs.retry import HttpError, is_retriable
    error = HttpError({"code": 501, "message": "Not Implemented"})
    assert is_retriable(error) and not is_transient(error)


def test_retry_policy_validation_and_backoff():
    with pytest.raises(ValueError, match="max_attempts must be >= 1"):
        rh.RetryPolicy(max_attempts=0)
    with pytest.raises(ValueError, match="backoffs must be >= 0"):
        rh.RetryPolicy(initial_backoff=-1)
    policy = rh.RetryPolicy(initial_backoff=1.0, max_backoff=5.0, multiplier=2.0)
    for attempt, base in [(0, 1.0), (1, 2.0), (2, 4.0), (3, 5.0), (10, 5.0)]:
        delay = policy.backoff(attempt)
        assert base / 2 <= delay <= base


def test_unknown_protocol_names_the_url():
    st = rh.Storage("nosuchproto://bucket/run")  # constructing does no I/O
    with pytest.raises(ValueError) as excinfo:
        st.exists()
    assert "nosuchproto://bucket/run" in str(excinfo.value)
    with pytest.raises(ValueError, match="nosuchproto://bucket/run"):
        st.check_writable()


def test_check_writable_leaves_nothing_behind(storage_url):
    st = rh.Storage(storage_url)
    st.check_writable()
    assert st.exists()
    assert st.listdir() == []


def test_check_writable_under_a_file_names_the_url(storage_url):
    """A directory that cannot be created (its parent is a file) fails at once, naming the URL."""
    rh.Storage(storage_url).write_bytes("afile", b"not a directory")
    bad = rh.Storage(storage_url + "/afile/run", retry=NO_WAIT, sleep=lambda s: None)
    with pytest.raises(OSError) as excinfo:
        bad.check_writable()
    assert storage_url + "/afile/run" in str(excinfo.value)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root ignores directory permissions; covered by the file-as-parent test")
def test_check_writable_permission_denied(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        url = str(locked / "run")
        with pytest.raises(PermissionError) as excinfo:
            rh.Storage(url).check_writable()
        assert url in str(excinfo.value)
        assert "not writable" in str(excinfo.value)
    finally:
        locked.chmod(0o700)


def test_get_to_local(storage_url, tmp_path):
    st = rh.Storage(storage_url)
    st.write_bytes("blob", b"\x00\x01\x02")
    target = tmp_path / "copy.bin"
    st.get_to_local("blob", str(target))
    assert pathlib.Path(target).read_bytes() == b"\x00\x01\x02"


def _s3_error(code, status):
    """The exception s3fs raises for an S3 error response, made by s3fs' own translation.

    moto's server cannot be made to answer 5xx or throttle, so these faults are not
    caused for real: the response is built, and s3fs turns it into what rayhooks sees.
    """
    pytest.importorskip("s3fs")
    from botocore.exceptions import ClientError
    from s3fs.errors import translate_boto_error
    response = {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}
    return translate_boto_error(ClientError(response, "PutObject"))


@pytest.mark.parametrize("code, status, transient", [
    ("InternalError", 500, True),
    ("SlowDown", 503, True),
    ("ServiceUnavailable", 503, True),
    ("RequestTimeout", 400, True),
    ("OperationAborted", 409, True),
    ("NoSuchBucket", 404, False),
    ("AccessDenied", 403, False),
    ("InvalidArgument", 400, False),
    ("EntityTooSmall", 400, False),
])
def test_s3_error_responses_are_retried_when_s3_says_to(code, status, transient):
    assert is_transient(_s3_error(code, status)) is transient


def test_a_checksum_read_retried_part_way_counts_its_bytes_once(memory_url):
    """The read fails once after its first chunk, a connection reset that cannot be caused for real on
    memory:// (the file object is wrapped to raise it); the retry reads from the start, and a progress
    bar fed by on_bytes ends at the file's size, not above."""
    import google_crc32c
    st = rh.Storage(memory_url, retry=rh.RetryPolicy(max_attempts=3, initial_backoff=0), sleep=lambda s: None)
    data = bytes(range(256)) * (80 << 10)  # 20 MB: more than one 8 MB chunk
    st.write_bytes("f", data)
    opened, counted = [], []
    real_open = st.fs.open

    class CutAfterOneChunk:
        def __init__(self, f):
            self.f, self.reads = f, 0

        def readinto(self, buf):
            self.reads += 1
            if self.reads == 2:
                raise ConnectionError("connection reset by peer")
            return self.f.readinto(buf)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def open_cut_once(path, mode="rb", **kwargs):
        opened.append(path)
        f = real_open(path, mode, **kwargs)
        return CutAfterOneChunk(f) if len(opened) == 1 else f
    st.fs.open = open_cut_once
    try:
        crc, size = st.crc32c("f", counted.append, copy_to=None)
    finally:
        del st.fs.open
    assert len(opened) == 2 and size == len(data) and crc == google_crc32c.value(data)
    assert sum(counted) == len(data) and min(counted) < 0  # the cut attempt's bytes taken back
