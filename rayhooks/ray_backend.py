"""Ray: the chief and the workers as actors. `ray.remote` is applied here, once.

Workers are threaded actors (`max_concurrency=2`): `run` holds one thread for
`train_fn` while the chief's plans arrive through `receive` on the other.
Reports go to the chief as fire-and-forget actor calls, submitted from a
sender thread so the training loop does not pay for them; only the end of a
worker's loop waits for an answer.
"""

import concurrent.futures
import logging
import os
import queue
import signal
import socket
import threading
import traceback
import warnings

import ray

from rayhooks.worker import WorkerError


class _ChiefActor:
    def __init__(self, spec, num_workers, report_interval, worker_names=()):
        from rayhooks.chief import Chief
        from rayhooks.launch import announce_latency
        self._names = list(worker_names)
        self._workers = []
        self.chief = Chief(spec, num_workers, self._send, report_latency=announce_latency(report_interval),
                           report_interval=report_interval)
        with warnings.catch_warnings():  # Ray's property reads its own deprecated actor_id (Ray 2.x)
            warnings.simplefilter("ignore", DeprecationWarning)
            restarted = ray.get_runtime_context().was_current_actor_reconstructed
        if restarted:
            self.chief.recover()  # Ray restarted this actor: rebuild from storage (I3 holds across it)

    def _send(self, index, update):
        if not self._workers:  # a restarted chief finds the workers by name
            self._workers = [ray.get_actor(name) for name in self._names]
        self._workers[index].receive.remote(update)

    def connect(self, workers):
        self._workers = list(workers)

    def alive(self):
        return True

    def call(self, name, *args):
        return getattr(self.chief, name)(*args)

    def report(self, *args):
        self.chief.report(*args)


class _RayTransport:
    """A worker's view of the chief actor.

    Submitting an actor call costs the caller hundreds of microseconds of
    Python and serialisation, a few per cent of a training loop that reports
    every 50 ms. Reports are therefore handed to one sender thread, which
    submits them in order; the calls that wait for an answer queue behind
    them, so the chief still sees every report before a worker's end.
    """

    def __init__(self, chief):
        self._chief = chief
        self._calls = queue.SimpleQueue()
        self._thread = None

    def _submit(self, item):
        if self._thread is None:
            self._thread = threading.Thread(target=self._send_loop, name="rayhooks-reporter", daemon=True)
            self._thread.start()
        self._calls.put(item)

    def _send_loop(self):
        while True:
            future, name, args = self._calls.get()
            try:
                if name == "report":
                    ref = self._chief.report.remote(*args)
                else:
                    ref = self._chief.call.remote(name, *args)
            except BaseException as e:  # handed to whoever waits; a lost report is logged, as Ray would
                if future is not None:
                    future.set_exception(e)
                else:
                    logging.getLogger("rayhooks").exception("could not send a progress report to the chief")
                continue
            if future is not None:
                future.set_result(ref)

    def _call(self, name, *args):
        future = concurrent.futures.Future()
        self._submit((future, name, args))
        return ray.get(future.result())

    def report(self, *args):
        self._submit((None, "report", args))

    def report_and_wait(self, *args):
        future = concurrent.futures.Future()
        self._submit((future, "report", args))
        ray.get(future.result())

    def worker_end(self, worker, step):
        return self._call("worker_end", worker, step)


class _WorkerActor:
    def __init__(self, index, num_workers, spec, hooks, chief, report_interval):
        from rayhooks.worker import WorkerContext
        self.context = WorkerContext(index, num_workers, spec, _RayTransport(chief), hooks, report_interval)
        # Preemption (a node being drained, a spot VM reclaimed) arrives as SIGTERM. The
        # actor's constructor runs on the process's main thread, the only one that may set it.
        signals = spec.checkpoint.save_on_signals if spec.checkpoint is not None else (signal.SIGTERM,)
        for sig in signals:
            signal.signal(sig, lambda signum, frame: self.context.agent.preempt())

    def pid(self):
        return os.getpid()

    def node_address(self):
        """This worker's node IP and a port free on it, for TF_CONFIG."""
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return "%s:%d" % (ray.util.get_node_ip_address(), port)

    def set_env(self, env):
        os.environ.update(env)

    def receive(self, update):
        self.context.agent.receive(update)

    def run(self, train_fn):
        try:
            return train_fn(self.context)
        except BaseException as e:
            raise WorkerError(self.context.worker_index, traceback.format_exc(), _picklable(e)) from e


def _picklable(error):
    """`error` if it survives the trip to the driver, else None (its traceback text still does)."""
    from ray import cloudpickle
    try:
        cloudpickle.loads(cloudpickle.dumps(error))
    except Exception:  # noqa: BLE001 -- any failure to pickle: send the text only
        return None
    return error


ChiefActor = ray.remote(num_cpus=0)(_ChiefActor)
WorkerActor = ray.remote(max_concurrency=2)(_WorkerActor)
