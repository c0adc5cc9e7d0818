"""Tiers 2 and 4: `rh.launch` end to end, 2 workers, on the local backend and on Ray.

Every scenario runs on both backends through the `backend` fixture; the Ray
ones share one Ray instance (`ray_session`). The state is a dict of numpy
arrays whose `w` counts steps: after step s, worker i holds w == s + 1000 * i,
so a checkpoint proves which step (and which worker) it came from (DESIGN I1).

Where a scenario needs a decision to reach the workers at a known step, the
workers wait for the chief's update on an Event (`_updates`): no sleeps, and
with `report_interval=0` the chief's margin is its minimum, so the step the
chief picks is exact.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import contextlib
import json
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest
import tensorflow as tf

import rayhooks as rh
from rayhooks.plan import CHECKPOINT, Planner
from test_plan import TraceListener, tf1_checkpoint_steps, tf1_summary_steps

WAIT_SECS = 120          # the longest any in-test wait may take before the test fails
MIN_MARGIN = Planner(0, []).min_margin


@pytest.fixture(params=["local", "ray"])
def backend(request):
    if request.param == "ray":
        request.getfixturevalue("ray_session")
        # Ray workers cannot import this test module (tests/ is not on their path):
        # ship its functions and classes by value.
        import ray.cloudpickle
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    return request.param


@pytest.fixture
def ckpt_dir(tmp_path):
    return "file://" + str(tmp_path / "ckpt")


def _committed(url):
    return rh.CheckpointStore(rh.Storage(url)).committed()


def _w(prefix):
    return tf.train.load_checkpoint(prefix).get_tensor("w")


# -- what runs on the workers ----------------------------------------------------------------------

def _numpy_session(ctx, state):
    return ctx.session(state=state)

def _initial_state(ctx):
    return {"w": np.full(2, 1000.0 * ctx.worker_index, np.float32)}


def _step(state):
    state["w"] += 1
    return {"loss": float(state["w"][0])}


def _result(ctx, sess, state, start, w_start):
    return {"worker": ctx.worker_index, "start": start, "w_start": w_start.tolist(), "step": sess.global_step,
            "w": state["w"].tolist()}


def _train(ctx, after_step=None, saver=None):
    """The training loop of every scenario; `after_step(ctx, step)` runs between steps."""
    state = _initial_state(ctx)
    with _numpy_session(ctx, saver(state) if saver else state) as sess:
        start, w_start = sess.global_step, state["w"].copy()
        while not sess.should_stop():
            sess.run(_step, state)
            if after_step is not None:
                after_step(ctx, sess.global_step)
    return _result(ctx, sess, state, start, w_start)


def count_steps(ctx):
    return _train(ctx)


def _updates(ctx, wanted):
    """An Event set once an update from the chief for which `wanted(update)` holds reaches this worker.

    Wraps the agent's `receive`, which both transports call with each update.
    Only updates sent after `train_fn` started are seen.
    """
    event = threading.Event()
    receive = ctx.agent.receive

    def watching(update):
        receive(update)
        if wanted(update):
            event.set()

    ctx.agent.receive = watching
    return event


def _wait(event, what):
    if not event.wait(WAIT_SECS):
        raise AssertionError("no %s from the chief within %ss" % (what, WAIT_SECS))


def _steps(result):
    return [r["step"] for r in result.worker_results]


# -- 1. step schedules ---------------------------------------------------------------------------

def test_save_steps_match_tf1_and_each_checkpoint_holds_the_state_after_its_step(backend, ckpt_dir):
    result = rh.launch(count_steps, 2, backend=backend,
                       chief_only_hooks=[rh.CheckpointSaverHook(ckpt_dir, save_steps=4)],
                       hooks=[rh.StopAtStepHook(last_step=10)])
    expected = tf1_checkpoint_steps(0, 4, 10)
    assert expected == [0, 4, 8, 10]
    assert result.checkpoints == expected
    assert _steps(result) == [10, 10]
    assert [r["w"] for r in result.worker_results] == [[10.0, 10.0], [1010.0, 1010.0]]
    infos = _committed(ckpt_dir)
    assert [i.step for i in infos] == expected
    for info in infos:
        np.testing.assert_array_equal(_w(info.url), [info.step, info.step])  # I1: the state after step S
    assert result.latest_checkpoint == infos[-1].url
    assert tf.train.latest_checkpoint(ckpt_dir) == infos[-1].url
    assert result.skipped_saves == 0


class _HeldTensors(dict):
    """Tensors whose background write waits for `gate` (the writer iterates `items()`)."""

    def __init__(self, tensors, gate):
        super().__init__(tensors)
        self.gate = gate

    def items(self):
        _wait(self.gate, "gate")
        return super().items()


class HeldSaver:
    """A NumpySaver whose writes wait until the training loop opens `gate`."""

    def __init__(self, arrays, gate):
        self.inner = rh.NumpySaver(arrays)
        self.gate = gate

    def snapshot(self):
        snapshot = self.inner.snapshot()
        return rh.Snapshot(_HeldTensors(snapshot.tensors, self.gate), snapshot.nbytes, snapshot.release)

    def restore(self, checkpoint):
        self.inner.restore(checkpoint)


def train_with_first_save_in_flight(ctx):
    """The first save stays in flight until the last step ran; then the loop ends."""
    gate = threading.Event()

    def open_gate_at_the_end(ctx, step):
        if step == 10:
            gate.set()

    return _train(ctx, open_gate_at_the_end, saver=lambda state: HeldSaver(state, gate))


def test_in_flight_skip_still_ends_with_the_final_save(backend, ckpt_dir):
    """Steps 5 and 10 find step 0 still being written and are skipped (TF1's async
    behaviour); the run must still end with step 10 committed, as the local
    AsyncCheckpointSaverHook.end does."""
    result = rh.launch(train_with_first_save_in_flight, 2, backend=backend,
                       chief_only_hooks=[rh.AsyncCheckpointSaverHook(ckpt_dir, save_steps=5, in_flight="skip")],
                       hooks=[rh.StopAtStepHook(last_step=10)])
    assert result.skipped_saves == 2
    assert result.checkpoints == [0, 10]
    assert [i.step for i in _committed(ckpt_dir)] == [0, 10]
    np.testing.assert_array_equal(_w(result.latest_checkpoint), [10, 10])


# -- 2. seconds schedule -------------------------------------------------------------------------

DEADLINE_STEP = 5


class AdvanceClockAfter(rh.SessionRunHook):
    """A chief-only hook: moves the checkpoint schedule's clock past its deadline right after `step`.

    It shares the clock object with the checkpoint hook: both sit in the one
    RunSpec the chief receives (pickled together on Ray, shared in local mode).
    """

    def __init__(self, clock, step, secs):
        self.clock, self.step, self.secs = clock, step, secs

    def after_run(self, run_context, run_values):
        if run_context.session.global_step == self.step:
            self.clock.advance(self.secs)


def train_until_a_secs_save_is_planned(ctx):
    planned = _updates(ctx, lambda u: any(a.kind == CHECKPOINT and a.step > DEADLINE_STEP
                                          for a in u.get("actions", ())))

    def wait_for_the_plan(ctx, step):
        if step == DEADLINE_STEP:  # every worker holds here, so none can pass the planned step early
            _wait(planned, "checkpoint plan")

    return _train(ctx, wait_for_the_plan)


def test_save_secs_lands_a_margin_after_the_deadline_on_every_worker(backend, ckpt_dir):
    clock = rh.ManualClock(1000.0)
    result = rh.launch(train_until_a_secs_save_is_planned, 2, backend=backend, report_interval=0,
                       chief_only_hooks=[rh.CheckpointSaverHook(ckpt_dir, save_secs=100, clock=clock),
                                         AdvanceClockAfter(clock, DEADLINE_STEP, 100)],
                       hooks=[rh.StopAtStepHook(last_step=20)])
    # The deadline passes as the chief replays worker 0's step 5; it plans the
    # furthest reported step (5) plus its margin, which with report_interval=0 is
    # the planner's minimum: the save lands MIN_MARGIN steps after the deadline.
    landed = DEADLINE_STEP + MIN_MARGIN
    assert result.checkpoints == [0, landed, 20]
    assert result.skipped_saves == 0
    assert _steps(result) == [20, 20]
    np.testing.assert_array_equal(_w(_committed(ckpt_dir)[1].url), [landed, landed])


# -- 3. a listener stops the run -------------------------------------------------------------------

class StopAfterSave(rh.CheckpointSaverListener):
    """Asks to stop once `step` is saved; logs every call to a file (it runs on the chief,
    which may be another process)."""

    def __init__(self, step, path):
        self.step, self.path = step, str(path)

    def _log(self, *event):
        with open(self.path, "a") as f:
            f.write(json.dumps(event) + "\n")

    def begin(self):
        self._log("begin")

    def before_save(self, session, step):
        self._log("before_save", step)

    def after_save(self, session, step):
        self._log("after_save", step)
        return step == self.step

    def end(self, session, step):
        self._log("end", step)


def _read_log(path):
    with open(path) as f:
        return [tuple(json.loads(line)) for line in f]


def _wait_for_stop_after(step):
    def train_fn(ctx):
        stop = _updates(ctx, lambda u: u.get("stop_step") is not None)

        def hold(ctx, at):
            if at == step:
                _wait(stop, "stop step")

        return _train(ctx, hold)
    return train_fn


def test_listener_stop_ends_every_worker_at_the_same_step(backend, ckpt_dir, tmp_path):
    log = tmp_path / "listener.jsonl"
    result = rh.launch(_wait_for_stop_after(4), 2, backend=backend, report_interval=0,
                       chief_only_hooks=[rh.CheckpointSaverHook(ckpt_dir, save_steps=4,
                                                                listeners=[StopAfterSave(4, log)])],
                       hooks=[rh.StopAtStepHook(last_step=1000)])
    stop = 4 + MIN_MARGIN  # the chief's agreed stop: ahead of both workers, held at step 4
    assert _steps(result) == [stop, stop]
    assert result.last_step == stop
    assert result.checkpoints == [0, 4, stop]  # the final save, once
    events = _read_log(log)
    assert events.count(("begin",)) == 1
    assert [e for e in events if e[0] == "end"] == [("end", stop)]
    assert [e[1] for e in events if e[0] == "after_save"] == [0, 4, stop]
    for step in (0, 4, stop):
        assert events.index(("before_save", step)) < events.index(("after_save", step))
    assert events[-1] == ("end", stop)


# -- 3b. a listener slower than the save period ---------------------------------------------------

class _Signal:
    """An Event that the chief's listener and a worker's loop can share: a threading.Event
    in one process, a Ray queue holding one item across processes."""

    def __init__(self, backend):
        self._event = None
        self._queue = None
        if backend == "ray":
            from ray.util.queue import Queue
            self._queue = Queue()
        else:
            self._event = threading.Event()

    def set(self):
        if self._event is not None:
            self._event.set()
        elif self._queue.empty():
            self._queue.put(True)

    def is_set(self):
        return self._event.is_set() if self._event is not None else not self._queue.empty()

    def __deepcopy__(self, memo):  # the local backend copies each worker's hooks: they share it
        return self

    def wait(self, timeout):
        if self._event is not None:
            return self._event.wait(timeout)
        from ray.util.queue import Empty
        try:
            self._queue.put(self._queue.get(timeout=timeout))  # put back: it stays set
        except Empty:
            return False
        return True


def _uncommitted_steps(url):
    """Steps whose data files are in the directory without a commit (the chief has not made them checkpoints)."""
    import re
    path = url[len("file://"):]
    written = {int(m.group(1)) for name in os.listdir(path)
               for m in [re.match(r"model\.ckpt-(\d+)\.data-", name)] if m}
    return sorted(written - {i.step for i in _committed(url)})


class _HoldAfterSave(StopAfterSave):
    """after_save(step) holds the chief until `release` is set (or `hold_secs` pass), then logs
    whether it was released and which written steps were still uncommitted."""

    def __init__(self, step, entered, release, hold_secs, ckpt_dir, path):
        super().__init__(None, path)
        self.held_step, self.entered, self.release, self.hold_secs = step, entered, release, hold_secs
        self.ckpt_dir = ckpt_dir

    def after_save(self, session, step):
        if step == self.held_step:
            self.entered.set()
            released = self.release.wait(self.hold_secs)
            self._log("held", step, released, _uncommitted_steps(self.ckpt_dir))
        return super().after_save(session, step)


class _ReleaseAfter(rh.SessionRunHook):
    """On worker 0: sets `release` `steps` steps after it saw `entered` set, and asks every
    worker to stop `steps` steps after that."""

    def __init__(self, entered, release, steps):
        self.entered, self.release, self.steps = entered, release, steps
        self.seen_at = None
        self.released = False

    def after_run(self, run_context, run_values):
        session = run_context.session
        if session.worker_index != 0:
            return
        step = session.global_step
        if self.seen_at is None:
            if self.entered.is_set():
                self.seen_at = step
            return
        if not self.released and step >= self.seen_at + self.steps:
            self.release.set()
            self.released = True
        if step >= self.seen_at + 2 * self.steps:
            run_context.request_stop()


def test_a_listener_slower_than_the_save_period_bounds_the_uncommitted_saves(backend, ckpt_dir, tmp_path):
    """While after_save(0) holds the chief, the worker trains 40 steps, a save due every 2: with
    in_flight="skip" it writes at most max_in_flight + 1 = 2 saves the chief has not committed and skips
    the rest (TF1's async hook skips while a save and its listeners are in progress), instead of leaving
    one uncommitted checkpoint in storage per save period. Once the listener returns, saves resume."""
    log = tmp_path / "listener.jsonl"
    entered, release = _Signal(backend), _Signal(backend)
    hold = _HoldAfterSave(0, entered, release, WAIT_SECS, ckpt_dir, log)
    result = rh.launch(count_steps, 1, backend=backend,
                       chief_only_hooks=[rh.AsyncCheckpointSaverHook(ckpt_dir, save_steps=2, listeners=[hold])],
                       hooks=[_ReleaseAfter(entered, release, 40), rh.StopAtStepHook(last_step=100000)])
    events = _read_log(log)
    (held,) = [e for e in events if e[0] == "held"]
    _, _, released, uncommitted = held
    assert released, "worker 0 never trained 40 steps while after_save(0) held the chief"
    assert len(uncommitted) in (1, 2), uncommitted
    assert result.skipped_saves >= 15
    assert result.checkpoints[-1] == result.last_step          # saves went on once the listener returned
    assert len(result.checkpoints) > 2
    assert [e[1] for e in events if e[0] == "after_save"] == result.checkpoints
    assert _uncommitted_steps(ckpt_dir) == []


def test_a_slow_listener_holds_back_a_waiting_saver_as_tf1s_does(backend, ckpt_dir, tmp_path):
    """CheckpointSaverHook (in_flight="wait") under a listener slower than the save period: the
    workers' saves wait for the chief once 2 await it, so worker 0 cannot train 10 steps while
    after_save(0) holds the chief; the listener gives up waiting for that after 3 s. Then every
    planned save is committed, none skipped (TF1 runs after_save before the loop goes on)."""
    log = tmp_path / "listener.jsonl"
    entered, reached = _Signal(backend), _Signal(backend)
    hold = _HoldAfterSave(0, entered, reached, 3.0, ckpt_dir, log)
    result = rh.launch(count_steps, 1, backend=backend,
                       chief_only_hooks=[rh.CheckpointSaverHook(ckpt_dir, save_steps=2, listeners=[hold])],
                       hooks=[_ReleaseAfter(entered, reached, 10), rh.StopAtStepHook(last_step=100000)])
    (held,) = [e for e in _read_log(log) if e[0] == "held"]
    _, _, reached_step_10, uncommitted = held
    assert not reached_step_10, "worker 0 trained 10 steps while the chief was held in after_save(0)"
    assert uncommitted == [2]  # step 4 waits for after_save(0) to return
    assert result.checkpoints == tf1_checkpoint_steps(0, 2, result.last_step)
    assert result.skipped_saves == 0


# -- 4. a worker hook stops the run --------------------------------------------------------------

class StopOnWorker(rh.SessionRunHook):
    """Requests a stop on one worker only, right after `step`."""

    def __init__(self, worker, step):
        self.worker, self.step = worker, step

    def after_run(self, run_context, run_values):
        session = run_context.session
        if session.worker_index == self.worker and session.global_step == self.step:
            run_context.request_stop()


def test_worker_request_stop_on_one_worker_stops_all_at_the_same_step(backend, ckpt_dir):
    result = rh.launch(_wait_for_stop_after(5), 2, backend=backend, report_interval=0,
                       chief_only_hooks=[rh.CheckpointSaverHook(ckpt_dir, save_steps=4)],
                       hooks=[StopOnWorker(1, 5), rh.StopAtStepHook(last_step=1000)])
    stop = 5 + MIN_MARGIN
    assert _steps(result) == [stop, stop]
    assert [r["w"][0] for r in result.worker_results] == [stop, 1000 + stop]
    assert result.checkpoints == [0, 4, stop]
    np.testing.assert_array_equal(_w(result.latest_checkpoint), [stop, stop])


# -- 5. a worker fails ---------------------------------------------------------------------------

FAIL_AT = 6


def fail_on_worker_1(ctx):
    def maybe_fail(ctx, step):
        if ctx.worker_index == 1 and step == FAIL_AT:
            raise ValueError("worker 1 broke at step %d" % step)

    return _train(ctx, maybe_fail)


def test_worker_exception_raises_its_traceback_and_keeps_committed_checkpoints(backend, ckpt_dir):
    first = rh.launch(count_steps, 2, backend=backend,
                      chief_only_hooks=[rh.CheckpointSaverHook(ckpt_dir, save_steps=2)],
                      hooks=[rh.StopAtStepHook(last_step=4)])
    assert first.checkpoints == [0, 2, 4]
    claim = rh.CheckpointStore(rh.Storage(ckpt_dir)).writer_claim
    assert claim.read()["ended"] == "finished"  # what a sidecar evaluator stops on
    with pytest.raises(Exception) as failure:
        # Keep every checkpoint: how far worker 0 runs ahead before the failure reaches it
        # varies, and retention must not be mistaken for loss.
        rh.launch(fail_on_worker_1, 2, backend=backend,
                  chief_only_hooks=[rh.CheckpointSaverHook(ckpt_dir, save_steps=2, max_to_keep=None)],
                  hooks=[rh.StopAtStepHook(last_step=1000)])
    message = str(failure.value)
    assert "worker 1" in message
    assert "Traceback" in message                      # the worker's traceback, not just the repr
    assert "in maybe_fail" in message
    assert "ValueError: worker 1 broke at step %d" % FAIL_AT in message
    # What train_fn raised, as the cause, on both backends: `except` clauses can look at it.
    assert isinstance(failure.value, rh.WorkerError) and isinstance(failure.value.__cause__, ValueError)
    assert failure.value.worker_index == 1 and isinstance(failure.value, RuntimeError)
    assert str(failure.value.__cause__) == "worker 1 broke at step %d" % FAIL_AT
    assert claim.read()["ended"] == "failed"
    store = rh.CheckpointStore(rh.Storage(ckpt_dir))
    infos = store.committed()
    assert {0, 2, 4} <= {i.step for i in infos}
    for info in infos:
        assert store.verify(info) == []
        np.testing.assert_array_equal(_w(info.url), [info.step, info.step])
    restored = {"w": np.zeros(2, np.float32)}
    latest = store.restore_latest(rh.NumpySaver(restored))
    assert latest is not None and latest.step >= 4
    np.testing.assert_array_equal(restored["w"], [latest.step, latest.step])


# -- 6. resume -------------------------------------------------------------------------------------

def test_second_launch_resumes_from_the_last_committed_step(backend, ckpt_dir):
    first = rh.launch(count_steps, 2, backend=backend,
                      chief_only_hooks=[rh.CheckpointSaverHook(ckpt_dir, save_steps=4)],
                      hooks=[rh.StopAtStepHook(last_step=6)])
    assert first.checkpoints == [0, 4, 6]
    second = rh.launch(count_steps, 2, backend=backend,
                       chief_only_hooks=[rh.CheckpointSaverHook(ckpt_dir, save_steps=4)],
                       hooks=[rh.StopAtStepHook(last_step=10)])
    assert [r["start"] for r in second.worker_results] == [6, 6]
    # Every worker restores the one committed state (worker 0's): w == 6 on both.
    assert [r["w_start"] for r in second.worker_results] == [[6.0, 6.0], [6.0, 6.0]]
    assert _steps(second) == [10, 10]
    # TF1 would save step 6 again as the session starts; rayhooks never rewrites the committed
    # checkpoint it just restored (TF restores lazily created variables from those files).
    assert tf1_checkpoint_steps(6, 4, 10) == [6, 10]
    assert second.checkpoints == [10]
    assert [i.step for i in _committed(ckpt_dir)] == [0, 4, 6, 10]
    np.testing.assert_array_equal(_w(second.latest_checkpoint), [10, 10])


# -- 7. every worker writes its shard ------------------------------------------------------------

def test_all_workers_write_commits_every_shard_as_one_checkpoint(backend, ckpt_dir):
    result = rh.launch(count_steps, 2, backend=backend, all_workers_write=True,
                       chief_only_hooks=[rh.AsyncCheckpointSaverHook(ckpt_dir, save_steps=4, in_flight="wait")],
                       hooks=[rh.StopAtStepHook(last_step=10)])
    assert result.checkpoints == [0, 4, 8, 10]
    store = rh.CheckpointStore(rh.Storage(ckpt_dir))
    for info in store.committed():
        p = info.prefix
        assert set(info.files) == {p + ".data-00000-of-00001", p + ".index",
                                   p + ".worker1.data-00000-of-00001", p + ".worker1.index"}
        manifest = json.loads(store.storage.read_bytes(p + ".manifest.json"))
        assert manifest["writers"] == [0, 1]
        assert store.verify(info) == []
        np.testing.assert_array_equal(_w(info.url), [info.step] * 2)
        np.testing.assert_array_equal(_w(info.url + ".worker1"), [1000 + info.step] * 2)


def test_all_workers_write_resume_restores_each_workers_own_shard(ckpt_dir):
    for last_step in (4, 8):
        result = rh.launch(count_steps, 2, backend="local", all_workers_write=True,
                           chief_only_hooks=[rh.CheckpointSaverHook(ckpt_dir, save_steps=4)],
                           hooks=[rh.StopAtStepHook(last_step=last_step)])
    assert [r["w_start"][0] for r in result.worker_results] == [4.0, 1004.0]


# -- 8. summaries --------------------------------------------------------------------------------

def test_summary_steps_match_tf1_and_tensorboard_reads_them(backend, ckpt_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    logdir = str(tmp_path / "logs")
    result = rh.launch(count_steps, 2, backend=backend,
                       chief_only_hooks=[rh.SummarySaverHook(save_steps=3, output_dir=logdir, summary_op=["loss"]),
                                         rh.AsyncCheckpointSaverHook(ckpt_dir, save_steps=4, in_flight="wait")],
                       hooks=[rh.StopAtStepHook(last_step=10)])
    accumulator = EventAccumulator(logdir)
    accumulator.Reload()
    scalars = accumulator.Scalars("loss")
    expected = tf1_summary_steps(0, 3, 10)
    assert expected == [1, 4, 7, 10]
    assert [e.step for e in scalars] == expected
    assert [e.value for e in scalars] == [float(s) for s in expected]  # worker 0's loss after that step
    assert result.metrics == {"loss": 10.0}
    assert result.checkpoints == tf1_checkpoint_steps(0, 4, 10)


def test_a_summary_writer_of_your_own_writes_the_summaries_with_its_settings(backend, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    logdir = str(tmp_path / "logs")
    writer = rh.SummaryWriter(logdir, flush_secs=7, max_file_bytes=0)
    rh.launch(count_steps, 2, backend=backend,
              chief_only_hooks=[rh.SummarySaverHook(save_steps=3, summary_writer=writer, summary_op=["loss"])],
              hooks=[rh.StopAtStepHook(last_step=10)])
    accumulator = EventAccumulator(logdir)
    accumulator.Reload()
    assert [e.step for e in accumulator.Scalars("loss")] == [1, 4, 7, 10]
    if backend == "local":  # the chief runs here and writes through the very object
        assert writer.file_url is not None and writer.file_url.startswith(logdir)


def test_a_summary_writer_reaches_a_ray_chief_as_its_settings(tmp_path, caplog):
    """The spec a Ray chief unpickles holds the writer's settings, not the writer (locks, threads);
    the chief makes its process's shared writer for the directory with them."""
    import pickle
    from rayhooks.spec import build_spec
    logdir = str(tmp_path / "logs")
    clock = rh.ManualClock(5.0)
    own = rh.SummaryWriter(logdir, flush_secs=7, max_file_bytes=123, clock=clock)
    spec = build_spec([rh.SummarySaverHook(save_steps=1, summary_writer=own, summary_op=["loss"])])
    try:
        assert spec.summary.make_writer() is own  # in this process: the very writer, shared
        assert rh.SummaryWriterCache.get(logdir) is own
        rh.SummaryWriterCache.clear()
        sent = pickle.loads(pickle.dumps(spec.summary))
        assert sent.writer is None
        made = sent.make_writer()
        assert made is not own and made is rh.SummaryWriterCache.get(logdir)
        assert (made.url, made.flush_secs, made.max_file_bytes, made._clock()) == (logdir, 7, 123, 5.0)
        with caplog.at_level("WARNING", logger="rayhooks"):
            assert rh.SummaryWriterCache.get(logdir, max_file_bytes=9) is made
        assert "max_file_bytes=9 ignored" in caplog.text
    finally:
        rh.SummaryWriterCache.clear()


@pytest.mark.parametrize("which", ["checkpoint", "summaries"])
def test_memory_urls_are_refused_under_ray_before_anything_starts(which):
    """memory:// lives inside one process: the chief and each Ray worker would see a store of its own,
    and the LaunchResult would name checkpoints that exist nowhere once the actors exit."""
    hooks = ([rh.CheckpointSaverHook("memory://launch-refused/run", save_steps=5)] if which == "checkpoint" else
             [rh.SummarySaverHook(save_steps=5, output_dir="memory://launch-refused/tb", summary_op=["loss"])])
    with pytest.raises(ValueError, match="memory://launch-refused/.* lives inside one process.*backend='local'"):
        rh.launch(count_steps, 1, backend="ray", chief_only_hooks=hooks, hooks=[rh.StopAtStepHook(last_step=5)],
                  ray_init_kwargs={"address": "refused-before-ray-starts:1"})


@pytest.mark.parametrize("hook, says", [
    (lambda d: rh.CheckpointSaverHook(d, save_steps=5), "put the CheckpointSaverHook in chief_only_hooks="),
    (lambda d: rh.AsyncCheckpointSaverHook(d, save_steps=5), "put the AsyncCheckpointSaverHook in chief_only_hooks="),
    (lambda d: rh.SummarySaverHook(save_steps=5, output_dir=d, summary_op=["loss"]),
     "put the SummarySaverHook in chief_only_hooks="),
    (lambda d: rh.StopAtStepHook(num_steps=3), r"give StopAtStepHook\(last_step=...\)")],
    ids=["sync", "async", "summaries", "num_steps"])
def test_hooks_that_every_worker_would_run_wrongly_are_refused_before_anything_starts(tmp_path, hook, says):
    # A saver in hooks= had every worker save into one directory at once.
    with pytest.raises(ValueError, match=says):
        rh.launch(count_steps, 2, backend="ray", hooks=[hook(str(tmp_path))],
                  ray_init_kwargs={"address": "refused-before-ray-starts:1"})


def test_a_summary_writer_under_launch_must_be_a_rayhooks_one(tmp_path):
    class FileWriterLike:  # enough for a hook in one process, not for launch's chief
        def add_summary(self, summary, global_step=None):
            pass

        def add_session_log(self, status, global_step=None):
            pass

        def flush(self):
            pass

    with pytest.raises(ValueError, match="summary_writer must be an rh.SummaryWriter"):
        rh.launch(count_steps, 1, backend="local",
                  chief_only_hooks=[rh.SummarySaverHook(save_steps=3, summary_writer=FileWriterLike(),
                                                        summary_op=["loss"])],
                  hooks=[rh.StopAtStepHook(last_step=10)])


# -- 9. MultiWorkerMirroredStrategy on Ray ---------------------------------------------------------

def _digits_model():
    import tensorflow as tf
    return tf.keras.Sequential([tf.keras.Input((64,)), tf.keras.layers.Dense(16, activation="relu"),
                                tf.keras.layers.Dense(10)])


def train_digits_mwms(ctx):
    import json as _json
    import os as _os

    import tensorflow as tf
    from sklearn.datasets import load_digits

    strategy = tf.distribute.MultiWorkerMirroredStrategy()  # reads TF_CONFIG, set by launch
    x, y = load_digits(return_X_y=True)
    x, y = (x[:256] / 16.0).astype("float32"), y[:256].astype("int64")
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    batches = iter(strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices((x, y)).batch(32).repeat().with_options(options)))
    with strategy.scope():
        tf.keras.utils.set_random_seed(0)
        model = _digits_model()
        optimizer = tf.keras.optimizers.SGD(0.1)
    per_example = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")

    @tf.function
    def train_step(iterator):
        def step(xb, yb):
            with tf.GradientTape() as tape:
                loss = tf.nn.compute_average_loss(per_example(yb, model(xb, training=True)), global_batch_size=32)
            optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
            return loss
        xb, yb = next(iterator)
        return {"loss": strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(step, args=(xb, yb)), axis=None)}

    with ctx.session(state=tf.train.Checkpoint(model=model, optimizer=optimizer)) as sess:
        while not sess.should_stop():
            sess.run(train_step, batches)
    return {"step": sess.global_step, "weights": model.get_weights(),
            "tf_config": _json.loads(_os.environ["TF_CONFIG"])}


@pytest.mark.timeout(400)
def test_multi_worker_mirrored_strategy_checkpoint_restores_worker_0_weights(ray_session, ckpt_dir):
    import ray.cloudpickle
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    result = rh.launch(train_digits_mwms, 2, backend="ray", tf_config=True,
                       chief_only_hooks=[rh.AsyncCheckpointSaverHook(ckpt_dir, save_steps=2, in_flight="wait")],
                       hooks=[rh.StopAtStepHook(last_step=5)])
    configs = [r["tf_config"] for r in result.worker_results]
    assert [c["task"] for c in configs] == [{"type": "worker", "index": 0}, {"type": "worker", "index": 1}]
    assert configs[0]["cluster"] == configs[1]["cluster"] and len(set(configs[0]["cluster"]["worker"])) == 2
    assert _steps(result) == [5, 5]
    assert result.checkpoints == tf1_checkpoint_steps(0, 2, 5) == [0, 2, 4, 5]
    assert np.isfinite(result.metrics["loss"])
    weights0, weights1 = (r["weights"] for r in result.worker_results)
    for a, b in zip(weights0, weights1):  # the strategy kept the replicas in sync
        np.testing.assert_array_equal(a, b)

    fresh = _digits_model()
    status = tf.train.Checkpoint(model=fresh, optimizer=tf.keras.optimizers.SGD(0.1)).restore(
        tf.train.latest_checkpoint(ckpt_dir))
    status.expect_partial().assert_nontrivial_match()
    assert tf.train.latest_checkpoint(ckpt_dir) == result.latest_checkpoint
    restored = fresh.get_weights()
    assert len(restored) == len(weights0) == 4
    for a, b in zip(restored, weights0):
        np.testing.assert_array_equal(a, b)


# -- start-up cost -------------------------------------------------------------------------------

def test_numpy_state_session_does_not_import_tensorflow():
    # A fresh interpreter that records (and refuses, to stay fast) any import of tensorflow.
    code = ("import sys, numpy as np, rayhooks as rh\n"
            "tried = []\n"
            "class Refuse:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] == 'tensorflow':\n"
            "            tried.append(name)\n"
            "            raise ImportError(name)\n"
            "sys.meta_path.insert(0, Refuse())\n"
            "rh.MonitoredSession(state={'w': np.zeros(1)}).close()\n"
            "print(tried)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# -- 9. a save that cannot be written ----------------------------------------------------------

def _block_step(ckpt_dir, step):
    """A directory where step's data file must go: the write fails for real (IsADirectoryError), at once."""
    os.makedirs(os.path.join(ckpt_dir[len("file://"):], "model.ckpt-%d.data-00000-of-00001" % step))


def _checkpoint_scalars(ckpt_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(ckpt_dir[len("file://"):])
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)}
            for tag in events.Tags()["scalars"] if tag.startswith("checkpoint/")}


@pytest.mark.parametrize("hook_class", [rh.CheckpointSaverHook, rh.AsyncCheckpointSaverHook])
def test_retry_next_save_under_launch_trains_past_a_failed_save(backend, ckpt_dir, hook_class, caplog):
    import logging
    caplog.set_level(logging.INFO, logger="rayhooks")
    _block_step(ckpt_dir, 6)
    # in_flight="wait": no save is skipped for the previous one still uploading, so the steps are exact.
    extra = {"in_flight": "wait"} if hook_class is rh.AsyncCheckpointSaverHook else {}
    result = rh.launch(count_steps, 2, backend=backend,
                       chief_only_hooks=[hook_class(ckpt_dir, save_steps=2, on_write_error="retry_next_save",
                                                    retry=rh.RetryPolicy(max_attempts=1), **extra)],
                       hooks=[rh.StopAtStepHook(last_step=10)])
    assert result.last_step == 10
    assert result.checkpoints == [0, 2, 4, 8, 10] and result.failed_saves == 1
    infos = _committed(ckpt_dir)
    assert [i.step for i in infos] == [0, 2, 4, 8, 10]
    for info in infos:
        np.testing.assert_array_equal(_w(info.url), [info.step, info.step])
    # The chief's checkpoint health, beside the loss curve: cost of each save, and the failure counted.
    scalars = _checkpoint_scalars(ckpt_dir)
    assert scalars["checkpoint/failed_saves"][4] == 0 and scalars["checkpoint/failed_saves"][10] == 1
    assert set(scalars["checkpoint/bytes"]) == {0, 2, 4, 8, 10}
    assert all(v > 0 for v in scalars["checkpoint/bytes"].values())
    assert all(v >= 0 for v in scalars["checkpoint/stall_ms"].values())
    assert all(v > 0 for v in scalars["checkpoint/persist_secs"].values())
    if backend == "local":  # the chief's log, once per save: what, where, and how long the loop waited
        saved = [r.getMessage() for r in caplog.records if "Saved checkpoint" in r.getMessage()]
        assert len(saved) == 5 and all("the training loop waited" in m for m in saved)
        assert "[step=8] Saved checkpoint %s/model.ckpt-8" % ckpt_dir in saved[3]


def test_raise_under_launch_stops_at_the_failed_save(backend, ckpt_dir):
    _block_step(ckpt_dir, 6)
    with pytest.raises(Exception) as failure:
        rh.launch(count_steps, 2, backend=backend,
                  chief_only_hooks=[rh.CheckpointSaverHook(ckpt_dir, save_steps=2, retry=rh.RetryPolicy(max_attempts=1))],
                  hooks=[rh.StopAtStepHook(last_step=10)])
    message = str(failure.value)
    assert "step=6" in message and "model.ckpt-6.data" in message
    assert [i.step for i in _committed(ckpt_dir)] == [0, 2, 4]


def test_launch_carries_the_hooks_failure_and_signal_policies_to_the_workers(ckpt_dir):
    import signal
    from rayhooks.spec import build_spec
    spec = build_spec([rh.AsyncCheckpointSaverHook(ckpt_dir, save_steps=2, on_write_error="retry_next_save",
                                                   save_on_signals=(signal.SIGUSR1,))])
    assert spec.checkpoint.on_write_error == "retry_next_save"
    assert spec.checkpoint.save_on_signals == (signal.SIGUSR1,)
    assert build_spec([rh.CheckpointSaverHook(ckpt_dir, save_steps=2)]).checkpoint.on_write_error == "raise"


def _report_niceness(ctx):
    import os
    with ctx.session() as sess:
        while not sess.should_stop():
            sess.run(lambda: None)
    return os.nice(0)


@pytest.mark.parametrize("niceness,expected", [("default", 0), (7, 7)])
def test_ray_workers_run_at_the_niceness_asked_for(ray_session, niceness, expected):
    """Ray starts worker processes at nice 15; training workers run at 0 unless told otherwise."""
    import ray.cloudpickle
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    kwargs = {} if niceness == "default" else {"worker_niceness": niceness}
    result = rh.launch(_report_niceness, 1, backend="ray", tf_config=False,
                       hooks=[rh.StopAtStepHook(last_step=2)], **kwargs)
    assert result.worker_results == [expected]


# -- errors and fetches on the chief, resumes, reused hooks ------------------------------------------

class _RaiseInAfterRun(rh.SessionRunHook):
    def after_run(self, run_context, run_values):
        if run_context.session.global_step == 3:
            raise ValueError("chief hook broke at step 3")


class _RaiseInAfterSave(rh.CheckpointSaverListener):
    def after_save(self, session, step):
        if step == 5:
            raise ValueError("listener broke at step 5")


@pytest.mark.parametrize("chief_hooks", [
    lambda url: [_RaiseInAfterRun(), rh.CheckpointSaverHook(url, save_steps=5)],
    lambda url: [rh.CheckpointSaverHook(url, save_steps=5, listeners=[_RaiseInAfterSave()])],
], ids=["chief_hook", "listener"])
def test_an_error_on_the_chief_mid_run_is_raised_by_launch(backend, ckpt_dir, chief_hooks):
    """Nobody waits on a report, so the chief keeps the error, stops the workers and raises it at the end,
    as the original exception (on Ray, a RayTaskError that is also a ValueError), with no final save."""
    with pytest.raises(ValueError, match="broke at step"):
        rh.launch(count_steps, 2, backend=backend, tf_config=False, chief_only_hooks=chief_hooks(ckpt_dir),
                  hooks=[rh.StopAtStepHook(last_step=2000)])
    assert all(i.step < 2000 for i in _committed(ckpt_dir))


class _RaiseInEnd(rh.SessionRunHook):
    def end(self, session):
        raise ValueError("chief hook broke in end")


def test_a_chief_hook_failing_in_end_releases_the_directory_as_failed(ckpt_dir):
    """A sidecar evaluator stops after a finished run only: this one failed as it ended."""
    with pytest.raises(ValueError, match="broke in end"):
        rh.launch(count_steps, 1, backend="local", chief_only_hooks=[_RaiseInEnd(),
                  rh.CheckpointSaverHook(ckpt_dir, save_steps=5)], hooks=[rh.StopAtStepHook(last_step=6)])
    claim = rh.CheckpointStore(rh.Storage(ckpt_dir)).writer_claim.read()
    assert claim["released"] and claim["ended"] == "failed"


class _FetchLossAtEnd(rh.SessionRunHook):
    def __init__(self, path):
        self.path = path

    def end(self, session):
        with open(self.path, "w") as f:
            f.write(repr(session.run("loss")))


def test_a_chief_only_hook_can_session_run_a_step_output(backend, tmp_path):
    out = str(tmp_path / "loss.txt")
    rh.launch(count_steps, 2, backend=backend, tf_config=False,
              chief_only_hooks=[_FetchLossAtEnd(out)], hooks=[rh.StopAtStepHook(last_step=10)])
    with open(out) as f:
        assert float(f.read()) == 10.0  # worker 0's loss after step 10


def test_resume_with_save_secs_does_not_rewrite_the_restored_checkpoint(ckpt_dir):
    index = os.path.join(ckpt_dir[len("file://"):], "model.ckpt-6.index")
    first = rh.launch(count_steps, 2, backend="local",
                      chief_only_hooks=[rh.CheckpointSaverHook(ckpt_dir, save_secs=3600)],
                      hooks=[rh.StopAtStepHook(last_step=6)])
    assert first.checkpoints == [0, 6]
    before = os.stat(index)
    second = rh.launch(count_steps, 2, backend="local",
                       chief_only_hooks=[rh.CheckpointSaverHook(ckpt_dir, save_secs=3600)],
                       hooks=[rh.StopAtStepHook(last_step=10)])
    assert [r["start"] for r in second.worker_results] == [6, 6]
    assert second.checkpoints == [10]
    after = os.stat(index)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_a_checkpoint_hook_reused_for_a_second_local_launch_keeps_its_schedule(ckpt_dir):
    hook = rh.CheckpointSaverHook(ckpt_dir, save_steps=4)
    assert rh.launch(count_steps, 2, backend="local", chief_only_hooks=[hook],
                     hooks=[rh.StopAtStepHook(last_step=10)]).checkpoints == [0, 4, 8, 10]
    assert rh.launch(count_steps, 2, backend="local", chief_only_hooks=[hook],
                     hooks=[rh.StopAtStepHook(last_step=20)]).checkpoints == [14, 18, 20]


def _worker_0_leaves_at_step_3(ctx):
    state = _initial_state(ctx)
    with ctx.session(state=state) as sess:
        while not sess.should_stop() and not (ctx.worker_index == 0 and sess.global_step == 3):
            sess.run(_step, state)
    return sess.global_step


def test_a_worker_training_past_the_only_writer_is_warned_of(ckpt_dir, caplog):
    import logging
    with caplog.at_level(logging.WARNING, logger="rayhooks"):
        result = rh.launch(_worker_0_leaves_at_step_3, 2, backend="local",
                           chief_only_hooks=[rh.CheckpointSaverHook(ckpt_dir, save_steps=4)],
                           hooks=[rh.StopAtStepHook(last_step=10)])
    assert result.worker_results == [3, 10]
    assert max(result.checkpoints) == 3  # worker 0's final save; worker 1's steps are not saved
    assert "worker 1 trained past worker 0, which left its loop at step 3" in caplog.text
    assert "all_workers_write=True" in caplog.text


@pytest.mark.parametrize("resume_with", [1, 3])
def test_all_workers_write_resume_with_another_number_of_workers_is_refused(ckpt_dir, resume_with):
    hook = lambda: rh.CheckpointSaverHook(ckpt_dir, save_steps=10)  # noqa: E731
    rh.launch(count_steps, 2, backend="local", all_workers_write=True, chief_only_hooks=[hook()],
              hooks=[rh.StopAtStepHook(last_step=20)])
    with pytest.raises(ValueError, match=r"\[step=20\] .*model.ckpt-20 holds one shard per worker for 2 workers.*"
                                         r"this run has %d.*num_workers=2" % resume_with):
        rh.launch(count_steps, resume_with, backend="local", all_workers_write=True,
                  chief_only_hooks=[hook()], hooks=[rh.StopAtStepHook(last_step=30)])
    # One writer's checkpoint (all_workers_write=False) held every worker's state: any count resumes from it.
    other = ckpt_dir + "-one-writer"
    rh.launch(count_steps, 2, backend="local", chief_only_hooks=[rh.CheckpointSaverHook(other, save_steps=10)],
              hooks=[rh.StopAtStepHook(last_step=20)])
    result = rh.launch(count_steps, resume_with, backend="local", all_workers_write=True,
                       chief_only_hooks=[rh.CheckpointSaverHook(other, save_steps=10)],
                       hooks=[rh.StopAtStepHook(last_step=30)])
    assert [r["w"][0] for r in result.worker_results] == [30.0] * resume_with  # worker 0's state, resumed


def test_a_resumed_or_finished_run_saves_nothing_past_its_last_step(ckpt_dir):
    """Estimator.train(max_steps=N) semantics: no before_save past the stop, no step past a finished run."""
    def launch(last_step):
        listener = TraceListener()
        result = rh.launch(count_steps, 2, backend="local", hooks=[rh.StopAtStepHook(last_step=last_step)],
                           chief_only_hooks=[rh.AsyncCheckpointSaverHook(ckpt_dir, save_steps=50,
                                                                        listeners=[listener])])
        return result, [call for call in listener.trace if call[0] != "end"]

    launch(45)
    result, calls = launch(55)                        # resumes from 45; the rule's next save (95) is past 55
    assert _steps(result) == [55, 55]
    assert calls == [("before_save", 55), ("after_save", 55)]
    result, calls = launch(55)                        # the run is done: launched again, it trains no step
    assert _steps(result) == [55, 55]
    assert calls == [] and [i.step for i in _committed(ckpt_dir)][-1] == 55


def test_a_chief_only_hook_fetching_a_non_scalar_output_says_where_it_runs(ckpt_dir):
    def train(ctx):
        state = {"w": np.zeros(3, np.float32)}

        def step():
            state["w"] += 1
            return {"loss": float(state["w"][0]), "weights": state["w"].copy()}

        with ctx.session(state=state) as sess:
            while not sess.should_stop():
                sess.run(step)

    with pytest.raises(KeyError, match=r"LoggingTensorHook fetches .*weights.* chief-only hook.*scalar step outputs "
                                       r"\(\['loss'\]\).*Pass it in hooks="):
        rh.launch(train, 1, backend="local", chief_only_hooks=[rh.LoggingTensorHook(["weights"], every_n_iter=10)],
                  hooks=[rh.StopAtStepHook(last_step=20)])


class _InterruptDriver(rh.CheckpointSaverListener):
    """On the chief, once a checkpoint commits, sends the driver SIGINT: a real Ctrl-C of `launch`.

    The chief writes a report's summaries before it commits the shards in it, so by then
    the summaries of every step up to the checkpoint's are in the chief's writer.
    """

    def __init__(self, driver_pid):
        self.driver_pid, self.sent = driver_pid, False

    def after_save(self, session, global_step_value):
        import signal
        if not self.sent:  # one Ctrl-C: a second would land in launch's own clean-up
            self.sent = True
            os.kill(self.driver_pid, signal.SIGINT)


def test_ctrl_c_of_a_ray_launch_keeps_the_summaries_the_chief_wrote(ray_session, tmp_path):
    import ray.cloudpickle
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    logdir = str(tmp_path / "run")
    # Python's own handler: Ray Train, run earlier in this process, leaves one that exits instead.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    with pytest.raises(KeyboardInterrupt), contextlib.ExitStack() as restore:
        restore.callback(signal.signal, signal.SIGINT, previous)
        rh.launch(count_steps, 2, backend="ray", tf_config=False,
                  chief_only_hooks=[rh.SummarySaverHook(save_steps=10, output_dir=logdir, summary_op=["loss"]),
                                    rh.CheckpointSaverHook(str(tmp_path / "ckpt"), save_steps=100,
                                                           listeners=[_InterruptDriver(os.getpid())])],
                  hooks=[rh.StopAtStepHook(last_step=10 ** 9)])
    acc = EventAccumulator(logdir, size_guidance={"scalars": 0})
    acc.Reload()
    steps = [e.step for e in acc.Scalars("loss")]
    assert steps[:1] == [1] and 91 in steps, steps   # every summary up to the checkpoint reached the disk


def test_a_launch_whose_directory_another_run_took_over_stops_at_its_next_commit(ckpt_dir, backend):
    # The other run's claim is made by worker 0 at step 6, as a replacement job starting then would.
    def take_over_at_6(ctx, step):
        if ctx.worker_index == 0 and step == 6:
            rh.CheckpointStore(rh.Storage(ckpt_dir)).claim()

    def train(ctx):
        return _train(ctx, take_over_at_6)

    with pytest.raises(Exception, match=r"not committed: .* has another writer now") as error:
        rh.launch(train, 2, backend=backend, tf_config=False,
                  chief_only_hooks=[rh.CheckpointSaverHook(ckpt_dir, save_steps=4)],
                  hooks=[rh.StopAtStepHook(last_step=12)])
    assert "DirectoryTakenOver" in repr(error.value) or isinstance(error.value, rh.DirectoryTakenOver)
    # Nothing saved after the claim is committed; the chief's commits of 0 and 4 may come after it too.
    assert set(i.step for i in _committed(ckpt_dir)) <= {0, 4}
    # Nor written: the workers check the claim before their data, as the chief before its commit.
    local = ckpt_dir[len("file://"):]
    assert not [n for n in os.listdir(local) if n.startswith(("model.ckpt-8.", "model.ckpt-12."))]


class _HoldsALock(rh.CheckpointSaverListener):
    def __init__(self):
        self.lock = threading.Lock()  # does not pickle: the chief never gets this listener


def test_a_listener_that_does_not_pickle_says_so_and_frees_the_workers_resources(ckpt_dir, ray_session):
    import ray.cloudpickle
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # as the backend fixture does
    with pytest.raises(TypeError, match=r"travel to the chief actor by pickle.*in its begin\(\)"):
        rh.launch(count_steps, 2, backend="ray", tf_config=False,
                  chief_only_hooks=[rh.CheckpointSaverHook(ckpt_dir, save_steps=4, listeners=[_HoldsALock()])],
                  hooks=[rh.StopAtStepHook(last_step=4)])
    # The placement group went with it: a launch asking for the same CPUs gets them.
    result = rh.launch(count_steps, 2, backend="ray", tf_config=False, placement_timeout_s=60,
                       chief_only_hooks=[rh.CheckpointSaverHook(ckpt_dir, save_steps=4)],
                       hooks=[rh.StopAtStepHook(last_step=4)])
    assert result.checkpoints == [0, 4]


def test_ctrl_c_during_a_local_launch_stops_its_worker_threads(ckpt_dir):
    # SIGINT is real: raised from worker 0 at step 3, Python runs its handler in the main thread,
    # which is joining the workers; the workers would otherwise train on to step 200000.
    def interrupt_at_3(ctx, step):
        if ctx.worker_index == 0 and step == 3:
            signal.raise_signal(signal.SIGINT)

    def train(ctx):
        return _train(ctx, interrupt_at_3)

    before = set(threading.enumerate())
    handler = signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own, whatever ran before
    try:
        with pytest.raises(KeyboardInterrupt):
            rh.launch(train, 2, backend="local",
                      chief_only_hooks=[rh.CheckpointSaverHook(ckpt_dir, save_steps=1000)],
                      hooks=[rh.StopAtStepHook(last_step=200000)])
    finally:
        signal.signal(signal.SIGINT, handler)
    workers = [t for t in set(threading.enumerate()) - before if "-worker-" in t.name]
    assert workers == []  # joined before the KeyboardInterrupt reached the caller
