"""Tier 1: the background writer's admission, budget and error contract (DESIGN I5, I6)."""

import threading

import pytest

from rayhooks.writer import BackgroundWriter

TIMEOUT = 30  # seconds; a bound against hangs, never a timing assertion


def test_constructor_validates_limits():
    with pytest.raises(ValueError, match="max_in_flight must be >= 1"):
        BackgroundWriter("save", max_in_flight=0)
    with pytest.raises(ValueError, match="max_in_flight_bytes must be > 0"):
        BackgroundWriter("save", max_in_flight_bytes=0)


def test_constructor_starts_no_thread():
    before = {t.name for t in threading.enumerate()}
    writer = BackgroundWriter("save")
    assert not writer.busy()
    assert {t.name for t in threading.enumerate()} == before
    writer.close()  # nothing to wait for, nothing to raise


def test_one_snapshot_always_fits_even_over_budget():
    writer = BackgroundWriter("save", max_in_flight=2, max_in_flight_bytes=10)
    assert writer.admit(1000, wait=False)
    assert writer.peak_in_flight_bytes == 1000
    assert not writer.admit(1, wait=False)  # now over budget
    writer.release(1000)
    assert not writer.busy()


def test_admit_skips_when_full():
    writer = BackgroundWriter("save", max_in_flight=1)
    assert writer.admit(8, wait=False)
    assert not writer.admit(8, wait=False)
    assert not writer.admit(8, wait=True, timeout=0)  # wait with no time left: still no room
    writer.release(8)
    assert writer.admit(8, wait=False)
    writer.release(8)


def test_byte_budget_counts_every_snapshot_in_flight():
    writer = BackgroundWriter("save", max_in_flight=3, max_in_flight_bytes=100)
    assert writer.admit(60, wait=False)
    assert not writer.admit(50, wait=False)   # 110 > 100
    assert writer.admit(40, wait=False)       # exactly 100
    assert not writer.admit(1, wait=False)    # bytes, not the count, are the limit now
    assert writer.peak_in_flight_bytes == 100
    writer.release(60)
    assert writer.admit(50, wait=False)
    assert writer.peak_in_flight_bytes == 100


def test_wait_admits_only_after_the_running_job_finished():
    writer = BackgroundWriter("save", max_in_flight=1)
    gate, order = threading.Event(), []

    def job():
        assert gate.wait(TIMEOUT)
        order.append("job done")
        return "info"

    assert writer.admit(5, wait=False)
    future = writer.submit(1, 5, job)
    admitted = []

    def second_save():
        admitted.append(writer.admit(5, wait=True, timeout=TIMEOUT))
        order.append("admitted")

    thread = threading.Thread(target=second_save)
    thread.start()
    gate.set()
    thread.join(TIMEOUT)
    assert admitted == [True]
    assert order == ["job done", "admitted"]
    assert future.result(TIMEOUT) == "info"
    writer.release(5)
    writer.close()


def test_completed_holds_results_in_step_order():
    writer = BackgroundWriter("save", max_in_flight=4)
    futures = []
    for step in (10, 20, 30):
        assert writer.admit(1, wait=True, timeout=TIMEOUT)
        futures.append(writer.submit(step, 1, lambda step=step: "ckpt-%d" % step))
    writer.close()
    assert [f.result() for f in futures] == ["ckpt-10", "ckpt-20", "ckpt-30"]
    assert list(writer.completed) == [(10, "ckpt-10"), (20, "ckpt-20"), (30, "ckpt-30")]
    assert not writer.busy()


def test_wait_idle():
    writer = BackgroundWriter("save")
    gate = threading.Event()
    assert writer.admit(1, wait=False)
    writer.submit(3, 1, lambda: gate.wait(TIMEOUT))
    assert not writer.wait_idle(timeout=0)
    assert writer.busy()
    gate.set()
    assert writer.wait_idle(timeout=TIMEOUT)
    assert not writer.busy()
    writer.close()


def test_error_is_raised_once_with_the_step():
    writer = BackgroundWriter("asynchronous checkpoint save")

    def job():
        raise PermissionError("gs://bucket/run/model.ckpt-7.index: 403 Forbidden")

    assert writer.admit(4, wait=False)
    future = writer.submit(7, 4, job)
    with pytest.raises(PermissionError):
        future.result(TIMEOUT)
    assert not writer.busy()  # the failed job gave its room back
    with pytest.raises(PermissionError) as excinfo:
        writer.raise_if_failed()
    message = str(excinfo.value)
    assert "[step=7]" in message
    assert "asynchronous checkpoint save" in message
    assert "step 7 was not committed" in message
    assert "gs://bucket/run/model.ckpt-7.index" in message
    assert isinstance(excinfo.value.__cause__, PermissionError)
    writer.raise_if_failed()  # once only
    writer.close()            # and not again at close


def test_error_is_raised_at_close():
    writer = BackgroundWriter("save")
    assert writer.admit(1, wait=False)
    writer.submit(2, 1, lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError, match=r"\[step=2\] save failed.*division by zero"):
        writer.close()
    writer.close()  # the error was reported already


def test_only_the_first_error_is_kept():
    writer = BackgroundWriter("save", max_in_flight=2)

    def fail(step):
        raise ConnectionError("reset at step %d" % step)

    for step in (1, 2):
        assert writer.admit(1, wait=False)
        writer.submit(step, 1, lambda step=step: fail(step))
    assert writer.wait_idle(TIMEOUT)
    with pytest.raises(ConnectionError, match=r"\[step=1\].*reset at step 1"):
        writer.raise_if_failed()
    writer.close()
    assert list(writer.completed) == []
