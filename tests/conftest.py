"""Generic fixtures shared by the test tiers."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# gcsfs reads this once, when it is first imported, and whichever test imports it first
# (a storage error classifier, say) must not turn on the gRPC probe that the GCS emulator
# does not answer: a gs:// test would then hang for minutes.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import uuid

import pytest


@pytest.fixture(params=["file", "file_url", "memory"])
def storage_url(request, tmp_path):
    """A fresh, empty directory URL for this test.

    "file" is a bare local path, "file_url" the same kind of directory spelled
    `file:///...`, "memory" a unique `memory://` URL (removed afterwards).
    """
    if request.param == "file":
        yield str(tmp_path / "run")
    elif request.param == "file_url":
        yield "file://" + str(tmp_path / "run")
    else:
        name = "test-%s" % uuid.uuid4().hex
        yield "memory://" + name
        import fsspec
        fs = fsspec.filesystem("memory")
        if fs.exists("/" + name):
            fs.rm("/" + name, recursive=True)


@pytest.fixture
def memory_url():
    """A fresh `memory://` URL, removed after the test."""
    name = "test-%s" % uuid.uuid4().hex
    yield "memory://" + name
    import fsspec
    fs = fsspec.filesystem("memory")
    if fs.exists("/" + name):
        fs.rm("/" + name, recursive=True)


@pytest.fixture(autouse=True)
def _close_cached_summary_writers():
    """Closes the writers `SummaryWriterCache` handed out during the test.

    A test that breaks a directory on purpose leaves a writer whose flush
    fails; that failure belongs to the test that caused it, not to teardown.
    """
    yield
    import sys
    module = sys.modules.get("rayhooks.summary_writer")
    if module is None:
        return
    try:
        module.SummaryWriterCache.clear()
    except Exception:  # the directory was broken on purpose by the test
        pass


@pytest.fixture(scope="session")
def gcs():
    """A GCS server (gcp-storage-emulator) for the session, with the bucket `rayhooks-test`."""
    from gcs_emulator import GcsEmulator
    emulator = GcsEmulator().start()
    emulator.make_bucket("rayhooks-test")
    yield emulator
    emulator.stop()


@pytest.fixture(scope="session")
def s3():
    """An S3 server (moto) for the session, with the bucket `rayhooks-test`."""
    pytest.importorskip("s3fs")
    from s3_server import S3Server
    server = S3Server().start()
    server.make_bucket("rayhooks-test")
    yield server
    server.stop()


RAY_TRAIN_POLL_ENV, RAY_TRAIN_POLL_SECS = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2"


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole test session (2 CPUs), shut down at the end.

    Tests that launch on Ray request this fixture; tests that do not never
    start Ray. An instance started elsewhere (e.g. RAY_ADDRESS) is reused and
    left running.
    """
    import ray  # a dependency of rayhooks: missing it is an error, not a skip
    started = False
    if not ray.is_initialized():
        # Ray Train's controller takes workers' reports every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S
        # (2 s by default); the benchmark smoke tests' anchors report often. Ray's processes
        # read it from the environment they start with, so it is set before ray.init.
        os.environ.setdefault(RAY_TRAIN_POLL_ENV, RAY_TRAIN_POLL_SECS)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        started = True
    yield ray
    if started:
        ray.shutdown()
