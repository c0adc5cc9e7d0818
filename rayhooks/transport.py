"""The in-process transport: the local backend's chief runs on its own thread.

Workers hand reports to a queue and go on; the chief thread applies them in
order, as a Ray actor would. Calls that need an answer (the end of a worker's
loop) wait on a future.
"""

import concurrent.futures
import queue
import threading


class ChiefThread:
    """Runs every call on one `Chief` from one thread, in arrival order."""

    def __init__(self, chief):
        self.chief = chief
        self._calls = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="rayhooks-chief", daemon=True)
        self._thread.start()

    def _loop(self):
        while True:
            item = self._calls.get()
            if item is None:
                return
            future, name, args = item
            try:
                result = getattr(self.chief, name)(*args)
            except BaseException as e:  # handed to whoever waits; reports nobody waits on are logged
                if future is None:
                    self.chief.errors.append("chief.%s: %r" % (name, e))
                    import logging
                    logging.getLogger("rayhooks").exception("the chief failed handling %s", name)
                else:
                    future.set_exception(e)
                continue
            if future is not None:
                future.set_result(result)

    def post(self, name, *args) -> None:
        self._calls.put((None, name, args))

    def call(self, name, *args):
        future = concurrent.futures.Future()
        self._calls.put((future, name, args))
        return future.result()

    def close(self):
        self._calls.put(None)
        self._thread.join()


class LocalTransport:
    """A worker's view of the chief in the local backend."""

    def __init__(self, chief_thread: ChiefThread):
        self._chief = chief_thread

    def report(self, *args) -> None:
        self._chief.post("report", *args)

    def report_and_wait(self, *args) -> None:
        self._chief.call("report", *args)

    def worker_end(self, worker, step):
        return self._chief.call("worker_end", worker, step)
