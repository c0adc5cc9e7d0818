"""Figure 1: what the hooks cost on a step that triggers nothing.

Five loops, each timed over `steps` steps and repeated, subject and anchor
interleaved in every repeat:

* anchor: a bare Python loop calling a trivial step function;
* rayhooks: `rh.MonitoredTrainingSession` in local mode with its default chief
  hooks, a `CheckpointSaverHook` and a `SummarySaverHook`, both with a huge
  `save_steps` (so only the initial save at creation ever happens), and the
  `StepCounterHook` disabled (`log_step_count_steps=0`);
* rayhooks with the defaults a user gets without choosing:
  `rh.MonitoredTrainingSession(checkpoint_dir=..., state=...)`, which saves
  every 600 s and writes summaries and steps/s every 100 steps; the runs
  that write them are in its figure (timed as the loop below);
* TF1 anchor: a plain `tf.compat.v1.Session` running the train op (a
  global-step increment in a graph);
* TF1: `tf.compat.v1.train.MonitoredSession` with TF1's `CheckpointSaverHook`
  and `SummarySaverHook` (same huge `save_steps`) running the same train op.

Each monitored loop is timed two ways: `run()` alone, and the loop users write,
`while not sess.should_stop(): sess.run(...)`. The overhead is the per-step
time minus that of the respective bare loop, paired repeat by repeat.

Ray Train anchor (no target, context): a Ray Train (v2 API) function trainer
with 1 worker (`DataParallelTrainer`; Ray is started with `ray.init(num_cpus=2)`
unless it is running, and shut down at the end if started here). Inside the
training function, the bare loop of the same trivial step and the same loop
calling `ray.train.report({"step": i})` every step are interleaved as above;
then `report()` is timed alone, each call made once the controller has taken
every earlier report (waited for, untimed, with
`ray.train.get_all_reported_checkpoints(consistency_mode=COMMITTED)`), which
is what a loop reporting every N steps pays at each report. In Ray 2.60 a
report() waits for a broadcast through a synchronization actor and then puts
its result on a queue of size 1 that the controller drains once per poll
(`RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`, 2 s): reporting every step runs at
about one step per poll. Ray starts once per run of this figure; tiny mode
(the smoke tests) skips the anchor unless `run(ray=True)`.
"""

import json
import os
import shutil
import sys
import tempfile
import time
import traceback

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

from benchmarks import common
from benchmarks.common import BenchResult, Stat, Target, cost_score, fmt_ratio, interleaved, score_range
from benchmarks.raytrain import RAY_CPUS, ensure_ray, raytrain_error, raytrain_fit, raytrain_poll_secs

NAME = "step_overhead"
TITLE = "Figure 1: per-step overhead on non-trigger steps"
HUGE = 10 ** 9
TARGET_US = 2.0      # the brief: rayhooks adds < 2 µs per step
TF1_CLAIM_US = 25.0  # the brief: TF1 adds about 25 µs
RAY_WAIT_SECS = 300.0
DEFAULTS_LABEL = ("rayhooks: the same loop, MonitoredTrainingSession's defaults (checkpoint every 600 s, "
                  "summaries and step counter every 100 steps)")
RT_REPORT_LABEL = "Ray Train: ray.train.report({'step': i}) every step"


def _config(quick, tiny):
    """Steps per repeat and repeats; rt_*: the Ray Train anchor (each report() waits up to a controller poll)."""
    if tiny:
        return dict(rh_steps=200, tf_steps=50, repeats=2, rt_steps=2, rt_repeats=1, rt_warmup=0)
    if quick:
        return dict(rh_steps=5000, tf_steps=300, repeats=9, rt_steps=3, rt_repeats=3, rt_warmup=1)
    return dict(rh_steps=10000, tf_steps=1000, repeats=31, rt_steps=5, rt_repeats=5, rt_warmup=1)


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

    # What a user gets without choosing: checkpoints every 600 s, summaries and the
    # step counter every 100 steps (whose runs call the hooks, and are in the figure).
    defaults = rh.MonitoredTrainingSession(checkpoint_dir=tmp + "-defaults", state={"w": np.zeros(16, np.float32)})
    return (sess, defaults, counter, bare, run_only, _stop_and_run(sess, step, "the session"),
            _stop_and_run(defaults, step, "the session"))


def _stop_and_run(session, fn, who):
    """The timed `while not should_stop(): run(fn)` loop over `n` steps (rayhooks' and TF1's alike)."""
    def timed(n):
        run, should_stop = session.run, session.should_stop
        started = time.perf_counter()
        for _ in range(n):
            if should_stop():
                raise RuntimeError("%s asked to stop; no hook here should" % who)
            run(fn)
        return time.perf_counter() - started
    return timed


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

    stop_and_run = _stop_and_run(mon, train_op, "the TF1 session")

    def close():
        with graph.as_default():  # TF1's final save builds its saver in the default graph
            mon.close()
        raw.close()

    def steps_done():
        return int(raw.run(global_step))

    return close, steps_done, bare, run_only, stop_and_run


# -- Ray Train (also used by bench_checkpoint_stall) ---------------------------------------

def raytrain_report_fn(config):
    """On the Ray Train worker: the bare loop vs the loop reporting every step, then report() calls alone."""
    import ray.train
    from ray.train import CheckpointConsistencyMode

    counter = [0]

    def step():
        counter[0] += 1

    def bare(n):
        fn = step
        started = time.perf_counter()
        for _ in range(n):
            fn()
        return time.perf_counter() - started

    def report_each_step(n):
        report, fn = ray.train.report, step
        started = time.perf_counter()
        for i in range(n):
            fn()
            report({"step": i})
        return time.perf_counter() - started

    a, s, d = interleaved(bare, {"report": report_each_step}, config["steps"], config["repeats"],
                          warmup=config["warmup"])
    reports = (config["warmup"] + config["repeats"]) * config["steps"]
    calls = []
    for i in range(config["repeats"]):
        ray.train.get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED,
                                               timeout_s=config["wait_secs"])  # untimed: the queue is empty
        started = time.perf_counter()
        ray.train.report({"step": -1 - i})
        calls.append(time.perf_counter() - started)
        reports += 1
    with open(config["out"], "w") as f:
        json.dump({"bare": a, "report": s["report"], "report_overhead": d["report"], "call": calls,
                   "steps_run": counter[0], "reports": reports}, f)


def measure_raytrain(cfg, tmp):
    """The Ray Train anchor: one Ray Train run (Ray started here unless running); per-step seconds as lists."""
    began = entered = time.perf_counter()
    ray_mod, started = ensure_ray(sys.modules[__name__], common)
    ray_start = time.perf_counter() - began
    try:
        out = os.path.join(tmp, "raytrain-report.json")
        began = time.perf_counter()
        raytrain_fit(raytrain_report_fn,
                     {"steps": cfg["rt_steps"], "repeats": cfg["rt_repeats"], "warmup": cfg["rt_warmup"],
                      "wait_secs": RAY_WAIT_SECS, "out": out},
                     os.path.join(tmp, "raytrain-storage"), "report")
        fit_secs = time.perf_counter() - began
        with open(out) as f:
            got = json.load(f)
        poll = raytrain_poll_secs()
    finally:
        if started:
            ray_mod.shutdown()
    got.update(wall_secs=time.perf_counter() - entered, fit_secs=fit_secs, ray_start_secs=ray_start,
               ray_started_here=started, poll_secs=poll)
    return got


def _range(stat):
    return score_range((stat.min, stat.max), TARGET_US)


def run(quick=False, tiny=False, ray=None):
    """`ray`: run the Ray Train anchor (default: yes, except in tiny mode)."""
    if ray is None:
        ray = not tiny
    cfg = _config(quick, tiny)
    repeats = cfg["repeats"]
    tmp = tempfile.mkdtemp(prefix="rayhooks-bench-steps-")
    data = {"config": cfg}
    try:
        rh_dir, tf_dir = os.path.join(tmp, "rayhooks"), os.path.join(tmp, "tf1")
        sess, defaults, counter, bare, run_only, stop_and_run, defaults_loop = _rayhooks_loops(rh_dir)
        a, s, d = interleaved(bare, {"run": run_only, "loop": stop_and_run, "defaults": defaults_loop},
                              cfg["rh_steps"], repeats)
        data["rayhooks_steps_run"] = sess.global_step
        sess.close()
        defaults.close()
        data["rayhooks"] = {"bare": a, "run": s["run"], "run_overhead": d["run"],
                            "loop": s["loop"], "loop_overhead": d["loop"],
                            "defaults": s["defaults"], "defaults_overhead": d["defaults"]}

        close, steps_done, tbare, trun_only, tstop_and_run = _tf1_loops(tf_dir)
        a, s, d = interleaved(tbare, {"run": trun_only, "loop": tstop_and_run}, cfg["tf_steps"], repeats)
        data["tf1_steps_run"] = steps_done()
        close()
        data["tf1"] = {"bare": a, "run": s["run"], "run_overhead": d["run"],
                       "loop": s["loop"], "loop_overhead": d["loop"]}

        data["raytrain"] = None
        if ray:  # last, so that Ray's processes are not running beside the loops above
            try:
                data["raytrain"] = measure_raytrain(cfg, tmp)
            except Exception as e:  # noqa: BLE001 -- an anchor that fails is reported, not fatal
                traceback.print_exc(file=sys.stderr)
                data["raytrain"] = {"error": raytrain_error(e)}
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
        row(DEFAULTS_LABEL, rs["defaults"], rs["defaults_overhead"], "%d × %d" % (cfg["rh_steps"], repeats)),
        row("TF1 bare sess.run(train_op) (TF1 anchor)", ts["bare"], None, "%d × %d" % (cfg["tf_steps"], repeats)),
        row("TF1 MonitoredSession: run(train_op)", ts["run"], ts["run_overhead"],
            "%d × %d" % (cfg["tf_steps"], repeats)),
        row("TF1: while not should_stop(): run(train_op)", ts["loop"], ts["loop_overhead"],
            "%d × %d" % (cfg["tf_steps"], repeats)),
    ]
    rt = data["raytrain"]
    rt_note = None
    if rt is None:
        rt_note = "Ray Train anchor not run (ray=False; tiny mode skips it unless asked)."
    elif "error" in rt:
        rows.append(["Ray Train ray.train.report() every step", "unavailable: " + rt["error"], "—", "—"])
    else:
        rts = {m: Stat.of(rt[m]).scaled(us) for m in ("bare", "report", "report_overhead", "call")}
        stats["raytrain"] = rts
        data["stats_us"]["raytrain"] = {m: st.to_dict() for m, st in rts.items()}
        n_rt = "%d × %d" % (cfg["rt_steps"], cfg["rt_repeats"])
        rows += [
            row("Ray Train worker: bare Python loop (Ray anchor)", rts["bare"], None, n_rt),
            [RT_REPORT_LABEL, rts["report"].format(0), rts["report_overhead"].format(0), n_rt],
            ["Ray Train: one report() with the previous one taken (µs/call)", rts["call"].format(0),
             rts["call"].format(0), "1 × %d" % len(rt["call"])],
        ]
    rh_loop, tf_loop = rs["loop_overhead"].median, ts["loop_overhead"].median
    targets = [
        Target("rayhooks overhead < %.0f µs/step (the should_stop()+run() loop)" % TARGET_US,
               "%s µs/step" % rs["loop_overhead"].format(3), rh_loop < TARGET_US, cost_score(rh_loop, TARGET_US),
               _range(rs["loop_overhead"])),
        Target("rayhooks overhead < %.0f µs/step (run() alone)" % TARGET_US,
               "%s µs/step" % rs["run_overhead"].format(3), rs["run_overhead"].median < TARGET_US,
               cost_score(rs["run_overhead"].median, TARGET_US), _range(rs["run_overhead"])),
        Target("rayhooks overhead < %.0f µs/step (the loop, MonitoredTrainingSession's defaults)" % TARGET_US,
               "%s µs/step" % rs["defaults_overhead"].format(3), rs["defaults_overhead"].median < TARGET_US,
               cost_score(rs["defaults_overhead"].median, TARGET_US), _range(rs["defaults_overhead"])),
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
    if rt_note:
        notes.append(rt_note)
    elif "raytrain" in stats:
        rts = stats["raytrain"]
        rt_over = rts["report_overhead"].median
        notes += [
            "Ray Train anchor (no target): ray.train.report({'step': i}) every step adds %s s/step over the bare "
            "loop in the same worker, i.e. %s rayhooks' overhead (loop). A lone report() with the controller caught up "
            "takes %s ms. Each report() waits for a broadcast through Ray Train's synchronization actor, then puts "
            "its result on a queue of size 1 that the controller drains once per poll (every %.1f s, "
            "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S): reporting every step runs at about one step per poll."
            % (rts["report_overhead"].scaled(1e-6).format(2), fmt_ratio(rt_over / rh_loop if rh_loop > 0 else None),
               rts["call"].scaled(1e-3).format(2), rt["poll_secs"]),
            "Ray Train: 1 worker (resources_per_worker CPU 0.01), Ray %s (%.0f s to start), the Ray Train run "
            "%.0f s, %.0f s in all for this anchor; %d steps and %d report() calls ran in the worker." % (
                "started here with num_cpus=%d" % RAY_CPUS if rt["ray_started_here"] else "already running",
                rt["ray_start_secs"], rt["fit_secs"], rt["wall_secs"], rt["steps_run"], rt["reports"]),
        ]
    return BenchResult(NAME, TITLE, headers, rows, targets, notes, data)


if __name__ == "__main__":
    print(run(quick="--quick" in sys.argv, tiny="--tiny" in sys.argv).markdown())
