"""Smoke tests for `benchmarks/bench_ray.py` and `benchmarks/bench_chief.py`: each runs tiny and returns sane numbers.

No timing is asserted: the numbers of a tiny run mean nothing. What is checked
is that every configuration really ran (every worker, every repeat, the
session's end hooks on Ray and locally, timer-driven saves, every simulated
report), and that the figures are finite positive numbers in the shape
`python -m benchmarks` prints.
"""

import math
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:  # `benchmarks` sits beside `rayhooks`, not installed
    sys.path.insert(0, REPO_ROOT)

from benchmarks import bench_chief, bench_ray  # noqa: E402
from bench_checks import finite as _finite, positive_finite as _positive_finite  # noqa: E402
from bench_checks import well_formed  # noqa: E402


def test_bench_chief_tiny_feeds_every_report():
    result = bench_chief.run(tiny=True)
    text = well_formed(result, bench_chief.NAME, bench_chief.TITLE)
    cfg = result.data["config"]
    assert set(result.data["workers"]) == set(cfg["workers"])
    assert len(result.rows) == len(cfg["workers"])
    for n, d in result.data["workers"].items():
        assert len(d["wall_per_report"]) == len(d["cpu_per_report"]) == cfg["repeats"]
        _positive_finite(d["wall_per_report"])
        assert all(c >= 0 and math.isfinite(c) for c in d["cpu_per_report"])
        # warm-up (two rounds) + whole rounds per repeat, every worker equally often
        assert d["block"] % n == 0 and d["reports"] == 2 * n + cfg["repeats"] * d["block"]
        rounds = d["reports"] // n
        assert d["progress_max"] == rounds * bench_chief.STEPS_PER_REPORT == d["last_step"]
        s = result.data["stats"][n]
        _positive_finite([s["reports_per_sec"]["median"], s["wall_fraction"], s["wall_us"]["median"]])
        assert s["required_per_sec"] == n * bench_chief.REPORTS_PER_SEC
    assert "µs/report" in text


def test_bench_chief_profile_names_a_hot_spot(tmp_path):
    text, hottest = bench_chief.profile(4, 3, str(tmp_path))
    assert "function calls" in text
    assert hottest and all(0 <= h["share"] <= 1 and h["calls"] > 0 and h["where"] for h in hottest)


def test_bench_ray_tiny_runs_every_backend_and_worker_count(ray_session):
    result = bench_ray.run(tiny=True)
    text = well_formed(result, bench_ray.NAME, bench_ray.TITLE)
    cfg = result.data["config"]
    runs = result.data["overhead"]
    assert [(d["backend"], d["workers"]) for d in runs] == [
        (b, n) for b in cfg["backends"] for n in cfg["workers"]]
    for d in runs:
        expected = (1 + cfg["repeats"]) * 2 * cfg["steps"]
        # the session ended by leaving the with-block: end hooks ran, worker 0's final save committed
        assert d["steps_per_worker"] == expected and d["checkpoints"][-1] == expected
        for kind in ("bare", "run", "loop", "bare_cpu", "run_cpu", "loop_cpu"):
            assert len(d[kind]) == cfg["repeats"] * d["workers"], kind
        for kind in ("bare", "run", "loop"):
            _positive_finite(d[kind])
        for kind in ("run_overhead", "loop_overhead", "run_overhead_cpu", "loop_overhead_cpu"):
            _finite(d[kind])
        assert d["launch_wall_s"] > 0
    assert len(result.rows) == len(runs)
    assert len(result.targets) == len(cfg["workers"])  # one per Ray worker count

    late = result.data["lateness"]
    assert late["workers"] == 2 and late["last_step"] > 0
    assert late["announcements"] and late["announcements"][0][0] == 0  # the first save, at the start
    steady = [s for s in late["saves"] if not s["startup"]]
    assert steady, "no timer-driven save after start-up in %.1f s with save_secs=%s: %r" % (
        cfg["late_secs"], cfg["save_secs"], late["announcements"])
    for s in late["saves"]:
        assert 0 < s["step"] < late["last_step"]
        assert isinstance(s["late_steps"], int) and isinstance(s["margin_steps"], int)
        _finite([s["detect_secs"]] + ([s["late_secs"]] if s["late_secs"] is not None else []))
    _positive_finite([late["steps_per_sec"], late["median_step_secs"]])
    assert late["stats"]["late_steps"]["n"] == len(steady)
    assert result.extra_tables and "lateness, steps" in text
