"""Figure: end-to-end training throughput with a checkpoint every K seconds, as a fraction of none.

The training loop runs numpy steps of ~5 ms that each update a slice of the
state (x <- sin(x) + 1 in place over a calibrated number of float32
elements, moving through the 8 arrays of the state; values sit near the
map's fixed point, so a step's cost does not drift), single-threaded like the
rest of the loop. The state is 128 MB (512 MB in full mode).

Each run alternates phases of K seconds (4 s; 10 s in full mode): in a
*checkpoint* phase a save is triggered at the first step and the loop trains
on for K seconds, so each such phase holds exactly one save every K seconds
of training (the persist of an async save runs while it trains); in a
*plain* phase the loop trains for K seconds with no save. Pairs of phases
are adjacent in time, their order alternating (C P, P C, ...), because the
machines these run on are shared: a neighbour's burst lands on both halves
of a pair. Fraction = steps in a checkpoint phase / steps in its paired plain
phase; the figure is the median over pairs [min–max], beside the pooled
ratio of all steps. Before a plain phase the previous save must be finished:
a save still in flight then is waited for (untimed) and counted in the
'spilled' column (its cost would otherwise leak into the plain phase).
Snapshot buffers, traced save functions and the first upload are warmed
before the first pair. Runs: 3 pairs in quick mode (24 s of K = 4 s
phases), 6 pairs in full mode (60 s of checkpoint phases with K = 10 s, as
many plain). The machines these run on are shared: the noise note gives the
spread of the plain-phase rates, below which a fraction's distance from 1.0
is not resolved.

Methods:

* `rh_async` / `rh_sync` — a local `rh.MonitoredSession` with
  `AsyncCheckpointSaverHook` / `CheckpointSaverHook(save_secs=K)` to file://
  (max_to_keep=2), driven by an `rh.ManualClock` advanced by K at the start
  of each checkpoint phase; plain phases run the same `sess.run(step)`;
* `raw_thread` (the floor of any async checkpoint) — `np.copyto` of the state
  into reused buffers, then a plain thread writes them to one file with
  `open`/`write`/`os.fsync`: no format, no checksums, no commit;
* `tf1_hook` (anchor) — TF1's blocking `tf.compat.v1.train.CheckpointSaverHook`
  in a `tf.compat.v1.train.MonitoredSession` over 8 graph variables of the
  same sizes, the step one `sess.run` of a train op doing the same update on
  a slice; its timer reads the wall clock, so the hook never comes due by
  itself and its timer is reset at the start of each checkpoint phase;
* `tf2_async` (anchor) — the same work on 8 `tf.Variable`s (a tf.function
  updating a slice), `tf.train.Checkpoint.write(..., options=
  CheckpointOptions(enable_async=True))` at the start of each checkpoint
  phase. TF runs with one intra-op thread, as numpy does;
* `rh_launch_ray` — `rh.launch(backend="ray")` with 1 worker and
  `AsyncCheckpointSaverHook(save_secs=K)` as a chief-only hook; checkpoint
  phases run `sess.run(step)` in `ctx.session` (the chief, which hears of
  progress only through those runs, announces a save at the start of each:
  K seconds have always passed), plain phases the bare step;
* `raytrain_async` (anchor) — Ray Train (v2 API) function trainer, 1 worker:
  at the start of each checkpoint phase the state is written as .npy files
  into a fresh local directory (the blocking part: Ray Train checkpoints are
  directories) and `ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d),
  checkpoint_upload_mode=CheckpointUploadMode.ASYNC)` uploads it to the
  run's storage_path on a background thread. Ray 2.60 does upload
  asynchronously (the mode is alpha); writing the state to the local
  directory stays synchronous, the user's job. Full mode adds the default
  SYNC upload.

Full mode adds two controls: `null` (both phases of each pair plain: the
machine's own noise, 1.0 expected) and `rh_launch_ray_nosave` (the same
rh.launch run with the chief's timer never due: what the session and its
progress reports cost without a save).

The local methods (rayhooks, TF2) run in one fresh worker process
(`--worker`), after writing and deleting 4x the state in files (untimed): on
a VM, the first use of memory for the page cache costs seconds of kernel time
per GB, which would otherwise land on whichever method ran first. The extra
CPU column is the process's CPU time (all threads) in a checkpoint phase
minus that of its plain phase. Ray is started with 4 CPUs unless running;
each Ray worker asks for 0.01 CPU.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

from benchmarks.bench_storage import make_arrays
from benchmarks.raytrain import ensure_ray, raytrain_fit, save_npy_dir
from benchmarks.common import MB, BenchResult, Stat, Target, emit, fmt_mb, run_worker, score_range

NAME = "throughput"
TITLE = "Figure: training throughput with a checkpoint every K seconds, as a fraction of no checkpoint"
TARGET = 0.99            # rayhooks async keeps >= 99% of the no-checkpoint throughput
STEP_SECS = 0.005        # ~5 ms of numpy work per step
HUGE = 10 ** 9
RAY_RESOURCES = {"CPU": 0.01}
WAIT_SECS = 300.0


def _config(quick, tiny):
    if tiny:
        return dict(size=4 * MB, save_secs=0.25, pairs=2, warm_secs=0.1, step_secs=0.002, raytrain_sync=False,
                    controls=False)
    if quick:
        return dict(size=128 * MB, save_secs=4.0, pairs=3, warm_secs=1.0, step_secs=STEP_SECS,
                    raytrain_sync=False, controls=False)
    return dict(size=512 * MB, save_secs=10.0, pairs=6, warm_secs=2.0, step_secs=STEP_SECS, raytrain_sync=True,
                controls=True)


# -- the training step ------------------------------------------------------------------------------

def _update(sl):
    """x <- sin(x) + 1: values sit near its fixed point (1.93), so a step's cost does not drift."""
    np.sin(sl, out=sl)
    np.add(sl, 1.0, out=sl)


def settle(arrays, passes=3):
    """Brings every value near the fixed point first (untimed), as the steps would."""
    for a in arrays.values():
        for _ in range(passes):
            _update(a)


class NumpyStep:
    """One step: x <- sin(x) + 1 in place over `elements` float32 values of the state, the next slice each time."""

    def __init__(self, arrays, elements):
        self.values = list(arrays.values())
        self.elements = int(elements)
        self.offsets = [0] * len(self.values)
        self.i = 0

    def __call__(self):
        k = self.i % len(self.values)
        self.i += 1
        a = self.values[k]
        off, left = self.offsets[k], self.elements
        while left > 0:
            m = min(left, a.size - off)
            _update(a[off:off + m])
            left -= m
            off = (off + m) % a.size
        self.offsets[k] = off


def _median_step(step, n):
    times = []
    for _ in range(n):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def calibrate(make_step, step_secs, guess):
    """Elements per step for about `step_secs`: a straight line (fixed cost + per element) through two sizes."""
    def median_at(n):
        step = make_step(n)
        step()
        return _median_step(step, 9)
    n1, n2 = max(1, guess // 4), guess
    t1, t2 = median_at(n1), median_at(n2)
    per = (t2 - t1) / (n2 - n1)
    if per <= 0:
        return guess
    return max(1, int((step_secs - max(t1 - per * n1, 0.0)) / per))


def run_for(step, secs):
    """Steps for `secs` seconds; returns (steps, seconds)."""
    perf = time.perf_counter
    started = perf()
    end = started + secs
    n = 0
    while perf() < end:
        step()
        n += 1
    return n, perf() - started


def alternate(pairs, secs, checkpoint_phase, plain_phase, settle_before_plain):
    """Pairs of adjacent phases, order C P, P C, ...; returns per-pair dicts.

    checkpoint_phase(secs) and plain_phase(secs) return (steps, seconds);
    settle_before_plain() waits until no save is in flight and returns True if one was.
    """
    out = []
    cpu = time.process_time  # every thread of this process: the training loop and any background writer
    for i in range(pairs):
        got = {"spilled": False}
        for kind in (("C", "P") if i % 2 == 0 else ("P", "C")):
            if kind == "C":
                began = cpu()
                got["c_steps"], got["c_secs"] = checkpoint_phase(secs)
                got["c_cpu"] = cpu() - began
            else:
                got["spilled"] = bool(settle_before_plain()) or got["spilled"]
                began = cpu()
                got["p_steps"], got["p_secs"] = plain_phase(secs)
                got["p_cpu"] = cpu() - began
        out.append(got)
    return out


# -- local methods (the worker process) ----------------------------------------------------------------

class _SaveProbe:
    """Listener: the steps saved, and the stall of each save (async: the snapshot; sync: before_save to after_save)."""

    def __init__(self):
        self.hook = None
        self.before, self.after, self.stalls = [], [], []
        self._began = None

    def begin(self):
        pass

    def before_save(self, session, step):
        self._began = time.perf_counter()
        self.before.append(step)

    def after_save(self, session, step):
        import rayhooks as rh
        self.after.append(step)
        if isinstance(self.hook, rh.AsyncCheckpointSaverHook):
            self.stalls.append(self.hook.last_stall_secs)
        else:
            self.stalls.append(time.perf_counter() - self._began)

    def end(self, session, step):
        pass


def rh_local(arrays, step, pairs, save_secs, url, asynchronous):
    import rayhooks as rh
    saver = rh.NumpySaver(arrays)
    saver.snapshot().done()  # warm the snapshot buffers: the figure is steady state
    probe = _SaveProbe()
    clock = rh.ManualClock(0.0)
    kind = rh.AsyncCheckpointSaverHook if asynchronous else rh.CheckpointSaverHook
    hook = kind(url, save_secs=save_secs, listeners=[probe], max_to_keep=2, save_graph_def=False, clock=clock)
    probe.hook = hook
    sess = rh.MonitoredSession(hooks=[hook], state=saver)

    def run():
        sess.run(step)

    def settle_before_plain():
        """Untimed: the last save committed and its after_save dispatched (the async hook does that at a run).

        Returns True if the save was still being written (a commit that only waits for its dispatch is not).
        """
        if len(probe.after) >= len(probe.before):
            return False
        latest = hook.store.latest()
        spilled = latest is None or latest.step < probe.before[-1]
        deadline = time.monotonic() + WAIT_SECS
        while len(probe.after) < len(probe.before):
            if time.monotonic() > deadline:
                raise TimeoutError("save %d not committed after %.0fs" % (probe.before[-1], WAIT_SECS))
            if spilled:
                time.sleep(0.001)
            run()
        return spilled

    def checkpoint_phase(secs):
        clock.advance(save_secs)  # the first run of the phase triggers the save
        return run_for(run, secs)

    settle_before_plain()  # the save at session creation
    pairs_out = alternate(pairs, save_secs, checkpoint_phase, lambda secs: run_for(run, secs), settle_before_plain)
    settle_before_plain()
    saves = len(probe.before) - 1  # the save at session creation aside (the one at close comes after)
    sess.close()
    return {"pairs": pairs_out, "stalls": probe.stalls[1:1 + pairs], "saves": saves,
            "committed": len(probe.after), "skipped": getattr(hook, "skipped_saves", 0)}


def raw_thread(arrays, step, pairs, save_secs, tmp):
    """The floor of an async checkpoint: np.copyto into reused buffers, then a thread writes them with fsync."""
    import threading
    buffers = {k: np.empty_like(v) for k, v in arrays.items()}
    for k, v in arrays.items():  # warm: first-touch of the buffers
        np.copyto(buffers[k], v)
    stalls, state = [], {"thread": None, "n": 0}

    def write(n):
        path = os.path.join(tmp, "raw-%d.bin" % n)
        with open(path, "wb") as f:
            for b in buffers.values():
                f.write(b)
            f.flush()
            os.fsync(f.fileno())
        old = os.path.join(tmp, "raw-%d.bin" % (n - 2))
        if os.path.exists(old):
            os.remove(old)

    def checkpoint_phase(secs):
        began = time.perf_counter()
        for k, v in arrays.items():
            np.copyto(buffers[k], v)
        stalls.append(time.perf_counter() - began)
        state["thread"] = threading.Thread(target=write, args=(state["n"],))
        state["thread"].start()
        state["n"] += 1
        steps, _ = run_for(step, secs - (time.perf_counter() - began))
        return steps, time.perf_counter() - began

    def settle_before_plain():
        thread, state["thread"] = state["thread"], None
        if thread is None:
            return False
        spilled = thread.is_alive()
        thread.join()
        return spilled

    pairs_out = alternate(pairs, save_secs, checkpoint_phase, lambda secs: run_for(step, secs), settle_before_plain)
    settle_before_plain()
    return {"pairs": pairs_out, "stalls": stalls, "saves": state["n"], "committed": state["n"], "skipped": 0}


def _tf_async_options():
    import tensorflow as tf
    try:
        return tf.train.CheckpointOptions(enable_async=True)
    except TypeError:
        return tf.train.CheckpointOptions(experimental_enable_async_checkpoint=True)


class TfStep:
    """The TF2 twin of NumpyStep: x <- sin(x) + 1 in place over a slice of one tf.Variable per step.

    The slice is read with a gather and written with a scatter: `v[a:b].assign(f(v[a:b]))` would read the
    whole variable, and the assign would then copy all of it (copy-on-write) at every step.
    """

    def __init__(self, variables, elements):
        import tensorflow as tf
        self.variables = list(variables)
        size = int(self.variables[0].shape[0])
        self.m = min(int(elements), size)
        self.reps = max(1, int(round(elements / self.m)))
        self.size = size
        self.offsets = [0] * len(self.variables)
        self.i = 0
        m = self.m

        def make(v):
            @tf.function
            def update(off):
                idx = tf.range(off, off + m)
                v.scatter_update(tf.IndexedSlices(tf.sin(v.sparse_read(idx)) + 1.0, idx))
            return update
        self.fns = [make(v) for v in self.variables]
        self._offset = lambda off: tf.constant(off, tf.int32)  # a Python int would retrace per value
        for fn in self.fns:  # trace now
            fn(self._offset(0))

    def __call__(self):
        k = self.i % len(self.fns)
        self.i += 1
        for _ in range(self.reps):
            off = self.offsets[k]
            self.fns[k](self._offset(off))
            off += self.m
            self.offsets[k] = 0 if off + self.m > self.size else off


def tf2_async(ckpt, step, pairs, save_secs, tmp):
    options = _tf_async_options()
    prefix = os.path.join(tmp, "ckpt")
    ckpt.write(prefix + "-warm", options=options)  # traces the save functions, warms the host copies
    ckpt.sync()
    stalls, n = [], [0]

    def checkpoint_phase(secs):
        began = time.perf_counter()
        ckpt.write("%s-%d" % (prefix, n[0]), options=options)
        stalls.append(time.perf_counter() - began)
        n[0] += 1
        steps, took = run_for(step, secs - (time.perf_counter() - began))
        return steps, time.perf_counter() - began

    def settle_before_plain():
        began = time.perf_counter()
        ckpt.sync()
        return time.perf_counter() - began > 0.005  # a write still running (sync of an idle checkpoint: ~µs)

    pairs_out = alternate(pairs, save_secs, checkpoint_phase, lambda secs: run_for(step, secs), settle_before_plain)
    ckpt.sync()
    written = len([f for f in os.listdir(tmp) if f.endswith(".index")]) - 1
    return {"pairs": pairs_out, "stalls": stalls, "saves": n[0], "committed": written, "skipped": 0}


class Tf1Step:
    """The TF1 twin of NumpyStep: one `sess.run` of a graph-mode train op, x <- sin(x) + 1 over a slice of one
    variable (gather, then scatter), which also increments the global step, through a TF1 MonitoredSession."""

    def __init__(self, sess, ops, offset, count, size, elements):
        self.sess, self.ops, self.offset, self.count = sess, ops, offset, count
        self.m = min(int(elements), size)
        self.reps = max(1, int(round(elements / self.m)))
        self.size = size
        self.offsets = [0] * len(ops)
        self.i = 0

    def __call__(self):
        k = self.i % len(self.ops)
        self.i += 1
        for _ in range(self.reps):
            off = self.offsets[k]
            self.sess.run(self.ops[k], feed_dict={self.offset: off, self.count: self.m})
            off += self.m
            self.offsets[k] = 0 if off + self.m > self.size else off


def tf1_hook(sizes, pairs, save_secs, warm_secs, step_secs, tmp):
    """TF1's blocking `CheckpointSaverHook` in a `tf.compat.v1.train.MonitoredSession`, 8 graph variables.

    TF1's timer reads the wall clock, so the hook is made with a save_secs that never comes due and its timer is
    reset at the start of each checkpoint phase: the phase's first step then saves, as a hook due every K s would.
    """
    import tensorflow as tf
    v1 = tf.compat.v1
    graph = tf.Graph()
    with graph.as_default():
        global_step = v1.train.get_or_create_global_step()
        offset = v1.placeholder(tf.int32, [], name="offset")
        count = v1.placeholder(tf.int32, [], name="count")
        idx = tf.range(offset, offset + count)
        ops = []
        for i, n in enumerate(sizes):
            # Near the update's fixed point from the start, as the numpy state after settle().
            var = v1.get_variable("v%d" % i, shape=[n], dtype=tf.float32, initializer=v1.constant_initializer(1.93))
            update = v1.scatter_update(var, idx, tf.sin(tf.gather(var, idx)) + 1.0)
            with tf.control_dependencies([update]):
                ops.append(v1.assign_add(global_step, 1))
        scaffold = v1.train.Scaffold(saver=v1.train.Saver(max_to_keep=2))
        probe = _SaveProbe()  # no rayhooks hook: a stall is before_save to after_save
        hook = v1.train.CheckpointSaverHook(tmp, save_secs=HUGE, scaffold=scaffold, listeners=[probe])
        config = v1.ConfigProto(intra_op_parallelism_threads=1)  # as numpy, and as the TF2 anchor
        sess = v1.train.MonitoredSession(v1.train.ChiefSessionCreator(scaffold=scaffold, config=config),
                                         hooks=[hook])
        try:
            first = Tf1Step(sess, ops, offset, count, min(sizes), 1)
            for _ in ops:  # a session's first run of each train op builds its executor (~20 ms): not in calibration
                first()
            elements = calibrate(lambda n: Tf1Step(sess, ops, offset, count, min(sizes), n), step_secs, 1 << 18)
            step = Tf1Step(sess, ops, offset, count, min(sizes), elements)
            run_for(step, warm_secs)
            step_ms = 1e3 * _median_step(step, 21)

            def checkpoint_phase(secs):
                hook._timer.reset()  # due now: this phase's first step saves
                return run_for(step, secs)

            pairs_out = alternate(pairs, save_secs, checkpoint_phase, lambda secs: run_for(step, secs),
                                  lambda: False)
            saves = len(probe.before) - 1  # the save at session creation aside (the one at close comes after)
        finally:
            sess.close()
    return {"pairs": pairs_out, "stalls": probe.stalls[1:1 + pairs], "saves": saves,
            "committed": len(probe.after), "skipped": 0, "elements": elements, "step_ms": step_ms}


def prewarm_page_cache(nbytes, tmp):
    """Writes, fsyncs and deletes `nbytes` of file data (untimed).

    On a VM the first time guest memory backs the page cache costs seconds of kernel time per GB
    (measured here: ~4.5 s of sys time for the first 512 MB written, ~0.25 s once pages are recycled);
    without this, whichever method ran first would pay it.
    """
    chunk = np.ones(8 << 20, np.uint8)
    path = os.path.join(tmp, "prewarm-%d.bin" % os.getpid())
    with open(path, "wb") as f:
        for _ in range(max(1, nbytes // chunk.nbytes)):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    os.remove(path)


def measure_local(size, save_secs, pairs, warm_secs, step_secs, tmp, methods):
    """Runs the local methods in this process; returns their raw results."""
    import tensorflow as tf
    try:
        tf.config.threading.set_intra_op_parallelism_threads(1)
    except RuntimeError:  # TF already initialised in this process (isolate=False): keep its pools
        pass
    arrays = make_arrays(size)
    settle(arrays)
    elements = calibrate(lambda n: NumpyStep(arrays, n), step_secs, 1 << 20)
    step = NumpyStep(arrays, elements)
    out = {"nbytes": sum(a.nbytes for a in arrays.values()), "elements": elements, "runs": {}}
    prewarm_page_cache(4 * out["nbytes"], tmp)  # max_to_keep=2 checkpoints, one being written, one spare
    run_for(step, warm_secs)
    out["step_ms"] = 1e3 * _median_step(step, 21)
    out["loadavg_before"] = os.getloadavg()
    if "null" in methods:  # the noise of the machine: both phases of each pair plain
        out["runs"]["null"] = {"pairs": alternate(pairs, save_secs, lambda secs: run_for(step, secs),
                                                  lambda secs: run_for(step, secs), lambda: False),
                               "stalls": [], "saves": 0, "committed": 0, "skipped": 0}
    for method in methods:
        if method in ("rh_async", "rh_sync", "raw_thread"):
            d = tempfile.mkdtemp(prefix=method + "-", dir=tmp)
            if method == "raw_thread":
                out["runs"][method] = raw_thread(arrays, step, pairs, save_secs, d)
            else:
                out["runs"][method] = rh_local(arrays, step, pairs, save_secs, "file://" + d,
                                               asynchronous=method == "rh_async")
            shutil.rmtree(d, ignore_errors=True)
    if "tf1_hook" in methods:
        d = tempfile.mkdtemp(prefix="tf1-", dir=tmp)
        out["runs"]["tf1_hook"] = tf1_hook([a.size for a in arrays.values()], pairs, save_secs, warm_secs,
                                           step_secs, d)
        shutil.rmtree(d, ignore_errors=True)
    if "tf2_async" in methods:
        variables = [tf.Variable(a) for a in arrays.values()]
        del arrays, step
        ckpt = tf.train.Checkpoint(**{"v%d" % i: v for i, v in enumerate(variables)})
        tf_elements = calibrate(lambda n: TfStep(variables, n), step_secs, 1 << 18)
        tf_step = TfStep(variables, tf_elements)
        out["tf_elements"] = tf_elements
        run_for(tf_step, warm_secs)
        out["tf_step_ms"] = 1e3 * _median_step(tf_step, 21)
        d = tempfile.mkdtemp(prefix="tf2-", dir=tmp)
        out["runs"]["tf2_async"] = tf2_async(ckpt, tf_step, pairs, save_secs, d)
        shutil.rmtree(d, ignore_errors=True)
    out["loadavg_after"] = os.getloadavg()
    return out


# -- Ray: rh.launch ------------------------------------------------------------------------------------

def launch_train_fn(ctx, size, elements, save_secs, pairs, warm_secs):
    """On the Ray worker: checkpoint phases in ctx.session (the chief schedules the saves), plain ones bare."""
    import rayhooks as rh
    arrays = make_arrays(size)
    settle(arrays)
    step = NumpyStep(arrays, elements)
    saver = rh.NumpySaver(arrays)
    saver.snapshot().done()
    run_for(step, warm_secs)
    marks = [("setup", time.time())]
    with ctx.session(state=saver) as sess:
        def run():
            sess.run(step)

        def checkpoint_phase(secs):
            marks.append(("C", time.time()))
            got = run_for(run, secs)
            marks.append(("end", time.time()))
            return got

        def plain_phase(secs):
            marks.append(("P", time.time()))
            return run_for(step, secs)

        pairs_out = alternate(pairs, save_secs, checkpoint_phase, plain_phase, lambda: False)
        marks.append(("final", time.time()))
    return {"pairs": pairs_out, "marks": marks, "step_ms": 1e3 * _median_step(step, 21)}


class _FileProbe:
    """Chief-side listener: appends `before|after <time> <step>` lines (the chief runs on this node)."""

    def __init__(self, path):
        self.path = path

    def begin(self):
        pass

    def _write(self, what, step):
        with open(self.path, "a") as f:
            f.write("%s %.6f %d\n" % (what, time.time(), step))

    def before_save(self, session, step):
        self._write("before", step)

    def after_save(self, session, step):
        self._write("after", step)

    def end(self, session, step):
        pass


def measure_launch(size, elements, save_secs, pairs, warm_secs, tmp, timer_secs=None):
    """`timer_secs` (default save_secs) is the chief hook's save_secs: HUGE for the no-save control."""
    import rayhooks as rh
    ckpt = tempfile.mkdtemp(prefix="launch-", dir=tmp)
    log = os.path.join(ckpt, "saves.txt")
    result = rh.launch(
        lambda ctx: launch_train_fn(ctx, size, elements, save_secs, pairs, warm_secs), 1, backend="ray",
        chief_only_hooks=[rh.AsyncCheckpointSaverHook(ckpt, save_secs=timer_secs or save_secs, max_to_keep=2,
                                                      save_graph_def=False, listeners=[_FileProbe(log)])],
        hooks=[rh.StopAtStepHook(last_step=HUGE)], resources_per_worker=dict(RAY_RESOURCES), tf_config=False)
    w = result.worker_results[0]
    events = []
    if os.path.exists(log):
        with open(log) as f:
            events = [(line.split()[0], float(line.split()[1])) for line in f]
    # which phase each save announcement and commit fell in
    marks = w["marks"]

    def phase_at(t):
        current = None
        for kind, when in marks:
            if when <= t:
                current = kind
        return current

    # the save at session creation ("setup", or before the first mark) and the one at its end ("final") aside
    announced = [phase_at(t) for what, t in events if what == "before"]
    commits = [phase_at(t) for what, t in events if what == "after"]
    spilled = sum(1 for p in commits if p == "P")
    return {"pairs": w["pairs"], "step_ms": w["step_ms"], "saves": announced.count("C"),
            "announced_outside": len([p for p in announced if p not in ("C", "setup", "final", None)]),
            "committed": len(result.checkpoints), "skipped": result.skipped_saves, "spilled_commits": spilled,
            "stalls": []}


# -- Ray Train -----------------------------------------------------------------------------------------

def raytrain_train_fn(config):
    """On the Ray Train worker: checkpoint phases report a checkpoint at their start; plain ones do not."""
    import ray.train
    from ray.train import Checkpoint, CheckpointConsistencyMode, CheckpointUploadMode

    arrays = make_arrays(config["size"])
    settle(arrays)
    step = NumpyStep(arrays, config["elements"])
    run_for(step, config["warm_secs"])
    counter = [0]

    def report(mode):
        d = tempfile.mkdtemp(prefix="rt-ckpt-")
        save_npy_dir(arrays, d)
        counter[0] += 1
        ray.train.report({"n": counter[0]}, checkpoint=Checkpoint.from_directory(d),
                         checkpoint_dir_name="ckpt-%06d" % counter[0], checkpoint_upload_mode=mode)
        if mode != CheckpointUploadMode.ASYNC:  # ASYNC deletes the local directory after its upload
            shutil.rmtree(d, ignore_errors=True)

    report(CheckpointUploadMode.SYNC)  # warm-up: storage directories, the first upload
    ray.train.get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED)
    out = {"runs": {}, "step_ms": 1e3 * _median_step(step, 21)}
    for mode in config["modes"]:
        upload = getattr(CheckpointUploadMode, mode)
        stalls = []
        first = counter[0]

        def counted_checkpoint_phase(secs):
            began = time.perf_counter()
            report(upload)
            stalls.append(time.perf_counter() - began)
            steps, _ = run_for(step, secs - (time.perf_counter() - began))
            return steps, time.perf_counter() - began

        pairs_out = alternate(config["pairs"], config["save_secs"], counted_checkpoint_phase,
                              lambda secs: run_for(step, secs), lambda: False)
        found = ray.train.get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED,
                                                       timeout_s=WAIT_SECS)
        names = {c.checkpoint.path.rstrip("/").rsplit("/", 1)[-1] for c in found}
        out["runs"][mode] = {"pairs": pairs_out, "stalls": stalls, "saves": counter[0] - first,
                             "committed": counter[0] - first if "ckpt-%06d" % counter[0] in names else 0,
                             "skipped": 0}
    with open(config["out"], "w") as f:
        json.dump(out, f)


def measure_raytrain(size, elements, save_secs, pairs, warm_secs, modes, tmp):
    out = os.path.join(tmp, "raytrain.json")
    raytrain_fit(raytrain_train_fn, {"size": size, "elements": elements, "save_secs": save_secs, "pairs": pairs,
                                     "warm_secs": warm_secs, "modes": list(modes), "out": out},
                 os.path.join(tmp, "raytrain-storage"), "throughput")
    with open(out) as f:
        return json.load(f)


# -- the figure --------------------------------------------------------------------------------------------

LOCAL_METHODS = ("rh_async", "raw_thread", "rh_sync", "tf1_hook", "tf2_async")


def run(quick=False, tiny=False, ray=True, isolate=True, tmp_root=None):
    cfg = _config(quick, tiny)
    own_tmp = tmp_root is None
    tmp_root = tmp_root or tempfile.mkdtemp(prefix="rayhooks-bench-throughput-")
    os.makedirs(tmp_root, exist_ok=True)
    data = {"config": cfg}
    try:
        args = ["--worker", "--size", str(cfg["size"]), "--save-secs", str(cfg["save_secs"]),
                "--pairs", str(cfg["pairs"]), "--warm-secs", str(cfg["warm_secs"]),
                "--step-secs", str(cfg["step_secs"]), "--tmp", tmp_root]
        methods = LOCAL_METHODS + (("null",) if cfg["controls"] else ())
        args += ["--methods", ",".join(methods)]
        if isolate:
            data["local"] = run_worker("benchmarks.bench_throughput", args, timeout=3600)
        else:
            data["local"] = measure_local(cfg["size"], cfg["save_secs"], cfg["pairs"], cfg["warm_secs"],
                                          cfg["step_secs"], tmp_root, methods)
        if ray:
            ray_mod, started = ensure_ray(sys.modules[__name__], sys.modules[make_arrays.__module__])
            try:
                elements = data["local"]["elements"]
                data["launch"] = measure_launch(cfg["size"], elements, cfg["save_secs"], cfg["pairs"],
                                                cfg["warm_secs"], tmp_root)
                if cfg["controls"]:
                    data["launch_nosave"] = measure_launch(cfg["size"], elements, cfg["save_secs"], cfg["pairs"],
                                                           cfg["warm_secs"], tmp_root, timer_secs=HUGE)
                modes = ["ASYNC"] + (["SYNC"] if cfg["raytrain_sync"] else [])
                data["raytrain"] = measure_raytrain(cfg["size"], elements, cfg["save_secs"], cfg["pairs"],
                                                    cfg["warm_secs"], modes, tmp_root)
            finally:
                if started:
                    ray_mod.shutdown()
    finally:
        if own_tmp:
            shutil.rmtree(tmp_root, ignore_errors=True)
    return _report(data)


LABELS = {
    "rh_async": "rayhooks AsyncCheckpointSaverHook (local)",
    "raw_thread": "floor: np.copyto + a thread writing the bytes, open/write/fsync (anchor)",
    "rh_sync": "rayhooks CheckpointSaverHook (local, blocking)",
    "tf1_hook": "TF1 tf.compat.v1.train.CheckpointSaverHook in a MonitoredSession (blocking; anchor)",
    "tf2_async": "TF2 Checkpoint.write, CheckpointOptions(enable_async=True) (anchor)",
    "rh_launch_ray": "rayhooks rh.launch(backend='ray'), 1 worker, AsyncCheckpointSaverHook",
    "rh_launch_ray_nosave": "control: the same rh.launch run with no save due (session + progress reports)",
    "null": "control: plain vs plain (the machine's noise; 1.0 expected)",
    "raytrain_ASYNC": "Ray Train report(checkpoint, upload ASYNC), 1 worker (anchor)",
    "raytrain_SYNC": "Ray Train report(checkpoint, upload SYNC), 1 worker",
}


def fractions(r):
    """Per-pair fractions (checkpoint-phase steps/s over plain-phase steps/s) and the pooled one."""
    per = [(p["c_steps"] / p["c_secs"]) / (p["p_steps"] / p["p_secs"]) for p in r["pairs"]]
    pooled = (sum(p["c_steps"] for p in r["pairs"]) / sum(p["c_secs"] for p in r["pairs"])) / \
        (sum(p["p_steps"] for p in r["pairs"]) / sum(p["p_secs"] for p in r["pairs"]))
    return per, pooled


def _report(data):
    cfg = data["config"]
    K = cfg["save_secs"]
    local = data["local"]
    runs = dict(local["runs"])
    if "launch" in data:
        runs["rh_launch_ray"] = data["launch"]
    if "launch_nosave" in data:
        runs["rh_launch_ray_nosave"] = data["launch_nosave"]
    for mode, r in (data.get("raytrain") or {}).get("runs", {}).items():
        runs["raytrain_" + mode] = r
    headers = ["method", "fraction of no checkpoint, median over pairs [min–max]", "pooled", "pairs",
               "plain steps/s", "saves (spilled)", "blocking ms per save median [min–max]",
               "extra CPU ms per save (process)"]
    rows, targets, notes = [], [], []
    summary = {}
    order = ["rh_async", "raw_thread", "rh_sync", "tf1_hook", "tf2_async", "rh_launch_ray", "rh_launch_ray_nosave",
             "raytrain_ASYNC", "raytrain_SYNC", "null"]
    runs = {m: runs[m] for m in sorted(runs, key=lambda m: order.index(m) if m in order else len(order))}
    plain_rates = [p["p_steps"] / p["p_secs"] for m in ("rh_async", "raw_thread", "rh_sync", "null") if m in runs
                   for p in runs[m]["pairs"]]
    spread = (max(plain_rates) - min(plain_rates)) / Stat.of(plain_rates).median if plain_rates else None
    for method, r in runs.items():
        per, pooled = fractions(r)
        st = Stat.of(per)
        stalls = r.get("stalls") or []
        spilled = sum(1 for p in r["pairs"] if p.get("spilled")) + r.get("spilled_commits", 0)
        plain = Stat.of([p["p_steps"] / p["p_secs"] for p in r["pairs"]])
        extra_cpu = [1e3 * (p["c_cpu"] / p["c_secs"] - p["p_cpu"] / p["p_secs"]) * p["c_secs"]
                     for p in r["pairs"] if "c_cpu" in p]
        summary[method] = {"fraction": st.to_dict(), "pooled": pooled, "saves": r.get("saves"),
                           "spilled": spilled, "committed": r.get("committed"), "skipped": r.get("skipped", 0),
                           "stall_ms": Stat.of(stalls).scaled(1e3).to_dict() if stalls else None,
                           "plain_steps_per_sec": plain.to_dict(),
                           "extra_cpu_ms": Stat.of(extra_cpu).to_dict() if extra_cpu else None}
        rows.append([LABELS[method], st.format(4), "%.4f" % pooled, str(st.n), plain.format(1),
                     "%s (%d)" % (r.get("saves"), spilled),
                     Stat.of(stalls).scaled(1e3).format(1) if stalls else "—",
                     "%.0f" % Stat.of(extra_cpu).median if extra_cpu else "—"])
        if r.get("skipped"):
            notes.append("%s skipped %d saves (the previous one was still being written)" % (method, r["skipped"]))
        if r.get("announced_outside"):
            notes.append("%s: %d save(s) were announced outside a checkpoint phase (the chief's timer)"
                         % (method, r["announced_outside"]))
    for method in ("rh_async", "rh_launch_ray"):
        if method not in summary:
            continue
        s = summary[method]
        value = s["fraction"]["median"]
        targets.append(Target(
            "%s state, a save every %g s: %s keeps >= %.2f of the no-checkpoint throughput"
            % (fmt_mb(local["nbytes"]), K, LABELS[method], TARGET),
            "%.4f, median over %d pairs of adjacent %g-s phases [min %.4f, max %.4f]; pooled %.4f; "
            "%d saves, %d spilled into a plain phase; plain-phase rates of the local runs spread %.1f%%"
            % (value, s["fraction"]["n"], K, s["fraction"]["min"], s["fraction"]["max"], s["pooled"],
               s["saves"] or 0, s["spilled"], 100 * spread if spread is not None else float("nan")),
            value >= TARGET, TARGET / value if value > 0 else None,
            score_range((s["fraction"]["min"], s["fraction"]["max"]), TARGET, higher_is_better=True)))
    if spread is not None:
        notes.append("Noise: the plain-phase rates of the local numpy runs spread %.1f%% (max - min over the median) "
                     "across pairs; on a shared machine a fraction's distance from 1.0 below that is not resolved."
                     % (100 * spread))
    notes += [
        "State %s in 8 float32 arrays; a step is x <- sin(x) + 1 in place over %d elements of one array "
        "(median %.2f ms locally; TF2: %s elements, %s ms; TF1: %s elements, %s ms); phases of K = %g s, "
        "%d pairs per method." % (
            fmt_mb(local["nbytes"]), local["elements"], local["step_ms"], local.get("tf_elements", "—"),
            "%.2f" % local["tf_step_ms"] if "tf_step_ms" in local else "—",
            runs["tf1_hook"]["elements"] if "tf1_hook" in runs else "—",
            "%.2f" % runs["tf1_hook"]["step_ms"] if "tf1_hook" in runs else "—", K, cfg["pairs"]),
        "TF1's hook runs with save_secs that never comes due, its timer reset at the start of each checkpoint "
        "phase (its timer reads the wall clock, not an injected one); its plain phases run the same "
        "MonitoredSession, whose per-step cost both phases share.",
        "Fraction: steps/s of a checkpoint phase (one save at its start, K seconds of training) over steps/s "
        "of the adjacent plain phase; pooled = all checkpoint-phase steps/s over all plain-phase steps/s.",
        "Spilled: a save still in flight when its checkpoint phase ended (rayhooks/TF2: waited for, untimed, "
        "before the plain phase; rh.launch: its commit fell in a plain phase). Ray Train's ASYNC upload is "
        "not waited for.",
        "Blocking ms per save: rayhooks async = the snapshot (hook.last_stall_secs); rayhooks sync and TF1 = "
        "before_save to after_save; TF2 = the write() call; Ray Train = writing the .npy files plus the "
        "report() call. rh.launch's worker-side snapshot is not exposed ('—').",
        "rayhooks local and rh.launch plain phases: rayhooks local runs sess.run(step) with no save due; "
        "rh.launch runs the bare step (a run would report progress and let the chief announce a save).",
        "Extra CPU per save: the process's CPU time (all threads, user + sys) in a checkpoint phase minus that "
        "of its plain phase at the same rate; on a machine with no idle core it comes out of the training "
        "loop. Load average (1 min) when the local runs began / ended: %s / %s on %d CPUs."
        % ("%.2f" % local["loadavg_before"][0] if "loadavg_before" in local else "?",
           "%.2f" % local["loadavg_after"][0] if "loadavg_after" in local else "?", os.cpu_count()),
    ]
    return BenchResult(NAME, TITLE, headers, rows, targets, notes, {"raw": data, "summary": summary})


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help="run the local methods in this process")
    parser.add_argument("--size", type=int, default=128 * MB)
    parser.add_argument("--save-secs", type=float, default=4.0)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--warm-secs", type=float, default=1.0)
    parser.add_argument("--step-secs", type=float, default=STEP_SECS)
    parser.add_argument("--methods", default=",".join(LOCAL_METHODS))
    parser.add_argument("--tmp", default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--no-ray", action="store_true")
    args = parser.parse_args(argv)
    if args.worker:
        emit(measure_local(args.size, args.save_secs, args.pairs, args.warm_secs, args.step_secs,
                           args.tmp or tempfile.gettempdir(), [m for m in args.methods.split(",") if m]))
    else:
        print(run(quick=args.quick, tiny=args.tiny, ray=not args.no_ray).markdown())


if __name__ == "__main__":
    sys.exit(main())
