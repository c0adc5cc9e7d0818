"""Figure 1: what the hooks cost on a step that triggers nothing.

Four loops, each timed over `steps` steps and repeated, subject and anchor
interleaved in every repeat:

* anchor: a bare Python loop calling a trivial step function;
* rayhooks: `rh.MonitoredTrainingSession` in local mode with its default chief
  hooks, a `CheckpointSaverHook` and a `SummarySaverHook`, both with a huge
  `save_steps` (so only the initial save at creation ever happens), and the
  `StepCounterHook` disabled (`log_step_count_steps=0`);
* TF1 anchor: a plain `tf.compat.v1.Session` running the train op (a
  global-step increment in a graph);
* TF1: `tf.compat.v1.train.MonitoredSession` with TF1's `CheckpointSaverHook`
  and `SummarySaverHook` (same huge `save_steps`) running the same train op.

Each monitored loop is timed two ways: `run()` alone, and the loop users write,
`while not sess.should_stop(): sess.run(...)`. The overhead is the per-step
time minus that of the respective bare loop, paired repeat by repeat.
"""

import os
import shutil
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

from benchmarks.common import BenchResult, Stat, Target, fmt_ratio, interleaved

NAME = "step_overhead"
TITLE = "Figure 1: per-step overhead on non-trigger steps"
HUGE = 10 ** 9
TARGET_US = 2.0      # the brief: rayhooks adds < 2 µs per step
TF1_CLAIM_US = 25.0  # the brief: TF1 adds about 25 µs


def _config(quick, tiny):
    if tiny:
        return dict(rh_steps=200, tf_steps=50, repeats=2)
    if quick:
        return dict(rh_steps=5000, tf_steps=300, repeats=9)
    return dict(rh_steps=10000, tf_steps=1000, repeats=31)


def _rayhooks_loops(tmp):
    import rayhooks as rh

    counter = [0]

    def step():
        counter[0] += 1

    state = {"w": np.zeros(16, np.float32)}
    sess = rh.MonitoredTrainingSession(checkpoint_dir=tmp, save_checkpoint_steps=HUGE,
                                       save_summaries_steps=HUGE, log_step_count_steps=0, state=state)
    kinds = sorted(type(h).__name__ for h in sess._hooks)
    if kinds != ["CheckpointSaverHook", "SummarySaverHook"]:
        raise AssertionError("expected the checkpoint and summary hooks only, got %s" % kinds)

    def bare(n):
        fn = step
        started = time.perf_counter()
        for _ in range(n):
            fn()
        return time.perf_counter() - started

    def run_only(n):
        run, fn = sess.run, step
        started = time.perf_counter()
        for _ in range(n):
            run(fn)
        return time.perf_counter() - started

    def stop_and_run(n):
        run, should_stop, fn = sess.run, sess.should_stop, step
        started = time.perf_counter()
        for _ in range(n):
            if should_stop():
                raise RuntimeError("the session asked to stop; no hook here should")
            run(fn)
        return time.perf_counter() - started

    return sess, counter, bare, run_only, stop_and_run


def _tf1_loops(tmp):
    import tensorflow as tf

    v1 = tf.compat.v1
    graph = tf.Graph()
    with graph.as_default():
        global_step = v1.train.get_or_create_global_step()
        train_op = v1.assign_add(global_step, 1)
        init = v1.global_variables_initializer()
        raw = v1.Session(graph=graph)
        raw.run(init)
        scaffold = v1.train.Scaffold()
        hooks = [v1.train.CheckpointSaverHook(tmp, save_steps=HUGE, scaffold=scaffold),
                 v1.train.SummarySaverHook(save_steps=HUGE, output_dir=tmp, scaffold=scaffold)]
        mon = v1.train.MonitoredSession(v1.train.ChiefSessionCreator(scaffold=scaffold), hooks=hooks)

    def bare(n):
        run = raw.run
        started = time.perf_counter()
        for _ in range(n):
            run(train_op)
        return time.perf_counter() - started

    def run_only(n):
        run = mon.run
        started = time.perf_counter()
        for _ in range(n):
            run(train_op)
        return time.perf_counter() - started

    def stop_and_run(n):
        run, should_stop = mon.run, mon.should_stop
        started = time.perf_counter()
        for _ in range(n):
            if should_stop():
                raise RuntimeError("the TF1 session asked to stop")
            run(train_op)
        return time.perf_counter() - started

    def close():
        with graph.as_default():  # TF1's final save builds its saver in the default graph
            mon.close()
        raw.close()

    def steps_done():
        return int(raw.run(global_step))

    return close, steps_done, bare, run_only, stop_and_run


def run(quick=False, tiny=False):
    cfg = _config(quick, tiny)
    repeats = cfg["repeats"]
    tmp = tempfile.mkdtemp(prefix="rayhooks-bench-steps-")
    data = {"config": cfg}
    try:
        rh_dir, tf_dir = os.path.join(tmp, "rayhooks"), os.path.join(tmp, "tf1")
        sess, counter, bare, run_only, stop_and_run = _rayhooks_loops(rh_dir)
        a, s, d = interleaved(bare, {"run": run_only, "loop": stop_and_run}, cfg["rh_steps"], repeats)
        data["rayhooks_steps_run"] = sess.global_step
        sess.close()
        data["rayhooks"] = {"bare": a, "run": s["run"], "run_overhead": d["run"],
                            "loop": s["loop"], "loop_overhead": d["loop"]}

        close, steps_done, tbare, trun_only, tstop_and_run = _tf1_loops(tf_dir)
        a, s, d = interleaved(tbare, {"run": trun_only, "loop": tstop_and_run}, cfg["tf_steps"], repeats)
        data["tf1_steps_run"] = steps_done()
        close()
        data["tf1"] = {"bare": a, "run": s["run"], "run_overhead": d["run"],
                       "loop": s["loop"], "loop_overhead": d["loop"]}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    us = 1e6
    rh_d, tf_d = data["rayhooks"], data["tf1"]
    stats = {k: {m: Stat.of(v).scaled(us) for m, v in d.items()} for k, d in (("rayhooks", rh_d), ("tf1", tf_d))}
    data["stats_us"] = {k: {m: s.to_dict() for m, s in d.items()} for k, d in stats.items()}

    def row(label, per_step, overhead, n_steps):
        return [label, per_step.format(3), "—" if overhead is None else overhead.format(3), str(n_steps)]

    headers = ["loop", "µs/step median [min–max]", "overhead µs/step over its bare loop", "steps × repeats"]
    rs, ts = stats["rayhooks"], stats["tf1"]
    rows = [
        row("bare Python loop, trivial step (anchor)", rs["bare"], None, "%d × %d" % (cfg["rh_steps"], repeats)),
        row("rayhooks MonitoredTrainingSession: run()", rs["run"], rs["run_overhead"],
            "%d × %d" % (cfg["rh_steps"], repeats)),
        row("rayhooks: while not should_stop(): run()", rs["loop"], rs["loop_overhead"],
            "%d × %d" % (cfg["rh_steps"], repeats)),
        row("TF1 bare sess.run(train_op) (TF1 anchor)", ts["bare"], None, "%d × %d" % (cfg["tf_steps"], repeats)),
        row("TF1 MonitoredSession: run(train_op)", ts["run"], ts["run_overhead"],
            "%d × %d" % (cfg["tf_steps"], repeats)),
        row("TF1: while not should_stop(): run(train_op)", ts["loop"], ts["loop_overhead"],
            "%d × %d" % (cfg["tf_steps"], repeats)),
    ]
    rh_loop, tf_loop = rs["loop_overhead"].median, ts["loop_overhead"].median
    targets = [
        Target("rayhooks overhead < %.0f µs/step (the should_stop()+run() loop)" % TARGET_US,
               "%s µs/step" % rs["loop_overhead"].format(3), rh_loop < TARGET_US, rh_loop / TARGET_US),
        Target("rayhooks overhead < %.0f µs/step (run() alone)" % TARGET_US,
               "%s µs/step" % rs["run_overhead"].format(3), rs["run_overhead"].median < TARGET_US,
               rs["run_overhead"].median / TARGET_US),
    ]
    notes = [
        "TF1 adds about %.0f µs per step according to the brief; measured here: %s µs/step (loop), %s (run() alone)."
        % (TF1_CLAIM_US, ts["loop_overhead"].format(1), ts["run_overhead"].format(1)),
        "rayhooks overhead / TF1 overhead (medians, loop): %s; i.e. TF1's hooks cost %s rayhooks'."
        % (fmt_ratio(rh_loop / tf_loop if tf_loop > 0 else None),
           fmt_ratio(tf_loop / rh_loop if rh_loop > 0 else None)),
        "Overheads are paired per repeat: each repeat times the bare loop and both monitored loops back to "
        "back (order reversed every other repeat), and subtracts that repeat's bare loop.",
        "rayhooks hooks: %s (log_step_count_steps=0, save_*_steps=%d); TF1 hooks: CheckpointSaverHook + "
        "SummarySaverHook (save_steps=%d), no summary op in either." % (
            "CheckpointSaverHook + SummarySaverHook", HUGE, HUGE),
    ]
    return BenchResult(NAME, TITLE, headers, rows, targets, notes, data)


if __name__ == "__main__":
    import sys
    print(run(quick="--quick" in sys.argv, tiny="--tiny" in sys.argv).markdown())
