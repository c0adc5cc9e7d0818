import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import io
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from tensorboard import data_compat
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.compat.proto import event_pb2, graph_pb2, summary_pb2
from tensorboard.util import tensor_util

from rayhooks.formats import events, summaries

SIZE_GUIDANCE = {"scalars": 0, "histograms": 0, "images": 0, "tensors": 0}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
REPO_ROOT = Path(__file__).resolve().parents[1]


def _write(path, records):
    with open(path, "wb") as f:
        for record in records:
            f.write(events.frame_record(record))


def _accumulate(path):
    acc = EventAccumulator(str(path), size_guidance=SIZE_GUIDANCE)
    acc.Reload()
    return acc


def _graph_def_bytes():
    graph = graph_pb2.GraphDef()
    graph.node.add(name="input", op="Placeholder")
    graph.node.add(name="output", op="Identity", input=["input"])
    return graph.SerializeToString()


@pytest.fixture
def written_run(tmp_path):
    rng = np.random.default_rng(0)
    steps = [0, 5, 10]
    t0 = 1_700_000_000.0
    expected = {"loss": [], "weights": [], "img": [], "notes": []}
    records = [
        events.file_version_event(t0),
        events.session_log_event("START", 0, t0),
        events.graph_event(_graph_def_bytes(), 0, t0),
    ]
    for step in steps:
        weights = rng.normal(loc=step, size=200)
        pixels = rng.integers(0, 256, size=(4, 7, 3), dtype=np.uint8)
        values = [
            summaries.scalar("loss", 1.0 / (step + 1)),
            summaries.histogram("weights", weights, bins=12),
            summaries.image("img", pixels),
            summaries.text("notes", f"step **{step}**"),
        ]
        expected["loss"].append(np.float32(1.0 / (step + 1)))
        expected["weights"].append(weights)
        expected["img"].append(pixels)
        expected["notes"].append(f"step **{step}**".encode())
        records.append(events.summary_event(summaries.to_summary(values), step, t0 + step))
    records.append(
        events.session_log_event("CHECKPOINT", 10, t0 + 11, checkpoint_path="/ckpt/model-10")
    )
    path = tmp_path / events.event_filename(now=t0)
    _write(path, records)
    return path, steps, expected, records


def test_tensorboard_reads_scalars_histograms_images_text_graph(written_run):
    path, steps, expected, _ = written_run
    acc = _accumulate(path)
    assert acc.file_version == 2.0

    loss = acc.Scalars("loss")
    assert [e.step for e in loss] == steps
    assert [e.value for e in loss] == pytest.approx([float(v) for v in expected["loss"]])

    histos = acc.Histograms("weights")
    assert [h.step for h in histos] == steps
    for h, weights in zip(histos, expected["weights"]):
        value = h.histogram_value
        assert value.min == pytest.approx(weights.min())
        assert value.max == pytest.approx(weights.max())
        assert value.num == len(weights)
        assert value.sum == pytest.approx(weights.sum())
        assert sum(value.bucket) == len(weights)
        assert len(value.bucket) == len(value.bucket_limit) == 12
    # Exercises TensorBoard's bucket interpretation, which fails on malformed buckets.
    assert len(acc.CompressedHistograms("weights")) == len(steps)

    images = acc.Images("img")
    assert [i.step for i in images] == steps
    for img, pixels in zip(images, expected["img"]):
        assert (img.height, img.width) == (4, 7)
        assert img.encoded_image_string.startswith(PNG_SIGNATURE)
        decoded = tf.io.decode_png(img.encoded_image_string).numpy()
        np.testing.assert_array_equal(decoded, pixels)
        try:
            from PIL import Image
        except ImportError:
            continue
        np.testing.assert_array_equal(
            np.asarray(Image.open(io.BytesIO(img.encoded_image_string))), pixels
        )

    texts = acc.Tensors("notes")
    assert [t.step for t in texts] == steps
    assert [tensor_util.make_ndarray(t.tensor_proto).item() for t in texts] == expected["notes"]
    assert acc.SummaryMetadata("notes").plugin_data.plugin_name == "text"
    assert "notes" in acc.PluginTagToContent("text")

    assert [n.name for n in acc.Graph().node] == ["input", "output"]


def test_tf_summary_iterator_sees_session_logs(written_run):
    path, steps, expected, records = written_run
    logs = []
    n_events = 0
    for event in tf.compat.v1.train.summary_iterator(str(path)):
        n_events += 1
        if event.HasField("session_log"):
            logs.append((event.step, event.session_log.status, event.session_log.checkpoint_path))
    assert n_events == len(records)
    assert logs == [
        (0, event_pb2.SessionLog.START, ""),
        (10, event_pb2.SessionLog.CHECKPOINT, "/ckpt/model-10"),
    ]


def test_read_records_round_trip(written_run):
    path, _, _, records = written_run
    with open(path, "rb") as f:
        assert list(events.read_records(f)) == records
    first = event_pb2.Event.FromString(records[0])
    assert first.file_version == "brain.Event:2"


def test_frame_record_matches_tf_record_writer(tmp_path):
    payloads = [b"", b"abc", bytes(range(256)) * 40]
    path = tmp_path / "records.tfrecord"
    with tf.io.TFRecordWriter(str(path)) as writer:
        for p in payloads:
            writer.write(p)
    assert path.read_bytes() == b"".join(events.frame_record(p) for p in payloads)


def test_read_records_reads_tf_written_event_file(tmp_path):
    writer = tf.summary.create_file_writer(str(tmp_path))
    with writer.as_default():
        tf.summary.scalar("tf2/x", 1.25, step=3)
    writer.close()
    (path,) = tmp_path.glob("events.out.tfevents.*")
    with open(path, "rb") as f:
        parsed = [event_pb2.Event.FromString(r) for r in events.read_records(f)]
    assert parsed[0].file_version == "brain.Event:2"
    assert [v.tag for e in parsed[1:] for v in e.summary.value] == ["tf2/x"]
    assert parsed[-1].step == 3


@pytest.mark.parametrize("where", ["length", "length_crc", "data", "data_crc"])
def test_read_records_detects_flipped_byte(where):
    payload = b"hello tensorboard"
    good = events.frame_record(b"first") + events.frame_record(payload)
    start = len(events.frame_record(b"first"))
    offset = start + {"length": 0, "length_crc": 9, "data": 14, "data_crc": 12 + len(payload)}[where]
    corrupt = bytearray(good)
    corrupt[offset] ^= 0x01
    records = events.read_records(io.BytesIO(bytes(corrupt)))
    assert next(records) == b"first"
    with pytest.raises(ValueError, match="crc mismatch"):
        next(records)


def test_read_records_rejects_truncation():
    framed = events.frame_record(b"payload")
    for cut in (3, 10, len(framed) - 1):
        with pytest.raises(ValueError, match="truncated"):
            list(events.read_records(io.BytesIO(framed[:cut])))
    assert list(events.read_records(io.BytesIO(b""))) == []


def test_tf1_serialized_summary_passes_through(tmp_path):
    with tf.Graph().as_default():
        x = tf.compat.v1.placeholder(tf.float32, shape=[])
        loss_op = tf.compat.v1.summary.scalar("tf1_loss", x)
        hist_op = tf.compat.v1.summary.histogram("tf1_hist", tf.constant([1.0, 2.0, 4.0]))
        merged_op = tf.compat.v1.summary.merge([loss_op, hist_op])
        with tf.compat.v1.Session() as sess:
            single = sess.run(loss_op, {x: 2.5})
            merged = sess.run(merged_op, {x: 3.5})
    assert isinstance(single, bytes)
    single_summary = summaries.parse_serialized(single)
    merged_summary = summaries.parse_serialized(merged)
    assert [v.tag for v in single_summary.value] == ["tf1_loss"]
    assert sorted(v.tag for v in merged_summary.value) == ["tf1_hist", "tf1_loss"]

    path = tmp_path / events.event_filename()
    _write(path, [
        events.file_version_event(1.0),
        events.summary_event(single_summary, 1, 2.0),
        events.summary_event(merged_summary, 2, 3.0),
    ])
    acc = _accumulate(path)
    assert [(e.step, e.value) for e in acc.Scalars("tf1_loss")] == [(1, 2.5), (2, 3.5)]
    (hist,) = acc.Histograms("tf1_hist")
    assert (hist.histogram_value.min, hist.histogram_value.max) == (1.0, 4.0)
    assert hist.histogram_value.num == 3


@pytest.mark.parametrize("data", [b"\xff\xff", b"\x0a\x05\x0a\x01x\x50\x01", "text", 12])
def test_parse_serialized_rejects_garbage(data):
    with pytest.raises(ValueError):
        summaries.parse_serialized(data)


def test_eager_tensors_are_accepted():
    assert summaries.scalar("x", tf.constant(2.5)).simple_value == 2.5
    assert summaries.histogram("h", tf.constant([1.0, 3.0])).histo.num == 2
    assert summaries.text("t", tf.constant("hi")).tensor.string_val == [b"hi"]
    img = summaries.image("i", tf.zeros([2, 3, 1], dtype=tf.uint8)).image
    assert (img.height, img.width, img.colorspace) == (2, 3, 1)
    assert summaries.parse_serialized(
        tf.constant(summaries.to_summary([summaries.scalar("s", 1)]).SerializeToString())
    ).value[0].tag == "s"


@pytest.mark.parametrize(
    "array, expected",
    [
        (np.arange(12, dtype=np.uint8).reshape(3, 4), np.arange(12, dtype=np.uint8).reshape(3, 4, 1)),
        (np.full((2, 2, 1), 7, dtype=np.uint8), np.full((2, 2, 1), 7, dtype=np.uint8)),
        (np.array([[[0.0, 0.5, 1.0]]]), np.array([[[0, 128, 255]]], dtype=np.uint8)),
        (np.arange(32, dtype=np.uint8).reshape(2, 4, 4), np.arange(32, dtype=np.uint8).reshape(2, 4, 4)),
        (np.array([[0, 255]], dtype=np.int64), np.array([[[0], [255]]], dtype=np.uint8)),
    ],
)
def test_image_png_decodes_to_expected_pixels(array, expected):
    img = summaries.image("im", array).image
    assert (img.height, img.width, img.colorspace) == expected.shape
    decoded = tf.io.decode_png(img.encoded_image_string, channels=expected.shape[2]).numpy()
    np.testing.assert_array_equal(decoded, expected)


def test_histogram_of_constant_values_is_readable():
    value = summaries.histogram("c", [3.0, 3.0, 3.0])
    assert (value.histo.min, value.histo.max, value.histo.num) == (3.0, 3.0, 3.0)
    assert list(value.histo.bucket) == [3.0]
    migrated = data_compat.migrate_value(value)
    buckets = tensor_util.make_ndarray(migrated.tensor)
    assert buckets.shape == (1, 3) and buckets[0, 2] == 3


def test_histogram_migrates_to_tensorboard_bucket_tensor():
    value = summaries.histogram("w", np.linspace(-1, 1, 101), bins=10)
    buckets = tensor_util.make_ndarray(data_compat.migrate_value(value).tensor)
    assert buckets.shape == (10, 3)
    assert buckets[0, 0] == -1 and buckets[-1, 1] == 1
    assert buckets[:, 2].sum() == 101


def test_from_mapping_dispatches_by_type():
    passthrough = summaries.image("given", np.zeros((1, 1), dtype=np.uint8))
    summary = summaries.from_mapping({
        "lr": 0.1,
        "flag": True,
        "one": np.array([2.0]),
        "grads": np.arange(10.0),
        "grads_list": [1, 2, 3],
        "note": "hello",
        "raw": b"bytes",
        "given": passthrough,
    })
    by_tag = {v.tag: v for v in summary.value}
    assert by_tag["lr"].simple_value == pytest.approx(0.1)
    assert by_tag["flag"].simple_value == 1.0
    assert by_tag["one"].simple_value == 2.0
    assert by_tag["grads"].histo.num == 10
    assert by_tag["grads_list"].histo.num == 3
    assert by_tag["note"].tensor.string_val == [b"hello"]
    assert by_tag["raw"].tensor.string_val == [b"bytes"]
    assert by_tag["given"] == passthrough
    untagged = summary_pb2.Summary.Value(simple_value=1.0)
    assert summaries.from_mapping({"k": untagged}).value[0].tag == "k"


@pytest.mark.parametrize("bad", [object(), {}, [], 1j, None, np.array([], dtype=float)])
def test_from_mapping_rejects_unsummarisable(bad):
    with pytest.raises(ValueError, match="'weird'"):
        summaries.from_mapping({"weird": bad})


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: summaries.scalar("loss", "abc"), "'loss'"),
        (lambda: summaries.scalar("loss", b"abc"), "'loss'"),
        (lambda: summaries.scalar("loss", np.array([1.0, 2.0])), "'loss'"),
        (lambda: summaries.scalar("loss", float("nan"), allow_nonfinite=False), "'loss'"),
        (lambda: summaries.scalar("loss", np.inf, allow_nonfinite=False), "'loss'"),
        (lambda: summaries.scalar("loss", 1e39, allow_nonfinite=False), "'loss'"),
        (lambda: summaries.histogram("weights", [1.0, float("nan")]), "'weights'"),
        (lambda: summaries.histogram("weights", []), "'weights'"),
        (lambda: summaries.histogram("weights", [1.0], bins=0), "'weights'"),
        (lambda: summaries.image("pic", np.zeros((2, 3, 2), dtype=np.uint8)), "'pic'"),
        (lambda: summaries.image("pic", np.zeros((2, 3, 3, 1), dtype=np.uint8)), "'pic'"),
        (lambda: summaries.image("pic", np.zeros(5, dtype=np.uint8)), "'pic'"),
        (lambda: summaries.image("pic", np.zeros((0, 3), dtype=np.uint8)), "'pic'"),
        (lambda: summaries.image("pic", np.full((2, 2), 1.5)), "'pic'"),
        (lambda: summaries.image("pic", np.zeros((2, 2), dtype=bool)), "'pic'"),
        (lambda: summaries.text("doc", [1, 2]), "'doc'"),
        (lambda: summaries.text("doc", []), "'doc'"),
    ],
)
def test_bad_inputs_raise_value_error_naming_tag(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_nonfinite_scalars_allowed_by_default():
    assert np.isnan(summaries.scalar("loss", float("nan")).simple_value)
    assert summaries.scalar("loss", -np.inf).simple_value == -np.inf


def test_event_builders_validate():
    with pytest.raises(ValueError):
        events.session_log_event("RESTART", 0, 0.0)
    with pytest.raises(ValueError):
        events.graph_event(b"\xff\xff", 0, 0.0)
    with pytest.raises(TypeError):
        events.summary_event(summaries.scalar("x", 1), 0, 0.0)
    with pytest.raises(TypeError):
        events.summary_event(summary_pb2.Summary(), 1.5, 0.0)
    event = event_pb2.Event.FromString(
        events.summary_event(summary_pb2.Summary(), np.int64(7), 12.5)
    )
    assert (event.step, event.wall_time) == (7, 12.5)


def test_event_filename_format_and_uniqueness():
    names = {events.event_filename("host", 42, 1234.9) for _ in range(5)}
    assert len(names) == 5
    for name in names:
        assert re.fullmatch(r"events\.out\.tfevents\.0000001234\.host\.42\.\d+", name)
        assert event_accumulator.io_wrapper.IsSummaryEventsFile(name)
    assert events.event_filename("h", 1, 1.0, suffix=".v2").endswith(".v2")
    default = events.event_filename()
    assert f".{os.getpid()}." in default
    with pytest.raises(ValueError):
        events.event_filename("bad/host", 1, 1.0)


def test_modules_do_not_import_tensorflow():
    code = (
        "import sys\n"
        "import rayhooks.formats.events, rayhooks.formats.summaries\n"
        "assert not [m for m in sys.modules if m.split('.')[0] == 'tensorflow'], 'tf imported'\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
