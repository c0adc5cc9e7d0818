"""Tier 2: `AsyncCheckpointSaverHook` in local mode: consistency (I1), bounded memory (I5),
after_save only after the commit (I3), and stop requests from after_save.

Background writes are slowed down deterministically: the store's `write_data`
(or `commit`) is wrapped so that chosen steps block on a `threading.Event`
until the test opens it. Nothing sleeps; every wait has a timeout that only
guards against a hang.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import threading

import numpy as np
import pytest

import rayhooks as rh
from rayhooks.writer import BackgroundWriter

TIMEOUT = 30


class Gate:
    """Blocks `store.<method>(step, ...)` for the chosen steps until `open(step)`."""

    def __init__(self, store, steps, method="write_data"):
        self.reached = {s: threading.Event() for s in steps}
        self.opened = {s: threading.Event() for s in steps}
        self.done = {s: threading.Event() for s in steps}
        original = getattr(store, method)

        def gated(step, *args, **kwargs):
            if step in self.reached:
                self.reached[step].set()
                if not self.opened[step].wait(TIMEOUT):
                    raise TimeoutError("test gate for step %d was never opened" % step)
            result = original(step, *args, **kwargs)
            if step in self.done:
                self.done[step].set()
            return result

        setattr(store, method, gated)

    def open(self, step):
        self.opened[step].set()

    def open_all(self):
        for event in self.opened.values():
            event.set()


class CountingSaver:
    """Wraps a saver; counts snapshots and the snapshots (and bytes) alive at once."""

    def __init__(self, inner):
        self.inner = inner
        self.lock = threading.Lock()
        self.snapshots = 0
        self.live = self.peak_live = 0
        self.live_bytes = self.peak_live_bytes = 0
        self.events = []

    def snapshot(self):
        snap = self.inner.snapshot()
        nbytes = snap.nbytes
        with self.lock:
            self.snapshots += 1
            self.live += 1
            self.live_bytes += nbytes
            self.peak_live = max(self.peak_live, self.live)
            self.peak_live_bytes = max(self.peak_live_bytes, self.live_bytes)
        inner_release = snap.release

        def release():
            with self.lock:
                self.live -= 1
                self.live_bytes -= nbytes
            if inner_release is not None:
                inner_release()

        snap.release = release
        return snap

    def restore(self, checkpoint):
        self.inner.restore(checkpoint)


class Recorder(rh.CheckpointSaverListener):
    def __init__(self, url, stop_at=None):
        self.url = url
        self.stop_at = stop_at
        self.calls = []
        self.seen_latest = []
        self.seen_committed = []
        self.threads = set()

    def before_save(self, session, global_step_value):
        self.calls.append(("before_save", global_step_value))

    def after_save(self, session, global_step_value):
        self.calls.append(("after_save", global_step_value))
        self.threads.add(threading.get_ident())
        store = rh.CheckpointStore(rh.Storage(self.url))
        self.seen_latest.append((global_step_value, store.latest().step))
        self.seen_committed.append((global_step_value, [i.step for i in store.committed()]))
        return self.stop_at is not None and global_step_value >= self.stop_at

    def end(self, session, global_step_value):
        self.calls.append(("end", global_step_value))


def _session(url, hook, state=None, **kwargs):
    return rh.MonitoredTrainingSession(checkpoint_dir=url, state=state, chief_only_hooks=[hook],
                                       save_checkpoint_secs=None, **kwargs)


def _committed(url):
    return [i.step for i in rh.CheckpointStore(rh.Storage(url)).committed()]


def _tensors(url, step):
    store = rh.CheckpointStore(rh.Storage(url))
    return store.reader(store.get(step)).read_tensors()


def _numpy_state():
    state = {"w": np.zeros(4096, np.float32)}

    def step():
        state["w"] += 1  # in place: a lazy snapshot would see later steps
        return {"loss": float(state["w"][0])}

    return state, step, lambda values: values["w"]


def _variable_state():
    import tensorflow as tf
    v = tf.Variable(tf.zeros(4096), name="w")

    @tf.function
    def step():
        v.assign_add(tf.ones(4096))  # in place on the same buffer
        return {"loss": v[0]}

    return tf.train.Checkpoint(w=v), step, lambda values: values["w/.ATTRIBUTES/VARIABLE_VALUE"]


def test_skip_never_holds_more_than_one_snapshot(storage_url):
    state, step, extract = _numpy_state()
    saver = CountingSaver(rh.NumpySaver(state))
    hook = rh.AsyncCheckpointSaverHook(storage_url, save_steps=1, saver=saver, in_flight="skip")
    gate = Gate(hook.store, [0])
    with _session(storage_url, hook, hooks=[rh.StopAtStepHook(last_step=5)]) as sess:
        while not sess.should_stop():
            sess.run(step)
        assert hook.skipped_saves == 5
        gate.open(0)
    assert hook.skipped_saves == 5
    assert saver.snapshots == 2  # step 0, and the final save at end
    assert saver.peak_live == 1
    assert saver.live == 0  # every snapshot was given back
    assert _committed(storage_url) == [0, 5]
    np.testing.assert_array_equal(extract(_tensors(storage_url, 5)), np.full(4096, 5, np.float32))


class _SignallingHook(rh.AsyncCheckpointSaverHook):
    """Calls `on_wait()` when a save finds no room and is about to wait for it."""

    def __init__(self, *args, on_wait, **kwargs):
        super().__init__(*args, **kwargs)
        self.on_wait = on_wait
        self.waits = 0

    def _new_writer(self):
        hook = self

        class Writer(BackgroundWriter):
            def admit(self, nbytes, wait, timeout=None):
                if super().admit(nbytes, wait=False):
                    return True
                if not wait:
                    return False
                hook.waits += 1
                hook.on_wait()
                return super().admit(nbytes, wait=True, timeout=timeout)

        return Writer(self._what, self._max_in_flight, self._max_in_flight_bytes)


@pytest.mark.parametrize("make_state", [_numpy_state, _variable_state], ids=["numpy", "tf_variable"])
def test_checkpoint_holds_the_values_of_its_step(storage_url, make_state):
    """I1: training runs on, mutating the state in place, while step 2's write is held back.

    The save at step 4 has to wait for step 2 (in_flight="wait"); only then is
    step 2's write let through, so it certainly runs after steps 3 and 4.
    """
    state, step, extract = make_state()
    live_at_release = []

    def on_wait():
        if run_count[0] >= 4 and not gate.opened[2].is_set():  # step 4's save, waiting for step 2
            assert gate.reached[2].wait(TIMEOUT)
            live_at_release.append(float(np.asarray(extract(state_values()))[0]))
            gate.open(2)

    if isinstance(state, dict):
        state_values = lambda: state
    else:
        state_values = lambda: {"w/.ATTRIBUTES/VARIABLE_VALUE": state.w.numpy()}
    run_count = [0]

    def counted_step():
        run_count[0] += 1
        return step()

    hook = _SignallingHook(storage_url, save_steps=2, in_flight="wait", on_wait=on_wait)
    gate = Gate(hook.store, [2])
    with _session(storage_url, hook, state=state, hooks=[rh.StopAtStepHook(last_step=6)]) as sess:
        while not sess.should_stop():
            sess.run(counted_step)
    assert live_at_release == [4.0]  # the live state had moved on when step 2 was written
    assert hook.skipped_saves == 0
    assert _committed(storage_url) == [0, 2, 4, 6]
    for saved in (0, 2, 4, 6):
        np.testing.assert_array_equal(extract(_tensors(storage_url, saved)), np.full(4096, saved, np.float32))


def test_wait_mode_waits_instead_of_skipping(storage_url):
    state, step, extract = _numpy_state()
    saver = CountingSaver(rh.NumpySaver(state))
    gate = None
    hook = _SignallingHook(storage_url, save_steps=1, saver=saver, in_flight="wait", max_to_keep=None,
                           on_wait=lambda: gate.open_all())
    gate = Gate(hook.store, [0])
    with _session(storage_url, hook, hooks=[rh.StopAtStepHook(last_step=4)]) as sess:
        sess.run(step)
        assert hook.waits >= 1  # the save at step 1 waited for step 0
        while not sess.should_stop():
            sess.run(step)
    assert hook.skipped_saves == 0
    assert saver.peak_live == 1
    assert _committed(storage_url) == [0, 1, 2, 3, 4]
    for saved in range(5):
        np.testing.assert_array_equal(extract(_tensors(storage_url, saved)), np.full(4096, saved, np.float32))


def test_wait_mode_byte_budget_bounds_the_snapshots_in_memory(storage_url):
    state, step, extract = _numpy_state()
    one_snapshot = state["w"].nbytes
    saver = CountingSaver(rh.NumpySaver(state))
    gate = None
    hook = _SignallingHook(storage_url, save_steps=1, saver=saver, in_flight="wait", max_in_flight=2,
                           max_in_flight_bytes=one_snapshot * 3 // 2, max_to_keep=None,
                           on_wait=lambda: gate.open_all())
    gate = Gate(hook.store, [0])
    with _session(storage_url, hook, hooks=[rh.StopAtStepHook(last_step=3)]) as sess:
        while not sess.should_stop():
            sess.run(step)
    assert hook.skipped_saves == 0
    assert _committed(storage_url) == [0, 1, 2, 3]
    assert saver.peak_live_bytes <= one_snapshot * 3 // 2


def test_after_save_runs_only_after_the_commit(storage_url):
    state, step, _ = _numpy_state()
    recorder = Recorder(storage_url)
    hook = rh.AsyncCheckpointSaverHook(storage_url, save_steps=2, listeners=[recorder], in_flight="wait")
    gate = Gate(hook.store, [2], method="commit")

    def training_step():
        if sess.global_step == 3:  # the run that makes step 4
            assert gate.reached[2].wait(TIMEOUT)
            assert ("after_save", 2) not in recorder.calls  # data written, manifest not yet
            gate.open(2)
            assert gate.done[2].wait(TIMEOUT)
        return step()

    with _session(storage_url, hook, state=state, hooks=[rh.StopAtStepHook(last_step=8)]) as sess:
        while not sess.should_stop():
            sess.run(training_step)
    after = [s for kind, s in recorder.calls if kind == "after_save"]
    assert after == [0, 2, 4, 6, 8]             # each once, in step order
    for saved, committed_then in recorder.seen_committed:
        assert saved in committed_then           # durable when after_save ran
    assert recorder.threads == {threading.get_ident()}  # in the training thread
    assert recorder.calls[-1] == ("end", 8)


def test_after_save_sees_its_own_checkpoint_committed(storage_url):
    state, step, _ = _numpy_state()
    recorder = Recorder(storage_url)
    hook = rh.AsyncCheckpointSaverHook(storage_url, save_steps=3, listeners=[recorder], max_to_keep=None)
    with _session(storage_url, hook, state=state, hooks=[rh.StopAtStepHook(last_step=9)]) as sess:
        while not sess.should_stop():
            sess.run(step)
    committed = _committed(storage_url)
    assert committed[0] == 0 and committed[-1] == 9
    assert [s for s, _ in recorder.seen_committed] == committed  # once per committed checkpoint
    for saved, committed_then in recorder.seen_committed:
        assert saved in committed_then
    # A later save may commit between the writer's commit and the training thread's
    # after_save, so "latest" is this checkpoint or a newer one, never an older one.
    for saved, latest in recorder.seen_latest:
        assert latest >= saved


def test_stop_from_after_save_is_honoured(storage_url):
    state, step, _ = _numpy_state()
    recorder = Recorder(storage_url, stop_at=2)
    hook = rh.AsyncCheckpointSaverHook(storage_url, save_steps=2, listeners=[recorder], in_flight="wait")
    gate = Gate(hook.store, [2], method="commit")
    runs = []

    def training_step():
        runs.append(sess.global_step)
        if sess.global_step == 3:  # the run that makes step 4: commit step 2 now
            gate.open(2)
            assert gate.done[2].wait(TIMEOUT)
        return step()

    with _session(storage_url, hook, state=state, hooks=[rh.StopAtStepHook(last_step=100)]) as sess:
        while not sess.should_stop() and len(runs) < 50:
            sess.run(training_step)
    assert sess.global_step in (4, 5)  # within a step or two of the commit
    assert [c for c in recorder.calls if c[0] == "after_save"][:2] == [("after_save", 0), ("after_save", 2)]
    assert recorder.calls[-1] == ("end", sess.global_step)
    assert 2 in _committed(storage_url)
    assert _committed(storage_url)[-1] == sess.global_step


@pytest.mark.parametrize("async_hook", [False, True])
def test_a_stop_asked_for_after_the_save_made_as_the_session_is_created_is_ignored_as_in_tf1(storage_url,
                                                                                            async_hook):
    """TF1's hook ignores what after_save returns for its save in after_create_session; the async hook
    runs that after_save later, at a step boundary, and used to stop the run there."""
    state, step, _ = _numpy_state()
    recorder = Recorder(storage_url, stop_at=0)
    hook = (rh.AsyncCheckpointSaverHook(storage_url, save_steps=100, listeners=[recorder], in_flight="wait")
            if async_hook else rh.CheckpointSaverHook(storage_url, save_steps=100, listeners=[recorder]))
    with _session(storage_url, hook, state=state, hooks=[rh.StopAtStepHook(last_step=6)]) as sess:
        while not sess.should_stop():
            sess.run(step)
    assert ("after_save", 0) in recorder.calls
    assert sess.global_step == 6 and _committed(storage_url) == [0, 6]


def test_async_session_flag(storage_url):
    state, step, extract = _numpy_state()
    with rh.MonitoredTrainingSession(checkpoint_dir=storage_url, state=state, async_checkpoint=True,
                                     save_checkpoint_steps=3, hooks=[rh.StopAtStepHook(last_step=7)]) as sess:
        while not sess.should_stop():
            sess.run(step)
    committed = _committed(storage_url)
    assert committed[0] == 0 and committed[-1] == 7
    assert set(committed) <= {0, 3, 6, 7}
    for saved in committed:
        np.testing.assert_array_equal(extract(_tensors(storage_url, saved)), np.full(4096, saved, np.float32))


def test_in_flight_validation():
    with pytest.raises(ValueError, match="in_flight must be 'skip'"):
        rh.AsyncCheckpointSaverHook("memory://x", save_steps=1, in_flight="queue")
    with pytest.raises(ValueError, match="max_in_flight must be >= 1"):
        rh.AsyncCheckpointSaverHook("memory://x", save_steps=1, max_in_flight=0)
    with pytest.raises(ValueError, match="max_in_flight_bytes must be > 0"):
        rh.AsyncCheckpointSaverHook("memory://x", save_steps=1, max_in_flight_bytes=-5)
