"""Smoke test for `benchmarks/faults.py`: scenarios 1 (local SIGTERM), 2 (GCS outage) and 6 (GCS server
stopped mid-upload, "back at once" only: its "gave up" run spends about 60 s in gcsfs's retries), one
repeat each.

The faults are real (a SIGTERM to a training subprocess; a gcp-storage-emulator
stopped mid-run, or while a checkpoint's upload is held half-way by a proxy,
and started again). What is checked is that the report's
counts are consistent: every injected fault was survived, no committed
checkpoint was lost, the poller read the latest checkpoint while the run went
on and never saw a torn one, and each fault has one resume time. No timing is
asserted.
"""

import math
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:  # `benchmarks` sits beside `rayhooks`, not installed
    sys.path.insert(0, REPO_ROOT)

import pytest  # noqa: E402

from benchmarks import faults  # noqa: E402


def _consistent(result, key):
    assert result.key == key
    assert result.injected == 1, result.problems
    assert result.survived == result.injected, result.problems
    assert result.lost == 0, result.problems
    assert result.torn == 0, result.problems
    assert result.polls > 0  # the poller really read `latest` while the run went on
    assert len(result.times) == 1 and math.isfinite(result.times[0]) and result.times[0] > 0, result.times
    assert len(result.details) == 1 and result.details[0]["survived"] is True


def test_local_sigterm_scenario_counts(tmp_path):
    result = faults.scenario_local_sigterm(repeats=1, workdir=str(tmp_path))
    _consistent(result, "local-sigterm")
    detail = result.details[0]
    assert detail["recovery_step"] > detail["fault_step"]  # the emergency checkpoint: after the signal
    assert detail["resumed_step"] == detail["recovery_step"] + 1  # resumed from that very checkpoint
    table = faults.summary_table([result])
    assert faults.TITLES["local-sigterm"] in table and "| 1 " in table


@pytest.mark.timeout(300)
def test_gcs_outage_scenario_counts(tmp_path):
    result = faults.scenario_gcs_outage(repeats=1, workdir=str(tmp_path))
    _consistent(result, "gcs-outage")
    detail = result.details[0]
    assert detail["failed_saves"] >= 1  # the outage really failed a save, and training went on
    assert detail["steps_during_outage"] > 0
    assert detail["recovery_step"] > detail["fault_step"]
    report = faults.render([result], 1, 1.0, "python -m benchmarks.faults --repeats 1 --only gcs-outage")
    assert "nproc=" in report and faults.TITLES["gcs-outage"] in report and "## Per repeat" in report


@pytest.mark.timeout(300)
def test_gcs_mid_upload_scenario_counts(tmp_path):
    result = faults.scenario_gcs_mid_upload(repeats=1, gave_up_runs=0, workdir=str(tmp_path))
    _consistent(result, "gcs-mid-upload")
    detail = result.details[0]
    assert detail["variant"] == "back at once"
    assert detail["fault_step"] is not None and detail["held_committed"] is True  # the held upload completed
    assert detail["recovery_step"] == detail["fault_step"]  # the first commit after the stop is that upload
    assert detail["committed_before_stop"] >= 2  # checked again at the end: none of them lost
    assert detail["failed_saves"] == 0
    assert detail["full_verifies"] >= 2  # the poller checksummed the latest checkpoints it saw
    table = faults.summary_table([result])
    assert faults.TITLES["gcs-mid-upload"] in table and "held upload committed 1/1" in table
