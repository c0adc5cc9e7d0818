"""Tests for rayhooks.formats.bundle: TF V2 checkpoint bundles without TensorFlow.

TensorFlow is only used here, to prove that what we write is what TF reads (and
writes), byte for byte where possible.
"""

import io
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import google_crc32c
import numpy as np
import pytest

from rayhooks.formats import bundle
from rayhooks.formats.bundle import (
    BundleWriter,
    data_filename,
    index_filename,
    read_bundle,
    read_index,
    write_bundle,
)

try:
    import ml_dtypes
except ImportError:  # pragma: no cover
    ml_dtypes = None


@pytest.fixture(scope="module")
def tf():
    import tensorflow

    return tensorflow


def _write(prefix, tensors, **kwargs):
    with open(data_filename(prefix), "wb") as d, open(index_filename(prefix), "wb") as i:
        writer = BundleWriter(d, i, **kwargs)
        for key, value in tensors.items():
            writer.add(key, value)
        return writer.finish()


def _read(prefix, **kwargs):
    with open(index_filename(prefix), "rb") as i:
        index = i.read()
    with open(data_filename(prefix), "rb") as d:
        return read_bundle(index, d, **kwargs)


def _assert_same(got, want):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape
    if want.dtype.kind in "OSU":
        enc = [x.encode() if isinstance(x, str) else bytes(x) for x in want.reshape(-1).tolist()]
        assert got.dtype == object
        assert got.reshape(-1).tolist() == enc
        return
    native = want.dtype.newbyteorder("=")
    assert got.dtype == native
    assert got.tobytes() == np.ascontiguousarray(want, dtype=native).tobytes()


NUMERIC = ["float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8",
           "uint16", "uint32", "uint64", "bool", "complex64", "complex128", "bfloat16"]


def _sample(dtype_name, shape, rng):
    if dtype_name == "bfloat16":
        if ml_dtypes is None:
            pytest.skip("ml_dtypes not installed")
        return rng.standard_normal(shape).astype(ml_dtypes.bfloat16)
    dtype = np.dtype(dtype_name)
    if dtype.kind == "b":
        return rng.integers(0, 2, shape).astype(bool)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)
    if dtype.kind == "c":
        return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dtype)
    return (rng.standard_normal(shape) * 1000).astype(dtype)


@pytest.mark.parametrize("dtype_name", NUMERIC)
def test_every_dtype_round_trips_through_tf_and_back(tmp_path, tf, dtype_name):
    rng = np.random.default_rng(len(dtype_name))
    base = _sample(dtype_name, (4, 6), rng)
    tensors = {
        "x/matrix": _sample(dtype_name, (3, 5), rng),
        "x/scalar": _sample(dtype_name, (), rng),
        "x/empty": _sample(dtype_name, (0, 3), rng),
        "x/noncontiguous": base[:, ::2].T,
        "x/3d": _sample(dtype_name, (2, 1, 3), rng),
    }
    assert not tensors["x/noncontiguous"].flags.c_contiguous
    if dtype_name != "bfloat16" and base.dtype.itemsize > 1:
        tensors["x/bigendian"] = base.astype(base.dtype.newbyteorder(">"))
    if dtype_name == "float32":
        tensors["x/npscalar"] = np.float32(2.5)
    prefix = str(tmp_path / "model.ckpt-1")
    _write(prefix, tensors)

    reader = tf.train.load_checkpoint(prefix)
    ours = _read(prefix)
    assert set(ours) == set(tensors) == set(reader.get_variable_to_shape_map())
    for key, want in tensors.items():
        _assert_same(ours[key], want)
        from_tf = np.asarray(reader.get_tensor(key))
        assert from_tf.shape == np.shape(want)
        assert from_tf.tobytes() == np.ascontiguousarray(
            want, dtype=np.asarray(want).dtype.newbyteorder("=")).tobytes()


def test_strings_round_trip_through_tf(tmp_path, tf):
    long = b"L" * 300  # two-byte varint length
    tensors = {
        "s/matrix": np.array([[b"ab", "", "caf\u00e9"], [b"\x00nul\x00", long, b"z"]],
                             dtype=object),
        "s/bytes_scalar": b"hello",
        "s/str_scalar": "w\u00f6rld",
        "s/empty": np.array([], dtype=object).reshape(0, 2),
        "s/fixed_bytes": np.array([b"abc", b"de"]),
        "s/unicode": np.array(["x", "yy\u2603"]),
        "s/np_bytes_scalar": np.bytes_(b"np"),
    }
    prefix = str(tmp_path / "strings")
    _write(prefix, tensors)
    reader = tf.train.load_checkpoint(prefix)
    ours = _read(prefix)
    for key, want in tensors.items():
        want = np.asarray(want, dtype=object) if isinstance(want, (bytes, str)) else want
        _assert_same(ours[key], want)
        _assert_same(np.asarray(reader.get_tensor(key), dtype=object), ours[key])
    assert ours["s/bytes_scalar"].shape == () and ours["s/bytes_scalar"][()] == b"hello"


def test_large_tensor_and_file_checksums(tmp_path, tf):
    big = np.random.default_rng(0).standard_normal((2048, 1024)).astype(np.float32)  # 8 MiB
    tensors = {"big": big, "after": np.arange(5, dtype=np.int64), "name": b"x"}
    prefix = str(tmp_path / "big")
    stats = _write(prefix, tensors)
    data = open(data_filename(prefix), "rb").read()
    index = open(index_filename(prefix), "rb").read()
    assert stats == {"data_bytes": len(data), "index_bytes": len(index),
                     "data_crc32c": google_crc32c.value(data),
                     "index_crc32c": google_crc32c.value(index)}
    assert len(data) > big.nbytes
    reader = tf.train.load_checkpoint(prefix)
    np.testing.assert_array_equal(reader.get_tensor("big"), big)
    np.testing.assert_array_equal(reader.get_tensor("after"), tensors["after"])
    ours = _read(prefix)
    np.testing.assert_array_equal(ours["big"], big)
    # Entries are laid out in add() order.
    entries = read_index(index)
    assert entries["big"]["offset"] == 0 and entries["big"]["size"] == big.nbytes
    assert entries["after"]["offset"] == big.nbytes


def test_output_is_byte_identical_to_tf_save(tmp_path, tf):
    rng = np.random.default_rng(3)
    items = [
        ("zeta/kernel", rng.standard_normal((7, 3)).astype(np.float32)),
        ("alpha", np.int64(42)),
        ("empty", np.zeros((0, 4), np.float64)),
        ("names", np.array([b"a", b"", b"ccc" * 100], dtype=object)),
        ("empty_strings", np.array([], dtype=object)),
        ("flag", np.array([True, False])),
        ("half", rng.standard_normal(9).astype(np.float16)),
        ("cplx", (rng.standard_normal(3) + 1j).astype(np.complex128)),
        ("u16", np.arange(5, dtype=np.uint16)),
    ] + [(f"layer_{i:03d}/w", np.full((2,), i, np.int32)) for i in range(50)]
    tf_prefix = str(tmp_path / "tf")
    tf.raw_ops.SaveV2(prefix=tf_prefix, tensor_names=[k for k, _ in items],
                      shape_and_slices=[""] * len(items),
                      tensors=[tf.constant(v) for _, v in items])
    our_prefix = str(tmp_path / "ours")
    _write(our_prefix, dict(items))
    for name in (data_filename, index_filename):
        with open(name(tf_prefix), "rb") as a, open(name(our_prefix), "rb") as b:
            assert a.read() == b.read(), name.__name__


def test_reads_checkpoint_written_by_tf(tmp_path, tf):
    from tensorflow.core.protobuf import trackable_object_graph_pb2

    class Model(tf.Module):
        def __init__(self):
            self.w = tf.Variable(np.arange(12, dtype=np.float32).reshape(3, 4))
            self.b = tf.Variable(np.array([1.5, -2.0]), dtype=tf.float64)
            self.labels = tf.Variable([b"cat", b"dog"])

    ckpt = tf.train.Checkpoint(model=Model(), step=tf.Variable(7, dtype=tf.int64))
    prefix = ckpt.write(str(tmp_path / "tfckpt"))
    reader = tf.train.load_checkpoint(prefix)
    index = open(index_filename(prefix), "rb").read()
    data = open(data_filename(prefix), "rb").read()

    entries = read_index(index)
    assert set(entries) == set(reader.get_variable_to_shape_map())
    graph_key = "_CHECKPOINTABLE_OBJECT_GRAPH"
    assert entries[graph_key]["dtype"] == np.dtype(object) and entries[graph_key]["shape"] == ()
    w_key = "model/w/.ATTRIBUTES/VARIABLE_VALUE"
    w = entries[w_key]
    assert (w["dtype"], w["shape"], w["size"]) == (np.dtype(np.float32), (3, 4), 48)
    assert w["crc32c"] == google_crc32c.value(data[w["offset"]:w["offset"] + w["size"]])

    values = read_bundle(index, io.BytesIO(data))
    for key in entries:
        _assert_same(values[key], np.asarray(reader.get_tensor(key), dtype=values[key].dtype))
    graph = trackable_object_graph_pb2.TrackableObjectGraph()
    graph.ParseFromString(values[graph_key][()])
    assert len(graph.nodes) >= 5


def test_corrupt_data_is_reported_with_key(tmp_path):
    tensors = {"first": np.arange(10, dtype=np.float32),
               "victim": np.arange(100, dtype=np.int32),
               "words": np.array([b"hello", b"world"], dtype=object),
               "last": np.ones(3)}
    prefix = str(tmp_path / "c")
    _write(prefix, tensors)
    index = open(index_filename(prefix), "rb").read()
    clean = open(data_filename(prefix), "rb").read()
    entries = read_index(index)

    def corrupt(pos):
        data = bytearray(clean)
        data[pos] ^= 0x40
        return io.BytesIO(bytes(data))

    victim = entries["victim"]
    bad = corrupt(victim["offset"] + 17)
    with pytest.raises(ValueError, match="victim"):
        read_bundle(index, bad)
    unverified = read_bundle(index, bad, verify=False)
    assert not np.array_equal(unverified["victim"], tensors["victim"])
    ok = read_bundle(index, bad, keys=["first", "last"])
    np.testing.assert_array_equal(ok["first"], tensors["first"])

    words = entries["words"]
    # Payload byte, then the length checksum itself.
    for pos in (words["offset"] + words["size"] - 1, words["offset"] + 3):
        with pytest.raises(ValueError, match="words"):
            read_bundle(index, corrupt(pos))


def test_reads_into_arrays_in_place_only_where_every_one_fits(tmp_path):
    """`into` saves the restore a copy; a misfit anywhere leaves every array as it was (the caller refuses it)."""
    tensors = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.arange(5, dtype=np.int64),
               "words": np.array([b"x", b"yz"], dtype=object)}
    prefix = str(tmp_path / "c")
    _write(prefix, tensors)
    index = open(index_filename(prefix), "rb").read()

    def read(into):
        with open(data_filename(prefix), "rb") as data:
            return read_bundle(index, data, into=into)
    into = {"a": np.zeros((3, 4), np.float32), "b": np.zeros(5, np.int64), "words": np.array([b"", b""], object)}
    got = read(into)
    assert got["a"] is into["a"] and got["b"] is into["b"]       # read in place
    np.testing.assert_array_equal(into["a"], tensors["a"])
    np.testing.assert_array_equal(into["b"], tensors["b"])
    assert list(got["words"]) == [b"x", b"yz"]                    # strings: new objects, as before

    for misfit in (np.zeros(6, np.int64), np.zeros(5, np.int32), np.zeros(10, np.int64)[::2],
                   np.zeros(5, np.int64).copy().view()):
        if misfit.base is not None and misfit.flags.c_contiguous:
            misfit.flags.writeable = False                        # the last one: read-only
        into = {"a": np.zeros((3, 4), np.float32), "b": misfit}
        got = read(into)
        assert got["a"] is not into["a"] and not into["a"].any()  # not even the fitting one was written
        np.testing.assert_array_equal(got["b"], tensors["b"])


def test_corrupt_or_foreign_index_is_rejected(tmp_path):
    prefix = str(tmp_path / "i")
    _write(prefix, {"a": np.zeros(3)})
    index = bytearray(open(index_filename(prefix), "rb").read())
    data = open(data_filename(prefix), "rb").read()
    bad_block = bytearray(index)
    bad_block[3] ^= 1
    with pytest.raises(ValueError, match="crc"):
        read_bundle(bytes(bad_block), io.BytesIO(data))
    bad_magic = bytearray(index)
    bad_magic[-1] ^= 1
    with pytest.raises(ValueError, match="magic"):
        read_index(bytes(bad_magic))
    with pytest.raises(ValueError, match="too short"):
        read_index(b"short")


def test_truncated_data_file_is_reported(tmp_path):
    prefix = str(tmp_path / "t")
    _write(prefix, {"a": np.zeros(3), "b": np.ones(100)})
    index = open(index_filename(prefix), "rb").read()
    data = open(data_filename(prefix), "rb").read()
    with pytest.raises(ValueError, match="'b'.*truncated"):
        read_bundle(index, io.BytesIO(data[:-8]))


def test_many_keys_span_many_index_blocks(tmp_path, tf):
    keys = [f"layer_{i:05d}/kernel/.ATTRIBUTES/VARIABLE_VALUE" for i in range(3000)]
    prefix = str(tmp_path / "many")
    # Insertion order differs from key order on purpose.
    _write(prefix, {k: np.array([i, -i], np.int64) for i, k in reversed(list(enumerate(keys)))},
           block_size=4096)
    index = open(index_filename(prefix), "rb").read()
    footer = index[-48:]
    _, pos = bundle._read_varint(footer, 0)
    _, pos = bundle._read_varint(footer, pos)
    index_block = bundle._read_block(index, footer[pos:], True)
    assert sum(1 for _ in bundle._iter_block(index_block)) > 20

    reader = tf.train.load_checkpoint(prefix)
    assert len(reader.get_variable_to_shape_map()) == 3000
    for i, key in enumerate(keys):
        np.testing.assert_array_equal(reader.get_tensor(key), [i, -i])
    ours = _read(prefix)
    assert list(read_index(index)) == sorted(keys)
    assert all(ours[k].tolist() == [i, -i] for i, k in enumerate(keys))


def test_rewritten_values_restore_into_fresh_tf_objects(tmp_path, tf):
    class Model(tf.Module):
        def __init__(self):
            self.w = tf.Variable(tf.zeros((4, 3)))
            self.b = tf.Variable(tf.zeros((3,), tf.float64))
            self.vocab = tf.Variable([b"", b""])

    src = tf.train.Checkpoint(model=Model(), step=tf.Variable(0, dtype=tf.int64))
    reader = tf.train.load_checkpoint(src.save(str(tmp_path / "src")))
    graph_key = "_CHECKPOINTABLE_OBJECT_GRAPH"
    graph = reader.get_tensor(graph_key)
    assert isinstance(graph, bytes) and graph

    rng = np.random.default_rng(5)
    new = {
        "model/w/.ATTRIBUTES/VARIABLE_VALUE": rng.standard_normal((4, 3)).astype(np.float32),
        "model/b/.ATTRIBUTES/VARIABLE_VALUE": rng.standard_normal(3),
        "model/vocab/.ATTRIBUTES/VARIABLE_VALUE": np.array([b"ant", b"bee"], dtype=object),
        "step/.ATTRIBUTES/VARIABLE_VALUE": np.int64(1234),
        "save_counter/.ATTRIBUTES/VARIABLE_VALUE": np.int64(9),
    }
    assert set(new) | {graph_key} == set(reader.get_variable_to_shape_map())
    prefix = str(tmp_path / "ours")
    _write(prefix, {graph_key: graph, **dict(sorted(new.items(), reverse=True))})

    dst = tf.train.Checkpoint(model=Model(), step=tf.Variable(0, dtype=tf.int64))
    dst.restore(prefix).assert_consumed()
    np.testing.assert_array_equal(dst.model.w.numpy(), new["model/w/.ATTRIBUTES/VARIABLE_VALUE"])
    np.testing.assert_array_equal(dst.model.b.numpy(), new["model/b/.ATTRIBUTES/VARIABLE_VALUE"])
    assert dst.model.vocab.numpy().tolist() == [b"ant", b"bee"]
    assert int(dst.step.numpy()) == 1234
    assert int(dst.save_counter.numpy()) == 9


class _WriteOnlySink:
    """A sink with nothing but write(), accepting at most ``limit`` bytes per call."""

    def __init__(self, limit=None):
        self.chunks, self.limit = [], limit

    def write(self, data):
        data = bytes(data)[: self.limit] if self.limit else bytes(data)
        self.chunks.append(data)
        return len(data) if self.limit else None


@pytest.mark.parametrize("limit", [None, 1000])
def test_writer_needs_only_write(limit):
    tensors = {"b": np.arange(3000, dtype=np.float64), "a": b"text", "c": np.float16(1)}
    ref_data, ref_index = io.BytesIO(), io.BytesIO()
    write_bundle(ref_data, ref_index, tensors)
    data, index = _WriteOnlySink(limit), _WriteOnlySink(limit)
    stats = write_bundle(data, index, tensors)
    assert b"".join(data.chunks) == ref_data.getvalue()
    assert stats["data_bytes"] == len(ref_data.getvalue())
    assert stats["index_crc32c"] == google_crc32c.value(ref_index.getvalue())
    out = read_bundle(b"".join(index.chunks), io.BytesIO(b"".join(data.chunks)))
    np.testing.assert_array_equal(out["b"], tensors["b"])


def test_read_index_and_key_selection():
    data, index = io.BytesIO(), io.BytesIO()
    write_bundle(data, index, {"z": np.zeros((2, 2), np.uint8), "a": np.ones(3, np.float32)})
    entries = read_index(index.getvalue())
    assert list(entries) == ["a", "z"]
    assert entries["z"] == {"dtype": np.dtype(np.uint8), "shape": (2, 2), "offset": 0,
                            "size": 4, "crc32c": google_crc32c.value(bytes(4))}
    assert entries["a"]["offset"] == 4 and entries["a"]["size"] == 12
    only = read_bundle(index.getvalue(), data, keys=["a"])
    assert list(only) == ["a"]
    with pytest.raises(KeyError, match="missing"):
        read_bundle(index.getvalue(), data, keys=["a", "missing"])


def test_writer_rejects_bad_input():
    writer = BundleWriter(io.BytesIO(), io.BytesIO())
    writer.add("x", np.zeros(2))
    with pytest.raises(ValueError, match="duplicate"):
        writer.add("x", np.zeros(2))
    with pytest.raises(ValueError, match="reserved"):
        writer.add("", np.zeros(2))
    with pytest.raises(TypeError, match="datetime"):
        writer.add("t", np.array(["2020-01-01"], dtype="datetime64[D]"))
    with pytest.raises(TypeError, match="'o'"):
        writer.add("o", np.array([b"ok", 3], dtype=object))
    writer.finish()
    with pytest.raises(ValueError, match="after finish"):
        writer.add("y", np.zeros(1))
    with pytest.raises(ValueError, match="twice"):
        writer.finish()


@pytest.mark.parametrize("n1,n2", [(0, 5), (5, 0), (1, 1), (100, 3), (4 << 20, 12345), (7, 4 << 20)])
def test_crc32c_combine_equals_the_crc_of_the_concatenation(n1, n2):
    import google_crc32c
    from rayhooks.formats.bundle import crc32c_combine
    rng = np.random.default_rng(n1 * 31 + n2)
    a, b = rng.bytes(n1), rng.bytes(n2)
    assert crc32c_combine(google_crc32c.value(a), google_crc32c.value(b), n2) == google_crc32c.value(a + b)
