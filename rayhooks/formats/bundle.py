"""TensorFlow V2 checkpoint "tensor bundle" files, without TensorFlow.

A checkpoint with prefix ``P`` is two files:

``P.data-00000-of-00001``
    The raw bytes of every tensor, concatenated with no padding.  Numeric
    tensors are stored as their little-endian C-order buffer.  A ``DT_STRING``
    tensor of ``n`` elements is stored as ``n`` varint64 lengths, a 4-byte
    masked CRC-32C of the lengths (each length hashed as a little-endian
    uint32, or uint64 when it does not fit), then the string bytes.

``P.index``
    A LevelDB-format sorted string table ("SSTable") mapping tensor names to
    serialized ``BundleEntryProto`` (dtype, shape, offset, size, masked CRC-32C
    of the tensor), plus the empty key mapping to ``BundleHeaderProto``.  The
    table is a run of uncompressed blocks (prefix-compressed entries, restart
    offsets, and a 5-byte trailer of type byte plus masked CRC), followed by an
    empty metaindex block, an index block with one entry per data block, and a
    48-byte footer holding the two block handles and a magic number.

The writer reproduces ``tensorflow::BundleWriter`` byte for byte (with the
default block size), so files written here are indistinguishable from files
written by ``tf.train.Checkpoint``.  The small protobuf messages involved are
encoded by hand so that this module depends on neither TensorFlow nor protobuf.
"""

from __future__ import annotations

import math
import struct
from typing import Iterable, Iterator, Mapping

import google_crc32c
import numpy as np

try:  # bfloat16 needs ml_dtypes; the format works without it.
    import ml_dtypes as _ml_dtypes
except ImportError:  # pragma: no cover - depends on the environment
    _ml_dtypes = None

__all__ = ["BundleWriter", "data_filename", "index_filename", "read_bundle", "read_index",
           "write_bundle"]

_DT_STRING = 7
# TensorFlow DataType enum values (tensorflow/core/framework/types.proto).
_NUMPY_BY_DT = {
    1: np.dtype(np.float32), 2: np.dtype(np.float64), 3: np.dtype(np.int32),
    4: np.dtype(np.uint8), 5: np.dtype(np.int16), 6: np.dtype(np.int8),
    8: np.dtype(np.complex64), 9: np.dtype(np.int64), 10: np.dtype(np.bool_),
    17: np.dtype(np.uint16), 18: np.dtype(np.complex128), 19: np.dtype(np.float16),
    22: np.dtype(np.uint32), 23: np.dtype(np.uint64),
}
if _ml_dtypes is not None:
    _NUMPY_BY_DT[14] = np.dtype(_ml_dtypes.bfloat16)
_DT_BY_NUMPY = {v: k for k, v in _NUMPY_BY_DT.items()}

# TF's table::Options default; matching it makes our index byte-identical.
DEFAULT_BLOCK_SIZE = 262144
_RESTART_INTERVAL = 16
_TABLE_MAGIC = 0xDB4775248B80FB57
_FOOTER_SIZE = 48
_HEADER = b"\x08\x01\x1a\x02\x08\x01"  # num_shards=1, LITTLE, version{producer=1}
# Bounded chunks keep the data hot in cache between the two CRC passes and the
# write, and keep each write() call reasonably sized for arbitrary sinks.
_CHUNK = 4 << 20


def data_filename(prefix: str) -> str:
    return prefix + ".data-00000-of-00001"


def index_filename(prefix: str) -> str:
    return prefix + ".index"


def _mask(crc: int) -> int:
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def _unmask(masked: int) -> int:
    rot = (masked - 0xA282EAD8) & 0xFFFFFFFF
    return ((rot >> 17) | (rot << 15)) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _read_varint(buf, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated or overlong varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7


# ---------------------------------------------------------------- protobuf --

def _pb_field(num: int, payload: bytes) -> bytes:
    return _varint(num << 3 | 2) + _varint(len(payload)) + payload


def _encode_entry(dt: int, shape: tuple, offset: int, size: int, crc: int) -> bytes:
    # proto3 omits default (zero) scalars; the shape message is always present,
    # even for scalars, because TF sets it via TensorShape::AsProto.
    dims = b"".join(_pb_field(2, b"\x08" + _varint(d) if d else b"") for d in shape)
    out = b"\x08" + _varint(dt) + _pb_field(2, dims)
    if offset:
        out += b"\x20" + _varint(offset)
    if size:
        out += b"\x28" + _varint(size)
    if crc:
        out += b"\x35" + struct.pack("<I", crc)
    return out


def _parse_pb(buf: bytes) -> dict[int, list]:
    fields: dict[int, list] = {}
    pos = 0
    while pos < len(buf):
        tag, pos = _read_varint(buf, pos)
        wire = tag & 7
        if wire == 0:
            val, pos = _read_varint(buf, pos)
        elif wire == 2:
            n, pos = _read_varint(buf, pos)
            val, pos = buf[pos:pos + n], pos + n
        elif wire in (1, 5):
            n = 8 if wire == 1 else 4
            val, pos = int.from_bytes(buf[pos:pos + n], "little"), pos + n
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos > len(buf):
            raise ValueError("truncated protobuf message")
        fields.setdefault(tag >> 3, []).append(val)
    return fields


def _decode_entry(value: bytes) -> dict:
    f = _parse_pb(value)
    one = lambda num, default=0: f.get(num, [default])[-1]  # noqa: E731  last one wins
    dims = _parse_pb(one(2, b"")).get(2, [])
    return {"dt": one(1), "shape": tuple(_parse_pb(d).get(1, [0])[-1] for d in dims),
            "shard_id": one(3), "offset": one(4), "size": one(5),
            "crc32c": _unmask(one(6)), "sliced": 7 in f}


# ------------------------------------------------------------------- table --

class _BlockBuilder:
    def __init__(self, restart_interval: int):
        self.interval = restart_interval
        self.buf = bytearray()
        self.restarts = [0]
        self.counter = 0
        self.last_key = b""

    def add(self, key: bytes, value: bytes) -> None:
        shared = 0
        if self.counter < self.interval:
            limit = min(len(key), len(self.last_key))
            while shared < limit and key[shared] == self.last_key[shared]:
                shared += 1
        else:
            self.restarts.append(len(self.buf))
            self.counter = 0
        self.buf += _varint(shared) + _varint(len(key) - shared) + _varint(len(value))
        self.buf += key[shared:] + value
        self.last_key = key
        self.counter += 1

    def size_estimate(self) -> int:
        return len(self.buf) + 4 * len(self.restarts) + 4

    def finish(self) -> bytes:
        tail = struct.pack(f"<{len(self.restarts) + 1}I", *self.restarts, len(self.restarts))
        return bytes(self.buf) + tail


def _shortest_separator(start: bytes, limit: bytes) -> bytes:
    n = min(len(start), len(limit))
    i = 0
    while i < n and start[i] == limit[i]:
        i += 1
    if i < n and start[i] < 0xFF and start[i] + 1 < limit[i]:
        return start[:i] + bytes([start[i] + 1])
    return start


def _short_successor(key: bytes) -> bytes:
    for i, b in enumerate(key):
        if b != 0xFF:
            return key[:i] + bytes([b + 1])
    return key


def _build_table(items: Iterable[tuple[bytes, bytes]], block_size: int) -> bytes:
    """Serializes sorted (key, value) pairs the way TF's TableBuilder does."""
    out = bytearray()

    def write_block(block: _BlockBuilder) -> bytes:
        contents = block.finish()
        handle = _varint(len(out)) + _varint(len(contents))
        crc = _mask(google_crc32c.extend(google_crc32c.value(contents), b"\x00"))
        out.extend(contents + b"\x00" + struct.pack("<I", crc))
        return handle

    data = _BlockBuilder(_RESTART_INTERVAL)
    index = _BlockBuilder(1)
    pending, last_key = None, b""
    for key, value in items:
        if pending is not None:
            index.add(_shortest_separator(last_key, key), pending)
            pending = None
        data.add(key, value)
        last_key = key
        if data.size_estimate() >= block_size:
            pending, data = write_block(data), _BlockBuilder(_RESTART_INTERVAL)
    if data.buf:
        pending = write_block(data)
    meta_handle = write_block(_BlockBuilder(_RESTART_INTERVAL))
    if pending is not None:
        index.add(_short_successor(last_key), pending)
    index_handle = write_block(index)
    footer = (meta_handle + index_handle).ljust(40, b"\x00")
    out += footer + struct.pack("<Q", _TABLE_MAGIC)
    return bytes(out)


def _read_block(table: bytes, handle: bytes, verify: bool) -> bytes:
    offset, pos = _read_varint(handle, 0)
    size, _ = _read_varint(handle, pos)
    if offset + size + 5 > len(table):
        raise ValueError("bundle index block handle points past the end of the file")
    contents = table[offset:offset + size]
    kind = table[offset + size]
    if verify:
        (stored,) = struct.unpack_from("<I", table, offset + size + 1)
        crc = google_crc32c.extend(google_crc32c.value(contents), bytes([kind]))
        if _unmask(stored) != crc:
            raise ValueError(f"bundle index block at offset {offset} is corrupt (crc mismatch)")
    if kind != 0:
        raise ValueError(f"unsupported bundle index block compression type {kind}")
    return contents


def _iter_block(block: bytes) -> Iterator[tuple[bytes, bytes]]:
    if len(block) < 4:
        raise ValueError("bundle index block too short")
    (num_restarts,) = struct.unpack_from("<I", block, len(block) - 4)
    end = len(block) - 4 - 4 * num_restarts
    if end < 0:
        raise ValueError("bundle index block has a bad restart array")
    pos, key = 0, b""
    while pos < end:
        shared, pos = _read_varint(block, pos)
        unshared, pos = _read_varint(block, pos)
        vlen, pos = _read_varint(block, pos)
        if shared > len(key) or pos + unshared + vlen > end:
            raise ValueError("bundle index block entry is corrupt")
        key = key[:shared] + block[pos:pos + unshared]
        pos += unshared
        yield key, block[pos:pos + vlen]
        pos += vlen


def _iter_table(table: bytes, verify: bool) -> Iterator[tuple[bytes, bytes]]:
    if len(table) < _FOOTER_SIZE:
        raise ValueError("bundle index is too short to hold a table footer")
    footer = table[-_FOOTER_SIZE:]
    if struct.unpack_from("<Q", footer, 40)[0] != _TABLE_MAGIC:
        raise ValueError("bundle index has a bad magic number (not a TF checkpoint index)")
    _, pos = _read_varint(footer, 0)
    _, pos = _read_varint(footer, pos)  # metaindex handle: always empty for bundles
    index = _read_block(table, footer[pos:], verify)
    for _, handle in _iter_block(index):
        yield from _iter_block(_read_block(table, handle, verify))


def _parse_index(index_bytes: bytes, verify: bool = True) -> tuple[dict, dict[str, dict]]:
    header: dict = {}
    entries: dict[str, dict] = {}
    for key, value in _iter_table(bytes(index_bytes), verify):
        if key == b"":
            f = _parse_pb(value)
            header = {"num_shards": f.get(1, [0])[-1], "endianness": f.get(2, [0])[-1]}
        else:
            entries[key.decode("utf-8", "surrogateescape")] = _decode_entry(value)
    return header, entries


def read_index(index_bytes: bytes) -> dict[str, dict]:
    """Maps each tensor name to its dtype, shape, offset, size and crc32c.

    ``crc32c`` is unmasked, i.e. as TF computes it; for numeric tensors it is
    the plain CRC-32C of ``size`` bytes at ``offset`` in the data file.
    ``dtype`` is None for dtypes numpy cannot represent (variant, resource,
    quantized; bfloat16 without ml_dtypes) and ``np.dtype(object)`` for strings.
    """
    _, entries = _parse_index(index_bytes)
    return {
        key: {"dtype": np.dtype(object) if e["dt"] == _DT_STRING else _NUMPY_BY_DT.get(e["dt"]),
              "shape": e["shape"], "offset": e["offset"], "size": e["size"],
              "crc32c": e["crc32c"]}
        for key, e in entries.items()
    }


# ------------------------------------------------------------------ writer --

def _string_elements(arr: np.ndarray, key: str) -> list[bytes]:
    out = []
    for item in arr.reshape(-1).tolist():
        if isinstance(item, str):
            item = item.encode("utf-8")
        elif not isinstance(item, (bytes, bytearray, memoryview)):
            raise TypeError(f"tensor {key!r}: string tensors need bytes or str elements, "
                            f"got {type(item).__name__}")
        out.append(bytes(item))
    return out


def _length_crc_input(n: int) -> bytes:
    # TF checksums each string length as a fixed-width integer, not the varint
    # it stores, and widens to 64 bits only when it must.
    return struct.pack("<I" if n <= 0xFFFFFFFF else "<Q", n)


def _length_prefix(strings: list[bytes]) -> tuple[bytes, int]:
    crc = google_crc32c.value(b"".join(_length_crc_input(len(s)) for s in strings))
    checksum = struct.pack("<I", _mask(crc))
    lengths = b"".join(_varint(len(s)) for s in strings)
    return lengths + checksum, google_crc32c.extend(crc, checksum)


# CRC-32C of a concatenation from the CRCs of its parts (zlib's crc32_combine, for the
# Castagnoli polynomial): each tensor's bytes are checksummed once, for its own entry,
# and the whole file's checksum is derived rather than computed in a second pass.
_POLY = 0x82F63B78  # reflected


def _multmodp(a: int, b: int) -> int:
    """a * b modulo the CRC polynomial (bit-reflected, x^0 at bit 31)."""
    m, p = 1 << 31, 0
    while True:
        if a & m:
            p ^= b
            if (a & (m - 1)) == 0:
                return p
        m >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1


def _x2n_table():
    table, p = [], 1 << 30  # x^1
    for _ in range(32):
        table.append(p)
        p = _multmodp(p, p)
    return table


_X2N = _x2n_table()
_SHIFTS: dict[int, int] = {}  # length -> x^(8 * length) mod p; chunk lengths repeat


def _shift(nbytes: int) -> int:
    op = _SHIFTS.get(nbytes)
    if op is None:
        op, n, k = 1 << 31, nbytes, 3
        while n:
            if n & 1:
                op = _multmodp(_X2N[k & 31], op)
            n >>= 1
            k += 1
        if len(_SHIFTS) < 4096:
            _SHIFTS[nbytes] = op
    return op


def crc32c_combine(crc1: int, crc2: int, len2: int) -> int:
    """The CRC-32C of A + B, given crc1 of A, crc2 of B and B's length."""
    return _multmodp(_shift(len2), crc1) ^ crc2 if len2 else crc1


class BundleWriter:
    """Streams a bundle: call add() for each tensor (any order), then finish()."""

    def __init__(self, data_file, index_file, *, block_size: int = DEFAULT_BLOCK_SIZE):
        self._data, self._index, self._block_size = data_file, index_file, block_size
        self._entries: dict[bytes, bytes] = {}  # key -> serialized BundleEntryProto
        self._offset = self._data_crc = 0
        self._finished = False

    def _write(self, chunk, crc=None) -> None:
        """Appends `chunk`; `crc`, its CRC-32C when the caller has it, saves a second pass."""
        n = len(chunk)
        if crc is None:
            self._data_crc = google_crc32c.extend(self._data_crc, chunk)
        else:
            self._data_crc = crc32c_combine(self._data_crc, crc, n)
        view = memoryview(chunk)
        # Raw (unbuffered) sinks may accept only part of a write.
        while True:
            written = self._data.write(view)
            if written is None or written >= len(view):
                break
            if written <= 0:
                raise OSError("bundle data file accepted no bytes")
            view = view[written:]
        self._offset += n

    def add(self, key: str, value) -> None:
        if self._finished:
            raise ValueError("BundleWriter.add() called after finish()")
        kb = key.encode("utf-8", "surrogateescape")
        if not kb:
            raise ValueError("the empty key is reserved for the bundle header")
        if kb in self._entries:
            raise ValueError(f"duplicate tensor key {key!r}")
        if isinstance(value, (bytes, bytearray, str)):
            value = np.array(value if isinstance(value, str) else bytes(value), dtype=object)
        arr = np.asarray(value)
        shape, offset = arr.shape, self._offset
        if arr.dtype.kind in "OSU":
            dt = _DT_STRING
            strings = _string_elements(arr, key)
            prefix, crc = _length_prefix(strings)
            payload = b"".join(strings)
            self._write(prefix)
            self._write(payload)
            crc = google_crc32c.extend(crc, payload)
        else:
            native = arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype
            dt = _DT_BY_NUMPY.get(native)
            if dt is None:
                raise TypeError(f"tensor {key!r}: dtype {arr.dtype} is not supported "
                                "in TF checkpoints")
            if native != arr.dtype or not arr.flags.c_contiguous:
                arr = np.ascontiguousarray(arr, dtype=native)
            flat = arr.reshape(-1).view(np.uint8)
            crc = 0
            for start in range(0, flat.size, _CHUNK):
                chunk = flat[start:start + _CHUNK]
                part = google_crc32c.value(chunk)
                crc = crc32c_combine(crc, part, chunk.size)
                self._write(chunk, part)
        self._entries[kb] = _encode_entry(dt, shape, offset, self._offset - offset,
                                          _mask(crc))

    def finish(self) -> dict:
        """Writes the index; returns sizes and plain CRC-32C of both files."""
        if self._finished:
            raise ValueError("BundleWriter.finish() called twice")
        self._finished = True
        items = [(b"", _HEADER)] + sorted(self._entries.items())
        index = _build_table(items, self._block_size)
        self._index.write(index)
        return {"data_bytes": self._offset, "index_bytes": len(index),
                "data_crc32c": self._data_crc, "index_crc32c": google_crc32c.value(index)}


def write_bundle(data_file, index_file, tensors: Mapping[str, object]) -> dict:
    writer = BundleWriter(data_file, index_file)
    for key, value in tensors.items():
        writer.add(key, value)
    return writer.finish()


# ------------------------------------------------------------------ reader --

def _targets(entries, wanted, into) -> dict:
    """`into`'s arrays to read in place: all of them where each fits its tensor, else none."""
    targets = {}
    if any(key not in entries for key in into):
        return {}  # the caller refuses a checkpoint without one of its arrays: leave them all untouched
    for key in wanted:
        target, e = into.get(key), entries[key]
        if target is None:
            continue
        if e["dt"] == _DT_STRING:  # decoded into new objects anyway; a misfit is refused, so read nothing in place
            if isinstance(target, np.ndarray) and (target.shape != tuple(e["shape"])
                                                   or target.dtype.kind not in "USO"):
                return {}
            continue
        dtype = _NUMPY_BY_DT.get(e["dt"])
        if not isinstance(target, np.ndarray) or dtype is None or target.dtype != dtype \
                or target.shape != tuple(e["shape"]) or not target.flags.c_contiguous \
                or not target.flags.writeable or e["size"] != target.nbytes:
            return {}
        targets[key] = target
    return targets


def _read_exact(f, offset: int, size: int, key: str, buf=None) -> np.ndarray:
    """`size` bytes at `offset`, into `buf` (uint8, that size) or a new array."""
    buf = np.empty(size, np.uint8) if buf is None else buf
    f.seek(offset)
    pos = 0
    readinto = getattr(f, "readinto", None)
    while pos < size:
        if readinto is not None:
            n = readinto(memoryview(buf)[pos:])
        else:
            chunk = f.read(size - pos)
            n = len(chunk)
            buf[pos:pos + n] = np.frombuffer(chunk, np.uint8)
        if not n:
            raise ValueError(f"tensor {key!r}: data file is truncated "
                             f"(wanted {size} bytes at offset {offset})")
        pos += n
    return buf


def _decode_strings(raw: bytes, count: int, key: str, verify: bool) -> tuple[list[bytes], int]:
    pos, crc, lengths = 0, 0, []
    try:
        for _ in range(count):
            n, pos = _read_varint(raw, pos)
            lengths.append(n)
            crc = google_crc32c.extend(crc, _length_crc_input(n))
    except ValueError:
        raise ValueError(f"tensor {key!r}: corrupt string lengths") from None
    start = pos + 4
    if start + sum(lengths) != len(raw):
        raise ValueError(f"tensor {key!r}: string lengths do not match the entry size")
    checksum = raw[pos:start]
    if verify and _unmask(struct.unpack("<I", checksum)[0]) != crc:
        raise ValueError(f"tensor {key!r}: string length checksum mismatch")
    crc = google_crc32c.extend(google_crc32c.extend(crc, checksum), raw[start:])
    out = []
    for n in lengths:
        out.append(raw[start:start + n])
        start += n
    return out, crc


def read_bundle(index_bytes: bytes, data_file, keys=None, verify=True, into=None) -> dict[str, np.ndarray]:
    """Reads tensors (all, or those named in ``keys``) from a single-shard bundle.

    Strings come back as object arrays of bytes; scalars as 0-d arrays.  With
    ``verify`` the stored CRC-32C of every tensor (and of every index block) is
    checked, raising ValueError naming the key on mismatch.

    ``into`` maps names to arrays to read into in place, saving a copy. Where
    every name is in the bundle and every array fits its tensor (a writeable
    C-contiguous array of its dtype and shape; a string tensor's a str, bytes
    or object array of its shape), each numeric tensor is read straight into
    its array, which is returned for it; otherwise nothing is read in place.
    An error part way then leaves those arrays partly overwritten.
    """
    header, entries = _parse_index(index_bytes, verify)
    if header.get("num_shards", 1) != 1 or header.get("endianness", 0) != 0:
        raise ValueError("only single-shard little-endian bundles are supported")
    if keys is None:
        wanted = list(entries)
    else:
        wanted = list(keys)
        missing = [k for k in wanted if k not in entries]
        if missing:
            raise KeyError(f"tensors not in bundle: {missing}")
    targets = _targets(entries, wanted, into) if into else {}
    result: dict[str, np.ndarray] = {}
    # Reading in file order keeps access sequential for buffered or remote files.
    for key in sorted(wanted, key=lambda k: entries[k]["offset"]):
        e = entries[key]
        dt, shape, size = e["dt"], e["shape"], e["size"]
        if e["sliced"] or e["shard_id"] != 0:
            raise ValueError(f"tensor {key!r} is partitioned, which is not supported")
        count = math.prod(shape)
        if dt == _DT_STRING:
            # TF writes a length checksum even for zero elements; tolerate its
            # absence, since an empty tensor has nothing to protect.
            if size == 0 and count == 0:
                strings, crc = [], 0
            else:
                raw = _read_exact(data_file, e["offset"], size, key).tobytes()
                strings, crc = _decode_strings(raw, count, key, verify)
            arr = np.empty(count, dtype=object)
            arr[:] = strings
            arr = arr.reshape(shape)
        else:
            dtype = _NUMPY_BY_DT.get(dt)
            if dtype is None:
                raise ValueError(f"tensor {key!r} has unsupported TF dtype enum {dt}")
            if size != count * dtype.itemsize:
                raise ValueError(f"tensor {key!r}: entry size {size} does not match "
                                 f"shape {shape} of {dtype}")
            target = targets.get(key)
            buf = _read_exact(data_file, e["offset"], size, key,
                              None if target is None else target.reshape(-1).view(np.uint8))
            crc = google_crc32c.value(buf) if verify else 0
            arr = buf.view(dtype).reshape(shape) if target is None else target
        if verify and crc != e["crc32c"]:
            raise ValueError(f"tensor {key!r}: checksum mismatch (stored "
                             f"{e['crc32c']:08x}, computed {crc:08x})")
        result[key] = arr
    return result
