"""What gets saved: the small save/restore protocol, and its two implementations.

A saver does two things:

* `snapshot()` copies the state to host memory and returns a `Snapshot`. This
  is the only part of a save that blocks the training loop, and it is a
  consistent copy: the values after the step being saved, none later.
* `restore(checkpoint)` loads a committed checkpoint back into the live state.

`TrackableSaver` handles a `tf.train.Checkpoint`, a Keras model or any TF
trackable (or a dict of them); its checkpoints are ordinary TF checkpoints, so
`tf.train.Checkpoint.restore` and `tf.train.load_checkpoint` read them.
`NumpySaver` handles a plain dict of numpy arrays, for tests and for users
without TensorFlow; it writes the same TF file format.

Snapshot buffers are pooled: the host copy of a 512 MB state goes into
buffers that were already paged in by the previous save, which is what keeps
the stall near a plain `memcpy`.
"""

import contextlib
import dataclasses
import os
import shutil
import tempfile
import threading
from typing import Callable, Dict, Mapping, Optional

import numpy as np

OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"


@dataclasses.dataclass
class Snapshot:
    """A host-memory copy of the state at one step."""

    tensors: Dict[str, object]
    nbytes: int
    release: Optional[Callable[[], None]] = None

    def done(self) -> None:
        """Gives the buffers back for reuse; call once the bytes are persisted."""
        release, self.release = self.release, None
        self.tensors = {}
        if release is not None:
            release()


class _BufferPool:
    """Reuses host buffers across saves, so a save does not page in fresh memory."""

    def __init__(self):
        self._free: Dict[tuple, list] = {}
        self._lock = threading.Lock()

    def take(self, key, shape, dtype) -> np.ndarray:
        with self._lock:
            free = self._free.get((key, shape, dtype))
            if free:
                return free.pop()
        return np.empty(shape, dtype)

    def give(self, key, arrays) -> None:
        with self._lock:
            for arr in arrays:
                self._free.setdefault((key, arr.shape, arr.dtype), []).append(arr)


def _read_in_place(trackable, key):
    """A CPU variable's current value without a copy, or None where that does not apply."""
    if not key.endswith("/.ATTRIBUTES/VARIABLE_VALUE"):
        return None
    read = getattr(trackable, "read_value_no_copy", None)
    device = getattr(trackable, "device", "") or ""
    if read is None or "CPU" not in device.upper():
        return None
    return read()


def _host_copy(value, pool: _BufferPool, pool_key, taken: list):
    """Copies one value into a pooled host buffer; strings stay Python objects."""
    if isinstance(value, (bytes, str)):
        return value, len(value)
    arr = value
    if hasattr(value, "numpy") and not isinstance(value, np.ndarray):
        device = getattr(value, "device", "") or ""
        if device and "CPU" not in device.upper():
            arr = value.numpy()  # from an accelerator this is already a fresh host copy
            if isinstance(arr, np.ndarray) and arr.dtype != object:
                return arr, arr.nbytes
        else:
            # `.numpy()` would copy; `_numpy()` is a view of the CPU buffer, copied once below.
            arr = value._numpy() if hasattr(value, "_numpy") else value.numpy()
    arr = np.asarray(arr)
    if arr.dtype == object:
        return arr.copy(), int(sum(len(x) for x in arr.ravel()))
    buf = pool.take(pool_key, arr.shape, arr.dtype)
    np.copyto(buf, arr, casting="no")
    taken.append(buf)
    return buf, buf.nbytes


class NumpySaver:
    """Saves and restores a dict of numpy arrays (keys are the checkpoint's tensor names)."""

    def __init__(self, arrays: Dict[str, np.ndarray]):
        if not isinstance(arrays, dict) or not all(isinstance(k, str) for k in arrays):
            raise TypeError("NumpySaver needs a dict with str keys, got %r" % type(arrays).__name__)
        self.arrays = arrays
        self._pool = _BufferPool()

    def snapshot(self) -> Snapshot:
        tensors, nbytes, taken = {}, 0, {}
        for key, value in self.arrays.items():
            bufs = taken.setdefault(key, [])
            tensors[key], n = _host_copy(value, self._pool, key, bufs)
            nbytes += n
        return Snapshot(tensors, nbytes, lambda: [self._pool.give(k, v) for k, v in taken.items()])

    def restore(self, checkpoint) -> None:
        values = checkpoint.read_tensors()
        missing = sorted(set(self.arrays) - set(values))
        if missing:
            raise ValueError("%s has no tensor %s; it was written from a different state"
                             % (checkpoint.url, ", ".join(missing)))
        for key, value in values.items():
            current = self.arrays.get(key)
            if isinstance(current, np.ndarray) and current.shape == value.shape \
                    and current.dtype == value.dtype and current.flags.writeable:
                current[...] = value  # in place, so references the user holds see the restore
            else:
                self.arrays[key] = value


class TrackableSaver:
    """Saves TF trackables (`tf.train.Checkpoint`, Keras models, variables) as a TF checkpoint."""

    def __init__(self, state):
        import tensorflow as tf
        if isinstance(state, tf.train.Checkpoint):
            self.checkpoint = state
        elif isinstance(state, Mapping):
            self.checkpoint = tf.train.Checkpoint(**state)
        else:
            self.checkpoint = tf.train.Checkpoint(root=state)
        self._pool = _BufferPool()

    def snapshot(self) -> Snapshot:
        saver = self.checkpoint._saver  # TF keeps the gather step private; it is stable since TF 2.10
        from tensorflow.python.training.saving.saveable_object import SaveSpec
        # Like tf.train.Checkpoint.save (a numbered checkpoint): count the save in
        # `save_counter`, so plain TF's restore(...).assert_existing_objects_matched() holds.
        create_counter = getattr(self.checkpoint, "_maybe_create_save_counter", None)
        if create_counter is not None:
            create_counter()
            self.checkpoint.save_counter.assign_add(1)
        serialized, _, registered, _ = saver._gather_serialized_tensors(None)
        if registered:
            raise ValueError("state uses TF registered savers (%s), which rayhooks cannot snapshot; "
                             "save those objects with a TF checkpoint of their own"
                             % ", ".join(sorted(map(str, registered))))
        tensors, nbytes, taken = {}, 0, {}
        for trackable, per_object in serialized.items():
            for key, value in per_object.items():
                if isinstance(value, Mapping):
                    raise ValueError("tensor %r is partitioned (slice specs %s); rayhooks saves whole "
                                     "tensors only" % (key, sorted(value)))
                if isinstance(value, SaveSpec):
                    # TF would read the variable through an identity op (a full
                    # copy); a plain variable is read in place instead, and
                    # `_host_copy` makes the one copy into a pooled buffer.
                    # (`value.tensor` is a property that runs the read: touch it
                    # only when the in-place read does not apply.)
                    direct = _read_in_place(trackable, key)
                    value = value.tensor if direct is None else direct
                elif callable(value):
                    value = value()
                bufs = taken.setdefault(key, [])
                tensors[key], n = _host_copy(value, self._pool, key, bufs)
                nbytes += n
        return Snapshot(tensors, nbytes, lambda: [self._pool.give(k, v) for k, v in taken.items()])

    def restore(self, checkpoint) -> None:
        # TF restores some variables later, when they are created (optimizer slots on the
        # first step), from the same files: a downloaded copy must outlive this call.
        self._staged = checkpoint.local_copy()
        self.checkpoint.restore(self._staged.prefix).expect_partial()


def as_saver(state):
    """The saver for `state`: a saver as is, a dict of arrays, or TF trackables."""
    if state is None:
        return None
    if hasattr(state, "snapshot") and hasattr(state, "restore") and callable(state.snapshot):
        return state
    if isinstance(state, dict) and state and all(isinstance(v, np.ndarray) for v in state.values()):
        return NumpySaver(state)
    if type(state).__module__.startswith("tensorflow.python.training.saver"):
        raise TypeError("a TF1 tf.compat.v1.train.Saver cannot run in TF2; pass the "
                        "tf.train.Checkpoint (or the model and optimizer) as state= instead")
    return TrackableSaver(state)


@contextlib.contextmanager
def staged_locally(storage, names, on_bytes=None):
    """Yields a local directory holding `names` from `storage` (no copy for a local URL)."""
    if storage.is_local:
        yield storage.local_root
        return
    tmp = tempfile.mkdtemp(prefix="rayhooks-restore-")
    try:
        for name in names:
            storage.get_to_local(name, os.path.join(tmp, name), on_bytes)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
