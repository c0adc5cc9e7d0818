"""TF differential tests (DESIGN tier 3, invariant I7 "TF fidelity").

For the same run and schedule, rayhooks in local mode must make the same
hook and listener calls, save the same steps, write the same summaries and
session logs, request the same stops and end at the same global step as
`tf.compat.v1.train`'s hooks. Each test runs one `Spec` twice, once under
TF1 (`tests/tf1_reference.py`, a real graph and `tf.compat.v1.train`
hooks) and once under rayhooks (`run_rayhooks` below, a numpy step
function), each side with its own fake clock advanced by the same amount per
run, and compares everything the two runs left behind.

Deliberate differences, and how the tests treat them:

* `AsyncCheckpointSaverHook`: rayhooks runs `after_save(S)` only once S is
  committed, at the first run that ends after that (or at `end`), so its
  position in the trace relative to the hook calls is not TF1's sync
  position. With `in_flight="wait"` no save is skipped, so the saved steps,
  the `before_save`/`after_save` steps and the CHECKPOINT logs are TF1's;
  only the interleaving differs, and the test compares everything else.
* `steps_per_run`: TF1 has no public switch; its `CheckpointSaverHook` and
  `StepCounterHook` take it through the private `_set_steps_per_run` (what
  TPUEstimator used), and only those two hooks are compared. TF1's
  `StopAtStepHook` and `SummarySaverHook` assume one step per run (they
  compute "stale step + 1"): with 4 steps per run and last_step=8, TF1 stops
  at 12 where rayhooks stops at 8, so they are left out of that scenario.

Where TF1 needs help to be deterministic (the cached global-step read, the
patched clock of `basic_session_run_hooks`), `tests/tf1_reference.py` says how.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import difflib

import numpy as np
import pytest
import tensorflow as tf

import rayhooks as rh
from tf1_reference import FakeClock, Spec, collect, run_tf1

pytestmark = pytest.mark.timeout(120)

FIELDS = ("trace", "runs", "stop_requested", "final_step", "files_steps", "state_steps", "latest_step",
          "loss_summaries", "rate_summaries", "session_logs")


# -- the rayhooks side ------------------------------------------------------------------------------

class RecordingHook(rh.SessionRunHook):
    """The rayhooks twin of tf1_reference's recording hook (same entries, same clock advance)."""

    def __init__(self, trace, clock, spec):
        self._trace = trace
        self._clock = clock
        self._secs = spec.secs_per_step
        self._coord_stop = spec.coord_stop_at_create

    def begin(self):
        self._trace.append(("begin",))

    def after_create_session(self, session, coord):
        self._trace.append(("after_create_session", int(session.global_step)))
        if self._coord_stop:
            coord.request_stop()

    def before_run(self, run_context):
        self._trace.append(("before_run", int(run_context.session.global_step)))
        self._clock.advance(self._secs)

    def after_run(self, run_context, run_values):
        self._trace.append(("after_run", int(run_context.session.global_step)))

    def end(self, session):
        self._trace.append(("end", int(session.global_step)))


class RecordingListener(rh.CheckpointSaverListener):
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


def run_rayhooks(spec: Spec, checkpoint_dir: str, clock, async_wait=False, end_of_input=None):
    """Runs `spec` under rayhooks, mirroring `tf1_reference.run_tf1` hook for hook."""
    trace = []
    k = spec.steps_per_run
    state = {"w": np.zeros((), np.float32)}
    inputs = iter(range(spec.input_runs if spec.input_runs is not None else 1 << 30))

    def train_step():
        try:
            next(inputs)
        except StopIteration:
            if end_of_input is StopIteration:
                raise
            raise tf.errors.OutOfRangeError(None, None, "End of sequence") from None
        loss = float(state["w"])
        state["w"][...] += k
        return {"loss": loss}

    url = "file://" + checkpoint_dir
    listeners = [RecordingListener(trace, spec.stop_after_save_at)] if spec.listener else []
    hooks = []
    if spec.last_step is not None or spec.num_steps is not None:
        hooks.append(rh.StopAtStepHook(num_steps=spec.num_steps, last_step=spec.last_step))
    if spec.extra_stop_last_step is not None:
        hooks.append(rh.StopAtStepHook(last_step=spec.extra_stop_last_step))
    hooks.append(RecordingHook(trace, clock, spec))

    if spec.defaults:
        assert not async_wait
        kwargs = dict(log_step_count_steps=spec.log_step_count_steps)
        if spec.save_steps is not None or spec.save_secs is not None:
            kwargs.update(save_checkpoint_steps=spec.save_steps, save_checkpoint_secs=spec.save_secs)
        if spec.summary_steps is not None or spec.summary_secs is not None:
            kwargs.update(save_summaries_steps=spec.summary_steps, save_summaries_secs=spec.summary_secs)
        session = rh.MonitoredTrainingSession(
            checkpoint_dir=url, hooks=hooks, scaffold=rh.Scaffold(summary_op=["loss"]), state=state,
            steps_per_run=k, clock=clock, **kwargs)
    else:
        chief_only = []
        if spec.log_step_count_steps:
            chief_only.append(rh.StepCounterHook(every_n_steps=spec.log_step_count_steps, output_dir=url,
                                                 clock=clock))
        if spec.summary_steps is not None or spec.summary_secs is not None:
            chief_only.append(rh.SummarySaverHook(save_steps=spec.summary_steps, save_secs=spec.summary_secs,
                                                  output_dir=url, summary_op="loss", clock=clock))
        if spec.save_steps is not None or spec.save_secs is not None:
            if async_wait:
                chief_only.append(rh.AsyncCheckpointSaverHook(
                    url, save_secs=spec.save_secs, save_steps=spec.save_steps, listeners=listeners,
                    save_graph_def=False, in_flight="wait", max_to_keep=spec.max_to_keep, clock=clock))
            else:
                chief_only.append(rh.CheckpointSaverHook(
                    url, save_secs=spec.save_secs, save_steps=spec.save_steps, listeners=listeners,
                    save_graph_def=False, max_to_keep=spec.max_to_keep, clock=clock))
        session = rh.MonitoredTrainingSession(
            checkpoint_dir=url, hooks=hooks, chief_only_hooks=chief_only, save_checkpoint_secs=None,
            save_checkpoint_steps=None, save_summaries_steps=None, save_summaries_secs=None,
            log_step_count_steps=None, state=state, steps_per_run=k, clock=clock)
    runs, stop_requested = 0, None  # stays None when the input ends
    with session as sess:
        while not sess.should_stop() and runs < spec.max_runs:
            sess.run(train_step)
            runs += 1
        stop_requested = sess.should_stop()
    final_step = next(e[1] for e in reversed(trace) if e[0] == "end")
    rh.SummaryWriterCache.clear()  # flushes the events; the next session opens a new file
    return collect(checkpoint_dir, trace, runs, stop_requested, final_step)


# -- running both and comparing ---------------------------------------------------------------------

@pytest.fixture
def run_both(tmp_path):
    """run_both(*specs, **run_rayhooks_kwargs) -> [(tf1 outcome, rayhooks outcome)] per session.

    Successive specs are successive sessions on the same directory (the second
    resumes from the first's checkpoints); each side keeps its clock running.
    """
    tf1_dir, rh_dir = tmp_path / "tf1", tmp_path / "rh"
    tf1_dir.mkdir()
    rh_dir.mkdir()
    tf1_clock, rh_clock = FakeClock(1000.0), rh.ManualClock(1000.0)

    def run(*specs, **kwargs):
        out = []
        for spec in specs:
            tf1 = run_tf1(spec, str(tf1_dir), tf1_clock)
            ours = run_rayhooks(spec, str(rh_dir), rh_clock, **kwargs)
            out.append((tf1, ours))
        return out

    yield run
    tf.compat.v1.summary.FileWriterCache.clear()
    rh.SummaryWriterCache.clear()


def _diff(name, expected, actual):
    if name == "trace":
        lines = difflib.unified_diff([repr(e) for e in expected], [repr(e) for e in actual],
                                     "tf.compat.v1.train", "rayhooks", lineterm="")
        return "\n".join(lines)
    return "tf.compat.v1.train: %r\nrayhooks:           %r" % (expected, actual)


def assert_same(tf1, ours, fields=FIELDS):
    problems = []
    for name in fields:
        expected, actual = getattr(tf1, name), getattr(ours, name)
        if name in ("loss_summaries", "rate_summaries"):
            same = len(expected) == len(actual) and all(
                s1 == s2 and np.isclose(v1, v2, rtol=1e-6) for (s1, v1), (s2, v2) in zip(expected, actual))
        else:
            same = expected == actual
        if not same:
            problems.append("%s differs:\n%s" % (name, _diff(name, expected, actual)))
    assert not problems, "\n\n".join(problems)


def checkpoint_steps_saved(outcome):
    return [e[1] for e in outcome.trace if e[0] == "before_save"]


# -- 1. save_steps with StopAtStepHook(last_step) -------------------------------------------------------

@pytest.mark.parametrize("spec, saved", [
    pytest.param(Spec(save_steps=3, last_step=10), [0, 3, 6, 9, 10], id="every3-last10-final-save-in-end"),
    pytest.param(Spec(save_steps=3, last_step=9), [0, 3, 6, 9], id="every3-last9-no-resave-in-end"),
    pytest.param(Spec(save_steps=1, last_step=4), [0, 1, 2, 3, 4], id="every-step"),
    pytest.param(Spec(save_steps=50, last_step=5), [0, 5], id="schedule-longer-than-run"),
])
def test_save_steps_schedule(run_both, spec, saved):
    [(tf1, ours)] = run_both(spec)
    assert checkpoint_steps_saved(tf1) == saved  # the reference itself behaves as documented
    assert tf1.files_steps == saved and tf1.stop_requested
    assert_same(tf1, ours)


def test_retention_keeps_the_same_checkpoints(run_both):
    [(tf1, ours)] = run_both(Spec(save_steps=2, last_step=9, max_to_keep=2))
    assert tf1.files_steps == [8, 9] and tf1.state_steps == [8, 9] and tf1.latest_step == 9
    assert_same(tf1, ours)


# -- 2. save_secs with a fake clock ---------------------------------------------------------------------

@pytest.mark.parametrize("spec, saved", [
    pytest.param(Spec(save_secs=5, secs_per_step=2, last_step=12), [0, 3, 6, 9, 12], id="5s-at-2s-per-step"),
    pytest.param(Spec(save_secs=3, secs_per_step=1.5, last_step=10), [0, 2, 4, 6, 8, 10],
                 id="3s-at-1.5s-per-step"),
    pytest.param(Spec(save_secs=1, secs_per_step=4, last_step=5), [0, 1, 2, 3, 4, 5],
                 id="every-step-slower-than-schedule"),
    pytest.param(Spec(save_secs=100, secs_per_step=1, last_step=5), [0, 5], id="initial-and-final-only"),
])
def test_save_secs_schedule(run_both, spec, saved):
    [(tf1, ours)] = run_both(spec)
    # Also guards the harness: had TF1's timer read the real clock, no 3 s would ever pass.
    assert checkpoint_steps_saved(tf1) == saved
    assert_same(tf1, ours)


# -- 3. a listener's after_save asks to stop ------------------------------------------------------------

@pytest.mark.parametrize("spec, final", [
    pytest.param(Spec(save_steps=2, last_step=20, stop_after_save_at=(4,)), 4, id="stop-at-4"),
    pytest.param(Spec(save_steps=2, last_step=7, stop_after_save_at=(0,)), 7,
                 id="stop-at-initial-save-is-ignored"),
    pytest.param(Spec(save_steps=2, last_step=5, stop_after_save_at=(5,)), 5, id="stop-at-final-save"),
    pytest.param(Spec(save_secs=3, secs_per_step=2, last_step=30, stop_after_save_at=(4,)), 4,
                 id="stop-on-a-seconds-schedule"),
    pytest.param(Spec(save_steps=3, max_runs=20, stop_after_save_at=(6,)), 6, id="stop-without-stop-hook"),
])
def test_listener_requests_stop(run_both, spec, final):
    [(tf1, ours)] = run_both(spec)
    assert tf1.final_step == final and tf1.stop_requested
    assert_same(tf1, ours)


# -- 4. StopAtStepHook: num_steps, last_step, both, none ------------------------------------------------

@pytest.mark.parametrize("spec, final", [
    pytest.param(Spec(save_steps=3, num_steps=4), 4, id="num-steps"),
    pytest.param(Spec(save_steps=3, last_step=0), 1, id="last-step-already-reached-runs-once"),
    pytest.param(Spec(save_steps=3, num_steps=7, extra_stop_last_step=5), 5, id="earliest-of-two-wins"),
    pytest.param(Spec(save_steps=3, last_step=8, extra_stop_last_step=8), 8, id="two-hooks-same-step"),
    pytest.param(Spec(save_steps=4, max_runs=6), 6, id="no-stop-hook-loop-bound"),
])
def test_stop_at_step(run_both, spec, final):
    [(tf1, ours)] = run_both(spec)
    assert tf1.final_step == final
    assert tf1.stop_requested == (spec.last_step is not None or spec.num_steps is not None)
    assert_same(tf1, ours)


def test_coordinator_stop_at_creation_runs_no_step(run_both):
    [(tf1, ours)] = run_both(Spec(save_steps=3, last_step=10, coord_stop_at_create=True))
    assert tf1.runs == 0 and tf1.stop_requested and checkpoint_steps_saved(tf1) == [0]
    assert_same(tf1, ours)


@pytest.mark.parametrize("end_of_input", [tf.errors.OutOfRangeError, StopIteration])
@pytest.mark.parametrize("spec", [
    pytest.param(Spec(save_steps=3, input_runs=7, summary_steps=2), id="input-ends-at-7"),
    pytest.param(Spec(save_steps=3, input_runs=6), id="input-ends-on-a-save-step"),
    pytest.param(Spec(save_steps=3, input_runs=0), id="no-input-at-all"),
])
def test_end_of_input_ends_the_run_cleanly(run_both, spec, end_of_input):
    # TF1's MonitoredSession swallows OutOfRangeError at exit and still runs `end`;
    # rayhooks also accepts StopIteration. The failing run gets before_run, never after_run.
    [(tf1, ours)] = run_both(spec, end_of_input=end_of_input)
    assert tf1.runs == spec.input_runs and tf1.final_step == spec.input_runs
    assert tf1.trace[-1] == ("end", spec.input_runs)
    assert [e for e in tf1.trace if e[0] in ("before_run", "after_run")][-1] == ("before_run", spec.input_runs)
    assert_same(tf1, ours)


# -- 5. a second session resumes from the first's checkpoints ------------------------------------------

@pytest.mark.parametrize("first, second, start", [
    pytest.param(Spec(save_steps=3, last_step=7), Spec(save_steps=3, num_steps=5), 7, id="num-steps-after-resume"),
    pytest.param(Spec(save_steps=3, last_step=7), Spec(save_steps=3, last_step=12), 7, id="last-step-after-resume"),
    pytest.param(Spec(save_steps=3, last_step=7), Spec(save_steps=3, last_step=7), 7,
                 id="last-step-already-reached"),
    pytest.param(Spec(save_steps=4, last_step=6, summary_steps=2),
                 Spec(save_steps=4, last_step=13, summary_steps=2), 6, id="with-summaries"),
    pytest.param(Spec(save_secs=5, secs_per_step=2, last_step=7),
                 Spec(save_secs=5, secs_per_step=2, num_steps=6), 7, id="seconds-schedule"),
    pytest.param(Spec(save_steps=3, last_step=9, max_to_keep=2),
                 Spec(save_steps=3, num_steps=7, max_to_keep=2), 9, id="retention-across-sessions"),
    pytest.param(Spec(defaults=True, save_steps=4, summary_steps=2, log_step_count_steps=3, last_step=10),
                 Spec(defaults=True, save_steps=4, summary_steps=2, log_step_count_steps=3, last_step=20), 10,
                 id="default-hooks"),
])
def test_resume_continues_from_saved_step(run_both, first, second, start):
    [(tf1_a, ours_a), (tf1_b, ours_b)] = run_both(first, second)
    assert_same(tf1_a, ours_a)
    assert ("after_create_session", start) in tf1_b.trace
    assert_same(tf1_b, ours_b)


# -- 6. steps_per_run -----------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", [
    pytest.param(Spec(save_steps=4, log_step_count_steps=5, steps_per_run=3, max_runs=6), id="save-steps"),
    pytest.param(Spec(save_steps=3, log_step_count_steps=2, steps_per_run=3, max_runs=5), id="aligned"),
    pytest.param(Spec(save_secs=5, log_step_count_steps=4, steps_per_run=2, secs_per_step=2, max_runs=7),
                 id="save-secs"),
])
def test_steps_per_run(run_both, spec):
    [(tf1, ours)] = run_both(spec)
    assert tf1.final_step == spec.steps_per_run * spec.max_runs
    assert tf1.rate_summaries  # the step counter did record rates
    assert_same(tf1, ours)


# -- 7. SummarySaverHook --------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", [
    pytest.param(Spec(summary_steps=2, last_step=7, listener=False), id="every-2-steps"),
    pytest.param(Spec(summary_steps=1, last_step=4, listener=False), id="every-step"),
    pytest.param(Spec(summary_secs=3, secs_per_step=1, last_step=10, listener=False), id="every-3s"),
    pytest.param(Spec(summary_secs=2, secs_per_step=0.75, last_step=10, listener=False), id="every-2s-at-0.75s"),
    pytest.param(Spec(summary_steps=3, save_steps=4, last_step=10), id="with-checkpoints"),
])
def test_summary_saver(run_both, spec):
    [(tf1, ours)] = run_both(spec)
    assert tf1.loss_summaries and tf1.loss_summaries[0][0] == 1
    assert [log for log in tf1.session_logs if log[0] == "START"] == [("START", 1)]
    # The loss is w before the step, and w counts steps: the value summarised at step s is s - 1.
    assert all(value == step - 1 for step, value in tf1.loss_summaries)
    assert_same(tf1, ours)


# -- 8. MonitoredTrainingSession's default hooks -------------------------------------------------------

@pytest.mark.parametrize("spec", [
    pytest.param(Spec(defaults=True, save_secs=3, summary_secs=2, log_step_count_steps=4, last_step=12,
                      secs_per_step=1.25), id="secs"),
    pytest.param(Spec(defaults=True, log_step_count_steps=100, last_step=5), id="all-defaults"),
])
def test_default_hooks(run_both, spec):
    [(tf1, ours)] = run_both(spec)
    assert tf1.files_steps and tf1.loss_summaries
    if spec.log_step_count_steps < spec.last_step:
        assert tf1.rate_summaries
    assert_same(tf1, ours)


def test_default_hooks_retention_and_rates(run_both):
    spec = Spec(defaults=True, save_steps=4, summary_steps=2, log_step_count_steps=3, last_step=25,
                secs_per_step=0.5)
    [(tf1, ours)] = run_both(spec)
    # TF1's default Saver keeps 5, as rayhooks' default max_to_keep.
    assert tf1.files_steps == [12, 16, 20, 24, 25] and tf1.state_steps == [12, 16, 20, 24, 25]
    # 3 steps every 1.5 fake seconds: 2 steps/sec, from the second trigger on.
    assert [step for step, _ in tf1.rate_summaries] == [4, 7, 10, 13, 16, 19, 22, 25]
    assert all(rate == 2.0 for _, rate in tf1.rate_summaries)
    assert_same(tf1, ours)


# -- AsyncCheckpointSaverHook against TF1's sync hook ----------------------------------------------------

@pytest.mark.parametrize("spec", [
    pytest.param(Spec(save_steps=3, last_step=10), id="every3-last10"),
    pytest.param(Spec(save_steps=2, last_step=8), id="every2-last8"),
    pytest.param(Spec(save_steps=3, last_step=10, max_to_keep=2), id="with-retention"),
])
def test_async_saver_with_wait_saves_what_tf1_sync_saves(run_both, spec):
    [(tf1, ours)] = run_both(spec, async_wait=True)
    # Everything but the trace is TF1's; in the trace, the hook calls are TF1's ...
    assert_same(tf1, ours, fields=tuple(f for f in FIELDS if f != "trace"))
    listener_kinds = ("listener.begin", "before_save", "after_save", "listener.end")
    hook_calls = lambda o: [e for e in o.trace if e[0] not in listener_kinds]  # noqa: E731
    assert hook_calls(ours) == hook_calls(tf1)
    # ... and the listener calls are TF1's, except that after_save(S) may come later
    # (at the first run after S is committed): compare each kind in order.
    for kind in listener_kinds:
        assert [e for e in ours.trace if e[0] == kind] == [e for e in tf1.trace if e[0] == kind], kind
    for entry in ours.trace:
        if entry[0] == "after_save":
            assert ours.trace.index(("before_save", entry[1])) < ours.trace.index(entry)
    assert ours.trace.index(ours.listener_calls()[-1]) > max(
        ours.trace.index(e) for e in ours.trace if e[0] == "after_save")
