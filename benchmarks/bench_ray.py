"""Figure: per-step overhead on a launched worker with the chief attached, and how late a `save_secs` save lands.

Part 1, per-step overhead. `rh.launch` runs 1, 2 and 4 workers, on Ray and on
the local backend, with `AsyncCheckpointSaverHook(save_steps=HUGE)` and
`SummarySaverHook(save_steps=HUGE)` as chief-only hooks and
`StopAtStepHook(last_step=HUGE)` as a worker hook. Inside `train_fn` every
worker times, interleaved in every repeat (order reversed every other one):

* anchor: a bare Python loop calling the trivial step function (returns {});
* run: `sess.run(step)` alone, in the worker's `ctx.session`;
* loop: the loop users write, `should_stop()` then `run(step)`.

The overhead is the session's per-step time minus the anchor's of the same
repeat on the same worker; the figure pools every (worker, repeat). The
workers leave the session by ending the timed loops themselves (no stop
from the chief): the run checks that the end hooks still ran (the final
save of worker 0 is committed at the last step, every worker ended there).

Part 2, lateness of a seconds-based save. 2 Ray workers run a step that
busy-waits STEP_SECS, with `AsyncCheckpointSaverHook(save_secs=SAVE_SECS)`
and a chief-side listener that appends (step, time) at `before_save` (when
the chief announces the save) to a file. Worker 0 records (step, time)
after every step. For each timer-driven save k >= 1:
deadline = announcement of save k-1 + save_secs; lateness = saved step -
the step worker 0 had completed at the deadline (and, in seconds, when worker
0 completed the saved step minus the deadline). Workers report every
`report_interval` (0.25 s, the default); within an interval of a deadline
the chief asks them to report right after it, projects each worker's last
report forward at its rate, and names a step a margin of
2 × rate × min(report_interval, 0.05 s) + 1 steps ahead, so that no worker
is already past it; the lateness is that delivery and margin by design.

Ray is started with `ray.init(num_cpus=4)` unless it is running already; the
workers ask for {"CPU": 0.01} each, so 4 fit on any machine. The listener
file assumes the chief runs on this node (a local Ray).
"""

import os
import shutil
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from benchmarks.common import BenchResult, Stat, Target, cost_score, score_range

NAME = "ray"
TITLE = "Figure: per-step overhead on launched workers (Ray and local), and save_secs lateness on Ray"
HUGE = 10 ** 9
TARGET_US = 2.0             # within 2 µs of the bare loop
WORKER_COUNTS = (1, 2, 4)
RESOURCES = {"CPU": 0.01}
STEP_SECS = 0.001           # part 2: a realistic step
SAVE_SECS = 1.0


def _config(quick, tiny):
    if tiny:
        return dict(steps=200, repeats=2, workers=(1, 2), backends=("ray", "local"),
                    late_secs=1.5, save_secs=0.3)
    if quick:
        return dict(steps=20000, repeats=7, workers=WORKER_COUNTS, backends=("ray", "local"),
                    late_secs=5.0, save_secs=SAVE_SECS)
    return dict(steps=50000, repeats=21, workers=WORKER_COUNTS, backends=("ray", "local"),
                late_secs=15.0, save_secs=SAVE_SECS)


# -- what runs on the workers (this module is shipped by value to Ray) -------------------------------

def _trivial_step():
    return {}


def overhead_train_fn(ctx, steps, repeats, warmup=1):
    """Times the bare loop, run() alone and the should_stop()+run() loop, interleaved; leaves the session itself.

    Each loop is timed by wall clock and by this thread's CPU time (which leaves
    out the time the thread waited for a core or, on the local backend, for the
    GIL: the machines these run on are shared).
    """
    import numpy as np
    perf_counter, thread_time = time.perf_counter, time.thread_time
    step = _trivial_step
    state = {"w": np.zeros(4, np.float32)}
    with ctx.session(state=state) as sess:
        start = sess.global_step
        run, should_stop = sess.run, sess.should_stop

        def bare(n):
            fn = step
            c, t = thread_time(), perf_counter()
            for _ in range(n):
                fn()
            return perf_counter() - t, thread_time() - c

        def run_only(n):
            fn = step
            c, t = thread_time(), perf_counter()
            for _ in range(n):
                run(fn)
            return perf_counter() - t, thread_time() - c

        def loop(n):
            fn = step
            c, t = thread_time(), perf_counter()
            for _ in range(n):
                if should_stop():
                    raise RuntimeError("the session asked to stop at step %d; nothing here should"
                                       % sess.global_step)
                run(fn)
            return perf_counter() - t, thread_time() - c

        order = [("bare", bare), ("run", run_only), ("loop", loop)]
        for _ in range(warmup):
            for _, fn in order:
                fn(steps)
        out = {}
        for name, _ in order:
            out[name], out[name + "_cpu"] = [], []
        for r in range(repeats):
            for name, fn in (order if r % 2 == 0 else order[::-1]):
                wall, cpu = fn(steps)
                out[name].append(wall / steps)
                out[name + "_cpu"].append(cpu / steps)
        steps_run = sess.global_step - start
    # out of the with-block: the session ended without a stop; its end hooks ran in __exit__
    return {"worker": ctx.worker_index, "start": start, "steps_run": steps_run, "end_step": sess.global_step,
            "closed": sess._closed, **out}


def _busy_step(until_secs):
    perf_counter = time.perf_counter
    end = perf_counter() + until_secs
    while perf_counter() < end:
        pass
    return {}


def lateness_train_fn(ctx, step_secs):
    """Runs busy-wait steps until the chief's stop; every worker records (step, time) after every step."""
    import numpy as np
    state = {"w": np.zeros(4, np.float32)}
    marks = []
    now = time.time
    with ctx.session(state=state) as sess:
        run, should_stop = sess.run, sess.should_stop
        marks.append((sess.global_step, now()))
        while not should_stop():
            run(_busy_step, step_secs)
            marks.append((sess.global_step, now()))
    return {"worker": ctx.worker_index, "end_step": sess.global_step, "marks": marks}


class AnnouncementRecorder:
    """Chief-side listener: appends `before <step> <time>` / `after <step> <time>` lines to a local file."""

    def __init__(self, path):
        self.path = path

    def _write(self, what, step):
        with open(self.path, "a") as f:
            f.write("%s %d %.6f\n" % (what, step, time.time()))

    def begin(self):
        pass

    def before_save(self, session, global_step_value):
        self._write("before", global_step_value)

    def after_save(self, session, global_step_value):
        self._write("after", global_step_value)

    def end(self, session, global_step_value):
        pass


# -- the driver ----------------------------------------------------------------------------------------

def _ensure_ray():
    """Ray for the run: the one already running, or a local one (4 CPUs) that `run` shuts down after."""
    import ray
    import ray.cloudpickle
    # train_fn and the listener live here; Ray workers may not have benchmarks/ on their path
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    if ray.is_initialized():
        return ray, False
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    return ray, True


def measure_overhead(backend, num_workers, steps, repeats, tmpdir):
    import rayhooks as rh
    ckpt = os.path.join(tmpdir, "overhead-%s-%d" % (backend, num_workers))
    started = time.perf_counter()
    result = rh.launch(
        lambda ctx: overhead_train_fn(ctx, steps, repeats), num_workers, backend=backend,
        chief_only_hooks=[rh.AsyncCheckpointSaverHook(ckpt, save_steps=HUGE),
                          rh.SummarySaverHook(save_steps=HUGE, output_dir=ckpt, summary_op=["loss"])],
        hooks=[rh.StopAtStepHook(last_step=HUGE)],
        resources_per_worker=dict(RESOURCES) if backend == "ray" else None, tf_config=False)
    wall = time.perf_counter() - started
    expected = (1 + repeats) * 2 * steps  # warm-up + repeats, of run() and of the loop
    workers = sorted(result.worker_results, key=lambda r: r["worker"])
    problems = []
    if [w["worker"] for w in workers] != list(range(num_workers)):
        problems.append("worker results %r" % [w["worker"] for w in workers])
    for w in workers:
        if w["steps_run"] != expected or not w["closed"]:
            problems.append("worker %d ran %d steps (expected %d), closed=%s"
                            % (w["worker"], w["steps_run"], expected, w["closed"]))
    # the end hooks ran: the chief heard every worker end at the last step, and worker 0's final save committed
    if result.last_step != expected or not result.checkpoints or result.checkpoints[-1] != expected:
        problems.append("last_step=%r checkpoints=%r (expected the final save at %d)"
                        % (result.last_step, result.checkpoints, expected))
    if problems:
        raise AssertionError("%s backend, %d workers: %s" % (backend, num_workers, "; ".join(problems)))
    return {"backend": backend, "workers": num_workers, "launch_wall_s": wall, "steps_per_worker": expected,
            "checkpoints": list(result.checkpoints),
            **_pooled(workers, ""), **_pooled(workers, "_cpu")}


def _pooled(workers, suffix):
    """Every (worker, repeat) pooled: per-step times, and overheads paired with the same repeat's bare loop."""
    out = {}
    for kind in ("bare", "run", "loop"):
        out[kind + suffix] = [x for w in workers for x in w[kind + suffix]]
    for kind in ("run", "loop"):
        out[kind + "_overhead" + suffix] = [x - b for w in workers
                                            for x, b in zip(w[kind + suffix], w["bare" + suffix])]
    return out


def _read_marks(path):
    before, after = [], []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                what, step, t = line.split()
                (before if what == "before" else after).append((int(step), float(t)))
    return before, after


def _step_at(marks, t):
    """The last step worker 0 had completed at time t (marks: (step, time) in order)."""
    import bisect
    times = [m[1] for m in marks]
    i = bisect.bisect_right(times, t)
    return marks[max(0, i - 1)][0], (marks[i][1] if i < len(marks) else None)


def measure_lateness(num_workers, run_secs, save_secs, step_secs, tmpdir, report_interval=0.25):
    import rayhooks as rh
    ckpt = os.path.join(tmpdir, "late")
    log = os.path.join(tmpdir, "announcements.txt")
    last_step = max(10, int(run_secs / step_secs))
    result = rh.launch(
        lambda ctx: lateness_train_fn(ctx, step_secs), num_workers, backend="ray",
        chief_only_hooks=[rh.AsyncCheckpointSaverHook(ckpt, save_secs=save_secs,
                                                      listeners=[AnnouncementRecorder(log)])],
        hooks=[rh.StopAtStepHook(last_step=last_step)], resources_per_worker=dict(RESOURCES),
        tf_config=False, report_interval=report_interval)
    before, after = _read_marks(log)
    by_worker = {r["worker"]: r["marks"] for r in result.worker_results}
    marks = by_worker[0]
    committed = set(result.checkpoints)
    step_time = {s: t for s, t in marks}
    saves = []
    for k in range(1, len(before)):
        step, announced = before[k]
        if step >= result.last_step:  # the final save at the end, not the timer's
            continue
        deadline = before[k - 1][1] + save_secs
        at_deadline, _ = _step_at(marks, deadline)
        at_announce, _ = _step_at(marks, announced)
        furthest = max(_step_at(m, announced)[0] for m in by_worker.values())
        done = step_time.get(step)
        saves.append({"step": step, "deadline": deadline, "announced": announced,
                      "step_at_deadline": at_deadline, "step_at_announce": at_announce,
                      "late_steps": step - at_deadline,
                      "detect_secs": announced - deadline,           # deadline -> announcement (report granularity)
                      "margin_steps": step - at_announce,            # announcement -> the step it names
                      "skew_steps": furthest - at_announce,          # the furthest worker ahead of worker 0
                      "ahead_of_furthest": step - furthest,          # the named step past the furthest worker
                      "late_secs": None if done is None else done - deadline,
                      "committed": step in committed,
                      # the deadline passed before worker 0 ran its first step (actor start-up): not steady state
                      "startup": deadline < marks[0][1]})
    rates = [(b[0] - a[0]) / (b[1] - a[1]) for a, b in zip(marks, marks[1:]) if b[1] > a[1]]
    return {"workers": num_workers, "save_secs": save_secs, "step_secs": step_secs,
            "report_interval": report_interval, "last_step": result.last_step,
            "checkpoints": list(result.checkpoints), "skipped_saves": result.skipped_saves,
            "announcements": before, "commits": after, "saves": saves,
            "steps_per_sec": (marks[-1][0] - marks[0][0]) / (marks[-1][1] - marks[0][1])
            if len(marks) > 1 and marks[-1][1] > marks[0][1] else None,
            "median_step_secs": Stat.of([1 / r for r in rates]).median if rates else None}


def run(quick=False, tiny=False):
    cfg = _config(quick, tiny)
    tmp = tempfile.mkdtemp(prefix="rayhooks-bench-ray-")
    data = {"config": cfg, "overhead": [], "lateness": None}
    ray, started_ray = None, False
    try:
        if "ray" in cfg["backends"]:
            ray, started_ray = _ensure_ray()
            data["ray_cluster_cpus"] = ray.cluster_resources().get("CPU")
        for backend in cfg["backends"]:
            for n in cfg["workers"]:
                data["overhead"].append(measure_overhead(backend, n, cfg["steps"], cfg["repeats"], tmp))
        if "ray" in cfg["backends"]:
            data["lateness"] = measure_lateness(2, cfg["late_secs"], cfg["save_secs"], STEP_SECS, tmp)
    finally:
        from rayhooks.summary_writer import SummaryWriterCache
        try:
            SummaryWriterCache.clear()
        except Exception:
            pass
        if started_ray:
            ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)

    us = 1e6
    headers = ["backend", "workers", "bare loop µs/step", "run() overhead µs/step", "loop overhead µs/step",
               "loop overhead, CPU time µs/step", "loop overhead, best repeat (CPU)",
               "steps × repeats × workers", "launch wall s"]
    rows, targets = [], []
    kinds = ("bare", "run", "loop", "run_overhead", "loop_overhead")
    for d in data["overhead"]:
        s = {k: Stat.of(d[k]).scaled(us) for k in kinds}
        c = {k: Stat.of(d[k + "_cpu"]).scaled(us) for k in kinds}
        d["stats_us"] = {k: v.to_dict() for k, v in s.items()}
        d["stats_cpu_us"] = {k: v.to_dict() for k, v in c.items()}
        rows.append([d["backend"], str(d["workers"]), s["bare"].format(3), s["run_overhead"].format(3),
                     s["loop_overhead"].format(3), c["loop_overhead"].format(3), "%.3f" % c["loop_overhead"].min,
                     "%d × %d × %d" % (cfg["steps"], cfg["repeats"], d["workers"]), "%.1f" % d["launch_wall_s"]])
        if d["backend"] == "ray":
            targets.append(Target(
                "Ray, %d worker%s: the should_stop()+run() loop within %.0f µs/step of the bare loop (thread CPU time)"
                % (d["workers"], "" if d["workers"] == 1 else "s", TARGET_US),
                "%s µs/step (wall clock: %s)" % (c["loop_overhead"].format(3), s["loop_overhead"].format(3)),
                c["loop_overhead"].median < TARGET_US, cost_score(c["loop_overhead"].median, TARGET_US),
                score_range((c["loop_overhead"].min, c["loop_overhead"].max), TARGET_US)))
    extra, notes = [], [
        "Overhead = session per-step time - the bare loop's of the same repeat on the same worker; the figure "
        "pools every (worker, repeat): median [min–max]. Wall-clock columns unless marked CPU time (the "
        "training thread's own CPU time, time.thread_time: it leaves out waiting for a core, or for the GIL, "
        "on a shared machine); the target is judged on CPU time.",
        "Chief-only hooks: AsyncCheckpointSaverHook(save_steps=%d) + SummarySaverHook(save_steps=%d); worker "
        "hooks: StopAtStepHook(last_step=%d); report_interval 0.25 s (the default); Ray workers reserve %s each (the "
        "machine has %s cores; Ray's CPU count: %s)." % (HUGE, HUGE, HUGE, RESOURCES, os.cpu_count(),
                                                         data.get("ray_cluster_cpus")),
        "Each worker leaves the session by ending its own timed loops (no stop from the chief); the run "
        "checked that the end hooks ran: every worker ended at the same step and worker 0's final save "
        "committed there.",
        "On the local backend the workers are threads of one process: with 2 or 4 workers each loop "
        "also waits for the GIL, in the anchor as in the session.",
    ]
    late = data["lateness"]
    if late is not None:
        startup = [s for s in late["saves"] if s["startup"]]
        saves = [s for s in late["saves"] if not s["startup"]]
        if startup:
            notes.append("Left out of the lateness figures: %d save(s) whose deadline passed before worker 0 "
                         "ran its first step (workers still starting): %s." % (len(startup), ", ".join(
                             "step %d announced %.2f s after its deadline, %d step(s) ahead of worker 0%s"
                             % (s["step"], s["detect_secs"], s["margin_steps"],
                                "" if s["committed"] else ", not committed (the plan reached worker 0 late)")
                             for s in startup)))
        if saves:
            ls = Stat.of([s["late_steps"] for s in saves])
            secs = [s["late_secs"] for s in saves if s["late_secs"] is not None]
            lsec = Stat.of(secs).scaled(1e3) if secs else None
            det = Stat.of([s["detect_secs"] for s in saves]).scaled(1e3)
            mar = Stat.of([s["margin_steps"] for s in saves])
            skew = Stat.of([s["skew_steps"] for s in saves])
            ahead = Stat.of([s["ahead_of_furthest"] for s in saves])
            late["stats"] = {"late_steps": ls.to_dict(), "late_ms": lsec.to_dict() if lsec else None,
                             "detect_ms": det.to_dict(), "margin_steps": mar.to_dict(),
                             "skew_steps": skew.to_dict(), "ahead_of_furthest": ahead.to_dict()}
            extra.append(("save_secs=%g on Ray, %d workers, step ≈ %.1f ms (busy-wait), %.0f steps/s on worker 0, "
                          "report_interval %.2f s, %d timer-driven saves:"
                          % (late["save_secs"], late["workers"], 1e3 * (late["median_step_secs"] or 0),
                             late["steps_per_sec"] or 0, late["report_interval"], len(saves)),
                          ["figure", "median [min–max]", "max"],
                          [["lateness, steps (saved step - worker 0's step at the deadline)", ls.format(0), "%d" % ls.max],
                           ["lateness, ms (worker 0 finished the saved step - deadline)",
                            lsec.format(1) if lsec else "n/a", "%.1f" % lsec.max if lsec else "n/a"],
                           ["of which: deadline -> announcement, ms (the report asked for at the deadline)", det.format(1), "%.1f" % det.max],
                           ["of which: announced step - worker 0's step at announcement", mar.format(0), "%d" % mar.max],
                           ["  = the furthest worker's lead over worker 0 at announcement", skew.format(0), "%d" % skew.max],
                           ["  + announced step - the furthest worker's step then (margin - report staleness)",
                            ahead.format(0), "%d" % ahead.max]]))
            expected_margin = 2 * (late["steps_per_sec"] or 0) * min(late["report_interval"], 0.05) + 1
            notes.append("By design the chief asks the workers to report right after a save_secs deadline (they "
                         "report every report_interval otherwise), projects each worker's last report forward at "
                         "its rate, and names a step 2 × rate × min(report_interval, 0.05 s) + 1 ahead (%.0f "
                         "steps at the measured rate), so lateness ≈ the report's delivery + that margin."
                         % expected_margin)
            notes.append("Saves committed: %d of %d timer-driven ones in the figures; skipped_saves=%d in the "
                         "run; checkpoints %s." % (sum(s["committed"] for s in saves), len(saves),
                                                   late["skipped_saves"], late["checkpoints"]))
        else:
            notes.append("save_secs lateness: no timer-driven save after start-up (announcements %r)"
                         % (late["announcements"],))
    return BenchResult(NAME, TITLE, headers, rows, targets, notes, data, extra)


if __name__ == "__main__":
    print(run(quick="--quick" in sys.argv, tiny="--tiny" in sys.argv).markdown())
