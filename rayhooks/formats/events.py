"""TensorBoard event files without TensorFlow.

A ``*.tfevents.*`` file is a sequence of TFRecord frames, each carrying one
serialized ``tensorflow.Event`` protocol buffer::

    uint64  length            (little endian)
    uint32  masked_crc32c(length bytes)
    bytes   data[length]
    uint32  masked_crc32c(data)

The CRC is CRC-32C (Castagnoli); "masking" rotates it right by 15 bits and adds
a constant, so that a CRC of data that itself contains CRCs is still well mixed.
The first record of a file is conventionally an Event whose ``file_version`` is
``"brain.Event:2"``; TensorBoard uses it to decide how to handle restarts
(``SessionLog.START``) when purging orphaned data.

This module only produces bytes (``frame_record`` output can be written to any
binary file-like object) and parses them back; it never imports TensorFlow and
relies on the protobuf classes shipped with the ``tensorboard`` package.
"""

from __future__ import annotations

import itertools
import operator
import os
import socket
import struct
import threading
import time
from typing import BinaryIO, Iterator

import google_crc32c
from google.protobuf.message import DecodeError
from tensorboard.compat.proto import event_pb2, graph_pb2, summary_pb2

__all__ = [
    "FILE_VERSION",
    "event_filename",
    "filename_time",
    "frame_record",
    "masked_crc32c",
    "file_version_event",
    "summary_event",
    "session_log_event",
    "graph_event",
    "read_records",
]

FILE_VERSION = "brain.Event:2"

_MASK_DELTA = 0xA282EAD8
_HEADER = struct.Struct("<Q")
_CRC = struct.Struct("<I")
_SESSION_STATUSES = ("START", "STOP", "CHECKPOINT")

# TF2's summary writer appends a per-process counter after the pid so that two
# writers opened in the same second in the same process never share a file.
_filename_counter = itertools.count()
_filename_lock = threading.Lock()


def event_filename(
    hostname: str | None = None,
    pid: int | None = None,
    now: float | None = None,
    suffix: str = "",
) -> str:
    """Return a TensorBoard-compatible, per-process unique event file name.

    ``events.out.tfevents.{int(now)}.{hostname}.{pid}.{counter}{suffix}``;
    TensorBoard only requires ``"tfevents"`` in the basename, the rest keeps
    names sortable by creation time and unique across writers.
    """
    if hostname is None:
        hostname = socket.gethostname()
    if pid is None:
        pid = os.getpid()
    if now is None:
        now = time.time()
    # The name is joined onto a log directory by callers; a separator here
    # would silently write somewhere else.
    for part, label in ((hostname, "hostname"), (suffix, "suffix")):
        if "/" in part or (os.sep in part) or (os.altsep and os.altsep in part):
            raise ValueError(f"event_filename: {label} {part!r} contains a path separator")
    with _filename_lock:
        counter = next(_filename_counter)
    # Zero-padded, so that names sort by time as strings (TensorBoard's order) for any clock.
    return f"events.out.tfevents.{int(now):010d}.{hostname}.{int(pid)}.{counter}{suffix}"


def filename_time(name: str) -> int:
    """The creation second that `event_filename` put in `name`."""
    return int(os.path.basename(name).split(".")[3])


def masked_crc32c(data: bytes) -> int:
    """CRC-32C of ``data`` with the TFRecord mask applied."""
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def frame_record(data: bytes) -> bytes:
    """Wrap one serialized record in TFRecord framing."""
    if not isinstance(data, bytes):
        data = bytes(data)
    header = _HEADER.pack(len(data))
    return b"".join(
        (header, _CRC.pack(masked_crc32c(header)), data, _CRC.pack(masked_crc32c(data)))
    )


def _step(step) -> int:
    # operator.index accepts numpy integers but refuses floats such as 1.5,
    # which the proto would otherwise reject with a less helpful TypeError.
    try:
        return operator.index(step)
    except TypeError:
        raise TypeError(f"step must be an integer, got {type(step).__name__}") from None


def _event(wall_time: float, step: int = 0) -> event_pb2.Event:
    return event_pb2.Event(wall_time=float(wall_time), step=_step(step))


def file_version_event(now: float) -> bytes:
    """Serialized Event announcing the file format; write it first."""
    event = _event(now)
    event.file_version = FILE_VERSION
    return event.SerializeToString()


def summary_event(summary: "summary_pb2.Summary", step: int, wall_time: float) -> bytes:
    """Serialized Event carrying ``summary`` at ``step``."""
    if not isinstance(summary, summary_pb2.Summary):
        raise TypeError(f"summary must be a summary_pb2.Summary, got {type(summary).__name__}")
    event = _event(wall_time, step)
    event.summary.CopyFrom(summary)
    return event.SerializeToString()


def session_log_event(
    status: str,
    step: int,
    wall_time: float,
    checkpoint_path: str = "",
    msg: str = "",
) -> bytes:
    """Serialized Event with a SessionLog (START, STOP or CHECKPOINT).

    TensorBoard treats START as "the job restarted at this step" and discards
    previously read data with a larger step, so only log START when a run
    (re)starts.
    """
    if status not in _SESSION_STATUSES:
        raise ValueError(f"session log status must be one of {_SESSION_STATUSES}, got {status!r}")
    event = _event(wall_time, step)
    event.session_log.status = event_pb2.SessionLog.SessionStatus.Value(status)
    event.session_log.checkpoint_path = checkpoint_path
    event.session_log.msg = msg
    return event.SerializeToString()


def graph_event(graph_def_bytes: bytes, step: int, wall_time: float) -> bytes:
    """Serialized Event carrying a serialized GraphDef."""
    if not isinstance(graph_def_bytes, (bytes, bytearray, memoryview)):
        raise TypeError(
            f"graph_def_bytes must be bytes, got {type(graph_def_bytes).__name__}"
        )
    graph_def_bytes = bytes(graph_def_bytes)
    # TensorBoard only parses the graph when the Graphs tab is opened, so a bad
    # blob would otherwise surface far from where it was written.
    try:
        graph_pb2.GraphDef.FromString(graph_def_bytes)
    except DecodeError as exc:
        raise ValueError(f"graph_def_bytes is not a serialized GraphDef: {exc}") from None
    event = _event(wall_time, step)
    event.graph_def = graph_def_bytes
    return event.SerializeToString()


def _read_exact(fileobj: BinaryIO, size: int) -> bytes:
    # Raw and socket-backed streams may return short reads before EOF.
    chunks = []
    remaining = size
    while remaining > 0:
        chunk = fileobj.read(remaining)
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def read_records(fileobj: BinaryIO) -> Iterator[bytes]:
    """Yield the payload of each TFRecord frame in ``fileobj``.

    Both CRCs are verified. A corrupt frame or a truncated trailing frame raises
    ValueError carrying the byte offset of the frame; a clean EOF between
    frames ends the iteration.
    """
    offset = 0
    while True:
        header = _read_exact(fileobj, _HEADER.size)
        if not header:
            return
        if len(header) < _HEADER.size:
            raise ValueError(f"truncated record header at offset {offset}")
        header_crc = _read_exact(fileobj, _CRC.size)
        if len(header_crc) < _CRC.size:
            raise ValueError(f"truncated record header at offset {offset}")
        if _CRC.unpack(header_crc)[0] != masked_crc32c(header):
            raise ValueError(f"corrupt record length (crc mismatch) at offset {offset}")
        (length,) = _HEADER.unpack(header)
        data = _read_exact(fileobj, length)
        data_crc = _read_exact(fileobj, _CRC.size)
        if len(data) < length or len(data_crc) < _CRC.size:
            raise ValueError(f"truncated record data at offset {offset}")
        if _CRC.unpack(data_crc)[0] != masked_crc32c(data):
            raise ValueError(f"corrupt record data (crc mismatch) at offset {offset}")
        offset += _HEADER.size + 2 * _CRC.size + length
        yield data
