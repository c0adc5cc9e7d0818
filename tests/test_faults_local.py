"""Faults survived in one process: preemption, a storage server that goes away, a memory budget.

Every fault here is real: a SIGTERM sent to a training process, a GCS server
(gcp-storage-emulator) stopped in the middle of a run and started again.
"""

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest

import rayhooks as rh
from gcs_emulator import GcsEmulator
from tcp_proxy import HoldingProxy

# gcsfs already retries each request 6 times with backoff (about 30 s when the server is
# gone), so rayhooks' own retries are turned off here to keep the test short.
FAST_RETRY = rh.RetryPolicy(max_attempts=1)

TRAINER = textwrap.dedent("""
    import sys, numpy as np, rayhooks as rh
    ckpt_dir, last = sys.argv[1], int(sys.argv[2])
    state = {"w": np.zeros(4, np.float32)}
    def step():
        state["w"] += 1
        return {}
    try:
        with rh.MonitoredTrainingSession(checkpoint_dir=ckpt_dir, save_checkpoint_steps=10**6,
                                         save_summaries_steps=None, log_step_count_steps=None,
                                         hooks=[rh.StopAtStepHook(last_step=last)], state=state) as sess:
            print("started", sess.global_step, flush=True)
            while not sess.should_stop():
                sess.run(step)
                print("step", sess.global_step, flush=True)
    finally:  # also as rh.Preempted ends a signalled run
        print("stopped", sess.global_step, float(state["w"][0]), flush=True)
""")


def _read_until(proc, prefix, limit=10_000):
    for _ in range(limit):
        line = proc.stdout.readline()
        if not line:
            raise AssertionError("trainer exited before printing %r" % prefix)
        if line.startswith(prefix):
            return line.split()
    raise AssertionError("no %r in %d lines" % (prefix, limit))


def test_sigterm_saves_at_the_next_step_and_the_run_resumes_from_it(tmp_path):
    script = tmp_path / "trainer.py"
    script.write_text(TRAINER)
    ckpt = str(tmp_path / "ckpt")
    proc = subprocess.Popen([sys.executable, str(script), ckpt, "100000000"], stdout=subprocess.PIPE, text=True)
    try:
        _read_until(proc, "step 50")
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, stopped_step, w = _read_until(proc, "stopped")
        assert proc.wait(60) == 128 + signal.SIGTERM  # rh.Preempted: the job system is to run it again
    finally:
        proc.kill()
    store = rh.CheckpointStore(rh.Storage(ckpt))
    latest = store.latest()
    assert latest.step == int(stopped_step) > 50
    assert store.verify(latest) == []
    assert float(store.reader(latest).read_tensors()["w"][0]) == float(w)  # the state after that very step

    resumed = subprocess.run([sys.executable, str(script), ckpt, str(latest.step + 3)], capture_output=True,
                             text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert "started %d" % latest.step in resumed.stdout
    assert "stopped %d %.1f" % (latest.step + 3, latest.step + 3) in resumed.stdout
    print("SIGTERM to resumed training: %.2f s" % (time.monotonic() - signalled))


@pytest.fixture
def restartable_gcs(tmp_path):
    emulator = GcsEmulator(data_dir=str(tmp_path / "gcs-data")).start()
    emulator.make_bucket("faults")
    yield emulator
    rh.SummaryWriterCache.clear()  # flush this test's event files while their server still runs
    emulator.stop()


def _training(url, state, hook):
    def step():
        state["w"] += 1
        return {}
    return rh.MonitoredTrainingSession(chief_only_hooks=[hook], state=state, save_checkpoint_secs=None,
                                       save_summaries_steps=None, log_step_count_steps=None), step


@pytest.mark.parametrize("policy", ["raise", "retry_next_save"])
def test_storage_server_stops_mid_run_and_comes_back(restartable_gcs, policy):
    url = "gs://faults/run-%s" % uuid.uuid4().hex[:8]
    state = {"w": np.zeros(1 << 18, np.float32)}
    hook = rh.CheckpointSaverHook(url, save_steps=2, storage_options=restartable_gcs.options, retry=FAST_RETRY, on_write_error=policy)
    sess, step = _training(url, state, hook)
    sess.run(step)
    sess.run(step)  # step 2 committed
    store = rh.CheckpointStore(rh.Storage(url, restartable_gcs.options))
    assert store.latest().step == 2
    restartable_gcs.stop()
    sess.run(step)
    if policy == "raise":
        with pytest.raises(OSError) as failure:
            sess.run(step)  # step 4's save cannot reach the server
        message = str(failure.value)
        assert url in message and "step=4" in message
    else:
        sess.run(step)  # step 4 fails, is logged and counted, training goes on
        assert hook.failed_saves == 1
    restartable_gcs.start()
    if policy == "raise":
        return
    sess.run(step)
    sess.run(step)  # step 6 is saved once the server is back
    assert store.latest().step == 6
    assert [i.step for i in store.committed()] == [0, 2, 6]  # 4 never became a checkpoint, torn or not
    for info in store.committed():
        assert store.verify(info) == []
    assert store.get(4) is None
    sess.close()


class _HeldUpload:
    """An async save of a 32 MB state whose step-2 upload is held once 8 MB of it went up.

    A loopback proxy between gcsfs and the server holds the client's bytes, so
    the server is stopped while the upload is provably in progress; the held
    bytes then go on to a server that is gone.
    """

    def __init__(self, gcs):
        self.gcs = gcs
        self.proxy = HoldingProxy(gcs.port)
        options = dict(gcs.options, endpoint_url=self.proxy.endpoint)
        self.url = "gs://faults/mid-upload-%s" % uuid.uuid4().hex[:8]
        self.state = {"w": np.zeros(8 << 20, np.float32)}  # several 5 MB chunks of a resumable upload
        self.hook = rh.AsyncCheckpointSaverHook(self.url, save_steps=2, storage_options=options,
                                                retry=FAST_RETRY, on_write_error="retry_next_save",
                                                in_flight="wait")
        self.sess, self.step = _training(self.url, self.state, self.hook)
        self.store = rh.CheckpointStore(rh.Storage(self.url, options))

    def stop_server_mid_upload(self):
        assert self.hook._writer.wait_idle(60)  # the initial save, step 0, is committed
        self.sess.run(self.step)
        self.proxy.hold_after(8 << 20)
        self.sess.run(self.step)  # step 2: snapshot taken, its upload goes on in the background
        assert self.proxy.held.wait(60), "the step 2 upload never got 8 MB in"
        self.gcs.stop()
        self.proxy.release()

    def assert_whole(self, steps):
        assert self.hook._writer.wait_idle(60)
        assert [i.step for i in self.store.committed()] == steps
        for info in self.store.committed():
            assert self.store.verify(info) == []
            assert float(self.store.reader(info).read_tensors()["w"][-1]) == info.step

    def close(self):
        self.sess.close()
        self.proxy.close()


def test_storage_server_restarts_during_an_upload_and_the_upload_completes(restartable_gcs):
    held = _HeldUpload(restartable_gcs)
    try:
        held.stop_server_mid_upload()
        restartable_gcs.start()  # back with its data: gcsfs resumes the upload where the server has it
        held.assert_whole([0, 2])
        assert held.hook.failed_saves == 0
        held.sess.run(held.step)
        held.sess.run(held.step)
        held.assert_whole([0, 2, 4])
    finally:
        held.close()


def test_storage_server_down_until_the_upload_gives_up(restartable_gcs):
    held = _HeldUpload(restartable_gcs)
    try:
        held.stop_server_mid_upload()
        assert held.hook._writer.wait_idle(180)  # gcsfs' retries run out: the upload has failed
        restartable_gcs.start()
        assert held.store.latest().step == 0  # nothing torn became latest
        assert held.store.get(2) is None
        held.sess.run(held.step)
        held.sess.run(held.step)  # step 4's save reports step 2's failure, counts it, and commits
        assert held.hook.failed_saves == 1
        held.assert_whole([0, 4])
        assert not [n for n in held.store.storage.listdir() if n.startswith("model.ckpt-2.")]
    finally:
        held.close()


def test_in_flight_snapshots_stay_within_the_byte_budget(restartable_gcs):
    url = "gs://faults/budget-%s" % uuid.uuid4().hex[:8]
    state = {"w": np.zeros(1 << 20, np.float32)}  # 4 MB per snapshot, saved every step: faster than storage
    budget = 9 << 20
    hook = rh.AsyncCheckpointSaverHook(url, save_steps=1, storage_options=restartable_gcs.options, in_flight="wait",
                                       max_in_flight=8, max_in_flight_bytes=budget, max_to_keep=2)
    sess, step = _training(url, state, hook)
    with sess:
        for _ in range(12):
            sess.run(step)
    assert hook._writer.peak_in_flight_bytes <= budget
    assert hook._writer.peak_in_flight_bytes >= 4 << 20
    assert rh.CheckpointStore(rh.Storage(url, restartable_gcs.options)).latest().step == 12


def test_skip_policy_never_holds_two_snapshots(restartable_gcs):
    url = "gs://faults/skip-%s" % uuid.uuid4().hex[:8]
    state = {"w": np.zeros(1 << 20, np.float32)}
    hook = rh.AsyncCheckpointSaverHook(url, save_steps=1, storage_options=restartable_gcs.options)
    sess, step = _training(url, state, hook)
    with sess:
        for _ in range(12):
            sess.run(step)
    assert hook._writer.peak_in_flight_bytes <= 4 << 20
    assert hook.skipped_saves > 0
    assert rh.CheckpointStore(rh.Storage(url, restartable_gcs.options)).latest().step == 12
