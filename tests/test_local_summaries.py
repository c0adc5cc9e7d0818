"""Tier 2: `SummarySaverHook` and session logs, read back by TensorBoard's and TF's own readers.

TensorBoard cannot read memory://, so there the events file is read through
fsspec and parsed with `rayhooks.formats.events.read_records`; the local
variants are also read with `EventAccumulator` and `summary_iterator`.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.compat.proto import event_pb2
from tensorboard.util import tensor_util

import rayhooks as rh
from rayhooks.formats import events, summaries

SIZE_GUIDANCE = {"scalars": 0, "histograms": 0, "images": 0, "tensors": 0}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _local_dir(url):
    if url.startswith("memory://"):
        return None
    return url[len("file://"):] if url.startswith("file://") else url


def _read_events(url):
    """Every Event in the run's events files, read through fsspec (works for memory:// too)."""
    storage = rh.Storage(url)
    names = [n for n in storage.listdir() if "tfevents" in n]
    assert len(names) == 1, names
    with storage.open_read(names[0]) as f:
        return [event_pb2.Event.FromString(r) for r in events.read_records(f)]


def _values(evs, tag):
    return [(e.step, v) for e in evs if e.HasField("summary") for v in e.summary.value if v.tag == tag]


def _session_logs(evs):
    return [(e.step, event_pb2.SessionLog.SessionStatus.Name(e.session_log.status), e.session_log.checkpoint_path)
            for e in evs if e.HasField("session_log")]


def _accumulator(url):
    acc = EventAccumulator(_local_dir(url), size_guidance=SIZE_GUIDANCE)
    acc.Reload()
    return acc


def _run(url, summary_op, steps, outputs, save_steps=2):
    hook = rh.SummarySaverHook(save_steps=save_steps, output_dir=url, summary_op=summary_op)
    with rh.MonitoredSession(hooks=[hook]) as sess:
        for k in range(1, steps + 1):
            sess.run(lambda k=k: outputs(k))


def _tf1_serialized_summary():
    import tensorflow as tf
    graph = tf.Graph()
    with graph.as_default():
        loss = tf.compat.v1.summary.scalar("tf1/loss", tf.constant(0.25))
        hist = tf.compat.v1.summary.histogram("tf1/weights", tf.constant([1.0, 2.0, 2.0, 3.0]))
        merged = tf.compat.v1.summary.merge([loss, hist])
        with tf.compat.v1.Session(graph=graph) as sess:
            return sess.run(merged)


def test_named_outputs_become_scalars_histograms_and_text(storage_url):
    def outputs(k):
        return {"loss": float(k), "weights": np.arange(10, dtype=np.float32) * k, "note": "step %d" % k,
                "ignored": 123}

    _run(storage_url, ["loss", "weights", "note"], steps=6, outputs=outputs)
    evs = _read_events(storage_url)
    assert evs[0].file_version == "brain.Event:2"
    assert [(s, v.simple_value) for s, v in _values(evs, "loss")] == [(1, 1.0), (3, 3.0), (5, 5.0)]
    assert [(s, v.histo.max, v.histo.num) for s, v in _values(evs, "weights")] == \
        [(1, 9.0, 10.0), (3, 27.0, 10.0), (5, 45.0, 10.0)]
    assert [(s, v.tensor.string_val) for s, v in _values(evs, "note")] == \
        [(1, [b"step 1"]), (3, [b"step 3"]), (5, [b"step 5"])]
    assert _values(evs, "ignored") == []
    assert _session_logs(evs) == [(1, "START", "")]

    if _local_dir(storage_url) is not None:
        acc = _accumulator(storage_url)
        assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(1, 1.0), (3, 3.0), (5, 5.0)]
        histos = acc.Histograms("weights")
        assert [h.step for h in histos] == [1, 3, 5]
        assert histos[-1].histogram_value.max == 45.0
        assert histos[-1].histogram_value.sum == pytest.approx(45.0 * 5)
        text = acc.Tensors("note")
        assert [t.step for t in text] == [1, 3, 5]
        assert tensor_util.make_ndarray(text[1].tensor_proto).item() == b"step 3"
        assert acc.SummaryMetadata("note").plugin_data.plugin_name == "text"


def test_callables_and_images(storage_url):
    pixels = np.zeros((4, 6, 3), np.uint8)
    pixels[:, :3, 0] = 255

    def with_outputs(outputs):
        return summaries.to_summary([summaries.image("img", pixels),
                                     summaries.scalar("lr", outputs["lr"])])

    def no_argument():
        return {"constant": 7.0}

    _run(storage_url, [with_outputs, no_argument], steps=3, outputs=lambda k: {"lr": 0.5 / k})
    evs = _read_events(storage_url)
    assert [(s, v.simple_value) for s, v in _values(evs, "lr")] == [(1, 0.5), (3, pytest.approx(0.5 / 3))]
    assert [(s, v.simple_value) for s, v in _values(evs, "constant")] == [(1, 7.0), (3, 7.0)]
    images = _values(evs, "img")
    assert [s for s, _ in images] == [1, 3]
    assert (images[0][1].image.height, images[0][1].image.width) == (4, 6)
    assert images[0][1].image.encoded_image_string.startswith(PNG_SIGNATURE)

    if _local_dir(storage_url) is not None:
        acc = _accumulator(storage_url)
        imgs = acc.Images("img")
        assert [(i.step, i.height, i.width) for i in imgs] == [(1, 4, 6), (3, 4, 6)]
        import tensorflow as tf
        decoded = tf.io.decode_png(imgs[0].encoded_image_string).numpy()
        np.testing.assert_array_equal(decoded, pixels)


def test_tf1_serialized_summaries(storage_url):
    import tensorflow as tf
    serialized = _tf1_serialized_summary()
    assert isinstance(serialized, bytes)

    _run(storage_url, ["tf1_summary", serialized, tf.constant(serialized)], steps=1,
         outputs=lambda k: {"tf1_summary": serialized})
    evs = _read_events(storage_url)
    assert [(s, v.simple_value) for s, v in _values(evs, "tf1/loss")] == [(1, 0.25)] * 3
    histos = _values(evs, "tf1/weights")
    assert [(s, v.histo.min, v.histo.max, v.histo.num) for s, v in histos] == [(1, 1.0, 3.0, 4.0)] * 3

    if _local_dir(storage_url) is not None:
        acc = _accumulator(storage_url)
        assert [(e.step, e.value) for e in acc.Scalars("tf1/loss")] == [(1, 0.25)] * 3
        assert acc.Histograms("tf1/weights")[0].histogram_value.num == 4.0


def test_session_logs_and_scalars_of_a_training_session(storage_url):
    state = {"w": np.zeros(2, np.float32)}

    def step():
        state["w"] += 1
        return {"loss": float(state["w"][0])}

    with rh.MonitoredTrainingSession(checkpoint_dir=storage_url, state=state, save_checkpoint_steps=2,
                                     save_summaries_steps=1, scaffold=rh.Scaffold(summary_op=["loss"]),
                                     hooks=[rh.StopAtStepHook(last_step=5)]) as sess:
        while not sess.should_stop():
            sess.run(step)

    save_path = storage_url + "/model.ckpt"
    expected_logs = [(0, "CHECKPOINT", save_path), (1, "START", ""), (2, "CHECKPOINT", save_path),
                     (4, "CHECKPOINT", save_path), (5, "CHECKPOINT", save_path)]
    evs = _read_events(storage_url)
    assert _session_logs(evs) == expected_logs
    assert [(s, v.simple_value) for s, v in _values(evs, "loss")] == [(k, float(k)) for k in range(1, 6)]

    local = _local_dir(storage_url)
    if local is not None:
        import tensorflow as tf
        [name] = [n for n in os.listdir(local) if "tfevents" in n]
        read = list(tf.compat.v1.train.summary_iterator(os.path.join(local, name)))
        logs = [(e.step, tf.compat.v1.SessionLog.SessionStatus.Name(e.session_log.status),
                 e.session_log.checkpoint_path) for e in read if e.HasField("session_log")]
        assert logs == expected_logs
        losses = [(e.step, v.simple_value) for e in read for v in e.summary.value if v.tag == "loss"]
        assert losses == [(k, float(k)) for k in range(1, 6)]


def test_graph_of_a_tf_function_step_reaches_the_events_file(storage_url):
    import tensorflow as tf
    from tensorboard.compat.proto import graph_pb2
    v = tf.Variable(1.0)

    @tf.function
    def step():
        v.assign(v * 2.0)
        return {"v": v.read_value()}

    with rh.MonitoredTrainingSession(checkpoint_dir=storage_url, state={"v": v}, save_checkpoint_steps=100,
                                     hooks=[rh.StopAtStepHook(last_step=2)]) as sess:
        while not sess.should_stop():
            sess.run(step)
    graphs = [e.graph_def for e in _read_events(storage_url) if e.HasField("graph_def")]
    assert len(graphs) == 1
    assert "AssignVariableOp" in {n.op for n in graph_pb2.GraphDef.FromString(graphs[0]).node}
    if _local_dir(storage_url) is not None:
        assert "AssignVariableOp" in {n.op for n in _accumulator(storage_url).Graph().node}


def test_a_string_scalar_raises_naming_the_tag(storage_url):
    def bad():
        return summaries.to_summary([summaries.scalar("learning_rate", "high")])

    hook = rh.SummarySaverHook(save_steps=1, output_dir=storage_url, summary_op=bad)
    with pytest.raises(ValueError, match="'learning_rate'"):
        with rh.MonitoredSession(hooks=[hook]) as sess:
            sess.run(lambda: None)


def test_nan_in_a_histogram_raises_naming_the_tag(storage_url):
    hook = rh.SummarySaverHook(save_steps=1, output_dir=storage_url, summary_op=["weights"])
    with pytest.raises(ValueError, match="'weights'.*NaN"):
        with rh.MonitoredSession(hooks=[hook]) as sess:
            sess.run(lambda: {"weights": np.array([1.0, np.nan, 2.0])})


def test_summary_writer_flush_makes_everything_visible(storage_url):
    writer = rh.SummaryWriter(storage_url, flush_secs=0)
    writer.add_scalar("a", 1.0, 1)
    writer.flush()
    assert [(s, v.simple_value) for s, v in _values(_read_events(storage_url), "a")] == [(1, 1.0)]
    writer.add_summary({"a": 2.0, "b": np.arange(5.0)}, 2)
    writer.add_session_log("STOP", 2)
    writer.close()
    evs = _read_events(storage_url)  # still one file: an object store gets the whole file again
    assert [(s, v.simple_value) for s, v in _values(evs, "a")] == [(1, 1.0), (2, 2.0)]
    assert [s for s, _ in _values(evs, "b")] == [2]
    assert _session_logs(evs) == [(2, "STOP", "")]


def test_a_resumed_run_does_not_write_the_restored_checkpoints_health_again(tmp_path):
    """checkpoint/* scalars describe a save; the checkpoint a run resumes from was saved (and
    its health written) by the run before, so TensorBoard shows one point per save."""
    url = str(tmp_path / "run")
    state = {"w": np.zeros(2, np.float32)}

    def train(last_step):
        with rh.MonitoredTrainingSession(checkpoint_dir=url, save_checkpoint_steps=3, save_summaries_steps=None,
                                         log_step_count_steps=None, state=state,
                                         hooks=[rh.StopAtStepHook(last_step=last_step)]) as sess:
            while not sess.should_stop():
                sess.run(lambda: state.__setitem__("w", state["w"] + 1))

    train(6)
    train(9)
    names = sorted(n for n in os.listdir(url) if "tfevents" in n)
    from tensorflow.compat.v1.train import summary_iterator
    steps = [e.step for name in names for e in summary_iterator(os.path.join(url, name))
             for v in e.summary.value if v.tag == "checkpoint/failed_saves"]
    assert sorted(steps) == [0, 3, 6, 9]


@pytest.mark.parametrize("make_hook, method", [
    (lambda w: rh.SummarySaverHook(save_steps=1, summary_writer=w, summary_op=["loss"]), "add_summary()"),
    (lambda w: rh.StepCounterHook(every_n_steps=1, summary_writer=w), "add_scalar()"),
])
def test_a_tf2_summary_writer_is_refused_at_construction_naming_the_rayhooks_one(tmp_path, make_hook, method):
    """tf.summary.create_file_writer's writer records from inside the step: given to a hook, it used to
    fail at the first summary with TF's AttributeError."""
    import tensorflow as tf
    writer = tf.summary.create_file_writer(str(tmp_path))
    with pytest.raises(TypeError) as error:
        make_hook(writer)
    assert method in str(error.value) and "rh.SummaryWriter(logdir)" in str(error.value)
