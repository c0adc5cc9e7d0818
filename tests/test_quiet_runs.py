"""Runs no hook can act on skip the hooks (`_quiet_until`), and every way a hook can need a run still works.

What the hooks do on those runs is checked against TF1 in test_tf_differential;
here: which runs reach the hooks, and the wake-ups that end a quiet stretch
(a finished background save, a timer, a subclass the session cannot vouch for).
"""

import os
import threading

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest

import rayhooks as rh
from rayhooks.handle import Alarm, SessionHandle
from rayhooks.timer import NEVER_STEP

WAIT = 30.0


def step():
    pass


class EveryTenth(rh.SessionRunHook):
    """Declares it acts only when the step after a run reaches a multiple of 10."""

    def __init__(self):
        self.after = []
        self.before = []

    def before_run(self, run_context):
        self.before.append(run_context.session.global_step)

    def after_run(self, run_context, run_values):
        self.after.append(run_context.session.global_step)

    def _quiet_until(self):
        return 0 if not self.after else (self.after[-1] // 10 + 1) * 10


def test_runs_that_no_hook_can_act_on_skip_the_hooks():
    hook = EveryTenth()
    with rh.MonitoredSession(hooks=[hook, rh.StopAtStepHook(last_step=35)]) as sess:
        while not sess.should_stop():
            sess.run(step)
        assert sess.global_step == 35
    assert hook.after == [1, 10, 20, 30, 35]          # the first run, the declared ones, the stop step
    assert hook.before == [0, 9, 19, 29, 34]


def test_a_hook_without_the_declaration_keeps_every_run_for_every_hook():
    class Plain(rh.SessionRunHook):
        def __init__(self):
            self.steps = []

        def after_run(self, run_context, run_values):
            self.steps.append(run_context.session.global_step)

    quiet, plain = EveryTenth(), Plain()
    with rh.MonitoredSession(hooks=[quiet, plain]) as sess:
        for _ in range(12):
            sess.run(step)
    assert plain.steps == list(range(1, 13))
    assert quiet.after == list(range(1, 13))


def test_a_subclass_that_overrides_after_run_is_called_on_every_run(tmp_path):
    class Counting(rh.CheckpointSaverHook):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.steps = []

        def after_run(self, run_context, run_values):
            self.steps.append(run_context.session.global_step)
            super().after_run(run_context, run_values)

    hook = Counting(str(tmp_path), save_steps=100, save_graph_def=False)
    with rh.MonitoredSession(hooks=[hook], state={"w": np.zeros(2, np.float32)}) as sess:
        for _ in range(7):
            sess.run(step)
    assert hook.steps == list(range(1, 8))


def test_a_finished_background_save_wakes_the_session_for_its_after_save(tmp_path):
    """after_save runs at the first step boundary after the commit, even in a quiet stretch."""
    seen = []

    class Listener(rh.CheckpointSaverListener):
        def after_save(self, session, global_step):
            seen.append((global_step, session.global_step))

    hook = rh.AsyncCheckpointSaverHook(str(tmp_path), save_steps=1000, listeners=[Listener()],
                                       save_graph_def=False)
    with rh.MonitoredSession(hooks=[hook], state={"w": np.ones(1000, np.float32)}) as sess:
        sess.run(step)                                  # the first run dispatches the save at creation
        assert hook._writer.wait_idle(WAIT)
        assert sess._quiet_until == 1000 or seen == [(0, 1)]
        sess.run(step)                                  # step 2: woken, so after_save(0) runs here
        assert seen == [(0, 1)] or seen == [(0, 2)]
        for _ in range(5):
            sess.run(step)
        assert len(seen) == 1


class _EveryRun(rh.SessionRunHook):
    """A hook with no declaration: the session then calls every hook on every run."""

    def after_run(self, run_context, run_values):
        pass


@pytest.mark.parametrize("steps_per_run", [1, 3])
def test_quiet_runs_save_summarise_and_stop_at_the_same_steps_as_calling_every_hook(tmp_path, steps_per_run):
    def run(directory, extra):
        directory = str(tmp_path / directory)
        sess = rh.MonitoredTrainingSession(checkpoint_dir=directory, save_checkpoint_steps=10,
                                           save_summaries_steps=7, log_step_count_steps=4,
                                           hooks=[rh.StopAtStepHook(last_step=40)] + extra,
                                           state={"w": np.zeros(2, np.float32)}, steps_per_run=steps_per_run)
        with sess:
            quiet = sess._quiet_fns is not None
            while not sess.should_stop():
                sess.run(lambda: {"loss": np.float32(1.0)})
            last = sess.global_step
        saved = [info.step for info in rh.CheckpointStore(rh.Storage(directory), "model.ckpt",
                                                          rh.RetentionPolicy(None)).committed()]
        return quiet, last, saved

    quiet, last, saved = run("quiet", [])
    every, last_every, saved_every = run("every", [_EveryRun()])
    assert quiet and not every
    assert (last, saved) == (last_every, saved_every)
    assert len(saved) >= 4


def test_alarm_calls_back_at_the_earliest_requested_time():
    fired = threading.Event()
    alarm = Alarm(fired.set)
    try:
        alarm.set(3600)
        alarm.set(0.01)                                 # earlier: replaces the pending hour
        assert fired.wait(WAIT)
        assert alarm.pending is None
        fired.clear()
        alarm.set(3600)
        alarm.set(7200)                                 # later: the hour stays
        assert alarm.pending is not None and not fired.is_set()
    finally:
        alarm.close()


def test_session_handle_wakes_and_pickles_without_its_alarm():
    import pickle
    handle = SessionHandle()
    fired = threading.Event()
    handle.wake = fired.set          # the alarm calls the handle's wake; observed here as an event
    handle.wake_in(0.0)
    assert fired.wait(WAIT)
    del handle.wake
    handle.wake()
    assert handle._woken
    copy = pickle.loads(pickle.dumps(handle))
    assert copy._alarm is None and copy._woken
    handle._close_alarm()


class _Counting(rh.SessionRunHook):
    """Counts the runs that reach the hooks; needs none itself."""

    def __init__(self):
        self.runs = 0

    def after_run(self, run_context, run_values):
        self.runs += 1

    def _quiet_until(self):
        return NEVER_STEP


class _RecordingCounter(rh.StepCounterHook):
    """A StepCounterHook that keeps the steps it logged at (its run methods are StepCounterHook's)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.logged = []

    def _log_and_record(self, elapsed_steps, elapsed_time, global_step):
        self.logged.append((global_step, elapsed_steps))


@pytest.mark.parametrize("hook_kind", ["sync", "async"])
@pytest.mark.parametrize("steps_per_run", [1, 3])
def test_seconds_schedules_skip_the_hooks_between_deadlines_and_act_where_calling_every_hook_does(
        tmp_path, steps_per_run, hook_kind):
    def run(directory, extra):
        directory = str(tmp_path / directory)
        clock = rh.ManualClock(1000.0)
        counting, counter = _Counting(), _RecordingCounter(every_n_steps=None, every_n_secs=1.5, clock=clock)
        kind = rh.CheckpointSaverHook if hook_kind == "sync" else rh.AsyncCheckpointSaverHook
        options = {} if hook_kind == "sync" else {"in_flight": "wait"}
        saver = kind(directory, save_secs=2.0, clock=clock, save_graph_def=False, max_to_keep=None, **options)
        runs = 0
        with rh.MonitoredSession(hooks=[rh.StopAtStepHook(last_step=120), saver, counter, counting] + extra,
                                 state={"w": np.zeros(2, np.float32)}, steps_per_run=steps_per_run) as sess:
            while not sess.should_stop():
                # The deadlines pass while a step runs, as they do on a real clock.
                sess.run(lambda: clock.advance(0.1 * steps_per_run))
                runs += 1
            last = sess.global_step
        saved = [info.step for info in rh.CheckpointStore(rh.Storage(directory), "model.ckpt",
                                                          rh.RetentionPolicy(None)).committed()]
        return (last, saved, counter.logged), counting.runs, runs

    quiet, quiet_calls, runs = run("quiet", [])
    every, every_calls, _ = run("every", [_EveryRun()])
    assert quiet == every
    assert len(quiet[1]) >= 6 and len(quiet[2]) >= 5
    assert every_calls == runs
    # The hooks ran on the first run, at each save and each log (and after a background
    # save finished, for the async hook), not on every run.
    assert quiet_calls <= 2 + 2 * (len(quiet[1]) + len(quiet[2])) < runs


def test_seconds_schedules_on_two_clocks_keep_every_run_for_every_hook(tmp_path):
    first, second = rh.ManualClock(0.0), rh.ManualClock(0.0)
    counting = _Counting()
    hooks = [rh.CheckpointSaverHook(str(tmp_path), save_secs=5.0, clock=first, save_graph_def=False),
             rh.StepCounterHook(every_n_steps=None, every_n_secs=5.0, clock=second), counting]
    with rh.MonitoredSession(hooks=hooks, state={"w": np.zeros(2, np.float32)}) as sess:
        for _ in range(20):
            sess.run(step)
    assert counting.runs == 20


def _summary_steps(directory, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    accumulator = EventAccumulator(directory, size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    tags = accumulator.Tags()
    if tag in tags.get("scalars", []):
        return [(e.step, e.value) for e in accumulator.Scalars(tag)]
    return [(e.step, float(np.asarray(e.tensor_proto.float_val[0]))) for e in accumulator.Tensors(tag)]


@pytest.mark.parametrize("steps_per_run", [1, 3])
def test_seconds_summaries_are_decided_before_the_step_and_written_where_calling_every_hook_does(
        tmp_path, steps_per_run):
    def run(name, extra):
        clock = rh.ManualClock(1000.0)
        counting = _Counting()
        summaries = rh.SummarySaverHook(save_secs=1.0, output_dir=str(tmp_path / name / "events"), clock=clock,
                                        summary_op="loss")
        # A checkpoint deadline that passes mid-step, between summary deadlines: those runs reach
        # the hooks after the step, where the summary hook must keep what it found before it.
        saver = rh.CheckpointSaverHook(str(tmp_path / name / "ckpt"), save_secs=1.7, clock=clock,
                                       save_graph_def=False)
        runs = 0
        with rh.MonitoredSession(hooks=[rh.StopAtStepHook(last_step=300), summaries, saver, counting] + extra,
                                 state={"w": np.zeros(2, np.float32)}, steps_per_run=steps_per_run) as sess:
            while not sess.should_stop():
                sess.run(lambda: (clock.advance(0.05 * steps_per_run), {"loss": np.float32(clock())})[1])
                runs += 1
        return _summary_steps(str(tmp_path / name / "events"), "loss"), counting.runs, runs

    quiet, quiet_calls, runs = run("quiet", [])
    every, every_calls, _ = run("every", [_EveryRun()])
    assert quiet == every
    assert len(quiet) >= 8
    assert every_calls == runs
    assert quiet_calls < runs // 2, "the seconds-based summary hook kept every run reaching the hooks"
