"""The `coord` handed to `after_create_session`: a run-wide stop flag."""

import threading


class Coordinator:
    """Like `tf.train.Coordinator`: `request_stop()` and `should_stop()`, shared by the run."""

    def __init__(self):
        self._stop = threading.Event()
        self.stop_requested = False  # a plain attribute: the training loop reads it every step
        self._exc_info = None

    def request_stop(self, ex=None):
        if ex is not None and self._exc_info is None:
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
