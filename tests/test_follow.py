"""A sidecar evaluator follows a checkpoint directory: rh.checkpoints_iterator.

The training runs are real sessions writing real checkpoints; the waiting is
driven by a ManualClock whose `sleep` advances it (and, where a test says so,
trains on between two polls), except in the one test where an evaluator thread
follows a run training beside it.
"""

import json
import os
import threading
import uuid

import numpy as np
import pytest

import rayhooks as rh
from rayhooks.claim import WRITER_SUFFIX
from rayhooks.follow import finished


class Sleeper:
    """`sleep` for the iterator: advances a ManualClock and runs what the test wants done meanwhile."""

    def __init__(self, clock, between=None):
        self.clock, self.between, self.calls = clock, between, []

    def __call__(self, seconds):
        self.calls.append(seconds)
        self.clock.advance(seconds)
        if self.between is not None:
            self.between(len(self.calls))


def _session(url, state, save_steps=10, max_to_keep=5, last_step=None, storage_options=None):
    hooks = [rh.StopAtStepHook(last_step=last_step)] if last_step is not None else []
    return rh.MonitoredTrainingSession(
        checkpoint_dir=url, state=state, save_checkpoint_secs=None, save_summaries_steps=None,
        log_step_count_steps=None, hooks=hooks, storage_options=storage_options,
        chief_only_hooks=[rh.CheckpointSaverHook(url, save_steps=save_steps, max_to_keep=max_to_keep,
                                                 storage_options=storage_options)])


def _fill(state, sess):
    state["w"][:] = sess.global_step + 1  # after this step the weights equal the step count


def _train(sess, state, steps):
    for _ in range(steps):
        sess.run(_fill, state, sess)


def _follow(url, clock, sleeper, **kwargs):
    kwargs.setdefault("poll_secs", 1.0)
    return rh.checkpoints_iterator(url, clock=clock, sleep=sleeper, **kwargs)


def _claim(url):
    with open(os.path.join(url, "model.ckpt" + WRITER_SUFFIX)) as f:
        return json.load(f)


def _run_to(url, state, last_step, **kwargs):
    with _session(url, state, last_step=last_step, **kwargs) as sess:
        while not sess.should_stop():
            sess.run(_fill, state, sess)


def test_a_run_finished_before_the_iterator_began_is_evaluated_once_with_timeout_0(tmp_path):
    url, state = str(tmp_path), {"w": np.zeros(3)}
    _run_to(url, state, 25)
    assert _claim(url)["ended"] == "finished"
    clock = rh.ManualClock()
    seen = list(_follow(url, clock, Sleeper(clock), timeout=0))
    assert [c.step for c in seen] == [25]           # the newest only: 0, 10 and 20 were committed before
    restored = {"w": np.zeros(3)}
    assert seen[0].restore(restored) == 25
    np.testing.assert_array_equal(restored["w"], np.full(3, 25.0))
    assert seen[0].url == url + "/model.ckpt-25"
    np.testing.assert_array_equal(seen[0].read_tensors(["w"])["w"], np.full(3, 25.0))


def test_it_waits_for_each_new_checkpoint_and_ends_when_the_run_finishes(tmp_path):
    url, state = str(tmp_path), {"w": np.zeros(3)}
    sess = _session(url, state)
    _train(sess, state, 10)                          # step 0 and 10 committed, the run goes on
    clock = rh.ManualClock()
    polls = []

    def between(calls):
        polls.append(calls)
        if calls == 3:
            _train(sess, state, 10)                  # commits step 20 while the iterator waits
        elif calls == 6:
            _train(sess, state, 5)
            sess.close()                             # final save of step 25, and a clean end
    got = []
    for checkpoint in _follow(url, clock, Sleeper(clock, between)):
        restored = {"w": np.zeros(3)}
        checkpoint.restore(restored)
        got.append((checkpoint.step, float(restored["w"][0])))
    assert got == [(10, 10.0), (20, 20.0), (25, 25.0)]
    assert polls == list(range(1, 7))                # it polled until the end, then stopped by itself


def test_a_failed_run_is_waited_for_until_the_timeout(tmp_path):
    """A failed (or preempted) run is restarted by its job system: the evaluator must not stop on it."""
    url, state = str(tmp_path), {"w": np.zeros(3)}
    with pytest.raises(ZeroDivisionError):
        with _session(url, state) as sess:
            _train(sess, state, 10)
            1 / 0
    claim = _claim(url)
    assert claim["released"] and claim["ended"] == "failed" and not finished(claim)
    clock = rh.ManualClock()
    sleeper = Sleeper(clock)
    assert [c.step for c in _follow(url, clock, sleeper, timeout=5)] == [10]
    assert sum(sleeper.calls) == 5 and clock.now == 5


def test_timeout_fn_decides_whether_to_wait_again(tmp_path):
    url = str(tmp_path / "not-yet")                  # the training run has not made it yet
    clock = rh.ManualClock()
    answers = iter([False, False, True])
    asked = []

    def timeout_fn():
        asked.append(clock.now)
        return next(answers)
    assert list(_follow(url, clock, Sleeper(clock), timeout=3, timeout_fn=timeout_fn)) == []
    assert asked == [3, 6, 9]


def test_min_interval_secs_spaces_the_yields(tmp_path):
    url, state = str(tmp_path), {"w": np.zeros(3)}
    sess = _session(url, state)
    clock = rh.ManualClock()
    sleeper = Sleeper(clock, lambda calls: _train(sess, state, 10) if calls == 1 else sess.close())
    yielded_at = []
    for checkpoint in _follow(url, clock, sleeper, min_interval_secs=30):
        yielded_at.append((checkpoint.step, clock.now))
        clock.advance(4)                             # the evaluation itself takes 4 s
    assert yielded_at == [(0, 0), (10, 30)]
    assert sleeper.calls[0] == 26                    # the rest of the 30 s, after the 4 s evaluation


def test_a_damaged_checkpoint_raises_naming_its_step_and_url(tmp_path):
    url, state = str(tmp_path), {"w": np.zeros(1000)}
    _run_to(url, state, 10)
    data = os.path.join(url, "model.ckpt-10.data-00000-of-00001")
    with open(data, "r+b") as f:
        f.seek(100)
        f.write(b"\xff" * 8)
    clock = rh.ManualClock()
    checkpoint, = _follow(url, clock, Sleeper(clock), timeout=0)
    with pytest.raises(ValueError, match=r"\[step=10\] checkpoint .*model\.ckpt-10 is damaged .*crc32c.*rayhooks "
                                         r"verify"):
        checkpoint.restore({"w": np.zeros(1000)})
    with pytest.raises(ValueError, match="tensor 'w': checksum mismatch"):
        checkpoint.restore({"w": np.zeros(1000)}, verify=False)   # the bundle's own per-tensor check


def test_a_checkpoint_deleted_by_retention_before_its_restore_says_so(tmp_path):
    url, state = str(tmp_path), {"w": np.zeros(3)}
    sess = _session(url, state, max_to_keep=1)
    _train(sess, state, 10)
    clock = rh.ManualClock()
    checkpoint = next(_follow(url, clock, Sleeper(clock)))
    assert checkpoint.step == 10
    _train(sess, state, 10)                          # step 20 committed: retention deletes step 10
    sess.close()
    with pytest.raises(FileNotFoundError, match=r"\[step=10\] .*model\.ckpt-10 was deleted before or while it "
                                                r"was restored: "
                                                r"the training run's retention removed it .*max_to_keep"):
        checkpoint.restore({"w": np.zeros(3)})


def test_an_evaluator_thread_follows_a_run_training_beside_it(tmp_path):
    """The sidecar as users run it: real time, a real thread, the run's checkpoints in whatever order they come."""
    url, state = str(tmp_path), {"w": np.zeros(64)}
    seen, errors = [], []

    def evaluate():
        try:
            for checkpoint in rh.checkpoints_iterator(url, poll_secs=0.01, timeout=60):
                restored = {"w": np.zeros(64)}
                checkpoint.restore(restored)
                seen.append((checkpoint.step, restored["w"].min(), restored["w"].max()))
        except BaseException as e:  # noqa: BLE001 -- asserted below
            errors.append(e)
    evaluator = threading.Thread(target=evaluate)
    evaluator.start()
    # Every checkpoint kept: with retention, one could go before the evaluator thread reads it.
    with _session(url, state, save_steps=5, last_step=200, max_to_keep=None) as sess:
        while not sess.should_stop():
            sess.run(_fill, state, sess)
    evaluator.join(timeout=60)
    assert not evaluator.is_alive() and not errors
    steps = [step for step, _, _ in seen]
    assert steps == sorted(set(steps)) and steps[-1] == 200
    assert all(low == high == step for step, low, high in seen)   # each one consistent, of its own step


def test_on_the_gcs_emulator(gcs):
    url, state = "gs://rayhooks-test/follow-%s" % uuid.uuid4().hex[:8], {"w": np.zeros(8)}
    _run_to(url, state, 20, storage_options=gcs.options)
    clock = rh.ManualClock()
    checkpoint, = _follow(url, clock, Sleeper(clock), storage_options=gcs.options, timeout=0)
    restored = {"w": np.zeros(8)}
    assert checkpoint.restore(restored) == 20 and restored["w"][0] == 20


@pytest.mark.parametrize("kwargs, error", [
    ({"min_interval_secs": -1}, "min_interval_secs must be a number of seconds >= 0"),
    ({"poll_secs": 0}, "poll_secs must be above 0"),
    ({"timeout": "10"}, "timeout must be None"),
    ({"timeout_fn": True}, "timeout_fn must be a function"),
])
def test_bad_arguments_are_refused_at_the_call(tmp_path, kwargs, error):
    with pytest.raises((ValueError, TypeError), match=error):
        rh.checkpoints_iterator(str(tmp_path), **kwargs)


@pytest.mark.parametrize("claim, done", [
    (None, False),
    ({"run": "a"}, False),
    ({"run": "a", "released": 5.0}, True),               # a claim released by an older rayhooks
    ({"run": "a", "released": 5.0, "ended": "finished"}, True),
    ({"run": "a", "released": 5.0, "ended": "failed"}, False),
    ({"run": "a", "released": 5.0, "ended": "preempted"}, False),
])
def test_which_claims_say_the_run_finished(claim, done):
    assert finished(claim) is done


def test_a_finished_run_found_at_the_start_does_not_end_the_evaluation_of_the_run_resuming_it(tmp_path):
    """The evaluator and a new run start together in the directory of a finished one: the new run's claim
    comes a moment later, and the earlier run's end must not stop the evaluator."""
    url, state = str(tmp_path), {"w": np.zeros(3)}
    _run_to(url, state, 20)
    clock = rh.ManualClock()
    got = []

    def between(calls):
        if calls == 2:
            _run_to(url, state, 40)                  # resumes at 20, commits 30 and 40, finishes
    for checkpoint in _follow(url, clock, Sleeper(clock, between)):
        got.append(checkpoint.step)
    assert got == [20, 40]


def _committed_0_10_and_a_damaged_20(url, state):
    """A finished run's checkpoints 0, 10 and 20, all kept, 20 then damaged: a run resumes at 10."""
    sess = _session(url, state, max_to_keep=None)
    _train(sess, state, 20)
    sess.close()
    with open(os.path.join(url, "model.ckpt-20.data-00000-of-00001"), "r+b") as f:
        f.write(b"\xff" * 4)


def test_a_newer_commit_below_a_damaged_higher_step_is_yielded(tmp_path):
    """A run resumed below a damaged checkpoint commits lower steps: the state file names them as newest,
    as TF's latest_checkpoint and the resuming session see it."""
    url, state = str(tmp_path), {"w": np.zeros(3)}
    _committed_0_10_and_a_damaged_20(url, state)
    clock = rh.ManualClock()
    got = []

    def between(calls):
        if calls == 1:
            resumed = _session(url, {"w": np.zeros(3)}, save_steps=5, max_to_keep=None)
            assert resumed.global_step == 10            # fell back past the damaged 20
            _train(resumed, state, 5)
            resumed.close()
    for checkpoint in _follow(url, clock, Sleeper(clock, between), timeout=3):
        got.append(checkpoint.step)
    assert got == [20, 15]


def test_a_claim_says_failed_when_an_error_is_raised_at_close(tmp_path):
    """coord.request_stop(ex) and a hook's failing `end` are raised as the session closes, after the
    checkpoint hook's own `end`: the claim must say failed, or the evaluator would stop for good."""
    class FailingEnd(rh.SessionRunHook):
        def end(self, session):
            raise RuntimeError("an end hook broke")

    for name, hooks, stop in (("coord", [], True), ("end", [FailingEnd()], False)):
        url, state = str(tmp_path / name), {"w": np.zeros(3)}
        with pytest.raises(RuntimeError):
            with rh.MonitoredTrainingSession(
                    checkpoint_dir=url, state=state, save_checkpoint_secs=None, save_summaries_steps=None,
                    log_step_count_steps=None, hooks=hooks,
                    chief_only_hooks=[rh.CheckpointSaverHook(url, save_steps=10)]) as sess:
                sess.run(_fill, state, sess)
                if stop:
                    sess.coord.request_stop(RuntimeError("the input pipeline died"))
        assert _claim(url)["ended"] == "failed", name


def test_a_signal_in_the_last_step_leaves_a_finished_run(tmp_path):
    """The session does not raise Preempted when StopAtStepHook's last step was reached: nothing restarts
    the run, so its claim must say finished."""
    import signal
    url, state = str(tmp_path), {"w": np.zeros(3)}

    def step(sess):
        _fill(state, sess)
        if sess.global_step == 9:
            signal.raise_signal(signal.SIGTERM)
    with _session(url, state, last_step=10) as sess:
        while not sess.should_stop():
            sess.run(step, sess)
    assert _claim(url)["ended"] == "finished"


def test_restoring_a_worker_shard_the_checkpoint_lacks_is_refused(tmp_path):
    url = str(tmp_path)
    store = rh.CheckpointStore(rh.Storage(url))
    store.claim()
    files = store.write_data(5, {"w": np.full(2, 5.0)})
    files.update(store.write_data(5, {"w": np.full(2, 105.0)}, prefix=store.prefix_for(5) + ".worker1"))
    store.commit(5, files)
    store.release()
    clock = rh.ManualClock()
    checkpoint, = _follow(url, clock, Sleeper(clock), timeout=0)
    for worker, value in ((None, 5.0), (0, 5.0), (1, 105.0)):
        restored = {"w": np.zeros(2)}
        checkpoint.restore(restored, worker=worker)
        assert restored["w"][0] == value
    with pytest.raises(ValueError, match=r"\[step=5\] .*model\.ckpt-5 has no shard of worker 2: its workers 0, 1 "
                                         r"each wrote their own"):
        checkpoint.restore({"w": np.zeros(2)}, worker=2)
    with pytest.raises(ValueError, match="worker must be a worker's index"):
        checkpoint.restore({"w": np.zeros(2)}, worker=True)


def test_a_checkpoint_of_another_basename_is_pointed_at(tmp_path, caplog):
    url, state = str(tmp_path), {"w": np.zeros(3)}
    with rh.MonitoredTrainingSession(
            checkpoint_dir=url, state=state, save_checkpoint_secs=None, save_summaries_steps=None,
            log_step_count_steps=None, hooks=[rh.StopAtStepHook(last_step=3)],
            chief_only_hooks=[rh.CheckpointSaverHook(url, save_steps=10, checkpoint_basename="ckpt")]) as sess:
        while not sess.should_stop():
            sess.run(_fill, state, sess)
    clock = rh.ManualClock()
    with caplog.at_level("WARNING", logger="rayhooks"):
        assert list(_follow(url, clock, Sleeper(clock), timeout=2)) == []
    assert "no checkpoints named model.ckpt-*, but some named ckpt-*: pass checkpoint_basename='ckpt'" in caplog.text
    assert [c.step for c in _follow(url, clock, Sleeper(clock), timeout=0, checkpoint_basename="ckpt")] == [3]


def test_strings_restore_into_str_and_bytes_arrays_of_any_width(tmp_path):
    url, state = str(tmp_path), {"vocab": np.array(["apple", "banana", "ü"]), "w": np.zeros(2)}
    _run_to(url, state, 1)
    clock = rh.ManualClock()
    checkpoint, = _follow(url, clock, Sleeper(clock), timeout=0)
    narrow = {"vocab": np.array(["", "", ""]), "w": np.zeros(2)}                # <U1: too narrow to hold them
    checkpoint.restore(narrow)
    assert narrow["vocab"].tolist() == ["apple", "banana", "ü"]
    wide = {"vocab": np.zeros(3, "U10"), "w": np.zeros(2)}
    held = wide["vocab"]
    checkpoint.restore(wide)
    assert held.tolist() == ["apple", "banana", "ü"] and wide["vocab"] is held   # in place where they fit
    as_bytes = {"vocab": np.zeros(3, "S2"), "w": np.zeros(2)}
    checkpoint.restore(as_bytes)
    assert as_bytes["vocab"].tolist() == [b"apple", b"banana", "ü".encode()]


def test_a_refused_restore_leaves_every_array_as_it_was(tmp_path):
    url, state = str(tmp_path), {"w": np.zeros(3), "names": np.array([b"a", b"b"], dtype=object)}
    _run_to(url, state, 1)
    clock = rh.ManualClock()
    checkpoint, = _follow(url, clock, Sleeper(clock), timeout=0)
    for mine, says in (({"w": np.full(3, -1.0), "extra": np.full(1, -1.0)}, "has no tensor extra"),
                       ({"w": np.full(3, -1.0), "names": np.array([b"x"], dtype=object)}, "does not fit"),
                       ({"w": np.full(3, -1.0), "names": np.zeros(2)}, "does not fit")):
        with pytest.raises(ValueError, match=says):
            checkpoint.restore(mine)
        assert (mine["w"] == -1).all()


def test_an_unbuilt_keras_model_restores_from_a_remote_store_when_it_is_built(memory_url):
    """Keras restores an unbuilt model's weights when it is built, after restore() returned: the downloaded
    copy must still be there then."""
    import gc
    import tensorflow as tf
    model = tf.keras.Sequential([tf.keras.Input((4,)), tf.keras.layers.Dense(2)])
    state = tf.train.Checkpoint(model=model)
    with rh.MonitoredTrainingSession(
            checkpoint_dir=memory_url, state=state, save_checkpoint_secs=None, save_summaries_steps=None,
            log_step_count_steps=None, hooks=[rh.StopAtStepHook(last_step=1)],
            chief_only_hooks=[rh.CheckpointSaverHook(memory_url, save_steps=10)]) as sess:
        while not sess.should_stop():
            sess.run(lambda: None)
    clock = rh.ManualClock()
    checkpoint, = _follow(memory_url, clock, Sleeper(clock), timeout=0)
    unbuilt = tf.keras.Sequential([tf.keras.layers.Dense(2)])
    checkpoint.restore(tf.train.Checkpoint(model=unbuilt))
    del checkpoint
    gc.collect()
    unbuilt(np.zeros((1, 4), np.float32))                                      # builds: the restore happens now
    np.testing.assert_array_equal(unbuilt.layers[-1].kernel.numpy(), model.layers[-1].kernel.numpy())


def test_a_step_committed_again_by_a_resumed_run_is_yielded_again(tmp_path):
    """A run resumed below a damaged checkpoint commits that step again, under the same name."""
    url, state = str(tmp_path), {"w": np.zeros(3)}
    _committed_0_10_and_a_damaged_20(url, state)
    clock = rh.ManualClock()
    first = []

    def between(calls):
        if calls == 1:
            resumed = _session(url, state, max_to_keep=None)
            assert resumed.global_step == 10
            for _ in range(10):
                resumed.run(lambda: state["w"].__setitem__(slice(None), resumed.global_step + 1001))
            resumed.close()
            with pytest.raises(FileNotFoundError, match="committed that step again"):
                first[0].restore({"w": np.zeros(3)})                   # the commit it was is gone
    outcomes = []
    for checkpoint in _follow(url, clock, Sleeper(clock, between)):
        first.append(checkpoint)
        try:
            restored = {"w": np.zeros(3)}
            checkpoint.restore(restored)
            outcomes.append((checkpoint.step, float(restored["w"][0])))
        except ValueError as e:
            outcomes.append((checkpoint.step, "damaged" if "is damaged" in str(e) else str(e)))
    assert outcomes == [(20, "damaged"), (20, 1020.0)]
