"""Snapshots: a consistent host-memory copy of the state, made while training waits.

The copy goes into buffers pooled across saves: the host copy of a 512 MB
state lands in buffers the previous save already paged in, which is what
keeps the stall near a plain `memcpy`. From 16 MB on, a second thread copies
half the bytes (numpy drops the GIL while it copies), where the process may
use two cores.
"""

import contextlib
import dataclasses
import os
import threading
from typing import Callable, Dict, Optional

import numpy as np

_final = threading.local()


@contextlib.contextmanager
def final_snapshot():
    """Snapshots taken inside are a run's last (its end, a preemption): they prepare nothing for later saves."""
    before = getattr(_final, "on", False)
    _final.on = True
    try:
        yield
    finally:
        _final.on = before


def in_final_snapshot() -> bool:
    """Whether this thread is inside `final_snapshot()`."""
    return getattr(_final, "on", False)


@dataclasses.dataclass
class Snapshot:
    """A host-memory copy of the state at one step."""

    tensors: Dict[str, object]
    nbytes: int
    release: Optional[Callable[[], None]] = None

    def done(self) -> None:
        """Gives the buffers back for reuse; call once the bytes are persisted."""
        release, self.release = self.release, None
        self.tensors = {}
        if release is not None:
            release()


class BufferPool:
    """Reuses host buffers across saves, so a save does not page in fresh memory."""

    def __init__(self):
        self._free: Dict[tuple, list] = {}
        self._lock = threading.Lock()

    def take(self, key, shape, dtype) -> np.ndarray:
        with self._lock:
            free = self._free.get((key, shape, dtype))
            if free:
                return free.pop()
        return np.empty(shape, dtype)

    def give(self, key, arrays) -> None:
        with self._lock:
            for arr in arrays:
                self._free.setdefault((key, arr.shape, arr.dtype), []).append(arr)


_SPLIT_BYTES = 16 << 20  # from this many bytes a snapshot's copies are shared with a second thread
_copier = None
_copier_lock = threading.Lock()


def _copy_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def copy_all(pairs, nbytes: int) -> None:
    """`np.copyto(dst, src)` for each pair; from `_SPLIT_BYTES` on, half the bytes on a second thread.

    The training loop waits for this copy, so a second core halves the wait
    where memory bandwidth allows (numpy drops the GIL while it copies). The
    pair that straddles the halfway mark is split, so one large array is
    shared too.
    """
    global _copier
    if nbytes < _SPLIT_BYTES or _copy_threads() < 2:
        _copy_pairs(pairs)
        return
    half, done, mine = nbytes // 2, 0, []
    for i, (dst, src) in enumerate(pairs):
        if done + dst.nbytes <= half:
            mine.append((dst, src))
            done += dst.nbytes
            continue
        theirs = pairs[i + 1:]
        cut = (half - done) // max(dst.itemsize, 1)
        if cut and dst.flags.c_contiguous and src.flags.c_contiguous:
            flat_dst, flat_src = dst.reshape(-1), src.reshape(-1)  # views: both are contiguous
            mine.append((flat_dst[:cut], flat_src[:cut]))
            theirs = [(flat_dst[cut:], flat_src[cut:])] + list(theirs)
        else:
            theirs = [(dst, src)] + list(theirs)
        break
    else:
        theirs = []
    with _copier_lock:
        if _copier is None:
            import concurrent.futures
            _copier = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="rayhooks-copy")
        copier = _copier
    try:
        other = copier.submit(_copy_pairs, theirs) if theirs else None
    except RuntimeError:  # the interpreter is exiting (an atexit or late save): no new threads
        other, mine = None, mine + list(theirs)
    try:
        _copy_pairs(mine)
    finally:
        if other is not None:
            other.result()  # also when this thread's half failed: the buffers must be quiet before reuse


def _copy_pairs(pairs) -> None:
    for dst, src in pairs:
        np.copyto(dst, src, casting="no")


def _forget_copier() -> None:
    # A forked child has the executor but not its thread: submitting there would wait forever.
    global _copier, _copier_lock
    _copier, _copier_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_copier)


def host_copy(value, pool: BufferPool, pool_key, taken: list, pairs: Optional[list] = None):
    """Copies one value into a pooled host buffer; strings stay Python objects.

    With `pairs`, a numeric copy is left to the caller (`copy_all`): the
    (buffer, source) pair is appended there instead.
    """
    if isinstance(value, (bytes, str)):
        return value, len(value)
    arr = value
    if hasattr(value, "numpy") and not isinstance(value, np.ndarray):
        device = getattr(value, "device", "") or ""
        if device and "CPU" not in device.upper():
            arr = value.numpy()  # from an accelerator this is already a fresh host copy
            if isinstance(arr, np.ndarray) and arr.dtype != object:
                return arr, arr.nbytes
        else:
            # `.numpy()` would copy; `_numpy()` is a view of the CPU buffer, copied once below.
            arr = value._numpy() if hasattr(value, "_numpy") else value.numpy()
    if isinstance(arr, bytes):
        # TF gives a scalar string tensor as bytes. np.asarray would make it a fixed-width
        # "S" array, whose items drop trailing NUL bytes: a serialized object graph
        # ending in an empty submessage (b"...\x2a\x00") would be written truncated.
        return np.array(arr, dtype=object), len(arr)
    arr = np.asarray(arr)
    if arr.dtype == object:
        return arr.copy(), int(sum(len(x) for x in arr.ravel()))
    buf = pool.take(pool_key, arr.shape, arr.dtype)
    if pairs is None:
        np.copyto(buf, arr, casting="no")
    else:
        pairs.append((buf, arr))
    taken.append(buf)
    return buf, buf.nbytes
