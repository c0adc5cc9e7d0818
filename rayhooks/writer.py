"""The background writer: snapshots in, durable checkpoints out.

Training hands it a snapshot and a job that persists and commits it; the job
runs on one background thread, so commits happen in step order. Memory is
bounded (DESIGN I5): at most `max_in_flight` snapshots and
`max_in_flight_bytes` bytes are held; a save over the limit is skipped
(TF's AsyncCheckpointSaverHook) or waits, as the caller chooses.

Errors never vanish (DESIGN I6): the first failure is stored and raised once,
in the training thread, at the next save or at close, with the URL and step.
"""

import collections
import concurrent.futures
import logging
import threading
from typing import Callable, Optional

from rayhooks import progress
from rayhooks.claim import DirectoryTakenOver
from rayhooks.timer import is_count

logger = logging.getLogger("rayhooks")


class BackgroundWriter:
    """Runs save jobs off the training thread. Starts its thread on first use."""

    def __init__(self, what: str, max_in_flight: int = 1, max_in_flight_bytes: Optional[int] = None):
        if not is_count(max_in_flight, 1):
            raise ValueError("max_in_flight must be >= 1, got %r" % (max_in_flight,))
        if max_in_flight_bytes is not None and max_in_flight_bytes <= 0:
            raise ValueError("max_in_flight_bytes must be > 0 or None, got %r" % (max_in_flight_bytes,))
        self.what = what
        self.max_in_flight = max_in_flight
        self.max_in_flight_bytes = max_in_flight_bytes
        self._executor = None
        self._cond = threading.Condition()
        self._in_flight = 0
        self._in_flight_bytes = 0
        self._error = None
        self.completed = collections.deque()   # (step, result), appended by the writer thread
        self.on_complete = None                # called by the writer thread after each append
        self.peak_in_flight_bytes = 0
        self._unwritten = 0        # bytes of submitted snapshots not yet written, for progress bars
        self._job_written = 0

    def _fits(self, nbytes: int) -> bool:
        if self._in_flight == 0:
            return True  # one snapshot always fits, or a large state could never be saved
        if self._in_flight >= self.max_in_flight:
            return False
        return self.max_in_flight_bytes is None or self._in_flight_bytes + nbytes <= self.max_in_flight_bytes

    def busy(self) -> bool:
        with self._cond:
            return self._in_flight > 0

    def admit(self, nbytes: int, wait: bool, timeout: Optional[float] = None) -> bool:
        """Reserves room for a snapshot of `nbytes`; False if it does not fit and `wait` is False."""
        with self._cond:
            if not self._fits(nbytes):
                if not wait:
                    return False
                if not self._cond.wait_for(lambda: self._fits(nbytes), timeout):
                    return False
            self._in_flight += 1
            self._in_flight_bytes += nbytes
            self.peak_in_flight_bytes = max(self.peak_in_flight_bytes, self._in_flight_bytes)
            return True

    def adjust(self, delta: int) -> None:
        """Corrects a reservation once the snapshot's real size is known."""
        with self._cond:
            self._in_flight_bytes += delta
            self.peak_in_flight_bytes = max(self.peak_in_flight_bytes, self._in_flight_bytes)
            self._cond.notify_all()

    def release(self, nbytes: int) -> None:
        """Gives back room reserved by `admit` for a save that was not submitted."""
        with self._cond:
            self._in_flight -= 1
            self._in_flight_bytes -= nbytes
            self._cond.notify_all()

    def submit(self, step: int, nbytes: int, job: Callable[[], object]) -> concurrent.futures.Future:
        """Runs `job` in the background; `admit(nbytes, ...)` must have returned True."""
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="rayhooks-writer")
        with self._cond:
            self._unwritten += nbytes
        return self._executor.submit(self._run, step, nbytes, job)

    def advance(self, nbytes: int) -> None:
        """Called by a job as its bytes go out: what progress bars count."""
        with self._cond:
            self._job_written += nbytes
            self._unwritten -= nbytes

    def _run(self, step, nbytes, job):
        with self._cond:
            self._job_written = 0
        try:
            result = job()
            self.completed.append((step, result))
            if self.on_complete is not None:
                self.on_complete()
            return result
        except BaseException as e:
            logger.error("[step=%d] %s failed in the background: %s", step, self.what, e)
            with self._cond:
                if self._error is None:
                    self._error = (step, e)
            raise
        finally:
            with self._cond:
                self._unwritten -= max(0, nbytes - self._job_written)
                self._in_flight -= 1
                self._in_flight_bytes -= nbytes
                self._cond.notify_all()

    @property
    def failed(self) -> bool:
        return self._error is not None

    def take_error(self):
        """The stored background failure as (step, exception), once; None if there is none.

        A `DirectoryTakenOver` is raised instead, whatever the caller's on_write_error: no
        later save of this run can commit, so there is nothing to train on for.
        """
        with self._cond:
            failure, self._error = self._error, None
        if failure is not None and isinstance(failure[1], DirectoryTakenOver):
            raise failure[1]
        return failure

    def raise_if_failed(self) -> None:
        """Raises the stored background error, once."""
        failure = self.take_error()
        if failure is not None:
            step, exc = failure
            raise background_error(self.what, step, exc) from exc

    def wait_idle(self, timeout: Optional[float] = None) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._in_flight == 0, timeout)

    def wait_idle_with_progress(self, desc: str, file=None) -> None:
        """Waits for every job; a wait longer than a second shows a bar of the bytes left to write."""
        if self.wait_idle(progress.DELAY_SECS):
            return
        with self._cond:
            total = self._unwritten
        bar = progress.byte_bar(desc, total, file=file, delay=0)
        try:
            done = 0
            while not self.wait_idle(0.2):  # wakes early when the writer goes idle; refreshes the bar
                with self._cond:
                    now = max(0, total - self._unwritten)
                bar.update(now - done)
                done = now
            bar.update(total - done)
        finally:
            bar.close()

    def abandon(self) -> None:
        """For a run that failed: jobs already submitted finish, then the thread ends; nothing is waited for."""
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False)

    def close(self) -> None:
        """Waits for every job, then raises a stored error, if any."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        self.raise_if_failed()


def background_error(what: str, step: int, exc: BaseException) -> BaseException:
    """An exception of the same builtin kind, saying which step failed and that nothing was committed."""
    msg = "[step=%d] %s failed, so step %d was not committed: %s" % (step, what, step, exc)
    if type(exc).__module__ == "builtins":
        try:
            return type(exc)(msg)  # the same builtin kind: a data error stays a TypeError, not I/O
        except TypeError:
            pass
    return RuntimeError(msg)
