"""The `coord` handed to `after_create_session`: a run-wide stop flag."""

import sys
import threading


def _is_clean_stop(ex) -> bool:
    """TF's Coordinator treats OutOfRangeError as a clean stop: no error to report."""
    errors = getattr(sys.modules.get("tensorflow"), "errors", None)
    return errors is not None and isinstance(ex, errors.OutOfRangeError)


class Coordinator:
    """Like `tf.train.Coordinator`: `request_stop()` and `should_stop()`, shared by the run.

    As in TF, `request_stop(ex)` with an exception (or a `sys.exc_info()` tuple)
    records the first one reported before the stop; the session raises it when
    it closes, after the `end` hooks. OutOfRangeError is a clean stop.
    """

    def __init__(self):
        self._stop = threading.Event()
        self.stop_requested = False  # a plain attribute: the training loop reads it every step
        self._exc_info = None

    def request_stop(self, ex=None):
        if isinstance(ex, tuple):
            ex = ex[1]
        if ex is not None and not _is_clean_stop(ex) and self._exc_info is None and not self.stop_requested:
            self._exc_info = ex
        self.stop_requested = True
        self._stop.set()

    def should_stop(self) -> bool:
        return self.stop_requested

    def wait_for_stop(self, timeout=None) -> bool:
        return self._stop.wait(timeout)

    def clear_stop(self):
        self.stop_requested = False
        self._stop.clear()
        self._exc_info = None

    def raise_requested_exception(self):
        if self._exc_info is not None:
            raise self._exc_info
