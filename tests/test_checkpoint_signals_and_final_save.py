"""Preemption signals and the final save of the checkpoint hooks, in local mode.

The signals are real: `signal.raise_signal` delivers SIGTERM to this process, and the hooks'
handler runs in the training (main) thread. The write fault is real too: a directory where a
checkpoint's data file must go makes the write fail, even as root.
"""

import logging
import os
import signal

import numpy as np
import pytest

import rayhooks as rh
from rayhooks.checkpoint_hooks import _dispatch_signal


class Recorder(rh.CheckpointSaverListener):
    def __init__(self, signal_at=None):
        self.calls = []
        self.signal_at = signal_at

    def before_save(self, session, step):
        self.calls.append(("before_save", step))
        if step == self.signal_at:
            signal.raise_signal(signal.SIGTERM)  # the preemption notice lands while this step is saved

    def after_save(self, session, step):
        self.calls.append(("after_save", step))

    def end(self, session, step):
        self.calls.append(("end", step))


def _train(hooks, last_step=100, on_step=None):
    state = {"w": np.zeros(4, np.float32)}

    def step():
        state["w"] += 1
        if on_step is not None:
            on_step(int(state["w"][0]))

    sess = None
    try:
        with rh.MonitoredTrainingSession(state=state, chief_only_hooks=hooks, save_checkpoint_secs=None,
                                         save_summaries_steps=None, log_step_count_steps=None,
                                         hooks=[rh.StopAtStepHook(last_step=last_step)]) as sess:
            while not sess.should_stop():
                sess.run(step)
    except rh.Preempted as e:  # a signal stopped the run: raised once the session closed
        assert e.code == 128 + signal.SIGTERM and e.step == sess.global_step
        assert e.checkpoint == sess.handle.latest_checkpoint and e.checkpoint.endswith("-%d" % e.step)
        return sess.global_step
    return sess.global_step


def _committed(url):
    return [i.step for i in rh.CheckpointStore(rh.Storage(url)).committed()]


@pytest.fixture(autouse=True)
def _sigterm_handler_is_restored():
    before = signal.getsignal(signal.SIGTERM)
    yield
    assert signal.getsignal(signal.SIGTERM) == before


@pytest.mark.parametrize("make", [lambda d, r: rh.CheckpointSaverHook(d, save_steps=5, listeners=[r]),
                                  lambda d, r: rh.AsyncCheckpointSaverHook(d, save_steps=5, listeners=[r],
                                                                           in_flight="wait")],
                         ids=["sync", "async"])
def test_sigterm_during_a_save_saves_and_stops_at_the_next_step(tmp_path, make):
    url = str(tmp_path)
    recorder = Recorder(signal_at=5)
    assert _train([make(url, recorder)]) == 6
    assert _committed(url) == [0, 5, 6]


def test_a_signalled_run_raises_preempted_once_closed_and_an_unsignalled_one_does_not(tmp_path):
    """A preempted run is not a finished one: after the emergency checkpoint and the end hooks, the
    session raises rh.Preempted, a SystemExit with the signal's status (143), so that the process exits
    as the signal would have made it, and a job system runs it again."""
    recorder = Recorder()
    state = {"w": np.zeros(1)}

    def step():
        state["w"] += 1
        if state["w"][0] == 4:
            signal.raise_signal(signal.SIGTERM)
    with pytest.raises(rh.Preempted) as error:
        with rh.MonitoredTrainingSession(state=state, checkpoint_dir=str(tmp_path / "a"), save_checkpoint_secs=None,
                                         chief_only_hooks=[rh.CheckpointSaverHook(str(tmp_path / "a"), save_steps=100,
                                                                                  listeners=[recorder])],
                                         hooks=[rh.StopAtStepHook(last_step=100)]) as sess:
            while not sess.should_stop():
                sess.run(step)
    assert isinstance(error.value, SystemExit) and error.value.code == 143 and error.value.step == 4
    assert error.value.checkpoint == str(tmp_path / "a") + "/model.ckpt-4"
    assert recorder.calls[-1] == ("end", 4)             # after the end hooks
    assert _committed(str(tmp_path / "a")) == [0, 4]
    assert rh.CheckpointStore(rh.Storage(str(tmp_path / "a"))).writer_claim.read()["ended"] == "preempted"
    assert _train([rh.CheckpointSaverHook(str(tmp_path / "b"), save_steps=100)], last_step=5) == 5
    assert rh.CheckpointStore(rh.Storage(str(tmp_path / "b"))).writer_claim.read()["ended"] == "finished"


def test_async_emergency_save_is_not_made_again_at_end(tmp_path):
    url = str(tmp_path)
    recorder = Recorder()

    def on_step(n):
        if n == 7:
            signal.raise_signal(signal.SIGTERM)

    assert _train([rh.AsyncCheckpointSaverHook(url, save_steps=100, listeners=[recorder])], on_step=on_step) == 7
    assert recorder.calls == [("before_save", 0), ("after_save", 0), ("before_save", 7), ("after_save", 7),
                              ("end", 7)]


def test_two_hooks_both_hear_sigterm_and_leave_the_original_handler(tmp_path):
    first, second = str(tmp_path / "a"), str(tmp_path / "b")

    def on_step(n):
        if n == 3:
            signal.raise_signal(signal.SIGTERM)

    hooks = [rh.CheckpointSaverHook(first, save_steps=100), rh.AsyncCheckpointSaverHook(second, save_steps=100)]
    assert _train(hooks, on_step=on_step) == 3
    assert _committed(first)[-1] == 3 and _committed(second)[-1] == 3  # the autouse fixture checks the handler


def test_a_session_that_fails_leaves_no_signal_handler_behind(tmp_path):
    def on_step(n):
        if n == 2:
            raise RuntimeError("training failed")

    with pytest.raises(RuntimeError, match="training failed"):
        _train([rh.CheckpointSaverHook(str(tmp_path), save_steps=100)], on_step=on_step)


@pytest.mark.parametrize("cls, kwargs", [(rh.CheckpointSaverHook, {}),
                                         (rh.AsyncCheckpointSaverHook, {"in_flight": "wait"})],
                         ids=["sync", "async"])
def test_retry_next_save_tries_a_failed_last_step_again_at_end(tmp_path, cls, kwargs, caplog):
    url = str(tmp_path)
    os.makedirs(os.path.join(url, "model.ckpt-10.data-00000-of-00001"))  # step 10's data cannot be written
    hook = cls(url, save_steps=5, on_write_error="retry_next_save", retry=rh.RetryPolicy(max_attempts=1), **kwargs)
    attempts = []
    write_data = hook.store.write_data

    def counted(step, *args, **kw):
        attempts.append(step)
        return write_data(step, *args, **kw)

    hook.store.write_data = counted
    with caplog.at_level(logging.ERROR, logger="rayhooks"):
        assert _train([hook], last_step=10) == 10
    assert attempts == [0, 5, 10, 10]  # the failed save of the last step was tried again at end
    last = caplog.records[-1].getMessage()
    assert "it was the run's last save" in last and last.endswith("model.ckpt-5") and "next save" not in last
    assert hook.failed_saves == 2
    assert _committed(url) == [0, 5]


def test_a_handler_set_over_ours_since_is_put_back_after_the_run(tmp_path, monkeypatch):
    """A hook left registered (its session never closed), then another handler set over
    the hooks' one, as `ray.init` does in a driver: the next session's hook still hears
    SIGTERM, and the other handler is what remains afterwards."""
    from rayhooks import checkpoint_hooks
    monkeypatch.setattr(checkpoint_hooks, "_signal_hooks", {})  # none of this suite's other hooks

    def theirs(signum, frame):
        raise AssertionError("the hooks' handler should have run")

    original = signal.getsignal(signal.SIGTERM)
    left_open = rh.CheckpointSaverHook(str(tmp_path / "left"), save_steps=5)
    left_open.begin()  # never ended
    signal.signal(signal.SIGTERM, theirs)
    try:
        url = str(tmp_path / "ckpt")
        recorder = Recorder(signal_at=5)
        assert _train([rh.CheckpointSaverHook(url, save_steps=5, listeners=[recorder])]) == 6
        assert _committed(url) == [0, 5, 6]
        left_open._restore_signal_handlers()
        assert signal.getsignal(signal.SIGTERM) is theirs
    finally:
        signal.signal(signal.SIGTERM, original)


def _drop_an_unclosed_session(tmp_path):
    """Runs a step in a session that is never closed, drops it; a weak reference to its hook."""
    import weakref
    state = {"w": np.zeros(2, np.float32)}
    hook = rh.CheckpointSaverHook(str(tmp_path), save_steps=100)
    sess = rh.MonitoredTrainingSession(state=state, chief_only_hooks=[hook], save_checkpoint_secs=None,
                                       save_summaries_steps=None, log_step_count_steps=None)
    sess.run(lambda: state.__setitem__("w", state["w"] + 1))
    assert signal.getsignal(signal.SIGTERM) is _dispatch_signal  # the hooks' handler is listening
    return weakref.ref(hook)


@pytest.fixture
def their_handler(monkeypatch):
    """The process's own SIGTERM handler, recording what it hears; none of this suite's other hooks."""
    from rayhooks import checkpoint_hooks
    monkeypatch.setattr(checkpoint_hooks, "_signal_hooks", {})
    heard = []

    def theirs(signum, frame):
        heard.append(signum)

    original = signal.signal(signal.SIGTERM, theirs)
    yield theirs, heard
    signal.signal(signal.SIGTERM, original)


def test_a_session_dropped_without_close_hands_sigterm_back_to_the_process(tmp_path, their_handler):
    """A script that never closes its session (no `with`, no `close()`) and lets it go: the
    next SIGTERM reaches the handler the process had before, which is in place again after."""
    import gc
    theirs, heard = their_handler
    gone = _drop_an_unclosed_session(tmp_path)
    gc.collect()
    assert gone() is None, "something still holds the hook of a dropped session"
    signal.raise_signal(signal.SIGTERM)
    assert heard == [signal.SIGTERM]
    assert signal.getsignal(signal.SIGTERM) is theirs


def test_a_dropped_session_hands_sigterm_back_before_any_cycle_collection(tmp_path, their_handler):
    """As above, with no gc.collect() by the script: a hook is freed only by the cycle
    collector, whose full pass a long-running process makes rarely."""
    import gc
    theirs, heard = their_handler
    was_enabled = gc.isenabled()
    gc.disable()  # stands for the rarity of a full collection, deterministically
    try:
        gone = _drop_an_unclosed_session(tmp_path)
        signal.raise_signal(signal.SIGTERM)
        assert heard == [signal.SIGTERM]
        assert gone() is None
        assert signal.getsignal(signal.SIGTERM) is theirs
    finally:
        if was_enabled:
            gc.enable()


@pytest.mark.parametrize("on_write_error", ["raise", "retry_next_save"])
def test_summaries_that_cannot_be_written_at_end_fail_the_run_only_under_raise(tmp_path, caplog, on_write_error):
    """The checkpoint hook's CHECKPOINT logs and health scalars go to an events file in the checkpoint
    directory. Here that file is replaced by a directory mid-run (a real write failure, even as root):
    a run that chose to outlast storage failures must not fail at its end for those scalars."""
    url = str(tmp_path)
    hook = rh.CheckpointSaverHook(url, save_steps=2, on_write_error=on_write_error)

    def on_step(n):
        if n == 3:
            hook._summary_writer.flush()
            events = [name for name in os.listdir(url) if name.startswith("events.out.tfevents")]
            assert len(events) == 1
            os.remove(os.path.join(url, events[0]))
            os.makedirs(os.path.join(url, events[0]))

    with caplog.at_level(logging.ERROR, logger="rayhooks"):
        if on_write_error == "raise":
            with pytest.raises(OSError):
                _train([hook], last_step=4, on_step=on_step)
        else:
            assert _train([hook], last_step=4, on_step=on_step) == 4
            assert "summaries could not be written" in caplog.text
    assert _committed(url) == [0, 2, 4]


def test_a_failure_reported_at_end_before_the_final_save_is_not_called_the_last_save(tmp_path, caplog):
    """The async hook's end first hears of step 10's failed background save, then saves step 12."""
    url = str(tmp_path)
    os.makedirs(os.path.join(url, "model.ckpt-10.data-00000-of-00001"))  # step 10's data cannot be written
    hook = rh.AsyncCheckpointSaverHook(url, save_steps=5, on_write_error="retry_next_save", in_flight="wait",
                                       retry=rh.RetryPolicy(max_attempts=1))
    with caplog.at_level(logging.ERROR, logger="rayhooks"):
        assert _train([hook], last_step=12) == 12
    assert _committed(url) == [0, 5, 12] and hook.failed_saves == 1
    assert "step=10" in caplog.text and "last save" not in caplog.text


def test_a_signal_on_the_last_step_ends_a_finished_run_without_preempted(tmp_path):
    """The run reached StopAtStepHook's last step as the signal came: it is finished, not preempted."""
    def on_step(n):
        if n == 5:
            signal.raise_signal(signal.SIGTERM)
    assert _train([rh.CheckpointSaverHook(str(tmp_path), save_steps=100)], last_step=5, on_step=on_step) == 5
    assert _committed(str(tmp_path)) == [0, 5]


def test_preempted_names_the_newest_committed_checkpoint_when_the_emergency_save_failed(tmp_path):
    url = str(tmp_path)
    os.makedirs(os.path.join(url, "model.ckpt-3.data-00000-of-00001"))  # the emergency save cannot be written
    hook = rh.CheckpointSaverHook(url, save_steps=100, on_write_error="retry_next_save",
                                  retry=rh.RetryPolicy(max_attempts=1))

    def on_step(n):
        if n == 3:
            signal.raise_signal(signal.SIGTERM)
    with pytest.raises(rh.Preempted) as error:
        with rh.MonitoredTrainingSession(state={"w": np.zeros(1)}, chief_only_hooks=[hook], save_checkpoint_secs=None,
                                         hooks=[rh.StopAtStepHook(last_step=100)]) as sess:
            while not sess.should_stop():
                sess.run(lambda: on_step(sess.global_step + 1))
    assert error.value.step == 3 and error.value.checkpoint.endswith("model.ckpt-0")
    assert "resume from the newest committed checkpoint, %s" % error.value.checkpoint in str(error.value)


@pytest.fixture
def process_sigterm():
    """Stands in for SIGTERM's default action (ending the process, this test run with it): records."""
    heard = []
    before = signal.signal(signal.SIGTERM, lambda signum, frame: heard.append(signum))
    yield heard
    signal.signal(signal.SIGTERM, before)


_HOOKS = [lambda d, r: rh.CheckpointSaverHook(d, save_steps=5, listeners=[r]),
          lambda d, r: rh.AsyncCheckpointSaverHook(d, save_steps=5, listeners=[r], in_flight="wait")]


@pytest.mark.parametrize("make", _HOOKS, ids=["sync", "async"])
def test_sigterm_during_the_final_save_at_end_is_heard_by_the_hook_not_the_process(tmp_path, make, process_sigterm):
    # A preemption as the run closes: the hook's handler must still be there while `end` saves.
    url = str(tmp_path)
    recorder = Recorder(signal_at=7)
    assert _train([make(url, recorder)], last_step=7) == 7  # finished: no Preempted
    assert process_sigterm == []
    assert _committed(url) == [0, 5, 7] and recorder.calls[-2:] == [("after_save", 7), ("end", 7)]


@pytest.mark.parametrize("make", _HOOKS, ids=["sync", "async"])
def test_sigterm_during_the_final_save_of_an_unfinished_run_raises_preempted(tmp_path, make, process_sigterm):
    class StopAt7(rh.SessionRunHook):  # stops the run short of StopAtStepHook's last step
        def after_run(self, run_context, run_values):
            if run_context.session.global_step == 7:
                run_context.request_stop()

    url, recorder, state = str(tmp_path), Recorder(signal_at=7), {"w": np.zeros(1)}
    with pytest.raises(rh.Preempted) as error:
        with rh.MonitoredTrainingSession(state=state, chief_only_hooks=[make(url, recorder)],
                                         save_checkpoint_secs=None, save_summaries_steps=None,
                                         hooks=[StopAt7(), rh.StopAtStepHook(last_step=100)]) as sess:
            while not sess.should_stop():
                sess.run(lambda: state.__setitem__("w", state["w"] + 1))
    assert process_sigterm == []
    assert error.value.step == 7 and error.value.checkpoint == url + "/model.ckpt-7"
    assert _committed(url) == [0, 5, 7]


def test_a_session_that_cannot_start_leaves_no_signal_handler_behind(tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_bytes(b"not a directory")
    with pytest.raises(OSError):
        rh.MonitoredTrainingSession(state={"w": np.zeros(1)}, save_checkpoint_secs=None,
                                    chief_only_hooks=[rh.CheckpointSaverHook(str(a_file), save_steps=2)])
    # the autouse fixture checks that SIGTERM's handler is the one from before


def test_a_failed_runs_writer_thread_ends_once_its_save_is_done(tmp_path):
    import threading
    before = set(threading.enumerate())
    state = {"w": np.zeros(1 << 16)}
    hook = rh.AsyncCheckpointSaverHook(str(tmp_path), save_steps=2, in_flight="wait")

    def step():
        state["w"] += 1
        if state["w"][0] == 3:
            raise RuntimeError("training failed")
    with pytest.raises(RuntimeError, match="training failed"):
        with rh.MonitoredTrainingSession(state=state, chief_only_hooks=[hook], save_checkpoint_secs=None,
                                         save_summaries_steps=None) as sess:
            while True:
                sess.run(step)
    writers = [t for t in set(threading.enumerate()) - before if t.name.startswith("rayhooks-writer")]
    assert writers  # the saves of steps 0 and 2 ran on it
    for thread in writers:
        thread.join(60)
    assert not [t for t in writers if t.is_alive()]
    assert _committed(str(tmp_path)) == [0, 2]  # a save in flight as the run failed still commits
