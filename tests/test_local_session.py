"""Tier 2: local `MonitoredTrainingSession` end to end on file:// and memory://."""

import logging
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest

import rayhooks as rh
from rayhooks.formats import state_file


def _local_dir(url):
    if url.startswith("memory://"):
        return None
    return url[len("file://"):] if url.startswith("file://") else url


def _committed(url):
    return [i.step for i in rh.CheckpointStore(rh.Storage(url)).committed()]


def _values(url, step):
    store = rh.CheckpointStore(rh.Storage(url))
    return store.reader(store.get(step)).read_tensors()


class Recorder(rh.CheckpointSaverListener):
    """Records listener calls, and what was committed when after_save ran."""

    def __init__(self, url):
        self.url = url
        self.calls = []
        self.latest_at_after_save = []

    def begin(self):
        self.calls.append(("begin",))

    def before_save(self, session, global_step_value):
        self.calls.append(("before_save", global_step_value))

    def after_save(self, session, global_step_value):
        self.calls.append(("after_save", global_step_value))
        latest = rh.CheckpointStore(rh.Storage(self.url)).latest()
        self.latest_at_after_save.append((global_step_value, latest.step, session.latest_checkpoint))

    def end(self, session, global_step_value):
        self.calls.append(("end", global_step_value))


def _numpy_state():
    return {"w": np.zeros((2, 3), np.float32), "b": np.zeros(4, np.float64)}


def _train(url, state, last_step, hooks=(), **kwargs):
    """Each step adds 1 to every array in place; returns the global step after the session."""

    def step():
        for value in state.values():
            value += 1
        return {"loss": float(state["w"][0, 0])}

    with rh.MonitoredTrainingSession(checkpoint_dir=url, state=state,
                                     hooks=[rh.StopAtStepHook(last_step=last_step)] + list(hooks),
                                     **kwargs) as sess:
        first = sess.global_step
        while not sess.should_stop():
            sess.run(step)
        return first, sess.global_step


def test_saves_at_the_right_steps_with_consistent_values(storage_url):
    state = _numpy_state()
    _train(storage_url, state, last_step=7, save_checkpoint_steps=3)
    assert _committed(storage_url) == [0, 3, 6, 7]
    for step in (0, 3, 6, 7):
        values = _values(storage_url, step)
        np.testing.assert_array_equal(values["w"], np.full((2, 3), step, np.float32))
        np.testing.assert_array_equal(values["b"], np.full(4, step, np.float64))
    text = rh.Storage(storage_url).read_bytes("checkpoint").decode()
    assert state_file.parse_state(text).model_checkpoint_path == "model.ckpt-7"


def test_listener_calls_and_after_save_sees_the_commit(storage_url):
    recorder = Recorder(storage_url)
    hook = rh.CheckpointSaverHook(storage_url, save_steps=2, listeners=[recorder])
    _train(storage_url, _numpy_state(), last_step=5, chief_only_hooks=[hook],
           save_checkpoint_secs=None)
    assert recorder.calls == [("begin",),
                              ("before_save", 0), ("after_save", 0),
                              ("before_save", 2), ("after_save", 2),
                              ("before_save", 4), ("after_save", 4),
                              ("before_save", 5), ("after_save", 5),
                              ("end", 5)]
    assert recorder.latest_at_after_save == [
        (s, s, storage_url + "/model.ckpt-%d" % s) for s in (0, 2, 4, 5)]


def test_resume_continues_from_the_saved_step(storage_url):
    _train(storage_url, _numpy_state(), last_step=7, save_checkpoint_steps=3)
    state = _numpy_state()
    w = state["w"]
    first, last = _train(storage_url, state, last_step=10, save_checkpoint_steps=3)
    assert (first, last) == (7, 10)
    np.testing.assert_array_equal(w, np.full((2, 3), 10, np.float32))  # restored in place, then trained
    # The resumed session saves at its first step (7, again) and then counts from there, as TF does.
    assert _committed(storage_url) == [0, 3, 6, 7, 10]
    np.testing.assert_array_equal(_values(storage_url, 7)["w"], np.full((2, 3), 7, np.float32))
    np.testing.assert_array_equal(_values(storage_url, 10)["b"], np.full(4, 10, np.float64))


def test_save_checkpoint_secs_with_a_fake_clock(storage_url):
    clock = rh.ManualClock(1000.0)
    state = _numpy_state()

    def step():
        clock.advance(1.0)
        state["w"] += 1

    with rh.MonitoredTrainingSession(checkpoint_dir=storage_url, state=state, save_checkpoint_secs=3.5,
                                     clock=clock, hooks=[rh.StopAtStepHook(num_steps=10)]) as sess:
        while not sess.should_stop():
            sess.run(step)
    assert _committed(storage_url) == [0, 4, 8, 10]


def test_steps_per_run(storage_url):
    _train(storage_url, _numpy_state(), last_step=10, save_checkpoint_steps=3, steps_per_run=2)
    assert _committed(storage_url) == [0, 4, 8, 10]


def test_end_of_input_ends_the_session_cleanly(storage_url):
    import tensorflow as tf
    for name, stop_error in [("stop_iteration", StopIteration()),
                             ("out_of_range", tf.errors.OutOfRangeError(None, None, "end of data"))]:
        url = storage_url + "/" + name
        state = _numpy_state()
        recorder = Recorder(url)
        hook = rh.CheckpointSaverHook(url, save_steps=100, listeners=[recorder])
        with rh.MonitoredTrainingSession(checkpoint_dir=url, state=state, chief_only_hooks=[hook],
                                         save_checkpoint_secs=None) as sess:
            for _ in range(3):
                sess.run(lambda: state["w"].__iadd__(1))
            raise stop_error
        assert recorder.calls[-1] == ("end", 3)
        assert _committed(url) == [0, 3]


def test_run_after_stop_is_an_error(storage_url):
    with rh.MonitoredTrainingSession(checkpoint_dir=storage_url, state=_numpy_state(),
                                     hooks=[rh.StopAtStepHook(last_step=1)]) as sess:
        sess.run(lambda: None)
        assert sess.should_stop()
        with pytest.raises(RuntimeError, match="should_stop"):
            sess.run(lambda: None)


def test_listener_stop_request_is_honoured(storage_url):
    class StopAfterSecondSave(rh.CheckpointSaverListener):
        def after_save(self, session, global_step_value):
            return global_step_value >= 2

    hook = rh.CheckpointSaverHook(storage_url, save_steps=2, listeners=[StopAfterSecondSave()])
    first, last = _train(storage_url, _numpy_state(), last_step=100, chief_only_hooks=[hook],
                         save_checkpoint_secs=None)
    assert last == 2
    assert _committed(storage_url) == [0, 2]


def test_handle_restores_a_chosen_checkpoint_into_other_arrays(storage_url):
    restored = []

    class Evaluate(rh.CheckpointSaverListener):
        def after_save(self, session, global_step_value):
            if global_step_value == 4:
                copy = {"w": np.zeros((2, 3), np.float32), "b": np.zeros(4)}
                restored.append((session.restore(2, into=copy), copy["w"].copy()))

    hook = rh.CheckpointSaverHook(storage_url, save_steps=2, listeners=[Evaluate()])
    _train(storage_url, _numpy_state(), last_step=5, chief_only_hooks=[hook], save_checkpoint_secs=None)
    assert len(restored) == 1
    step, w = restored[0]
    assert step == 2
    np.testing.assert_array_equal(w, np.full((2, 3), 2, np.float32))


# -- TensorFlow state --------------------------------------------------------------


def _keras_model(seed):
    import tensorflow as tf
    tf.keras.utils.set_random_seed(seed)
    model = tf.keras.Sequential([tf.keras.Input((4,)), tf.keras.layers.Dense(3, activation="relu"),
                                 tf.keras.layers.Dense(1)])
    optimizer = tf.keras.optimizers.Adam(0.05)
    optimizer.build(model.trainable_variables)
    return model, optimizer


def _train_step(model, optimizer):
    import tensorflow as tf
    x = tf.constant(np.linspace(-1, 1, 32, dtype=np.float32).reshape(8, 4))
    y = tf.constant(np.linspace(0, 1, 8, dtype=np.float32).reshape(8, 1))

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean((model(x) - y) ** 2)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return {"loss": loss}

    return step


def _assert_same_weights(a, b):
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_keras_model_and_optimizer_round_trip(storage_url):
    import tensorflow as tf
    model, optimizer = _keras_model(seed=1)
    ckpt = tf.train.Checkpoint(model=model, optimizer=optimizer)
    step = _train_step(model, optimizer)
    with rh.MonitoredTrainingSession(checkpoint_dir=storage_url, state=ckpt, save_checkpoint_steps=2,
                                     global_step=optimizer.iterations,
                                     hooks=[rh.StopAtStepHook(last_step=5)]) as sess:
        while not sess.should_stop():
            sess.run(step)
    assert int(optimizer.iterations.numpy()) == 5
    assert _committed(storage_url) == [0, 2, 4, 5]
    local = _local_dir(storage_url)
    if local is not None:
        assert os.path.exists(os.path.join(local, "graph.pbtxt"))

    fresh_model, fresh_optimizer = _keras_model(seed=2)
    with pytest.raises(AssertionError):
        _assert_same_weights(model.weights, fresh_model.weights)
    with rh.MonitoredTrainingSession(checkpoint_dir=storage_url, save_checkpoint_steps=2,
                                     state=tf.train.Checkpoint(model=fresh_model,
                                                               optimizer=fresh_optimizer)) as sess:
        assert sess.global_step == 5
        _assert_same_weights(model.weights, fresh_model.weights)
        _assert_same_weights(optimizer.variables, fresh_optimizer.variables)
        assert int(fresh_optimizer.iterations.numpy()) == 5

    if local is not None:  # plain TensorFlow, no rayhooks, reads the same checkpoint
        tf_model, tf_optimizer = _keras_model(seed=3)
        status = tf.train.Checkpoint(model=tf_model, optimizer=tf_optimizer).restore(
            tf.train.latest_checkpoint(local))
        status.assert_existing_objects_matched()
        _assert_same_weights(model.weights, tf_model.weights)
        _assert_same_weights(optimizer.variables, tf_optimizer.variables)


@pytest.mark.parametrize("updates_every, steps_per_run, warned", [(1, 1, None), (2, 1, "every accumulated"),
                                                                   (1, 2, "steps_per_run=1")])
def test_a_global_step_variable_that_moves_otherwise_than_the_runs_counted_is_warned_of_at_close(
        tmp_path, caplog, updates_every, steps_per_run, warned):
    """rayhooks reads global_step= once and then counts runs (TF1 read it every run): a step function
    that accumulates gradients over two runs numbers its checkpoints by runs, which must not pass
    silently. (steps_per_run=2 with one update a run is the other way round.)"""
    import tensorflow as tf
    counter = tf.Variable(0, dtype=tf.int64)
    runs = []

    def step():
        runs.append(1)
        if len(runs) % updates_every == 0:
            counter.assign_add(1)
    with caplog.at_level(logging.WARNING, logger="rayhooks"):
        with rh.MonitoredTrainingSession(checkpoint_dir=str(tmp_path), state={"w": np.zeros(1)},
                                         global_step=counter, steps_per_run=steps_per_run,
                                         hooks=[rh.StopAtStepHook(last_step=6)]) as sess:
            while not sess.should_stop():
                sess.run(step)
    messages = [r.getMessage() for r in caplog.records if "global_step=" in r.getMessage()]
    if warned is None:
        assert messages == []
        with rh.MonitoredSession(state={"w": np.zeros(1)}, global_step=tf.constant(100)) as sess:
            sess.run(step)                          # a constant is a start, not a variable to follow
        assert sess.global_step == 101
        assert not [r for r in caplog.records if "global_step=" in r.getMessage()]
    else:
        assert len(messages) == 1 and warned in messages[0] and "[step=6]" in messages[0]


def test_save_graph_def_writes_the_traced_graph(storage_url):
    import tensorflow as tf
    from google.protobuf import text_format
    from tensorboard.compat.proto import graph_pb2

    v = tf.Variable(0.0, name="counter")

    @tf.function
    def step():
        v.assign_add(1.0)
        return {"v": v.read_value()}

    with rh.MonitoredTrainingSession(checkpoint_dir=storage_url, state={"v": v}, save_checkpoint_steps=10,
                                     hooks=[rh.StopAtStepHook(last_step=2)]) as sess:
        while not sess.should_stop():
            sess.run(step)
    graph = text_format.Parse(rh.Storage(storage_url).read_bytes("graph.pbtxt").decode(), graph_pb2.GraphDef())
    ops = {node.op for node in graph.node}
    assert "AssignAddVariableOp" in ops


def test_plain_python_step_writes_no_graph(storage_url):
    _train(storage_url, _numpy_state(), last_step=2, save_checkpoint_steps=10)
    assert "graph.pbtxt" not in rh.Storage(storage_url).listdir()
    assert rh.Storage(storage_url).exists("checkpoint")


def test_save_graph_def_false_writes_no_graph(storage_url):
    import tensorflow as tf
    v = tf.Variable(0.0)

    @tf.function
    def step():
        v.assign_add(1.0)

    with rh.MonitoredTrainingSession(checkpoint_dir=storage_url, state={"v": v}, save_checkpoint_steps=10,
                                     save_graph_def=False, hooks=[rh.StopAtStepHook(last_step=2)]) as sess:
        while not sess.should_stop():
            sess.run(step)
    assert "graph.pbtxt" not in rh.Storage(storage_url).listdir()
    assert _committed(storage_url) == [0, 2]


def test_resume_skips_a_damaged_newest_checkpoint(storage_url, caplog):
    import logging
    _train(storage_url, _numpy_state(), last_step=7, save_checkpoint_steps=3)
    storage = rh.Storage(storage_url)
    damaged = "model.ckpt-7.data-00000-of-00001"
    data = bytearray(storage.read_bytes(damaged))
    data[-1] ^= 0x55
    storage.write_bytes(damaged, bytes(data))

    state = _numpy_state()
    with caplog.at_level(logging.WARNING, logger="rayhooks"):
        first, last = _train(storage_url, state, last_step=9, save_checkpoint_steps=3)
    assert (first, last) == (6, 9)  # resumed from step 6, the newest checkpoint that verifies
    assert storage_url + "/" + damaged in caplog.text
    np.testing.assert_array_equal(state["w"], np.full((2, 3), 9, np.float32))
    np.testing.assert_array_equal(_values(storage_url, 9)["w"], np.full((2, 3), 9, np.float32))
    store = rh.CheckpointStore(storage)
    assert store.latest().step == 9
    assert store.verify(store.latest()) == []


def test_when_every_committed_checkpoint_is_damaged_resume_raises_and_leaves_them(storage_url):
    _train(storage_url, _numpy_state(), last_step=6, save_checkpoint_steps=3, max_to_keep=1)
    storage = rh.Storage(storage_url)
    damaged = "model.ckpt-6.data-00000-of-00001"
    data = bytearray(storage.read_bytes(damaged))
    data[0] ^= 0x55
    storage.write_bytes(damaged, bytes(data))
    with pytest.raises(ValueError) as error:
        _train(storage_url, _numpy_state(), last_step=12, save_checkpoint_steps=3, max_to_keep=1)
    message = str(error.value)
    assert storage_url in message and "steps 6" in message and "damaged" in message and "rayhooks verify" in message
    assert storage.read_bytes(damaged) == bytes(data)  # left for repair: not retrained over, not retained away
    assert _committed(storage_url) == [6]


def test_resume_finds_the_hooks_checkpoints_however_the_directory_is_spelled(tmp_path):
    """The session resumes from the checkpoint hook's own store (its basename) when the two name
    one directory, whether as a path or a file:// URL."""
    d = str(tmp_path / "run")

    def hook():
        return rh.CheckpointSaverHook(d, save_steps=2, checkpoint_basename="ckpt")
    _train(d, _numpy_state(), last_step=4, save_checkpoint_secs=None, chief_only_hooks=[hook()])
    state = _numpy_state()
    first, last = _train("file://" + d, state, last_step=6, save_checkpoint_secs=None, chief_only_hooks=[hook()])
    assert (first, last) == (4, 6)
    np.testing.assert_array_equal(state["w"], np.full((2, 3), 6, np.float32))


@pytest.mark.parametrize("where", ["first", "last"])
def test_a_damaged_newest_tf_checkpoint_falls_back_while_verified_during_restore(tmp_path, caplog, where):
    """The checksum check runs beside TF's restore: damage that TF trips on, or that only the
    checksum sees, both end in the previous checkpoint restored, with the damaged file named."""
    import logging
    import tensorflow as tf
    url = str(tmp_path / "run")
    v = tf.Variable(np.zeros(1 << 16, np.float32))

    def step():
        v.assign_add(tf.ones_like(v))

    for last in (3, 6):
        with rh.MonitoredTrainingSession(checkpoint_dir=url, save_checkpoint_steps=3, state=tf.train.Checkpoint(v=v),
                                         save_summaries_steps=None, log_step_count_steps=None,
                                         hooks=[rh.StopAtStepHook(last_step=last)]) as sess:
            while not sess.should_stop():
                sess.run(step)
    storage = rh.Storage(url)
    damaged = "model.ckpt-6.data-00000-of-00001"
    data = bytearray(storage.read_bytes(damaged))
    data[0 if where == "first" else -1] ^= 0x55
    storage.write_bytes(damaged, bytes(data))
    v.assign(tf.zeros_like(v))
    with caplog.at_level(logging.WARNING, logger="rayhooks"):
        info = rh.CheckpointStore(storage).restore_latest(rh.TrackableSaver(tf.train.Checkpoint(v=v)))
    assert info.step == 3 and damaged in caplog.text
    np.testing.assert_array_equal(v.numpy(), np.full(1 << 16, 3, np.float32))


def test_resuming_into_a_state_of_another_structure_raises_rather_than_train_from_fresh_weights(tmp_path):
    """TF1's Saver raised here; an unchecked TF2 restore binds nothing and training would restart at step 10."""
    import tensorflow as tf
    url = str(tmp_path / "ckpt")

    def run(make_state, last_step):
        model = tf.keras.Sequential([tf.keras.Input((4,)), tf.keras.layers.Dense(1)])
        with rh.MonitoredTrainingSession(checkpoint_dir=url, save_checkpoint_steps=10, save_summaries_steps=None,
                                         hooks=[rh.StopAtStepHook(last_step=last_step)],
                                         state=make_state(model)) as sess:
            while not sess.should_stop():
                sess.run(lambda: model.layers[0].bias.assign_add([1.0]))
        return model

    run(lambda m: tf.train.Checkpoint(model=m), 10)
    with pytest.raises(ValueError, match=r"model.ckpt-10 does not match the state it is restored into"):
        run(lambda m: m, 20)                              # the model itself, where the run saved Checkpoint(model=)
    assert rh.CheckpointStore(rh.Storage(url)).latest().step == 10
    model = run(lambda m: tf.train.Checkpoint(model=m), 20)  # the same structure resumes
    assert model.layers[0].bias.numpy()[0] == 20.0


def test_resuming_into_a_state_of_other_shapes_names_the_checkpoint(tmp_path):
    """Dense(4) saved, Dense(8) resumed: TF's own error named neither the checkpoint nor the step."""
    import tensorflow as tf
    url = str(tmp_path / "ckpt")

    def run(units, last_step):
        model = tf.keras.Sequential([tf.keras.Input((4,)), tf.keras.layers.Dense(units)])
        with rh.MonitoredTrainingSession(checkpoint_dir=url, save_checkpoint_steps=10, save_summaries_steps=None,
                                         hooks=[rh.StopAtStepHook(last_step=last_step)],
                                         state=tf.train.Checkpoint(model=model)) as sess:
            while not sess.should_stop():
                sess.run(lambda: None)

    run(4, 10)
    with pytest.raises(ValueError) as error:
        run(8, 20)
    message = str(error.value)
    assert "model.ckpt-10 does not fit the state it is restored into" in message
    assert "shapes and dtypes that saved it" in message and len(message) < 1000


@pytest.mark.parametrize("saved, other, says", [
    (np.zeros((3, 4), np.float32), np.zeros((4, 3), np.float32), "(3, 4) float32 saved, (4, 3) float32 here"),
    (np.zeros((3, 4), np.float32), np.zeros((3, 4), np.float64), "(3, 4) float32 saved, (3, 4) float64 here"),
    # strings come back as objects; a shape that broadcasts was silently broadcast
    (np.array(["ab", "cd"]), np.full((2, 2), "", "<U2"), "(2,) object saved, (2, 2) <U2 here"),
], ids=["shape", "dtype", "strings"])
def test_resuming_a_numpy_state_of_other_shapes_or_dtypes_names_the_checkpoint(tmp_path, saved, other, says):
    # Before, the saved array was swapped into the dict: the step trained the user's own array from
    # zeros while every later checkpoint saved the swapped-in one.
    url = str(tmp_path / "ckpt")

    def run(w, last_step):
        state = {"w": w}
        with rh.MonitoredTrainingSession(checkpoint_dir=url, save_checkpoint_steps=10, save_summaries_steps=None,
                                         hooks=[rh.StopAtStepHook(last_step=last_step)], state=state) as sess:
            while not sess.should_stop():
                sess.run(lambda: None)

    run(saved, 10)
    with pytest.raises(ValueError) as error:
        run(other, 20)
    message = str(error.value)
    assert "model.ckpt-10 does not fit the state it is restored into" in message
    assert "'w': %s" % says in message


def test_a_basename_holding_tmp_keeps_its_checkpoints(tmp_path):
    url = str(tmp_path)
    with rh.MonitoredTrainingSession(
            state={"w": np.zeros(2)}, save_checkpoint_secs=None, save_summaries_steps=None,
            chief_only_hooks=[rh.CheckpointSaverHook(url, save_steps=2, checkpoint_basename="ckpt.tmp")],
            hooks=[rh.StopAtStepHook(last_step=5)]) as sess:
        while not sess.should_stop():
            sess.run(lambda: None)
    store = rh.CheckpointStore(rh.Storage(url), "ckpt.tmp")
    assert [i.step for i in store.committed()] == [0, 2, 4, 5] and store.partials() == []
