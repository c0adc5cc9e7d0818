"""Bad input gets one clear error naming the URL and the fix, and nothing committed is touched."""

import os
import signal

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest
import tensorflow as tf

import rayhooks as rh


def _run(url, last_step, state, **kwargs):
    def step():
        state["w"] += 1
    with rh.MonitoredTrainingSession(checkpoint_dir=url, save_checkpoint_steps=2, save_summaries_steps=None,
                                     log_step_count_steps=None, hooks=[rh.StopAtStepHook(last_step=last_step)],
                                     state=state, **kwargs) as sess:
        while not sess.should_stop():
            sess.run(step)
    return sess


def test_a_checkpoint_dir_written_by_plain_tf_is_refused_and_left_untouched(tmp_path):
    url = str(tmp_path / "theirs")
    v = tf.Variable([1.0, 2.0])
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(v=v), url, max_to_keep=3)
    manager.save(checkpoint_number=100)
    before = {name: (tmp_path / "theirs" / name).read_bytes() for name in os.listdir(url)}
    with pytest.raises(FileExistsError) as error:
        _run(url, 4, {"w": np.zeros(2, np.float32)})
    message = str(error.value)
    assert url in message and "ckpt-100" in message and "new checkpoint_dir" in message
    after = {name: (tmp_path / "theirs" / name).read_bytes() for name in os.listdir(url)}
    assert after == before
    assert tf.train.latest_checkpoint(url).endswith("ckpt-100")


def test_a_checkpoint_dir_written_by_plain_tf_is_refused_also_with_no_checkpoint_hook(tmp_path):
    """save_checkpoint_secs=None: rayhooks writes no checkpoint there but would restore from it. TF1
    resumes from the TF checkpoints it finds; starting from fresh weights instead must not be silent."""
    url = str(tmp_path / "theirs")
    tf.train.CheckpointManager(tf.train.Checkpoint(v=tf.Variable([1.0])), url, max_to_keep=3).save(100)
    with pytest.raises(FileExistsError) as error:
        with rh.MonitoredTrainingSession(checkpoint_dir=url, save_checkpoint_secs=None, state={"w": np.zeros(2)}):
            pass
    assert url in str(error.value) and "ckpt-100" in str(error.value)


@pytest.mark.parametrize("state, named, fix", [
    ({"params": {"w": np.zeros(2)}}, "state['params']['w'] is a ndarray", "flatten"),
    ({"layers": [np.zeros(2)]}, "state['layers'][0] is a ndarray", "flatten"),
    ({"w": np.zeros(2), "epoch": 0}, "state['epoch'] is a int", "np.asarray"),
    ({"v": tf.Variable(1.0), "w": np.zeros(2)}, "state['w'] is a ndarray", "tf.Variable(...)"),
    ([tf.Variable(1.0)], "state= is a list", "state={'v0'"),
    ("weights.ckpt", "state= is a str", "flat dict of numpy arrays"),
    (__import__("types").MappingProxyType({"w": np.zeros(2)}), "a mappingproxy of numpy arrays", "pass a dict"),
])
def test_state_a_checkpoint_would_not_hold_is_refused_naming_the_value_and_the_fix(tmp_path, state, named, fix):
    """A TF checkpoint silently leaves numpy arrays in nested dicts out: the run would resume from
    a checkpoint holding none of them."""
    with pytest.raises(TypeError) as error:
        rh.MonitoredTrainingSession(checkpoint_dir=str(tmp_path), state=state)
    assert named in str(error.value) and fix in str(error.value)
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("built_in", [True, False])
def test_two_checkpoint_hooks_in_one_directory_are_refused_naming_the_fix(tmp_path, built_in):
    """TF1 idiom: a hook of your own replaces the session's saver only with save_checkpoint_secs=None.
    Forgotten, two savers would share the directory, and each one's clean-up deletes the other's
    files in flight."""
    url = str(tmp_path / "run")
    mine = [rh.AsyncCheckpointSaverHook(url, save_steps=5)]
    if not built_in:
        mine.append(rh.CheckpointSaverHook("file://" + url + "/", save_steps=3))
    with pytest.raises(ValueError) as error:
        rh.MonitoredTrainingSession(checkpoint_dir=url, chief_only_hooks=mine, state={"w": np.zeros(1)},
                                    **({} if built_in else {"save_checkpoint_secs": None}))
    assert url in str(error.value) and "save_checkpoint_secs=None" in str(error.value)
    with rh.MonitoredTrainingSession(checkpoint_dir=url, chief_only_hooks=mine[:1], save_checkpoint_secs=None,
                                     state={"w": np.zeros(1)}, hooks=[rh.StopAtStepHook(last_step=5)]) as sess:
        while not sess.should_stop():
            sess.run(lambda: None)
    assert rh.CheckpointStore(rh.Storage(url)).latest().step == 5
    with rh.MonitoredSession(hooks=mine[:1], chief_hooks=mine[:1], state={"w": np.zeros(1)}):
        pass                                        # one hook given twice is not two savers


def test_a_checkpoint_dir_written_by_tf1s_saver_with_absolute_paths_is_refused_and_left_untouched(tmp_path):
    """TF1's Saver (Estimator, tf.compat.v1's MonitoredTrainingSession) names its checkpoints in the
    state file by absolute path, where CheckpointManager names them relative to the directory."""
    url = str(tmp_path / "tf1")
    with tf.Graph().as_default():
        tf.compat.v1.get_variable("w", initializer=np.float32(42.0))
        saver = tf.compat.v1.train.Saver()  # save_relative_paths=False, TF1's default
        with tf.compat.v1.Session() as s:
            s.run(tf.compat.v1.global_variables_initializer())
            for step in (100, 200):
                saver.save(s, os.path.join(url, "model.ckpt"), global_step=step)
    assert '"%s/model.ckpt-200"' % url in (tmp_path / "tf1" / "checkpoint").read_text()
    before = {name: (tmp_path / "tf1" / name).read_bytes() for name in os.listdir(url)}
    with pytest.raises(FileExistsError) as error:
        _run(url, 4, {"w": np.zeros((), np.float32)})
    assert url in str(error.value) and "model.ckpt-200" in str(error.value)
    assert {name: (tmp_path / "tf1" / name).read_bytes() for name in os.listdir(url)} == before


def test_a_malformed_state_file_is_reported_and_replaced_without_losing_checkpoints(tmp_path, caplog):
    url = str(tmp_path / "run")
    state = {"w": np.zeros(2, np.float32)}
    _run(url, 4, state)
    (tmp_path / "run" / "checkpoint").write_text("this is { not a checkpoint state\n")
    state["w"][:] = -1
    sess = _run(url, 6, state)
    assert sess.global_step == 6 and state["w"][0] == 6  # resumed from step 4: manifests, not the state file
    assert "malformed checkpoint state" in caplog.text and url in caplog.text
    assert tf.train.latest_checkpoint(url).endswith("model.ckpt-6")
    assert [i.step for i in rh.CheckpointStore(rh.Storage(url)).committed()] == [0, 2, 4, 6]


def test_an_unknown_protocol_is_one_clear_error():
    with pytest.raises(ValueError) as error:
        _run("nosuchfs://bucket/run", 2, {"w": np.zeros(2, np.float32)})
    assert "nosuchfs://bucket/run" in str(error.value) and "gs://" in str(error.value)


def test_a_missing_directory_in_the_cli_exits_2(tmp_path, capsys):
    from rayhooks.cli import main
    assert main(["ls", str(tmp_path / "nothing-here")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "nothing-here" in err


def test_tensorflows_own_tf1_hooks_are_refused_at_once_naming_the_rayhooks_one(tmp_path):
    """A port from TF1 that keeps `tf.compat.v1.train.CheckpointSaverHook` would otherwise fail at the
    hook's begin() with TF's "FileWriter is not compatible with eager execution", naming neither fix."""
    url = str(tmp_path / "ckpt")
    with pytest.raises(TypeError, match=r"tf\.compat\.v1\.train\.StopAtStepHook.*pass rh\.StopAtStepHook"):
        rh.MonitoredSession(hooks=[tf.compat.v1.train.StopAtStepHook(last_step=5)], state={"w": np.zeros(1)})
    with pytest.raises(TypeError, match=r"chief_only_hooks .*pass rh\.CheckpointSaverHook instead"):
        rh.launch(lambda ctx: None, 1, backend="local",
                  chief_only_hooks=[tf.compat.v1.train.CheckpointSaverHook(url, save_steps=1)])
    with pytest.raises(TypeError, match="rayhooks has no FeedFnHook"):
        rh.launch(lambda ctx: None, 1, backend="local", hooks=[tf.compat.v1.train.FeedFnHook(dict)])
    with pytest.raises(TypeError, match="hooks must hold SessionRunHook instances"):
        rh.MonitoredSession(hooks=[object()], state={"w": np.zeros(1)})
    assert not os.path.exists(url)  # refused before anything ran


def test_a_hook_of_your_own_written_against_tf1s_base_class_runs():
    class CountRuns(tf.compat.v1.train.SessionRunHook):
        runs = 0

        def after_run(self, run_context, run_values):
            CountRuns.runs += 1
            if CountRuns.runs == 3:
                run_context.request_stop()

    with rh.MonitoredSession(hooks=[CountRuns()], state={"w": np.zeros(1)}) as sess:
        while not sess.should_stop():
            sess.run(lambda: None)
    assert CountRuns.runs == 3


class _Listener(rh.CheckpointSaverListener):
    pass


@pytest.mark.parametrize("make, error, says", [
    (lambda d: rh.CheckpointSaverHook(d, save_steps=-1), ValueError, r"save_steps must be a whole number of steps >= 0"),
    (lambda d: rh.CheckpointSaverHook(d, save_steps=1.5), ValueError, r"save_steps must be a whole number"),
    (lambda d: rh.CheckpointSaverHook(d, save_steps="10"), ValueError, r"save_steps must be a whole number"),
    (lambda d: rh.AsyncCheckpointSaverHook(d, save_secs=-1), ValueError, r"save_secs must be a number of seconds >= 0"),
    (lambda d: rh.SummarySaverHook(save_steps=-5, output_dir=d, summary_op=["x"]), ValueError, r"save_steps must be"),
    (lambda d: rh.StepCounterHook(every_n_steps=-1), ValueError, r"every_n_steps must be a whole number"),
    (lambda d: rh.LoggingTensorHook(["x"], every_n_secs=-1), ValueError, r"every_n_secs must be a number"),
    (lambda d: rh.StopAtStepHook(num_steps=-1), ValueError, r"num_steps=\) must be a whole number of steps >= 0"),
    (lambda d: rh.StopAtStepHook(last_step=2.5), ValueError, r"last_step=\) must be a whole number"),
    (lambda d: rh.CheckpointSaverHook(d, save_steps=2, checkpoint_basename="a/b"), ValueError,
     r"checkpoint_basename must be a file name \(no '/'\), got 'a/b'"),
    (lambda d: rh.CheckpointSaverHook(d, save_steps=2, keep_checkpoint_every_n_hours=-1), ValueError,
     r"keep_checkpoint_every_n_hours must be > 0"),
    (lambda d: rh.CheckpointSaverHook(d, save_steps=2, save_on_signals=15), TypeError,
     r"save_on_signals takes a tuple of signals"),
    (lambda d: rh.CheckpointSaverHook(d, save_steps=2, save_on_signals=(signal.SIGKILL,)), ValueError,
     r"cannot be caught by a process"),
    (lambda d: rh.CheckpointSaverHook(d, save_steps=2, listeners=_Listener()), TypeError, r"pass \[_Listener\]"),
    (lambda d: rh.CheckpointSaverHook(d, save_steps=2, listeners=[_Listener]), TypeError,
     r"the class _Listener, not a listener"),
    (lambda d: rh.CheckpointSaverHook(d, save_steps=2, listeners=[object()]), TypeError,
     r"has no begin, before_save, after_save, end"),
    (lambda d: rh.CheckpointSaverHook(d, save_steps=2, retry={"max_attempts": 3}), TypeError,
     r"retry= takes an rh.RetryPolicy"),
    (lambda d: rh.RetryPolicy(initial_backoff=15), ValueError, r"above max_backoff \(10.0 s, the default\)"),
    (lambda d: rh.CheckpointSaverHook(d, save_steps=2, save_on_signals=("SIGTERM",)), TypeError,
     r"signal numbers such as signal.SIGTERM, got 'SIGTERM'"),
    (lambda d: rh.AsyncCheckpointSaverHook(d, save_steps=2, max_in_flight=1.5), ValueError, r"max_in_flight"),
    (lambda d: rh.MonitoredSession(hooks=[rh.StopAtStepHook]), TypeError,
     r"holds the class StopAtStepHook, not a hook: pass an instance"),
    (lambda d: rh.MonitoredSession(steps_per_run=2.5), ValueError, r"steps_per_run must be a whole number"),
    (lambda d: rh.MonitoredTrainingSession(state={"w": np.zeros(1)}, checkpoint_dir=d, global_step=-3),
     ValueError, r"global_step= reads -3"),
    (lambda d: rh.launch(lambda ctx: None, "2", backend="local"), ValueError, r"num_workers must be a whole number"),
    (lambda d: rh.launch(lambda ctx: None, 1, backend="local", report_interval=-1), ValueError,
     r"report_interval must be >= 0 seconds"),
], ids=lambda v: "" if callable(v) or isinstance(v, type) else v[:24])
def test_values_no_run_could_use_are_refused_when_given_naming_the_argument(tmp_path, make, error, says):
    with pytest.raises(error, match=says):
        make(str(tmp_path / "ckpt"))


def test_a_checkpoint_dir_that_is_a_file_keeps_its_error_type_and_says_what_to_check(tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_bytes(b"not a directory")
    with pytest.raises(FileExistsError) as error:
        rh.Storage(str(a_file)).check_writable()
    assert str(a_file) in str(error.value) and "check that it is a directory (not a file)" in str(error.value)
    assert "bucket" not in str(error.value)


@pytest.mark.parametrize("arrays, says", [
    ({1: np.zeros(1)}, "got the key 1"),
    ({"a": np.array([{}, 1], dtype=object)}, r"arrays\['a'\] holds Python objects other than strings"),
])
def test_a_numpy_state_a_checkpoint_cannot_hold_names_the_key(arrays, says):
    with pytest.raises(TypeError, match=says):
        rh.NumpySaver(arrays)



def test_values_tf1_took_are_still_taken():
    """TF1's timer took save_steps=0 (every step) and whole floats; so does rayhooks, and numpy integers."""
    assert rh.SecondOrStepTimer(every_steps=0).every_steps == 0
    assert rh.SecondOrStepTimer(every_steps=100.0).every_steps == 100
    assert rh.SecondOrStepTimer(every_steps=np.int64(5)).every_steps == 5
    assert rh.SecondOrStepTimer(every_secs=0).every_secs == 0
    rh.AsyncCheckpointSaverHook("memory://tf1-values", save_steps=np.int32(3), max_in_flight=np.int64(2))
    rh.StopAtStepHook(last_step=np.int64(10))
