"""One conformance suite for every storage: file://, memory://, gs:// and s3://.

gs:// runs against `gcp-storage-emulator` and s3:// against moto's S3 server,
both started by this module, through gcsfs and s3fs: the same code paths as
Google Cloud Storage and Amazon S3.
"""

import os
import uuid

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest

import rayhooks as rh
from rayhooks.formats import events


@pytest.fixture(params=["file", "memory", "gs", "s3"])
def url_and_options(request, tmp_path):
    if request.param == "file":
        return "file://" + str(tmp_path / "run"), None
    if request.param == "memory":
        return "memory://conf-%s" % uuid.uuid4().hex, None
    if request.param == "gs":
        return "gs://rayhooks-test/conf-%s" % uuid.uuid4().hex, request.getfixturevalue("gcs").options
    return "s3://rayhooks-test/conf-%s" % uuid.uuid4().hex, request.getfixturevalue("s3").options


def _storage(url_and_options):
    url, options = url_and_options
    return rh.Storage(url, storage_options=options)


def test_write_read_list_delete(url_and_options):
    st = _storage(url_and_options)
    st.check_writable()
    st.write_bytes("a.bin", b"\x00\x01payload")
    st.write_bytes("b.bin", b"x" * (3 << 20))
    assert st.read_bytes("a.bin") == b"\x00\x01payload"
    assert st.size("b.bin") == 3 << 20
    assert [n for n in st.listdir() if n.endswith(".bin")] == ["a.bin", "b.bin"]
    st.delete(["a.bin"])
    assert not st.exists("a.bin")
    with pytest.raises(FileNotFoundError, match="a.bin"):
        st.read_bytes("a.bin")


def test_a_failed_write_leaves_nothing(url_and_options):
    st = _storage(url_and_options)
    st.makedirs()

    def producer(f):
        f.write(b"half of a file")
        raise ValueError("producer failed")

    with pytest.raises(ValueError, match="producer failed"):
        st.write_with("torn.bin", producer)
    assert "torn.bin" not in st.listdir()
    assert not [n for n in st.listdir() if ".tmp-" in n]


def test_commit_restore_and_partials(url_and_options):
    st = _storage(url_and_options)
    store = rh.CheckpointStore(st, retention=rh.RetentionPolicy(max_to_keep=2))
    for step in (1, 2, 3):
        store.commit(step, store.write_data(step, {"w": np.full(4, step, np.float32)}))
    store.write_data(9, {"w": np.full(4, 9, np.float32)})  # written, never committed: a partial
    assert [i.step for i in store.committed()] == [2, 3]
    assert store.latest().step == 3
    assert any(n.startswith("model.ckpt-9.") for n in store.partials())
    state = {"w": np.zeros(4, np.float32)}
    assert store.restore_latest(rh.NumpySaver(state)).step == 3
    np.testing.assert_array_equal(state["w"], np.full(4, 3, np.float32))
    assert store.verify(store.latest()) == []


def test_restore_falls_back_past_a_damaged_checkpoint(url_and_options, caplog):
    st = _storage(url_and_options)
    store = rh.CheckpointStore(st)
    for step in (1, 2):
        store.commit(step, store.write_data(step, {"w": np.full(4, step, np.float32)}))
    data = "model.ckpt-2.data-00000-of-00001"
    damaged = bytearray(st.read_bytes(data))
    damaged[0] ^= 0xFF
    st.write_bytes(data, bytes(damaged))
    state = {"w": np.zeros(4, np.float32)}
    assert store.restore_latest(rh.NumpySaver(state)).step == 1
    np.testing.assert_array_equal(state["w"], np.full(4, 1, np.float32))
    assert data in caplog.text


def test_session_end_to_end_and_resume(url_and_options):
    url, options = url_and_options
    state = {"w": np.zeros(3, np.float32)}

    def step():
        state["w"] += 1
        return {"loss": float(state["w"][0])}

    def run(last_step):
        with rh.MonitoredTrainingSession(
                checkpoint_dir=url, save_checkpoint_steps=3, save_summaries_steps=2, log_step_count_steps=None,
                scaffold=rh.Scaffold(summary_op=["loss"]), hooks=[rh.StopAtStepHook(last_step=last_step)],
                state=state, storage_options=options) as sess:
            while not sess.should_stop():
                sess.run(step)
        return sess

    assert run(7).global_step == 7
    store = rh.CheckpointStore(rh.Storage(url, options))
    assert [i.step for i in store.committed()] == [0, 3, 6, 7]
    state["w"][:] = -1  # the next session must restore step 7's values
    assert run(10).global_step == 10
    np.testing.assert_array_equal(state["w"], np.full(3, 10, np.float32))
    assert store.latest().step == 10

    st = rh.Storage(url, options)
    names = [n for n in st.listdir() if n.startswith("events.out.tfevents")]
    assert names
    loss_steps = set()
    for name in names:
        with st.open_read(name) as f:
            for record in events.read_records(f):
                from tensorboard.compat.proto import event_pb2
                event = event_pb2.Event.FromString(record)
                if any(v.tag == "loss" for v in event.summary.value):
                    loss_steps.add(event.step)
    assert {1, 3, 5, 7, 8, 10} <= loss_steps


def test_missing_bucket_fails_at_begin_with_the_url(gcs):
    url = "gs://no-such-bucket-%s/run" % uuid.uuid4().hex[:8]
    with pytest.raises(OSError, match="no-such-bucket"):
        rh.MonitoredTrainingSession(checkpoint_dir=url, save_checkpoint_steps=1, state={"w": np.zeros(1)},
                                    storage_options=gcs.options)


def test_unknown_protocol_names_the_url():
    with pytest.raises(ValueError, match="nope://bucket/run"):
        rh.MonitoredTrainingSession(checkpoint_dir="nope://bucket/run", save_checkpoint_steps=1,
                                    state={"w": np.zeros(1)})


@pytest.fixture
def no_google_credentials(monkeypatch, tmp_path):
    """A process with no Application Default Credentials, as on a laptop that never ran gcloud."""
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "gcloud-config"))  # no gcloud login here
    monkeypatch.setenv("NO_GCE_CHECK", "True")  # not on a GCE VM: do not probe its metadata server


def _committed_run(gcs, url):
    state = {"w": np.zeros(2, np.float32)}
    with rh.MonitoredTrainingSession(checkpoint_dir=url, save_checkpoint_steps=2, state=state,
                                     save_summaries_steps=None, log_step_count_steps=None,
                                     hooks=[rh.StopAtStepHook(last_step=4)],
                                     storage_options=gcs.options) as sess:
        while not sess.should_stop():
            sess.run(lambda: state.__setitem__("w", state["w"] + 1))
    store = rh.CheckpointStore(rh.Storage(url, storage_options=gcs.options))
    return store, [(i.step, i.url) for i in store.committed()]


def test_missing_credentials_is_one_clear_error_and_leaves_the_run_alone(gcs, no_google_credentials):
    url = "gs://rayhooks-test/creds-%s" % uuid.uuid4().hex[:8]
    store, before = _committed_run(gcs, url)
    assert [step for step, _ in before] == [0, 2, 4]
    options = dict(gcs.options, token="google_default")  # real google-auth, finding no credentials
    with pytest.raises(PermissionError) as error:
        rh.MonitoredTrainingSession(checkpoint_dir=url, save_checkpoint_steps=2, state={"w": np.zeros(2)},
                                    storage_options=options)
    message = str(error.value)
    assert url in message and "no usable credentials" in message
    assert "GOOGLE_APPLICATION_CREDENTIALS" in message and "Nothing was written" in message
    assert "AWS_" not in message  # the fix for this store, not every store's
    assert [(i.step, i.url) for i in store.committed()] == before
    assert all(store.verify(i) == [] for i in store.committed())


def test_a_missing_key_file_is_named(gcs, tmp_path):
    url = "gs://rayhooks-test/keyfile-%s" % uuid.uuid4().hex[:8]
    key = str(tmp_path / "no-such-key.json")
    with pytest.raises(FileNotFoundError) as error:
        rh.MonitoredTrainingSession(checkpoint_dir=url, save_checkpoint_steps=2, state={"w": np.zeros(2)},
                                    storage_options=dict(gcs.options, token=key))
    assert url in str(error.value) and key in str(error.value)


def test_missing_s3_credentials_name_the_aws_fix(monkeypatch, tmp_path):
    pytest.importorskip("s3fs")
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # not on EC2: do not probe its metadata
    url = "s3://rayhooks-test-%s/run" % uuid.uuid4().hex[:8]
    with pytest.raises(PermissionError) as error:
        rh.MonitoredTrainingSession(checkpoint_dir=url, save_checkpoint_steps=2, state={"w": np.zeros(2)},
                                    storage_options={"endpoint_url": "http://127.0.0.1:9"})
    message = str(error.value)
    assert url in message and "no usable credentials" in message and "AWS_ACCESS_KEY_ID" in message


def test_s3_a_failed_multipart_write_leaves_no_object_and_no_open_upload(s3):
    """A checkpoint's data is streamed to S3 as a multipart upload; a write that fails after
    some parts went up must abort the upload: an open one publishes nothing, yet AWS keeps
    (and bills) its parts until it is aborted."""
    st = rh.Storage("s3://rayhooks-test/torn-%s" % uuid.uuid4().hex[:8], storage_options=s3.options)
    st.makedirs()
    before = len(s3.pending_uploads("rayhooks-test"))

    def producer(f):
        f.write(b"\x01" * (40 << 20))  # past the first 32 MB part: the multipart upload has begun
        raise ValueError("producer failed after a part")

    with pytest.raises(ValueError, match="producer failed after a part"):
        st.write_with("model.ckpt-1.data-00000-of-00001", producer, fresh=True)
    assert st.listdir() == []
    assert len(s3.pending_uploads("rayhooks-test")) == before


def test_s3_a_multipart_checkpoint_round_trips_with_its_checksums(s3):
    url = "s3://rayhooks-test/big-%s" % uuid.uuid4().hex[:8]
    store = rh.CheckpointStore(rh.Storage(url, storage_options=s3.options))
    rng = np.random.default_rng(3)
    state = {"w%d" % i: rng.standard_normal(3 << 20).astype(np.float32) for i in range(6)}  # 72 MB: 3 parts
    info = store.commit(5, store.write_data(5, state))
    assert store.verify(info) == []
    data = [n for n in info.files if ".data-" in n][0]
    assert info.files[data]["bytes"] == sum(a.nbytes for a in state.values())
    restored = {k: np.zeros_like(v) for k, v in state.items()}
    assert store.restore_latest(rh.NumpySaver(restored)).step == 5
    for k in state:
        np.testing.assert_array_equal(restored[k], state[k])
