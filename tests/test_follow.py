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


def test_a_finished_run_yields_its_latest_checkpoint_once_and_ends(tmp_path):
    url, state = str(tmp_path), {"w": np.zeros(3)}
    with _session(url, state, last_step=25) as sess:
        while not sess.should_stop():
            sess.run(_fill, state, sess)
    assert _claim(url)["ended"] == "finished"
    clock = rh.ManualClock()
    seen = list(_follow(url, clock, Sleeper(clock)))
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
    with _session(url, state, last_step=10) as sess:
        while not sess.should_stop():
            sess.run(_fill, state, sess)
    data = os.path.join(url, "model.ckpt-10.data-00000-of-00001")
    with open(data, "r+b") as f:
        f.seek(100)
        f.write(b"\xff" * 8)
    clock = rh.ManualClock()
    checkpoint, = _follow(url, clock, Sleeper(clock))
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
    with _session(url, state, save_steps=5, last_step=200) as sess:
        while not sess.should_stop():
            sess.run(_fill, state, sess)
    evaluator.join(timeout=60)
    assert not evaluator.is_alive() and not errors
    steps = [step for step, _, _ in seen]
    assert steps == sorted(set(steps)) and steps[-1] == 200
    assert all(low == high == step for step, low, high in seen)   # each one consistent, of its own step


def test_on_the_gcs_emulator(gcs):
    url, state = "gs://rayhooks-test/follow-%s" % uuid.uuid4().hex[:8], {"w": np.zeros(8)}
    with _session(url, state, last_step=20, storage_options=gcs.options) as sess:
        while not sess.should_stop():
            sess.run(_fill, state, sess)
    clock = rh.ManualClock()
    checkpoint, = _follow(url, clock, Sleeper(clock), storage_options=gcs.options)
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
