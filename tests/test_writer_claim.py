"""One run writes a checkpoint directory at a time: a run started later takes it over.

Two runs saving into one directory (a job system starting a replacement while the old process
still runs) deleted each other's checkpoints, including ones whose after_save had said they
were durable. The runs here are real sessions on a local directory, interleaved in one thread.
"""

import logging
import os

import numpy as np
import pytest

import rayhooks as rh
from rayhooks.claim import WRITER_SUFFIX


class Log(rh.CheckpointSaverListener):
    def __init__(self):
        self.saved = []

    def after_save(self, session, step):
        self.saved.append(step)


def _session(url, state, log, **kwargs):
    kwargs.setdefault("on_write_error", "raise")
    return rh.MonitoredTrainingSession(
        checkpoint_dir=url, state=state, save_checkpoint_secs=None, save_summaries_steps=None,
        log_step_count_steps=None,
        chief_only_hooks=[rh.CheckpointSaverHook(url, save_steps=5, max_to_keep=1, listeners=[log], **kwargs)])


def _step(state):
    state["w"] += 1


def _resume_step(url):
    with rh.MonitoredTrainingSession(checkpoint_dir=url, state={"w": np.zeros(4)}, save_checkpoint_secs=None,
                                     save_summaries_steps=None, log_step_count_steps=None) as sess:
        return sess.global_step


@pytest.mark.parametrize("on_write_error", ["raise", "retry_next_save"])
def test_a_run_taken_over_stops_at_its_next_commit_and_reports_nothing_durable(tmp_path, caplog, on_write_error):
    url = str(tmp_path)
    a, b, log_a, log_b = {"w": np.zeros(4)}, {"w": np.zeros(4)}, Log(), Log()
    first = _session(url, a, log_a, on_write_error=on_write_error)
    for _ in range(10):
        first.run(_step, a)
    with caplog.at_level(logging.WARNING, logger="rayhooks"):
        second = _session(url, b, log_b)  # the replacement: resumes from step 10
    assert second.global_step == 10
    assert "taking over from run" in caplog.text and "pid %d" % os.getpid() in caplog.text
    with pytest.raises(rh.DirectoryTakenOver, match=r"\[step=15\] not committed: .* has another writer now"):
        with first:  # closed on the way out, as a user's `with` block would
            for _ in range(10):
                first.run(_step, a)  # even under retry_next_save: no later save of this run can commit
    assert log_a.saved == [0, 5, 10]  # nothing after the takeover was reported durable
    assert not [n for n in os.listdir(url) if n.startswith("model.ckpt-15")]  # nor written: the new run's names
    for _ in range(5):
        second.run(_step, b)
    second.close()
    assert log_b.saved == [10, 15]
    assert _resume_step(url) == 15
    store = rh.CheckpointStore(rh.Storage(url))
    assert [i.step for i in store.committed()] == [15] and store.verify(store.latest()) == []


def test_a_claim_released_at_a_clean_end_is_taken_without_a_warning(tmp_path, caplog):
    url, state = str(tmp_path), {"w": np.zeros(4)}
    with _session(url, state, Log()) as sess:
        for _ in range(3):
            sess.run(_step, state)
    with caplog.at_level(logging.INFO, logger="rayhooks"):
        with _session(url, state, Log()) as sess:
            sess.run(_step, state)
    assert "taking over" not in caplog.text


def test_a_claim_left_by_a_process_that_is_gone_is_taken_over_with_a_note(tmp_path, caplog):
    url, state = str(tmp_path), {"w": np.zeros(4)}
    store = rh.CheckpointStore(rh.Storage(url))
    store.claim()
    gone = os.fork()  # a pid that is certainly not running once reaped
    if gone == 0:
        os._exit(0)
    os.waitpid(gone, 0)
    claim_file = os.path.join(url, "model.ckpt" + WRITER_SUFFIX)
    with open(claim_file) as f:
        text = f.read().replace('"pid": %d' % os.getpid(), '"pid": %d' % gone)
    with open(claim_file, "w") as f:
        f.write(text)
    with caplog.at_level(logging.INFO, logger="rayhooks"):
        with _session(url, state, Log()) as sess:
            sess.run(_step, state)
    records = [r for r in caplog.records if "taking over" in r.getMessage()]
    assert [r.levelno for r in records] == [logging.INFO] and "ended without releasing it" in records[0].getMessage()


def test_a_claim_deleted_by_hand_is_made_again_and_the_run_goes_on(tmp_path, caplog):
    url, state, log = str(tmp_path), {"w": np.zeros(4)}, Log()
    with _session(url, state, log) as sess:
        sess.run(_step, state)
        os.remove(os.path.join(url, "model.ckpt" + WRITER_SUFFIX))
        with caplog.at_level(logging.WARNING, logger="rayhooks"):
            for _ in range(4):
                sess.run(_step, state)
    assert log.saved == [0, 5] and "is gone; claiming the directory again" in caplog.text


def test_a_takeover_between_the_check_and_the_manifest_is_caught_after_it(tmp_path, monkeypatch):
    # The window is a few ms wide and cannot be hit at will: the new run's claim is made from
    # inside the old run's manifest write, which is where it would have to land.
    url, a, log = str(tmp_path), {"w": np.zeros(4)}, Log()
    first = _session(url, a, log)
    for _ in range(4):
        first.run(_step, a)
    hook = next(h for h in first._hooks if isinstance(h, rh.CheckpointSaverHook))
    real_write = type(hook.store.storage).write_bytes

    def write_bytes(self, name, data, *args, **kwargs):
        if name.endswith(".manifest.json"):
            rh.CheckpointStore(rh.Storage(url)).claim()
        return real_write(self, name, data, *args, **kwargs)
    monkeypatch.setattr(type(hook.store.storage), "write_bytes", write_bytes)
    with pytest.raises(rh.DirectoryTakenOver, match=r"\[step=5\] not committed"):
        with first:
            first.run(_step, a)
    assert log.saved == [0]
    # Its manifest is withdrawn: a later run must not resume from a checkpoint of the run taken over.
    assert [i.step for i in rh.CheckpointStore(rh.Storage(url)).committed()] == [0]


def test_an_older_claim_written_over_a_newer_one_does_not_stop_the_newer_run(tmp_path, caplog):
    # The race: a run taken over reads its own claim, the new run claims, and the old run's release
    # then writes its "released" claim over the new one. Claims are numbered, so the newer run
    # knows the claim it finds is older than its own and claims again.
    import json
    url = str(tmp_path)
    old, new = rh.CheckpointStore(rh.Storage(url)), rh.CheckpointStore(rh.Storage(url))
    old.claim()
    new.claim()
    released = dict(old.writer_claim.mine, released=1.0)
    old.storage.write_bytes("model.ckpt" + WRITER_SUFFIX, json.dumps(released).encode())
    with caplog.at_level(logging.WARNING, logger="rayhooks"):
        new.check_claim(10)  # no DirectoryTakenOver
    assert "is an older run's" in caplog.text
    with open(os.path.join(url, "model.ckpt" + WRITER_SUFFIX)) as f:
        assert json.load(f)["run"] == new.writer_claim.mine["run"]
    with pytest.raises(rh.DirectoryTakenOver):
        old.writer_claim.mine = dict(released)
        del old.writer_claim.mine["released"]
        old.check_claim(11)


def test_a_restarted_chief_claims_again_only_over_its_own_runs_claim(tmp_path, caplog):
    url = str(tmp_path)
    first = rh.CheckpointStore(rh.Storage(url))
    first.claim(token="launch-a")
    with caplog.at_level(logging.INFO, logger="rayhooks"):
        rh.CheckpointStore(rh.Storage(url)).claim(token="launch-a", restarted=True)  # Ray restarted the chief
    assert "the restarted chief claims it again" in caplog.text and "has not released it" not in caplog.text
    rh.CheckpointStore(rh.Storage(url)).claim(token="launch-b")  # another run took the directory over
    with pytest.raises(rh.DirectoryTakenOver, match="restarted chief finds the directory claimed by another run"):
        rh.CheckpointStore(rh.Storage(url)).claim(token="launch-a", restarted=True)
