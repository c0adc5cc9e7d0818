"""Tier 2: errors in local mode: TF's constructor messages, storage faults that surface in the
training loop with the URL and step (DESIGN I6), and a failing step (DESIGN I2).

Faults are real: the checkpoint directory is replaced by a file after `begin`,
so the next write fails in fsspec/the OS, on file:// and memory:// alike.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import logging
import threading

import fsspec
import numpy as np
import pytest

import rayhooks as rh
from rayhooks.formats import state_file
from rayhooks.writer import BackgroundWriter

TIMEOUT = 30


def _local_dir(url):
    if url.startswith("memory://"):
        return None
    return url[len("file://"):] if url.startswith("file://") else url


def _replace_dir_with_file(url):
    fs, path = fsspec.core.url_to_fs(url)
    fs.rm(path, recursive=True)
    fs.pipe_file(path, b"this used to be the checkpoint directory")


def _restore_dir(url):
    fs, path = fsspec.core.url_to_fs(url)
    if fs.isfile(path):
        fs.rm(path)


def _commit_event(store, step):
    """An Event set once `store` has committed `step`."""
    event = threading.Event()
    commit = store.commit

    def wrapped(s, *args, **kwargs):
        info = commit(s, *args, **kwargs)
        if s == step:
            event.set()
        return info

    store.commit = wrapped
    return event


def _committed(url):
    return [i.step for i in rh.CheckpointStore(rh.Storage(url)).committed()]


class _BackgroundFailure(logging.Handler):
    """Sets `event` when the writer logs a background failure."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.event = threading.Event()
        self.messages = []

    def emit(self, record):
        message = record.getMessage()
        if "failed in the background" in message:
            self.messages.append(message)
            self.event.set()


@pytest.fixture
def background_failure():
    handler = _BackgroundFailure()
    logger = logging.getLogger("rayhooks")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


class EndRecorder(rh.SessionRunHook):
    def __init__(self):
        self.ended = False

    def end(self, session):
        self.ended = True


class ListenerRecorder(rh.CheckpointSaverListener):
    def __init__(self):
        self.calls = []

    def after_save(self, session, global_step_value):
        self.calls.append(("after_save", global_step_value))

    def end(self, session, global_step_value):
        self.calls.append(("end", global_step_value))


def _session(url, hook, state, hooks=()):
    return rh.MonitoredTrainingSession(checkpoint_dir=url, state=state, chief_only_hooks=[hook],
                                       save_checkpoint_secs=None, save_summaries_steps=0,
                                       log_step_count_steps=0, hooks=list(hooks))


# -- constructor errors: TF's messages ---------------------------------------------


def _message(fn):
    with pytest.raises(ValueError) as excinfo:
        fn()
    return str(excinfo.value)


@pytest.mark.parametrize("case", ["saver_and_scaffold", "neither_steps_nor_secs", "both_steps_and_secs"])
def test_checkpoint_hook_constructor_errors_match_tensorflow(case, tmp_path):
    import tensorflow as tf
    kwargs = {"saver_and_scaffold": dict(save_steps=1, saver=rh.NumpySaver({"w": np.zeros(1)}),
                                         scaffold=rh.Scaffold()),
              "neither_steps_nor_secs": {},
              "both_steps_and_secs": dict(save_steps=1, save_secs=1)}[case]
    ours = _message(lambda: rh.CheckpointSaverHook(str(tmp_path), **kwargs))
    tf_kwargs = dict(kwargs)
    if "scaffold" in tf_kwargs:
        tf_kwargs.update(saver=object(), scaffold=object())
    theirs = _message(lambda: tf.compat.v1.train.CheckpointSaverHook(str(tmp_path), **tf_kwargs))
    assert ours == theirs
    assert _message(lambda: rh.AsyncCheckpointSaverHook(str(tmp_path), **kwargs)) == theirs
    assert not os.listdir(tmp_path)  # constructors do no I/O


@pytest.mark.parametrize("case", ["both", "neither"])
def test_summary_hook_constructor_errors_match_tensorflow(case):
    import tensorflow as tf
    kwargs = {"both": dict(summary_op=["loss"], scaffold=rh.Scaffold()), "neither": {}}[case]
    ours = _message(lambda: rh.SummarySaverHook(save_steps=1, **kwargs))
    tf_kwargs = {"both": dict(summary_op=object(), scaffold=object()), "neither": {}}[case]
    theirs = _message(lambda: tf.compat.v1.train.SummarySaverHook(save_steps=1, **tf_kwargs))
    assert ours == theirs == "Exactly one of scaffold or summary_op must be provided."


def test_small_hooks_constructor_errors_match_tensorflow():
    import tensorflow as tf
    pairs = [
        (lambda: rh.StopAtStepHook(), lambda: tf.compat.v1.train.StopAtStepHook()),
        (lambda: rh.StopAtStepHook(num_steps=1, last_step=1),
         lambda: tf.compat.v1.train.StopAtStepHook(num_steps=1, last_step=1)),
        (lambda: rh.StepCounterHook(every_n_steps=None), lambda: tf.compat.v1.train.StepCounterHook(every_n_steps=None)),
        (lambda: rh.StepCounterHook(every_n_steps=1, every_n_secs=1),
         lambda: tf.compat.v1.train.StepCounterHook(every_n_steps=1, every_n_secs=1)),
        (lambda: rh.LoggingTensorHook(["loss"]), lambda: tf.compat.v1.train.LoggingTensorHook(["loss"])),
        (lambda: rh.LoggingTensorHook(["loss"], every_n_iter=0),
         lambda: tf.compat.v1.train.LoggingTensorHook(["loss"], every_n_iter=0)),
    ]
    for ours, theirs in pairs:
        assert _message(ours) == _message(theirs)


@pytest.mark.parametrize("arg", ["init_op", "ready_op", "local_init_op", "init_fn"])
def test_scaffold_rejects_tf1_initialisation(arg):
    with pytest.raises(ValueError, match=r"Scaffold\(%s=\.\.\.\).*no TF2 meaning" % arg):
        rh.Scaffold(**{arg: object()})
    scaffold = rh.Scaffold(summary_op=["loss"], saver=None)
    assert scaffold.summary_op == ["loss"]
    assert scaffold.finalize() is scaffold


# -- storage faults -----------------------------------------------------------------


def test_unwritable_checkpoint_dir_fails_at_session_construction(storage_url):
    rh.Storage(storage_url).write_bytes("afile", b"a file, not a directory")
    bad = storage_url + "/afile/run"
    ran = []
    with pytest.raises(OSError) as excinfo:
        rh.MonitoredTrainingSession(checkpoint_dir=bad, state={"w": np.zeros(2)}, save_checkpoint_steps=1)
        ran.append(True)
    assert bad in str(excinfo.value)
    assert ran == []


def test_unknown_protocol_fails_at_session_construction():
    with pytest.raises(ValueError, match="nosuchproto://bucket/run"):
        rh.MonitoredTrainingSession(checkpoint_dir="nosuchproto://bucket/run", state={"w": np.zeros(2)},
                                    save_checkpoint_steps=1)


def test_sync_save_error_surfaces_at_the_save(storage_url):
    state = {"w": np.zeros(3)}
    end = EndRecorder()
    hook = rh.CheckpointSaverHook(storage_url, save_steps=2)
    raised_at = []

    def step():
        if sess.global_step == 1:
            _replace_dir_with_file(storage_url)
        state["w"] += 1

    try:
        with pytest.raises(OSError) as excinfo:
            with _session(storage_url, hook, state, hooks=[end]) as sess:
                while not sess.should_stop():
                    raised_at.append(sess.global_step)
                    sess.run(step)
        message = str(excinfo.value)
        assert storage_url in message
        assert "[step=2]" in message
        assert raised_at[-1] == 1  # the run that made step 2, whose save failed
        assert not end.ended
    finally:
        _restore_dir(storage_url)


def _breaking_step(storage_url, hook, listener, state, runs, at=2):
    """A step function that replaces the checkpoint directory by a file in the run that makes
    step `at` + 1, once step 0 is committed and its after_save has run: the save of step 3 is
    then the first to fail, in the background."""
    def step():
        runs.append(sess_holder[0].global_step)
        if sess_holder[0].global_step == at - 1:
            assert hook._writer.wait_idle(TIMEOUT)  # step 0 committed: after_run dispatches it next
        if sess_holder[0].global_step == at:
            assert ("after_save", 0) in listener.calls
            _replace_dir_with_file(storage_url)
        state["w"] += 1
        if after_step:
            after_step[0]()

    sess_holder, after_step = [None], []
    return step, sess_holder, after_step


def test_async_error_surfaces_at_the_next_save(storage_url, background_failure):
    state = {"w": np.zeros(3)}
    listener = ListenerRecorder()
    end = EndRecorder()
    # "wait": the save of step 3 must not be skipped because step 0's job is still winding down.
    hook = rh.AsyncCheckpointSaverHook(storage_url, save_steps=3, listeners=[listener], in_flight="wait")
    runs = []
    step, holder, after_step = _breaking_step(storage_url, hook, listener, state, runs)

    def let_step_3_fail():
        if holder[0].global_step == 4:  # in the run that makes step 5: step 3's save has failed
            assert background_failure.event.wait(TIMEOUT)
            assert hook._writer.wait_idle(TIMEOUT)  # the failure is recorded when the job ends

    after_step.append(let_step_3_fail)
    try:
        with pytest.raises(OSError) as excinfo:
            with _session(storage_url, hook, state, hooks=[end]) as sess:
                holder[0] = sess
                while not sess.should_stop() and len(runs) < 20:
                    sess.run(step)
        message = str(excinfo.value)
        assert storage_url in message
        assert "[step=3]" in message and "not committed" in message
        assert runs[-1] == 5  # raised in the run that made step 6, the next save
        assert sess.global_step == 6
        assert background_failure.messages and "[step=3]" in background_failure.messages[0]
        assert ("after_save", 3) not in listener.calls
        assert not end.ended
    finally:
        _restore_dir(storage_url)


class _SignallingHook(rh.AsyncCheckpointSaverHook):
    """Calls `on_wait()` when a save finds no room and is about to wait for it."""

    def __init__(self, *args, on_wait, **kwargs):
        super().__init__(*args, **kwargs)
        self.on_wait = on_wait

    def _new_writer(self):
        hook = self

        class Writer(BackgroundWriter):
            def admit(self, nbytes, wait, timeout=None):
                if super().admit(nbytes, wait=False):
                    return True
                if not wait:
                    return False
                hook.on_wait()
                return super().admit(nbytes, wait=True, timeout=timeout)

        return Writer(self._what, self._max_in_flight, self._max_in_flight_bytes)


def _held_at_step_3(hook, release):
    """Holds the background write of step 3 until `release` is set (when step 6 waits for room)."""
    write_data = hook.store.write_data

    def held_write(step, *args, **kwargs):
        if step == 3 and not release.wait(TIMEOUT):
            raise TimeoutError("never released")
        return write_data(step, *args, **kwargs)

    hook.store.write_data = held_write


def test_wait_mode_raises_the_failure_it_waited_for(storage_url):
    """With in_flight="wait", the save that waited for a failing one raises its error (I6)."""
    state = {"w": np.zeros(3)}
    listener = ListenerRecorder()
    release = threading.Event()
    hook = _SignallingHook(storage_url, save_steps=3, in_flight="wait", on_wait=release.set,
                           listeners=[listener])
    _held_at_step_3(hook, release)
    runs = []
    step, holder, _ = _breaking_step(storage_url, hook, listener, state, runs)
    try:
        with pytest.raises(OSError, match=r"\[step=3\]"):
            with _session(storage_url, hook, state) as sess:
                holder[0] = sess
                while not sess.should_stop() and len(runs) < 20:
                    sess.run(step)
        assert runs[-1] == 5  # raised by the save of step 6, which waited for step 3 to fail
    finally:
        release.set()
        _restore_dir(storage_url)


def test_close_after_a_save_error_does_not_hang(memory_url):
    """The user catches the error from run() and closes the session: end() must finish."""
    storage_url = memory_url
    state = {"w": np.zeros(3)}
    listener = ListenerRecorder()
    release = threading.Event()
    hook = _SignallingHook(storage_url, save_steps=3, in_flight="wait", on_wait=release.set,
                           listeners=[listener])
    _held_at_step_3(hook, release)
    runs = []
    step, holder, _ = _breaking_step(storage_url, hook, listener, state, runs)
    sess = holder[0] = _session(storage_url, hook, state)
    try:
        with pytest.raises(OSError, match=r"\[step=3\]"):
            for _ in range(20):
                sess.run(step)
        # Step 3's job has ended (its error was raised), and no other save was submitted.
        assert not hook._writer.busy(), "the failed save's reservation leaked"
        outcome = []

        def close():
            try:
                sess.close()
                outcome.append(None)
            except BaseException as e:  # the final save fails too: the directory is still a file
                outcome.append(e)

        closer = threading.Thread(target=close, daemon=True)
        closer.start()
        closer.join(TIMEOUT)
        assert not closer.is_alive(), "close() hangs after a save error was raised"
        assert isinstance(outcome[0], OSError) and storage_url in str(outcome[0])
    finally:
        release.set()
        _restore_dir(storage_url)


def test_async_error_surfaces_at_end(storage_url):
    state = {"w": np.zeros(3)}
    listener = ListenerRecorder()
    hook = rh.AsyncCheckpointSaverHook(storage_url, save_steps=3, listeners=[listener], in_flight="wait")
    runs = []
    step, holder, _ = _breaking_step(storage_url, hook, listener, state, runs)
    try:
        with pytest.raises(OSError) as excinfo:
            with _session(storage_url, hook, state, hooks=[rh.StopAtStepHook(last_step=4)]) as sess:
                holder[0] = sess
                while not sess.should_stop():
                    sess.run(step)
            assert False, "the with-block must raise at exit"
        message = str(excinfo.value)
        assert storage_url in message
        assert "[step=3]" in message  # raised by end(), before its own save of step 4
        assert ("end", 4) not in listener.calls
        assert sess.global_step == 4
    finally:
        _restore_dir(storage_url)


class _BadSaver:
    """Snapshots a tensor that no TF checkpoint can hold (a real failure of the bundle writer)."""

    def snapshot(self):
        return rh.Snapshot({"when": np.array(["2024-01-01"], dtype="datetime64[D]")}, 8)

    def restore(self, checkpoint):
        raise AssertionError("nothing was ever committed")


def test_unsavable_tensor_names_the_tensor_the_url_and_the_step(storage_url):
    with pytest.raises(Exception) as excinfo:
        rh.MonitoredTrainingSession(checkpoint_dir=storage_url, state=_BadSaver(), save_checkpoint_steps=1)
    message = str(excinfo.value)
    assert "'when'" in message and "datetime64" in message
    assert storage_url in message
    assert "[step=0]" in message
    assert _committed(storage_url) == []
    assert not rh.Storage(storage_url).exists("checkpoint")


def test_unsavable_tensor_keeps_its_error_kind(storage_url):
    with pytest.raises(TypeError):
        rh.MonitoredTrainingSession(checkpoint_dir=storage_url, state=_BadSaver(), save_checkpoint_steps=1)


# -- a failing step -----------------------------------------------------------------


def test_failing_step_keeps_committed_checkpoints(storage_url):
    state = {"w": np.zeros(3)}
    end = EndRecorder()
    listener = ListenerRecorder()
    hook = rh.CheckpointSaverHook(storage_url, save_steps=2, listeners=[listener])

    def step():
        if sess.global_step == 5:
            raise RuntimeError("bad batch")
        state["w"] += 1

    with pytest.raises(RuntimeError, match="bad batch"):
        with _session(storage_url, hook, state, hooks=[end]) as sess:
            while not sess.should_stop():
                sess.run(step)
    assert not end.ended
    assert listener.calls == [("after_save", 0), ("after_save", 2), ("after_save", 4)]  # no end
    store = rh.CheckpointStore(rh.Storage(storage_url))
    assert _committed(storage_url) == [0, 2, 4]
    for info in store.committed():
        assert store.verify(info) == []
    assert store.partials() == []
    text = rh.Storage(storage_url).read_bytes("checkpoint").decode()
    assert state_file.parse_state(text).model_checkpoint_path == "model.ckpt-4"


def test_failing_step_never_makes_a_partial_the_latest(storage_url):
    """Step 4's files are written but not committed when the step fails: 2 stays the latest."""
    state = {"w": np.zeros(3)}
    end = EndRecorder()
    hook = rh.AsyncCheckpointSaverHook(storage_url, save_steps=2, in_flight="wait")
    reached, opened, done = threading.Event(), threading.Event(), threading.Event()
    commit = hook.store.commit

    def held_commit(step, *args, **kwargs):
        if step == 4:
            reached.set()
            if not opened.wait(TIMEOUT):
                raise TimeoutError("test never released the commit of step 4")
        try:
            return commit(step, *args, **kwargs)
        finally:
            if step == 4:
                done.set()

    hook.store.commit = held_commit

    def step():
        if sess.global_step == 4:
            assert reached.wait(TIMEOUT)  # step 4's data and index are on storage
            raise RuntimeError("bad batch")
        state["w"] += 1

    try:
        with pytest.raises(RuntimeError, match="bad batch"):
            with _session(storage_url, hook, state, hooks=[end]) as sess:
                while not sess.should_stop():
                    sess.run(step)
        assert not end.ended
        store = rh.CheckpointStore(rh.Storage(storage_url))
        assert store.latest().step == 2
        assert store.verify(store.latest()) == []
        assert sorted(store.partials()) == ["model.ckpt-4.data-00000-of-00001", "model.ckpt-4.index"]
        text = rh.Storage(storage_url).read_bytes("checkpoint").decode()
        assert state_file.parse_state(text).model_checkpoint_path == "model.ckpt-2"
        local = _local_dir(storage_url)
        if local is not None:
            import tensorflow as tf
            assert tf.train.latest_checkpoint(local) == os.path.join(local, "model.ckpt-2")
        restored = {"w": np.zeros(3)}
        assert store.restore_latest(rh.NumpySaver(restored)).step == 2
        np.testing.assert_array_equal(restored["w"], np.full(3, 2.0))
    finally:
        opened.set()
        assert done.wait(TIMEOUT)  # the writer thread finishes before the directory goes away


def test_a_fetch_that_is_not_an_output_names_the_hook_and_the_step():
    with pytest.raises(KeyError) as error:
        with rh.MonitoredSession(hooks=[rh.NanTensorHook("Loss")], state={"w": np.zeros(1)}) as sess:
            sess.run(lambda: {"loss": np.float32(0.5)})
    message = str(error.value)
    assert "[step=1] NanTensorHook.before_run asked for it" in message
    assert "'Loss' is not an output of the step" in message and "['loss']" in message


def _per_replica(*values):
    """What strategy.run returns under a MirroredStrategy of two replicas (TF's own type; a real
    two-device strategy needs logical devices set before TF starts, which this process is past)."""
    import tensorflow as tf
    from tensorflow.python.distribute import values as distribute_values
    return distribute_values.PerReplica(tuple(tf.constant(v) for v in values))


def test_a_per_replica_fetch_says_to_reduce_it():
    with pytest.raises(TypeError) as error:
        with rh.MonitoredSession(hooks=[rh.NanTensorHook("loss")], state={"w": np.zeros(1)}) as sess:
            sess.run(lambda: {"loss": _per_replica(0.5, 0.25)})
    message = str(error.value)
    assert "[step=1] NanTensorHook.before_run asked for it" in message
    assert "fetch 'loss' is a per-replica value (PerReplica)" in message and "strategy.reduce(" in message


def test_a_per_replica_summary_says_to_reduce_it(tmp_path):
    # Fetched by name, it is the fetch's error; made by a callable summary_op, the summary's.
    with pytest.raises(TypeError, match=r"SummarySaverHook.*fetch 'loss' is a per-replica value"):
        with rh.MonitoredSession(hooks=[rh.SummarySaverHook(save_steps=1, output_dir=str(tmp_path / "a"),
                                                            summary_op=["loss"])]) as sess:
            sess.run(lambda: {"loss": _per_replica(0.5, 0.25)})
    with pytest.raises(ValueError, match=r"summary 'loss'.*PerReplica.*strategy\.reduce\("):
        with rh.MonitoredSession(hooks=[rh.SummarySaverHook(
                save_steps=1, output_dir=str(tmp_path / "b"),
                summary_op=lambda: {"loss": _per_replica(0.5, 0.25)})]) as sess:
            sess.run(lambda: {})


def test_a_session_that_runs_no_step_logs_nothing_at_end_and_a_fetch_says_no_step_ran(caplog):
    """A hook stops the session before its first step (in after_create_session). TF1's
    LoggingTensorHook(at_end=True) ran the tensors once more; here no step made them, so the hook logs
    nothing rather than fail the session's close, and session.run says why it has no output."""
    class StopAtOnce(rh.SessionRunHook):
        def after_create_session(self, session, coord):
            coord.request_stop()

    with caplog.at_level(logging.INFO, logger="rayhooks"):
        with rh.MonitoredSession(hooks=[StopAtOnce(), rh.LoggingTensorHook(["loss"], at_end=True)],
                                 state={"w": np.zeros(1)}) as sess:
            while not sess.should_stop():
                sess.run(lambda: {"loss": np.float32(0.5)})
    assert sess.global_step == 0
    assert "nothing to log at end" in caplog.text and "loss =" not in caplog.text
    with pytest.raises(KeyError, match="no step has run in this session yet"):
        sess.handle.run("loss")


def test_run_after_close_says_the_session_is_closed():
    sess = rh.MonitoredSession(state={"w": np.zeros(1)})
    sess.run(lambda: None)
    sess.close()
    with pytest.raises(RuntimeError, match="Attempted to use a closed Session"):
        sess.run(lambda: None)


def test_a_callable_fetchs_own_type_error_goes_out_as_it_is():
    class Fetches(rh.SessionRunHook):
        def before_run(self, run_context):
            return rh.SessionRunArgs(lambda: 1 + "a")

        def after_run(self, run_context, run_values):
            self.results = run_values.results

    with pytest.raises(TypeError) as error:
        with rh.MonitoredSession(hooks=[Fetches()], state={"w": np.zeros(1)}) as sess:
            sess.run(lambda: None)
    assert "unsupported operand" in str(error.value) and "asked for it" not in str(error.value)
    assert any(entry.name == "<lambda>" for entry in error.traceback)  # the user's frame is kept
