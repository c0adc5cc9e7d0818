"""The worker side of a launched run: the session `train_fn` trains in.

    def train_fn(ctx):                      # runs on every worker
        model, optimizer = build()          # under your tf.distribute strategy
        with ctx.session(state=tf.train.Checkpoint(model=model, optimizer=optimizer)) as sess:
            while not sess.should_stop():
                sess.run(train_step, next(batches))

Per run, the worker does only local work (DESIGN I4): its hooks, one integer
compare against the next planned step, and — at most every
`report_interval` seconds — a progress record handed to the transport
without waiting. Plans and stops arrive from the chief on another thread and
are picked up by the same compare. On a planned checkpoint step the worker
copies its state to host memory (the only blocking part) and its background
writer persists it, then tells the chief the shard is durable.

A writer keeps count of its saves the chief has not yet settled (committed
and run `after_save` on, or given up). At most `max_in_flight + 1` wait for
the chief; a save beyond that is skipped (`in_flight="skip"`) or waits
(`in_flight="wait"`, `CheckpointSaverHook`), as in TF1, where `after_save`
runs before the next save starts. A slow or hung listener therefore bounds
what piles up in storage instead of leaving one uncommitted checkpoint per
save period.

A stop requested by a worker hook is sent to the chief, which picks a step
that every worker can still reach; all workers stop after that same step, so
collective ops in `MultiWorkerMirroredStrategy` never wait on a worker that
left early.
"""

import contextlib
import heapq
import logging
import threading
import time

from rayhooks.checkpoints import CheckpointStore
from rayhooks.monitored_session import MonitoredSession
from rayhooks.handle import resolve_fetches
from rayhooks.plan import CHECKPOINT, SUMMARY
from rayhooks.session_run_hook import SessionRunHook
from rayhooks.snapshot import final_snapshot
from rayhooks.storage import Storage
from rayhooks.writer import BackgroundWriter, background_error

logger = logging.getLogger("rayhooks")

_NEVER = float("inf")
SLOW_CHIEF_WARN_SECS = 30.0  # a save that waits this long for the chief's commits says why, once


class WorkerAgent(SessionRunHook):
    """The last hook of a worker's session: carries out the chief's plan and reports progress."""

    def __init__(self, worker_index, spec, transport, report_interval=0.25, clock=time.monotonic):
        self.worker_index = worker_index
        self.spec = spec
        self._transport = transport
        self._interval = report_interval
        self._clock = clock
        self._lock = threading.Lock()
        self._settled = threading.Condition(self._lock)  # notified as the chief settles saves
        self._unsettled = []               # this writer's saves since submitted, until the chief settles them
        self._settled_upto = -1            # the newest step the chief settled
        self._chief_failed = False         # the chief commits nothing more: no save waits for it
        self._reported = []                # shards reported and not yet settled: sent again to a restarted chief
        self._actions = []                 # heap of (step, kind, fetches)
        self._next_step = _NEVER           # read per step without the lock: a plain attribute
        self._stop_step = _NEVER
        self._next_report = 0.0
        self._report_by = 0.0
        self._session = None
        self._outputs = {}
        self._shards = []
        self._skipped = []
        self._stop_requested = False
        self._aborted = False
        self._preempted = False
        self._preemption_reported = False
        self._failed = []
        self.failed_saves = 0
        self.retries = 0
        ck = spec.checkpoint
        self.writes = ck is not None and (worker_index == 0 or ck.all_workers_write)
        self._writer = None
        if self.writes:
            self._writer = BackgroundWriter("checkpoint shard of worker %d" % worker_index,
                                            ck.max_in_flight, ck.max_in_flight_bytes)
            # This worker's own view of the store, so that its retries are counted here.
            storage = ck.store.storage
            self._store = CheckpointStore(Storage(storage.url, storage.storage_options, storage.retry,
                                                  on_retry=self._count_retry),
                                          ck.store.basename, ck.store.retention)
            self._store.writer_claim.follow(spec.run_token)  # its data writes stop once another run took over

    def _count_retry(self, url, exc):
        self.retries += 1

    def _check_writer(self) -> bool:
        """A failed background save: raised (on_write_error='raise'), or counted, reported and trained past."""
        failure = self._writer.take_error()
        if failure is None:
            return False
        step, exc = failure
        error = background_error(self._writer.what, step, exc)
        if self.spec.checkpoint.on_write_error == "raise":
            raise error from exc
        self.failed_saves += 1
        self._failed.append(step)
        self._next_report = 0.0
        logger.error("%s; training goes on and the next save retries (on_write_error='retry_next_save', "
                     "%d failed so far)", error, self.failed_saves)
        return True

    def preempt(self) -> None:
        """Called from a SIGTERM handler: only flags, acted on at the next step boundary."""
        self._preempted = True
        self._next_report = 0.0
        self._wake()  # after_run looks at _preempted itself

    def abort(self) -> None:
        """Stops this worker at its next step, with no final save: a peer failed."""
        self._aborted = True
        self.receive({"stop_step": 0})

    # -- from the chief (another thread) ----------------------------------------

    def receive(self, update) -> None:
        with self._lock:
            for action in update.get("actions", ()):
                heapq.heappush(self._actions, (action.step, action.kind, action.fetches, action.every))
            if update.get("stop_step") is not None:
                self._stop_step = min(self._stop_step, update["stop_step"])
                self._settled.notify_all()  # a save waiting for the chief gives up if the run stops
            if "settled" in update:  # every save up to that step (None: every save) needs the chief no more
                upto = update["settled"]
                self._chief_failed = self._chief_failed or bool(update.get("chief_failed"))
                if upto is not None:  # it can overtake this writer's own save of that step (see _save)
                    self._settled_upto = max(self._settled_upto, upto)
                    self._unsettled = [s for s in self._unsettled if s > upto]
                    self._reported = [shard for shard in self._reported if shard[0] > upto]
                else:
                    if update.get("restarted") and not self._chief_failed:
                        # The chief that heard of these shards is gone: the new one commits them
                        # if they are still newer than its latest checkpoint. Nothing waits for them.
                        self._shards = self._reported + self._shards
                        self._next_report = 0.0
                    self._unsettled, self._reported = [], []
                self._settled.notify_all()
            if update.get("report_in") is not None:  # a seconds deadline: report right after it
                self._report_by = self._clock() + update["report_in"]
                self._next_report = min(self._next_report, self._report_by)
                if self._session is not None:
                    self._session.wake_in(update["report_in"])
            self._next_step = min(self._actions[0][0] if self._actions else _NEVER, self._stop_step)
        self._wake()

    def _wake(self) -> None:
        if self._session is not None:
            self._session.wake()

    # -- in the training loop ---------------------------------------------------

    def after_create_session(self, session, coord):
        self._session = session
        self._run_due(session.global_step, session)
        if session.global_step >= self._stop_step:
            # Restored at or past the stop (a finished run launched again): train no step,
            # as Estimator.train(max_steps=N) skips training once step N is saved.
            coord.request_stop()

    def after_run(self, run_context, run_values):
        session = run_context.session
        step = session.global_step
        if run_context._stop_requested and step < self._stop_step:
            run_context._stop_requested = False  # not yet: every worker must stop at the same step
            self._stop_requested = True
            self._next_report = 0.0
        # A preemption is looked at on its own: a plan arriving from the chief's thread
        # recomputes _next_step and may overwrite the 0 that preempt() set.
        if step >= self._next_step or (self._preempted and not self._preemption_reported):
            if self._aborted:
                run_context.request_stop()
                return
            if self._preempted and not self._preemption_reported:
                self._preemption_reported = True
                logger.warning("[step=%d] SIGTERM: asking the chief for an emergency checkpoint", step)
                self.flush_report(step, preempted=True)
            self._run_due(step, session)
            if step >= self._stop_step:
                run_context.request_stop()
        now = self._clock()
        if now >= self._next_report:
            self.flush_report(step)
        else:
            self._arm(now)

    def _arm(self, now) -> None:
        """Makes the session call this hook again when the next report is due."""
        alarm = self._session._alarm
        if alarm is None or alarm.pending is None or alarm.pending > self._next_report:
            self._session.wake_in(self._next_report - now)

    def _quiet_until(self):
        # Reports every run (report_interval=0) keep every run; otherwise the alarm wakes
        # the session for each report, and runs in between only compare the step.
        return 0 if self._interval <= 0 else self._next_step

    def _run_due(self, step, session):
        due = []
        with self._lock:
            while self._actions and self._actions[0][0] <= step:
                due.append(heapq.heappop(self._actions))
            self._next_step = min(self._actions[0][0] if self._actions else _NEVER, self._stop_step)
        for planned, kind, fetches, every in due:
            if every:  # a rule: the next occurrence is known here, no announcement needed
                with self._lock:
                    nxt = planned + every * max(1, -(-(step - planned) // every))
                    heapq.heappush(self._actions, (nxt, kind, fetches, every))
                    self._next_step = min(self._actions[0][0], self._stop_step)
                if planned < step and (step - planned) % every == 0:
                    planned = step
            if planned < step:
                logger.warning("[step=%d] the plan for step %d arrived late; skipping it", step, planned)
                if kind == CHECKPOINT:
                    self._skipped.append(planned)
            elif kind == CHECKPOINT and self.writes:
                self._save(session, step)
            elif kind == SUMMARY and self.worker_index == 0:
                self._outputs[step] = _host_values(resolve_fetches(
                    {name: name for name in fetches if name in session.outputs}, session.outputs, step))
        if due:
            self._next_report = 0.0

    def _save(self, session, step, final=False):
        ck = self.spec.checkpoint
        writer = self._writer
        self._check_writer()
        estimate = getattr(self, "_last_nbytes", 0)
        # The final save waits for room even with in_flight="skip", as AsyncCheckpointSaverHook.end
        # does: skipping it would end the run on an older checkpoint than its last step.
        wait = final or not ck.asynchronous or ck.in_flight == "wait"
        # The final, emergency and stop-step saves are the run's last: they wait for no commit.
        exempt = final or self._preempted or step >= self._stop_step
        if not (exempt or self._room_at_chief(step, wait)) or not writer.admit(estimate, wait=wait):
            self._skipped.append(step)
            return
        started = time.perf_counter()
        with final_snapshot() if final or self._preempted else contextlib.nullcontext():
            snapshot = session.saver.snapshot()
        stall = time.perf_counter() - started
        self._last_nbytes = snapshot.nbytes
        store, index = self._store, self.worker_index
        shard_prefix = None if index == 0 else "%s.worker%d" % (store.prefix_for(step), index)

        def persist():
            began = time.perf_counter()
            try:
                files = store.write_data(step, snapshot.tensors, prefix=shard_prefix, on_bytes=writer.advance)
            except BaseException:
                with self._lock:  # never reported, so never settled: it waits for nobody
                    if step in self._unsettled:
                        self._unsettled.remove(step)
                    self._settled.notify_all()
                raise
            finally:
                snapshot.done()
            health = {"stall_ms": 1e3 * stall, "persist_secs": time.perf_counter() - began,
                      "bytes": sum(f["bytes"] for f in files.values()), "retries": self.retries,
                      "failed_saves": self.failed_saves}
            with self._lock:
                self._shards.append((step, index, files, health))
            self._next_report = 0.0
            self._wake()  # the chief commits once every shard is reported: report it at the next step
            return files

        with self._lock:
            # Not when the chief settled this step already: another writer skipped it (all_workers_write)
            # before this one got here, so it never commits and nothing would settle it again.
            if step > self._settled_upto:
                self._unsettled.append(step)
        future = writer.submit(step, estimate, persist)
        if not ck.asynchronous:
            try:
                future.result()
            except BaseException:
                if not self._check_writer():  # raises under on_write_error='raise'
                    raise

    def _room_at_chief(self, step, wait) -> bool:
        """Whether fewer than `max_in_flight + 1` of this writer's saves wait for the chief
        (to commit them and run `after_save`).

        Without `wait`, answers at once. With it, waits for room, reporting this
        worker's durable shards as they come (the chief commits nothing it has not
        heard of); once the run stops at or before `step`, the save goes ahead (it is
        the last one), and an aborted worker saves nothing (False).
        """
        limit = self.spec.checkpoint.max_in_flight + 1

        def answer():
            if self._aborted:  # a peer failed: this worker stops with no save (its stop step is 0)
                return False
            if len(self._unsettled) < limit or self._chief_failed or self._preempted or self._stop_step <= step:
                return True  # an emergency or last save waits for no commit
            if not wait:
                logger.info("[step=%d] checkpoint skipped: the chief has not yet committed steps %s and run "
                            "their after_save (a commit and its listeners take longer than the save period)",
                            step, self._unsettled)
                return False
            return None

        return self._wait_for_chief(step, answer, lambda: logger.warning(
            "[step=%d] training waits for the chief to commit steps %s and run their after_save: a commit and "
            "its listeners take longer than the save period (in_flight='wait' and CheckpointSaverHook wait for "
            "them, as TF1 does; AsyncCheckpointSaverHook with in_flight='skip' skips saves instead)",
            step, self._unsettled))

    def _wait_for_chief(self, step, answer, warn):
        """Calls `answer()` under the lock each time the chief settles saves (or an interval passes),
        until it gives something other than None; meanwhile reports this worker's durable shards
        (the chief commits nothing it has not heard of) and calls `warn()` once, after
        SLOW_CHIEF_WARN_SECS."""
        started, warned = self._clock(), False
        while True:
            with self._lock:
                result = answer()
                if result is not None:
                    return result
                self._settled.wait(self._interval if self._interval > 0 else 0.05)
                unreported = bool(self._shards)
            if self._writer is not None and self._writer.failed:
                self._check_writer()  # raises under on_write_error='raise'
            now = self._clock()
            if unreported or now >= self._next_report:
                self.flush_report(step)
            if not warned and now - started >= SLOW_CHIEF_WARN_SECS:
                warned = True
                warn()

    def flush_report(self, step, wait=False, preempted=False) -> None:
        if self._writer is not None and self._writer.failed:
            self._check_writer()
        with self._lock:
            shards, self._shards = self._shards, []
            if not self._chief_failed:  # a failed chief settles nothing: keep only what may still commit
                self._reported.extend(sh for sh in shards if sh[0] > self._settled_upto)
        failed, self._failed = tuple(self._failed), []
        outputs, self._outputs = self._outputs, {}
        skipped, self._skipped = self._skipped, []
        stop, self._stop_requested = self._stop_requested, False
        metrics = _scalar_metrics(self._session.outputs) if self.worker_index == 0 else {}
        args = (self.worker_index, step, time.time(), outputs, shards, metrics, stop, tuple(skipped), preempted,
                failed)
        if wait:
            self._transport.report_and_wait(*args)
        else:
            self._transport.report(*args)
        now = self._clock()
        with self._lock:
            self._next_report = now + self._interval
            if self._report_by > now:  # a deadline hint that arrived while this report was made
                self._next_report = min(self._next_report, self._report_by)
            if self._shards:
                # Shards that came while this report was made (a save turned durable, or a restarted
                # chief asked for them again) must not wait a report interval for the next one.
                self._next_report = 0.0
        if self._session is not None:
            self._arm(now)

    def end(self, session):
        if self._aborted:
            if self._writer is not None:
                self._writer.wait_idle()
            return
        step = session.global_step
        self.flush_report(step)
        for action in self._transport.worker_end(self.worker_index, step):
            if action.kind == CHECKPOINT and self.writes:
                self._save(session, step, final=True)
        if self._writer is not None:
            self._writer.wait_idle_with_progress("worker %d: uploading checkpoints to %s"
                                                 % (self.worker_index, self._store.url))
            self._check_writer()
            self._writer.close()
        self.flush_report(step, wait=True)  # the chief has every shard before the driver asks it to finish
        self._await_settled(step)

    def _await_settled(self, step) -> None:
        """Waits until the chief has settled every shard this writer reported: committed it (and run
        after_save) or let it go. A chief that restarts meanwhile hears of them again from here,
        as this worker's loop no longer reports; without that the run's last checkpoint could be
        lost with the chief. A failed chief or an aborted run waits for nothing."""
        def answer():
            return True if not (self._reported or self._shards) or self._aborted or self._chief_failed else None
        self._wait_for_chief(step, answer, lambda: logger.warning(
            "[step=%d] worker %d waits at its end for the chief to commit steps %s and run their after_save",
            step, self.worker_index, sorted({shard[0] for shard in self._reported})))


def _host_values(values: dict) -> dict:
    return {k: (v.numpy() if hasattr(v, "numpy") else v) for k, v in values.items()}


def _scalar_metrics(outputs: dict) -> dict:
    """The step's scalar outputs, as plain floats: what chief-only hooks can fetch."""
    out = {}
    for name, value in outputs.items():
        if hasattr(value, "numpy"):
            if getattr(value, "shape", None) not in ((), None):
                continue
            value = value.numpy()
        if isinstance(value, (int, float)) or (hasattr(value, "shape") and value.shape == () and
                                               value.dtype.kind in "biuf"):
            out[name] = float(value)
    return out


class WorkerContext:
    """What `train_fn` receives: who this worker is, and the session to train in."""

    def __init__(self, worker_index, num_workers, spec, transport, hooks, report_interval=0.25):
        self.worker_index = worker_index
        self.num_workers = num_workers
        self.spec = spec
        self.agent = WorkerAgent(worker_index, spec, transport, report_interval)
        self._hooks = list(hooks or [])

    @property
    def is_chief(self):
        return self.worker_index == 0

    def session(self, state=None, global_step=None, steps_per_run=1) -> MonitoredSession:
        """The session to train in; restores the latest committed checkpoint into `state`."""
        store = self.spec.checkpoint.store if self.spec.checkpoint else None
        return MonitoredSession(hooks=self._hooks + [self.agent], state=state,
                                checkpoint_dir=self.spec.checkpoint_dir, summary_dir=self.spec.summary_dir,
                                global_step=global_step, steps_per_run=steps_per_run,
                                restore_store=store, is_chief=self.worker_index == 0,
                                worker_index=self.worker_index, num_workers=self.num_workers,
                                restore_shard=self.worker_index if self.spec.checkpoint is not None
                                and self.spec.checkpoint.all_workers_write else None)


class WorkerError(RuntimeError):
    """A worker's `train_fn` raised; the message holds the worker's traceback.

    The same on both backends. `original` is the exception itself (on Ray, where it
    pickles); `launch` raises this error from it, so `err.__cause__` is what
    `train_fn` raised.
    """

    def __init__(self, worker_index, formatted_traceback, original=None):
        super().__init__(worker_index, formatted_traceback, original)
        self.worker_index = worker_index
        self.formatted_traceback = formatted_traceback
        self.original = original

    def __str__(self):
        return ("worker %d failed; checkpoints committed before it stay committed. The worker's traceback:\n%s"
                % (self.worker_index, self.formatted_traceback))
