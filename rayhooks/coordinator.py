"""The `coord` handed to `after_create_session`: a run-wide stop flag."""

import threading


class Coordinator:
    """Like `tf.train.Coordinator`: `request_stop()` and `should_stop()`, shared by the run."""

    def __init__(self):
        self._stop = threading.Event()
        self._exc_info = None

    def request_stop(self, ex=None):
        if ex is not None and self._exc_info is None:
            self._exc_info = ex
        self._stop.set()

    def should_stop(self) -> bool:
        return self._stop.is_set()

    def wait_for_stop(self, timeout=None) -> bool:
        return self._stop.wait(timeout)

    def clear_stop(self):
        self._stop.clear()
        self._exc_info = None

    def raise_requested_exception(self):
        if self._exc_info is not None:
            raise self._exc_info
