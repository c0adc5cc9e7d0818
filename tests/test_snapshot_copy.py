"""The snapshot copy (`snapshot.copy_all`): from `_SPLIT_BYTES` on, two threads share the bytes.

No TensorFlow here: the copy is plain numpy, and NumpySaver uses it as it is.
`_SPLIT_BYTES` is lowered so the arrays stay small, and the process is told it
may use two cores, which CI's machine has anyway.
"""

import threading

import numpy as np
import pytest

import rayhooks as rh
from rayhooks import snapshot


@pytest.fixture
def split(monkeypatch):
    """Copies from 4 KB on are split; records which thread copied how many bytes."""
    monkeypatch.setattr(snapshot, "_SPLIT_BYTES", 4096)
    monkeypatch.setattr(snapshot, "_copy_threads", lambda: 2)
    copied = {}
    real = snapshot._copy_pairs

    def recording(pairs):
        name = threading.current_thread().name
        copied[name] = copied.get(name, 0) + sum(dst.nbytes for dst, _ in pairs)
        real(pairs)
    monkeypatch.setattr(snapshot, "_copy_pairs", recording)
    return copied


def _pairs(sources):
    return [(np.empty(src.shape, src.dtype), src) for src in sources]


def test_large_copies_are_shared_by_two_threads_byte_for_byte(split):
    rng = np.random.default_rng(0)
    sources = [rng.standard_normal((60, 40))[:, ::2],                    # 9600 B, not contiguous
               rng.standard_normal(300).astype(np.float32),              # 1200 B
               rng.integers(0, 1 << 40, size=(40, 50)),                  # 16000 B: straddles the middle
               np.arange(24, dtype=np.int16).reshape(2, 3, 4),
               np.float64(3.5) * np.ones(()),                            # 0-d
               rng.standard_normal(1000)]
    pairs = _pairs(sources)
    total = sum(dst.nbytes for dst, _ in pairs)
    snapshot.copy_all(pairs, total)
    for (dst, _), src in zip(pairs, sources):
        np.testing.assert_array_equal(dst, src)
        assert dst.flags.owndata
    main = threading.main_thread().name
    assert set(split) == {main, next(n for n in split if n.startswith("rayhooks-copy"))}
    assert sum(split.values()) == total
    # The straddling array is cut at the middle, to the element.
    assert abs(split[main] - total // 2) < 8


def test_a_straddling_array_that_is_not_contiguous_goes_whole_to_the_second_thread(split):
    src = np.arange(4000, dtype=np.float64).reshape(100, 40)[:, ::2]  # 16 KB, strided
    pairs = _pairs([np.ones(100), src])
    snapshot.copy_all(pairs, sum(dst.nbytes for dst, _ in pairs))
    np.testing.assert_array_equal(pairs[1][0], src)
    assert split[threading.main_thread().name] == 800


def test_small_copies_stay_on_the_calling_thread(split):
    pairs = _pairs([np.ones(100), np.arange(50)])
    snapshot.copy_all(pairs, 4095)
    assert list(split) == [threading.main_thread().name]
    np.testing.assert_array_equal(pairs[1][0], np.arange(50))


def test_a_failed_copy_raises_only_once_the_other_half_is_done(split, monkeypatch):
    # A copy that cannot fail for real here (both sides are ours): a dtype mismatch
    # stands in for it, so this thread's half raises while the other half copies.
    other_done = threading.Event()
    real = snapshot._copy_pairs

    def copy(pairs):
        if threading.current_thread() is not threading.main_thread():
            real(pairs)
            other_done.set()
            return
        real(pairs)
    monkeypatch.setattr(snapshot, "_copy_pairs", copy)
    pairs = [(np.empty(2000, np.float32), np.ones(2000, np.float64)), (np.empty(2000), np.ones(2000))]
    with pytest.raises(TypeError):
        snapshot.copy_all(pairs, 8000 + 16000)
    assert other_done.is_set(), "the buffers were handed back while the other thread still wrote them"


def test_numpy_saver_snapshot_of_a_split_state_is_exact_and_reuses_its_buffers(split):
    arrays = {"w": np.arange(5000, dtype=np.float32), "b": np.full((30, 30), 2.0), "n": np.int64(7) * np.ones(())}
    saver = rh.NumpySaver(arrays)
    first = saver.snapshot()
    held = dict(first.tensors)
    arrays["w"] += 1  # after the snapshot: it must not show
    for key in ("w", "b", "n"):
        expected = np.arange(5000, dtype=np.float32) if key == "w" else np.asarray(arrays[key])
        np.testing.assert_array_equal(held[key], expected)
    assert len(split) == 2
    first.done()
    second = saver.snapshot()
    assert second.tensors["w"] is held["w"]
    np.testing.assert_array_equal(second.tensors["w"], np.arange(5000, dtype=np.float32) + 1)
    second.done()


def _in_forked_child(work):
    """Runs `work` in a child made by fork; its exit code, or None if it hung for 60 s."""
    import multiprocessing
    child = multiprocessing.get_context("fork").Process(target=work)
    child.start()
    child.join(60)
    if child.exitcode is None:
        child.kill()
        child.join()
        return None
    return child.exitcode


def _copy_in_child():
    pairs = _pairs([np.arange(3000.0), np.arange(3000.0)])
    snapshot.copy_all(pairs, 48000)
    assert np.array_equal(pairs[1][0], np.arange(3000.0))


def _write_in_child(path):
    def work():
        from rayhooks import direct_io
        with direct_io.open_for_write(path) as f:
            f.write(np.arange(3 * direct_io.STAGING_BYTES // 8, dtype=np.int64))
    return work


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="no fork on this platform")
def test_a_forked_child_copies_and_writes_with_threads_of_its_own(split, tmp_path):
    from rayhooks import direct_io
    snapshot.copy_all(_pairs([np.ones(3000), np.ones(3000)]), 48000)  # the parent's copier thread exists
    with direct_io.open_for_write(str(tmp_path / "parent")) as f:    # and its writer threads
        f.write(np.ones(2 * direct_io.STAGING_BYTES // 8))
    assert _in_forked_child(_copy_in_child) == 0, "the child's split copy hung or failed"
    path = str(tmp_path / "child")
    assert _in_forked_child(_write_in_child(path)) == 0, "the child's direct write hung or failed"
    assert np.array_equal(np.fromfile(path, np.int64), np.arange(3 * direct_io.STAGING_BYTES // 8))


def test_a_copy_while_the_interpreter_exits_is_made_on_the_calling_thread(split, monkeypatch):
    # At exit (an atexit handler, a late non-daemon thread) executors refuse new work; an
    # executor that has been shut down refuses it the same way.
    import concurrent.futures
    closed = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    closed.shutdown()
    monkeypatch.setattr(snapshot, "_copier", closed)
    pairs = _pairs([np.arange(2000.0), np.arange(3000.0)])
    snapshot.copy_all(pairs, 40000)
    np.testing.assert_array_equal(pairs[1][0], np.arange(3000.0))
    assert list(split) == [threading.main_thread().name]
