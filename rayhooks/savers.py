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
the stall near a plain `memcpy`. From 16 MB on, a second thread copies half
the bytes (numpy drops the GIL while it copies), where the process may use
two cores.

`TrackableSaver` also keeps what TF's gather step found (the object graph
proto, the checkpoint keys, which variables to read) in a `_SnapshotPlan`, as
long as the object graph keeps its shape: every save walks the graph (nodes,
named edges, optimizer slot variables, compared by identity) and gathers again
only when something changed. Gathering costs about 1 ms and ~0.1 ms of eager
ops per variable, which on a 64 MB state is most of the gap to the `memcpy`.
From 16 variables on, the plan's reads also run as one TF function, traced on
a background thread when a save first reuses the plan (about 2 s for 500
variables, once per plan): ~4 us a variable where two eager ops cost ~40 us.
Its copies go into buffers the plan reuses as one set per snapshot in flight.
"""

import contextlib
import dataclasses
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from typing import Callable, Dict, Mapping, Optional

import numpy as np

logger = logging.getLogger("rayhooks")

_final = threading.local()


@contextlib.contextmanager
def final_snapshot():
    """Snapshots taken inside are a run's last (its end, a preemption): they prepare nothing for later saves."""
    before = getattr(_final, "on", False)
    _final.on = True
    try:
        yield
    finally:
        _final.on = before

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


_SPLIT_BYTES = 16 << 20  # from this many bytes a snapshot's copies are shared with a second thread
_copier = None
_copier_lock = threading.Lock()


def _copy_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _copy_all(pairs, nbytes: int) -> None:
    """`np.copyto(dst, src)` for each pair; from `_SPLIT_BYTES` on, half the bytes on a second thread.

    The training loop waits for this copy, so a second core halves the wait
    where memory bandwidth allows (numpy drops the GIL while it copies). The
    pair that straddles the halfway mark is split, so one large array is
    shared too.
    """
    global _copier
    if nbytes < _SPLIT_BYTES or _copy_threads() < 2:
        _copy_pairs(pairs)
        return
    half, done, mine = nbytes // 2, 0, []
    for i, (dst, src) in enumerate(pairs):
        if done + dst.nbytes <= half:
            mine.append((dst, src))
            done += dst.nbytes
            continue
        theirs = pairs[i + 1:]
        cut = (half - done) // max(dst.itemsize, 1)
        if cut and dst.flags.c_contiguous and src.flags.c_contiguous:
            flat_dst, flat_src = dst.reshape(-1), src.reshape(-1)  # views: both are contiguous
            mine.append((flat_dst[:cut], flat_src[:cut]))
            theirs = [(flat_dst[cut:], flat_src[cut:])] + list(theirs)
        else:
            theirs = [(dst, src)] + list(theirs)
        break
    else:
        theirs = []
    with _copier_lock:
        if _copier is None:
            import concurrent.futures
            _copier = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="rayhooks-copy")
        copier = _copier
    try:
        other = copier.submit(_copy_pairs, theirs) if theirs else None
    except RuntimeError:  # the interpreter is exiting (an atexit or late save): no new threads
        other, mine = None, mine + list(theirs)
    try:
        _copy_pairs(mine)
    finally:
        if other is not None:
            other.result()  # also when this thread's half failed: the buffers must be quiet before reuse


def _copy_pairs(pairs) -> None:
    for dst, src in pairs:
        np.copyto(dst, src, casting="no")


def _forget_copier() -> None:
    # A forked child has the executor but not its thread: submitting there would wait forever.
    global _copier, _copier_lock
    _copier, _copier_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_copier)


def _read_in_place(trackable, key):
    """A CPU variable's current value without a copy, or None where that does not apply."""
    if not key.endswith("/.ATTRIBUTES/VARIABLE_VALUE"):
        return None
    read = getattr(trackable, "read_value_no_copy", None)
    device = getattr(trackable, "device", "") or ""
    if read is None or "CPU" not in device.upper():
        return None
    return read()


def _resolve(trackable, key, value):
    """The tensor behind one entry of TF's gather: a SaveSpec or callable is read now."""
    from tensorflow.python.training.saving.saveable_object import SaveSpec
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
        return value.tensor if direct is None else direct
    if callable(value):
        return value()
    return value


def _host_copy(value, pool: _BufferPool, pool_key, taken: list, pairs: Optional[list] = None):
    """Copies one value into a pooled host buffer; strings stay Python objects.

    With `pairs`, a numeric copy is left to the caller (`_copy_all`): the
    (buffer, source) pair is appended there instead.
    """
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
    if isinstance(arr, bytes):
        # TF gives a scalar string tensor as bytes. np.asarray would make it a fixed-width
        # "S" array, whose items drop trailing NUL bytes: a serialized object graph
        # ending in an empty submessage (b"...\x2a\x00") would be written truncated.
        return np.array(arr, dtype=object), len(arr)
    arr = np.asarray(arr)
    if arr.dtype == object:
        return arr.copy(), int(sum(len(x) for x in arr.ravel()))
    buf = pool.take(pool_key, arr.shape, arr.dtype)
    if pairs is None:
        np.copyto(buf, arr, casting="no")
    else:
        pairs.append((buf, arr))
    taken.append(buf)
    return buf, buf.nbytes


class NumpySaver:
    """Saves and restores a dict of numpy arrays (keys are the checkpoint's tensor names)."""

    def __init__(self, arrays: Dict[str, np.ndarray]):
        if not isinstance(arrays, dict):
            raise TypeError("NumpySaver needs a dict with str keys, got a %s" % type(arrays).__name__)
        key = next((k for k in arrays if not isinstance(k, str)), "")
        if key != "":
            raise TypeError("NumpySaver needs a dict with str keys (the checkpoint's tensor names), got the key %r"
                            % (key,))
        kind = next((k for k, v in arrays.items() if isinstance(v, np.ndarray) and v.dtype.hasobject
                     and not all(isinstance(x, (str, bytes)) for x in v.ravel())), None)
        if kind is not None:
            raise TypeError("NumpySaver: arrays[%r] holds Python objects other than strings (dtype object), "
                            "which a checkpoint cannot store; give it a numeric, bool or str dtype" % (kind,))
        self.arrays = arrays
        self._pool = _BufferPool()

    def snapshot(self) -> Snapshot:
        tensors, nbytes, taken, pairs = {}, 0, {}, []
        for key, value in self.arrays.items():
            bufs = taken.setdefault(key, [])
            tensors[key], n = _host_copy(value, self._pool, key, bufs, pairs)
            nbytes += n
        _copy_all(pairs, sum(dst.nbytes for dst, _ in pairs))
        return Snapshot(tensors, nbytes, lambda: [self._pool.give(k, v) for k, v in taken.items()])

    def restore(self, checkpoint) -> None:
        # Straight into the arrays where they fit (one copy fewer); a misfit reads into new ones, refused below.
        values = checkpoint.read_tensors(into=self.arrays)
        missing = sorted(set(self.arrays) - set(values))
        if missing:
            raise ValueError("%s has no tensor %s; it was written from a different state"
                             % (checkpoint.url, ", ".join(missing)))
        differ = ["%r: %s %s saved, %s %s here" % (key, value.shape, value.dtype, self.arrays[key].shape,
                                                      self.arrays[key].dtype)
                  for key, value in values.items() if key in self.arrays
                  and isinstance(self.arrays[key], np.ndarray)
                  and (self.arrays[key].shape != value.shape  # strings come back as objects: their shape only
                       or value.dtype != object and self.arrays[key].dtype != value.dtype
                       or value.dtype == object and self.arrays[key].dtype.kind not in "USO")]
        if differ:
            # Swapping in the saved array instead would train the user's array from its initial
            # values while every later checkpoint saved the swapped-in, frozen one.
            raise ValueError("%s does not fit the state it is restored into (%s); pass arrays of the shapes "
                             "and dtypes that saved it" % (checkpoint.url, "; ".join(differ)))
        for key, value in values.items():
            current = self.arrays.get(key)
            if value is current:
                continue  # read in place
            if isinstance(current, np.ndarray) and current.dtype.kind in "US" and value.dtype == object:
                value = _fixed_width(key, value, current.dtype.kind, checkpoint.url)
                if value.itemsize > current.itemsize:
                    # Assigning into the narrower array would cut every string short, silently.
                    self.arrays[key] = value
                    continue
            if isinstance(current, np.ndarray) and current.flags.writeable and current.dtype != object:
                current[...] = value  # in place, so references the user holds see the restore
            else:
                self.arrays[key] = value


def _fixed_width(key, value, kind: str, url: str) -> np.ndarray:
    """Restored strings (an object array of bytes) as a numpy `U` (UTF-8 decoded) or `S` array, as wide as needed."""
    if kind == "S":
        return np.array(value.tolist(), dtype="S").reshape(value.shape)
    try:
        return np.array([b.decode("utf-8") for b in value.ravel()], dtype="U").reshape(value.shape)
    except UnicodeDecodeError as e:
        raise ValueError("%s: tensor %r holds bytes that are not UTF-8 (%s), which a str array cannot hold; "
                         "restore it into an array of dtype bytes ('S') or object" % (url, key, e)) from None


class TrackableSaver:
    """Saves TF trackables (`tf.train.Checkpoint`, Keras models, variables) as a TF checkpoint."""

    def __init__(self, state):
        import tensorflow as tf
        if isinstance(state, tf.train.Checkpoint):
            self.checkpoint = state
        elif isinstance(state, Mapping):
            _check_state(state)
            self.checkpoint = tf.train.Checkpoint(**state)
        else:
            _check_state(state)
            self.checkpoint = tf.train.Checkpoint(root=state)
        self._pool = _BufferPool()
        self._plan: Optional[_SnapshotPlan] = None
        self._one = None  # the constant 1 added to save_counter

    def snapshot(self) -> Snapshot:
        saver = self.checkpoint._saver  # TF keeps the gather step private; it is stable since TF 2.10
        # Like tf.train.Checkpoint.save (a numbered checkpoint): count the save in
        # `save_counter`, so plain TF's restore(...).assert_existing_objects_matched() holds.
        # (Before the graph is walked: the first save creates the counter.)
        create_counter = getattr(self.checkpoint, "_maybe_create_save_counter", None)
        if create_counter is not None:
            create_counter()
            self._count_save(self.checkpoint.save_counter)
        if not _plan_applies(saver):
            self._replace_plan(None)
            return self._gather(saver, self._pool)[0]
        nodes, edges = _walk(saver._graph_view)
        plan = self._plan
        if plan is not None and plan.fits(nodes, edges):
            if plan.steps is None:  # a graph TF gathers in a way the plan cannot replay
                return self._gather(saver, self._pool)[0]
            snapshot = plan.snapshot(self._pool)
            if snapshot is not None:
                return snapshot
        owners = tuple(i for i, node in enumerate(nodes) if _owns_slots(node))
        slots = _slot_variables(nodes, owners)
        self._replace_plan(None)  # first, so this gather finds the old plan's buffers in the pool
        snapshot, serialized = self._gather(saver, self._pool)
        self._plan = _SnapshotPlan.build(saver, nodes, edges, owners, slots, serialized)
        return snapshot

    def _replace_plan(self, plan) -> None:
        old, self._plan = self._plan, plan
        if old is not None and old is not plan:
            old.retire(self._pool)  # its buffers go back to the pool, warm for whatever reads next

    def _count_save(self, counter) -> None:
        from tensorflow.python.ops import gen_resource_variable_ops, resource_variable_ops
        if type(counter) is not resource_variable_ops.ResourceVariable:  # e.g. a distributed variable
            counter.assign_add(1, read_value=False)
            return
        if self._one is None or self._one.dtype != counter.dtype:
            import tensorflow as tf
            self._one = tf.constant(1, counter.dtype)
        # What assign_add runs, without its Python layers (~50 us a save).
        gen_resource_variable_ops.assign_add_variable_op(counter.handle, self._one)

    @staticmethod
    def _gather(saver, pool):
        """A snapshot through TF's own gather step; also returns what the gather found."""
        serialized, _, registered, _ = saver._gather_serialized_tensors(None)
        if registered:
            raise ValueError("state uses TF registered savers (%s), which rayhooks cannot snapshot; "
                             "save those objects with a TF checkpoint of their own"
                             % ", ".join(sorted(map(str, registered))))
        tensors, nbytes, taken = {}, 0, {}
        for trackable, per_object in serialized.items():
            for key, value in per_object.items():
                bufs = taken.setdefault(key, [])
                tensors[key], n = _host_copy(_resolve(trackable, key, value), pool, key, bufs)
                nbytes += n
        return Snapshot(tensors, nbytes, lambda: [pool.give(k, v) for k, v in taken.items()]), serialized

    def restore(self, checkpoint) -> None:
        # TF restores some variables later, when they are created (optimizer slots on the
        # first step), from the same files: a downloaded copy must outlive this call.
        import tensorflow as tf
        self._staged = checkpoint.local_copy()
        try:
            status = self.checkpoint.restore(self._staged.prefix).expect_partial()
        except (ValueError, tf.errors.InvalidArgumentError) as e:  # a shape or dtype that changed
            raise ValueError("%s does not fit the state it is restored into (%s); pass a state of the shapes "
                             "and dtypes that saved it" % (checkpoint.url, _shortened(e))) from e
        # ... and as long as TF may read them: its restore coordinator, which those later restores hold,
        # keeps the copy too. A saver made for one restore (`CommittedCheckpoint.restore`) goes at once.
        coordinator = getattr(status, "_checkpoint", None)
        if coordinator is not None:
            with contextlib.suppress(AttributeError):
                coordinator._rayhooks_local_copy = self._staged
        try:
            # Every object the state already holds must find its values: a state whose
            # structure differs from the checkpoint's (state=model where the run saved
            # tf.train.Checkpoint(model=...), a renamed attribute) would otherwise train
            # from fresh weights under the restored step. Values the state does not hold
            # (an optimizer, when restoring into an evaluation model) are fine.
            status.assert_existing_objects_matched()
        except AssertionError as e:
            raise ValueError("%s does not match the state it is restored into (%s); pass the same "
                             "structure that saved it" % (checkpoint.url, _shortened(e))) from None


def _shortened(error, limit: int = 600) -> str:
    # TF's messages can hold whole variables' values (its objects' reprs).
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[:limit] + " ..."


_STATE_RULE = ("state= takes TF trackables (a tf.train.Checkpoint, a Keras model or optimizer, tf.Variables, "
               "or a dict of them), or a flat dict of numpy arrays with str keys")


def _check_state(state) -> None:
    """Refuses what a TF checkpoint would silently leave out (numpy arrays in a nested dict) or
    refuse in its own words (a number in the dict, a list as the whole state)."""
    if isinstance(state, (list, tuple)):
        raise TypeError("state= is a %s; %s: name its items, state={'v0': ..., 'v1': ...}"
                        % (type(state).__name__, _STATE_RULE))
    if isinstance(state, Mapping) and state and all(isinstance(v, np.ndarray) or np.isscalar(v)
                                                    for v in state.values()):
        key = next((k for k, v in state.items() if not isinstance(v, np.ndarray)), None)
        if key is None:
            raise TypeError("a %s of numpy arrays is NumpySaver's to save, not TrackableSaver's: pass a dict "
                            "(state=dict(...), or rh.NumpySaver(dict(...)))" % type(state).__name__)
        raise TypeError("state[%r] is a %s: a dict of numpy arrays needs every value an array (and str keys); "
                        "pass np.asarray(...) for it" % (key, type(state[key]).__name__))
    _check_trackables(state, "state")


def _check_trackables(value, where: str) -> None:
    from tensorflow.python.trackable import base
    if isinstance(value, base.Trackable):
        return
    if isinstance(value, (Mapping, list, tuple)):  # TF tracks what they hold, at any depth
        for key, item in value.items() if isinstance(value, Mapping) else enumerate(value):
            _check_trackables(item, "%s[%r]" % (where, key))
        return
    if where == "state":
        raise TypeError("state= is a %s, which is not a TF trackable; %s" % (type(value).__name__, _STATE_RULE))
    if where.count("[") == 1:  # a value of the dict itself
        fix = "make every value of the dict a numpy array, or wrap this one in tf.Variable(...)"
    else:
        fix = ("flatten the nested dicts and lists into one dict with str keys (e.g. 'params/w'), "
               "or hold the values in tf.Variables")
    raise TypeError("%s is a %s, which a TF checkpoint would not save; %s: %s"
                    % (where, type(value).__name__, _STATE_RULE, fix))


# -- the snapshot plan: TF's gather step, kept while the object graph keeps its shape --

_READ, _CALL, _LEGACY, _CONSTANT = "read", "call", "legacy", "constant"


def _plan_applies(saver) -> bool:
    """Whether `saver` gathers the way `_SnapshotPlan` replays: eagerly, with no TF-side caches or object map."""
    from tensorflow.python.eager import context
    return (context.executing_eagerly() and getattr(saver, "_cache", None) is None
            and getattr(saver, "_saveables_cache", None) is None and not getattr(saver, "_object_map", None)
            and hasattr(saver, "_graph_view"))


def _walk(graph_view):
    """The trackables in the order TF's breadth-first traversal numbers them, and every named edge.

    Mirrors `TrackableView._descendants_with_paths` (same children, same order),
    keeping the edges too: a second name for an object already seen changes the
    object graph proto without adding a node.
    """
    root = graph_view.root
    nodes, index, edges = [root], {id(root): 0}, []
    leaf = _leaf_test(graph_view)
    i = 0
    while i < len(nodes):
        if i and leaf(nodes[i]):
            edges.append(())
            i += 1
            continue
        row = []
        for name, child in graph_view.children(nodes[i]).items():
            j = index.get(id(child))
            if j is None:
                j = index[id(child)] = len(nodes)
                nodes.append(child)
            row.append((name, j))
        edges.append(tuple(row))
        i += 1
    return nodes, tuple(edges)


def _leaf_test(graph_view):
    """A test for trackables TF's traversal finds no children under, answered without asking them.

    Such an object (a plain variable: most of a model's nodes) keeps TF's own
    `_trackable_children` and has no dependencies; asking TF costs ~15 us a
    node, this ~1 us. A graph view of another kind is always asked.
    """
    from tensorflow.python.checkpoint import graph_view as graph_view_lib
    from tensorflow.python.trackable import base
    view = graph_view_lib.ObjectGraphView
    if type(graph_view).children is not view.children or type(graph_view).list_children is not view.list_children:
        return lambda trackable: False
    children, dependencies = base.Trackable._trackable_children, base.Trackable._checkpoint_dependencies

    def leaf(trackable):
        cls = type(trackable)
        if cls._trackable_children is not children or cls._checkpoint_dependencies is not dependencies:
            return False
        own = getattr(trackable, "__dict__", None)
        if own is None or "_trackable_children" in own:
            return False
        # As TF reads it (a proxy may keep it apart from the __dict__ it forwards); an
        # object TF has not initialised yet gets an empty dependency list when asked.
        return not getattr(trackable, "_self_unconditional_checkpoint_dependencies", None)
    return leaf


def _owns_slots(trackable) -> bool:
    # TF's test (checkpoint/util.py serialize_slot_variables): dir(), not hasattr(),
    # so a custom __getattr__ is not run.
    return "get_slot_names" in dir(trackable)


def _slot_variables(nodes, owners):
    """[(owner index, slot name, variable index, slot variable)], in the order TF numbers them."""
    found = []
    for o in owners:
        owner = nodes[o]
        for slot_name in owner.get_slot_names():
            for v, original in enumerate(nodes):
                try:
                    slot = owner.get_slot(original, slot_name)
                except (AttributeError, KeyError):
                    slot = None
                if slot is not None:
                    found.append((o, slot_name, v, slot))
    return found


def _slot_ids(slots):
    return [(o, name, v, id(slot)) for o, name, v, slot in slots]


def _reads_in_place(trackable, key, value) -> bool:
    """A CPU `tf.Variable` whose only tensor is its value: read with two eager ops, no TF wrappers."""
    from tensorflow.python.ops import resource_variable_ops
    from tensorflow.python.training.saving.saveable_object import SaveSpec
    base = resource_variable_ops.BaseResourceVariable
    if not isinstance(trackable, base) or type(trackable)._serialize_to_tensors is not base._serialize_to_tensors \
            or "_serialize_to_tensors" in getattr(trackable, "__dict__", {}):
        return False
    if not isinstance(value, SaveSpec) or not key.endswith("/.ATTRIBUTES/VARIABLE_VALUE"):
        return False
    if trackable.dtype.name in ("variant", "resource"):
        return False
    return "CPU" in (getattr(trackable, "device", "") or "").upper()


_BATCH_READS = 16  # from this many variable reads a save, they run as one TF function (below it eager ops cost less)
_SMALL_BYTES = 64 << 10  # copied in about the time of one eager op (~25 us)


def _is_large(variable) -> bool:
    """Whether a variable may hold more than `_SMALL_BYTES` (unknown shapes and strings, size 0, may)."""
    shape, itemsize = variable.shape, variable.dtype.size
    return not shape.is_fully_defined() or itemsize == 0 or shape.num_elements() * itemsize > _SMALL_BYTES


def _keras_inner_variable(trackable):
    """The tf.Variable inside a Keras 3 variable (TensorFlow backend), or None.

    Such a variable checkpoints as `self.value._serialize_to_tensors()`: the
    inner tf.Variable's. Keras is not imported here; if it is not loaded, the
    state holds no Keras variable.
    """
    core = sys.modules.get("keras.src.backend.tensorflow.core")
    cls = getattr(core, "Variable", None)
    if cls is None or not isinstance(trackable, cls) or "_serialize_to_tensors" in vars(trackable) \
            or type(trackable)._serialize_to_tensors is not cls._serialize_to_tensors:
        return None
    from tensorflow.python.ops import resource_variable_ops
    inner = trackable.value
    return inner if isinstance(inner, resource_variable_ops.BaseResourceVariable) else None


def _never_has_tensors(trackable) -> bool:
    """A legacy trackable (no `_serialize_to_tensors`) that can never give a tensor: a container."""
    from tensorflow.python.checkpoint import saveable_compat
    from tensorflow.python.trackable import base
    from tensorflow.python.training.saving import saveable_object_util
    if saveable_object_util.trackable_has_serialize_to_tensor(trackable) \
            or saveable_compat.get_saveable_name(trackable):
        return False
    gather = "_gather_saveables_for_checkpoint"
    return getattr(type(trackable), gather, None) is getattr(base.Trackable, gather) \
        and gather not in getattr(trackable, "__dict__", {})


def _read_variables(handles, dtypes):
    """Inside a TF function: every variable's value, aliasing its buffer, by one op where TF has it.

    TF's `_ReadVariablesOp` (the op XLA clusters read through) reads them all in
    one kernel: ~2 us a variable, where a `ReadVariableOp` each costs the
    executor ~4 us more. A TF without it gets one `ReadVariableOp` each.
    """
    from tensorflow.core.framework import attr_value_pb2
    from tensorflow.python.framework import op_def_registry, ops
    from tensorflow.python.ops import gen_resource_variable_ops
    if op_def_registry.get("_ReadVariablesOp") is None:
        return [gen_resource_variable_ops.read_variable_op(h, d) for h, d in zip(handles, dtypes)]
    types = attr_value_pb2.AttrValue(list=attr_value_pb2.AttrValue.ListValue(
        type=[d.as_datatype_enum for d in dtypes]))
    op = ops.get_default_graph().create_op(
        "_ReadVariablesOp", list(handles), list(dtypes), name="read_variables",
        attrs={"N": attr_value_pb2.AttrValue(i=len(handles)), "dtypes": types})
    return list(op.outputs)


class _SnapshotPlan:
    """What one TF gather of the object graph found, replayed while the graph keeps its shape.

    The shape is what the object graph proto and the checkpoint keys are made
    of: the trackables in TF's traversal order, the named edges between them and
    the optimizers' slot variables, all compared by identity. The plan holds
    strong references to those objects, so an id it compares cannot be reused
    by a new object while the plan lives.

    Each save then does only the reads: a CPU `tf.Variable` (or the one inside a
    Keras variable) with at most two eager ops (`DisableCopyOnRead`,
    `ReadVariableOp`, whose result aliases the variable's buffer), or all of
    them in one call of a traced function, copied straight into a pooled
    buffer; any other trackable through its own `_serialize_to_tensors` (a TF1-style one through the SaveableObjects TF makes
    for it), checked to give the keys it gave before, else TF gathers again.
    """

    def __init__(self, nodes, edges, owners, slots, steps):
        self.nodes = nodes
        self.ids = tuple(map(id, nodes))
        self.edges = edges
        self.owners = owners
        self.slots = slots
        self.slot_ids = _slot_ids(slots)
        self.steps = steps  # [(kind, key or trackable data, what)], in TF's order; None: gather every time
        self.reads = [(key, source[2], source[3], source[4]) for kind, key, source in steps or () if kind == _READ]
        self._read_all = None  # once traced: one TF function making every read
        # Traced when the plan is first reused, not when made: the first plan of a
        # run often lasts one save (optimizer slots appear at the first step).
        self._trace_due = len(self.reads) >= _BATCH_READS
        self.trace_idle = threading.Event()  # clear while the trace runs
        self.trace_idle.set()
        self.trace_secs = None
        # Buffer generations: each holds one snapshot's copies of the reads, reused as a
        # whole (one lock a save, not one a variable) once that snapshot is persisted.
        self._gens = []
        self._gen_lock = threading.Lock()
        self.retired = False

    def _start_trace(self) -> None:
        self._trace_due = False
        self.trace_idle.clear()
        try:
            # Not a daemon: interpreter shutdown must not catch it inside TF.
            threading.Thread(target=self._trace_reads, name="rayhooks-snapshot-trace").start()
        except RuntimeError:  # no thread to be had (interpreter shutting down, thread limit): stay eager
            self.trace_idle.set()

    def _trace_reads(self) -> None:
        """Makes `_read_all`: tracing and the first call take ~2 s for 500 variables, here off the loop."""
        import tensorflow as tf
        from tensorflow.python.framework import ops
        from tensorflow.python.ops import gen_resource_variable_ops

        def read_all():
            disabled = [gen_resource_variable_ops.disable_copy_on_read(handle)
                        for _, handle, _, large in self.reads if large]
            with ops.control_dependencies(disabled):
                return _read_variables([handle for _, handle, _, _ in self.reads],
                                       [dtype for _, _, dtype, _ in self.reads])
        started = time.perf_counter()
        try:
            fn = tf.function(read_all, autograph=False).get_concrete_function()
            fn()  # the first call instantiates the function's graph
            self._read_all = fn
        except Exception:  # the reads stay eager ops
            logger.debug("rayhooks: batching %d variable reads failed", len(self.reads), exc_info=True)
        finally:
            self.trace_secs = time.perf_counter() - started
            self.trace_idle.set()

    def fits(self, nodes, edges) -> bool:
        """Whether the graph still has the shape the plan was made for."""
        if tuple(map(id, nodes)) != self.ids or edges != self.edges:
            return False
        return _slot_ids(_slot_variables(nodes, self.owners)) == self.slot_ids

    @classmethod
    def build(cls, saver, nodes, edges, owners, slots, serialized):
        """The plan for a graph TF just gathered; one with no steps where it cannot be replayed."""
        from tensorflow.python.checkpoint import save_util, saveable_compat
        from tensorflow.python.trackable import python_state
        from tensorflow.python.training.saving import saveable_object_util
        from tensorflow.python.util import object_identity

        def unplanned():
            return cls(nodes, edges, owners, slots, None)

        helpers = ("_gather_trackable_data", "_get_tensors_from_trackable", "_get_tensors_from_legacy_saveable")
        if not all(hasattr(save_util, name) for name in helpers):
            return unplanned()  # a TF whose private gather helpers moved: gather every time
        data, _ = save_util._gather_trackable_data(saver._graph_view, saver._object_map)
        walked = list(nodes) + [slot for _, _, _, slot in slots]
        if len(data) != len(walked) or any(td.trackable is not node for td, node in zip(data, walked)):
            return unplanned()  # TF numbers the graph differently than `_walk`: do not guess
        by_object = object_identity.ObjectIdentityDictionary()
        for trackable, per_object in serialized.items():
            if isinstance(trackable, saveable_object_util.SaveableCompatibilityConverter):
                trackable = getattr(trackable, "_obj", None)  # a legacy saveable's tensors, by its object
            if trackable is not None:
                by_object[trackable] = per_object
        steps, python_steps = [], []
        for td in data:
            obj = td.object_to_save
            if _never_has_tensors(obj):
                continue
            if obj not in by_object:
                return unplanned()
            per_object = by_object[obj]
            if not saveable_object_util.trackable_has_serialize_to_tensor(obj) \
                    or saveable_compat.get_saveable_name(obj):
                steps.append((_LEGACY, td, tuple(per_object)))  # as TF: SaveableObjects, made again per save
                continue
            if len(per_object) == 1:
                (key, value), = per_object.items()
                inner = _keras_inner_variable(obj)
                holder, variable = (None, obj) if inner is None else (obj, inner)
                if _reads_in_place(variable, key, value):
                    steps.append((_READ, key, (holder, variable, variable.handle, variable.dtype,
                                               _is_large(variable))))
                    continue
            step = (_CALL, td, tuple(per_object))
            (python_steps if isinstance(obj, python_state.PythonState) else steps).append(step)
        steps += python_steps  # TF gathers Python state after the tensors (save_util.serialize_graph_view)
        graph = serialized.get(None, {})
        if len(graph) != 1:
            return unplanned()
        (graph_key, graph_tensor), = graph.items()
        steps.append((_CONSTANT, graph_key, graph_tensor.numpy()))
        planned = [key for kind, a, b in steps for key in (b if kind in (_CALL, _LEGACY) else (a,))]
        if planned != [key for per_object in serialized.values() for key in per_object]:
            return unplanned()  # the replay would not write what TF wrote, in TF's order
        return cls(nodes, edges, owners, slots, steps)

    def snapshot(self, pool: _BufferPool) -> Optional[Snapshot]:
        """A snapshot by the plan; None when a trackable's keys changed (the caller gathers again)."""
        from tensorflow.python.checkpoint import save_util
        from tensorflow.python.ops import gen_resource_variable_ops
        called = {}
        for kind, a, b in self.steps:
            if kind == _CALL:
                trackable, got = a.object_to_save, save_util._get_tensors_from_trackable(a, None, None)
            elif kind == _LEGACY:
                trackable, got = save_util._get_tensors_from_legacy_saveable(a, None, None, None)
            elif kind == _READ and b[0] is not None and b[0].value is not b[1]:
                return None  # a Keras variable now holds another tf.Variable
            else:
                continue
            if tuple(got) != b:
                return None
            called[id(a)] = trackable, got
        # Every read first, every copy after: an eager op right after a copy of a few
        # MB finds its code and data evicted from the CPU caches and takes 3-5x longer.
        # The reads alias the variables' buffers, so holding them all costs no memory.
        read_all = self._read_all
        if read_all is not None:  # one function call: ~4 us a read where an eager op costs ~20 us
            values = read_all()
        else:
            values = []
            for key, handle, dtype, large in self.reads:
                if large:
                    # Sparse updates (scatter ops) put a variable in copy-on-read mode, where
                    # ReadVariableOp copies; leave it, so the read aliases the buffer (TF's
                    # read_value_no_copy does the same, with four more ops around it). For a
                    # small variable that copy costs less than the op that avoids it.
                    gen_resource_variable_ops.disable_copy_on_read(handle)
                values.append(gen_resource_variable_ops.read_variable_op(handle, dtype))
        tensors, nbytes, taken = {}, 0, {}
        gen = self._take_generation()
        read, pairs, copied = {}, [], 0
        for i, value in enumerate(values):
            key = self.reads[i][0]
            arr = value._numpy()  # a view of the variable's CPU buffer
            if not isinstance(arr, np.ndarray) or arr.dtype.hasobject:  # strings
                read[key] = _host_copy(arr, pool, key, taken.setdefault(key, []))
                continue
            buf = gen[i]
            if buf is None or buf.shape != arr.shape or buf.dtype != arr.dtype:
                buf = gen[i] = pool.take(key, arr.shape, arr.dtype)
            pairs.append((buf, arr))
            copied += buf.nbytes
            read[key] = buf, buf.nbytes
        del values
        _copy_all(pairs, copied)
        del pairs
        for kind, a, b in self.steps:
            if kind == _READ:
                tensors[a], n = read[a]
                nbytes += n
                continue
            if kind == _CONSTANT:
                tensors[a] = np.array(b, dtype=object)
                nbytes += len(b)
                continue
            trackable, got = called[id(a)]
            items = got.items()
            for key, value in items:
                value = _resolve(trackable, key, value)
                bufs = taken.setdefault(key, [])
                tensors[key], n = _host_copy(value, pool, key, bufs)
                nbytes += n
        # After the copies, as the trace holds the GIL for much of its time; never for a
        # run's last save, where it would only compete with the upload and delay the exit.
        if self._trace_due and not getattr(_final, "on", False):
            self._start_trace()

        def release():
            for k, v in taken.items():
                pool.give(k, v)
            self._give_generation(gen, pool)
        return Snapshot(tensors, nbytes, release)

    def _take_generation(self) -> list:
        """Buffers for one snapshot's variable reads (None: none yet), in `reads` order; one lock a save."""
        with self._gen_lock:
            if self._gens:
                return self._gens.pop()
        return [None] * len(self.reads)

    def _give_generation(self, gen, pool: _BufferPool) -> None:
        with self._gen_lock:
            if not self.retired:
                self._gens.append(gen)
                return
        self._to_pool(gen, pool)

    def retire(self, pool: _BufferPool) -> None:
        """The saver made a new plan: free buffers go back to the pool, where the new plan finds them warm."""
        with self._gen_lock:
            self.retired = True
            gens, self._gens = self._gens, []
        for gen in gens:
            self._to_pool(gen, pool)

    def _to_pool(self, gen, pool: _BufferPool) -> None:
        for (key, _, _, _), buf in zip(self.reads, gen):
            if buf is not None:
                pool.give(key, (buf,))


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
