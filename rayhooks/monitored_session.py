"""`MonitoredSession` and `MonitoredTrainingSession` for TF2 step functions.

    with rh.MonitoredTrainingSession(checkpoint_dir="gs://bucket/run",
                                     state=tf.train.Checkpoint(model=model, optimizer=opt),
                                     hooks=[rh.StopAtStepHook(last_step=1000)]) as sess:
        while not sess.should_stop():
            sess.run(train_step, batch)

The call order of the hooks is TF1's (see `rayhooks.session_run_hook`). The
hooks are split as in a multi-worker run: chief hooks (`chief_only_hooks`,
then the default step-counter, summary and checkpoint hooks) run first, the
worker `hooks` after them, exactly the order TF1's `MonitoredTrainingSession`
builds. In local mode both lists run in this process; under `rayhooks.launch`
the chief list runs on the chief actor.

A step with no planned action does no I/O: the hooks only compare integers.
"""

import inspect
import logging
import sys

from rayhooks.basic_hooks import StopAtStepHook
from rayhooks.checkpoint_hooks import preempted
from rayhooks.coordinator import Coordinator
from rayhooks.handle import FetchKeyError, FetchTypeError, SessionHandle, as_outputs, resolve_fetches
from rayhooks.savers import as_saver
from rayhooks.session_run_hook import (SessionRunArgs, SessionRunContext, SessionRunHook, SessionRunValues,
                                       check_hooks)
from rayhooks.timer import NEVER_STEP, is_count

logger = logging.getLogger("rayhooks")

USE_DEFAULT = object()


def _overrides(hook, name):
    return getattr(type(hook), name, None) is not getattr(SessionRunHook, name)


def _is_end_of_input(exc_type) -> bool:
    """StopIteration, or TF's OutOfRangeError (looked up only if TF is loaded: numpy users never pay for it)."""
    if issubclass(exc_type, StopIteration):
        return True
    tf = sys.modules.get("tensorflow")
    errors = getattr(tf, "errors", None)
    return errors is not None and issubclass(exc_type, errors.OutOfRangeError)


class MonitoredSession:
    """Runs a step function with hooks, TF1's `MonitoredSession` contract.

    Args:
      hooks: worker hooks, run in this process on every step.
      chief_hooks: hooks that run before the worker hooks, on the chief.
      state: what checkpoints save and restore: a `tf.train.Checkpoint`,
        trackables, a dict of numpy arrays, or a saver.
      checkpoint_dir: URL restored from at creation (newest committed checkpoint).
      global_step: a variable (such as `optimizer.iterations`) read once at
        creation, when no checkpoint is restored, to start the step count.
        After that the session counts `steps_per_run` a run (TF1 read the
        variable every run); at close it warns if the variable moved otherwise
        (gradient accumulation, say, advancing it every other run).
      steps_per_run: how many training steps one `run` performs; hooks see
        the global step advance by that much per run. As in TF1, only the
        checkpoint and step-counter hooks account for it; `StopAtStepHook`
        keeps TF1's one-step arithmetic, except that rayhooks stops at the
        first run that reaches `last_step` (TF1 could run one more).
        `SummarySaverHook` triggers on the global step after each run: with
        `save_steps=4` and 3 steps a run it writes at steps 3, 9, 15, 21,
        where TF1, comparing one step ahead, wrote at 3, 12, 21.
    """

    def __init__(self, hooks=None, chief_hooks=None, state=None, checkpoint_dir=None, summary_dir=None,
                 global_step=None, steps_per_run=1, scaffold=None, restore_store=None,
                 is_chief=True, worker_index=0, num_workers=1, restore_shard=None):
        if not is_count(steps_per_run, 1):
            raise ValueError("steps_per_run must be a whole number >= 1, got %r" % (steps_per_run,))
        self._hooks = check_hooks(chief_hooks, "chief_hooks") + check_hooks(hooks)
        _refuse_two_savers_in_one_directory(self._hooks)
        self._steps_per_run = steps_per_run
        for hook in self._hooks:
            if hasattr(hook, "_set_steps_per_run"):
                hook._set_steps_per_run(steps_per_run)
        self._before = [h for h in self._hooks if _overrides(h, "before_run")]
        self._after = [h for h in self._hooks if _overrides(h, "after_run")]
        quiet = [_quiet_until_of(h) for h in self._hooks]
        self._quiet_fns = quiet if all(fn is not None for fn in quiet) else None
        self._deadline_fns = [h._quiet_deadline for h in self._hooks if hasattr(h, "_quiet_deadline")]
        self._start_deciders = [h for h in self._hooks if hasattr(h, "_quiet_start_deadline")]
        self._quiet_until = 0  # runs ending before this step need no hook (every hook said so)
        self._deadline_clock = None  # and, with a seconds schedule, ending before this clock reading
        self._deadline = 0.0
        self._start_clock = None  # and, with one decided in before_run, starting before this reading
        self._start_deadline = 0.0
        saver = (scaffold.saver if scaffold is not None and scaffold.saver is not None else None)
        self.saver = as_saver(saver if saver is not None else state)
        self.handle = SessionHandle(checkpoint_dir=checkpoint_dir, summary_dir=summary_dir,
                                    is_chief=is_chief, worker_index=worker_index, num_workers=num_workers,
                                    saver=self.saver, store=restore_store)
        self.coord = Coordinator()
        self._args_cache = (None, None)
        self._restore_shard = restore_shard
        self._should_stop = False
        self._closed = False
        self._counted_from = None
        try:
            for hook in self._hooks:
                hook.begin()
            self._create(global_step)
        except BaseException as e:
            self._close(type(e))  # no signal handler or writer thread outlives a session that never started
            raise

    def _create(self, global_step):
        step = None
        store = self.handle._store
        if store is not None and self.saver is not None:
            info = store.restore_latest(self.saver, worker=self._restore_shard)
            if info is None:
                # TF1 would resume from checkpoints another writer left there; starting from
                # fresh weights instead must not pass unnoticed (a saver hook checked at begin).
                store.refuse_foreign()
            if info is not None:
                step = info.step
                self.handle.latest_checkpoint = info.url
                logger.info("[step=%d] restored %s", step, info.url)
        if step is None and global_step is not None:
            step = _read_step(global_step)
            if step < 0:  # checkpoint names and every schedule count up from 0
                raise ValueError("global_step= reads %d; the global step starts at 0 or above" % step)
        self.handle.global_step = step or 0
        if hasattr(global_step, "assign_add"):  # a variable: checked against the runs counted at close
            try:
                self._counted_from = (global_step, _read_step(global_step), self.handle.global_step)
            except Exception:  # noqa: BLE001 -- one that cannot be read here: nothing to compare
                self._counted_from = None
        for hook in self._hooks:
            hook.after_create_session(self.handle, self.coord)

    @property
    def global_step(self) -> int:
        return self.handle.global_step

    def should_stop(self) -> bool:
        return self._should_stop or self.coord.stop_requested

    def run_step_fn(self, step_fn):
        """TF1's `run_step_fn`: calls `step_fn(step_context)` and returns what it returns.

        `step_context.run_with_hooks(step, *args)` is `run`; `step_context.session`
        is the session's `SessionHandle` (TF1 gave the raw `tf.Session`: here
        `session.run(name)` reads the last step's outputs); and
        `step_context.request_stop()` ends the `with` block cleanly, as in TF1.
        """
        names = list(inspect.signature(step_fn).parameters)
        if names != ["step_context"]:
            raise ValueError("`step_fn` may either have one `step_context` argument, or `self` and `step_context` "
                             "arguments if it's an instance method. Got %s instead." % (tuple(names),))
        return step_fn(StepContext(self.handle, self.run))

    def run(self, step_fn, *args, **kwargs):
        """Runs `step_fn(*args, **kwargs)` with the hooks; returns what it returns."""
        handle = self.handle
        stale = handle.global_step
        if stale + self._steps_per_run < self._quiet_until and not handle._woken and (
                self._start_clock is None or self._start_clock() < self._start_deadline):
            # No hook can act on this run (each declared it): only the step and its count.
            result = step_fn(*args, **kwargs)
            clock = self._deadline_clock
            if not handle._woken and (clock is None or clock() < self._deadline):
                handle.global_step = stale + self._steps_per_run
                # Always kept: `session.run(name)` in a hook's or listener's `end` reads them.
                handle.outputs = result if result.__class__ is dict else as_outputs(result)
                return result
            # Woken while the step ran (a save committed, a signal, a plan from the chief), or
            # a seconds schedule came due: the hooks see this step as usual. Their before_run
            # comes after the step, which none can tell (the hooks that decide a seconds
            # schedule in before_run are told what they would have found before the step;
            # the others decide in after_run, as TF's do): feeds are refused, and fetches
            # resolve against the step's outputs.
            return self._run_hooks(step_fn, (), {}, True, result)
        if self._should_stop:
            if self._closed:
                raise RuntimeError("Attempted to use a closed Session.")  # tf.compat.v1.Session's words
            raise RuntimeError("Run called even after should_stop requested.")
        return self._run_hooks(step_fn, args, kwargs, False, None)

    def _run_hooks(self, step_fn, args, kwargs, ran, result):
        handle = self.handle
        handle._woken = False  # before the hooks: a wake-up while they run is kept
        cached_fn, original = self._args_cache
        if cached_fn is not step_fn:
            original = SessionRunArgs(step_fn)
            self._args_cache = (step_fn, original)
        context = SessionRunContext(original, handle)
        requests = None
        for hook in self._before:
            if ran and hook in self._start_deciders:
                # The run started before its seconds deadline (checked then): not due, as
                # its before_run would have found before the step.
                hook._not_due_this_run()
                continue
            request = hook.before_run(context)
            if request is not None:
                if request.feed_dict:
                    raise ValueError("%s.before_run returned a feed_dict; TF2 step functions take "
                                     "arguments instead of feeds" % type(hook).__name__)
                if request.fetches is not None:
                    if requests is None:
                        requests = {}
                    requests[hook] = request.fetches
        stale = handle.global_step
        if not ran:
            result = step_fn(*args, **kwargs)
        handle.global_step = stale + self._steps_per_run
        if requests is None:
            # Kept even when no hook fetched: TF1 hooks call `session.run(...)` in
            # `after_run` and `end` (LoggingTensorHook(at_end=True)) and expect this step's values.
            handle.outputs = as_outputs(result)
            for hook in self._after:
                hook.after_run(context, _NO_VALUES)
        else:
            outputs = handle.outputs = as_outputs(result)
            for hook in self._after:
                fetches = requests.get(hook)
                values = _NO_VALUES if fetches is None else SessionRunValues(
                    _fetched_by(hook, fetches, outputs, stale, handle.global_step), None, None)
                hook.after_run(context, values)
        if context._stop_requested:
            self._should_stop = True
        elif self._quiet_fns is not None:
            self._quiet_until = min((fn() for fn in self._quiet_fns), default=_ALWAYS_QUIET)
            end = _earliest(fn() for fn in self._deadline_fns)
            start = _earliest(h._quiet_start_deadline() for h in self._start_deciders)
            if end is None or start is None or (end[0] is not None and start[0] not in (None, end[0])):
                self._quiet_until = 0  # schedules on two clocks: no quiet runs
                end = start = (None, 0.0)
            (self._deadline_clock, self._deadline), (self._start_clock, self._start_deadline) = end, start
        return result

    def close(self):
        self._close(None)

    def _close(self, exc_type):
        if self._closed:
            raise RuntimeError("Session is already closed.")
        self._closed = True
        self._should_stop = True  # a closed session runs nothing more
        self._quiet_until = 0
        self.handle._close_alarm()
        if exc_type is not None:
            # `end` does not run after an error; a hook's signal handler must not outlive the run.
            for hook in self._hooks:
                restore = getattr(hook, "_restore_signal_handlers", None)
                if restore is not None:
                    restore()
                writer = getattr(hook, "_writer", None)
                if writer is not None and hasattr(writer, "abandon"):
                    writer.abandon()  # a save in flight still finishes: it is a consistent checkpoint
            self._release_claims("failed")
            return
        self._check_step_count()
        ended = "failed"
        try:
            for hook in self._hooks:
                hook.end(self.handle)
            # As TF1's session close (Coordinator.join): an error a hook reported with
            # `coord.request_stop(ex)` is raised here, after the `end` hooks, never dropped (I6).
            self.coord.raise_requested_exception()
            by = next((h.preempted_by for h in self._hooks if getattr(h, "preempted_by", None)), None)
            finished = any(isinstance(h, StopAtStepHook) and h._last_step is not None
                           and self.handle.global_step >= h._last_step for h in self._hooks)
            if by is not None and not finished:  # a preempted run is not a finished one: the job must run again
                ended = "preempted"
                raise preempted(by[0], by[1], self.handle.latest_checkpoint)
            ended = "finished"
        finally:
            self._release_claims(ended)

    def _release_claims(self, ended: str) -> None:
        """The run is over: its checkpoint directory is released, saying how it ended.

        The next run then takes the directory without a warning, and a sidecar
        evaluator (`rh.checkpoints_iterator`) stops after a finished run. Not
        while a save still commits: the claim keeps fencing it.
        """
        for hook in self._hooks:
            store, writer = getattr(hook, "store", None), getattr(hook, "_writer", None)
            if store is not None and hasattr(store, "release") and not (writer is not None and writer.busy()):
                store.release(ended)

    def _check_step_count(self) -> None:
        """Warns when `global_step=` advanced otherwise than the runs counted: TF1 read it every run."""
        if self._counted_from is None:
            return
        variable, start, counted = self._counted_from
        try:
            advanced = _read_step(variable) - start
        except Exception:  # noqa: BLE001 -- a variable that cannot be read now: nothing to compare
            return
        ran = self.handle.global_step - counted
        if advanced == ran:
            return
        runs = ran // self._steps_per_run
        if runs and advanced > 0 and advanced % runs == 0:
            fix = "pass steps_per_run=%d, the steps each run made" % (advanced // runs)
        else:
            fix = ("make one whole optimizer step (every accumulated micro-batch) per run; with a loss scale "
                   "that skips steps on overflow (a Keras LossScaleOptimizer's iterations), leave global_step= "
                   "out: the run count is then the step")
        logger.warning("[step=%d] global_step= advanced by %d in this session while rayhooks counted %d steps "
                       "(%d a run): rayhooks reads global_step= only at creation and then counts runs, so its "
                       "checkpoints and summaries are numbered by runs, not by that variable; %s",
                       self.handle.global_step, advanced, ran, self._steps_per_run, fix)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc_value, tb):
        if exc_type is not None and _is_end_of_input(exc_type):
            exc_type = None
        self._close(exc_type)
        return exc_type is None


class StepContext:
    """What `MonitoredSession.run_step_fn` hands its `step_fn`, as TF1's `MonitoredSession.StepContext`."""

    def __init__(self, session, run_with_hooks):
        self._session = session
        self._run_with_hooks = run_with_hooks

    @property
    def session(self):
        return self._session

    def run_with_hooks(self, *args, **kwargs):
        return self._run_with_hooks(*args, **kwargs)

    def request_stop(self):
        """Ends the iterations: raises StopIteration, which the session's `with` block takes as a clean end."""
        raise StopIteration("step_fn has requested the iterations to stop.")


MonitoredSession.StepContext = StepContext


def _refuse_two_savers_in_one_directory(hooks) -> None:
    from rayhooks.checkpoint_hooks import CheckpointSaverHook
    savers = [h for h in hooks if isinstance(h, CheckpointSaverHook)]
    for i, first in enumerate(savers):
        for second in savers[i + 1:]:
            if first is not second and first.store.storage.same_directory(second.store.storage):
                raise ValueError(
                    "two checkpoint hooks save into %s (a %s and a %s): rayhooks takes one per directory, as "
                    "each one's clean-up would delete the other's files in flight. If yours replaces the "
                    "session's own saver, pass save_checkpoint_secs=None to MonitoredTrainingSession (TF1's "
                    "idiom); otherwise give one of them another directory"
                    % (first.store.url, type(first).__name__, type(second).__name__))


def _fetched_by(hook, fetches, outputs, stale, step):
    try:
        return resolve_fetches(fetches, outputs, stale)
    except (FetchKeyError, FetchTypeError) as e:  # not a callable fetch's own error: that one goes as it is
        raise type(e)("[step=%d] %s.before_run asked for it: %s" % (step, type(hook).__name__, e.args[0])) from None


def _read_step(global_step) -> int:
    return int(global_step.numpy() if hasattr(global_step, "numpy") else global_step)


_NO_VALUES = SessionRunValues(None, None, None)
_ALWAYS_QUIET = NEVER_STEP  # no hook at all


def _earliest(deadlines):
    """The earliest of (clock, reading) pairs (None: no deadline), as (clock or None, reading); None on two clocks."""
    clock, at = None, 0.0
    for due in deadlines:
        if due is None:
            continue
        if clock is None:
            clock, at = due
        elif due[0] is clock:
            at = min(at, due[1])
        else:
            return None
    return clock, at


def _quiet_until_of(hook):
    """The hook's `_quiet_until` if its run methods are those it was written for, else None.

    `_quiet_until()` returns a step: runs whose global step after the run is
    below it cannot make the hook act, so the session may skip its
    `before_run` and `after_run`. A hook on a seconds schedule also declares
    `_quiet_deadline()`, a (clock, reading) pair or None: runs ending before
    that reading cannot make it act either (it decides in `after_run`). One
    that decides in `before_run` declares `_quiet_start_deadline()` instead,
    for runs starting before the reading, and `_not_due_this_run()`, called in
    place of a `before_run` that comes after such a run's step. A subclass
    that overrides either run method (or an instance that replaces one)
    might act on any run: it is always called.
    """
    fn = getattr(hook, "_quiet_until", None)
    if fn is None:
        return None
    cls = type(hook)
    owner = next(c for c in cls.__mro__ if "_quiet_until" in vars(c))
    for name in ("before_run", "after_run"):
        if name in vars(hook) or getattr(cls, name) is not getattr(owner, name):
            return None
    return fn


def MonitoredTrainingSession(master="", is_chief=True, checkpoint_dir=None, scaffold=None, hooks=None,
                             chief_only_hooks=None, save_checkpoint_secs=USE_DEFAULT,
                             save_summaries_steps=USE_DEFAULT, save_summaries_secs=USE_DEFAULT,
                             config=None, stop_grace_period_secs=120, log_step_count_steps=100,
                             max_wait_secs=7200, save_checkpoint_steps=USE_DEFAULT, summary_dir=None,
                             save_graph_def=True, *, state=None, global_step=None, steps_per_run=1,
                             async_checkpoint=False, max_to_keep=5, keep_checkpoint_every_n_hours=None,
                             storage_options=None, clock=None):
    """TF1's `MonitoredTrainingSession`, for TF2 step functions and fsspec URLs.

    The TF1 arguments keep their meaning and defaults: on the chief, with a
    `checkpoint_dir`, a `StepCounterHook` (every `log_step_count_steps`), a
    `SummarySaverHook` (every 100 steps unless told otherwise) and a
    `CheckpointSaverHook` (every 600 seconds unless told otherwise) are added
    after `chief_only_hooks` and before `hooks`. `master`, `config`,
    `stop_grace_period_secs` and `max_wait_secs` are accepted for
    compatibility and have no TF2 meaning.

    rayhooks' own keyword-only arguments: `state` (what to checkpoint),
    `global_step` (a step variable such as `optimizer.iterations`),
    `steps_per_run`, `async_checkpoint` (use `AsyncCheckpointSaverHook`),
    `max_to_keep` and `keep_checkpoint_every_n_hours` (retention),
    `storage_options` (passed to fsspec) and `clock` (for the timers).
    """
    from rayhooks.basic_hooks import StepCounterHook
    from rayhooks.checkpoint_hooks import AsyncCheckpointSaverHook, CheckpointSaverHook
    from rayhooks.scaffold import Scaffold
    from rayhooks.summary_hook import SummarySaverHook

    if save_summaries_steps is USE_DEFAULT and save_summaries_secs is USE_DEFAULT:
        save_summaries_steps, save_summaries_secs = 100, None
    elif save_summaries_secs is USE_DEFAULT:
        save_summaries_secs = None
    elif save_summaries_steps is USE_DEFAULT:
        save_summaries_steps = None
    if save_checkpoint_steps is USE_DEFAULT and save_checkpoint_secs is USE_DEFAULT:
        save_checkpoint_steps, save_checkpoint_secs = None, 600
    elif save_checkpoint_secs is USE_DEFAULT:
        save_checkpoint_secs = None
    elif save_checkpoint_steps is USE_DEFAULT:
        save_checkpoint_steps = None
    scaffold = scaffold or Scaffold()

    restore_store = None
    chief_hooks = []
    if is_chief:
        chief_hooks.extend(chief_only_hooks or [])
        summary_dir = summary_dir or checkpoint_dir
        if summary_dir:
            if log_step_count_steps and log_step_count_steps > 0:
                chief_hooks.append(StepCounterHook(output_dir=summary_dir, every_n_steps=log_step_count_steps,
                                                   clock=clock, storage_options=storage_options))
            if (save_summaries_steps and save_summaries_steps > 0) or (
                    save_summaries_secs and save_summaries_secs > 0):
                chief_hooks.append(SummarySaverHook(scaffold=scaffold, save_steps=save_summaries_steps,
                                                    save_secs=save_summaries_secs, output_dir=summary_dir,
                                                    clock=clock, storage_options=storage_options))
        if checkpoint_dir and ((save_checkpoint_secs and save_checkpoint_secs > 0) or (
                save_checkpoint_steps and save_checkpoint_steps > 0)):
            kind = AsyncCheckpointSaverHook if async_checkpoint else CheckpointSaverHook
            chief_hooks.append(kind(checkpoint_dir, save_steps=save_checkpoint_steps,
                                    save_secs=save_checkpoint_secs, scaffold=scaffold,
                                    save_graph_def=save_graph_def, max_to_keep=max_to_keep,
                                    keep_checkpoint_every_n_hours=keep_checkpoint_every_n_hours,
                                    clock=clock, storage_options=storage_options))
    if checkpoint_dir:
        restore_store = _restore_store(checkpoint_dir, chief_hooks + list(hooks or []), storage_options)
    return MonitoredSession(hooks=hooks, chief_hooks=chief_hooks, state=state, checkpoint_dir=checkpoint_dir,
                            summary_dir=summary_dir, global_step=global_step, steps_per_run=steps_per_run,
                            scaffold=scaffold, restore_store=restore_store, is_chief=is_chief)


def _restore_store(checkpoint_dir, hooks, storage_options):
    """The store to resume from: the checkpoint hook's own for that directory, if there is one."""
    from rayhooks.checkpoints import CheckpointStore
    from rayhooks.storage import Storage
    wanted = Storage(checkpoint_dir, storage_options)
    for hook in hooks:
        store = getattr(hook, "store", None)
        if store is not None and store.storage.same_directory(wanted):
            return store
    return CheckpointStore(wanted)
