"""Build TensorBoard ``Summary`` protos from plain Python / NumPy values.

A ``Summary`` is a list of ``Summary.Value`` entries, each a tag plus one
payload. This module produces the payloads TensorBoard reads natively:

* scalars as ``simple_value`` (a float32),
* histograms as ``HistogramProto``: ``min``/``max``/``num``/``sum``/
  ``sum_squares`` plus ``bucket_limit`` (right edge of each bucket) and
  ``bucket`` (count per bucket); TensorBoard takes ``min`` as the left edge of
  the first bucket and ``max`` as the right edge of the last,
* images as ``Summary.Image`` holding a PNG, produced by a small zlib-based
  encoder so neither PIL nor TensorFlow is needed,
* text as a ``DT_STRING`` tensor tagged with ``plugin_name="text"`` metadata,
  which is how TensorBoard's text plugin recognises it.

Every builder validates its input and raises ``ValueError`` naming the tag, so
a bad value is reported where it is produced rather than as an unreadable
event file. Objects exposing ``.numpy()`` (TensorFlow eager tensors) are
converted first; TensorFlow itself is never imported.
"""

from __future__ import annotations

import numbers
import struct
import zlib
from typing import Iterable, Mapping

import numpy as np
from google.protobuf.message import DecodeError
from google.protobuf import unknown_fields
from tensorboard.compat.proto import summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2
from tensorboard.plugins.text import plugin_data_pb2 as text_plugin_data_pb2

__all__ = [
    "scalar",
    "histogram",
    "image",
    "text",
    "encode_png",
    "to_summary",
    "from_mapping",
    "parse_serialized",
]

_REAL_KINDS = "biuf"


def _check_tag(tag) -> None:
    if not isinstance(tag, str) or not tag:
        raise ValueError(f"summary tag must be a non-empty str, got {tag!r}")


def _unwrap(value):
    # Eager tensors (and similar) expose .numpy(); calling it avoids importing TF.
    numpy_method = getattr(value, "numpy", None)
    if callable(numpy_method) and not isinstance(value, (np.ndarray, np.generic)):
        return numpy_method()
    return value


def _real_array(tag: str, value, what: str) -> np.ndarray:
    if isinstance(value, (str, bytes, bytearray)):
        raise ValueError(f"summary {tag!r}: {what} must be numeric, got {type(value).__name__}")
    try:
        array = np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"summary {tag!r}: cannot convert value to an array: {exc}") from None
    if array.dtype.kind not in _REAL_KINDS:
        raise ValueError(
            f"summary {tag!r}: {what} must be real-valued, got dtype {array.dtype}"
        )
    return array


def scalar(tag: str, value, *, allow_nonfinite: bool = True) -> summary_pb2.Summary.Value:
    """A ``simple_value`` summary from a real number or a size-1 array."""
    _check_tag(tag)
    value = _unwrap(value)
    # Fractions and other numbers.Real types would become object arrays.
    if isinstance(value, numbers.Real) and not isinstance(value, (int, float, np.generic)):
        value = float(value)
    array = _real_array(tag, value, "scalar")
    if array.size != 1:
        raise ValueError(
            f"summary {tag!r}: scalar needs exactly one element, got shape {array.shape}"
        )
    # simple_value is float32; checking after the cast also catches values
    # that are finite in float64 but overflow to inf when stored.
    with np.errstate(over="ignore"):
        stored = np.float32(array.reshape(()).astype(np.float64))
    if not allow_nonfinite and not np.isfinite(stored):
        raise ValueError(f"summary {tag!r}: scalar is not finite ({float(stored)})")
    return summary_pb2.Summary.Value(tag=tag, simple_value=float(stored))


def histogram(tag: str, values, bins: int = 30) -> summary_pb2.Summary.Value:
    """A ``HistogramProto`` summary over all elements of ``values``."""
    _check_tag(tag)
    if isinstance(bins, bool) or not isinstance(bins, numbers.Integral) or bins < 1:
        raise ValueError(f"summary {tag!r}: bins must be a positive integer, got {bins!r}")
    array = _real_array(tag, _unwrap(values), "histogram values").astype(np.float64).ravel()
    if array.size == 0:
        raise ValueError(f"summary {tag!r}: histogram of an empty array")
    if np.isnan(array).any():
        raise ValueError(f"summary {tag!r}: histogram values contain NaN")
    # Infinite values make the bucket range unbounded and TensorBoard's
    # rendering meaningless, so they are refused like NaN.
    if np.isinf(array).any():
        raise ValueError(f"summary {tag!r}: histogram values contain inf")
    lo, hi = float(array.min()), float(array.max())
    if lo == hi:
        limits, counts = np.array([hi]), np.array([array.size])
    else:
        counts, edges = np.histogram(array, bins=int(bins), range=(lo, hi))
        limits = edges[1:]
    proto = summary_pb2.HistogramProto(
        min=lo,
        max=hi,
        num=float(array.size),
        sum=float(array.sum()),
        sum_squares=float(np.dot(array, array)),
        bucket_limit=[float(x) for x in limits],
        bucket=[float(c) for c in counts],
    )
    return summary_pb2.Summary.Value(tag=tag, histo=proto)


# PNG colour types by channel count: grey, grey+alpha, RGB, RGBA.
_PNG_COLOR_TYPE = {1: 0, 2: 4, 3: 2, 4: 6}


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data))
        + kind
        + data
        + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def encode_png(pixels: np.ndarray) -> bytes:
    """Encode an HxWxC (C in 1..4) uint8 array as an 8-bit PNG.

    Uses filter type 0 on every row: larger files than an optimising encoder,
    but summaries images are small and this keeps the encoder trivial.
    """
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] not in _PNG_COLOR_TYPE:
        raise ValueError(f"encode_png needs an HxWxC uint8 array with C in 1..4, got "
                         f"{pixels.dtype} {pixels.shape}")
    height, width, channels = pixels.shape
    rows = np.ascontiguousarray(pixels).reshape(height, width * channels)
    raw = np.concatenate([np.zeros((height, 1), dtype=np.uint8), rows], axis=1)
    header = struct.pack(">IIBBBBB", width, height, 8, _PNG_COLOR_TYPE[channels], 0, 0, 0)
    return b"".join((
        b"\x89PNG\r\n\x1a\n",
        _png_chunk(b"IHDR", header),
        _png_chunk(b"IDAT", zlib.compress(raw.tobytes(), 6)),
        _png_chunk(b"IEND", b""),
    ))


def image(tag: str, array) -> summary_pb2.Summary.Value:
    """A PNG ``Summary.Image`` from an HxW, HxWx1, HxWx3 or HxWx4 array.

    uint8 is used as is; floats must lie in [0, 1] and are scaled to 0..255;
    other integer dtypes are accepted when every value lies in 0..255.
    """
    _check_tag(tag)
    pixels = np.asarray(_unwrap(array))
    shape = pixels.shape
    if pixels.ndim == 2:
        pixels = pixels[:, :, np.newaxis]
    if pixels.ndim != 3 or pixels.shape[2] not in (1, 3, 4):
        raise ValueError(
            f"summary {tag!r}: image must be HxW, HxWx1, HxWx3 or HxWx4, got shape {shape}"
        )
    if pixels.shape[0] == 0 or pixels.shape[1] == 0:
        raise ValueError(f"summary {tag!r}: image has zero size {pixels.shape}")
    kind = pixels.dtype.kind
    if kind == "f":
        if not np.isfinite(pixels).all() or pixels.min() < 0.0 or pixels.max() > 1.0:
            raise ValueError(f"summary {tag!r}: float image values must be finite and in [0, 1]")
        pixels = np.round(pixels.astype(np.float64) * 255.0).astype(np.uint8)
    elif kind in "iu" and pixels.dtype != np.uint8:
        if pixels.min() < 0 or pixels.max() > 255:
            raise ValueError(f"summary {tag!r}: integer image values must be in 0..255")
        pixels = pixels.astype(np.uint8)
    elif pixels.dtype != np.uint8:
        raise ValueError(f"summary {tag!r}: image dtype must be uint8, another integer type or float, got {pixels.dtype}")
    height, width, channels = pixels.shape
    return summary_pb2.Summary.Value(
        tag=tag,
        image=summary_pb2.Summary.Image(
            height=height,
            width=width,
            colorspace=channels,
            encoded_image_string=encode_png(pixels),
        ),
    )


def _text_metadata() -> summary_pb2.SummaryMetadata:
    content = text_plugin_data_pb2.TextPluginData(version=0).SerializeToString()
    return summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="text", content=content)
    )


def text(tag: str, value) -> summary_pb2.Summary.Value:
    """A text-plugin summary from a str/bytes or a (nested) list/array of them.

    A single string becomes a scalar string tensor; lists keep their shape, which
    the text plugin renders as a table.
    """
    _check_tag(tag)
    value = _unwrap(value)
    if isinstance(value, (str, bytes)):
        array = np.empty((), dtype=object)
        array[()] = value
    else:
        try:
            array = np.asarray(value, dtype=object)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"summary {tag!r}: cannot convert text value: {exc}") from None
        if array.size == 0:
            raise ValueError(f"summary {tag!r}: text value is empty")
    encoded = []
    for item in array.ravel():
        if isinstance(item, str):
            encoded.append(item.encode("utf-8"))
        elif isinstance(item, bytes):
            encoded.append(item)
        else:
            raise ValueError(
                f"summary {tag!r}: text elements must be str or bytes, got {type(item).__name__}"
            )
    tensor = tensor_pb2.TensorProto(
        dtype=types_pb2.DT_STRING,
        tensor_shape=tensor_shape_pb2.TensorShapeProto(
            dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=n) for n in array.shape]
        ),
        string_val=encoded,
    )
    return summary_pb2.Summary.Value(tag=tag, metadata=_text_metadata(), tensor=tensor)


def to_summary(values: Iterable[summary_pb2.Summary.Value]) -> summary_pb2.Summary:
    """Collect ``Summary.Value`` objects into one ``Summary``."""
    summary = summary_pb2.Summary()
    for value in values:
        if not isinstance(value, summary_pb2.Summary.Value):
            raise TypeError(f"expected summary_pb2.Summary.Value, got {type(value).__name__}")
        summary.value.add().CopyFrom(value)
    return summary


def _from_value(tag: str, value) -> summary_pb2.Summary.Value:
    if isinstance(value, summary_pb2.Summary.Value):
        if value.tag:
            return value
        # An untagged Value would be invisible in TensorBoard; the mapping key
        # is the only sensible tag for it.
        tagged = summary_pb2.Summary.Value()
        tagged.CopyFrom(value)
        tagged.tag = tag
        return tagged
    value = _unwrap(value)
    # str/bytes could be text or serialized protos; treating them as text is
    # the only reading that needs no guessing. Use parse_serialized for protos.
    if isinstance(value, (str, bytes)):
        return text(tag, value)
    if isinstance(value, (numbers.Real, np.generic)):
        return scalar(tag, value)
    try:
        array = np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"summary {tag!r}: cannot summarise {type(value).__name__}: {exc}") from None
    if array.dtype.kind in "US" or (
        array.dtype.kind == "O" and array.size
        and all(isinstance(x, (str, bytes)) for x in array.ravel())
    ):
        return text(tag, array)
    if array.dtype.kind not in _REAL_KINDS:
        hint = ""
        if type(value).__module__.startswith("tensorflow.python.distribute."):
            hint = ("; it is a per-replica value of a tf.distribute strategy: return strategy.reduce(...) "
                    "from the step instead of strategy.run's result")
        raise ValueError(f"summary {tag!r}: cannot summarise value of type {type(value).__name__}{hint}")
    if array.size == 0:
        raise ValueError(f"summary {tag!r}: cannot summarise an empty array")
    if array.size == 1:
        return scalar(tag, array)
    return histogram(tag, array)


def from_mapping(values: Mapping[str, object]) -> summary_pb2.Summary:
    """Summarise ``{tag: value}``: numbers and size-1 arrays become scalars,
    larger numeric arrays histograms, strings text; ``Summary.Value`` entries
    are passed through (an empty tag is replaced by the key)."""
    built = []
    for tag, value in values.items():
        _check_tag(tag)
        built.append(_from_value(tag, value))
    return to_summary(built)


def _has_unknown_fields(message) -> bool:
    # Protobuf parsing is permissive: arbitrary bytes often decode as unknown
    # fields of an otherwise empty message, which would hide garbage input.
    if len(unknown_fields.UnknownFieldSet(message)):
        return True
    for field, sub in message.ListFields():
        if field.type != field.TYPE_MESSAGE:
            continue
        # protobuf >= 6 replaced FieldDescriptor.label with is_repeated.
        repeated = getattr(field, "is_repeated", None)
        if repeated is None:
            repeated = field.label == field.LABEL_REPEATED
        items = sub if repeated else [sub]
        if any(_has_unknown_fields(item) for item in items):
            return True
    return False


def parse_serialized(data: bytes) -> summary_pb2.Summary:
    """Parse serialized ``Summary`` bytes, e.g. the result of running a TF1
    ``tf.compat.v1.summary.*`` / ``merge`` op in a session."""
    data = _unwrap(data)
    if isinstance(data, np.ndarray) and data.ndim == 0:
        data = data.item()
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValueError(f"serialized summary must be bytes, got {type(data).__name__}")
    try:
        summary = summary_pb2.Summary.FromString(bytes(data))
    except DecodeError as exc:
        raise ValueError(f"not a serialized Summary: {exc}") from None
    if _has_unknown_fields(summary):
        raise ValueError("not a serialized Summary: unrecognised fields")
    return summary
