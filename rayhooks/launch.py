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
import numbers
import signal
import threading
import time
from typing import Dict, List, Optional

from rayhooks.basic_hooks import StopAtStepHook
from rayhooks.checkpoint_hooks import CheckpointSaverHook, preempted
from rayhooks.chief import Chief
from rayhooks.session_run_hook import check_hooks
from rayhooks.spec import build_spec
from rayhooks.summary_hook import SummarySaverHook
from rayhooks.summary_writer import SummaryWriterCache
from rayhooks.timer import is_count

ANNOUNCE_LATENCY_SECS = 0.05  # a chief-to-worker actor call, with room for a loaded node
CHIEF_PROBE_SECS = 2.0  # how often the driver checks, while workers train, that the chief can still answer

logger = logging.getLogger("rayhooks")

_STOP_WAIT_SECS = 30.0  # for local workers to leave their step once a run stopped
_PLACEMENT_NOTICE_SECS = 15.0  # how often a launch waiting for resources says so


@dataclasses.dataclass
class LaunchResult:
    """What a launched run produced."""

    last_step: int
    checkpoints: List[int]            # steps committed during this run (after a chief restart: from the
                                      # checkpoint it rebuilt itself from on; `rayhooks ls` lists them all)
    latest_checkpoint: Optional[str]  # URL prefix of the newest committed checkpoint
    metrics: Dict[str, float]         # worker 0's last scalar step outputs
    skipped_saves: int
    worker_results: list
    recoveries: int = 0               # times the worker group was restarted after a failure
    failed_saves: int = 0             # saves that could not be written (on_write_error='retry_next_save')


def launch(train_fn, num_workers: int = 1, *, hooks=None, chief_only_hooks=None, backend: str = "ray",
           resources_per_worker: Optional[dict] = None, placement_strategy: str = "PACK",
           all_workers_write: bool = False, tf_config: bool = True, report_interval: float = 0.25,
           ray_init_kwargs: Optional[dict] = None, placement_timeout_s: float = 600,
           max_failures: int = 0, name: Optional[str] = None, worker_niceness: Optional[int] = 0) -> LaunchResult:
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
      report_interval: seconds between a worker's progress reports (sent
        by a background thread: the training loop does not wait for them).
        A `save_secs`/`save_summaries_secs` deadline does not wait for the
        next one: the chief asks the workers to report right after it and
        plans from where they are then. Saved shards, stop requests and
        preemptions are reported at once.
      max_failures: how many times the worker group is restarted after a
        worker fails (raises, or its actor or node dies). A restart resumes
        every worker from the latest committed checkpoint and runs the
        hooks' `after_create_session` again; the chief and its listeners
        carry on. Past the limit, `launch` raises the worker's error. A
        preempted worker (SIGTERM) counts as a failure after its emergency
        checkpoint: past the limit, `launch` raises `rh.Preempted`.
      name: names the run's Ray actors `rayhooks-<name>-worker-<i>`
        (default: a random name).
      worker_niceness: the nice value of each Ray worker's process. Ray
        starts workers at 15, below every other process on the node, so
        Ray's own daemons and the kernel's I/O threads (busy while a
        checkpoint is written) preempt the training loop; rayhooks starts
        its workers at 0, as Ray's job supervisor does for itself. None
        keeps Ray's setting. The chief actor gets the same value, so that
        busy workers do not starve it. Ignored by the local backend.
    """
    if not is_count(num_workers, 1):
        raise ValueError("num_workers must be a whole number >= 1, got %r" % (num_workers,))
    if isinstance(report_interval, bool) or not isinstance(report_interval, numbers.Real) or not report_interval >= 0:
        raise ValueError("report_interval must be >= 0 seconds (0: a report every step), got %r"
                         % (report_interval,))
    if backend not in ("ray", "local"):
        raise ValueError("backend must be 'ray' or 'local', got %r" % (backend,))
    hooks = check_hooks(hooks)
    for hook in hooks:
        if isinstance(hook, (CheckpointSaverHook, SummarySaverHook)):
            # Each worker would run it: all of them saving into one directory at once.
            raise ValueError("launch(hooks=) run on every worker; put the %s in chief_only_hooks=, whose "
                             "schedule every worker follows and whose files the chief commits once"
                             % type(hook).__name__)
        if isinstance(hook, StopAtStepHook) and hook._last_step is None:
            raise ValueError("under launch, give StopAtStepHook(last_step=...): num_steps depends on "
                             "the restored step, which each worker learns only as it starts")
    spec = build_spec(check_hooks(chief_only_hooks, "chief_only_hooks"), all_workers_write)
    for hook in hooks:  # a worker's StopAtStepHook is a stop every worker must share
        if isinstance(hook, StopAtStepHook) and hook._last_step is not None:
            spec.last_step = hook._last_step if spec.last_step is None else min(spec.last_step, hook._last_step)
    if max_failures < 0:
        raise ValueError("max_failures must be >= 0, got %r" % (max_failures,))
    import uuid
    name = name or uuid.uuid4().hex[:8]
    if backend == "ray":
        _refuse_memory_urls(spec)
    if backend == "local":
        return _run_local(train_fn, num_workers, spec, hooks, resources_per_worker, placement_strategy, tf_config,
                          report_interval, ray_init_kwargs, placement_timeout_s, max_failures, name)
    return _run_ray(train_fn, num_workers, spec, hooks, resources_per_worker, placement_strategy, tf_config,
                    report_interval, ray_init_kwargs, placement_timeout_s, max_failures, name, worker_niceness)


def _refuse_memory_urls(spec) -> None:
    import fsspec.core
    urls = [("checkpoint_dir", spec.checkpoint.store.url if spec.checkpoint is not None else None),
            ("SummarySaverHook's output_dir", spec.summary.output_dir if spec.summary is not None else None)]
    for what, url in urls:
        # From the URL alone: making its file system (gcsfs looking for credentials) can take seconds.
        if url is not None and fsspec.core.split_protocol(url)[0] == "memory":
            raise ValueError("%s %s lives inside one process: under backend='ray' the chief and each worker "
                             "would each write to and read from a store of its own, and nothing would be left "
                             "after the run. Use a directory every node reaches (gs://, s3://, a shared file "
                             "system), or backend='local'" % (what, url))


def announce_latency(report_interval: float) -> float:
    """What the chief's margin allows for an announcement to reach the workers.

    Progress is fresh when a seconds deadline is planned (the workers report
    right after it, and staler reports are projected forward at each
    worker's rate), so the margin covers delivery, not the report interval.
    """
    return min(report_interval, ANNOUNCE_LATENCY_SECS)


def _result(summary: dict, worker_results) -> LaunchResult:
    return LaunchResult(summary["last_step"], summary["committed"], summary["latest_checkpoint"],
                        summary["metrics"], summary["skipped_saves"], list(worker_results),
                        summary.get("recoveries", 0), summary.get("failed_saves", 0))


def _run_local(train_fn, num_workers, spec, hooks, resources_per_worker, placement_strategy, tf_config,
               report_interval, ray_init_kwargs, placement_timeout_s, max_failures, name):
    import copy
    import traceback
    from rayhooks.transport import ChiefThread, LocalTransport
    from rayhooks.worker import WorkerContext, WorkerError

    contexts = []
    chief = Chief(spec, num_workers, lambda i, update: contexts[i].agent.receive(update),
                  report_latency=announce_latency(report_interval), report_interval=report_interval)
    chief_thread = ChiefThread(chief)
    failures, threads = 0, []
    try:
        start = chief_thread.call("start")
        transport = LocalTransport(chief_thread)
        while True:
            contexts[:] = [WorkerContext(i, num_workers, spec, transport, copy.deepcopy(hooks), report_interval)
                           for i in range(num_workers)]
            first = chief_thread.call("workers_created", start or 0)
            for ctx in contexts:
                ctx.agent.receive(first)
            results, errors = [None] * num_workers, [None] * num_workers

            def run(i):
                try:
                    results[i] = train_fn(contexts[i])
                except BaseException as e:
                    errors[i] = (e, traceback.format_exc())
                    for ctx in contexts:  # the others stop at their next step rather than wait on a dead peer
                        ctx.agent.abort()

            threads = [threading.Thread(target=run, args=(i,), name="rayhooks-%s-worker-%d" % (name, i))
                       for i in range(num_workers)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            failed = [(i, e) for i, e in enumerate(errors) if e is not None]
            if not failed:
                break
            i, (error, formatted) = failed[0]
            if failures < max_failures:
                failures += 1
                chief_thread.call("workers_lost", "worker %d raised %r" % (i, error))
                start = _latest_step(spec)
                continue
            chief_thread.call("worker_failed", i, repr(error))
            chief_thread.call("finish")
            raise WorkerError(i, formatted, error) from error
        summary = chief_thread.call("finish")
    except BaseException:
        # Ctrl-C, say: the workers stop at their next step (in a notebook nothing else would
        # stop them), and finish() did not run, nor will an exit-time flush follow.
        for ctx in contexts:
            ctx.agent.abort()
        for t in threads:
            t.join(_STOP_WAIT_SECS)
        stuck = [t.name for t in threads if t.is_alive()]
        if stuck:
            logger.warning("%s still in a step %.0f s after the run stopped; they stop at their next step",
                           ", ".join(stuck), _STOP_WAIT_SECS)
        SummaryWriterCache.flush_all("after the run stopped")
        raise
    finally:
        chief_thread.close()
    return _result(summary, results)


def _resume_hint(spec) -> str:
    if spec.checkpoint is None:
        return "and no checkpoint hook was given, so nothing was saved"
    try:
        info = spec.checkpoint.store.latest()
    except Exception:  # noqa: BLE001 -- the worker's death is the error to report
        return "; launch again with the same checkpoint_dir (%s) to resume from its newest committed checkpoint" \
            % spec.checkpoint.store.url
    if info is None:
        return "before any checkpoint in %s was committed" % spec.checkpoint.store.url
    return ("after step %d was committed in %s; launch again with the same checkpoint_dir to resume from it"
            % (info.step, spec.checkpoint.store.url))


def _latest_step(spec):
    info = spec.checkpoint.store.latest() if spec.checkpoint is not None else None
    return info.step if info is not None else 0


def _ensure_ray(ray_init_kwargs):
    import ray
    if not ray.is_initialized():
        ray.init(**(ray_init_kwargs or {}))  # joins a running cluster (RAY_ADDRESS, a Ray Job) or starts one
    return ray


def _run_ray(train_fn, num_workers, spec, hooks, resources_per_worker, placement_strategy, tf_config,
             report_interval, ray_init_kwargs, placement_timeout_s, max_failures, name, worker_niceness=0):
    ray = _ensure_ray(ray_init_kwargs)
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
    from rayhooks.ray_backend import ChiefActor, WorkerActor
    from rayhooks.worker import WorkerError

    resources = dict(resources_per_worker or {"CPU": 1})
    pg = placement_group([resources] * num_workers, strategy=placement_strategy)
    # In slices, so that a run waiting for resources says so (an autoscaler may still add them).
    deadline = None if placement_timeout_s is None else time.monotonic() + placement_timeout_s
    ready = []
    try:
        while not ready:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            ready, _ = ray.wait([pg.ready()], timeout=_PLACEMENT_NOTICE_SECS if left is None
                                else min(left, _PLACEMENT_NOTICE_SECS))
            if not ready and (left is None or left > _PLACEMENT_NOTICE_SECS):
                logger.warning("waiting to reserve %d workers with %s each (strategy %s): the cluster has %s "
                               "available of %s; %s", num_workers, resources, placement_strategy,
                               ray.available_resources(), ray.cluster_resources(),
                               "no placement_timeout_s" if left is None else
                               "giving up in %.0f s (placement_timeout_s)" % (left - _PLACEMENT_NOTICE_SECS))
    except BaseException:  # Ctrl-C while waiting: the group would take the CPUs once they free up
        remove_placement_group(pg)
        raise
    if not ready:
        remove_placement_group(pg)
        raise TimeoutError("could not reserve %d workers with %s each (strategy %s) within %ss; the cluster "
                           "has %s available of %s: ask for fewer workers or resources, or add nodes"
                           % (num_workers, resources, placement_strategy, placement_timeout_s,
                              ray.available_resources(), ray.cluster_resources()))
    # A chief that dies is restarted by Ray and rebuilds itself from storage; calls in
    # flight to it (reports, the end of a worker's loop) are retried on the new one.
    # Ray reads RAY_worker_niceness from an actor's runtime env when it starts the process. The
    # chief gets the workers' value: at Ray's 15 it would starve behind busy workers at 0.
    runtime_env = None if worker_niceness is None else {"env_vars": {"RAY_worker_niceness": str(int(worker_niceness))}}
    try:
        chief = ChiefActor.options(max_restarts=max(1, max_failures), max_task_retries=-1,
                                   runtime_env=runtime_env).remote(
            spec, num_workers, report_interval, ["rayhooks-%s-worker-%d" % (name, i) for i in range(num_workers)])
    except BaseException as e:
        remove_placement_group(pg)  # or the next launch waits for the CPUs this one still holds
        if isinstance(e, TypeError) and "serializ" in str(e):
            raise TypeError("chief_only_hooks and their listeners travel to the chief actor by pickle, and one "
                            "of them does not pickle; make locks, clients, files and models in its begin(), "
                            "not in __init__. Ray's error: %s" % e) from e
        raise
    workers = []
    options = {k.lower(): v for k, v in resources.items() if k in ("CPU", "GPU")}
    custom = {k: v for k, v in resources.items() if k not in ("CPU", "GPU")}

    def from_chief(ref):
        try:
            return ray.get(ref)
        except ray.exceptions.ActorDiedError as e:
            if e.actor_init_failed:  # the spec did not unpickle there (a listener's module), or recover() raised
                raise RuntimeError("the chief actor could not be constructed %s. Ray's error: %s"
                                   % (_resume_hint(spec), e)) from e
            raise RuntimeError("the chief actor died for good (Ray restarts it at most max(1, max_failures)=%d "
                               "times) %s. Ray's error: %s" % (max(1, max_failures), _resume_hint(spec), e)) from e

    def call(name, *args):
        return from_chief(chief.call.remote(name, *args))

    def start_workers():
        workers[:] = [WorkerActor.options(
            name="rayhooks-%s-worker-%d" % (name, i),
            num_cpus=options.get("cpu", 0), num_gpus=options.get("gpu", 0), resources=custom or None,
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i),
            runtime_env=runtime_env,
        ).remote(i, num_workers, spec, hooks, chief, report_interval) for i in range(num_workers)]
        from_chief(chief.connect.remote(workers))
        if tf_config:
            addresses = ray.get([w.node_address.remote() for w in workers])
            ray.get([w.set_env.remote({"TF_CONFIG": json.dumps({
                "cluster": {"worker": addresses}, "task": {"type": "worker", "index": i}})})
                for i, w in enumerate(workers)])

    def stop_workers():
        for w in workers:  # collective peers of a dead worker would wait forever
            ray.kill(w, no_restart=True)
        workers[:] = []

    finished = False  # the chief's finish() flushes its summaries; on any other way out the driver asks it to
    try:
        start = call("start")
        failures = 0
        while True:
            start_workers()
            first = call("workers_created", start or 0)
            ray.get([w.receive.remote(first) for w in workers])
            refs = [w.run.remote(train_fn) for w in workers]
            pending, failure, probe = list(refs), None, None
            while pending:
                done, pending = ray.wait(pending, num_returns=1, timeout=CHIEF_PROBE_SECS)
                if not done:
                    # Calls to the chief are retried while Ray restarts it, so this probe fails only once
                    # it is gone for good; workers that wait for its commits would otherwise wait forever.
                    if probe is not None and ray.wait([probe], timeout=0)[0]:
                        from_chief(probe)
                        probe = None
                    if probe is None:
                        probe = chief.alive.remote()
                    continue
                try:
                    ray.get(done[0])
                except Exception as e:
                    cause = e.cause if isinstance(getattr(e, "cause", None), WorkerError) else e
                    failure = (getattr(cause, "worker_index", refs.index(done[0])), cause)
                    break
            if failure is None:
                stopped_early = call("needs_restart")  # a preemption stopped this pass before the last step
                if stopped_early and failures < max_failures:
                    failures += 1  # preempted: resume on a fresh worker group from the emergency save
                    stop_workers()
                    call("workers_lost", "a worker was preempted (SIGTERM)")
                    start = _latest_step(spec)
                    continue
                break
            index, cause = failure
            stop_workers()
            if failures < max_failures:
                failures += 1
                call("workers_lost", "worker %d: %s" % (index, str(cause)[:500]))
                start = _latest_step(spec)
                continue
            call("worker_failed", index, str(cause))
            finished = True
            call("finish")
            if not isinstance(cause, WorkerError):  # the actor or its node died: Ray's error names neither
                raise RuntimeError("worker %d died (its actor or node was lost, and max_failures=%d restarts "
                                   "were used) %s. Ray's error: %s"
                                   % (index, max_failures, _resume_hint(spec), cause)) from cause
            raise cause from getattr(cause, "original", None)
        finished = True
        summary = call("finish")
        result = _result(summary, ray.get(refs))
        if stopped_early:  # no restart left: a preempted run must not pass for a finished one
            raise preempted(signal.SIGTERM, result.last_step, result.latest_checkpoint, result)
        return result
    finally:
        stop_workers()
        if not finished:  # Ctrl-C, say: ray.kill skips the chief's exit-time flush of its summaries
            try:
                ray.get(chief.call.remote("flush_summaries"), timeout=60)
            except Exception as e:  # noqa: BLE001 -- the error that brought us here matters more
                logger.warning("could not flush the chief's summaries before stopping it: %s", e)
        ray.kill(chief, no_restart=True)
        remove_placement_group(pg)
