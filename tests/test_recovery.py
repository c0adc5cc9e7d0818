"""A failed worker group restarts from the latest committed checkpoint (max_failures).

Faults are real: on the local backend a worker's train_fn raises; on Ray a
listener on the chief kills a worker actor with `ray.kill`, as a lost node would.
"""

import os
import sys
import threading

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest

import rayhooks as rh


class CountCreations(rh.SessionRunHook):
    """A chief-only hook: after_create_session runs again when the workers are recovered."""

    def __init__(self):
        self.created = []

    def after_create_session(self, session, coord):
        self.created.append(session.global_step)

    def end(self, session):
        if len(self.created) != 2:
            raise AssertionError("after_create_session ran %d times: %r" % (len(self.created), self.created))


def _train(fail_once_at=None, failed=None):
    def train_fn(ctx):
        state = {"w": np.zeros(2, np.float32)}

        def step():
            state["w"] += 1
            return {"loss": float(state["w"][0])}

        with ctx.session(state=state) as sess:
            if sess.global_step:
                assert state["w"][0] == sess.global_step  # restored: the values after that very step
            while not sess.should_stop():
                sess.run(step)
                if (fail_once_at is not None and ctx.worker_index == 1 and sess.global_step == fail_once_at
                        and not failed.is_set()):
                    failed.set()
                    raise RuntimeError("injected failure of worker 1 at step %d" % sess.global_step)
        return sess.global_step, float(state["w"][0])
    return train_fn


def test_local_worker_failure_restarts_from_the_latest_commit(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    failed = threading.Event()
    counter = CountCreations()
    result = rh.launch(_train(fail_once_at=7, failed=failed), 2, backend="local", max_failures=1,
                       chief_only_hooks=[rh.CheckpointSaverHook(ckpt, save_steps=3), counter],
                       hooks=[rh.StopAtStepHook(last_step=12)], report_interval=0)
    assert failed.is_set() and result.recoveries == 1
    assert result.last_step == 12
    assert [r[0] for r in result.worker_results] == [12, 12]
    assert [r[1] for r in result.worker_results] == [12.0, 12.0]
    store = rh.CheckpointStore(rh.Storage(ckpt))
    committed = [i.step for i in store.committed()]
    assert result.checkpoints == [0, 3, 6, 9, 12], result.checkpoints
    assert committed == [3, 6, 9, 12] or committed == [0, 3, 6, 9, 12], committed
    for info in store.committed():
        assert store.verify(info) == []
        assert float(store.reader(info).read_tensors()["w"][0]) == info.step


def test_local_failure_past_max_failures_raises_with_the_traceback(tmp_path):
    failed = threading.Event()
    with pytest.raises(RuntimeError, match="injected failure of worker 1") as error:
        rh.launch(_train(fail_once_at=4, failed=failed), 2, backend="local", max_failures=0,
                  chief_only_hooks=[rh.CheckpointSaverHook(str(tmp_path), save_steps=3)],
                  hooks=[rh.StopAtStepHook(last_step=10)], report_interval=0)
    assert "Traceback" in str(error.value)
    store = rh.CheckpointStore(rh.Storage(str(tmp_path)))
    assert all(i.step <= 3 and store.verify(i) == [] for i in store.committed())  # what committed stays whole


class KillWorkerOnce(rh.CheckpointSaverListener):
    """On the chief: after the checkpoint of `at_step` commits, kill worker 1's actor (a lost node)."""

    def __init__(self, run_name, at_step):
        self.run_name, self.at_step, self.killed = run_name, at_step, False

    def after_save(self, session, step):
        if step == self.at_step and not self.killed:
            import ray
            self.killed = True
            ray.kill(ray.get_actor("rayhooks-%s-worker-1" % self.run_name))


def _slow_train(ctx):
    import time
    state = {"w": np.zeros(2, np.float32)}

    def step():
        state["w"] += 1
        deadline = time.perf_counter() + 0.005  # a real step takes time: the kill lands mid-run
        while time.perf_counter() < deadline:
            pass
        return {}

    with ctx.session(state=state) as sess:
        while not sess.should_stop():
            sess.run(step)
    return sess.global_step, float(state["w"][0])


def test_ray_worker_actor_killed_mid_run_recovers(ray_session, tmp_path):
    import ray
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import tests/
    ckpt = str(tmp_path / "ckpt")
    counter = CountCreations()
    result = rh.launch(_slow_train, 2, backend="ray", max_failures=1, name="killtest", tf_config=False,
                       chief_only_hooks=[rh.CheckpointSaverHook(ckpt, save_steps=20,
                                                                listeners=[KillWorkerOnce("killtest", 20)]),
                                         counter],
                       hooks=[rh.StopAtStepHook(last_step=200)])
    assert result.recoveries == 1
    assert [r[0] for r in result.worker_results] == [200, 200]
    assert [r[1] for r in result.worker_results] == [200.0, 200.0]
    store = rh.CheckpointStore(rh.Storage(ckpt))
    assert store.latest().step == 200
    for info in store.committed():
        assert store.verify(info) == []
        assert float(store.reader(info).read_tensors()["w"][0]) == info.step


class CrashChiefOnce(rh.CheckpointSaverListener):
    """Records each after_save in a file, and at `at_step` kills the chief's process the first time.

    The file lives outside the chief, whose memory dies with it; os._exit is a real crash
    (no cleanup), in the middle of dispatching after_save.
    """

    def __init__(self, log_path, at_step):
        self.log_path, self.at_step = log_path, at_step

    def after_save(self, session, step):
        with open(self.log_path, "a") as f:
            f.write("%d\n" % step)
        crashed = self.log_path + ".crashed"
        if step == self.at_step and not os.path.exists(crashed):
            open(crashed, "w").close()
            os._exit(1)


def test_ray_chief_killed_mid_run_restarts_and_never_repeats_after_save(ray_session, tmp_path):
    import ray
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ckpt, log = str(tmp_path / "ckpt"), str(tmp_path / "after_save.log")
    result = rh.launch(_slow_train, 2, backend="ray", tf_config=False,
                       chief_only_hooks=[rh.AsyncCheckpointSaverHook(
                           ckpt, save_steps=20, in_flight="wait", listeners=[CrashChiefOnce(log, 40)])],
                       hooks=[rh.StopAtStepHook(last_step=160)])
    assert os.path.exists(log + ".crashed")
    seen = [int(line) for line in open(log).read().split()]
    assert len(seen) == len(set(seen)), seen  # I3: never twice for the same step, across the restart
    assert 40 in seen and seen[-1] == 160
    assert [r[0] for r in result.worker_results] == [160, 160]
    store = rh.CheckpointStore(rh.Storage(ckpt))
    assert store.latest().step == 160
    for info in store.committed():
        assert store.verify(info) == []
        assert float(store.reader(info).read_tensors()["w"][0]) == info.step


class CrashChiefFrom(rh.CheckpointSaverListener):
    """Records each after_save in a file and, from `at_step` on, kills the chief's process every time."""

    def __init__(self, log_path, at_step):
        self.log_path, self.at_step = log_path, at_step

    def after_save(self, session, step):
        with open(self.log_path, "a") as f:
            f.write("%d\n" % step)
        if step >= self.at_step:
            os._exit(1)


@pytest.mark.timeout(180, method="thread")  # a regression hangs in ray.wait, which the signal method cannot interrupt
def test_ray_chief_dead_for_good_fails_the_run_instead_of_leaving_a_waiting_save_hanging(ray_session, tmp_path):
    """With in_flight='wait', a worker waits for the chief to settle its saves; once Ray has used up
    the chief's restarts nothing would tell it to stop waiting, and before the driver watched the
    chief this run hung until the test's timeout."""
    import ray
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ckpt, log = str(tmp_path / "ckpt"), str(tmp_path / "after_save.log")
    with pytest.raises(RuntimeError) as error:
        rh.launch(_slow_train, 1, backend="ray", max_failures=0, tf_config=False,
                  chief_only_hooks=[rh.AsyncCheckpointSaverHook(
                      ckpt, save_steps=10, in_flight="wait", listeners=[CrashChiefFrom(log, 20)])],
                  hooks=[rh.StopAtStepHook(last_step=100_000)])
    seen = [int(line) for line in open(log).read().split()]
    assert seen[-2] == 20 and seen[-1] > 20, seen  # it died at two commits: the first restart, then for good
    message = str(error.value)
    assert "chief actor died for good" in message and "max(1, max_failures)=1" in message, message
    assert "after step %d was committed in %s" % (seen[-1], ckpt) in message, message
    assert isinstance(error.value.__cause__, ray.exceptions.ActorDiedError)


class PreemptWorkerOnce(rh.CheckpointSaverListener):
    """On the chief: after `at_step` commits, sends SIGTERM to worker 1's process (a preemption)."""

    def __init__(self, run_name, at_step, saved):
        self.run_name, self.at_step, self.saved, self.sent = run_name, at_step, saved, False

    def after_save(self, session, step):
        with open(self.saved, "a") as f:
            f.write("%d\n" % step)
        if step == self.at_step and not self.sent:
            import ray
            import signal
            self.sent = True
            pid = ray.get(ray.get_actor("rayhooks-%s-worker-1" % self.run_name).pid.remote())
            os.kill(pid, signal.SIGTERM)


def test_ray_worker_sigterm_saves_an_emergency_checkpoint_and_resumes(ray_session, tmp_path):
    import ray
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ckpt, saved = str(tmp_path / "ckpt"), str(tmp_path / "saved.log")
    # No scheduled save between the first (at step 0, where the SIGTERM is sent) and the last, so
    # the emergency checkpoint cannot fall on one, however late the SIGTERM lands: with saves
    # every 50 steps, a stop step the chief picked at 100 under load hid it among them.
    result = rh.launch(_slow_train, 2, backend="ray", max_failures=1, name="sigterm", tf_config=False,
                       chief_only_hooks=[rh.CheckpointSaverHook(
                           ckpt, save_steps=1000, listeners=[PreemptWorkerOnce("sigterm", 0, saved)])],
                       hooks=[rh.StopAtStepHook(last_step=300)])
    steps = [int(s) for s in open(saved).read().split()]
    assert len(steps) == 3 and steps[0] == 0 and steps[2] == 300, steps  # first, emergency, final
    emergency = steps[1]
    assert 0 < emergency < 300
    assert [r[0] for r in result.worker_results] == [300, 300]
    assert [r[1] for r in result.worker_results] == [300.0, 300.0]
    assert result.recoveries == 1  # the group resumed from the emergency checkpoint
    store = rh.CheckpointStore(rh.Storage(ckpt))
    assert store.latest().step == 300
    info = store.get(emergency)
    assert store.verify(info) == [] and float(store.reader(info).read_tensors()["w"][0]) == emergency


def test_ray_worker_sigterm_with_no_restart_left_raises_preempted_after_the_emergency_checkpoint(
        ray_session, tmp_path):
    """max_failures=0: the run stops at the emergency checkpoint, and must not pass for a finished one
    (a Kubernetes Job or RayJob would record it as succeeded): launch raises rh.Preempted, a SystemExit
    with status 143, carrying the run's result."""
    import ray
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ckpt, saved = str(tmp_path / "ckpt"), str(tmp_path / "saved.log")
    with pytest.raises(rh.Preempted) as error:
        rh.launch(_slow_train, 2, backend="ray", name="sigterm-once", tf_config=False,
                  chief_only_hooks=[rh.CheckpointSaverHook(
                      ckpt, save_steps=1000, listeners=[PreemptWorkerOnce("sigterm-once", 0, saved)])],
                  hooks=[rh.StopAtStepHook(last_step=300)])
    steps = [int(s) for s in open(saved).read().split()]
    assert len(steps) == 2 and steps[0] == 0 and 0 < steps[1] < 300, steps  # first, emergency; no final
    preempted = error.value
    assert preempted.code == 143 and preempted.step == steps[1] == preempted.result.last_step
    assert preempted.checkpoint == rh.CheckpointStore(rh.Storage(ckpt)).latest().url
    # ... and its claim says so: a sidecar evaluator waits for the restart instead of stopping.
    assert rh.CheckpointStore(rh.Storage(ckpt)).writer_claim.read()["ended"] == "preempted"
    assert "launch" not in str(preempted) and "run the same command again" in str(preempted)


def _exit_worker_1_at_step_30(ctx):
    state = {"w": np.zeros(2, np.float32)}

    def step():
        state["w"] += 1
        return {}

    with ctx.session(state=state) as sess:
        while not sess.should_stop():
            sess.run(step)
            if ctx.worker_index == 1 and sess.global_step == 30:
                os._exit(1)  # the process dies: no traceback reaches the driver


def test_ray_dead_worker_error_names_the_directory_the_step_and_the_fix(ray_session, tmp_path):
    import ray
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ckpt = str(tmp_path / "ckpt")
    with pytest.raises(RuntimeError) as error:
        rh.launch(_exit_worker_1_at_step_30, 2, backend="ray", tf_config=False,
                  chief_only_hooks=[rh.CheckpointSaverHook(ckpt, save_steps=10)],
                  hooks=[rh.StopAtStepHook(last_step=1000)])
    latest = rh.CheckpointStore(rh.Storage(ckpt)).latest().step
    message = str(error.value)
    assert "worker 1 died" in message and ckpt in message, message
    assert "after step %d was committed" % latest in message and "launch again" in message, message
    assert isinstance(error.value.__cause__, ray.exceptions.RayActorError)
