"""Tier 4: `rh.launch` on Ray, saving to object stores: gs:// and s3://.

The buckets are real servers on loopback (gcp-storage-emulator, moto; see
conftest.py). Each worker is a Ray actor in its own process, and with
`all_workers_write` every worker uploads its own shard through gcsfs or s3fs
while the chief commits; a second launch then resumes from the bucket. After
step s, worker i holds w == s + 1000 * i, so each shard proves whose it is.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import sys
import uuid

import numpy as np
import pytest
from tensorboard.compat.proto import event_pb2

import rayhooks as rh
from rayhooks.formats import events


@pytest.fixture
def bucket(request, ray_session):
    # Ray workers cannot import this test module (tests/ is not on their path): ship it by value.
    import ray.cloudpickle
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    return request.getfixturevalue(request.param)


def train(ctx):
    state = {"w": np.full(2, 1000.0 * ctx.worker_index, np.float32)}

    def step():
        state["w"] += 1
        return {"loss": float(state["w"][0])}

    with ctx.session(state=state) as sess:
        start, w_start = sess.global_step, state["w"].tolist()
        while not sess.should_stop():
            sess.run(step)
    return {"start": start, "w_start": w_start, "step": sess.global_step}


def _launch(url, options, last_step):
    return rh.launch(
        train, 2, backend="ray", all_workers_write=True,
        chief_only_hooks=[rh.AsyncCheckpointSaverHook(url, save_steps=4, in_flight="wait", storage_options=options),
                          rh.SummarySaverHook(save_steps=3, output_dir=url + "/logs", summary_op=["loss"],
                                              storage_options=options)],
        hooks=[rh.StopAtStepHook(last_step=last_step)])


@pytest.mark.parametrize("bucket", ["gcs", "s3"], indirect=True)
def test_ray_workers_save_shards_to_a_bucket_and_a_second_launch_resumes_from_it(bucket):
    scheme = "s3" if "key" in bucket.options else "gs"
    url = "%s://rayhooks-test/launch-%s" % (scheme, uuid.uuid4().hex[:8])
    options = bucket.options

    first = _launch(url, options, last_step=6)
    assert first.checkpoints == [0, 4, 6]
    store = rh.CheckpointStore(rh.Storage(url, options))
    for info in store.committed():
        assert set(info.files) == {info.prefix + ".data-00000-of-00001", info.prefix + ".index",
                                   info.prefix + ".worker1.data-00000-of-00001", info.prefix + ".worker1.index"}
        assert store.verify(info) == []
    shard = {"w": np.zeros(2, np.float32)}
    rh.NumpySaver(shard).restore(store.reader(store.latest(), worker=1))
    np.testing.assert_array_equal(shard["w"], [1006, 1006])

    second = _launch(url, options, last_step=10)
    assert sorted((r["start"], r["w_start"]) for r in second.worker_results) == [(6, [6, 6]), (6, [1006, 1006])]
    assert [r["step"] for r in second.worker_results] == [10, 10]
    assert second.checkpoints == [10]  # the rule resumes a period after the restored step, as in test_launch
    assert [i.step for i in store.committed()] == [0, 4, 6, 10]

    logs = rh.Storage(url + "/logs", options)
    loss_steps = set()
    for name in logs.listdir():
        if "tfevents" in name:
            with logs.open_read(name) as f:
                for record in events.read_records(f):
                    event = event_pb2.Event.FromString(record)
                    loss_steps |= {event.step for v in event.summary.value if v.tag == "loss"}
    assert loss_steps == {1, 4, 7, 10}


@pytest.mark.parametrize("bucket", ["s3"], indirect=True)
@pytest.mark.parametrize("hook_class", [rh.CheckpointSaverHook, rh.AsyncCheckpointSaverHook])
def test_retry_next_save_trains_past_a_commit_the_bucket_refuses(bucket, hook_class):
    """The chief writes each manifest. A bucket policy that refuses step 4's makes that
    commit fail for real, after every shard was written: as with a shard that cannot be
    written, the run goes on, counts it, and the next save commits."""
    import json
    url = "s3://rayhooks-test/refused-%s" % uuid.uuid4().hex[:8]
    deny = {"Version": "2012-10-17", "Statement": [{
        "Effect": "Deny", "Principal": "*", "Action": "s3:PutObject",
        "Resource": "arn:aws:s3:::%s/model.ckpt-4.manifest.json" % url[len("s3://"):]}]}
    bucket.client().put_bucket_policy(Bucket="rayhooks-test", Policy=json.dumps(deny))
    try:
        extra = {"in_flight": "wait"} if hook_class is rh.AsyncCheckpointSaverHook else {}
        result = rh.launch(train, 2, backend="ray", chief_only_hooks=[hook_class(
            url, save_steps=2, storage_options=bucket.options, on_write_error="retry_next_save",
            retry=rh.RetryPolicy(max_attempts=1), **extra)], hooks=[rh.StopAtStepHook(last_step=8)])
    finally:
        bucket.client().delete_bucket_policy(Bucket="rayhooks-test")
    assert result.failed_saves == 1
    assert result.checkpoints == [0, 2, 6, 8]
    store = rh.CheckpointStore(rh.Storage(url, bucket.options))
    assert [i.step for i in store.committed()] == [0, 2, 6, 8]
    assert store.verify(store.latest()) == []
