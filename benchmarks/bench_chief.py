"""Figure: what one progress report costs the chief, with 1, 64 and 1024 simulated workers.

`rayhooks.chief.Chief` is built directly (no Ray, no transport, `send` a
no-op) from the spec `launch` would build for an `AsyncCheckpointSaverHook`
(save_steps=1000) and a `SummarySaverHook` (save_steps=100, summary_op
["loss"]). After `start()` and `workers_created(0)`, reports are fed
round-robin from every worker, as if each ran 1000 steps/s and reported every
0.1 s: in round r worker w reports step `(r + 1) * STEPS_PER_REPORT` at time
`t0 + 0.1 * r` with the metrics `{"loss": 1.0}`; worker 0 also carries the
summary outputs of the summary steps it crossed, as a real worker 0 does (the
chief writes them to the events file, buffered in memory). No shards are
sent, so nothing is committed: this is the per-report cost, not the cost of
commits.

The target: 1024 workers × 10 reports/s = 10,240 reports/s with CPU to spare.
The CPU fraction is the required rate over the rate achieved (1.0 = the
chief's thread is saturated). Ray's own per-call cost (deserialising each
actor call on the chief actor) comes on top and is not measured here.
"""

import cProfile
import io
import os
import pstats
import shutil
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from benchmarks.common import REPO_ROOT, BenchResult, Stat, Target, score_range

NAME = "chief"
TITLE = "Figure: the chief's cost per progress report (1, 64, 1024 simulated workers)"
WORKER_COUNTS = (1, 64, 1024)
REPORTS_PER_SEC = 10          # per worker: report_interval = 0.1 s
STEPS_PER_REPORT = 100        # 1000 steps/s per worker
TARGET_WORKERS = 1024
TARGET_RATE = TARGET_WORKERS * REPORTS_PER_SEC
TARGET_CPU_FRACTION = 0.5     # "with CPU to spare": at most half of one core


def _config(quick, tiny):
    # block_secs: each timed block is sized (in whole rounds of reports) to take about this long
    if tiny:
        return dict(block_secs=0.005, repeats=2, workers=(1, 4))
    if quick:
        return dict(block_secs=0.4, repeats=5, workers=WORKER_COUNTS)
    return dict(block_secs=1.5, repeats=11, workers=WORKER_COUNTS)


def make_chief(tmpdir, num_workers):
    """A Chief for `num_workers`, started, with every worker created at step 0."""
    from rayhooks.checkpoint_hooks import AsyncCheckpointSaverHook
    from rayhooks.chief import Chief
    from rayhooks.spec import build_spec
    from rayhooks.summary_hook import SummarySaverHook

    ckpt, summ = os.path.join(tmpdir, "ckpt"), os.path.join(tmpdir, "summaries")
    spec = build_spec([AsyncCheckpointSaverHook(ckpt, save_steps=1000),
                       SummarySaverHook(save_steps=100, output_dir=summ, summary_op=["loss"])])
    sent = []
    chief = Chief(spec, num_workers, send=lambda i, update: sent.append(i))
    start = chief.start()
    chief.workers_created(start or 0)
    return chief, sent


class _Feeder:
    """Round-robin reports from every worker; `feed(n)` hands the chief the next n reports."""

    def __init__(self, chief, num_workers, t0=1.0e9):
        self.chief = chief
        self.num_workers = num_workers
        self.t0 = t0
        self.round = 0
        self.worker = 0
        self.reports = 0

    def feed(self, n):
        report = self.chief.report
        workers = self.num_workers
        metrics = {"loss": 1.0}
        r, w = self.round, self.worker
        started = time.perf_counter()
        cpu = time.process_time()
        for _ in range(n):
            step = (r + 1) * STEPS_PER_REPORT
            now = self.t0 + r / REPORTS_PER_SEC
            if w == 0:  # the summary steps crossed since the last report (every 100th step, from step 1)
                outputs = {s: {"loss": 1.0} for s in range(r * STEPS_PER_REPORT + 1, step + 1, 100)}
            else:
                outputs = {}
            report(w, step, now, outputs, [], metrics, False, ())
            w += 1
            if w == workers:
                w, r = 0, r + 1
        wall = time.perf_counter() - started
        cpu = time.process_time() - cpu
        self.round, self.worker = r, w
        self.reports += n
        return wall, cpu


def measure(num_workers, block_secs, repeats, tmpdir):
    """Per-report wall and CPU seconds over `repeats` blocks of whole rounds (after a sizing warm-up)."""
    chief, sent = make_chief(os.path.join(tmpdir, "w%d" % num_workers), num_workers)
    feeder = _Feeder(chief, num_workers)
    warm = 2 * num_workers  # every worker seen twice: rates known, summary writer open
    wall, _ = feeder.feed(warm)
    per_round = max(wall / warm * num_workers, 1e-9)
    block = num_workers * max(1, int(block_secs / per_round))
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = feeder.feed(block)
        walls.append(wall / block)
        cpus.append(cpu / block)
    summary = chief.finish()
    return {"wall_per_report": walls, "cpu_per_report": cpus, "reports": feeder.reports, "block": block,
            "progress_max": max(chief.progress.values()), "last_step": summary["last_step"],
            "updates_sent": len(sent)}


def profile(num_workers, rounds, tmpdir, top=8):
    """cProfile of `rounds` rounds of reports: (the top functions by own time as text, the hottest one)."""
    chief, _ = make_chief(os.path.join(tmpdir, "prof%d" % num_workers), num_workers)
    feeder = _Feeder(chief, num_workers)
    feeder.feed(2 * num_workers)
    prof = cProfile.Profile()
    prof.enable()
    feeder.feed(rounds * num_workers)
    prof.disable()
    chief.finish()
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out)
    stats.sort_stats("tottime").print_stats(top)
    total = sum(v[2] for v in stats.stats.values()) or 1.0
    hottest = []
    for (filename, line, func), (cc, nc, tottime, cumtime, callers) in sorted(
            stats.stats.items(), key=lambda kv: -kv[1][2])[:3]:
        where = "%s:%d(%s)" % (os.path.relpath(filename, REPO_ROOT) if filename.startswith("/") else filename,
                               line, func)
        who = sorted(callers, key=lambda c: -callers[c][2])[:1]
        caller = ("%s:%d(%s)" % (os.path.relpath(who[0][0], REPO_ROOT), who[0][1], who[0][2])
                  if who and who[0][0].startswith("/") else None)
        hottest.append({"where": where, "share": tottime / total, "calls": nc, "top_caller": caller})
    return out.getvalue(), hottest


def run(quick=False, tiny=False, with_profile=None):
    cfg = _config(quick, tiny)
    tmp = tempfile.mkdtemp(prefix="rayhooks-bench-chief-")
    data = {"config": cfg, "workers": {}, "profiles": {}}
    try:
        for n in cfg["workers"]:
            data["workers"][n] = measure(n, cfg["block_secs"], cfg["repeats"], tmp)
        if with_profile if with_profile is not None else not tiny:
            for n in (min(cfg["workers"]), max(cfg["workers"])):
                text, hottest = profile(n, max(2, 2000 // n), tmp)
                data["profiles"][n] = {"text": text, "hottest": hottest}
    finally:
        from rayhooks.summary_writer import SummaryWriterCache
        try:
            SummaryWriterCache.clear()
        except Exception:
            pass
        shutil.rmtree(tmp, ignore_errors=True)

    us = 1e6
    rows = []
    stats = {}
    for n, d in data["workers"].items():
        wall, cpu = Stat.of(d["wall_per_report"]).scaled(us), Stat.of(d["cpu_per_report"]).scaled(us)
        rate = Stat.of([1.0 / x for x in d["wall_per_report"]])
        required = n * REPORTS_PER_SEC
        fraction = required * cpu.median / us       # of one core, from CPU time (robust to a busy machine)
        wall_fraction = required / rate.median      # from wall time
        stats[n] = {"wall_us": wall.to_dict(), "cpu_us": cpu.to_dict(), "reports_per_sec": rate.to_dict(),
                    "required_per_sec": required, "cpu_fraction": fraction, "wall_fraction": wall_fraction}
        rows.append([str(n), wall.format(2), cpu.format(2), rate.format(0), "%d" % required,
                     "%.3f (wall %.3f)" % (fraction, wall_fraction), "%d × %d" % (d["block"], len(d["wall_per_report"]))])
    data["stats"] = stats
    headers = ["workers", "µs/report (wall)", "µs/report (CPU)", "reports/s handled (wall)",
               "reports/s needed (10/s each)", "core fraction needed (CPU time)", "reports × repeats"]
    targets = []
    if TARGET_WORKERS in stats:
        s = stats[TARGET_WORKERS]
        targets.append(Target(
            "the chief handles %d workers × %d reports/s = %d reports/s using < %.0f%% of one core"
            % (TARGET_WORKERS, REPORTS_PER_SEC, TARGET_RATE, 100 * TARGET_CPU_FRACTION),
            "%.0f reports/s achieved (wall), core fraction %.3f by CPU time, %.3f by wall time"
            % (s["reports_per_sec"]["median"], s["cpu_fraction"], s["wall_fraction"]),
            s["cpu_fraction"] < TARGET_CPU_FRACTION, s["cpu_fraction"] / TARGET_CPU_FRACTION,
            score_range([TARGET_WORKERS * REPORTS_PER_SEC * c for c in data["workers"][TARGET_WORKERS]["cpu_per_report"]],
                        TARGET_CPU_FRACTION)))
    notes = [
        "Chief built directly (no Ray): AsyncCheckpointSaverHook(save_steps=1000) + "
        "SummarySaverHook(save_steps=100, summary_op=['loss']); each worker advances %d steps per report, "
        "%d reports/s; worker 0's reports carry the summary outputs of the steps it crossed." % (
            STEPS_PER_REPORT, REPORTS_PER_SEC),
        "Core fraction = (workers × %d reports/s) × CPU seconds per report (1.0 = one core saturated); "
        "Ray's own cost per actor call on the chief actor is not included." % REPORTS_PER_SEC,
    ]
    for n, p in sorted(data["profiles"].items()):
        notes.append("cProfile, %d workers, by own time: %s." % (n, "; ".join(
            "%s %.0f%% (%d calls%s)" % (h["where"], 100 * h["share"], h["calls"],
                                        ", mostly from " + h["top_caller"] if h["top_caller"] else "")
            for h in p["hottest"])))
    return BenchResult(NAME, TITLE, headers, rows, targets, notes, data)


if __name__ == "__main__":
    import sys
    result = run(quick="--quick" in sys.argv, tiny="--tiny" in sys.argv)
    print(result.markdown())
    for n, p in sorted(result.data["profiles"].items()):
        print("workers=%d\n%s" % (n, p["text"]))
