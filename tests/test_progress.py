"""Progress bars for long waits: uploads left at the end of a run, and restore reads and downloads."""

import io
import os
import threading
import uuid

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest

import rayhooks as rh
from rayhooks import progress
from rayhooks.writer import BackgroundWriter

MB = 1 << 20


class Screen(io.StringIO):
    """Where a bar is drawn; `drawn` is set at the first character, so a test can wait for the bar."""

    def __init__(self):
        super().__init__()
        self.drawn = threading.Event()

    def write(self, text):
        n = super().write(text)
        if text:
            self.drawn.set()
        return n


def _upload_in_flight(writer, go):
    """One 8 MB save whose first 3 MB are written and whose rest waits for `go`."""
    def job():
        writer.advance(3 * MB)
        assert go.wait(60)
        writer.advance(5 * MB)
    assert writer.admit(8 * MB, wait=True)
    writer.submit(7, 8 * MB, job)


def test_waiting_for_uploads_shows_the_bytes_left(monkeypatch):
    monkeypatch.setenv("RAYHOOKS_PROGRESS", "1")  # draw on a non-terminal too
    writer, go, screen = BackgroundWriter("checkpoint"), threading.Event(), Screen()
    _upload_in_flight(writer, go)
    waiting = threading.Thread(target=writer.wait_idle_with_progress,
                               args=("uploading checkpoints to gs://b/run",), kwargs={"file": screen})
    waiting.start()
    assert screen.drawn.wait(30), "no bar while an upload was still going"
    go.set()
    waiting.join(30)
    assert not waiting.is_alive() and not writer.busy()
    text = screen.getvalue()
    assert "uploading checkpoints to gs://b/run" in text
    assert "5.00M/5.00M" in text  # 3 of the 8 MB were out before the wait began: 5 were left


def test_progress_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("RAYHOOKS_PROGRESS", "0")
    writer, go, screen = BackgroundWriter("checkpoint"), threading.Event(), Screen()
    _upload_in_flight(writer, go)
    threading.Timer(1.5, go.set).start()  # the job's end, not a synchronisation: the wait below is it
    writer.wait_idle_with_progress("uploading checkpoints", file=screen)
    assert not writer.busy() and screen.getvalue() == ""


def test_a_short_wait_draws_nothing(monkeypatch):
    monkeypatch.setenv("RAYHOOKS_PROGRESS", "1")
    writer, screen = BackgroundWriter("checkpoint"), Screen()
    assert writer.admit(MB, wait=True)
    writer.submit(1, MB, lambda: writer.advance(MB)).result(30)
    writer.wait_idle_with_progress("uploading checkpoints", file=screen)
    assert screen.getvalue() == ""


@pytest.mark.parametrize("kind", ["numpy", "tf"])
def test_restoring_from_gcs_counts_every_byte_read(gcs, monkeypatch, kind):
    monkeypatch.setenv("RAYHOOKS_PROGRESS", "1")
    monkeypatch.setattr(progress, "DELAY_SECS", 0)  # draw at once: the restore is quick at this size
    url = "gs://rayhooks-test/progress-run-%s" % uuid.uuid4().hex[:8]
    values = np.arange(MB, dtype=np.float32)
    if kind == "numpy":
        saver, restored = rh.NumpySaver({"w": values.copy()}), {"w": np.zeros(MB, np.float32)}
        target, read_back = rh.NumpySaver(restored), lambda: restored["w"]
    else:  # TF reads a local copy: the bytes are downloaded rather than read in place
        import tensorflow as tf
        saver = rh.TrackableSaver(tf.train.Checkpoint(w=tf.Variable(values)))
        variable = tf.Variable(np.zeros(MB, np.float32))
        target, read_back = rh.TrackableSaver(tf.train.Checkpoint(w=variable)), variable.numpy
    store = rh.CheckpointStore(rh.Storage(url, storage_options=gcs.options))
    snapshot = saver.snapshot()
    store.commit(4, store.write_data(4, snapshot.tensors))
    snapshot.done()
    screen = Screen()
    assert store.restore_latest(target, progress_file=screen).step == 4
    np.testing.assert_array_equal(read_back(), values)
    text = screen.getvalue()
    assert ("restoring step %d from %s" % (4, url)) in text
    # Every byte is fetched once, checked on the way, and counted: the restore reads the checked local copy.
    last = text.replace("\r", "\n").strip().splitlines()[-1]
    from tqdm import tqdm
    total = tqdm.format_sizeof(store.latest().nbytes, divisor=1024)  # as the bar shows it: "4.00M"
    assert "100%" in last and "%s/%s" % (total, total) in last, text
