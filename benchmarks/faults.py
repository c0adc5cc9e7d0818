"""Fault-injection report: ``python -m benchmarks.faults [--repeats N] [--out benchmarks/faults.md]``.

Injects real faults, repeatedly, and reports per scenario how many were
survived, whether any committed checkpoint was lost, whether a reader ever saw
a torn "latest", and how long training took to resume after each fault.

Scenarios (the mechanics of tests/test_faults_local.py and tests/test_recovery.py):

1. ``local-sigterm``: SIGTERM to a training process (`MonitoredTrainingSession`
   with `CheckpointSaverHook` in a subprocess): it saves an emergency checkpoint
   at the next step boundary and exits; a new process resumes from it.
2. ``gcs-outage``: the GCS server (gcp-storage-emulator with a data dir) is
   stopped in the middle of a run with `AsyncCheckpointSaverHook(...,
   on_write_error="retry_next_save")`, and started again once a save has failed.
3. ``ray-worker-kill``: `ray.kill` of worker 1's actor from a chief listener,
   `launch(max_failures=1)`: the worker group restarts from the latest commit.
4. ``ray-chief-crash``: `os._exit(1)` in a chief listener's `after_save`: Ray
   restarts the chief, which rebuilds itself from storage.
5. ``ray-worker-sigterm``: SIGTERM to worker 1's process (a preemption): an
   emergency checkpoint on every worker's common step, then a new worker group.
6. ``gcs-mid-upload``: the GCS server is stopped while a 32 MB checkpoint is
   provably half uploaded (a loopback proxy, tests/tcp_proxy.py's
   `HoldingProxy`, holds gcsfs's bytes once 8 MB of the data file went up),
   then started again either at once (gcsfs's retries finish the upload, which commits)
   or only once the upload gave up (`on_write_error="retry_next_save"`: the
   next save commits). Every repeat is "back at once"; one more run, after
   them, is "gave up" (gcsfs spends about 60 s in its own retries first).

What each column counts:

* faults injected: one per repeat (``gcs-mid-upload``: one per repeat, plus
  its one "gave up" run).
* faults survived: the run finished at its last step with the right values
  (every step adds 1 to every element of ``w``, so the state after step S is
  S) and the fault took effect (a recovery, a failed save, a restarted chief,
  a held upload committed or given up).
* checkpoints lost: committed checkpoints (every step named by an
  ``after_save``, by the run's result, seen by the poller, or listed at the
  end; retention is off, ``max_to_keep=None``, so every one must still be
  there) that at the end fail `CheckpointStore.verify` or whose ``w`` is not
  their step.
* torn latests: a poller thread in this process reads, every few ms while the
  run goes on, what `tf.train.latest_checkpoint` reads (the ``checkpoint``
  state file, parsed with `rayhooks.formats.state_file.parse_state`, its
  ``model_checkpoint_path``) and `CheckpointStore.latest()`, and counts any
  named checkpoint whose manifest is missing or whose files do not verify (and
  any state file that does not parse). Reads that fail because the server is
  down are counted apart ("unavailable"), never as torn.
* fault -> resumed: defined per scenario in ``RESUMED`` below and in the
  report. Every timestamp is `time.time()` on this machine (Ray runs locally:
  the chief and the workers are processes on this node).
"""

import argparse
import dataclasses
import datetime
import importlib.util
import json
import logging
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import traceback
import uuid
from typing import Dict, List, Optional

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

import rayhooks as rh  # noqa: E402
from rayhooks.checkpoints import MANIFEST_SUFFIX, STATE_FILE, CheckpointInfo  # noqa: E402
from rayhooks.formats import state_file  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO_ROOT, "benchmarks", "faults.md")

SCENARIOS = ("local-sigterm", "gcs-outage", "ray-worker-kill", "ray-chief-crash", "ray-worker-sigterm",
             "gcs-mid-upload")

TITLES = {
    "local-sigterm": "1. SIGTERM to a local training process",
    "gcs-outage": "2. GCS server stopped mid-run, restarted",
    "ray-worker-kill": "3. Ray worker actor killed (max_failures=1)",
    "ray-chief-crash": "4. Ray chief actor crashes (os._exit)",
    "ray-worker-sigterm": "5. Ray worker SIGTERM (preemption)",
    "gcs-mid-upload": "6. GCS server stopped mid-upload, restarted",
}

RESUMED = {
    "local-sigterm": "signal -> first step of the resumed process: from `time.time()` just before "
                     "`proc.send_signal(SIGTERM)` to the new process's `time.time()` after its first "
                     "`sess.run` (the step after the emergency checkpoint it restored). Includes the "
                     "emergency save, the old process's exit, a fresh `python` with `import rayhooks`, and "
                     "the restore; the new process is started as soon as the old one has exited.",
    "gcs-outage": "server back -> next committed checkpoint: from the emulator answering again (its "
                  "restart returned, after the first failed save was counted) to the first `after_save` "
                  "after that (the async hook calls `after_save` at the first step boundary after the "
                  "commit, at most one 10 ms step late). gcsfs's own backoff between retries (1, 2, 4, "
                  "8, 16 s) sets most of it.",
    "ray-worker-kill": "kill -> first step of the restarted group: from the chief listener's `time.time()` "
                       "just before `ray.kill(worker 1)` (in `after_save`) to the `time.time()` that worker "
                       "0 of the new group records after its first step (the latest committed step + 1).",
    "ray-chief-crash": "crash -> next committed checkpoint after the restart: from the listener's "
                       "`time.time()` just before `os._exit(1)` (in `after_save`) to the `time.time()` at "
                       "the restarted chief's next `after_save`, which runs right after the commit. The "
                       "workers keep training meanwhile.",
    "ray-worker-sigterm": "SIGTERM -> first step of the resumed group: from the chief listener's "
                          "`time.time()` just before `os.kill(worker 1's pid, SIGTERM)` to the `time.time()` "
                          "that worker 0 of the new group records after its first step (the emergency "
                          "checkpoint's step + 1).",
    "gcs-mid-upload": "server stop -> next committed checkpoint: from `time.time()` just before the emulator "
                      "is stopped (the held upload is provably in progress) to the first `after_save` after "
                      "that (at most one step late). Back at once, that commit is the held checkpoint itself, "
                      "its upload finished by gcsfs's retries once the server answers again (the restart itself takes "
                      "well under 1 s; gcsfs's backoff before it retries, and the rest of the upload, the "
                      "rest). The summary's column is those repeats; the \"gave up\" run's time, in Other and "
                      "per repeat, runs to the first save committed after the restart and is mostly gcsfs's "
                      "own retries of the held upload (about 60 s) before it fails.",
}


SETUP = {
    "local-sigterm": "- 1: `MonitoredTrainingSession` with `CheckpointSaverHook(save_steps=25, max_to_keep=None)` in a "
                     "subprocess, 2 ms steps (a sleep), SIGTERM once it printed step 60 (the hook saves at the "
                     "next step boundary and stops); a new process restores and trains to step 150.",
    "gcs-outage": "- 2: `AsyncCheckpointSaverHook(save_steps=25, on_write_error=\"retry_next_save\", "
                  "retry=RetryPolicy(max_attempts=1), max_to_keep=None)` to gs:// on gcp-storage-emulator "
                  "(with a data dir, so objects survive its restart), 512 KB state, 10 ms steps (a sleep) in "
                  "this process. The server is stopped after the commit of step 50 and started again on the "
                  "same port once the hook counted a failed save (gcsfs gives up after its own 6 tries, about "
                  "30 s; training goes on meanwhile); the run ends 100 steps after the first commit that "
                  "follows the restart. The poller's reads also go through gcsfs's retries, so during the "
                  "outage it is held in them for most of it (a read that fails counts as unavailable): it "
                  "polls before and after the outage, hence its few polls.",
    "ray-worker-kill": "- 3: `rh.launch(train_fn, 2, backend=\"ray\", max_failures=1, tf_config=False)`, "
                       "`CheckpointSaverHook(save_steps=20)`, 5 ms busy steps, last step 200; a chief listener "
                       "calls `ray.kill` on worker 1's actor at `after_save(20)`.",
    "ray-chief-crash": "- 4: `rh.launch(train_fn, 2, backend=\"ray\", tf_config=False)`, "
                       "`AsyncCheckpointSaverHook(save_steps=20, in_flight=\"wait\")`, 5 ms busy steps, last "
                       "step 160; a chief listener calls `os._exit(1)` in `after_save(40)`; Ray restarts the chief.",
    "ray-worker-sigterm": "- 5: `rh.launch(train_fn, 2, backend=\"ray\", max_failures=1, tf_config=False)`, "
                          "`CheckpointSaverHook(save_steps=50)`, 5 ms busy steps, last step 200; a chief listener "
                          "sends SIGTERM to worker 1's process at `after_save(50)`.",
    "gcs-mid-upload": "- 6: `AsyncCheckpointSaverHook(save_steps=20, on_write_error=\"retry_next_save\", "
                      "retry=RetryPolicy(max_attempts=1), max_to_keep=None)` (in_flight=\"skip\", TF1's: "
                      "training never waits for storage) to gs:// on gcp-storage-emulator (with a data dir) "
                      "through tests/tcp_proxy.py's `HoldingProxy`, a 32 MB state (the data file goes up in "
                      "a resumable upload in 32 MB parts), 10 ms steps (a sleep) in this process. The "
                      "first save after 2 commits arms the proxy in its `before_save`; once 8 MB more went up "
                      "(of that save's data file: it is written first) the proxy holds gcsfs's bytes, the "
                      "server is stopped, the proxy released (the held bytes go on to no server), and the "
                      "server started again on the same port: at "
                      "once (every repeat), or once the upload has failed (one more run). The run ends 2 "
                      "commits after the stop. The poller reads the server directly, not through the proxy "
                      "(its reads are never held); it verifies each distinct checkpoint it sees named as latest "
                      "in full (crc32c of every file, 0.2 s for 32 MB) once, and on later polls that its files "
                      "are still listed with their sizes. In the \"gave up\" run its reads wait in gcsfs's "
                      "retries while the server is gone (a read that fails counts as unavailable), hence its "
                      "few polls there. Faults injected: one per repeat, plus the \"gave up\" run.",
}

RAY_NOTE = ("Ray scenarios share one `ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)`; each "
            "worker reserves 1 CPU; retention is off (`max_to_keep=None`) in every scenario.")

# -- results ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class ScenarioResult:
    """The outcome of every repeat of one scenario."""

    key: str
    injected: int = 0
    survived: int = 0
    lost: int = 0
    torn: int = 0
    polls: int = 0
    unavailable: int = 0
    times: List[float] = dataclasses.field(default_factory=list)   # fault -> resumed, seconds
    details: List[dict] = dataclasses.field(default_factory=list)  # one per repeat
    problems: List[str] = dataclasses.field(default_factory=list)  # why a repeat did not survive, torn, lost
    extra: Dict[str, object] = dataclasses.field(default_factory=dict)

    @property
    def title(self):
        return TITLES[self.key]

    def add(self, detail: dict, survived: bool, lost: List[str], poller: "LatestPoller",
            resumed_secs: Optional[float], why: List[str] = ()):
        self.injected += 1
        self.survived += int(survived)
        self.lost += len(lost)
        self.torn += len(poller.torn)
        self.polls += poller.polls
        self.unavailable += poller.unavailable
        if resumed_secs is not None:
            self.times.append(resumed_secs)
        detail = dict(detail, survived=survived, lost=len(lost), torn=len(poller.torn), polls=poller.polls,
                      resumed_secs=resumed_secs)
        self.details.append(detail)
        rep = len(self.details)
        self.problems += ["repeat %d: %s" % (rep, w) for w in why]
        self.problems += ["repeat %d: lost %s" % (rep, w) for w in lost]
        self.problems += ["repeat %d: torn latest: %s" % (rep, w) for w in poller.torn[:5]]

    def failed(self, error: str, poller: Optional["LatestPoller"] = None):
        """A repeat that raised: injected, not survived."""
        self.injected += 1
        if poller is not None:
            self.torn += len(poller.torn)
            self.polls += poller.polls
            self.unavailable += poller.unavailable
        self.details.append({"error": error.strip().splitlines()[-1][:200], "survived": False})
        self.problems.append("repeat %d raised: %s" % (len(self.details), error.strip()[-2000:]))


def _stat(values):
    if not values:
        return "n/a"
    return "%.2f [%.2f–%.2f]" % (statistics.median(values), min(values), max(values))


# -- the poller: what a reader of `latest` sees while the run goes on ----------------------------------------

class LatestPoller(threading.Thread):
    """Reads the latest checkpoint the way `tf.train.latest_checkpoint` and `CheckpointStore.latest()` do.

    Every `interval` seconds: the `checkpoint` state file -> model_checkpoint_path -> its manifest
    must exist and its files verify; and `store.latest()` must verify. Anything else is a torn latest.
    """

    def __init__(self, url, storage_options=None, interval=0.01):
        super().__init__(name="latest-poller", daemon=True)
        # One attempt per read: a server that is down is counted as unavailable, not waited out.
        self.storage = rh.Storage(url, storage_options, retry=rh.RetryPolicy(max_attempts=1))
        self.store = rh.CheckpointStore(self.storage)
        self.interval = interval
        self.polls = 0
        self.unavailable = 0
        self.torn: List[str] = []
        self.seen_steps = set()
        self._stop_event = threading.Event()

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def stop(self):
        self._stop_event.set()
        self.join(120)

    def run(self):
        while not self._stop_event.is_set():
            self.poll_once()
            self._stop_event.wait(self.interval)

    def poll_once(self):
        self.polls += 1
        try:
            self._check_state_file()
            latest = self.store.latest()
            if latest is not None:
                self.seen_steps.add(latest.step)
                problems = self.store.verify(latest)
                if problems:
                    self.torn.append("store.latest() = step %d does not verify: %s"
                                     % (latest.step, "; ".join(problems)))
        except FileNotFoundError as e:  # a file of the latest checkpoint vanished under the reader
            self.torn.append("a file of the latest checkpoint is missing: %s" % e)
        except OSError:
            self.unavailable += 1  # the server is down (scenario 2): not a torn read

    def _check_state_file(self):
        try:
            text = self.storage.read_bytes(STATE_FILE).decode()
        except FileNotFoundError:
            return  # nothing committed yet
        try:
            state = state_file.parse_state(text, self.storage.url_of(STATE_FILE))
        except ValueError as e:
            self.torn.append("the state file does not parse: %s" % e)
            return
        prefix = state.model_checkpoint_path.rstrip("/").rsplit("/", 1)[-1]
        try:
            manifest = json.loads(self.storage.read_bytes(prefix + MANIFEST_SUFFIX))
        except FileNotFoundError:
            self.torn.append("the state file names %s, which has no manifest" % prefix)
            return
        except ValueError as e:
            self.torn.append("the state file names %s, whose manifest does not parse: %s" % (prefix, e))
            return
        info = CheckpointInfo(int(manifest["step"]), manifest["prefix"], self.storage.url_of(manifest["prefix"]),
                              dict(manifest["files"]), float(manifest["timestamp"]))
        if info.prefix != prefix:
            self.torn.append("the state file names %s, whose manifest says %s" % (prefix, info.prefix))
        self.seen_steps.add(info.step)
        problems = self.store.verify(info)
        if problems:
            self.torn.append("the state file names %s, which does not verify: %s" % (prefix, "; ".join(problems)))


def check_committed(store, steps, expected=lambda step: float(step)) -> List[str]:
    """Every step ever committed must still be there, verify, and hold w == expected(step)."""
    final = {i.step: i for i in store.committed()}
    lost = []
    for step in sorted(set(steps) | set(final)):
        info = final.get(step)
        if info is None:
            lost.append("step %d was committed and is gone" % step)
            continue
        problems = store.verify(info)
        if problems:
            lost.append("step %d does not verify: %s" % (step, "; ".join(problems)))
            continue
        w = store.reader(info).read_tensors()["w"]
        if not np.all(w == expected(step)):
            lost.append("step %d holds w=%r, expected %r" % (step, float(w.flat[0]), expected(step)))
    return lost


# -- 1. SIGTERM to a local training process ---------------------------------------------------------------

TRAINER = textwrap.dedent("""
    import sys, time, numpy as np, rayhooks as rh
    ckpt_dir, last, step_secs, save_steps = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
    state = {"w": np.zeros(4, np.float32)}

    class Committed(rh.CheckpointSaverListener):
        def after_save(self, session, step):
            print("committed %d %.6f" % (step, time.time()), flush=True)

    def step():
        state["w"] += 1
        time.sleep(step_secs)  # the step's compute
        return {}

    try:
        with rh.MonitoredTrainingSession(
                checkpoint_dir=ckpt_dir, save_checkpoint_secs=None, save_summaries_steps=None,
                log_step_count_steps=None,
                chief_only_hooks=[rh.CheckpointSaverHook(ckpt_dir, save_steps=save_steps, max_to_keep=None,
                                                         listeners=[Committed()])],
                hooks=[rh.StopAtStepHook(last_step=last)], state=state) as sess:
            print("started %d %.6f" % (sess.global_step, time.time()), flush=True)
            while not sess.should_stop():
                sess.run(step)
                print("step %d %.6f" % (sess.global_step, time.time()), flush=True)
    finally:  # also as rh.Preempted ends a signalled run
        print("stopped %d %.1f %.6f" % (sess.global_step, float(state["w"][0]), time.time()), flush=True)
""")


def _read_until(proc, prefix, lines, limit=100_000):
    """Reads the trainer's stdout up to a line starting with `prefix`; keeps every line read."""
    for _ in range(limit):
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError("trainer exited (rc %s) before printing %r" % (proc.poll(), prefix))
        lines.append(line)
        if line.startswith(prefix):
            return line.split()
    raise RuntimeError("no %r in %d lines" % (prefix, limit))


def _parse_lines(lines, kind):
    return [(int(p[1]), float(p[-1])) for p in (line.split() for line in lines) if p and p[0] == kind]


def _trainer_env():
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def scenario_local_sigterm(repeats=3, workdir=None, signal_at=60, last_step=150, step_secs=0.002,
                           save_steps=25) -> ScenarioResult:
    """SIGTERM at about step `signal_at`; the emergency checkpoint; a new process trains to `last_step`."""
    result = ScenarioResult("local-sigterm")
    workdir = workdir or tempfile.mkdtemp(prefix="rayhooks-faults-")
    script = os.path.join(workdir, "faults_trainer.py")
    with open(script, "w") as f:
        f.write(TRAINER)
    for r in range(repeats):
        ckpt = os.path.join(workdir, "local-sigterm-%d-%s" % (r, uuid.uuid4().hex[:6]))
        poller = LatestPoller(ckpt, interval=0.005)
        args = [ckpt, str(last_step), str(step_secs), str(save_steps)]
        proc = None
        try:
            with poller:
                proc = subprocess.Popen([sys.executable, script] + args, stdout=subprocess.PIPE, text=True,
                                        env=_trainer_env())
                first = []
                _read_until(proc, "step %d " % signal_at, first)
                t_signal = time.time()
                proc.send_signal(signal.SIGTERM)
                stopped = _read_until(proc, "stopped", first)
                rc1 = proc.wait(60)
                t_exit = time.time()
                first += proc.stdout.readlines()
                second = subprocess.run([sys.executable, script] + args, capture_output=True, text=True,
                                        timeout=300, env=_trainer_env())
            stopped_step, stopped_w = int(stopped[1]), float(stopped[2])
            lines2 = second.stdout.splitlines()
            started2 = _parse_lines(lines2, "started")
            steps2 = _parse_lines(lines2, "step")
            stopped2 = [line.split() for line in lines2 if line.startswith("stopped")]
            committed = _parse_lines(first, "committed") + _parse_lines(lines2, "committed")
            store = rh.CheckpointStore(rh.Storage(ckpt))
            emergency = store.get(stopped_step)
            why = []
            if rc1 != 128 + signal.SIGTERM:
                why.append("the signalled process exited with %d, not %d (rh.Preempted)" % (rc1, 128 + signal.SIGTERM))
            if emergency is None or stopped_step <= signal_at or stopped_w != stopped_step:
                why.append("no emergency checkpoint of the stopped step %d (w=%s)" % (stopped_step, stopped_w))
            if second.returncode != 0:
                why.append("the resumed process failed: %s" % second.stderr[-1500:])
            if not started2 or started2[0][0] != stopped_step:
                why.append("the resumed process started at %s, not at the emergency step %d" % (
                    started2[:1], stopped_step))
            if not stopped2 or stopped2[0][1:3] != [str(last_step), "%.1f" % last_step]:
                why.append("the resumed process stopped at %s, expected step %d w=%d" % (
                    stopped2[:1], last_step, last_step))
            lost = check_committed(store, [s for s, _ in committed] + sorted(poller.seen_steps))
            resumed = steps2[0][1] - t_signal if steps2 else None
            emergency_at = [t for s, t in committed if s == stopped_step]
            result.add({"fault_step": signal_at, "recovery_step": stopped_step,
                        "resumed_step": steps2[0][0] if steps2 else None,
                        "emergency_commit_secs": emergency_at[0] - t_signal if emergency_at else None,
                        "exit_secs": t_exit - t_signal,
                        "restored_secs": started2[0][1] - t_signal if started2 else None},
                       not why, lost, poller, resumed, why)
        except Exception:
            result.failed(traceback.format_exc(), poller)
        finally:
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    return result


# -- 2. the GCS server stops mid-run and comes back --------------------------------------------------------

def _tests_module(filename, name):
    """tests/<filename> executed as a module named `name` (tests/ is no package; not put in sys.modules)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO_ROOT, "tests", filename))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _gcs_emulator_class():
    """tests/gcs_emulator.py's `GcsEmulator` (a real gcp-storage-emulator on a free loopback port)."""
    return _tests_module("gcs_emulator.py", "rayhooks_faults_gcs_emulator").GcsEmulator


class _Commits(rh.CheckpointSaverListener):
    """Records (step, time.time()) at each after_save."""

    def __init__(self):
        self.lock = threading.Lock()
        self.commits = []
        self.changed = threading.Condition(self.lock)

    def after_save(self, session, step):
        with self.changed:
            self.commits.append((step, time.time()))
            self.changed.notify_all()

    def wait_for(self, predicate, timeout):
        with self.changed:
            return self.changed.wait_for(lambda: predicate(self.commits), timeout)


def scenario_gcs_outage(repeats=3, workdir=None, stop_after_commit=50, save_steps=25, step_secs=0.01,
                        after_recovery_steps=100, state_floats=1 << 17,
                        failure_timeout=150.0) -> ScenarioResult:
    """Async saves to gs:// every `save_steps`; the server stops after a commit >= `stop_after_commit`
    and comes back once the hook counted a failed save; the run ends `after_recovery_steps` after
    the first commit that follows the server's return."""
    result = ScenarioResult("gcs-outage")
    workdir = workdir or tempfile.mkdtemp(prefix="rayhooks-faults-")
    emulator = _gcs_emulator_class()(data_dir=os.path.join(workdir, "gcs-data-%s" % uuid.uuid4().hex[:6]))
    emulator.start()
    gcsfs_logger = logging.getLogger("gcsfs")
    gcsfs_level = gcsfs_logger.level
    gcsfs_logger.setLevel(logging.CRITICAL)  # its "out of retries" tracebacks, once per request in the outage
    try:
        emulator.make_bucket("faults")
        for _ in range(repeats):
            _gcs_repeat(result, emulator, stop_after_commit, save_steps, step_secs, after_recovery_steps,
                        state_floats, failure_timeout)
    finally:
        rh.SummaryWriterCache.clear()  # flush event files while the server still runs
        emulator.stop()
        gcsfs_logger.setLevel(gcsfs_level)
    return result


def _gcs_repeat(result, emulator, stop_after_commit, save_steps, step_secs, after_recovery_steps,
                state_floats, failure_timeout):
    url = "gs://faults/run-%s" % uuid.uuid4().hex[:8]
    opts = emulator.options
    commits = _Commits()
    # gcsfs retries each request 6 times with backoff (about 30 s while the server is gone); rayhooks'
    # own retries are off so that the save fails after those, as in tests/test_faults_local.py.
    hook = rh.AsyncCheckpointSaverHook(url, save_steps=save_steps, storage_options=opts,
                                       retry=rh.RetryPolicy(max_attempts=1), on_write_error="retry_next_save",
                                       max_to_keep=None, listeners=[commits])
    state = {"w": np.zeros(state_floats, np.float32)}
    times = {}
    finished = threading.Event()
    controller_error = []

    def controller():  # the fault injector
        try:
            if not commits.wait_for(lambda c: any(s >= stop_after_commit for s, _ in c), 120):
                raise RuntimeError("no commit of step >= %d within 120 s" % stop_after_commit)
            emulator.stop()
            times["down"] = time.time()
            deadline = time.monotonic() + failure_timeout
            while hook.failed_saves < 1 and time.monotonic() < deadline and not finished.is_set():
                finished.wait(0.02)  # polls a counter of the training thread
            times["failed_saves_when_back"] = hook.failed_saves
            emulator.start()
            times["back"] = time.time()
        except BaseException:
            controller_error.append(traceback.format_exc())
            times.setdefault("back", time.time())

    def step():
        state["w"] += 1
        time.sleep(step_secs)  # the step's compute
        return {}

    poller = LatestPoller(url, opts, interval=0.02)
    thread = threading.Thread(target=controller, name="gcs-fault-injector", daemon=True)
    step_times = []
    target = None
    try:
        with poller:
            thread.start()
            try:
                with rh.MonitoredTrainingSession(chief_only_hooks=[hook], state=state, save_checkpoint_secs=None,
                                                 save_summaries_steps=None, log_step_count_steps=None) as sess:
                    began = time.monotonic()
                    while not sess.should_stop():
                        sess.run(step)
                        step_times.append((sess.global_step, time.time()))
                        if target is None and "back" in times and any(t > times["back"] for _, t in commits.commits):
                            target = sess.global_step + after_recovery_steps
                        if target is not None and sess.global_step >= target:
                            break
                        if time.monotonic() - began > failure_timeout + 120:
                            raise RuntimeError("no commit after the server came back within the time limit")
                final_step, final_w = sess.global_step, float(state["w"][0])
            finally:
                finished.set()
                thread.join(60)
                if emulator.proc is None:
                    emulator.start()
        why = list(controller_error)
        back = times.get("back")
        after = [(s, t) for s, t in commits.commits if back is not None and t > back]
        store = rh.CheckpointStore(rh.Storage(url, opts))
        latest = store.latest()
        if hook.failed_saves < 1:
            why.append("no save failed while the server was down")
        if not after:
            why.append("no commit after the server came back")
        if final_step != target or final_w != target or latest is None or latest.step != target:
            why.append("ended at step %s with w=%s, latest %s; expected %s" % (
                final_step, final_w, latest and latest.step, target))
        lost = check_committed(store, [s for s, _ in commits.commits] + sorted(poller.seen_steps))
        down, back = times.get("down"), times.get("back")
        during = [s for s, t in step_times if down is not None and back is not None and down <= t <= back]
        result.add({"fault_step": max((s for s, t in step_times if down is not None and t <= down), default=None),
                    "recovery_step": after[0][0] if after else None,
                    "outage_secs": back - down if down and back else None,
                    "failed_saves": hook.failed_saves,
                    "steps_during_outage": len(during),
                    "unavailable_polls": poller.unavailable},
                   not why, lost, poller, after[0][1] - back if after else None, why)
    except Exception:
        result.failed(traceback.format_exc(), poller)
    finally:
        try:
            rh.SummaryWriterCache.clear()  # this run's event files, while the server runs
        except Exception:
            pass


# -- 6. the GCS server stops in the middle of an upload and comes back ------------------------------------

def _holding_proxy_class():
    """tests/tcp_proxy.py's `HoldingProxy` (a loopback proxy that can hold an upload half-way).

    tcp_proxy.py imports `gcs_emulator` by its plain name (pytest puts tests/ on sys.path); outside
    pytest that name is lent to tests/gcs_emulator.py, loaded as `_gcs_emulator_class` loads it, only
    while tcp_proxy.py is executed.
    """
    lent = "gcs_emulator" not in sys.modules
    if lent:
        sys.modules["gcs_emulator"] = _tests_module("gcs_emulator.py", "gcs_emulator")
    try:
        module = _tests_module("tcp_proxy.py", "rayhooks_faults_tcp_proxy")
    finally:
        if lent:
            sys.modules.pop("gcs_emulator", None)
    return module.HoldingProxy


class _OncePerCheckpointPoller(LatestPoller):
    """`LatestPoller` for checkpoints too big to checksum every few ms (32 MB, twice a poll).

    Each distinct checkpoint named as latest (by the state file or `store.latest()`) is verified in
    full, crc32c of every file, the first time it is seen; on later polls its files must still be
    there with the sizes its manifest gives. Anything else is a torn latest, as in `LatestPoller`.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.verified = set()
        self.full_verifies = 0
        verify = self.store.verify

        def verify_once(info, on_bytes=None):
            key = (info.prefix, json.dumps(info.files, sort_keys=True))
            if key not in self.verified:
                self.full_verifies += 1
                problems = verify(info, on_bytes)
                if not problems:
                    self.verified.add(key)
                return problems
            problems = []
            present = set(self.storage.listdir())  # a fresh listing: the sizes below come from it
            for name, meta in sorted(info.files.items()):
                if name not in present:
                    problems.append("%s is missing" % self.storage.url_of(name))
                    continue
                size = self.storage.size(name)
                if size != meta["bytes"]:
                    problems.append("%s: expected %d bytes, found %d" % (self.storage.url_of(name),
                                                                          meta["bytes"], size))
            return problems
        self.store.verify = verify_once


def scenario_gcs_mid_upload(repeats=3, workdir=None, gave_up_runs=1, state_floats=8 << 20, hold_bytes=8 << 20,
                            save_steps=20, step_secs=0.01, commits_before=2, commits_after=2,
                            upload_timeout=240.0) -> ScenarioResult:
    """The server stops while the data file of a `4 * state_floats`-byte checkpoint is `hold_bytes` up.

    `repeats` runs bring it back at once (the upload completes); `gave_up_runs` more bring it back
    only once the upload has failed (the next save commits).
    """
    result = ScenarioResult("gcs-mid-upload")
    workdir = workdir or tempfile.mkdtemp(prefix="rayhooks-faults-")
    proxy_class = _holding_proxy_class()
    emulator = _gcs_emulator_class()(data_dir=os.path.join(workdir, "gcs-data-%s" % uuid.uuid4().hex[:6]))
    emulator.start()
    gcsfs_logger = logging.getLogger("gcsfs")
    gcsfs_level = gcsfs_logger.level
    gcsfs_logger.setLevel(logging.CRITICAL)  # its "out of retries" tracebacks while the server is gone
    try:
        emulator.make_bucket("faults")
        for gave_up in [False] * repeats + [True] * gave_up_runs:
            _mid_upload_repeat(result, emulator, proxy_class, gave_up, state_floats, hold_bytes, save_steps,
                               step_secs, commits_before, commits_after, upload_timeout)
    finally:
        rh.SummaryWriterCache.clear()  # flush event files while the server still runs
        emulator.stop()
        gcsfs_logger.setLevel(gcsfs_level)
    # The summary's fault -> resumed column is the repeats' ("back at once"); a "gave up" run's time,
    # mostly gcsfs's own retries, is reported beside it (`_extras`) and per run.
    result.times = [d["resumed_secs"] for d in result.details
                    if d.get("variant") == "back at once" and d.get("resumed_secs") is not None]
    return result


def _mid_upload_repeat(result, emulator, proxy_class, gave_up, state_floats, hold_bytes, save_steps, step_secs,
                       commits_before, commits_after, upload_timeout):
    url = "gs://faults/mid-upload-%s" % uuid.uuid4().hex[:8]
    proxy = proxy_class(emulator.port)
    opts = dict(emulator.options, endpoint_url=proxy.endpoint)  # the trainer talks to the server via the proxy
    commits = _Commits()
    times = {}
    controller_error = []

    class HoldNextUpload(rh.CheckpointSaverListener):
        """Arms the proxy in the before_save of the first save after `commits_before` commits: the
        writer is idle then (one snapshot in flight at most), so the bytes held are this save's."""

        def before_save(self, session, step):
            if "held_step" not in times and len(commits.commits) >= commits_before:
                times["held_step"] = step
                proxy.hold_after(hold_bytes)

    # gcsfs retries each request itself (about 60 s for a resumable upload whose server is gone);
    # rayhooks' own retries are off, as in tests/test_faults_local.py.
    hook = rh.AsyncCheckpointSaverHook(url, save_steps=save_steps, storage_options=opts,
                                       retry=rh.RetryPolicy(max_attempts=1), on_write_error="retry_next_save",
                                       max_to_keep=None, listeners=[HoldNextUpload(), commits])
    state = {"w": np.zeros(state_floats, np.float32)}

    def controller():  # the fault injector
        try:
            if not proxy.held.wait(120):
                raise RuntimeError("no upload reached %d bytes within 120 s" % hold_bytes)
            times["down"] = time.time()
            emulator.stop()
            proxy.release()  # the held bytes go on, to a server that is gone
            if gave_up:
                # The writer goes idle when the held upload has failed (gcsfs out of retries); the
                # hook counts the failure only at its next save, on the training thread.
                if not hook._writer.wait_idle(upload_timeout):
                    raise RuntimeError("the held upload neither failed nor finished in %.0f s" % upload_timeout)
                times["gave_up"] = time.time()
            emulator.start()
            times["back"] = time.time()
        except BaseException:
            controller_error.append(traceback.format_exc())
        finally:
            proxy.release()

    def step():
        state["w"] += 1
        time.sleep(step_secs)  # the step's compute
        return {}

    poller = _OncePerCheckpointPoller(url, emulator.options, interval=0.02)  # straight to the server
    thread = threading.Thread(target=controller, name="gcs-mid-upload-fault-injector", daemon=True)
    step_times = []
    try:
        with poller:
            thread.start()
            try:
                with rh.MonitoredTrainingSession(chief_only_hooks=[hook], state=state, save_checkpoint_secs=None,
                                                 save_summaries_steps=None, log_step_count_steps=None) as sess:
                    began = time.monotonic()
                    while not sess.should_stop():
                        sess.run(step)
                        step_times.append((sess.global_step, time.time()))
                        down = times.get("down")
                        if down is not None and len([1 for _, t in commits.commits if t > down]) >= commits_after:
                            break
                        if controller_error:
                            raise RuntimeError("the fault injector failed: %s" % controller_error[0])
                        if time.monotonic() - began > upload_timeout + 120:
                            raise RuntimeError("no %d commits after the server stopped within the time limit"
                                               % commits_after)
                final_step, final_w = sess.global_step, float(state["w"][0])
            finally:
                proxy.release()
                thread.join(upload_timeout + 60)
                if emulator.proc is None:
                    emulator.start()
        why = list(controller_error)
        down, back, held_step = times.get("down"), times.get("back"), times.get("held_step")
        after = [(s, t) for s, t in commits.commits if down is not None and t > down]
        before = [s for s, t in commits.commits if down is None or t <= down]
        store = rh.CheckpointStore(rh.Storage(url, emulator.options))
        latest = store.latest()
        committed = [i.step for i in store.committed()]
        held_committed = held_step is not None and held_step in committed
        leftovers = [] if held_step is None or held_committed else \
            [n for n in store.storage.listdir() if n.startswith(store.prefix_for(held_step) + ".")]
        if held_step is None or down is None:
            why.append("no upload was held and the server never stopped mid-upload")
        elif gave_up:
            if held_committed or held_step in [s for s, _ in commits.commits]:
                why.append("the held upload of step %d committed: it never gave up" % held_step)
            if hook.failed_saves < 1:
                why.append("the held upload's failure was never counted (failed_saves=0)")
        else:
            if not after or after[0][0] != held_step:
                why.append("the first commit after the stop was %s, not the held step %d"
                           % (after[0][0] if after else None, held_step))
            if hook.failed_saves:
                why.append("%d save(s) failed; the held upload should have resumed" % hook.failed_saves)
        if len(after) < commits_after:
            why.append("%d commit(s) after the server stopped, expected %d" % (len(after), commits_after))
        if final_w != final_step or latest is None or latest.step != final_step:
            why.append("ended at step %s with w=%s, latest %s" % (final_step, final_w, latest and latest.step))
        lost = check_committed(store, [s for s, _ in commits.commits] + sorted(poller.seen_steps))
        during = [s for s, t in step_times if down is not None and back is not None and down <= t <= back]
        detail = {"variant": "gave up" if gave_up else "back at once",
                  "fault_step": held_step,
                  "recovery_step": after[0][0] if after else None,
                  "held_committed": held_committed,
                  "committed_before_stop": len(before),
                  "outage_secs": back - down if down and back else None,
                  "failed_saves": hook.failed_saves, "skipped_saves": hook.skipped_saves,
                  "steps_during_outage": len(during),
                  "held_step_files_left": len(leftovers),
                  "full_verifies": poller.full_verifies,
                  "unavailable_polls": poller.unavailable}
        if gave_up and "gave_up" in times:
            detail["upload_gave_up_secs"] = times["gave_up"] - down
        result.add(detail, not why, lost, poller, after[0][1] - down if after else None, why)
    except Exception:
        result.failed(traceback.format_exc(), poller)
    finally:
        proxy.close()
        try:
            rh.SummaryWriterCache.clear()  # this run's event files, while the server runs
        except Exception:
            pass


# -- Ray: what runs on the workers and on the chief -------------------------------------------------------------

def make_train_fn(step_log, step_secs):
    """Each worker adds 1 to w per step (busy `step_secs`); worker 0 appends "pid step time" per step."""
    def train_fn(ctx):
        import os
        import time
        import numpy as np
        state = {"w": np.zeros(2, np.float32)}
        log = open(step_log, "a", buffering=1) if ctx.worker_index == 0 else None
        pid = os.getpid()

        def step():
            state["w"] += 1
            deadline = time.perf_counter() + step_secs
            while time.perf_counter() < deadline:  # a real step takes time: faults land mid-run
                pass
            return {}

        try:
            with ctx.session(state=state) as sess:
                if log is not None:
                    log.write("start %d %d %.6f\n" % (pid, sess.global_step, time.time()))
                while not sess.should_stop():
                    sess.run(step)
                    if log is not None:
                        log.write("step %d %d %.6f\n" % (pid, sess.global_step, time.time()))
        finally:
            if log is not None:
                log.close()
        return sess.global_step, float(state["w"][0])
    return train_fn


class SaveLog(rh.CheckpointSaverListener):
    """On the chief: appends "step time" at each after_save to a file (the chief's memory may die)."""

    def __init__(self, path):
        self.path = path

    def after_save(self, session, step):
        with open(self.path, "a") as f:
            f.write("%d %.6f\n" % (step, time.time()))


class KillWorker(SaveLog):
    """After `at_step` commits: `ray.kill` worker 1's actor (a lost node), once."""

    def __init__(self, path, run_name, at_step):
        super().__init__(path)
        self.run_name, self.at_step = run_name, at_step

    def after_save(self, session, step):
        super().after_save(session, step)
        fault = self.path + ".fault"
        if step == self.at_step and not os.path.exists(fault):
            import ray
            actor = ray.get_actor("rayhooks-%s-worker-1" % self.run_name)
            with open(fault, "w") as f:
                f.write("%d %.6f\n" % (step, time.time()))
            ray.kill(actor)


class CrashChief(SaveLog):
    """At `at_step`'s after_save: os._exit(1) of the chief's process, once (a real crash, no cleanup)."""

    def __init__(self, path, at_step):
        super().__init__(path)
        self.at_step = at_step

    def after_save(self, session, step):
        super().after_save(session, step)
        fault = self.path + ".fault"
        if step == self.at_step and not os.path.exists(fault):
            with open(fault, "w") as f:
                f.write("%d %.6f\n" % (step, time.time()))
            os._exit(1)


class PreemptWorker(SaveLog):
    """After `at_step` commits: SIGTERM to worker 1's process (a preemption), once."""

    def __init__(self, path, run_name, at_step):
        super().__init__(path)
        self.run_name, self.at_step = run_name, at_step

    def after_save(self, session, step):
        super().after_save(session, step)
        fault = self.path + ".fault"
        if step == self.at_step and not os.path.exists(fault):
            import ray
            pid = ray.get(ray.get_actor("rayhooks-%s-worker-1" % self.run_name).pid.remote())
            with open(fault, "w") as f:
                f.write("%d %.6f\n" % (step, time.time()))
            os.kill(pid, signal.SIGTERM)


# -- Ray scenarios (3, 4, 5) ------------------------------------------------------------------------------------

_RAY_STARTED_HERE = []


def ensure_ray():
    """Ray, started once per process: ray.init(num_cpus=2, include_dashboard=False) unless running."""
    import ray
    if __name__ != "__main__":  # Ray workers cannot import benchmarks/: ship this module by value
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        _RAY_STARTED_HERE.append(True)
    return ray


def shutdown_ray():
    """Stops the Ray instance `ensure_ray` started (one started elsewhere is left running)."""
    if _RAY_STARTED_HERE:
        import ray
        ray.shutdown()
        _RAY_STARTED_HERE.clear()


def _read_pairs(path):
    out = []
    if os.path.exists(path):
        for line in open(path).read().splitlines():
            p = line.split()
            if len(p) == 2:
                out.append((int(p[0]), float(p[1])))
    return out


def _read_step_log(path):
    """[(kind, pid, step, time)] from worker 0's log; a torn last line of a killed process is skipped."""
    out = []
    for line in open(path).read().splitlines():
        p = line.split()
        if len(p) == 4 and p[0] in ("start", "step"):
            try:
                out.append((p[0], int(p[1]), int(p[2]), float(p[3])))
            except ValueError:
                pass
    return out


def _ray_repeat(result, kind, workdir, last_step, save_steps, fault_at, step_secs):
    ensure_ray()
    name = "%s-%s" % (kind.replace("ray-", ""), uuid.uuid4().hex[:6])
    base = os.path.join(workdir, name)
    os.makedirs(base)
    ckpt, saves, step_log = os.path.join(base, "ckpt"), os.path.join(base, "saves.log"), os.path.join(base, "steps.log")
    if kind == "ray-worker-kill":
        listener = KillWorker(saves, name, fault_at)
        hook = rh.CheckpointSaverHook(ckpt, save_steps=save_steps, max_to_keep=None, listeners=[listener])
        max_failures = 1
    elif kind == "ray-chief-crash":
        listener = CrashChief(saves, fault_at)
        hook = rh.AsyncCheckpointSaverHook(ckpt, save_steps=save_steps, in_flight="wait", max_to_keep=None,
                                           listeners=[listener])
        max_failures = 0
    else:
        listener = PreemptWorker(saves, name, fault_at)
        hook = rh.CheckpointSaverHook(ckpt, save_steps=save_steps, max_to_keep=None, listeners=[listener])
        max_failures = 1
    poller = LatestPoller(ckpt, interval=0.01)
    try:
        with poller:
            run = rh.launch(make_train_fn(step_log, step_secs), 2, backend="ray", max_failures=max_failures,
                            name=name, tf_config=False, chief_only_hooks=[hook],
                            hooks=[rh.StopAtStepHook(last_step=last_step)])
        why = []
        fault = _read_pairs(saves + ".fault")
        if not fault:
            raise RuntimeError("the fault was never injected (no after_save(%d) on the chief)" % fault_at)
        fault_step, t_fault = fault[0]
        seen = [s for s, _ in _read_pairs(saves)]
        steps = _read_step_log(step_log)
        old_pid = next(pid for k, pid, _, _ in steps if k == "start")
        store = rh.CheckpointStore(rh.Storage(ckpt))
        if [tuple(r) for r in run.worker_results] != [(last_step, float(last_step))] * 2:
            why.append("workers ended with %r, expected (%d, %d.0) each" % (run.worker_results, last_step, last_step))
        latest = store.latest()
        if latest is None or latest.step != last_step:
            why.append("latest checkpoint %s, expected %d" % (latest and latest.step, last_step))
        detail = {"fault_step": fault_step}
        resumed = None
        duplicates = len(seen) - len(set(seen))
        if kind == "ray-chief-crash":
            after = [(s, t) for s, t in _read_pairs(saves) if t > t_fault]
            resumed = after[0][1] - t_fault if after else None
            detail.update(recovery_step=after[0][0] if after else None, after_save_duplicates=duplicates,
                          steps_while_chief_down=len([1 for k, _, _, t in steps
                                                      if k == "step" and after and t_fault < t < after[0][1]]))
            if not after:
                why.append("no commit after the chief's crash")
            if duplicates:
                why.append("after_save ran twice for a step: %r" % seen)
        else:
            if run.recoveries != 1:
                why.append("%d recoveries, expected 1" % run.recoveries)
            new = [(k, pid, s, t) for k, pid, s, t in steps if pid != old_pid and t > t_fault]
            restored = next((s for k, _, s, _ in new if k == "start"), None)
            first = next(((s, t) for k, _, s, t in new if k == "step"), None)
            resumed = first[1] - t_fault if first else None
            detail.update(recovery_step=restored, resumed_step=first and first[0], after_save_duplicates=duplicates)
            if first is None or restored is None or first[0] != restored + 1:
                why.append("the new group restored %s and first stepped to %s" % (restored, first))
            elif store.get(restored) is None:
                why.append("the new group restored step %d, which is not a committed checkpoint" % restored)
            if kind == "ray-worker-sigterm":
                emergency = [s for s in seen if s % save_steps]
                ok = len(emergency) == 1 and restored == emergency[0] and store.get(emergency[0]) is not None
                detail["emergency_step"] = emergency[0] if emergency else None
                detail["emergency_committed"] = ok
                if not ok:
                    why.append("emergency checkpoint: after_save steps %r, restored %s" % (seen, restored))
        lost = check_committed(store, seen + list(run.checkpoints) + sorted(poller.seen_steps))
        result.add(detail, not why, lost, poller, resumed, why)
    except Exception:
        result.failed(traceback.format_exc(), poller)


def scenario_ray(kind, repeats=3, workdir=None) -> ScenarioResult:
    """Scenarios 3-5: 2 Ray workers (1 CPU each), 5 ms steps, faults injected from a chief listener."""
    config = {  # last_step, save_steps, fault at the after_save of step, step seconds
        "ray-worker-kill": (200, 20, 20, 0.005),
        "ray-chief-crash": (160, 20, 40, 0.005),
        "ray-worker-sigterm": (200, 50, 50, 0.005),
    }[kind]
    result = ScenarioResult(kind)
    workdir = workdir or tempfile.mkdtemp(prefix="rayhooks-faults-")
    for _ in range(repeats):
        _ray_repeat(result, kind, workdir, *config)
    if kind == "ray-chief-crash":
        result.extra["after_save duplicates"] = sum(d.get("after_save_duplicates", 0) for d in result.details)
    if kind == "ray-worker-sigterm":
        result.extra["emergency checkpoint committed"] = "%d/%d" % (
            sum(bool(d.get("emergency_committed")) for d in result.details), result.injected)
    return result


def run_scenario(key, repeats, workdir=None) -> ScenarioResult:
    if key == "local-sigterm":
        return scenario_local_sigterm(repeats, workdir)
    if key == "gcs-outage":
        return scenario_gcs_outage(repeats, workdir)
    if key == "gcs-mid-upload":
        return scenario_gcs_mid_upload(repeats, workdir)
    return scenario_ray(key, repeats, workdir)


# -- the report --------------------------------------------------------------------------------------------

def markdown_table(headers, rows) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"
    return "\n".join([line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
                     + [line(r) for r in cells[1:]])


def _extras(r: ScenarioResult) -> str:
    parts = ["%s: %s" % kv for kv in r.extra.items()]
    if r.key == "gcs-outage":
        outages = [d["outage_secs"] for d in r.details if d.get("outage_secs") is not None]
        parts.append("outage %s s" % _stat(outages))
        parts.append("failed saves %d" % sum(d.get("failed_saves", 0) for d in r.details))
        parts.append("steps trained during outages %d" % sum(d.get("steps_during_outage", 0) for d in r.details))
    if r.key == "gcs-mid-upload":
        once = [d for d in r.details if d.get("variant") == "back at once"]
        gave = [d for d in r.details if d.get("variant") == "gave up"]

        def stat(values):
            return "%.2f" % values[0] if len(values) == 1 else _stat(values)
        if once:
            parts.append("back at once (%d): held upload committed %d/%d" % (
                len(once), sum(bool(d.get("held_committed")) for d in once), len(once)))
        if gave:
            parts.append("gave up (%d more): held upload never committed %d/%d, upload failed %s s after the "
                         "stop, stop -> next commit %s s" % (
                             len(gave), sum(d.get("held_committed") is False for d in gave), len(gave),
                             stat([d["upload_gave_up_secs"] for d in gave if "upload_gave_up_secs" in d]),
                             stat([d["resumed_secs"] for d in gave if d.get("resumed_secs") is not None])))
        parts.append("failed saves %d" % sum(d.get("failed_saves", 0) for d in r.details))
    if r.key == "local-sigterm":
        em = [d["emergency_commit_secs"] for d in r.details if d.get("emergency_commit_secs") is not None]
        parts.append("signal -> emergency commit %s s" % _stat(em))
    if r.unavailable:
        parts.append("unavailable reads %d" % r.unavailable)
    return "; ".join(parts) or "-"


def summary_table(results: List[ScenarioResult]) -> str:
    headers = ["Scenario", "Faults injected", "Faults survived", "Checkpoints lost", "Torn latests (polls)",
               "Fault -> resumed, s: median [min–max]", "Other"]
    rows = [[r.title, r.injected, r.survived, r.lost, "%d (%d)" % (r.torn, r.polls), _stat(r.times), _extras(r)]
            for r in results]
    return markdown_table(headers, rows)


def details_table(results: List[ScenarioResult]) -> str:
    headers = ["Scenario", "Repeat", "Fault at step", "Recovered at step", "Fault -> resumed, s", "Survived",
               "Lost", "Torn", "Polls", "Notes"]
    rows = []
    skip = {"fault_step", "recovery_step", "resumed_secs", "survived", "lost", "torn", "polls"}
    for r in results:
        for i, d in enumerate(r.details, 1):
            notes = ", ".join("%s=%s" % (k, ("%.2f" % v) if isinstance(v, float) else v)
                              for k, v in d.items() if k not in skip)
            secs = d.get("resumed_secs")
            rows.append([r.key, i, d.get("fault_step", "-"), d.get("recovery_step", "-"),
                         "-" if secs is None else "%.2f" % secs, "yes" if d.get("survived") else "NO",
                         d.get("lost", "-"), d.get("torn", "-"), d.get("polls", "-"), notes or "-"])
    return markdown_table(headers, rows)


def machine_lines() -> List[str]:
    cpu = None
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        pass
    return ["- Date: %s" % datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z"),
            "- Machine: nproc=%s, CPU: %s, %s" % (os.cpu_count(), cpu or platform.processor() or "unknown",
                                                   platform.platform()),
            "- Python %s, rayhooks %s, numpy %s" % (platform.python_version(), rh.__version__, np.__version__)]


def render(results: List[ScenarioResult], repeats: int, elapsed: float, command: str) -> str:
    out = ["# rayhooks fault injection", "",
           "Command: `%s`, %d repeat(s) per scenario, %.0f s in all." % (command, repeats, elapsed), ""]
    out += machine_lines()
    out += ["", "## Summary", "", summary_table(results), "",
            "Checkpoints lost and torn latests must be 0; faults survived must equal faults injected.", "",
            "## What is counted", "",
            "- Faults survived: the run finished at its last step with the right values (every step adds 1 "
            "to every element of `w`, so the state after step S is S) and the fault took effect (a recovery "
            "of the worker group, a failed save, a restarted chief, a held upload committed or given up).",
            "- Checkpoints lost: committed checkpoints (every step named by an `after_save`, the run's "
            "result, the poller, or the final listing; retention is off, so all must remain) that at the "
            "end fail `CheckpointStore.verify` or whose `w` is not their step.",
            "- Torn latests: a poller thread reads, every 5-20 ms while the run goes on, the `checkpoint` "
            "state file's `model_checkpoint_path` (what `tf.train.latest_checkpoint` returns; parsed with "
            "`rayhooks.formats.state_file.parse_state`) and `rh.CheckpointStore(...).latest()`, and counts "
            "any that names a checkpoint whose manifest is missing or whose files do not verify (gs:// read "
            "through `rh.Storage`). Reads failing while the GCS server is down count as unavailable reads, "
            "not as torn.",
            "", "## Fault -> resumed, per scenario", ""]
    out += ["- %s: %s" % (TITLES[r.key], RESUMED[r.key]) for r in results]
    out += ["", "## Setup", ""]
    out += [SETUP[r.key] for r in results]
    if any(r.key.startswith("ray-") for r in results):
        out += ["", RAY_NOTE]
    out += ["", "## Per repeat", "",
            "Fault at step: the last step before the fault (1: the step printed before the signal; 2: the last "
            "step before the server stopped; 3-5: the step whose `after_save` injected it; 6: the step whose "
            "upload was held when the server stopped). Recovered at step: 1, 3, 5: the step of the checkpoint "
            "the new process or worker group restored; 2, 4, 6: the first step committed after the fault.",
            "", details_table(results), ""]
    problems = [(r.key, p) for r in results for p in r.problems]
    if problems:
        out += ["## Problems", ""] + ["- %s: %s" % (k, p.replace("\n", " ")[:1500]) for k, p in problems] + [""]
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.faults",
                                     description="Injects real faults repeatedly and reports survival, lost "
                                                 "checkpoints, torn latests and the time to resume.")
    parser.add_argument("--repeats", type=int, default=3, help="repeats per scenario (default 3)")
    parser.add_argument("--out", default=DEFAULT_OUT, help="where to write the Markdown report")
    parser.add_argument("--only", action="append", choices=SCENARIOS, metavar="SCENARIO",
                        help="run only this scenario (repeatable): %s" % ", ".join(SCENARIOS))
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    keys = [k for k in SCENARIOS if not args.only or k in args.only]
    workdir = tempfile.mkdtemp(prefix="rayhooks-faults-")
    started = time.perf_counter()
    results = []
    try:
        for key in keys:
            print("running %s x%d..." % (key, args.repeats), file=sys.stderr, flush=True)
            began = time.perf_counter()
            results.append(run_scenario(key, args.repeats, workdir))
            print("  %s took %.0f s" % (key, time.perf_counter() - began), file=sys.stderr, flush=True)
    finally:
        shutdown_ray()
        shutil.rmtree(workdir, ignore_errors=True)
    command = "python -m benchmarks.faults" + ("" if args.repeats == 3 else " --repeats %d" % args.repeats) + \
        "".join(" --only " + k for k in args.only or [])
    text = render(results, args.repeats, time.perf_counter() - started, command)
    out = os.path.abspath(args.out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        f.write(text)
    print(text)
    print("Report written to %s." % out)
    ok = all(r.survived == r.injected and r.lost == 0 and r.torn == 0 for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
