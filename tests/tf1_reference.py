"""The TF1 side of the differential tests (DESIGN tier 3, invariant I7).

`run_tf1(spec, checkpoint_dir, clock)` trains a tiny graph under
`tf.compat.v1.train.MonitoredTrainingSession` with `tf.compat.v1.train`'s own
hooks and returns an `Outcome`: the trace of hook and listener calls, the
checkpoints left on disk and in the state file, the summaries and session
logs in the events file, and the final global step. `tests/test_tf_differential.py`
runs the same `Spec` under rayhooks and compares the two outcomes.

Two things make TF1 deterministic here:

* the train op depends on the hooks' cached global-step read
  (`training_util._get_or_create_global_step_read()`), so every hook's
  "global step before the run" is read before the increment, never after;
* TF1's `SecondOrStepTimer` calls `time.time()` of the
  `basic_session_run_hooks` module; that module attribute is replaced, for the
  duration of the run, by a namespace whose `time()` is the test's fake clock.

The trace records, in call order: ("begin",), ("after_create_session", step),
("before_run", step before the run), ("after_run", step after it),
("end", step) from a recording hook placed last in `hooks`, and
("listener.begin",), ("before_save", step), ("after_save", step),
("listener.end", step) from a recording checkpoint listener. The recording
hook advances the fake clock by `spec.secs_per_step` in its `before_run`:
every hook's `before_run` sees the time before the step, every `after_run`
the time after it.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import dataclasses
import glob
import re
import time
import types
from typing import List, Optional, Tuple
from unittest import mock

import tensorflow as tf
from tensorflow.python.training import basic_session_run_hooks, training_util

LOSS_TAG = "loss"
RATE_TAG = "global_step/sec"


@dataclasses.dataclass(frozen=True)
class Spec:
    """One run, in terms both sides understand.

    With `defaults=True` the session's default hooks do the work
    (`save_checkpoint_steps`/`_secs`, `save_summaries_steps`/`_secs`,
    `log_step_count_steps`); otherwise those defaults are off and the same
    settings build explicit `CheckpointSaverHook`, `SummarySaverHook` and
    `StepCounterHook`s in `chief_only_hooks`, in the order
    `MonitoredTrainingSession` would add them.
    """

    save_steps: Optional[int] = None
    save_secs: Optional[float] = None
    summary_steps: Optional[int] = None
    summary_secs: Optional[float] = None
    log_step_count_steps: Optional[int] = None
    last_step: Optional[int] = None          # StopAtStepHook(last_step=...)
    num_steps: Optional[int] = None          # StopAtStepHook(num_steps=...)
    extra_stop_last_step: Optional[int] = None  # a second StopAtStepHook(last_step=...)
    stop_after_save_at: Tuple[int, ...] = ()  # the listener's after_save returns True at these steps
    max_runs: int = 40                       # the loop's own bound
    secs_per_step: float = 1.0
    steps_per_run: int = 1
    max_to_keep: int = 100
    defaults: bool = False
    listener: bool = True
    input_runs: Optional[int] = None         # the input ends (OutOfRangeError) in run input_runs + 1
    coord_stop_at_create: bool = False       # the recording hook calls coord.request_stop() at creation


@dataclasses.dataclass
class Outcome:
    trace: List[tuple]
    runs: int
    stop_requested: bool                     # should_stop() when the loop ended
    final_step: int
    files_steps: List[int]                   # steps with an .index file in the directory
    state_steps: List[int]                   # all_model_checkpoint_paths of the `checkpoint` state file
    latest_step: Optional[int]               # model_checkpoint_path of the state file
    loss_summaries: List[Tuple[int, float]]  # (step, value) of the "loss" scalar, in file order
    rate_summaries: List[Tuple[int, float]]  # (step, value) of "global_step/sec"
    session_logs: List[Tuple[str, int]]      # (status, step): START and CHECKPOINT, in file order

    def listener_calls(self):
        return [e for e in self.trace if e[0] in ("listener.begin", "before_save", "after_save", "listener.end")]


class FakeClock:
    """A clock whose time moves only when told to (both sides get one each)."""

    def __init__(self, start=1000.0):
        self.now = float(start)

    def __call__(self):
        return self.now

    def advance(self, secs):
        self.now += secs


# -- reading what a run left behind (either side's directory) ----------------------------------

_STEP = re.compile(r"-(\d+)$")


def _step_of(path):
    m = _STEP.search(path)
    assert m, "checkpoint path %r has no -<step> suffix" % (path,)
    return int(m.group(1))


def checkpoint_files_steps(directory):
    return sorted(_step_of(p[:-len(".index")]) for p in glob.glob(os.path.join(directory, "model.ckpt-*.index")))


def checkpoint_state(directory):
    """(all_model_checkpoint_paths steps, model_checkpoint_path step), read by TF's own reader."""
    state = tf.train.get_checkpoint_state(directory)
    if state is None:
        return [], None
    return [_step_of(p) for p in state.all_model_checkpoint_paths], _step_of(state.model_checkpoint_path)


def read_events(directory):
    """(loss scalars, global_step/sec scalars, session logs) of the events files of one session.

    The files are then moved out of the directory (to `<directory>-events/`):
    TF1 names its events file by the second it was opened, so a session that
    starts within the same second as the previous one would truncate that
    file; moving it aside also makes each outcome hold its own session only.
    """
    loss, rate, logs = [], [], []
    names = sorted(glob.glob(os.path.join(directory, "events.out.tfevents.*")))
    assert len(names) <= 1, "one session writes one events file, found %s" % names
    for path in names:
        for event in tf.compat.v1.train.summary_iterator(path):
            if event.HasField("summary"):
                for value in event.summary.value:
                    if value.HasField("simple_value"):
                        number = float(value.simple_value)
                    else:
                        number = float(tf.make_ndarray(value.tensor))
                    if value.tag == LOSS_TAG:
                        loss.append((int(event.step), number))
                    elif value.tag == RATE_TAG:
                        rate.append((int(event.step), number))
            elif event.HasField("session_log"):
                status = tf.compat.v1.SessionLog.SessionStatus.Name(event.session_log.status)
                logs.append((status, int(event.step)))
        archive = directory.rstrip("/") + "-events"
        os.makedirs(archive, exist_ok=True)
        os.rename(path, os.path.join(archive, "%d-%s" % (len(os.listdir(archive)), os.path.basename(path))))
    return loss, rate, logs


def collect(directory, trace, runs, stop_requested, final_step):
    files = checkpoint_files_steps(directory)
    state, latest = checkpoint_state(directory)
    loss, rate, logs = read_events(directory)
    return Outcome(list(trace), runs, bool(stop_requested), int(final_step), files, state, latest,
                   loss, rate, logs)


# -- the TF1 run ----------------------------------------------------------------------------------

def _recording_classes():
    class RecordingHook(tf.compat.v1.train.SessionRunHook):
        def __init__(self, trace, clock, spec):
            self._trace = trace
            self._clock = clock
            self._secs = spec.secs_per_step
            self._coord_stop = spec.coord_stop_at_create

        def begin(self):
            self._global_step = tf.compat.v1.train.get_global_step()
            self._trace.append(("begin",))

        def _step(self, session):
            return int(session.run(self._global_step))

        def after_create_session(self, session, coord):
            self._trace.append(("after_create_session", self._step(session)))
            if self._coord_stop:
                coord.request_stop()

        def before_run(self, run_context):
            self._trace.append(("before_run", self._step(run_context.session)))
            self._clock.advance(self._secs)

        def after_run(self, run_context, run_values):
            self._trace.append(("after_run", self._step(run_context.session)))

        def end(self, session):
            self._trace.append(("end", self._step(session)))

    class RecordingListener(tf.compat.v1.train.CheckpointSaverListener):
        def __init__(self, trace, stop_at):
            self._trace = trace
            self._stop_at = set(stop_at)

        def begin(self):
            self._trace.append(("listener.begin",))

        def before_save(self, session, global_step_value):
            self._trace.append(("before_save", int(global_step_value)))

        def after_save(self, session, global_step_value):
            self._trace.append(("after_save", int(global_step_value)))
            return int(global_step_value) in self._stop_at

        def end(self, session, global_step_value):
            self._trace.append(("listener.end", int(global_step_value)))

    return RecordingHook, RecordingListener


def run_tf1(spec: Spec, checkpoint_dir: str, clock: FakeClock) -> Outcome:
    """Runs `spec` under `tf.compat.v1.train`; `checkpoint_dir` may already hold a run to resume."""
    RecordingHook, RecordingListener = _recording_classes()
    trace = []
    fake_time = types.SimpleNamespace(time=clock, sleep=time.sleep)
    k = spec.steps_per_run
    with mock.patch.object(basic_session_run_hooks, "time", fake_time), tf.Graph().as_default():
        global_step = tf.compat.v1.train.get_or_create_global_step()
        w = tf.compat.v1.get_variable("w", shape=(), dtype=tf.float32,
                                      initializer=tf.compat.v1.zeros_initializer(), use_resource=True)
        # Every hook reads this cached read as "the step before the run"; making the
        # increment wait for it is what fixes that value (without it, TF1 reads the
        # step before or after the increment at random).
        read = training_util._get_or_create_global_step_read()
        loss = tf.identity(w.read_value(), name="loss_value")
        deps = [read, loss]
        if spec.input_runs is not None:
            dataset = tf.data.Dataset.range(spec.input_runs)
            deps.append(tf.compat.v1.data.make_one_shot_iterator(dataset).get_next())
        with tf.control_dependencies(deps):
            train_op = tf.group(w.assign_add(float(k)),
                                tf.compat.v1.assign_add(global_step, tf.constant(k, tf.int64)))
        loss_summary = tf.compat.v1.summary.scalar(LOSS_TAG, loss)

        listeners = [RecordingListener(trace, spec.stop_after_save_at)] if spec.listener else []
        stop_hooks = []
        if spec.last_step is not None or spec.num_steps is not None:
            stop_hooks.append(tf.compat.v1.train.StopAtStepHook(num_steps=spec.num_steps,
                                                                 last_step=spec.last_step))
        if spec.extra_stop_last_step is not None:
            stop_hooks.append(tf.compat.v1.train.StopAtStepHook(last_step=spec.extra_stop_last_step))
        hooks = stop_hooks + [RecordingHook(trace, clock, spec)]

        if spec.defaults:
            kwargs = dict(log_step_count_steps=spec.log_step_count_steps)
            if spec.save_steps is not None or spec.save_secs is not None:
                kwargs.update(save_checkpoint_steps=spec.save_steps, save_checkpoint_secs=spec.save_secs)
            if spec.summary_steps is not None or spec.summary_secs is not None:
                kwargs.update(save_summaries_steps=spec.summary_steps, save_summaries_secs=spec.summary_secs)
            # The default checkpoint hook takes no listeners: this trace has hook calls only.
            session = tf.compat.v1.train.MonitoredTrainingSession(
                checkpoint_dir=checkpoint_dir, hooks=hooks, **kwargs)
        else:
            saver = tf.compat.v1.train.Saver(max_to_keep=spec.max_to_keep)
            scaffold = tf.compat.v1.train.Scaffold(saver=saver)
            chief_only = []
            if spec.log_step_count_steps:
                counter = tf.compat.v1.train.StepCounterHook(every_n_steps=spec.log_step_count_steps,
                                                             output_dir=checkpoint_dir)
                if k != 1:
                    counter._set_steps_per_run(k)  # TF1's only (private) steps_per_run switch
                chief_only.append(counter)
            if spec.summary_steps is not None or spec.summary_secs is not None:
                chief_only.append(tf.compat.v1.train.SummarySaverHook(
                    save_steps=spec.summary_steps, save_secs=spec.summary_secs, output_dir=checkpoint_dir,
                    summary_op=loss_summary))
            if spec.save_steps is not None or spec.save_secs is not None:
                saver_hook = tf.compat.v1.train.CheckpointSaverHook(
                    checkpoint_dir, save_secs=spec.save_secs, save_steps=spec.save_steps,
                    scaffold=scaffold, listeners=listeners, save_graph_def=False)
                if k != 1:  # left alone, TF1's default (10**6) keeps its exact one-step behaviour
                    saver_hook._set_steps_per_run(k)
                chief_only.append(saver_hook)
            session = tf.compat.v1.train.MonitoredTrainingSession(
                checkpoint_dir=checkpoint_dir, scaffold=scaffold, hooks=hooks, chief_only_hooks=chief_only,
                save_checkpoint_secs=None, save_checkpoint_steps=None, save_summaries_steps=None,
                save_summaries_secs=None, log_step_count_steps=None)
        runs, stop_requested = 0, None  # stays None when the input ends
        with session as sess:
            while not sess.should_stop() and runs < spec.max_runs:
                sess.run(train_op)
                runs += 1
            stop_requested = sess.should_stop()
        final_step = next(e[1] for e in reversed(trace) if e[0] == "end")
    # Closing the cached writers flushes the events; the next session opens a new file.
    tf.compat.v1.summary.FileWriterCache.clear()
    return collect(checkpoint_dir, trace, runs, stop_requested, final_step)
