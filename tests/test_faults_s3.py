"""Faults of s3:// caused for real against moto's S3 server: the server stopped and started
again, connections cut mid-upload (tests/tcp_proxy.py), a bucket that does not exist or
is deleted mid-run, a bucket policy that starts denying writes mid-upload.

moto keeps its data in memory: a restarted server is empty, so a test that restarts it
makes its bucket again and expects what was written before the restart to be gone.
"""

import json
import os
import threading
import uuid

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest

import rayhooks as rh
from s3_server import S3Server
from tcp_proxy import HoldingProxy

pytest.importorskip("s3fs")

# botocore retries a refused connection 4 times itself (about 9 s); one try each keeps these
# tests short and leaves the retrying to rayhooks, which is what they check.
ONE_TRY = {"config_kwargs": {"retries": {"max_attempts": 1}}}


@pytest.fixture
def s3():
    server = S3Server().start()
    server.make_bucket("faults")
    yield server
    rh.SummaryWriterCache.clear()
    server.stop()


def _buckets(server):
    return [b["Name"] for b in server.client().list_buckets()["Buckets"]]


@pytest.mark.parametrize("region", [None, "us-east-1", "eu-west-1"])
def test_a_misspelt_bucket_fails_at_begin_and_is_not_created(s3, region):
    bucket = "no-such-bucket-%s" % uuid.uuid4().hex[:8]
    url = "s3://%s/run" % bucket
    options = dict(s3.options, client_kwargs={"region_name": region} if region else {})
    with pytest.raises(FileNotFoundError) as error:
        rh.MonitoredTrainingSession(checkpoint_dir=url, save_checkpoint_steps=1, state={"w": np.zeros(1)},
                                    storage_options=options, log_step_count_steps=None)
    assert url in str(error.value) and "bucket exists" in str(error.value)
    assert bucket not in _buckets(s3)


def test_a_write_while_the_server_is_down_is_retried_until_it_is_back(s3):
    backoffs = []

    def server_back(delay):  # rayhooks' backoff between attempts: the server comes back meanwhile
        backoffs.append(delay)
        s3.start()
        s3.make_bucket("faults")

    st = rh.Storage("s3://faults/down-%s" % uuid.uuid4().hex[:8], dict(s3.options, **ONE_TRY),
                    retry=rh.RetryPolicy(max_attempts=3), sleep=server_back)
    st.write_bytes("before", b"1")
    s3.stop()  # connection refused, as when S3's endpoint is unreachable
    st.write_bytes("after", b"2")
    assert len(backoffs) == 1
    assert st.read_bytes("after") == b"2"


def test_retry_next_save_trains_on_when_storage_fails_after_a_commit(s3):
    """The async hook dispatches step 2's after_save (and writes its marker) at the next
    step: storage that fails in between must not end a run that asked to go on."""
    url = "s3://faults/marker-%s" % uuid.uuid4().hex[:8]
    options = dict(s3.options, **ONE_TRY)
    state = {"w": np.zeros(1 << 16, np.float32)}
    hook = rh.AsyncCheckpointSaverHook(url, save_steps=2, storage_options=options, in_flight="wait",
                                       retry=rh.RetryPolicy(max_attempts=1), on_write_error="retry_next_save")
    sess = rh.MonitoredTrainingSession(chief_only_hooks=[hook], state=state, save_checkpoint_secs=None,
                                       save_summaries_steps=None, log_step_count_steps=None)

    def step():
        state["w"] += 1
        return {}

    sess.run(step)
    sess.run(step)
    assert hook._writer.wait_idle(60)  # step 2 committed; its after_save is due at the next step
    s3.stop()
    sess.run(step)  # step 3: step 2's after_save cannot write its marker
    sess.run(step)  # step 4: its save fails in the background
    assert hook._writer.wait_idle(60)
    s3.start()
    s3.make_bucket("faults")  # moto comes back empty
    sess.run(step)
    sess.run(step)  # step 6: reports step 4's failure, counts it, and commits
    assert hook._writer.wait_idle(60)
    assert hook.failed_saves == 1
    store = rh.CheckpointStore(rh.Storage(url, options))
    assert [i.step for i in store.committed()] == [6]
    assert store.verify(store.latest()) == []
    sess.close()


def test_a_multipart_write_refused_at_its_last_part_aborts_its_upload(s3):
    """The last part of a streamed upload goes up in close(): a failure there must abort
    the upload as a failure in a write does (AWS bills an open upload's parts)."""
    proxy = HoldingProxy(s3.port)
    try:
        st = rh.Storage("s3://faults/deny-%s" % uuid.uuid4().hex[:8], dict(s3.options, endpoint_url=proxy.endpoint),
                        retry=rh.RetryPolicy(max_attempts=1))
        st.write_bytes("warm", b"x")
        deny = {"Version": "2012-10-17", "Statement": [{"Effect": "Deny", "Principal": "*", "Action": "s3:PutObject",
                                                        "Resource": "arn:aws:s3:::faults/*"}]}
        proxy.hold_after(34 << 20)  # within the second part, which close() uploads

        def deny_writes_then_release():
            if proxy.held.wait(60):
                s3.client().put_bucket_policy(Bucket="faults", Policy=json.dumps(deny))
            proxy.release()

        threading.Thread(target=deny_writes_then_release, daemon=True).start()

        def producer(f):
            f.write(b"\x01" * (33 << 20))  # part 1 goes up here
            f.write(b"\x02" * (8 << 20))   # part 2 at close

        with pytest.raises(PermissionError, match="deny-"):
            st.write_with("model.ckpt-1.data-00000-of-00001", producer, fresh=True)
        assert proxy.held.is_set()
        assert st.listdir() == ["warm"]
        assert s3.pending_uploads("faults") == []
    finally:
        proxy.close()


def test_an_upload_whose_abort_could_not_reach_s3_is_aborted_by_a_later_commit(s3):
    """A connection lost mid-upload also loses the abort: the next commit aborts what it left open."""
    proxy = HoldingProxy(s3.port)
    try:
        url = "s3://faults/orphan-%s" % uuid.uuid4().hex[:8]
        store = rh.CheckpointStore(rh.Storage(url, dict(s3.options, endpoint_url=proxy.endpoint, **ONE_TRY),
                                              retry=rh.RetryPolicy(max_attempts=1)))
        store.commit(1, store.write_data(1, {"w": np.ones(4, np.float32)}))
        proxy.hold_after(8 << 20)

        def cut_when_held():
            if proxy.held.wait(60):
                proxy.cut(refuse=True)  # the network path is gone: parts, retries and abort all fail

        threading.Thread(target=cut_when_held, daemon=True).start()
        with pytest.raises(OSError, match="model.ckpt-2"):
            store.write_data(2, {"w%d" % i: np.full(3 << 20, 2, np.float32) for i in range(4)})  # 48 MB
        assert proxy.held.is_set()
        proxy.accept_again()
        assert [u["Key"].rsplit("/", 1)[-1] for u in s3.pending_uploads("faults")] == \
            ["model.ckpt-2.data-00000-of-00001"]
        store.commit(3, store.write_data(3, {"w": np.full(4, 3, np.float32)}))
        assert s3.pending_uploads("faults") == []
        assert [i.step for i in store.committed()] == [1, 3]
    finally:
        proxy.close()


def _open_upload(server, key, nbytes=5 << 20):
    """Begins a multipart upload of `key` and sends one part, as a save cut off mid-upload."""
    client = server.client()
    upload = client.create_multipart_upload(Bucket="faults", Key=key)
    client.upload_part(Bucket="faults", Key=key, UploadId=upload["UploadId"], PartNumber=1, Body=b"\0" * nbytes)
    return upload["UploadId"]


def test_gc_aborts_a_stale_unfinished_upload_and_keeps_one_possibly_in_flight(s3, capsys):
    """An upload whose own abort never reached S3 and that no later commit aborted (here the
    commit's abort is switched off: the cut that causes it for real is the test above) is
    stale once a later step has committed. An upload of a newer step may still be going.
    (gc also keeps a lower step's upload begun since the newest commit, by S3's `Initiated`;
    moto reports every upload as begun in 2010, so that rule is tested on files, in test_cli.)"""
    from rayhooks import cli
    url = "s3://faults/gc-%s" % uuid.uuid4().hex[:8]
    store = rh.CheckpointStore(rh.Storage(url, s3.options))
    store.commit(1, store.write_data(1, {"w": np.ones(4, np.float32)}))
    prefix = url[len("s3://faults/"):]
    _open_upload(s3, prefix + "/model.ckpt-2.data-00000-of-00001")
    store.storage.abort_uploads = lambda doomed: []
    store.commit(3, store.write_data(3, {"w": np.full(4, 3, np.float32)}))
    _open_upload(s3, prefix + "/model.ckpt-9.data-00000-of-00001")  # newer than the latest commit
    options = ["--storage-option", "key=%s" % s3.options["key"], "--storage-option",
               "secret=%s" % s3.options["secret"], "--storage-option", "endpoint_url=%s" % s3.endpoint]

    assert cli.main(["gc", url] + options) == 0
    out = capsys.readouterr().out.splitlines()
    assert "would abort   %s/model.ckpt-2.data-00000-of-00001  (an unfinished upload)" % url in out
    assert "keep          %s/model.ckpt-9.data-00000-of-00001  (an unfinished upload, possibly in flight)" % url in out
    assert len(s3.pending_uploads("faults")) == 2  # a dry run

    assert cli.main(["gc", url, "--yes", "-q"] + options) == 0
    assert [u["Key"].rsplit("/", 1)[-1] for u in s3.pending_uploads("faults")] == \
        ["model.ckpt-9.data-00000-of-00001"]
    assert [i.step for i in store.committed()] == [1, 3]


class _DenyingProxy:
    """Forwards every request to moto unchanged, except ListMultipartUploads (GET ?uploads),
    answered with the 403 AccessDenied AWS gives a principal whose policy grants only
    Get/Put/DeleteObject and ListBucket (s3:ListBucketMultipartUploads is separate)."""

    DENIED = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code>'
              b'<Message>Access Denied</Message></Error>')

    def __init__(self, upstream_port):
        import http.client
        import http.server
        import urllib.parse
        denied = self.DENIED

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query, keep_blank_values=True)
                if self.command == "GET" and "uploads" in query:
                    status, headers, data = 403, [("Content-Type", "application/xml")], denied
                else:
                    conn = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=60)
                    conn.request(self.command, self.path, body=body, headers=dict(self.headers.items()))
                    response = conn.getresponse()
                    status, data = response.status, response.read()
                    headers = [(k, v) for k, v in response.getheaders()
                               if k.lower() not in ("transfer-encoding", "content-length", "connection")]
                    conn.close()
                self.send_response(status)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = forward

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = "http://127.0.0.1:%d" % self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_a_principal_that_may_not_list_uploads_commits_quietly_and_can_gc(s3, caplog, capsys):
    from rayhooks import cli
    proxy = _DenyingProxy(s3.port)
    try:
        url = "s3://faults/nolist-%s" % uuid.uuid4().hex[:8]
        options = dict(s3.options, endpoint_url=proxy.endpoint)
        store = rh.CheckpointStore(rh.Storage(url, options))
        store.commit(1, store.write_data(1, {"w": np.ones(4, np.float32)}))
        store.storage.write_bytes("model.ckpt-1.data-00000-of-00002", b"partial")  # another save's, cut short
        store.storage.write_bytes("model.ckpt-0.data-00000-of-00001", b"partial")
        with caplog.at_level("WARNING", logger="rayhooks"):
            store.commit(2, store.write_data(2, {"w": np.ones(4, np.float32)}))
        assert [r.getMessage() for r in caplog.records if r.levelname in ("WARNING", "ERROR")] == []
        assert "model.ckpt-0.data-00000-of-00001" not in store.storage.listdir()
        capsys.readouterr()
        code = cli.main(["gc", url, "--storage-option", "key=%s" % options["key"], "--storage-option",
                         "secret=%s" % options["secret"], "--storage-option", "endpoint_url=%s" % proxy.endpoint])
        out, err = capsys.readouterr()
        assert code == 0, err
        assert "nothing to delete in %s" % url in out
    finally:
        proxy.close()


def test_ls_and_restore_name_the_checkpoint_rayhooks_resumes_from_after_a_refused_state_file(s3, tmp_path, capsys):
    """The state file write of step 30's commit is refused (a bucket policy): step 30 is
    committed, and rayhooks resumes from it; the state file still names step 20."""
    from rayhooks import cli
    url = "s3://faults/state-%s" % uuid.uuid4().hex[:8]
    store = rh.CheckpointStore(rh.Storage(url, s3.options))
    for step in (10, 20):
        store.commit(step, store.write_data(step, {"w": np.full(4, step, np.float32)}))
    deny = {"Version": "2012-10-17", "Statement": [{"Effect": "Deny", "Principal": "*", "Action": "s3:PutObject",
                                                    "Resource": "arn:aws:s3:::%s/checkpoint" % url[5:]}]}
    s3.client().put_bucket_policy(Bucket="faults", Policy=json.dumps(deny))
    try:
        store.commit(30, store.write_data(30, {"w": np.full(4, 30, np.float32)}))
    finally:
        s3.client().delete_bucket_policy(Bucket="faults")
    assert b"model.ckpt-20" in store.storage.read_bytes("checkpoint")  # the refusal happened

    class Saver:
        def restore(self, reader):
            self.step = reader.step

    assert store.restore_latest(Saver()).step == 30
    options = ["--storage-option", "key=%s" % s3.options["key"], "--storage-option",
               "secret=%s" % s3.options["secret"], "--storage-option", "endpoint_url=%s" % s3.endpoint]
    capsys.readouterr()
    assert cli.main(["ls", url] + options) == 0
    assert "latest step 30 " in capsys.readouterr().out
    assert cli.main(["restore", url, "--to", str(tmp_path / "out"), "-q"] + options) == 0
    assert capsys.readouterr().out.startswith("restored step 30 ")
