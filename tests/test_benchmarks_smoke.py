"""Smoke tests for `benchmarks/`: each benchmark runs in a tiny configuration and returns sane numbers.

No timing is asserted: the numbers of a tiny run mean nothing. What is checked
is that every loop and every save really ran (step counts, committed
checkpoints), that every figure is a finite positive number, and that the
command line writes a results file naming the machine and every target.
Tiny mode skips the Ray Train anchors of both figures; they run in a test of
their own, under one Ray started by that test, since starting Ray and a Ray
Train run takes most of half a minute.
"""

import math
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:  # `benchmarks` sits beside `rayhooks`, not installed
    sys.path.insert(0, REPO_ROOT)

import pytest  # noqa: E402

from benchmarks import BENCHMARKS, bench_checkpoint_stall, bench_step_overhead, common  # noqa: E402
from benchmarks.__main__ import main  # noqa: E402
from bench_checks import positive_finite as _positive_finite, well_formed  # noqa: E402


# -- common -------------------------------------------------------------------------------

def test_stat_is_median_min_max_over_repeats():
    s = common.Stat.of([5.0, 1.0, 3.0, 2.0])
    assert (s.median, s.min, s.max, s.n) == (2.5, 1.0, 5.0, 4)
    assert s.scaled(1e3).median == 2500.0
    assert s.format(1, "ms") == "2.5 [1.0–5.0] ms"
    with pytest.raises(ValueError):
        common.Stat.of([])


def test_paired_ratios_and_table():
    assert common.paired_ratios([2.0, 9.0], [1.0, 3.0]) == [2.0, 3.0]
    with pytest.raises(ValueError):
        common.paired_ratios([1.0], [1.0, 2.0])
    table = common.markdown_table(["a", "bb"], [["1", "2"], ["333", "4"]])
    lines = table.splitlines()
    assert len(lines) == 4 and all(line.startswith("|") for line in lines)
    assert len({len(line) for line in lines}) == 1  # padded columns
    with pytest.raises(ValueError):
        common.markdown_table(["a"], [["1", "2"]])


def test_a_cost_measured_below_zero_scores_inside_its_whisker():
    """An overhead is a difference of two times: on a noisy machine its median can be negative, and
    the plot must still draw it (log scale), at the foot of its min–max bar."""
    values = (-14.5, -6.9, 0.7)
    target = common.Target("overhead", "-6.9 µs", True, common.cost_score(-6.9, 2.0),
                           common.score_range(values, 2.0))
    assert target.score == 1e-3 and target.score_range == (1e-3, 0.35)
    best, worst = target.score_range
    assert 0 < best <= target.score <= worst


def test_interleaved_pairs_subjects_with_anchor():
    calls = []

    def timed(name, per_step):
        def fn(n):
            calls.append(name)
            return per_step * n
        return fn

    a, s, d = common.interleaved(timed("a", 1.0), {"x": timed("x", 3.0), "y": timed("y", 4.5)},
                                 n=10, repeats=3, warmup=1)
    assert a == [1.0] * 3 and s == {"x": [3.0] * 3, "y": [4.5] * 3} and d == {"x": [2.0] * 3, "y": [3.5] * 3}
    # warm-up, then every repeat runs all three, the order reversed every other repeat
    assert "".join(calls) == "axy" + "axy" + "yxa" + "axy"


def test_rss_and_machine_facts():
    rss, peak = common.current_rss(), common.peak_rss()
    assert rss is not None and peak >= rss > 0
    info = common.machine_info()
    assert info["nproc"] >= 1 and info["cpu"] and info["date"]
    text = "\n".join(common.format_machine(info))
    assert "nproc=" in text and "CPU:" in text and "RAM:" in text


# -- the benchmarks, tiny -----------------------------------------------------------------

def test_step_overhead_tiny_runs_every_loop():
    result = bench_step_overhead.run(tiny=True)
    cfg = result.data["config"]
    # warm-up + repeats, for the run()-only and the should_stop() loops
    assert result.data["rayhooks_steps_run"] == 2 * (1 + cfg["repeats"]) * cfg["rh_steps"]
    # the bare TF1 session ran its loop on its own copy of the global step
    assert result.data["tf1_steps_run"] == (1 + cfg["repeats"]) * cfg["tf_steps"]
    for side in ("rayhooks", "tf1"):
        for kind in ("bare", "run", "loop"):
            _positive_finite(result.data[side][kind])
            assert len(result.data[side][kind]) >= cfg["repeats"]
    _positive_finite(result.data["rayhooks"]["defaults"])  # the loop with MonitoredTrainingSession's defaults
    assert len(result.rows) == 7 and all(len(r) == len(result.headers) for r in result.rows)
    assert [isinstance(t.met, bool) for t in result.targets] == [True, True, True]
    assert all(t.score_range is not None for t in result.targets)  # the plot's min–max whiskers
    well_formed(result, bench_step_overhead.NAME, bench_step_overhead.TITLE, scored=True)
    assert "µs/step" in result.markdown()
    assert result.data["raytrain"] is None  # tiny: the Ray Train anchor is skipped, and says so
    assert any("Ray Train anchor not run" in n for n in result.notes)


def test_checkpoint_stall_tiny_runs_every_method():
    result = bench_checkpoint_stall.run(tiny=True, isolate=False, memory=False)
    (size, per), = result.data["sizes"].items()
    methods = per["raw"]["methods"]
    assert set(methods) == set(bench_checkpoint_stall.METHODS)
    for name, r in methods.items():
        if "unavailable" in r:
            assert name == "tf2_write_async"
            continue
        _positive_finite(r["anchors"])
        assert len(r["stalls"]) == 1 and r["stalls"][0] >= 0 and math.isfinite(r["stalls"][0])
        assert r["first"] > 0
        if "expected_commits" in r:
            assert len(r["committed"]) == r["expected_commits"], (name, r["committed"])
        if name.startswith("rh_"):
            _positive_finite(r["snapshots"])
    assert len(result.rows) == len(bench_checkpoint_stall.METHODS)
    assert result.data["raytrain"] is None  # tiny: the Ray Train anchors are skipped, and say so
    assert any("Ray Train anchors not run" in n for n in result.notes)
    kinds = [t.name for t in result.targets]
    assert any("within 1.2x of the numpy copy" in k for k in kinds)
    assert any("below TF1's blocking hook" in k for k in kinds)
    assert all(t.score_range is not None for t in result.targets)  # the plot's min–max whiskers
    well_formed(result, bench_checkpoint_stall.NAME, bench_checkpoint_stall.TITLE, scored=True)


def test_checkpoint_stall_runs_2gb_in_full_mode_where_memory_allows_and_says_when_not(monkeypatch):
    stall, gb = bench_checkpoint_stall, bench_checkpoint_stall.LARGE
    monkeypatch.setattr(stall, "_available_memory", lambda: gb * stall.LARGE_MEMORY_FACTOR)
    assert stall._large_state_skipped(quick=False) is None
    assert "full mode" in stall._large_state_skipped(quick=True)
    monkeypatch.setattr(stall, "_available_memory", lambda: gb * stall.LARGE_MEMORY_FACTOR - 1)
    assert "skipped" in stall._large_state_skipped(quick=False)
    monkeypatch.setattr(stall, "_available_memory", lambda: 2 * gb)
    assert stall._large_state_skipped(quick=False) == (
        "the 2048 MB state was skipped: it needs %d MB of available memory, this machine has 4096 MB"
        % (2048 * stall.LARGE_MEMORY_FACTOR))
    monkeypatch.setattr(stall, "_available_memory", lambda: None)
    assert "unknown" in stall._large_state_skipped(quick=False)

    for large in (True, False):
        sizes = [size for size, _, _ in stall._config(False, False, large)[0]]
        ray_sizes = [size for size, _ in stall._ray_config(False, False, large)]
        assert (gb in sizes, gb in ray_sizes) == (large, large)


def test_checkpoint_stall_decides_on_the_2gb_state_once_and_says_why_it_was_skipped(monkeypatch):
    stall = bench_checkpoint_stall
    answers = iter(["the 2048 MB state was skipped: it needs more", None, None])  # memory freed while it ran
    monkeypatch.setattr(stall, "_large_state_skipped", lambda quick: next(answers))
    measured = []
    monkeypatch.setattr(stall, "measure", lambda size, *args: measured.append(size) or {"nbytes": size, "methods": {}})
    monkeypatch.setattr(stall, "_report", lambda results, mem, sizes, raytrain, large_skipped: (sizes, large_skipped))
    sizes, why = stall.run(quick=False, isolate=False, memory=False, ray=False)
    assert stall.LARGE not in measured and stall.LARGE not in [size for size, _, _ in sizes]
    assert why == "the 2048 MB state was skipped: it needs more"


def test_main_tiny_prints_and_writes_results(tmp_path, capsys):
    out = tmp_path / "results.md"
    assert main(["--tiny", "--only", "step_overhead", "--only", "checkpoint_stall", "--out", str(out)]) == 0
    text = out.read_text()
    for needle in ("nproc=", "CPU:", "RAM:", "Date:", bench_step_overhead.TITLE, bench_checkpoint_stall.TITLE,
                   "Peak RSS", "peak - before"):
        assert needle in text, needle
    target_lines = [line for line in text.splitlines() if line.startswith(("- MET", "- MISSED"))]
    # 3 step-overhead targets, 2 per async saver, 1 memory target; listed at the top and per figure
    assert len(target_lines) == 2 * (3 + 2 * 2 + 1)
    printed = capsys.readouterr().out
    assert "Results written to %s" % out in printed
    assert "| loop" in printed and "| state" in printed
    assert (tmp_path / "results.png").stat().st_size > 0


@pytest.fixture
def tiny_ray(ray_session):
    """The session's Ray, whose Ray Train controller polls every 0.2 s (set by `ray_session`).

    The poll interval (2 s by default) only paces how soon reports are taken; each figure reads it back.
    """
    return ray_session


def test_ray_train_anchors_tiny(tiny_ray):
    """Both figures' Ray Train anchors, tiny, under the test's Ray: every report and every save ran."""
    # Figure 1: ray.train.report() every step, beside its bare loop
    result = bench_step_overhead.run(tiny=True, ray=True)
    cfg, rt = result.data["config"], result.data["raytrain"]
    assert "error" not in rt, rt
    loops = cfg["rt_warmup"] + cfg["rt_repeats"]
    assert rt["steps_run"] == 2 * loops * cfg["rt_steps"]  # the bare loop and the reporting loop
    assert rt["reports"] == loops * cfg["rt_steps"] + cfg["rt_repeats"]  # + the lone report() calls
    for kind in ("bare", "report", "call"):
        assert len(rt[kind]) == cfg["rt_repeats"]
        _positive_finite(rt[kind])
    assert not rt["ray_started_here"] and rt["poll_secs"] == 0.2
    assert len(result.rows) == 10 and all(len(r) == len(result.headers) for r in result.rows)
    assert bench_step_overhead.RT_REPORT_LABEL in result.markdown()
    assert any("Ray Train anchor (no target)" in n for n in result.notes)
    assert len(result.targets) == 3  # the anchor adds no target

    # Figure 2: write the .npy directory + report(checkpoint), SYNC and ASYNC upload
    local = ("numpy_copy", "rh_async_numpy", "rh_sync_numpy")
    result = bench_checkpoint_stall.run(tiny=True, ray=True, isolate=False, memory=False, methods=local)
    (size, per), = result.data["sizes"].items()
    methods = per["raw"]["methods"]
    assert set(methods) == set(local) | set(bench_checkpoint_stall.RAYTRAIN_METHODS)
    (_, warm), = bench_checkpoint_stall._ray_config(False, True)
    for name in bench_checkpoint_stall.RAYTRAIN_METHODS:
        r = methods[name]
        assert "unavailable" not in r, r
        assert len(r["stalls"]) == len(r["writes"]) == len(r["reports"]) == len(r["anchors"]) == warm
        _positive_finite(r["stalls"] + r["writes"] + r["reports"] + r["anchors"] + [r["first"]])
        assert all(abs(s - w - p) < 1e-9 for s, w, p in zip(r["stalls"], r["writes"], r["reports"]))
        assert len(r["committed"]) == r["expected_commits"] == warm + 1, (name, r["committed"])
        assert per["x_copy"][name] > 0
    assert not result.data["raytrain"]["ray_started_here"]
    assert len(result.rows) == len(local) + 2 and all(len(r) == len(result.headers) for r in result.rows)
    text = result.markdown()
    for name in bench_checkpoint_stall.RAYTRAIN_METHODS:
        assert bench_checkpoint_stall.LABELS[name] in text
    assert sum("Ray Train SYNC" in n or "Ray Train ASYNC" in n for n in result.notes) == 2


def test_main_only_runs_one_benchmark(tmp_path):
    out = tmp_path / "only.md"
    assert BENCHMARKS[0] == "step_overhead"
    assert main(["--tiny", "--only", "step_overhead", "--out", str(out)]) == 0
    text = out.read_text()
    assert bench_step_overhead.TITLE in text and bench_checkpoint_stall.TITLE not in text


# -- found by the benchmarks ---------------------------------------------------------------

def test_trackable_snapshot_reads_each_variable_once(monkeypatch):
    """A snapshot reads every CPU variable once, in place (snapshot_plan.py: "a plain variable is read in place").

    Fails while `TrackableSaver.snapshot` tests `hasattr(value, "tensor")` on TF's SaveSpec:
    `tensor` is a property, so hasattr runs TF's whole read closure (is_initialized,
    disable_copy_on_read, read_variable_op, two identities) and throws the tensor away
    before the in-place read. On a 64 MB state of 8 variables that makes the async
    stall 2.29x the np.copyto floor instead of 1.66x.
    """
    import numpy as np
    import tensorflow as tf
    from tensorflow.python.ops import gen_resource_variable_ops

    import rayhooks as rh

    variables = {"v%d" % i: tf.Variable(np.full(16, float(i), np.float32)) for i in range(4)}
    saver = rh.TrackableSaver(tf.train.Checkpoint(**variables))
    saver.snapshot().done()  # first save: pools, tracing

    reads = []
    real_read = gen_resource_variable_ops.read_variable_op

    def counting_read(*args, **kwargs):
        reads.append(1)
        return real_read(*args, **kwargs)

    monkeypatch.setattr(gen_resource_variable_ops, "read_variable_op", counting_read)
    snapshot = saver.snapshot()
    n_reads = len(reads)
    snapshot_keys = set(snapshot.tensors)
    try:
        for i in range(4):
            key = "v%d/.ATTRIBUTES/VARIABLE_VALUE" % i
            assert np.array_equal(snapshot.tensors[key], np.full(16, float(i), np.float32))
    finally:
        snapshot.done()
    # One read per variable, plus tf.train.Checkpoint's own save_counter (counted like Checkpoint.save).
    assert "save_counter/.ATTRIBUTES/VARIABLE_VALUE" in snapshot_keys
    assert n_reads == len(variables) + 1, "%d variable reads for %d variables" % (n_reads, len(variables) + 1)
