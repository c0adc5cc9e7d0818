"""TrackableSaver's snapshot plan: TF's gather step, kept while the object graph keeps its shape.

TF's gather step finds the object graph proto, the checkpoint keys and which
variables to read. A `SnapshotPlan` keeps what it found: every save walks the
graph (nodes, named edges, optimizer slot variables, compared by identity) and
gathers again only when something changed. Gathering costs about 1 ms and
~0.1 ms of eager ops per variable, which on a 64 MB state is most of the gap
to the `memcpy`. From 16 variables on, the plan's reads also run as one TF
function, traced on a background thread when a save first reuses the plan
(about 2 s for 500 variables, once per plan): ~4 us a variable where two eager
ops cost ~40 us. Its copies go into buffers the plan reuses as one set per
snapshot in flight. Where the state is plain numeric variables (most models)
and a set's buffers still fit every read, a save copies into them after one
check of every shape and dtype, with no other bookkeeping per variable: 1.3 ms
less a save for 512 variables.

TensorFlow is imported inside the functions: this module loads without it.
"""

import logging
import sys
import threading
import time
from typing import Mapping, Optional

import numpy as np

from rayhooks.snapshot import BufferPool, Snapshot, copy_all, host_copy, in_final_snapshot

logger = logging.getLogger("rayhooks")


def _read_in_place(trackable, key):
    """A CPU variable's current value without a copy, or None where that does not apply."""
    if not key.endswith("/.ATTRIBUTES/VARIABLE_VALUE"):
        return None
    read = getattr(trackable, "read_value_no_copy", None)
    device = getattr(trackable, "device", "") or ""
    if read is None or "CPU" not in device.upper():
        return None
    return read()


def resolve(trackable, key, value):
    """The tensor behind one entry of TF's gather: a SaveSpec or callable is read now."""
    from tensorflow.python.training.saving.saveable_object import SaveSpec
    if isinstance(value, Mapping):
        raise ValueError("tensor %r is partitioned (slice specs %s); rayhooks saves whole "
                         "tensors only" % (key, sorted(value)))
    if isinstance(value, SaveSpec):
        # TF would read the variable through an identity op (a full
        # copy); a plain variable is read in place instead, and
        # `host_copy` makes the one copy into a pooled buffer.
        # (`value.tensor` is a property that runs the read: touch it
        # only when the in-place read does not apply.)
        direct = _read_in_place(trackable, key)
        return value.tensor if direct is None else direct
    if callable(value):
        return value()
    return value


_READ, _CALL, _LEGACY, _CONSTANT = "read", "call", "legacy", "constant"


def plan_applies(saver) -> bool:
    """Whether `saver` gathers the way `SnapshotPlan` replays: eagerly, with no TF-side caches or object map."""
    from tensorflow.python.eager import context
    return (context.executing_eagerly() and getattr(saver, "_cache", None) is None
            and getattr(saver, "_saveables_cache", None) is None and not getattr(saver, "_object_map", None)
            and hasattr(saver, "_graph_view"))


def walk(graph_view):
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


def owns_slots(trackable) -> bool:
    # TF's test (checkpoint/util.py serialize_slot_variables): dir(), not hasattr(),
    # so a custom __getattr__ is not run.
    return "get_slot_names" in dir(trackable)


def slot_variables(nodes, owners):
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


BATCH_READS = 16  # from this many variable reads a save, they run as one TF function (below it eager ops cost less)
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


class SnapshotPlan:
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
    buffer; any other trackable through its own `_serialize_to_tensors` (a
    TF1-style one through the SaveableObjects TF makes for it), checked to give
    the keys it gave before, else TF gathers again.
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
        # What each save must ask again (trackables of their own, Keras variables' inner variable).
        self._checks = [(kind, a, b) for kind, a, b in steps or ()
                        if kind in (_CALL, _LEGACY) or kind == _READ and b[0] is not None]
        # Plain numeric variables and the graph constant only (most models): a save whose
        # buffers fit from the save before takes `_snapshot_warm`: one check of every shape and dtype at once.
        constants = [(a, b) for kind, a, b in steps or () if kind == _CONSTANT]
        self._warm_keys = None
        if steps and all(kind in (_READ, _CONSTANT) for kind, _, _ in steps) and len(constants) == 1 \
                and steps[-1][0] == _CONSTANT and all(dtype.name != "string" for _, _, dtype, _ in self.reads):
            self._warm_keys = [key for key, _, _, _ in self.reads]
            self._constant = constants[0]
        self._read_all = None  # once traced: one TF function making every read
        # Traced when the plan is first reused, not when made: the first plan of a
        # run often lasts one save (optimizer slots appear at the first step).
        self._trace_due = len(self.reads) >= BATCH_READS
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
        return _slot_ids(slot_variables(nodes, self.owners)) == self.slot_ids

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
            return unplanned()  # TF numbers the graph differently than `walk`: do not guess
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

    def snapshot(self, pool: BufferPool) -> Optional[Snapshot]:
        """A snapshot by the plan; None when a trackable's keys changed (the caller gathers again)."""
        from tensorflow.python.checkpoint import save_util
        from tensorflow.python.ops import gen_resource_variable_ops
        called = {}
        for kind, a, b in self._checks:
            if kind == _CALL:
                trackable, got = a.object_to_save, save_util._get_tensors_from_trackable(a, None, None)
            elif kind == _LEGACY:
                trackable, got = save_util._get_tensors_from_legacy_saveable(a, None, None, None)
            elif b[0].value is not b[1]:
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
        gen = self._take_generation()
        if gen.layout is not None:
            arrays = [value._numpy() for value in values]  # views of the variables' CPU buffers
            if [(arr.shape, arr.dtype) for arr in arrays] == gen.layout:
                del values
                return self._snapshot_warm(gen, arrays, pool)
        tensors, nbytes, taken = {}, 0, {}
        read, pairs, copied = {}, [], 0
        for i, value in enumerate(values):
            key = self.reads[i][0]
            arr = value._numpy()  # a view of the variable's CPU buffer
            if not isinstance(arr, (np.ndarray, np.generic)) or arr.dtype.hasobject:  # strings (0-d: a numpy scalar)
                read[key] = host_copy(arr, pool, key, taken.setdefault(key, []))
                continue
            buf = gen[i]
            if buf is None or buf.shape != arr.shape or buf.dtype != arr.dtype:
                buf = gen[i] = pool.take(key, arr.shape, arr.dtype)
            pairs.append((buf, arr))
            copied += buf.nbytes
            read[key] = buf, buf.nbytes
        del values
        copy_all(pairs, copied)
        del pairs
        if self._warm_keys is not None and all(buf is not None for buf in gen):  # its next save may go warm
            gen.layout, gen.nbytes = [(buf.shape, buf.dtype) for buf in gen], copied
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
                value = resolve(trackable, key, value)
                bufs = taken.setdefault(key, [])
                tensors[key], n = host_copy(value, pool, key, bufs)
                nbytes += n
        # After the copies, as the trace holds the GIL for much of its time; never for a
        # run's last save, where it would only compete with the upload and delay the exit.
        if self._trace_due and not in_final_snapshot():
            self._start_trace()

        def release():
            for k, v in taken.items():
                pool.give(k, v)
            self._give_generation(gen, pool)
        return Snapshot(tensors, nbytes, release)

    def _snapshot_warm(self, gen: "_Generation", arrays: list, pool: BufferPool) -> Snapshot:
        """`snapshot` where every read fits the generation's buffers and nothing else is saved."""
        copy_all(list(zip(gen, arrays)), gen.nbytes)
        del arrays
        tensors = dict(zip(self._warm_keys, gen))
        key, graph = self._constant
        tensors[key] = np.array(graph, dtype=object)
        if self._trace_due and not in_final_snapshot():
            self._start_trace()
        return Snapshot(tensors, gen.nbytes + len(graph), lambda: self._give_generation(gen, pool))

    def _take_generation(self) -> "_Generation":
        """Buffers for one snapshot's variable reads (None: none yet), in `reads` order; one lock a save."""
        with self._gen_lock:
            if self._gens:
                return self._gens.pop()
        return _Generation([None] * len(self.reads))

    def _give_generation(self, gen, pool: BufferPool) -> None:
        with self._gen_lock:
            if not self.retired:
                self._gens.append(gen)
                return
        self._to_pool(gen, pool)

    def retire(self, pool: BufferPool) -> None:
        """The saver made a new plan: free buffers go back to the pool, where the new plan finds them warm."""
        with self._gen_lock:
            self.retired = True
            gens, self._gens = self._gens, []
        for gen in gens:
            self._to_pool(gen, pool)

    def _to_pool(self, gen, pool: BufferPool) -> None:
        for (key, _, _, _), buf in zip(self.reads, gen):
            if buf is not None:
                pool.give(key, (buf,))


class _Generation(list):
    """One snapshot's buffers for a plan's reads, in `reads` order.

    `layout`: each buffer's (shape, dtype) once all were filled by a plan that
    can take the warm path (None until then); `nbytes`: their total.
    """

    layout = None
    nbytes = 0
