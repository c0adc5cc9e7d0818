"""Ray: the chief and the workers as actors. `ray.remote` is applied here, once.

Workers are threaded actors (`max_concurrency=2`): `run` holds one thread for
`train_fn` while the chief's plans arrive through `receive` on the other.
Reports go to the chief as fire-and-forget actor calls; only the end of a
worker's loop waits for an answer.
"""

import os
import signal
import socket
import traceback

import ray


class _ChiefActor:
    def __init__(self, spec, num_workers, report_latency, worker_names=()):
        from rayhooks.chief import Chief
        self._names = list(worker_names)
        self._workers = []
        self.chief = Chief(spec, num_workers, self._send, report_latency=report_latency)
        if ray.get_runtime_context().was_current_actor_reconstructed:
            self.chief.recover()  # Ray restarted this actor: rebuild from storage (I3 holds across it)

    def _send(self, index, update):
        if not self._workers:  # a restarted chief finds the workers by name
            self._workers = [ray.get_actor(name) for name in self._names]
        self._workers[index].receive.remote(update)

    def connect(self, workers):
        self._workers = list(workers)

    def call(self, name, *args):
        return getattr(self.chief, name)(*args)

    def report(self, *args):
        self.chief.report(*args)


class _RayTransport:
    def __init__(self, chief):
        self._chief = chief

    def report(self, *args):
        self._chief.report.remote(*args)

    def report_and_wait(self, *args):
        ray.get(self._chief.report.remote(*args))

    def worker_end(self, worker, step):
        return ray.get(self._chief.call.remote("worker_end", worker, step))


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
            raise WorkerError(self.context.worker_index, traceback.format_exc()) from e


class WorkerError(RuntimeError):
    """A worker's `train_fn` raised; the message holds the worker's traceback."""

    def __init__(self, worker_index, formatted_traceback):
        super().__init__(worker_index, formatted_traceback)
        self.worker_index = worker_index
        self.formatted_traceback = formatted_traceback

    def __str__(self):
        return "worker %d failed:\n%s" % (self.worker_index, self.formatted_traceback)


ChiefActor = ray.remote(num_cpus=0)(_ChiefActor)
WorkerActor = ray.remote(max_concurrency=2)(_WorkerActor)
