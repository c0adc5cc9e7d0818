"""Smoke tests for `benchmarks/bench_storage.py` and `benchmarks/bench_throughput.py`: each runs tiny.

No timing is asserted: the numbers of a tiny run mean nothing. What is checked
is that every method really ran (every repeat, every save committed, every
restore checked its values), that the figures are finite, and that the
results come back in the shape `python -m benchmarks` prints. The Ray
anchors (Ray Train, `rh.launch` on Ray) run in a test of their own, since
starting Ray and a Ray Train run takes most of a minute.
"""

import importlib.util
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:  # `benchmarks` sits beside `rayhooks`, not installed
    sys.path.insert(0, REPO_ROOT)

import pytest  # noqa: E402

from benchmarks import bench_storage, bench_throughput  # noqa: E402
from bench_checks import finite as _finite, positive_finite as _positive_finite  # noqa: E402
from bench_checks import well_formed  # noqa: E402

HAVE_EMULATOR = importlib.util.find_spec("gcp_storage_emulator") is not None


# -- bench_storage ---------------------------------------------------------------------------

@pytest.mark.skipif(not HAVE_EMULATOR, reason="gcp-storage-emulator is not installed")
def test_storage_tiny_runs_every_method(tmp_path):
    result = bench_storage.run(tiny=True, ray=False, tmp_root=str(tmp_path))
    text = well_formed(result, bench_storage.NAME, bench_storage.TITLE, scored=True)
    raw = result.data["raw"]
    cfg = raw["config"]
    assert raw["gcs_error"] is None

    # part 1: every method of every protocol ran once per repeat
    (size, persist), = raw["persist"].items()
    assert persist["nbytes"] == size
    assert set(persist["protocols"]) == {"file", "gs"}
    assert set(persist["protocols"]["file"]) == {"rh_write_data", "pipe", "put", "write_fsync"}
    assert set(persist["protocols"]["gs"]) == {"rh_write_data", "pipe", "put"}
    for times in persist["protocols"].values():
        for secs in times.values():
            assert len(secs) == cfg["persist_repeats"]
            _positive_finite(secs)
    assert len(result.rows) == 7

    # part 2: every save of both hooks reached after_save, and was committed
    assert set(raw["commit"]) == {"sync", "async"}
    for label, res in raw["commit"].items():
        saves = res["saves"]
        assert len(saves) == cfg["commit_saves"], label
        assert [s["step"] for s in saves] == sorted({s["step"] for s in saves})
        assert set(s["step"] for s in saves) <= set(res["committed"]), (label, res["committed"])
        for key in ("snapshot", "persist", "commit_call", "latency"):
            _positive_finite(s[key] for s in saves)
        _finite(s["overhead"] for s in saves)
        assert all(s["latency"] >= s["persist"] for s in saves)  # persist happens between snapshot and after_save
    assert raw["raytrain_commit"] is None  # ray=False

    # part 3: every restore ran (and checked the values it restored) once per repeat
    times = raw["restore"]["times"]
    assert set(times) == {"tf2_local", "rh_tf_file", "rh_tf_file_noverify", "rh_np_file", "rh_np_file_noverify",
                          "rh_tf_gs", "rh_np_gs"}
    for secs in times.values():
        assert len(secs) == cfg["restore_repeats"]
        _positive_finite(secs)

    names = [t.name for t in result.targets]
    assert sum("persist to" in n for n in names) == 2
    assert sum("commit latency" in n for n in names) == 2
    assert sum("restore" in n for n in names) == 2
    for needle in ("MB/s", "Commit latency", "Restore of the latest checkpoint", "TF2 tf.train.Checkpoint.restore"):
        assert needle in text, needle


def test_storage_without_gcs_leaves_gs_rows_out(tmp_path):
    result = bench_storage.run(tiny=True, gcs=False, ray=False, tmp_root=str(tmp_path))
    well_formed(result, bench_storage.NAME, bench_storage.TITLE, scored=True)
    raw = result.data["raw"]
    (persist,) = raw["persist"].values()
    assert set(persist["protocols"]) == {"file"}
    assert not any(k.endswith("_gs") for k in raw["restore"]["times"])
    assert [t.name for t in result.targets if "gs://" in t.name] == []
    assert not os.listdir(str(tmp_path))  # every scratch directory was removed


# -- bench_throughput ---------------------------------------------------------------------------

def _check_pairs(run, pairs, method):
    assert len(run["pairs"]) == pairs, method
    for p in run["pairs"]:
        assert p["p_steps"] > 0 and p["c_steps"] >= 0, (method, p)
        _positive_finite([p["p_secs"], p["c_secs"]])
        if "c_cpu" in p:
            _finite([p["c_cpu"], p["p_cpu"]])


def test_throughput_tiny_runs_every_local_method(tmp_path):
    result = bench_throughput.run(tiny=True, ray=False, tmp_root=str(tmp_path))  # the local part in a worker process
    text = well_formed(result, bench_throughput.NAME, bench_throughput.TITLE, scored=True)
    cfg = result.data["raw"]["config"]
    local = result.data["raw"]["local"]
    assert set(local["runs"]) == set(bench_throughput.LOCAL_METHODS)
    assert local["elements"] > 0 and local["tf_elements"] > 0
    for method, run in local["runs"].items():
        _check_pairs(run, cfg["pairs"], method)
        assert run["saves"] == cfg["pairs"], (method, run["saves"])
        assert run["skipped"] == 0
        assert len(run["stalls"]) == cfg["pairs"]
        _positive_finite(run["stalls"])
    for method in ("rh_async", "rh_sync", "tf1_hook"):
        # the save at session creation, one per checkpoint phase, the one at close
        assert local["runs"][method]["committed"] == cfg["pairs"] + 2, method
    assert local["runs"]["tf1_hook"]["elements"] > 0
    assert local["runs"]["tf2_async"]["committed"] == cfg["pairs"]
    summary = result.data["summary"]
    assert set(summary) == set(bench_throughput.LOCAL_METHODS)
    for s in summary.values():
        _finite([s["pooled"], s["fraction"]["median"]])
    assert len(result.rows) == len(bench_throughput.LOCAL_METHODS)
    (target,) = result.targets
    assert "AsyncCheckpointSaverHook (local)" in target.name
    assert "fraction of no checkpoint" in text


def test_throughput_fractions_pair_adjacent_phases():
    run = {"pairs": [{"c_steps": 90, "c_secs": 1.0, "p_steps": 100, "p_secs": 1.0},
                     {"c_steps": 190, "c_secs": 2.0, "p_steps": 100, "p_secs": 1.0}]}
    per, pooled = bench_throughput.fractions(run)
    assert per == pytest.approx([0.9, 0.95])
    assert pooled == pytest.approx((280 / 3.0) / 100.0)


def test_throughput_alternates_phase_order():
    calls = []

    def phase(kind):
        def fn(secs):
            calls.append(kind)
            return 10, secs
        return fn

    out = bench_throughput.alternate(3, 0.5, phase("C"), phase("P"), lambda: calls.append("settle") or False)
    assert "".join(c[0] for c in calls) == "CsP" + "sPC" + "CsP"
    assert len(out) == 3 and all(p["c_steps"] == 10 and p["p_secs"] == 0.5 for p in out)


# -- the Ray anchors ------------------------------------------------------------------------------

@pytest.mark.timeout(900)
def test_ray_anchors_tiny(tmp_path, ray_session):
    storage = bench_storage.run(tiny=True, gcs=False, ray=True, tmp_root=str(tmp_path / "storage"))
    well_formed(storage, bench_storage.NAME, bench_storage.TITLE, scored=True)
    rt = storage.data["raw"]["raytrain_commit"]
    cfg = storage.data["raw"]["config"]
    assert len(rt["reports"]) == cfg["ray_reports"]
    assert all(r["found"] for r in rt["reports"])  # each report was listed as committed
    _positive_finite(r["persist"] for r in rt["reports"])
    assert all(r["latency"] >= r["persist"] for r in rt["reports"])
    assert rt["final_checkpoint"] and rt["final_checkpoint"].endswith("ckpt-%06d" % (cfg["ray_reports"] - 1))
    assert any("Ray Train" in row[1] for row in storage.extra_tables[0][2])

    tput = bench_throughput.run(tiny=True, ray=True, isolate=False, tmp_root=str(tmp_path / "throughput"))
    well_formed(tput, bench_throughput.NAME, bench_throughput.TITLE, scored=True)
    raw = tput.data["raw"]
    cfg = raw["config"]
    launch = raw["launch"]
    _check_pairs(launch, cfg["pairs"], "launch")
    assert launch["committed"] >= 2  # the save at session creation and the one at its end, at least
    # A timer save that finds the previous one still uploading is skipped (in_flight="skip", TF1's
    # rule); in a tiny run that can happen, but never more than once per checkpoint phase.
    assert 0 <= launch["skipped"] <= cfg["pairs"]
    (mode, rt_run), = raw["raytrain"]["runs"].items()
    assert mode == "ASYNC"
    _check_pairs(rt_run, cfg["pairs"], "raytrain")
    assert rt_run["saves"] == cfg["pairs"] and rt_run["committed"] == cfg["pairs"]
    assert set(tput.data["summary"]) == set(bench_throughput.LOCAL_METHODS) | {"rh_launch_ray",
                                                                                  "raytrain_ASYNC"}
    assert len(tput.targets) == 2
