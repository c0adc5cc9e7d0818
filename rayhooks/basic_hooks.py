"""TF1's small hooks: stop at a step, count steps, log tensors, catch NaN."""

import logging

import numpy as np

from rayhooks.handle import NO_STEP_YET
from rayhooks.session_run_hook import SessionRunArgs, SessionRunHook
from rayhooks.summary_writer import SummaryWriterCache, check_summary_writer
from rayhooks.timer import NEVER_STEP, NeverTriggerTimer, SecondOrStepTimer, is_count

logger = logging.getLogger("rayhooks")


class StopAtStepHook(SessionRunHook):
    """Requests a stop once the global step reaches `last_step` (or `num_steps` more)."""

    def __init__(self, num_steps=None, last_step=None):
        if num_steps is None and last_step is None:
            raise ValueError("One of num_steps or last_step must be specified.")
        if num_steps is not None and last_step is not None:
            raise ValueError("Only one of num_steps or last_step can be specified.")
        for name, value in (("num_steps", num_steps), ("last_step", last_step)):
            if value is not None and not is_count(value):
                raise ValueError("StopAtStepHook(%s=) must be a whole number of steps >= 0, got %r" % (name, value))
        self._num_steps = num_steps
        self._last_step = last_step

    @property
    def last_step(self):
        return self._last_step

    def after_create_session(self, session, coord):
        if self._last_step is None:
            self._last_step = session.global_step + self._num_steps

    def after_run(self, run_context, run_values):
        if run_context.session.global_step >= self._last_step:
            run_context.request_stop()

    def _quiet_until(self):
        return 0 if self._last_step is None else self._last_step


class StepCounterHook(SessionRunHook):
    """Logs and summarises steps per second as `global_step/sec`."""

    def __init__(self, every_n_steps=100, every_n_secs=None, output_dir=None, summary_writer=None,
                 *, clock=None, storage_options=None):
        if (every_n_steps is None) == (every_n_secs is None):
            raise ValueError("exactly one of every_n_steps and every_n_secs should be provided.")
        check_summary_writer(summary_writer, "StepCounterHook", ("add_scalar",))
        self._timer = SecondOrStepTimer(every_steps=every_n_steps, every_secs=every_n_secs, clock=clock,
                                        names=("every_n_secs", "every_n_steps"))
        self._summary_writer = summary_writer
        self._output_dir = output_dir
        self._storage_options = storage_options
        self._last_global_step = None
        self._steps_per_run = 1
        self._summary_tag = "global_step/sec"

    def _set_steps_per_run(self, steps_per_run):
        self._steps_per_run = steps_per_run

    def begin(self):
        if self._summary_writer is None and self._output_dir:
            self._summary_writer = SummaryWriterCache.get(self._output_dir, self._storage_options)

    def _log_and_record(self, elapsed_steps, elapsed_time, global_step):
        steps_per_sec = elapsed_steps / elapsed_time if elapsed_time > 0 else float("inf")
        if self._summary_writer is not None:
            self._summary_writer.add_scalar(self._summary_tag, steps_per_sec, global_step)
        logger.info("[step=%d] %s: %g", global_step, self._summary_tag, steps_per_sec)

    def after_run(self, run_context, run_values):
        global_step = run_context.session.global_step
        stale_global_step = global_step - self._steps_per_run
        if self._timer.should_trigger_for_step(global_step):
            elapsed_time, elapsed_steps = self._timer.update_last_triggered_step(global_step)
            if elapsed_time is not None:
                self._log_and_record(elapsed_steps, elapsed_time, global_step)
        self._last_global_step = stale_global_step

    def _quiet_until(self):
        nxt = self._timer.next_step_trigger()
        if nxt is not None:
            return nxt
        return 0 if self._timer.next_time_trigger() is None else NEVER_STEP  # seconds: see _quiet_deadline

    def _quiet_deadline(self):
        at = self._timer.next_time_trigger()
        return None if at is None else (self._timer.clock, at)


class LoggingTensorHook(SessionRunHook):
    """Logs the given step outputs every N local steps, every N seconds, or at end.

    `tensors` maps tags to fetches (names of step outputs, variables,
    callables), or is a list of output names.
    """

    def __init__(self, tensors, every_n_iter=None, every_n_secs=None, at_end=False, formatter=None,
                 *, clock=None):
        only_log_at_end = at_end and every_n_iter is None and every_n_secs is None
        if not only_log_at_end and (every_n_iter is None) == (every_n_secs is None):
            raise ValueError("either at_end and/or exactly one of every_n_iter and every_n_secs "
                             "must be provided.")
        if every_n_iter is not None and every_n_iter <= 0:
            raise ValueError("invalid every_n_iter=%s." % every_n_iter)
        if not isinstance(tensors, dict):
            self._tag_order = list(tensors)
            tensors = {item: item for item in tensors}
        else:
            self._tag_order = sorted(tensors.keys())
        self._tensors = tensors
        self._formatter = formatter
        self._timer = NeverTriggerTimer() if only_log_at_end else SecondOrStepTimer(
            every_secs=every_n_secs, every_steps=every_n_iter, clock=clock, names=("every_n_secs", "every_n_iter"))
        self._log_at_end = at_end

    def begin(self):
        self._timer.reset()
        self._iter_count = 0

    def before_run(self, run_context):
        self._should_trigger = self._timer.should_trigger_for_step(self._iter_count)
        if self._should_trigger:
            return SessionRunArgs(self._tensors)
        return None

    def _log_tensors(self, tensor_values):
        elapsed_secs, _ = self._timer.update_last_triggered_step(self._iter_count)
        with np.printoptions(suppress=True):
            if self._formatter:
                logger.info(self._formatter(tensor_values))
                return
            stats = ", ".join("%s = %s" % (tag, tensor_values[tag]) for tag in self._tag_order)
            if elapsed_secs is not None:
                logger.info("%s (%.3f sec)", stats, elapsed_secs)
            else:
                logger.info("%s", stats)

    def after_run(self, run_context, run_values):
        if self._should_trigger:
            self._log_tensors(run_values.results)
        self._iter_count += 1

    def end(self, session):
        if self._log_at_end:
            if session.outputs is NO_STEP_YET:  # TF1 ran the tensors; here no step made them
                logger.info("[step=%d] no step ran in this session: LoggingTensorHook has nothing to log at end",
                            session.global_step)
                return
            self._log_tensors(session.run(self._tensors))


class NanLossDuringTrainingError(RuntimeError):
    """Raised by `NanTensorHook(fail_on_nan_loss=True)` when the loss is NaN; a RuntimeError, as in TF1."""

    def __str__(self):
        return "NaN loss during training."


class NanTensorHook(SessionRunHook):
    """Stops training (or raises) when the loss is NaN. `loss_tensor` names a step output."""

    def __init__(self, loss_tensor, fail_on_nan_loss=True):
        self._loss_tensor = loss_tensor
        self._fail_on_nan_loss = fail_on_nan_loss

    def before_run(self, run_context):
        return SessionRunArgs(self._loss_tensor)

    def after_run(self, run_context, run_values):
        if np.isnan(run_values.results):
            failure_message = "Model diverged with loss = NaN."
            if self._fail_on_nan_loss:
                logger.error("[step=%d] %s", run_context.session.global_step, failure_message)
                raise NanLossDuringTrainingError
            logger.warning("[step=%d] %s", run_context.session.global_step, failure_message)
            run_context.request_stop()
