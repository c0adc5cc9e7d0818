"""`CheckpointSaverHook`, `AsyncCheckpointSaverHook` and `CheckpointSaverListener`.

One save, as both hooks run it:

    listeners.before_save(session, S)
    snapshot = saver.snapshot()          # the only part the loop waits for (async)
    background: write data files, write manifest, rewrite `checkpoint`, retention
    listeners.after_save(session, S)     # only once S is committed

`CheckpointSaverHook` keeps TF1's blocking meaning: the run that triggers a
save returns after S is committed and `after_save` ran. `AsyncCheckpointSaverHook`
returns right after the snapshot; `after_save` runs at the first run that ends
after S is committed (or at `end`), in the training thread, and a stop it
requests is honoured. Where TF1's async hook read variables while training
moved on, the snapshot here is consistent: it holds the state after step S.
"""

import contextlib
import gc
import logging
import signal
import threading
import time
import weakref

from rayhooks.checkpoints import CheckpointStore, RetentionPolicy
from rayhooks.savers import as_saver
from rayhooks.session_run_hook import SessionRunHook
from rayhooks.snapshot import final_snapshot
from rayhooks.storage import Storage
from rayhooks.summary_writer import SummaryWriterCache
from rayhooks.timer import NEVER_STEP, SecondOrStepTimer
from rayhooks.writer import BackgroundWriter, background_error

logger = logging.getLogger("rayhooks")

# Signal -> (the handler in place before any hook installed one, hooks listening). One
# handler per signal serves every hook: hooks install and remove themselves in any order,
# each hears the signal, and the last one out puts the process's own handler back. Hooks
# are held weakly: one whose session was dropped without being closed must not keep the
# process from hearing its own handler.
_signal_hooks = {}


def _dispatch_signal(signum, frame):
    # A dropped session's hook sits in reference cycles (bound methods it handed out): only
    # the cycle collector frees it, and a long-lived one waits for a rare full collection.
    gc.collect()
    previous, hooks = _signal_hooks.get(signum, (None, ()))
    listening = list(hooks)
    for hook in listening:
        hook._on_signal(signum, frame)
    if listening:
        return
    # Every hook that listened is gone without closing its session: the signal is the
    # process's again, and this delivery goes where it would have gone without the hooks.
    _signal_hooks.pop(signum, None)
    previous = signal.SIG_DFL if previous is None else previous
    signal.signal(signum, previous)
    if callable(previous):
        previous(signum, frame)
    elif previous == signal.SIG_DFL:
        signal.raise_signal(signum)  # the default action, e.g. SIGTERM ends the process


def _next_due(timer):
    """(the first step that can trigger `timer`, the clock reading from which it can, or None).

    A step schedule names its step; a seconds schedule that has triggered names
    its time (any step ending after it); before the first trigger, any step.
    """
    nxt = timer.next_step_trigger()
    if nxt is not None:
        return nxt, None
    at = timer.next_time_trigger()
    return (0, None) if at is None else (NEVER_STEP, at)


class Preempted(SystemExit):
    """Raised as a run stopped by a preemption signal ends, after its emergency checkpoint and `end` hooks.

    A preempted run is not a finished one: uncaught, this exits the process with
    status 128 + the signal's number (143 for SIGTERM), as the signal itself would
    have, so that a job system (a Kubernetes Job, a RayJob) runs it again, and the
    run resumes from `checkpoint`. Catch it to go on in the same process.
    """

    def __init__(self, signum: int, step: int, checkpoint=None, result=None):
        super().__init__(128 + int(signum))
        self.signum, self.step, self.checkpoint, self.result = int(signum), step, checkpoint, result

    def __reduce__(self):
        return type(self), (self.signum, self.step, self.checkpoint, self.result)

    def __str__(self):
        name = signal.Signals(self.signum).name if self.signum in set(signal.Signals) else str(self.signum)
        if self.checkpoint is None:
            return ("preempted by %s at step %d, with no checkpoint committed: running the same command again "
                    "starts over" % (name, self.step))
        return ("preempted by %s at step %d; run the same command again to resume from the newest committed "
                "checkpoint, %s" % (name, self.step, self.checkpoint))


def preempted(signum: int, step: int, checkpoint, result=None) -> Preempted:
    """The exception that ends a preempted run, logged, as SystemExit's own exit prints nothing."""
    error = Preempted(signum, step, checkpoint, result)
    logger.warning("[step=%d] %s; exiting with status %d", step, error, error.code)
    return error


# TF1's hook ignores what after_save returns for the save it makes as the session is created.
IGNORED_FIRST_STOP = ("a CheckpointSaverListener asked to stop after the save made as the session was created; "
                      "ignored, as TF1's CheckpointSaverHook ignores it")


class CheckpointSaverListener:
    """Callbacks around each save of a checkpoint hook. Every method is optional.

    `after_save` may return True to request a stop; the run then stops after
    the current step, on every worker, and `end` hooks run as usual.
    """

    def begin(self):
        pass

    def before_save(self, session, global_step_value):
        pass

    def after_save(self, session, global_step_value):
        pass

    def end(self, session, global_step_value):
        pass


def _checked_signals(signals) -> tuple:
    if not signals:
        return ()
    if isinstance(signals, (int, signal.Signals)):
        raise TypeError("save_on_signals takes a tuple of signals, e.g. (signal.SIGTERM,), got %r" % (signals,))
    signals = tuple(signals)
    for sig in signals:
        if isinstance(sig, bool) or not isinstance(sig, int):
            raise TypeError("save_on_signals takes signal numbers such as signal.SIGTERM, got %r" % (sig,))
    uncatchable = {getattr(signal, name) for name in ("SIGKILL", "SIGSTOP") if hasattr(signal, name)}
    for sig in signals:
        if sig in uncatchable or sig not in signal.valid_signals():
            raise ValueError("save_on_signals: %r cannot be caught by a process; SIGTERM is what job systems "
                             "send before they stop one" % (sig,))
    return signals


def _checked_listeners(listeners) -> list:
    if listeners is None:
        return []
    if isinstance(listeners, CheckpointSaverListener) or hasattr(listeners, "after_save"):
        raise TypeError("listeners= takes a list of listeners; pass [%s]" % type(listeners).__name__)
    listeners = list(listeners)
    for listener in listeners:
        if isinstance(listener, type):
            raise TypeError("listeners holds the class %s, not a listener: pass an instance, %s(...)"
                            % (listener.__name__, listener.__name__))
        missing = [m for m in ("begin", "before_save", "after_save", "end") if not callable(getattr(listener, m, None))]
        if missing:
            raise TypeError("listeners holds a %s, which has no %s; subclass rh.CheckpointSaverListener"
                            % (type(listener).__name__, ", ".join(missing)))
    return listeners


class CheckpointSaverHook(SessionRunHook):
    """Saves checkpoints every N steps or seconds; TF1's signature, any fsspec URL.

    rayhooks' keyword-only extras: `max_to_keep` and
    `keep_checkpoint_every_n_hours` (retention, as `tf.train.CheckpointManager`),
    `storage_options` (for fsspec), `retry` (a `RetryPolicy`), `clock`,
    `on_write_error` ("raise", the default: a save that fails after its
    retries stops the run; "retry_next_save": it is logged and counted in
    `failed_saves`, and training goes on) and `save_on_signals` (the signals
    that save at the next step boundary and stop the run; SIGTERM by default,
    `()` for none; the session then raises `Preempted` as it closes).
    """

    _what = "checkpoint save"

    def __init__(self, checkpoint_dir, save_secs=None, save_steps=None, saver=None,
                 checkpoint_basename="model.ckpt", scaffold=None, listeners=None, save_graph_def=True,
                 *, max_to_keep=5, keep_checkpoint_every_n_hours=None, storage_options=None,
                 retry=None, clock=None, on_write_error="raise", save_on_signals=(signal.SIGTERM,)):
        logger.info("Create %s.", type(self).__name__)
        if saver is not None and scaffold is not None:
            raise ValueError("You cannot provide both saver and scaffold.")
        if on_write_error not in ("raise", "retry_next_save"):
            raise ValueError("on_write_error must be 'raise' (stop the run at the failed save; the default) "
                             "or 'retry_next_save' (log it, keep training, try again at the next save); "
                             "got %r" % (on_write_error,))
        self._on_write_error = on_write_error
        self._save_on_signals = _checked_signals(save_on_signals)
        self._listening = set()  # the signals this hook hears through the shared handler
        self._preempted = False
        self._ending = False
        self._created_at = None  # the step of the save made as the session was created
        self._signal = signal.SIGTERM
        self.preempted_by = None  # (signal, step) once a signal stopped the run
        self._session_handle = None
        self.failed_saves = 0
        self._failed_step = None  # the step of the last save that failed under retry_next_save
        self._saver = as_saver(saver)
        self._scaffold = scaffold
        self._checkpoint_dir = checkpoint_dir
        self._timer = SecondOrStepTimer(every_secs=save_secs, every_steps=save_steps, clock=clock,
                                        names=("save_secs", "save_steps"))
        self._listeners = _checked_listeners(listeners)
        self._save_graph_def = save_graph_def
        self._steps_per_run = 1
        self.retries = 0
        self._health = {}
        self.store = CheckpointStore(Storage(checkpoint_dir, storage_options, retry, on_retry=self._count_retry),
                                     checkpoint_basename,
                                     RetentionPolicy(max_to_keep, keep_checkpoint_every_n_hours),
                                     clock=clock or time.time)
        self._save_path = self.store.storage.url_of(checkpoint_basename)
        self._writer = None
        self._summary_writer = None
        self._graph_written = False
        self._due = 0
        self._due_at = None  # with a seconds schedule: the clock reading from which it can trigger
        self.last_stall_secs = None

    def _set_steps_per_run(self, steps_per_run):
        self._steps_per_run = steps_per_run

    def begin(self):
        self._install_signal_handlers()
        self.store.storage.check_writable()
        self.store.refuse_foreign()
        self.store.claim()  # before the session reads what to resume from
        self._writer = self._new_writer()
        self._summary_writer = SummaryWriterCache.get(self._checkpoint_dir, self.store.storage.storage_options)
        for listener in self._listeners:
            listener.begin()

    def _new_writer(self):
        return BackgroundWriter(self._what)

    # -- preemption -------------------------------------------------------------

    def _install_signal_handlers(self):
        """On SIGTERM (preemption), save at the next step boundary and stop.

        Only the main thread may set signal handlers; elsewhere this is a no-op
        and the process's own handling applies.
        """
        if not self._save_on_signals or threading.current_thread() is not threading.main_thread():
            return
        for sig in self._save_on_signals:
            if sig not in _signal_hooks:
                _signal_hooks[sig] = (signal.signal(sig, _dispatch_signal), weakref.WeakSet())
            elif signal.getsignal(sig) is not _dispatch_signal:
                # Replaced since a hook put ours there (ray.init does, as may the user): ours
                # goes back, and theirs is the one the last hook out restores.
                _signal_hooks[sig] = (signal.signal(sig, _dispatch_signal), _signal_hooks[sig][1])
            _signal_hooks[sig][1].add(self)
            self._listening.add(sig)

    def _on_signal(self, signum, frame):
        # Runs between bytecodes of the training thread: only set flags here.
        self._preempted = True
        self._signal = signum
        self._due = 0
        if self._session_handle is not None:
            self._session_handle.wake()

    def _restore_signal_handlers(self):
        if threading.current_thread() is not threading.main_thread():
            return  # only the main thread may; a session closed elsewhere leaves ours in place
        for sig in self._listening:
            previous, hooks = _signal_hooks.get(sig, (None, weakref.WeakSet()))
            hooks.discard(self)
            if not hooks and sig in _signal_hooks:
                del _signal_hooks[sig]
                signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._listening = set()

    def _emergency_save(self, run_context):
        step = run_context.session.global_step
        logger.warning("[step=%d] preemption signal received: saving a checkpoint now and stopping", step)
        self._preempted = False
        if self._writer.wait_idle():
            self._drain(run_context.session)
        if step != self._last_saved_step():
            CheckpointSaverHook._save(self, run_context.session, step, final=True)
            self._timer.update_last_triggered_step(step)
            self._last_checkpoint_step = step  # what the async hook's `end` compares with
        self.preempted_by = (self._signal, step)  # the session raises Preempted once it closed
        run_context.request_stop()

    def _last_saved_step(self):
        return self._timer.last_triggered_step()

    def _drain(self, session):
        """Runs after_save for saves completed in the background (the async hook has some)."""
        return False

    def _check_writer(self):
        """Raises a failed background save, or logs it under on_write_error='retry_next_save'."""
        failure = self._writer.take_error()
        if failure is not None:
            failed_step, exc = failure
            e = background_error(self._writer.what, failed_step, exc)
            if self._on_write_error == "raise":
                raise e from exc
            self.failed_saves += 1
            self._failed_step = failed_step  # `end` saves again if this was the last step
            if self._ending:  # no save follows: say what the run ends with (no I/O: storage may be down)
                logger.error("%s; it was the run's last save (on_write_error='retry_next_save', %d failed in all): "
                             "the newest committed checkpoint is %s", e, self.failed_saves,
                             getattr(self._session_handle, "latest_checkpoint", None) or "none")
            else:
                logger.error("%s; training goes on and the next save retries (on_write_error='retry_next_save', "
                             "%d failed so far)", e, self.failed_saves)
            return False
        return True

    def _flush_summaries(self, step):
        """The events this hook wrote (CHECKPOINT logs, checkpoint/* health), at `end`."""
        try:
            self._summary_writer.flush()
        except OSError as e:
            if self._on_write_error == "raise":
                raise
            # The run chose to outlast storage failures: these scalars are not worth failing it for.
            logger.error("[step=%d] the checkpoint hook's summaries could not be written (%s); its checkpoints "
                         "are not affected (on_write_error='retry_next_save')", step, e)

    def _final_save_due(self, last_step, last_saved):
        return last_step != last_saved or self._failed_step == last_step

    def _get_saver(self, session):
        saver = self._saver
        if saver is None and self._scaffold is not None:
            saver = as_saver(self._scaffold.saver)
        if saver is None:
            saver = session.saver
        if saver is None:
            raise ValueError("%s has nothing to save: pass state= to the session, or saver= to the hook"
                             % self._checkpoint_dir)
        return saver

    def after_create_session(self, session, coord):
        step = session.global_step
        self._created_at = None
        self._ending = False
        self.preempted_by = None
        committed = self.store.get(step) if session.latest_checkpoint else None
        if committed is not None:
            # The session just restored this very checkpoint. TF1 saved it again; rayhooks
            # never rewrites a committed checkpoint (TF restores lazily created variables,
            # such as optimizer slots, from those files later), so it only replays the
            # listener calls TF1 makes here.
            self._replay_save(session, step, committed)
        else:
            self._created_at = step
            self._save(session, step)  # a stop it asks for is ignored, as TF1 ignored it
        self._timer.update_last_triggered_step(step)
        self._due = 0  # the first run still writes the graph
        self._session_handle = session

    def _replay_save(self, session, step, info):
        for listener in self._listeners:
            listener.before_save(session, step)
        self._last_checkpoint_step = step
        return self._after_commit(session, step, info, saved=False)

    def after_run(self, run_context, run_values):
        step = run_context.session.global_step
        if step < self._due and (self._due_at is None or self._timer.clock() < self._due_at):
            return  # the per-step path: a compare (and a clock read), no I/O (DESIGN I4)
        if self._preempted:
            self._emergency_save(run_context)
            return
        if self._save_graph_def and not self._graph_written:
            self._graph_written = True
            self._write_graph(run_context.original_args.fetches)
        if self._timer.should_trigger_for_step(step):
            self._timer.update_last_triggered_step(step)
            if self._save(run_context.session, step):
                run_context.request_stop()
        self._due, self._due_at = _next_due(self._timer)
        if self._preempted:  # a signal during the save above: its `_due = 0` must not be overwritten
            self._due = 0

    def _quiet_until(self):
        return self._due

    def _quiet_deadline(self):
        at = self._due_at
        return None if at is None or self._due == 0 else (self._timer.clock, at)

    def end(self, session):
        # The handlers stay until the final save is committed: a SIGTERM now (a preemption as
        # the run closes) must not kill the process mid-save; the save under way covers it.
        # The directory's claim is released by the session (`_release_claims`), once every
        # hook has ended: only then is it known whether the run finished, failed or was preempted.
        try:
            last_step = session.global_step
            if self._final_save_due(last_step, self._settle_for_end(session)):
                self._ending = True  # its failure has no next save to retry it
                CheckpointSaverHook._save(self, session, last_step, progress=True)
            self._writer.close()
            self._flush_summaries(last_step)
            for listener in self._listeners:
                listener.end(session, last_step)
        finally:
            self._end_signal_handling(session)

    def _settle_for_end(self, session):
        """Waits for what is in flight; returns the last step saved (the final save is due unless it is the last)."""
        return self._timer.last_triggered_step()

    def _end_signal_handling(self, session):
        self._restore_signal_handlers()
        if self._preempted and self.preempted_by is None:  # a signal during `end`, or after the last step
            self._preempted = False
            self.preempted_by = (self._signal, session.global_step)

    # -- one save --------------------------------------------------------------

    def _snapshot_and_submit(self, session, step, wait, final=False, announce=False):
        """before_save, snapshot, hand to the writer; returns the future, or None if skipped.

        `announce`: log TF1's "Saving checkpoints for" line, where TF1's hook logged it (after before_save).
        """
        writer = self._writer
        self._check_writer()
        # Until one snapshot was taken its size is unknown: reserve the whole budget.
        estimate = getattr(self, "_last_nbytes", None)
        if estimate is None:
            estimate = writer.max_in_flight_bytes or 0
        if not writer.admit(estimate, wait=wait):
            return None
        try:
            self._on_admitted(session)
            logger.info("[step=%d] Calling checkpoint listeners before saving checkpoint %d...", step, step)
            for listener in self._listeners:
                listener.before_save(session, step)
            if announce:
                logger.info("[step=%d] Saving checkpoints for %d into %s.", step, step, self._save_path)
            started = time.perf_counter()
            with final_snapshot() if final else contextlib.nullcontext():
                snapshot = self._get_saver(session).snapshot()
            self.last_stall_secs = time.perf_counter() - started
        except BaseException:
            writer.release(estimate)
            raise
        self._last_nbytes = snapshot.nbytes
        writer.adjust(snapshot.nbytes - estimate)
        estimate = snapshot.nbytes
        store = self.store

        stall = self.last_stall_secs

        def persist_and_commit():
            began = time.perf_counter()
            try:
                files = store.write_data(step, snapshot.tensors, on_bytes=writer.advance)
                persisted = time.perf_counter() - began
                info = store.commit(step, files)
            finally:
                snapshot.done()
            logger.info("[step=%d] Saved checkpoint %s (%.1f MB) in %.2fs; the training loop waited %.1f ms.",
                        step, info.url, info.nbytes / 1e6, time.perf_counter() - began, 1e3 * stall)
            self._health[step] = {"stall_ms": 1e3 * stall, "persist_secs": persisted, "bytes": info.nbytes,
                                  "MBps": info.nbytes / 1e6 / persisted if persisted > 0 else 0.0}
            return info

        return writer.submit(step, estimate, persist_and_commit)

    def _save(self, session, step, progress=False, final=False):
        """Saves `step` and waits until it is committed; True if a listener asked to stop.

        With `progress` (the final save), a wait over a second shows a bar of the bytes left;
        `final`: the run's last save (its end, a preemption).
        """
        future = self._snapshot_and_submit(session, step, wait=True, final=final or progress, announce=True)
        if progress:
            self._wait_for_uploads()
        try:
            info = future.result()
        except Exception:
            if self._check_writer():
                raise
            return False
        self._writer.completed.clear()
        return self._after_commit(session, step, info)

    def _wait_for_uploads(self):
        self._writer.wait_idle_with_progress("uploading checkpoints to %s" % self.store.url)

    def _count_retry(self, url, exc):
        self.retries += 1

    def _write_health(self, step):
        """Checkpointing cost as TensorBoard scalars beside the loss curve."""
        health = dict(self._health.pop(step, {}))
        health.update(skipped_saves=getattr(self, "skipped_saves", 0), failed_saves=self.failed_saves,
                      retries=self.retries)
        self._summary_writer.add_summary({"checkpoint/" + k: float(v) for k, v in health.items()}, step)

    def _after_commit(self, session, step, info, saved=True):
        session.latest_checkpoint = info.url
        # At most once per step, even across a restart (I3).
        self.store.mark_listeners_started(step, self._on_write_error)
        self._summary_writer.add_session_log("CHECKPOINT", step, checkpoint_path=self._save_path)
        if saved:  # a resumed run's restored checkpoint cost nothing now; its run wrote its health
            self._write_health(step)
        logger.info("[step=%d] Calling checkpoint listeners after saving checkpoint %d...", step, step)
        should_stop = False
        for listener in self._listeners:
            if listener.after_save(session, step):
                logger.info("[step=%d] A CheckpointSaverListener requested that training be stopped. "
                            "listener: %s", step, listener)
                should_stop = True
        return should_stop

    def _on_admitted(self, session):
        """Called once a save has room, before `before_save`."""

    def _write_graph(self, step_fn):
        from rayhooks import graphs
        graphs.write_step_graph(step_fn, self.store.storage, self._summary_writer)


class AsyncCheckpointSaverHook(CheckpointSaverHook):
    """Saves checkpoints in the background; the loop waits only for the host copy.

    Same arguments as `CheckpointSaverHook`, plus keyword-only:
      in_flight: "skip" (TF1's behaviour: a save that finds the previous one
        still being written is skipped, logged and counted in `skipped_saves`)
        or "wait" (the loop waits for room).
      max_in_flight: snapshots held in memory at once (default 1). Under
        `launch`, a writer also holds at most `max_in_flight + 1` saves the
        chief has not yet committed and run `after_save` on: a slower
        listener holds back the saves (skipped or waited for, by `in_flight`).
      max_in_flight_bytes: byte budget for those snapshots (default: no limit
        beyond `max_in_flight`). A save is admitted by the size of the
        previous snapshot (the whole budget before the first): the first save
        after the state grew (optimizer slots made at the first step) can go
        over it by that growth, once.
    """

    _what = "asynchronous checkpoint save"

    def __init__(self, checkpoint_dir, save_secs=None, save_steps=None, saver=None,
                 checkpoint_basename="model.ckpt", scaffold=None, listeners=None, save_graph_def=True,
                 *, in_flight="skip", max_in_flight=1, max_in_flight_bytes=None, **kwargs):
        if in_flight not in ("skip", "wait"):
            raise ValueError("in_flight must be 'skip' (TF1's behaviour) or 'wait', got %r" % (in_flight,))
        super().__init__(checkpoint_dir, save_secs, save_steps, saver, checkpoint_basename, scaffold,
                         listeners, save_graph_def, **kwargs)
        self._in_flight = in_flight
        self._max_in_flight = max_in_flight
        self._max_in_flight_bytes = max_in_flight_bytes
        self._last_checkpoint_step = None
        self._stop_from_listeners = False
        self.skipped_saves = 0
        self._session = None
        BackgroundWriter("check", max_in_flight, max_in_flight_bytes)  # validates now, not at begin()

    def _new_writer(self):
        return BackgroundWriter(self._what, self._max_in_flight, self._max_in_flight_bytes)

    def after_create_session(self, session, coord):
        self._session = session
        self._writer.on_complete = session.wake  # its after_save runs at the next step boundary
        super().after_create_session(session, coord)

    def _quiet_until(self):
        return 0 if self._writer.completed else self._due

    def after_run(self, run_context, run_values):
        if self._writer.completed and self._dispatch_completed(run_context.session):
            run_context.request_stop()
        super().after_run(run_context, run_values)

    def _save(self, session, step):
        self._stop_from_listeners = self._dispatch_completed(session)
        future = self._snapshot_and_submit(session, step, wait=self._in_flight == "wait")
        if future is None:
            self.skipped_saves += 1
            logger.info("[step=%d] Saver thread still in progress, skipping checkpoint (%d skipped so far).",
                        step, self.skipped_saves)
        else:
            self._last_checkpoint_step = step
        return self._stop_from_listeners

    def _on_admitted(self, session):
        # A save that waited for room lets the previous one finish first: its
        # after_save runs now, so listeners see before/after pairs in TF1's order.
        self._stop_from_listeners = self._dispatch_completed(session) or self._stop_from_listeners

    def _dispatch_completed(self, session):
        """Runs after_save for every checkpoint committed since the last call."""
        self._check_writer()
        should_stop = False
        completed = self._writer.completed
        while completed:
            step, info = completed.popleft()
            if self._after_commit(session, step, info):
                if step == self._created_at:
                    logger.info("[step=%d] %s", step, IGNORED_FIRST_STOP)
                else:
                    should_stop = True
        return should_stop

    def _drain(self, session):
        return self._dispatch_completed(session)

    def _last_saved_step(self):
        return self._last_checkpoint_step

    def _settle_for_end(self, session):
        self._wait_for_uploads()
        self._dispatch_completed(session)
        return self._last_checkpoint_step
