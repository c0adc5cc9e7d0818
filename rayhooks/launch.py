"""`launch`: one chief and N workers, on Ray or in this process.

    result = rh.launch(train_fn, num_workers=2,
                       chief_only_hooks=[rh.AsyncCheckpointSaverHook("gs://b/run", save_steps=100)],
                       hooks=[rh.StopAtStepHook(last_step=1000)],
                       resources_per_worker={"GPU": 1})

The driver starts the chief, restores nothing itself, and waits: each worker
restores the newest committed checkpoint in `ctx.session(state=...)`, trains,
and reports to the chief without waiting on it.
"""

import dataclasses
import json
import logging
import threading
import traceback
from typing import Dict, List, Optional

from rayhooks.basic_hooks import StopAtStepHook
from rayhooks.chief import Chief
from rayhooks.spec import build_spec

logger = logging.getLogger("rayhooks")


@dataclasses.dataclass
class LaunchResult:
    """What a launched run produced."""

    last_step: int
    checkpoints: List[int]            # steps committed during this run
    latest_checkpoint: Optional[str]  # URL prefix of the newest committed checkpoint
    metrics: Dict[str, float]         # worker 0's last scalar step outputs
    skipped_saves: int
    worker_results: list


def launch(train_fn, num_workers: int = 1, *, hooks=None, chief_only_hooks=None, backend: str = "ray",
           resources_per_worker: Optional[dict] = None, placement_strategy: str = "PACK",
           all_workers_write: bool = False, tf_config: bool = True, report_interval: float = 0.05,
           ray_init_kwargs: Optional[dict] = None, placement_timeout_s: float = 600) -> LaunchResult:
    """Runs `train_fn(ctx)` on `num_workers` workers with a chief that owns the schedule.

    Args:
      train_fn: called on every worker with a `WorkerContext`; it builds the
        model and trains in `ctx.session(state=...)`.
      hooks: run on every worker, in its process, every step.
      chief_only_hooks: run on the chief. A `CheckpointSaverHook` or
        `AsyncCheckpointSaverHook`, a `SummarySaverHook` (summary_op naming
        step outputs) and `StopAtStepHook(last_step=...)` become schedules the
        chief announces ahead, so every worker acts after the same step.
      backend: "ray" (actors; connects to a running cluster or starts a local
        Ray) or "local" (threads in this process, no Ray).
      resources_per_worker: Ray resources of each worker, e.g. {"GPU": 1}
        (default {"CPU": 1}), reserved in one placement group.
      placement_strategy: "PACK" or "SPREAD" (or STRICT_ variants).
      all_workers_write: every worker writes its own shard of each
        checkpoint (for state that differs per worker); by default only
        worker 0 writes, as every worker holds the same variables in
        synchronous data-parallel training.
      tf_config: set `TF_CONFIG` on each Ray worker for
        `tf.distribute.MultiWorkerMirroredStrategy` (ports chosen free on
        each node).
      report_interval: seconds between a worker's progress reports.
    """
    if num_workers < 1:
        raise ValueError("num_workers must be >= 1, got %r" % (num_workers,))
    if backend not in ("ray", "local"):
        raise ValueError("backend must be 'ray' or 'local', got %r" % (backend,))
    hooks = list(hooks or [])
    spec = build_spec(list(chief_only_hooks or []), all_workers_write)
    for hook in hooks:  # a worker's StopAtStepHook is a stop every worker must share
        if isinstance(hook, StopAtStepHook) and hook._last_step is not None:
            spec.last_step = hook._last_step if spec.last_step is None else min(spec.last_step, hook._last_step)
    runner = _run_local if backend == "local" else _run_ray
    return runner(train_fn, num_workers, spec, hooks, resources_per_worker, placement_strategy, tf_config,
                  report_interval, ray_init_kwargs, placement_timeout_s)


def _result(summary: dict, worker_results) -> LaunchResult:
    return LaunchResult(summary["last_step"], summary["committed"], summary["latest_checkpoint"],
                        summary["metrics"], summary["skipped_saves"], list(worker_results))


def _run_local(train_fn, num_workers, spec, hooks, resources_per_worker, placement_strategy, tf_config,
               report_interval, ray_init_kwargs, placement_timeout_s):
    import copy
    from rayhooks.transport import ChiefThread, LocalTransport
    from rayhooks.worker import WorkerContext

    contexts = []
    chief = Chief(spec, num_workers, lambda i, update: contexts[i].agent.receive(update),
                  report_latency=report_interval)
    chief_thread = ChiefThread(chief)
    try:
        start = chief_thread.call("start")
        transport = LocalTransport(chief_thread)
        contexts.extend(WorkerContext(i, num_workers, spec, transport, copy.deepcopy(hooks), report_interval)
                        for i in range(num_workers))
        first = chief_thread.call("workers_created", start or 0)
        for ctx in contexts:
            ctx.agent.receive(first)
        results, errors = [None] * num_workers, [None] * num_workers
        tracebacks = [None] * num_workers  # the message carries the worker's traceback, as on Ray (WorkerError)
        failed = threading.Event()

        def run(i):
            try:
                results[i] = train_fn(contexts[i])
            except BaseException as e:
                errors[i] = e
                tracebacks[i] = traceback.format_exc()
                failed.set()
                chief_thread.post("worker_failed", i, repr(e))
                for ctx in contexts:  # the others stop at their next step rather than wait on a dead peer
                    ctx.agent.receive({"stop_step": 0})

        threads = [threading.Thread(target=run, args=(i,), name="rayhooks-worker-%d" % i)
                   for i in range(num_workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        summary = chief_thread.call("finish")
    finally:
        chief_thread.close()
    for i, error in enumerate(errors):
        if error is not None:
            raise RuntimeError("worker %d failed: %r; checkpoints committed before it stay committed\n%s"
                               % (i, error, tracebacks[i])) from error
    return _result(summary, results)


def _ensure_ray(ray_init_kwargs):
    import ray
    if not ray.is_initialized():
        ray.init(**(ray_init_kwargs or {}))  # joins a running cluster (RAY_ADDRESS, a Ray Job) or starts one
    return ray


def _run_ray(train_fn, num_workers, spec, hooks, resources_per_worker, placement_strategy, tf_config,
             report_interval, ray_init_kwargs, placement_timeout_s):
    ray = _ensure_ray(ray_init_kwargs)
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
    from rayhooks.ray_backend import ChiefActor, WorkerActor, WorkerError

    resources = dict(resources_per_worker or {"CPU": 1})
    pg = placement_group([resources] * num_workers, strategy=placement_strategy)
    ready, _ = ray.wait([pg.ready()], timeout=placement_timeout_s)
    if not ready:
        remove_placement_group(pg)
        raise TimeoutError("could not reserve %d workers with %s each (strategy %s) within %ss; the "
                           "cluster has %s" % (num_workers, resources, placement_strategy, placement_timeout_s,
                                               ray.cluster_resources()))
    chief = ChiefActor.remote(spec, num_workers, report_interval)
    workers = []
    try:
        options = {k.lower(): v for k, v in resources.items() if k in ("CPU", "GPU")}
        custom = {k: v for k, v in resources.items() if k not in ("CPU", "GPU")}
        for i in range(num_workers):
            workers.append(WorkerActor.options(
                num_cpus=options.get("cpu", 0), num_gpus=options.get("gpu", 0), resources=custom or None,
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i),
            ).remote(i, num_workers, spec, hooks, chief, report_interval))
        ray.get(chief.connect.remote(workers))
        if tf_config:
            addresses = ray.get([w.node_address.remote() for w in workers])
            ray.get([w.set_env.remote({"TF_CONFIG": json.dumps({
                "cluster": {"worker": addresses}, "task": {"type": "worker", "index": i}})})
                for i, w in enumerate(workers)])
        start = ray.get(chief.call.remote("start"))
        first = ray.get(chief.call.remote("workers_created", start or 0))
        ray.get([w.receive.remote(first) for w in workers])
        refs = [w.run.remote(train_fn) for w in workers]
        pending, failure = list(refs), None
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            try:
                ray.get(done[0])
            except Exception as e:
                cause = e.cause if isinstance(getattr(e, "cause", None), WorkerError) else e
                failure = cause
                index = getattr(cause, "worker_index", refs.index(done[0]))
                ray.get(chief.call.remote("worker_failed", index, str(cause)))
                for w in workers:  # collective peers of a dead worker would wait forever
                    ray.kill(w)
                break
        summary = ray.get(chief.call.remote("finish"))
        if failure is not None:
            raise failure
        return _result(summary, ray.get(refs))
    finally:
        for w in workers:
            ray.kill(w)
        ray.kill(chief)
        remove_placement_group(pg)
