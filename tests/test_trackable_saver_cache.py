"""TrackableSaver keeps TF's gather step (object graph proto, keys, reads) across saves.

Most tests change the state between two saves in one way the cache must
notice (a new variable, optimizer slots, a replaced variable, a second name for
a variable) or must re-read (Python state, a hash table, a TF1-style saveable),
and check the second checkpoint against what TensorFlow itself writes for the
same objects (`tf.train.Checkpoint.write`), read back with
`tf.train.load_checkpoint` and `tf.train.Checkpoint.restore`. `_Gathers` counts
TF's own gather step, to show when the cache was used and when it was rebuilt.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest

import rayhooks as rh

GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"


@pytest.fixture(scope="module")
def tf():
    import tensorflow

    return tensorflow


class _Gathers:
    """Counts TF's gather step (`_gather_serialized_tensors`) for one tf.train.Checkpoint."""

    def __init__(self, monkeypatch, ckpt):
        self.calls = 0
        real = ckpt._saver._gather_serialized_tensors

        def counting(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(ckpt._saver, "_gather_serialized_tensors", counting)

    def since(self, before):
        return self.calls - before


def _save(saver, directory, step):
    """One rayhooks checkpoint from `saver` in `directory`; returns its TF prefix."""
    store = rh.CheckpointStore(rh.Storage("file://" + str(directory)))
    snapshot = saver.snapshot()
    try:
        store.commit(step, store.write_data(step, snapshot.tensors))
    finally:
        snapshot.done()
    return os.path.join(str(directory), store.prefix_for(step))


def _graph(tf, reader):
    from tensorflow.core.protobuf import trackable_object_graph_pb2
    graph = trackable_object_graph_pb2.TrackableObjectGraph()
    graph.ParseFromString(reader.get_tensor(GRAPH_KEY))
    return graph


def _assert_same_as_tf(tf, ckpt, ours, tmp_path):
    """`ours` holds what tf.train.Checkpoint.write writes for `ckpt` now: keys, values, object graph."""
    theirs = ckpt.write(str(tmp_path / ("tf-" + os.path.basename(ours))))
    mine, ref = tf.train.load_checkpoint(ours), tf.train.load_checkpoint(theirs)
    keys = ref.get_variable_to_shape_map()
    assert mine.get_variable_to_shape_map() == keys
    assert mine.get_variable_to_dtype_map() == ref.get_variable_to_dtype_map()
    assert _graph(tf, mine) == _graph(tf, ref)
    for key in keys:
        if key != GRAPH_KEY:
            np.testing.assert_array_equal(mine.get_tensor(key), ref.get_tensor(key), err_msg=key)
    return set(keys)


def test_unchanged_graph_is_gathered_once_and_each_snapshot_holds_its_step(tf, monkeypatch):
    sizes = (8, 8, 1 << 16)  # small variables are read with one op, large ones leave copy-on-read first
    variables = {"v%d" % i: tf.Variable(np.full(n, float(i), np.float32)) for i, n in enumerate(sizes)}
    ckpt = tf.train.Checkpoint(**variables)
    gathers = _Gathers(monkeypatch, ckpt)
    saver = rh.TrackableSaver(ckpt)
    saver.snapshot().done()
    assert gathers.calls == 1

    held = []
    for step in range(1, 4):
        for v in variables.values():
            v.scatter_nd_add([[0]], [1.0])  # sparse update: the variable is now in copy-on-read mode
            v.assign_add(tf.ones_like(v))
        held.append((step, saver.snapshot()))
    assert gathers.calls == 1, "the graph did not change, yet TF's gather step ran again"
    # Later steps must not leak into earlier snapshots (the reads alias the variables' buffers).
    for v in variables.values():
        v.scatter_nd_add([[1]], [100.0])
    for step, snapshot in held:
        assert int(snapshot.tensors["save_counter/.ATTRIBUTES/VARIABLE_VALUE"]) == step + 1
        for i, n in enumerate(sizes):
            expected = np.full(n, float(i + step), np.float32)
            expected[0] += step
            np.testing.assert_array_equal(snapshot.tensors["v%d/.ATTRIBUTES/VARIABLE_VALUE" % i], expected)
        snapshot.done()


def test_cached_snapshot_has_the_keys_order_dtypes_and_graph_of_a_gathered_one(tf):
    class Model(tf.Module):
        def __init__(self):
            self.w = tf.Variable(np.arange(6, dtype=np.float32).reshape(2, 3))
            self.b = tf.Variable(np.array([1.5, -2.0]))
            self.labels = tf.Variable([b"cat", b"dog"])
            self.layers = [tf.Variable(np.int32(3)), {"k": tf.Variable(np.ones(2, np.float16))}]

    ckpt = tf.train.Checkpoint(model=Model(), step=tf.Variable(7, dtype=tf.int64))
    saver = rh.TrackableSaver(ckpt)
    saver.snapshot().done()
    cached = saver.snapshot()  # from the cache
    gathered = rh.TrackableSaver(ckpt).snapshot()  # a fresh saver gathers through TF
    try:
        assert list(cached.tensors) == list(gathered.tensors)  # the data file is written in this order
        assert cached.nbytes == gathered.nbytes
        for key, value in gathered.tensors.items():
            mine = cached.tensors[key]
            assert (mine.dtype, mine.shape) == (value.dtype, value.shape), key
            if key == "save_counter/.ATTRIBUTES/VARIABLE_VALUE":
                assert int(value) == int(mine) + 1
            else:
                np.testing.assert_array_equal(mine, value, err_msg=key)
    finally:
        cached.done()
        gathered.done()


def test_variable_added_after_the_first_save_is_in_the_next_checkpoint(tf, tmp_path, monkeypatch):
    ckpt = tf.train.Checkpoint(a=tf.Variable(np.ones(4, np.float32)))
    gathers = _Gathers(monkeypatch, ckpt)
    saver = rh.TrackableSaver(ckpt)
    first = _save(saver, tmp_path, 1)
    assert "extra/.ATTRIBUTES/VARIABLE_VALUE" not in tf.train.load_checkpoint(first).get_variable_to_shape_map()

    ckpt.extra = tf.Variable(np.arange(5, dtype=np.float64))
    second = _save(saver, tmp_path, 2)
    assert gathers.calls == 2
    keys = _assert_same_as_tf(tf, ckpt, second, tmp_path)
    assert "extra/.ATTRIBUTES/VARIABLE_VALUE" in keys

    restored = tf.train.Checkpoint(a=tf.Variable(np.zeros(4, np.float32)), extra=tf.Variable(np.zeros(5)))
    restored.restore(second).assert_consumed()
    np.testing.assert_array_equal(restored.extra.numpy(), np.arange(5))
    assert int(restored.save_counter.numpy()) == 2

    before = gathers.calls  # (tf.train.Checkpoint.write above gathers through the same TF saver)
    _save(saver, tmp_path, 3)
    assert gathers.since(before) == 0  # the new shape is cached in turn


def test_tf1_optimizer_slots_created_after_the_first_save_are_in_the_next_checkpoint(tf, tmp_path, monkeypatch):
    v, w = tf.Variable([1.0, -2.0, 3.0]), tf.Variable([0.5, 0.25])
    opt = tf.compat.v1.train.AdamOptimizer(0.1)
    ckpt = tf.train.Checkpoint(v=v, w=w, opt=opt)
    gathers = _Gathers(monkeypatch, ckpt)
    saver = rh.TrackableSaver(ckpt)
    first = _save(saver, tmp_path, 1)
    assert not [k for k in tf.train.load_checkpoint(first).get_variable_to_shape_map() if "OPTIMIZER_SLOT" in k]

    opt.minimize(lambda: tf.reduce_sum(v * v), var_list=[v])  # creates the slots m and v, and beta powers
    second = _save(saver, tmp_path, 2)
    keys = _assert_same_as_tf(tf, ckpt, second, tmp_path)
    for slot in ("m", "v"):
        key = "v/.OPTIMIZER_SLOT/opt/%s/.ATTRIBUTES/VARIABLE_VALUE" % slot
        assert key in keys
        np.testing.assert_array_equal(tf.train.load_checkpoint(second).get_tensor(key),
                                      opt.get_slot(v, slot).numpy())
    assert _graph(tf, tf.train.load_checkpoint(second)).nodes[0].slot_variables == []  # slots hang on the optimizer

    gathered = gathers.calls
    opt.minimize(lambda: tf.reduce_sum(v * v), var_list=[v])  # same slots: the cache holds
    third = _save(saver, tmp_path, 3)
    assert gathers.since(gathered) == 0
    _assert_same_as_tf(tf, ckpt, third, tmp_path)

    # Slots for a second variable: the only change to the graph is two more slot variables
    # (the optimizer's beta powers exist already), which no traversal of children finds.
    opt.minimize(lambda: tf.reduce_sum(w * w), var_list=[w])
    gathered = gathers.calls
    fourth = _save(saver, tmp_path, 4)
    assert gathers.since(gathered) == 1
    keys = _assert_same_as_tf(tf, ckpt, fourth, tmp_path)
    assert "w/.OPTIMIZER_SLOT/opt/m/.ATTRIBUTES/VARIABLE_VALUE" in keys

    # Plain TF restores the slots (deferred, when the fresh optimizer creates them).
    fresh_v, fresh_w = tf.Variable([0.0, 0.0, 0.0]), tf.Variable([0.0, 0.0])
    fresh_opt = tf.compat.v1.train.AdamOptimizer(0.1)
    status = tf.train.Checkpoint(v=fresh_v, w=fresh_w, opt=fresh_opt).restore(fourth)
    np.testing.assert_array_equal(fresh_v.numpy(), v.numpy())
    np.testing.assert_array_equal(fresh_w.numpy(), w.numpy())
    fresh_opt.minimize(lambda: tf.reduce_sum(fresh_v * fresh_v) + tf.reduce_sum(fresh_w * fresh_w),
                       var_list=[fresh_v, fresh_w])
    status.assert_consumed()


def test_keras_optimizer_variables_built_after_the_first_save_are_in_the_next_checkpoint(tf, tmp_path):
    def model_and_optimizer(seed):
        tf.keras.utils.set_random_seed(seed)
        model = tf.keras.Sequential([tf.keras.Input((3,)), tf.keras.layers.Dense(2)])
        return model, tf.keras.optimizers.Adam(0.1)

    model, opt = model_and_optimizer(1)
    ckpt = tf.train.Checkpoint(model=model, optimizer=opt)
    saver = rh.TrackableSaver(ckpt)
    first_keys = set(tf.train.load_checkpoint(_save(saver, tmp_path, 1)).get_variable_to_shape_map())

    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(model(tf.ones((4, 3))) ** 2)
    opt.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
    second = _save(saver, tmp_path, 2)
    keys = _assert_same_as_tf(tf, ckpt, second, tmp_path)
    # Adam's momentum and velocity for the kernel and the bias; the kernel and the bias
    # themselves are now keyed by their shorter path through the optimizer.
    assert len(keys) == len(first_keys) + 4 and not first_keys <= keys

    fresh, fresh_opt = model_and_optimizer(2)
    fresh_opt.build(fresh.trainable_variables)
    status = tf.train.Checkpoint(model=fresh, optimizer=fresh_opt).restore(second)
    status.assert_existing_objects_matched()
    for mine, theirs in zip(opt.variables, fresh_opt.variables):
        np.testing.assert_array_equal(np.asarray(mine), np.asarray(theirs))
    for mine, theirs in zip(model.weights, fresh.weights):
        np.testing.assert_array_equal(np.asarray(mine), np.asarray(theirs))


def test_replaced_variable_is_read_from_the_new_object(tf, tmp_path, monkeypatch):
    module = tf.Module()
    module.w = tf.Variable(np.zeros(3, np.float32))
    ckpt = tf.train.Checkpoint(module=module)
    gathers = _Gathers(monkeypatch, ckpt)
    saver = rh.TrackableSaver(ckpt)
    _save(saver, tmp_path, 1)

    module.w = tf.Variable(np.full(5, 2.0, np.float32))  # same name, new object, new shape
    second = _save(saver, tmp_path, 2)
    assert gathers.calls == 2
    _assert_same_as_tf(tf, ckpt, second, tmp_path)
    np.testing.assert_array_equal(
        tf.train.load_checkpoint(second).get_tensor("module/w/.ATTRIBUTES/VARIABLE_VALUE"), np.full(5, 2.0))


def test_second_name_for_a_tracked_variable_changes_the_object_graph(tf, tmp_path, monkeypatch):
    module = tf.Module()
    module.w = tf.Variable(np.ones(2, np.float32))
    ckpt = tf.train.Checkpoint(module=module)
    gathers = _Gathers(monkeypatch, ckpt)
    saver = rh.TrackableSaver(ckpt)
    first = _save(saver, tmp_path, 1)
    nodes_before = len(_graph(tf, tf.train.load_checkpoint(first)).nodes)

    module.alias = module.w  # no new object: only a new edge in the object graph
    second = _save(saver, tmp_path, 2)
    assert gathers.calls == 2
    _assert_same_as_tf(tf, ckpt, second, tmp_path)
    graph = _graph(tf, tf.train.load_checkpoint(second))
    assert len(graph.nodes) == nodes_before
    assert {c.local_name for n in graph.nodes for c in n.children} >= {"w", "alias"}


def test_python_state_is_serialized_at_every_save(tf, tmp_path, monkeypatch):
    class Counter(tf.train.experimental.PythonState):
        def __init__(self):
            self.value = 0

        def serialize(self):
            return str(self.value)

        def deserialize(self, string_value):
            self.value = int(string_value)

    counter = Counter()
    ckpt = tf.train.Checkpoint(v=tf.Variable(1.0), counter=counter)
    gathers = _Gathers(monkeypatch, ckpt)
    saver = rh.TrackableSaver(ckpt)
    _save(saver, tmp_path, 1)
    counter.value = 41
    second = _save(saver, tmp_path, 2)
    assert gathers.calls == 1  # same graph: the Python state is asked again, not the whole graph
    _assert_same_as_tf(tf, ckpt, second, tmp_path)

    fresh = Counter()
    tf.train.Checkpoint(v=tf.Variable(0.0), counter=fresh).restore(second).assert_consumed()
    assert fresh.value == 41


def test_strings_ending_in_nul_bytes_are_written_whole(tf, tmp_path):
    """A scalar string comes out of TF as bytes; a fixed-width numpy "S" copy would drop trailing NULs.

    The object graph proto ends in b"\\x2a\\x00" (an empty `has_checkpoint_values`)
    when the last object TF numbers holds no values, here the empty `inner`
    module: before the fix it was written one byte short, and TF could not parse it.
    """
    def state():
        outer = tf.Module()
        outer.inner = tf.Module()
        return tf.train.Checkpoint(word=tf.Variable(b"ab\x00\x00"), outer=outer)

    ckpt = state()
    saver = rh.TrackableSaver(ckpt)
    for step in (1, 2):  # TF's gather, then the cache
        prefix = _save(saver, tmp_path, step)
        reader = tf.train.load_checkpoint(prefix)
        assert reader.get_tensor("word/.ATTRIBUTES/VARIABLE_VALUE") == b"ab\x00\x00"
        assert reader.get_tensor(GRAPH_KEY).endswith(b"\x00")
        _assert_same_as_tf(tf, ckpt, prefix, tmp_path)
        fresh = state()
        fresh.restore(prefix).assert_consumed()
        assert fresh.word.numpy() == b"ab\x00\x00"


def test_table_contents_are_read_at_every_save(tf, tmp_path, monkeypatch):
    table = tf.lookup.experimental.MutableHashTable(tf.string, tf.int64, default_value=-1)
    ckpt = tf.train.Checkpoint(table=table)
    gathers = _Gathers(monkeypatch, ckpt)
    saver = rh.TrackableSaver(ckpt)
    table.insert(tf.constant([b"a"]), tf.constant([1], tf.int64))
    _save(saver, tmp_path, 1)
    table.insert(tf.constant([b"b", b"c"]), tf.constant([2, 3], tf.int64))
    second = _save(saver, tmp_path, 2)
    assert gathers.calls == 1  # a table is asked for its tensors at each save; the graph is kept
    _assert_same_as_tf(tf, ckpt, second, tmp_path)

    fresh = tf.lookup.experimental.MutableHashTable(tf.string, tf.int64, default_value=-1)
    tf.train.Checkpoint(table=fresh).restore(second).assert_consumed()
    np.testing.assert_array_equal(fresh.lookup(tf.constant([b"a", b"b", b"c", b"d"])).numpy(), [1, 2, 3, -1])


def test_legacy_saveable_is_asked_for_its_tensors_at_every_save(tf, tmp_path, monkeypatch):
    """An object with only `_gather_saveables_for_checkpoint` (TF1-style) makes its SaveableObjects at each save."""
    from tensorflow.python.trackable import base as trackable_base
    from tensorflow.python.training.saving import saveable_object

    class Saveable(saveable_object.SaveableObject):
        def __init__(self, variable, name):
            spec = saveable_object.SaveSpec(variable.read_value(), "", name)
            super().__init__(variable, [spec], name)

        def restore(self, restored_tensors, restored_shapes):
            return self.op.assign(restored_tensors[0])

    class Legacy(trackable_base.Trackable):
        def __init__(self, value):
            self.variable = tf.Variable(value)  # not a tracked child: saved only through the saveable

        def _gather_saveables_for_checkpoint(self):
            return {"value": lambda name: Saveable(self.variable, name)}

    legacy = Legacy([1.0, 2.0])
    ckpt = tf.train.Checkpoint(legacy=legacy, v=tf.Variable(3.0))
    gathers = _Gathers(monkeypatch, ckpt)
    saver = rh.TrackableSaver(ckpt)
    _save(saver, tmp_path, 1)
    legacy.variable.assign([5.0, 6.0])
    second = _save(saver, tmp_path, 2)
    assert gathers.calls == 1
    _assert_same_as_tf(tf, ckpt, second, tmp_path)
    fresh = Legacy([0.0, 0.0])
    tf.train.Checkpoint(legacy=fresh, v=tf.Variable(0.0)).restore(second).assert_consumed()
    np.testing.assert_array_equal(fresh.variable.numpy(), [5.0, 6.0])


@pytest.mark.parametrize("one_op", [True, False], ids=["ReadVariablesOp", "ReadVariableOp-each"])
def test_many_variables_are_read_by_one_traced_function_and_each_snapshot_holds_its_step(tf, tmp_path,
                                                                                       monkeypatch, one_op):
    from rayhooks import snapshot_plan
    from rayhooks.snapshot import final_snapshot
    from tensorflow.python.framework import op_def_registry
    if not one_op:  # a TF without the multi-variable read op: one ReadVariableOp a variable
        real_get = op_def_registry.get
        monkeypatch.setattr(op_def_registry, "get",
                            lambda name: None if name == "_ReadVariablesOp" else real_get(name))
    count = snapshot_plan.BATCH_READS + 4
    sizes = [8 if i % 2 else 1 << 15 for i in range(count)]  # small, and large (left in copy-on-read first)
    variables = {"v%d" % i: tf.Variable(np.full(n, float(i), np.float32)) for i, n in enumerate(sizes)}
    variables["label"] = tf.Variable(b"cat\x00")
    variables["steps"] = tf.Variable(np.int64(0))
    ckpt = tf.train.Checkpoint(**variables)
    saver = rh.TrackableSaver(ckpt)
    saver.snapshot().done()  # the plan is made here
    plan = saver._plan
    with final_snapshot():  # a run's last save prepares nothing for later ones
        saver.snapshot().done()
    assert plan.trace_idle.is_set() and plan._read_all is None
    saver.snapshot().done()  # reused: its read function is traced on a thread
    assert plan.trace_idle.wait(120), "the read function was not traced in 120 s"
    assert plan._read_all is not None
    kinds = [op.type for op in plan._read_all.graph.get_operations()]
    if one_op:
        assert kinds.count("_ReadVariablesOp") == 1 and "ReadVariableOp" not in kinds
    else:
        assert kinds.count("ReadVariableOp") == len(plan.reads) and "_ReadVariablesOp" not in kinds

    from tensorflow.python.ops import gen_resource_variable_ops

    def no_eager_reads(*args, **kwargs):
        raise AssertionError("a variable was read with an eager op, not by the traced function")
    monkeypatch.setattr(gen_resource_variable_ops, "read_variable_op", no_eager_reads)
    monkeypatch.setattr(gen_resource_variable_ops, "disable_copy_on_read", no_eager_reads)

    held = []
    for step in range(1, 3):
        for i in range(count):
            variables["v%d" % i].scatter_nd_add([[0]], [1.0])  # copy-on-read mode: the read must leave it
        variables["steps"].assign_add(1)
        held.append((step, saver.snapshot()))
    assert saver._plan is plan
    for i in range(count):
        variables["v%d" % i].assign_add(tf.fill(variables["v%d" % i].shape, 100.0))  # after both snapshots
    for step, snapshot in held:
        for i, n in enumerate(sizes):
            expected = np.full(n, float(i), np.float32)
            expected[0] += step
            value = snapshot.tensors["v%d/.ATTRIBUTES/VARIABLE_VALUE" % i]
            np.testing.assert_array_equal(value, expected)
            # A copy of its own: a view of TF's buffer would make the next step copy the variable.
            assert value.flags.owndata
        assert int(snapshot.tensors["steps/.ATTRIBUTES/VARIABLE_VALUE"]) == step
        assert snapshot.tensors["label/.ATTRIBUTES/VARIABLE_VALUE"] == b"cat\x00"
        snapshot.done()
    monkeypatch.undo()  # TF's own write below reads eagerly
    _assert_same_as_tf(tf, ckpt, _save(saver, tmp_path, 3), tmp_path)


def test_dependency_added_to_a_variable_is_in_the_next_checkpoint(tf, tmp_path, monkeypatch):
    # The graph walk skips asking plain variables for children; one that gained a child is asked.
    w = tf.Variable(np.ones(3, np.float32))
    ckpt = tf.train.Checkpoint(w=w)
    gathers = _Gathers(monkeypatch, ckpt)
    saver = rh.TrackableSaver(ckpt)
    _save(saver, tmp_path, 1)

    w._track_trackable(tf.Variable(np.float32(5.0)), name="scale")
    second = _save(saver, tmp_path, 2)
    assert gathers.calls == 2
    _assert_same_as_tf(tf, ckpt, second, tmp_path)
    assert tf.train.load_checkpoint(second).get_tensor("w/scale/.ATTRIBUTES/VARIABLE_VALUE") == 5.0


def _buffers(snapshot, keys):
    return [snapshot.tensors[k] for k in keys]


def test_plan_reuses_one_buffer_set_per_snapshot_in_flight_and_a_new_plan_finds_them_warm(tf):
    from rayhooks import snapshot_plan
    variables = {"v%d" % i: tf.Variable(np.full(1000, float(i), np.float32)) for i in range(snapshot_plan.BATCH_READS)}
    ckpt = tf.train.Checkpoint(**variables)
    saver = rh.TrackableSaver(ckpt)
    saver.snapshot().done()  # the plan is made here
    plan = saver._plan
    keys = ["v%d/.ATTRIBUTES/VARIABLE_VALUE" % i for i in range(len(variables))]
    first, second = saver.snapshot(), saver.snapshot()  # two in flight: a set each
    assert saver._plan is plan and plan.trace_idle.wait(120)
    a, b = _buffers(first, keys), _buffers(second, keys)
    assert not any(np.shares_memory(x, y) for x, y in zip(a, b))
    first.done()
    second.done()
    taken = []
    real_take = saver._pool.take
    saver._pool.take = lambda *args: taken.append(args) or real_take(*args)
    third = saver.snapshot()
    del saver._pool.take
    assert not [t for t in taken if t[0] in keys], \
        "a reused set takes no buffer from the pool (one lock a save, not one a variable)"
    c = _buffers(third, keys)
    assert all(z is x for z, x in zip(c, a)) or all(z is y for z, y in zip(c, b)), \
        "the next snapshot did not reuse a whole set of persisted buffers"
    variables["v0"].assign_add(tf.ones(1000))
    assert np.array_equal(c[0], np.full(1000, 0.0, np.float32)), "a reused buffer must hold this step's values"
    third.done()

    ckpt.extra = tf.Variable(1.0)  # the graph changes: a new plan, which takes the old plan's buffers
    saver.snapshot().done()
    assert saver._plan is not plan and plan.retired
    fourth = saver.snapshot()
    assert saver._plan.reads and all(any(z is x for x in a + b) for z in _buffers(fourth, keys))
    np.testing.assert_array_equal(fourth.tensors[keys[0]], np.full(1000, 1.0, np.float32))
    fourth.done()


def test_warm_snapshots_equal_gathered_ones_and_follow_a_variable_whose_shape_changes(tf, monkeypatch):
    """Plain variables only: once a buffer set was filled, a save copies into it with no per-variable Python."""
    from rayhooks import snapshot_plan
    warm = []
    real = snapshot_plan.SnapshotPlan._snapshot_warm

    def counting(self, *args):
        warm.append(1)
        return real(self, *args)
    monkeypatch.setattr(snapshot_plan.SnapshotPlan, "_snapshot_warm", counting)
    variables = {"w": tf.Variable(np.arange(6, dtype=np.float32).reshape(2, 3)), "scale": tf.Variable(0.5),
                 "ids": tf.Variable(np.arange(4, dtype=np.int64)),
                 "dyn": tf.Variable(np.ones(2), shape=tf.TensorShape(None))}
    ckpt = tf.train.Checkpoint(**variables)
    saver = rh.TrackableSaver(ckpt)

    def check(snapshot):
        gathered = rh.TrackableSaver(ckpt).snapshot()  # a fresh saver gathers through TF
        try:
            assert list(snapshot.tensors) == list(gathered.tensors)
            assert snapshot.nbytes == gathered.nbytes
            for key, value in gathered.tensors.items():
                if key == "save_counter/.ATTRIBUTES/VARIABLE_VALUE":
                    continue  # the fresh saver counted its own save
                np.testing.assert_array_equal(snapshot.tensors[key], value, err_msg=key)
                assert snapshot.tensors[key].dtype == value.dtype, key
        finally:
            gathered.done()

    for _ in range(3):  # a gather, then a plan save that fills the buffers, then warm ones
        variables["scale"].assign_add(1.0)
        snapshot = saver.snapshot()
        check(snapshot)
        snapshot.done()
    assert warm, "no save took the warm path"
    before = len(warm)
    variables["dyn"].assign(np.arange(5.0))  # another shape: the buffers no longer fit
    held = saver.snapshot()
    assert len(warm) == before, "a buffer of the old shape was used"
    check(held)
    variables["w"].assign_add(tf.ones_like(variables["w"]))
    variables["scale"].assign(-1.0)
    assert float(held.tensors["scale/.ATTRIBUTES/VARIABLE_VALUE"]) == 3.5, "a later update reached a held snapshot"
    np.testing.assert_array_equal(held.tensors["dyn/.ATTRIBUTES/VARIABLE_VALUE"], np.arange(5.0))
    held.done()
    snapshot = saver.snapshot()
    assert len(warm) == before + 1, "the refilled buffers were not reused"
    check(snapshot)
    snapshot.done()
