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

The host copy and its pooled buffers are in `rayhooks.snapshot`;
TrackableSaver's replay of TF's gather step in `rayhooks.snapshot_plan`.
"""

import contextlib
from typing import Dict, Mapping, Optional

import numpy as np

from rayhooks.snapshot import BufferPool, Snapshot, copy_all, host_copy
from rayhooks.snapshot_plan import SnapshotPlan, owns_slots, plan_applies, resolve, slot_variables, walk


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
        self._pool = BufferPool()

    def snapshot(self) -> Snapshot:
        tensors, nbytes, taken, pairs = {}, 0, {}, []
        for key, value in self.arrays.items():
            bufs = taken.setdefault(key, [])
            tensors[key], n = host_copy(value, self._pool, key, bufs, pairs)
            nbytes += n
        copy_all(pairs, sum(dst.nbytes for dst, _ in pairs))
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
        self._pool = BufferPool()
        self._plan: Optional[SnapshotPlan] = None
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
        if not plan_applies(saver):
            self._replace_plan(None)
            return self._gather(saver, self._pool)[0]
        nodes, edges = walk(saver._graph_view)
        plan = self._plan
        if plan is not None and plan.fits(nodes, edges):
            if plan.steps is None:  # a graph TF gathers in a way the plan cannot replay
                return self._gather(saver, self._pool)[0]
            snapshot = plan.snapshot(self._pool)
            if snapshot is not None:
                return snapshot
        owners = tuple(i for i, node in enumerate(nodes) if owns_slots(node))
        slots = slot_variables(nodes, owners)
        self._replace_plan(None)  # first, so this gather finds the old plan's buffers in the pool
        snapshot, serialized = self._gather(saver, self._pool)
        self._plan = SnapshotPlan.build(saver, nodes, edges, owners, slots, serialized)
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
                tensors[key], n = host_copy(resolve(trackable, key, value), pool, key, bufs)
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
