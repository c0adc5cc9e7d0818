"""Local files written with O_DIRECT (rayhooks.direct_io): exact bytes, a trimmed tail, the fallbacks."""

import errno
import os

import numpy as np
import pytest

from rayhooks import direct_io
from rayhooks.storage import Storage

needs_direct = pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT on this platform")


def _pieces(total, seed):
    """Writes of uneven sizes, as the bundle writer makes them (tensor by tensor, some tiny)."""
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, total, dtype=np.uint8)
    cuts = sorted(set(rng.integers(0, total + 1, 7).tolist()) | {0, total})
    return data, [data[a:b] for a, b in zip(cuts, cuts[1:])]


@needs_direct
@pytest.mark.parametrize("total", [0, 1, 4095, 4096, 4097, direct_io.STAGING_BYTES,
                                   2 * direct_io.STAGING_BYTES + 12345,
                                   (direct_io.IN_FLIGHT + 3) * direct_io.STAGING_BYTES + 7])  # buffers reused
def test_direct_file_holds_exactly_the_bytes_written(tmp_path, total):
    path = str(tmp_path / "f")
    data, pieces = _pieces(total, total)
    with direct_io.open_for_write(path) as f:
        assert isinstance(f, direct_io.DirectFile) and f.direct
        for piece in pieces:
            assert f.write(piece) == len(piece)
        assert f.tell() == total
    assert os.path.getsize(path) == total                    # the padded tail was trimmed
    assert np.array_equal(np.fromfile(path, np.uint8), data)


@needs_direct
def test_direct_file_takes_non_contiguous_and_bytes_like_input(tmp_path):
    path = str(tmp_path / "f")
    strided = np.arange(20, dtype=np.int32)[::2]
    with direct_io.open_for_write(path) as f:
        f.write(b"head")
        f.write(strided)
        f.write(bytearray(b"tail"))
    assert open(path, "rb").read() == b"head" + strided.tobytes() + b"tail"


@needs_direct
def test_a_failed_write_leaves_no_published_file_and_the_buffer_is_reused(tmp_path):
    storage = Storage(str(tmp_path))

    def producer(f):
        f.write(b"x" * 5000)
        raise RuntimeError("the producer failed half way")

    with pytest.raises(RuntimeError, match="half way"):
        storage.write_with("data", producer)
    assert os.listdir(tmp_path) == []
    storage.write_with("data", lambda f: f.write(b"y" * 5000))
    assert open(tmp_path / "data", "rb").read() == b"y" * 5000


def test_env_switch_gives_a_buffered_synced_file(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYHOOKS_DIRECT_IO", "0")
    path = str(tmp_path / "f")
    with direct_io.open_for_write(path) as f:
        assert not isinstance(f, direct_io.DirectFile)
        f.write(b"abc" * 1000)
    assert open(path, "rb").read() == b"abc" * 1000


@needs_direct
def test_a_filesystem_refusing_o_direct_at_open_gets_a_buffered_file(tmp_path, monkeypatch):
    # Every filesystem on this machine (ext4, tmpfs) takes O_DIRECT, so the refusal is simulated:
    # os.open raises EINVAL for the flag, as it does on filesystems without direct I/O.
    real_open = os.open

    def refusing_open(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument", path)
        return real_open(path, flags, *args)

    monkeypatch.setattr(direct_io.os, "open", refusing_open)
    path = str(tmp_path / "f")
    data, pieces = _pieces(3 * 4096 + 7, 3)
    with direct_io.open_for_write(path) as f:
        assert not isinstance(f, direct_io.DirectFile)
        for piece in pieces:
            f.write(piece)
    assert np.array_equal(np.fromfile(path, np.uint8), data)


@needs_direct
@pytest.mark.parametrize("in_flight", [1, 3])
def test_direct_writes_refused_after_open_go_on_buffered(tmp_path, monkeypatch, in_flight):
    # As above, simulated: some network and FUSE filesystems accept the flag at open and
    # fail every write on a file that has it with EINVAL. Writes already in flight when
    # the first is refused are refused too; every one must go on buffered.
    import fcntl
    import threading
    real_pwrite = os.pwrite
    refused = []
    # With several in flight, the first two refusals wait for each other: both were
    # issued with the flag still set, and both must then go on buffered.
    both = threading.Barrier(2, timeout=30) if in_flight > 1 else None

    def refusing_pwrite(fd, data, offset):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(offset)
            if both is not None and len(refused) <= 2:
                both.wait()
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(direct_io.os, "pwrite", refusing_pwrite)
    path = str(tmp_path / "f")
    data, pieces = _pieces(5 * direct_io.STAGING_BYTES + 100, 4)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    with direct_io.DirectFile(fd, path, in_flight) as f:
        for piece in pieces:
            f.write(piece)
    assert len(refused) >= (2 if in_flight > 1 else 1) and not f.direct
    assert np.array_equal(np.fromfile(path, np.uint8), data)


@needs_direct
def test_a_disk_error_in_a_background_write_reaches_the_writer(tmp_path, monkeypatch):
    # Simulated: a full disk (ENOSPC) on the third buffer, written by an I/O thread.
    real_pwrite = os.pwrite

    def failing_pwrite(fd, data, offset):
        if offset >= 2 * direct_io.STAGING_BYTES:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    storage = Storage(str(tmp_path))
    storage.write_with("warm", lambda f: f.write(b"w"))  # the staging buffers are in the pool now
    pooled = len(direct_io._pool)
    monkeypatch.setattr(direct_io.os, "pwrite", failing_pwrite)
    data = np.zeros((direct_io.IN_FLIGHT + 3) * direct_io.STAGING_BYTES, np.uint8)
    with pytest.raises(OSError) as raised:
        storage.write_with("data", lambda f: f.write(data))
    assert raised.value.errno == errno.ENOSPC
    assert os.listdir(tmp_path) == ["warm"]
    assert len(direct_io._pool) == pooled  # every staging buffer came back, none still being written
    monkeypatch.setattr(direct_io.os, "pwrite", real_pwrite)
    storage.write_with("data", lambda f: f.write(b"z" * 5000))
    assert open(tmp_path / "data", "rb").read() == b"z" * 5000
