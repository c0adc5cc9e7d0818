"""Figure 2: how long one checkpoint stalls the training loop, and the memory it takes.

For each state size, one fresh worker process measures every method in turn:

* `numpy_copy` — the limit: `np.copyto` of the same arrays into preallocated
  buffers that are reused (warm); the first copy goes into fresh buffers;
* `rh_async_numpy`, `rh_async_tf` — rayhooks `AsyncCheckpointSaverHook` with a
  dict of float32 numpy arrays (`NumpySaver`) or a `tf.train.Checkpoint` of
  `tf.Variable`s (`TrackableSaver`);
* `rh_sync_numpy`, `rh_sync_tf` — rayhooks `CheckpointSaverHook` (blocking);
* `tf1_hook` — TF1's blocking `tf.compat.v1.train.CheckpointSaverHook` in a
  `MonitoredSession`, graph variables of the same sizes;
* `tf2_write`, `tf2_write_async` — `tf.train.Checkpoint.write`, plain and with
  `tf.train.CheckpointOptions(enable_async=True)`;
* `raytrain_sync`, `raytrain_async` (anchors, no target) — Ray Train (v2 API)
  function trainer with 1 worker: the state is written as 8 `.npy` files into a
  fresh local directory (Ray Train checkpoints are directories; writing them is
  the user's job), then `ray.train.report(metrics,
  checkpoint=Checkpoint.from_directory(d), checkpoint_upload_mode=SYNC | ASYNC)`
  (`from ray.train import CheckpointUploadMode`) hands it over: SYNC copies it
  to the run's `storage_path` before returning, ASYNC uploads it on a thread.
  The stall is the wall time of the write plus the report() call. Every size
  and both modes run in one Ray Train run, in its worker process (the arrays,
  the step and the anchor copy live there), with fewer saves than the local
  methods; before each save the previous one is registered by the controller
  (waited for, untimed, with `get_all_reported_checkpoints(COMMITTED)`), so it
  too starts with the previous save committed, and `os.sync()` has run
  (untimed: neither np.save nor the upload fsyncs, and the next save would
  otherwise pay for writing back this one's dirty pages). Ray starts once per run of
  this figure, after the local workers (`ray.init(num_cpus=2)` unless it is
  running), and is shut down before the memory worker if started here. Tiny
  mode (the smoke tests) skips these anchors unless `run(ray=True)`.

The state is 8 float32 arrays (8 x 8 MB for 64 MB); the TF-backed methods
share one set of `tf.Variable`s holding the same values. A full run (not
`--quick`) adds a 2048 MB state, where the machine has eight times that in
available memory (its worker peaked at 6.5 times the state); the results say
when it was skipped and why. Another state holds
the 64 MB in 512 arrays (128 KB each), about the variable count of a
mid-sized model with its optimizer slots, where the per-variable cost of a
save shows: only the copy, the asynchronous TrackableSaver hook, TF1's hook
and TF2's async write run on it. Every training step
writes one element of every array or variable, as an optimizer would (TF2's
async checkpoint hides its copy when nothing changes). The stall of a hook is
the wall time of the `run()` that triggers the save minus the median `run()`
of a non-trigger step measured just before it; saves are triggered with a
`ManualClock` (rayhooks) or `save_steps` (TF1), and each one starts with the
previous save committed. The save made at session creation is the *first*
save (buffers cold) and is reported apart; the figures are the second and
later saves. Right before every save the worker times a warm `np.copyto` of
the same bytes, so each stall has an anchor taken seconds away from it; the
"x copy" column is the median of those paired ratios.

A separate worker process runs only asynchronous NumpySaver saves of the
512 MB state and reports its VmHWM (peak RSS) against its RSS before the
state existed (TensorFlow, which rayhooks' session imports, already loaded).
"""

import argparse
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

import rayhooks as rh
from benchmarks import common
from benchmarks.raytrain import ensure_ray, raytrain_error, raytrain_fit, raytrain_poll_secs, save_npy_dir
from benchmarks.common import (MB, BenchResult, Stat, Target, current_rss, emit, fmt_mb, fmt_ratio,
                               paired_ratios, peak_rss, run_worker, score_range)

NAME = "checkpoint_stall"
TITLE = "Figure 2: training-loop stall of one checkpoint"
PARTS = 8
MANY_PARTS = 512      # the same bytes in as many variables as a mid-sized model and its optimizer slots
LARGE = 2048 * MB     # "and 2 GB where memory allows": full mode only
LARGE_WARM = 3
# Its worker peaked at 13.4 GB (6.5x the state): the state, the anchor's buffers, the tf.Variables, a snapshot
# and TF1's graph variables at once, and TF's writers stage more.
LARGE_MEMORY_FACTOR = 8
MANY_METHODS = ("numpy_copy", "rh_async_tf", "tf1_hook", "tf2_write_async")
COPY_TARGET = 1.2     # async stall within 1.2x of the numpy copy
TF1_TARGET = 10.0     # and at least 10x below TF1's blocking hook
MEMORY_HEADROOM = 200 * MB
WAIT_COMMIT_SECS = 300.0
STEP_SAMPLES = 5
MAX_IN_FLIGHT = 1     # the async hook's default
QUIESCE_SECS = 0.05   # before each anchor copy: TF's thread pools spin on for a while after a step

METHODS = ("numpy_copy", "rh_async_numpy", "rh_async_tf", "rh_sync_numpy", "rh_sync_tf",
           "tf1_hook", "tf2_write", "tf2_write_async")
RAYTRAIN_MODES = ("SYNC", "ASYNC")
RAYTRAIN_METHODS = tuple("raytrain_" + m.lower() for m in RAYTRAIN_MODES)
LABELS = {
    "numpy_copy": "numpy np.copyto into reused buffers (limit)",
    "rh_async_numpy": "rayhooks AsyncCheckpointSaverHook, NumpySaver",
    "rh_async_tf": "rayhooks AsyncCheckpointSaverHook, TrackableSaver",
    "rh_sync_numpy": "rayhooks CheckpointSaverHook (blocking), NumpySaver",
    "rh_sync_tf": "rayhooks CheckpointSaverHook (blocking), TrackableSaver",
    "tf1_hook": "TF1 tf.compat.v1.train.CheckpointSaverHook (blocking)",
    "tf2_write": "TF2 tf.train.Checkpoint.write (sync)",
    "tf2_write_async": "TF2 Checkpoint.write, CheckpointOptions async",
    "raytrain_sync": "Ray Train: write .npy dir + report(checkpoint), upload SYNC (anchor)",
    "raytrain_async": "Ray Train: write .npy dir + report(checkpoint), upload ASYNC (anchor)",
}


def _config(quick, tiny, large=False):
    """[(size_bytes, warm saves, arrays)], memory size, memory saves; `large`: with the 2 GB state (full mode)."""
    if tiny:
        return [(1 * MB, 1, PARTS)], 1 * MB, 1
    if quick:
        return [(64 * MB, 5, PARTS), (512 * MB, 1, PARTS), (64 * MB, 3, MANY_PARTS)], 512 * MB, 1
    sizes = [(64 * MB, 10, PARTS), (512 * MB, 5, PARTS), (64 * MB, 5, MANY_PARTS)]
    if large:
        sizes.insert(2, (LARGE, LARGE_WARM, PARTS))
    return sizes, 512 * MB, 4


def _available_memory():
    """MemAvailable from /proc/meminfo, in bytes; None where the kernel does not say."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _large_state_skipped(quick):
    """Why the 2 GB state does not run (a sentence), or None where it does: full mode, memory allowing."""
    if quick:
        return "the 2048 MB state runs in full mode only (python -m benchmarks, without --quick)"
    need, have = LARGE * LARGE_MEMORY_FACTOR, _available_memory()
    if have is None or have < need:
        return "the 2048 MB state was skipped: it needs %s of available memory, this machine has %s" % (
            fmt_mb(need), "an unknown amount" if have is None else fmt_mb(have))
    return None


def _state_label(nbytes, parts):
    return fmt_mb(nbytes) + ("" if parts == PARTS else " in %d variables" % parts)


def _ray_config(quick, tiny, large=False):
    """[(size_bytes, warm saves)] of the Ray Train anchors: fewer, as each waits for a controller poll (2 s)."""
    if tiny:
        return [(1 * MB, 1)]
    if quick:
        return [(64 * MB, 3), (512 * MB, 1)]
    return [(64 * MB, 5), (512 * MB, 3)] + ([(LARGE, 2)] if large else [])


# -- the state ----------------------------------------------------------------------

def make_arrays(nbytes, parts=PARTS):
    """`parts` float32 arrays totalling `nbytes`, every page touched."""
    n = max(1, nbytes // parts // 4)
    return {"layer_%d/kernel" % i: np.full(n, float(i + 1), np.float32) for i in range(parts)}


class CopyAnchor:
    """`np.copyto` of the state into buffers allocated once and reused: the floor of any host snapshot."""

    def __init__(self, arrays):
        self.arrays = arrays
        started = time.perf_counter()
        self.buffers = {k: np.empty_like(v) for k, v in arrays.items()}
        self._copy()
        self.first = time.perf_counter() - started

    def _copy(self):
        for key, value in self.arrays.items():
            np.copyto(self.buffers[key], value)

    def time(self):
        time.sleep(QUIESCE_SECS)
        started = time.perf_counter()
        self._copy()
        return time.perf_counter() - started


def _timed_runs(run, count):
    times = []
    for _ in range(count):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _numpy_step(arrays):
    """A trivial training step that still writes every array (as an optimizer would)."""
    values = list(arrays.values())

    def step():
        for a in values:
            a[0] += 1.0
    return step


def _tf_state(arrays):
    """tf.Variables holding `arrays`, their tf.train.Checkpoint, and a step that writes every one."""
    import tensorflow as tf
    variables = {k.replace("/", "_"): tf.Variable(v) for k, v in arrays.items()}
    ckpt = tf.train.Checkpoint(**variables)
    values = list(variables.values())

    @tf.function
    def step():
        for v in values:
            v.scatter_nd_add([[0]], [1.0])
    step()  # trace now, not inside a timed run
    return ckpt, step


# -- rayhooks -------------------------------------------------------------------------

class _Bracket(rh.CheckpointSaverListener):
    """A listener that times a save from before_save to after_save (blocking hooks: the whole stall)."""

    def __init__(self):
        self.began = {}
        self.secs = {}

    def before_save(self, session, step):
        self.began[step] = time.perf_counter()

    def after_save(self, session, step):
        self.secs[step] = time.perf_counter() - self.began[step]


def bench_rayhooks(arrays, anchor, warm, tmp, asynchronous, tf_state=None):
    if tf_state is not None:
        state, step = tf_state
    else:
        state, step = arrays, _numpy_step(arrays)
    clock = rh.ManualClock(0.0)
    listener = _Bracket()
    kind = rh.AsyncCheckpointSaverHook if asynchronous else rh.CheckpointSaverHook
    hook = kind(tmp, save_secs=1.0, clock=clock, listeners=[listener], max_to_keep=2, save_graph_def=False)

    started = time.perf_counter()
    sess = rh.MonitoredSession(hooks=[hook], state=state)
    creation = time.perf_counter() - started
    first_snapshot = hook.last_stall_secs
    # Async: the loop waited for the snapshot only; blocking: for the whole save.
    first = first_snapshot if asynchronous else listener.secs[0]

    def run():
        sess.run(step)

    def wait_committed(step_no):
        deadline = time.monotonic() + WAIT_COMMIT_SECS
        plan = getattr(sess.saver, "_plan", None)
        if plan is not None and not plan.trace_idle.wait(WAIT_COMMIT_SECS):  # a many-variable state's one-off trace
            raise TimeoutError("TrackableSaver's read function not traced after %.0fs" % WAIT_COMMIT_SECS)
        suffix = "-%d" % step_no
        while not (sess.handle.latest_checkpoint or "").endswith(suffix):
            if time.monotonic() > deadline:
                raise TimeoutError("checkpoint %d not committed after %.0fs" % (step_no, WAIT_COMMIT_SECS))
            time.sleep(0.005)
            run()  # after_save runs in the training thread, at a run

    stalls, anchors, snapshots, steps_secs, next_extra = [], [], [], [], []
    last_saved = 0
    for _ in range(warm):
        wait_committed(last_saved)
        anchors.append(anchor.time())
        step_secs = _timed_runs(run, STEP_SAMPLES)
        clock.advance(1.0)
        took = _timed_runs(run, 1)  # this run triggers the save
        last_saved = sess.global_step
        snapshots.append(hook.last_stall_secs)
        next_extra.append(_timed_runs(run, 1) - step_secs)  # async: the writer now competes with training
        stalls.append(max(took - step_secs, 0.0))
        steps_secs.append(step_secs)
    plan = getattr(sess.saver, "_plan", None)
    trace_secs = plan.trace_secs if plan is not None else None
    breakdown = _snapshot_breakdown(sess, plan, run) if plan is not None and plan._read_all is not None else None
    sess.close()
    committed = sorted(int(s) for s in listener.secs)
    skipped = getattr(hook, "skipped_saves", 0)
    if skipped:
        raise AssertionError("%d saves were skipped; each save must start with the previous committed" % skipped)
    return {"first": first, "first_snapshot": first_snapshot, "creation": creation, "stalls": stalls,
            "anchors": anchors, "snapshots": snapshots, "step_secs": steps_secs, "next_extra": next_extra,
            "committed": committed, "expected_commits": warm + 2,  # + the final save at end()
            "trace_secs": trace_secs, "breakdown": breakdown}


def _snapshot_breakdown(sess, plan, run, repeats=7):
    """Two parts of a planned TrackableSaver snapshot, timed apart after the saves: the object-graph walk
    that checks the plan still fits, and TF's reads of the variables (the traced function)."""
    from rayhooks import snapshot_plan
    graph_view = sess.saver.checkpoint._saver._graph_view
    walk, reads = [], []
    for _ in range(repeats):
        run()  # as before a save: the state just written by a step
        started = time.perf_counter()
        snapshot_plan.walk(graph_view)
        walk.append(time.perf_counter() - started)
        started = time.perf_counter()
        plan._read_all()
        reads.append(time.perf_counter() - started)
    return {"walk": statistics.median(walk), "reads": statistics.median(reads), "variables": len(plan.reads),
            "nodes": len(plan.nodes), "repeats": repeats}


# -- TensorFlow -----------------------------------------------------------------------

def bench_tf1_hook(arrays, anchor, warm, tmp):
    import tensorflow as tf

    v1 = tf.compat.v1
    every = 2 + STEP_SAMPLES  # per period: the step after a save, STEP_SAMPLES plain steps, the trigger
    graph = tf.Graph()
    with graph.as_default():
        global_step = v1.train.get_or_create_global_step()
        updates = []
        for key, value in arrays.items():
            var = v1.get_variable(key.replace("/", "_"), shape=value.shape, dtype=tf.float32,
                                  initializer=v1.ones_initializer())
            updates.append(v1.scatter_add(var, [0], [1.0]))
        with tf.control_dependencies(updates):
            train_op = v1.assign_add(global_step, 1)
        scaffold = v1.train.Scaffold(saver=v1.train.Saver(max_to_keep=2))

        class Bracket(v1.train.CheckpointSaverListener):
            def __init__(self):
                self.began, self.secs = {}, {}

            def before_save(self, session, step):
                self.began[step] = time.perf_counter()

            def after_save(self, session, step):
                self.secs[step] = time.perf_counter() - self.began[step]

        listener = Bracket()
        hook = v1.train.CheckpointSaverHook(tmp, save_steps=every, scaffold=scaffold, listeners=[listener])
        started = time.perf_counter()
        sess = v1.train.MonitoredSession(v1.train.ChiefSessionCreator(scaffold=scaffold), hooks=[hook])
        creation = time.perf_counter() - started

        def run():
            sess.run(train_op)

        stalls, anchors, steps_secs, next_extra = [], [], [], []
        after_save = _timed_runs(run, 1)  # step 1, the first after the save at creation
        for _ in range(warm):
            anchors.append(anchor.time())
            step_secs = _timed_runs(run, STEP_SAMPLES)
            took = _timed_runs(run, 1)  # the every-th step: triggers the save
            after_save = _timed_runs(run, 1)
            stalls.append(max(took - step_secs, 0.0))
            next_extra.append(after_save - step_secs)
            steps_secs.append(step_secs)
        sess.close()
    saves = sorted(int(s) for s in listener.secs)
    return {"first": listener.secs[0], "creation": creation, "stalls": stalls, "anchors": anchors,
            "step_secs": steps_secs, "next_extra": next_extra, "committed": saves,
            "expected_commits": warm + 2, "bracket_warm": [listener.secs[s] for s in saves[1:warm + 1]]}


def _tf2_async_options():
    import tensorflow as tf
    try:
        return tf.train.CheckpointOptions(enable_async=True)
    except TypeError:
        try:
            return tf.train.CheckpointOptions(experimental_enable_async_checkpoint=True)
        except TypeError:
            return None


def bench_tf2_write(tf_state, anchor, warm, tmp, asynchronous):
    options = _tf2_async_options() if asynchronous else None
    if asynchronous and options is None:
        return {"unavailable": "this TensorFlow has no async CheckpointOptions"}
    ckpt, step = tf_state
    prefix = os.path.join(tmp, "ckpt")

    def write(i):
        path = "%s-%d" % (prefix, i)
        started = time.perf_counter()
        if options is None:
            ckpt.write(path)
        else:
            ckpt.write(path, options=options)
        took = time.perf_counter() - started
        return took

    def settle(i):
        if options is not None:
            ckpt.sync()  # untimed: the next save starts with this one finished, as in the hooks
        if i >= 2:  # keep two on disk, as the hooks' max_to_keep=2
            for name in os.listdir(tmp):
                if name.startswith("ckpt-%d." % (i - 2)):
                    os.remove(os.path.join(tmp, name))

    first = write(0)
    settle(0)
    stalls, anchors, next_extra, steps_secs = [], [], [], []
    for i in range(1, warm + 1):
        anchors.append(anchor.time())
        step_secs = _timed_runs(step, STEP_SAMPLES)
        stalls.append(write(i))
        next_extra.append(_timed_runs(step, 1) - step_secs)  # async: TF copies a variable updated mid-save
        steps_secs.append(step_secs)
        settle(i)
    written = sorted(int(n.split("-")[1].split(".")[0]) for n in os.listdir(tmp) if n.endswith(".index"))
    return {"first": first, "stalls": stalls, "anchors": anchors, "next_extra": next_extra,
            "step_secs": steps_secs, "committed": written, "expected_commits": min(2, warm + 1)}


def bench_numpy_copy(arrays, anchor, warm):
    anchors = [anchor.time() for _ in range(warm)]
    fresh = CopyAnchor(arrays)  # first copy into fresh, never-touched buffers
    first = fresh.first
    del fresh
    return {"first": first, "stalls": list(anchors), "anchors": anchors}


def measure(size, warm, methods, tmp_root, parts=PARTS):
    """Runs `methods` for one state size in this process; returns {method: result}."""
    arrays = make_arrays(size, parts)
    nbytes = sum(a.nbytes for a in arrays.values())
    anchor = CopyAnchor(arrays)
    out = {"nbytes": nbytes, "parts": parts, "methods": {}}
    tf_state = None  # one set of tf.Variables for every TF-backed method: paging in 512 MB is slow

    def shared_tf_state():
        nonlocal tf_state
        if tf_state is None:
            tf_state = _tf_state(arrays)
        return tf_state

    for method in methods:
        tmp = tempfile.mkdtemp(prefix=method + "-", dir=tmp_root)
        try:
            if method == "numpy_copy":
                result = bench_numpy_copy(arrays, anchor, warm)
            elif method.startswith("rh_"):
                result = bench_rayhooks(arrays, anchor, warm, tmp, asynchronous="async" in method,
                                        tf_state=shared_tf_state() if method.endswith("_tf") else None)
            elif method == "tf1_hook":
                result = bench_tf1_hook(arrays, anchor, warm, tmp)
            elif method == "tf2_write":
                result = bench_tf2_write(shared_tf_state(), anchor, warm, tmp, asynchronous=False)
            elif method == "tf2_write_async":
                result = bench_tf2_write(shared_tf_state(), anchor, warm, tmp, asynchronous=True)
            else:
                raise ValueError("unknown method %r; known: %s" % (method, ", ".join(METHODS)))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            gc.collect()  # the method's session and buffers, before the next one's: 2 GB each at the largest
        out["methods"][method] = result
    return out


def measure_memory(size, saves, tmp_root):
    """Peak RSS of a process that runs asynchronous NumpySaver saves of a `size` state."""
    import tensorflow  # noqa: F401 -- rayhooks' session imports it; keep it out of the delta

    baseline = current_rss()
    arrays = make_arrays(size)
    nbytes = sum(a.nbytes for a in arrays.values())
    with_state = current_rss()
    tmp = tempfile.mkdtemp(prefix="memory-", dir=tmp_root)
    try:
        clock = rh.ManualClock(0.0)
        hook = rh.AsyncCheckpointSaverHook(tmp, save_secs=1.0, clock=clock, max_to_keep=2, save_graph_def=False,
                                           max_in_flight=MAX_IN_FLIGHT)
        sess = rh.MonitoredSession(hooks=[hook], state=arrays)
        last = 0
        for _ in range(saves):
            while not (sess.handle.latest_checkpoint or "").endswith("-%d" % last):
                time.sleep(0.005)
                sess.run(lambda: None)
            clock.advance(1.0)
            sess.run(lambda: None)
            last = sess.global_step
        sess.close()
        committed = len(hook.store.committed())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"nbytes": nbytes, "baseline_rss": baseline, "state_rss": with_state, "peak_rss": peak_rss(),
            "saves": saves + 1, "max_in_flight": MAX_IN_FLIGHT, "committed_at_end": committed}


# -- Ray Train ------------------------------------------------------------------------

def raytrain_stall_fn(config):
    """On the Ray Train worker: per size, SYNC then ASYNC saves, each timed as writing the .npy files + report()."""
    import ray.train
    from ray.train import Checkpoint, CheckpointConsistencyMode, CheckpointUploadMode

    counter = [0]
    out = {}

    def committed():
        """Untimed: waits until the controller has registered every report so far; the names it keeps."""
        found = ray.train.get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED,
                                                       timeout_s=config["wait_secs"])
        return {c.checkpoint.path.rstrip("/").rsplit("/", 1)[-1] for c in found}

    for size, warm in config["sizes"]:
        arrays = make_arrays(size)
        anchor = CopyAnchor(arrays)
        step = _numpy_step(arrays)
        methods = {}
        for mode in config["modes"]:
            upload = getattr(CheckpointUploadMode, mode)
            local_dirs = []

            def save():
                counter[0] += 1
                name = "ckpt-%06d" % counter[0]
                directory = tempfile.mkdtemp(prefix="raytrain-%s-" % mode.lower(), dir=config["tmp"])
                local_dirs.append(directory)
                started = time.perf_counter()
                save_npy_dir(arrays, directory)
                written = time.perf_counter()
                ray.train.report({"save": counter[0]}, checkpoint=Checkpoint.from_directory(directory),
                                 checkpoint_dir_name=name, checkpoint_upload_mode=upload)
                return name, written - started, time.perf_counter() - written

            def settle(name):
                """Untimed: the save registered, its local directory removed (ASYNC removes it after the upload),
                and its files on disk: np.save and the upload do not fsync, so the next save would otherwise
                pay for writing back this one's dirty pages."""
                ok = name in committed()
                while local_dirs:
                    shutil.rmtree(local_dirs.pop(), ignore_errors=True)
                os.sync()
                return ok

            committed()  # the previous mode's saves
            name, first_write, first_report = save()
            commits = [name] if settle(name) else []
            stalls, writes, reports, anchors, steps_secs, next_extra = [], [], [], [], [], []
            for _ in range(warm):
                anchors.append(anchor.time())
                step_secs = _timed_runs(step, STEP_SAMPLES)
                name, wrote, reported = save()
                next_extra.append(_timed_runs(step, 1) - step_secs)  # ASYNC: the upload now competes with training
                stalls.append(wrote + reported)
                writes.append(wrote)
                reports.append(reported)
                steps_secs.append(step_secs)
                if settle(name):
                    commits.append(name)
            methods["raytrain_" + mode.lower()] = {
                "first": first_write + first_report, "first_write": first_write, "first_report": first_report,
                "stalls": stalls, "writes": writes, "reports": reports, "anchors": anchors,
                "step_secs": steps_secs, "next_extra": next_extra, "committed": commits,
                "expected_commits": warm + 1}
        out[str(size)] = {"nbytes": sum(a.nbytes for a in arrays.values()), "methods": methods}
        del arrays, anchor, step
    with open(config["out"], "w") as f:
        json.dump(out, f)


def measure_raytrain(sizes, tmp_root):
    """The Ray Train anchors, one Ray Train run for every size (Ray started here unless running).

    Returns ({size: {"nbytes", "methods"}}, facts about the run).
    """
    began = entered = time.perf_counter()
    ray_mod, started = ensure_ray(sys.modules[__name__], common)
    ray_start = time.perf_counter() - began
    try:
        out = os.path.join(tmp_root, "raytrain-stall.json")
        began = time.perf_counter()
        raytrain_fit(raytrain_stall_fn, {"sizes": [list(sw) for sw in sizes], "modes": list(RAYTRAIN_MODES),
                                         "tmp": tmp_root, "wait_secs": WAIT_COMMIT_SECS, "out": out},
                     os.path.join(tmp_root, "raytrain-storage"), "stall")
        fit_secs = time.perf_counter() - began
        with open(out) as f:
            got = {int(k): v for k, v in json.load(f).items()}
        poll = raytrain_poll_secs()
    finally:
        if started:
            ray_mod.shutdown()
    return got, {"wall_secs": time.perf_counter() - entered, "fit_secs": fit_secs, "ray_start_secs": ray_start,
                 "ray_started_here": started,
                 "poll_secs": poll, "sizes": [list(sw) for sw in sizes]}


# -- the figure -----------------------------------------------------------------------

def _ms(stat):
    return stat.format(1 if stat.median >= 10 else 2)


def run(quick=False, tiny=False, methods=METHODS, isolate=True, memory=True, tmp_root=None, ray=None):
    """Measures every size (one worker process each unless `isolate` is False), then, if `ray` (default: yes,
    except in tiny mode), the Ray Train anchors, and, if `memory`, the peak RSS of a separate process making
    asynchronous saves."""
    if ray is None:
        ray = not tiny
    large_skipped = None if tiny else _large_state_skipped(quick)  # decided once: free memory changes as it runs
    large = not tiny and large_skipped is None
    sizes, mem_size, mem_saves = _config(quick, tiny, large)
    own_tmp = tmp_root is None
    tmp_root = tmp_root or tempfile.mkdtemp(prefix="rayhooks-bench-ckpt-")
    results = {}
    try:
        for size, warm, parts in sizes:
            run_methods = methods if parts == PARTS else [m for m in methods if m in MANY_METHODS]
            args = ["--worker", "--size", str(size), "--warm", str(warm), "--methods", ",".join(run_methods),
                    "--parts", str(parts), "--tmp", tmp_root]
            if isolate:
                results[size, parts] = run_worker("benchmarks.bench_checkpoint_stall", args,
                                                  timeout=600 if size < LARGE else 2400)
            else:
                results[size, parts] = measure(size, warm, run_methods, tmp_root, parts)
        raytrain = None
        if ray:  # after the local workers, so that Ray's processes are not running beside them
            ray_sizes = [(size, warm) for size, warm in _ray_config(quick, tiny, large) if (size, PARTS) in results]
            try:
                got, raytrain = measure_raytrain(ray_sizes, tmp_root)
                for size, res in got.items():
                    if res["nbytes"] != results[size, PARTS]["nbytes"]:
                        raise AssertionError("Ray Train saved %d bytes, the others %d" % (
                            res["nbytes"], results[size, PARTS]["nbytes"]))
                    results[size, PARTS]["methods"].update(res["methods"])
            except Exception as e:  # noqa: BLE001 -- an anchor that fails is reported, not fatal
                traceback.print_exc(file=sys.stderr)
                raytrain = {"error": raytrain_error(e)}
                for size, _ in ray_sizes:
                    for method in RAYTRAIN_METHODS:
                        results[size, PARTS]["methods"][method] = {"unavailable": "Ray Train failed: " + raytrain["error"]}
        mem = None
        if memory:
            mem = run_worker("benchmarks.bench_checkpoint_stall",
                             ["--memory", "--size", str(mem_size), "--saves", str(mem_saves), "--tmp", tmp_root],
                             timeout=600)
    finally:
        if own_tmp:
            shutil.rmtree(tmp_root, ignore_errors=True)
    return _report(results, mem, sizes, raytrain, large_skipped)


def _copy_ratio(r):
    """Median over saves of stall / the np.copyto timed right before it."""
    ratios = paired_ratios(r["stalls"], r["anchors"])
    return statistics.median(ratios) if ratios else None


def _report(results, memory, sizes, raytrain=None, large_skipped=None):
    headers = ["state", "method", "first save ms", "stall ms median [min–max] (n)", "x numpy copy (paired)",
               "TF1 hook / this (raw; per copy)", "snapshot ms (hook.last_stall_secs)", "next step +ms"]
    rows, targets, notes = [], [], []
    data = {"sizes": {}, "memory": memory, "raytrain": raytrain}
    rt_notes = []
    for size, warm, parts in sizes:
        res = results[size, parts]
        label = _state_label(res["nbytes"], parts)
        per = res["methods"]
        stats = {m: Stat.of(r["stalls"]).scaled(1e3) for m, r in per.items() if "unavailable" not in r}
        xcopy = {m: _copy_ratio(r) for m, r in per.items() if "unavailable" not in r}
        tf1 = stats.get("tf1_hook")

        def vs_tf1(method):
            """TF1's stall over this one: raw medians, and each normalised by its own paired copies."""
            if tf1 is None or method == "tf1_hook" or not stats[method].median > 0 or not xcopy[method]:
                return None, None
            return tf1.median / stats[method].median, xcopy["tf1_hook"] / xcopy[method]

        key = size if parts == PARTS else "%d in %d" % (size, parts)
        data["sizes"][key] = {"raw": res, "stall_ms": {m: s.to_dict() for m, s in stats.items()}, "x_copy": xcopy}
        if parts != PARTS and "rh_async_tf" in stats:
            r = per["rh_async_tf"]
            extra_us = statistics.median(s - a for s, a in zip(r["stalls"], r["anchors"])) * 1e6 / parts
            traced = ("; the second save started a background trace of the variable reads into one TF function "
                      "(%.1f s, while training went on; the benchmark waits for it before the next save)" % r["trace_secs"]
                      if r.get("trace_secs") else "")
            tf2 = per.get("tf2_write_async")
            tf2_first = ("; TF2's async write stalled the loop %.2f s at its first save after the first"
                         % tf2["stalls"][0] if tf2 and "unavailable" not in tf2 and tf2["stalls"] else "")
            parts_of = ""
            b = r.get("breakdown")
            if b:
                parts_of = ("; of the stall, walking the object graph (%d nodes) to check the snapshot plan still "
                            "fits took %.2f ms and TF's reads of the %d variables (one traced function) %.2f ms, "
                            "medians of %d timed apart after the saves" % (
                                b["nodes"], 1e3 * b["walk"], b["variables"], 1e3 * b["reads"], b["repeats"]))
            notes.append("%s: the same bytes as %d tf.Variables (one training step writes each). Each variable "
                         "adds %.1f µs to the TrackableSaver stall beyond the copy (median over saves of "
                         "(stall - paired copy) / %d)%s%s%s." % (label, parts, extra_us, parts, parts_of, traced,
                                                                  tf2_first))
        for method, r in per.items():
            if "unavailable" in r:
                rows.append([label, LABELS[method], "—", "unavailable: " + r["unavailable"], "—", "—", "—", "—"])
                continue
            s = stats[method]
            raw, normalised = vs_tf1(method)
            snap = _ms(Stat.of(r["snapshots"]).scaled(1e3)) if r.get("snapshots") else "—"
            nxt = "%.1f" % (1e3 * statistics.median(r["next_extra"])) if r.get("next_extra") else "—"
            rows.append([label, LABELS[method], "%.1f" % (1e3 * r["first"]), "%s (%d)" % (_ms(s), s.n),
                         fmt_ratio(xcopy[method]),
                         "—" if raw is None else "%s; %s" % (fmt_ratio(raw), fmt_ratio(normalised)), snap, nxt])
            if "expected_commits" in r and len(r["committed"]) < r["expected_commits"]:
                notes.append("%s %s: only %d of %d saves were written" % (
                    label, method, len(r["committed"]), r["expected_commits"]))
        for method in ("rh_async_numpy", "rh_async_tf"):
            if method not in stats:
                continue
            r = per[method]
            targets.append(Target("%s: %s stall within %.1fx of the numpy copy" % (label, LABELS[method], COPY_TARGET),
                                  "%s of the copy (paired, %d saves; stall %s ms, copy %s ms)" % (
                                      fmt_ratio(xcopy[method]), len(r["stalls"]), _ms(stats[method]),
                                      _ms(Stat.of(r["anchors"]).scaled(1e3))),
                                  xcopy[method] <= COPY_TARGET, xcopy[method] / COPY_TARGET,
                                  score_range(paired_ratios(r["stalls"], r["anchors"]), COPY_TARGET)))
            raw, normalised = vs_tf1(method)
            if raw is not None:
                targets.append(Target(
                    "%s: %s stall at least %.0fx below TF1's blocking hook" % (label, LABELS[method], TF1_TARGET),
                    "%s below (TF1 %s ms, this %s ms); normalised by each one's paired copies: %s "
                    "(TF1 %s of the copy, this %s)" % (fmt_ratio(raw), _ms(tf1), _ms(stats[method]),
                                                       fmt_ratio(normalised), fmt_ratio(xcopy["tf1_hook"]),
                                                       fmt_ratio(xcopy[method])),
                    raw >= TF1_TARGET, TF1_TARGET / raw if raw else None,
                    score_range([tf1.median / (1e3 * s) for s in r["stalls"] if s > 0], TF1_TARGET, higher_is_better=True)))
        for method in RAYTRAIN_METHODS:
            r = per.get(method)
            if r is None or "unavailable" in r:
                continue
            parts = "writing the .npy files %s ms + report() %s ms" % (
                _ms(Stat.of(r["writes"]).scaled(1e3)), _ms(Stat.of(r["reports"]).scaled(1e3)))
            versus = []
            for local, short in (("rh_async_numpy", "rayhooks async (NumpySaver)"),
                                 ("rh_sync_numpy", "rayhooks blocking (NumpySaver)")):
                if local in stats and stats[local].median > 0 and xcopy.get(local) and xcopy.get(method):
                    versus.append("%s the stall of %s (%s per copy)" % (
                        fmt_ratio(stats[method].median / stats[local].median), short,
                        fmt_ratio(xcopy[method] / xcopy[local])))
            rt_notes.append("%s Ray Train %s: stall = %s (medians over %d saves; first save %.1f ms)%s." % (
                label, method.split("_")[-1].upper(), parts, len(r["stalls"]), 1e3 * r["first"],
                "; " + "; ".join(versus) if versus else ""))
    extra = []
    if memory is not None:
        delta = memory["peak_rss"] - memory["baseline_rss"]
        bound = memory["nbytes"] * (1 + memory["max_in_flight"]) + MEMORY_HEADROOM
        extra.append(("Peak RSS of a separate process running %d asynchronous saves (NumpySaver, max_in_flight=%d):"
                      % (memory["saves"], memory["max_in_flight"]),
                      ["state", "RSS before state", "RSS with state", "peak RSS (VmHWM)", "peak - before",
                       "bound: state x (1 + in flight) + 200 MB"],
                      [[fmt_mb(memory["nbytes"]), fmt_mb(memory["baseline_rss"]), fmt_mb(memory["state_rss"]),
                        fmt_mb(memory["peak_rss"]), fmt_mb(delta), fmt_mb(bound)]]))
        targets.append(Target("%s async save: peak RSS over the pre-state baseline <= state x (1 + %d in flight) + "
                              "200 MB" % (fmt_mb(memory["nbytes"]), memory["max_in_flight"]),
                              "%s vs bound %s (%.2f of it)" % (fmt_mb(delta), fmt_mb(bound), delta / bound),
                              delta <= bound, delta / bound))
    notes += [
        "Stall of a hook = wall time of the run() that triggers the save minus the median run() of a "
        "non-trigger step just before it; TF2 rows time the write() call (the async one is followed, untimed, "
        "by sync() so every save starts idle).",
        "First save: the save at session creation with cold buffers (async hooks: the snapshot the loop waited "
        "for; blocking hooks: before_save to after_save), or the first write()/copy.",
        "x numpy copy: median over saves of stall / np.copyto of the same bytes timed right before that save. "
        "TF1 hook / this: the ratio of the median stalls (the target), then the ratio of the two 'x numpy copy' "
        "figures, which cancels the machine's drift between the two methods' turns but not what a method does "
        "to the machine (TF's thread pools); each anchor copy runs after a %.0f ms pause." % (1e3 * QUIESCE_SECS),
        "Every training step writes one element of every array/variable, as an optimizer would; 'next step +ms' "
        "is the step right after the save minus a plain step (an async save's background work, or TF's "
        "copy-on-write of a variable still being saved, shows up there).",
        "rayhooks files are fsync'ed before commit; TF's local writes are not, which favours the blocking TF rows.",
    ]
    if large_skipped:
        notes.append(large_skipped[0].upper() + large_skipped[1:] + ".")
    if raytrain is None:
        notes.append("Ray Train anchors not run (ray=False; tiny mode skips them unless asked).")
    elif "error" not in raytrain:
        notes += rt_notes
        notes.append(
            "Ray Train: 1 worker (resources_per_worker CPU 0.01), Ray %s (%.0f s to start), one Ray Train run of "
            "%.0f s for every size and both modes (saves after the first: %s); %.0f s in all for these anchors. "
            "np.save does not fsync and SYNC copies the directory to storage_path on the same disk; before each "
            "save the controller (polling every %.1f s) has registered the previous one and os.sync() has run "
            "(untimed)." % (
                "started here with num_cpus=2" if raytrain["ray_started_here"] else "already running",
                raytrain["ray_start_secs"], raytrain["fit_secs"],
                ", ".join("%s x %d" % (fmt_mb(s), w) for s, w in raytrain["sizes"]), raytrain["wall_secs"],
                raytrain["poll_secs"]))
    return BenchResult(NAME, TITLE, headers, rows, targets, notes, data, extra)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help="measure one state size in this process")
    parser.add_argument("--memory", action="store_true", help="measure the peak RSS of async saves")
    parser.add_argument("--size", type=int, default=64 * MB, help="state size in bytes")
    parser.add_argument("--warm", type=int, default=3, help="saves after the first, per method")
    parser.add_argument("--saves", type=int, default=2, help="--memory: saves after the first")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--parts", type=int, default=PARTS, help="--worker: the state in this many arrays")
    parser.add_argument("--tmp", default=None, help="directory on local disk for the checkpoints")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args(argv)
    tmp = args.tmp or tempfile.gettempdir()
    if args.worker:
        emit(measure(args.size, args.warm, [m for m in args.methods.split(",") if m], tmp, args.parts))
    elif args.memory:
        emit(measure_memory(args.size, args.saves, tmp))
    else:
        print(run(quick=args.quick, tiny=args.tiny).markdown())


if __name__ == "__main__":
    sys.exit(main())
