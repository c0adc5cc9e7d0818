"""Figures: checkpoint storage — persist throughput, commit latency, restore time.

Part 1, persist throughput. The background writer's path,
`CheckpointStore.write_data` of a dict of 8 float32 arrays (64 MB; 64 and 256 MB
in full mode), against raw fsspec writes of the same bytes by one caller into
one file: `fs.pipe_file(path, bytes)` (the anchor of the target) and
`fs.put_file(local_file, path)`, to `file://` and to `gs://` (the
`gcp-storage-emulator` GCS server of the tests, on loopback). On `file://`,
rayhooks fsyncs the data before its rename (a checkpoint must survive a power
cut) and fsspec's pipe does not, so a third anchor writes and fsyncs the same
bytes with plain `open`/`write`/`os.fsync`. Before each local write the
benchmark calls `os.sync()` (untimed), so no write pays for the dirty pages of
the one before. Every repeat runs every method, the order reversed every other
repeat; the ratio is rayhooks' MB/s over the anchor's in the same repeat.

Part 2, commit latency. `CheckpointSaverHook` and `AsyncCheckpointSaverHook` in
a local `MonitoredSession` on `file://`, saves triggered by a `ManualClock`;
the training step does ~1 ms of numpy work and writes one element of every
array. A listener records the time of `before_save` and `after_save`, and the
hook's `store.write_data` and `store.commit` are wrapped to time them. Latency
= after_save - end of the snapshot (before_save + `hook.last_stall_secs`);
the figure is that latency minus the persist time (`write_data`), i.e. what a
save costs beyond writing its bytes: the hand-off to the writer thread, the
manifest, the `checkpoint` state file, retention, the listener marker, the
TensorBoard health scalars and, for the async hook, waiting for the next step
to dispatch after_save. The anchor is Ray Train (v2 API): a function trainer
with 1 worker calls `ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d))`
(SYNC upload, the default) with the same bytes as 8 `.npy` files; report()
returns once the files are copied to the run's `storage_path` (its persist
time), and `ray.train.get_all_reported_checkpoints(consistency_mode=COMMITTED)`
returns once the controller has registered it (its commit). Before each
report the worker sleeps a random fraction of the controller's poll interval,
so the reports sample its phase.

Part 3, restore time of the latest checkpoint (64 MB): a `tf.train.Checkpoint`
of 8 `tf.Variable`s saved through `rh.TrackableSaver`, and the same arrays
through `rh.NumpySaver`, restored with `CheckpointStore.restore_latest` (which
verifies every file's crc32c first, then restores) from `file://` and `gs://`,
against TF2's `tf.train.Checkpoint.restore` of a `Checkpoint.write` of the same
variables from local disk. Before each restore the state is zeroed (untimed);
after it one element of every tensor is checked. Files are in the page cache
for every method alike.
"""

import argparse
import importlib.util
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

import rayhooks as rh
from rayhooks import storage as storage_module
from benchmarks.common import (MB, REPO_ROOT, BenchResult, Stat, Target, cost_score, fmt_mb, fmt_ratio,
                               paired_ratios, score_range)
from benchmarks.raytrain import ensure_ray, raytrain_fit, raytrain_poll_secs, save_npy_dir

NAME = "storage"
TITLE = "Figure: checkpoint storage — persist throughput, commit latency, restore time"
PARTS = 8
PERSIST_TARGET = 0.9        # rayhooks write_data >= 0.9x raw fsspec pipe of the same bytes
COMMIT_TARGET_MS = 100.0    # latency snapshot -> after_save, minus persist, <= 100 ms
RESTORE_TARGET = 1.2        # restore_latest from file:// <= 1.2x TF2 restore from local disk
WAIT_SECS = 300.0
BUCKET = "rayhooks-bench"


def _config(quick, tiny):
    if tiny:
        return dict(persist_sizes=[1 * MB], persist_repeats=2, commit_size=1 * MB, commit_saves=2,
                    ray_reports=2, restore_size=1 * MB, restore_repeats=2, step_secs=0.0005)
    if quick:
        return dict(persist_sizes=[64 * MB], persist_repeats=4, commit_size=64 * MB, commit_saves=5,
                    ray_reports=3, restore_size=64 * MB, restore_repeats=5, step_secs=0.001)
    return dict(persist_sizes=[64 * MB, 256 * MB], persist_repeats=9, commit_size=64 * MB, commit_saves=10,
                ray_reports=8, restore_size=64 * MB, restore_repeats=9, step_secs=0.001)


# -- shared with bench_throughput -------------------------------------------------------

def make_arrays(nbytes, parts=PARTS):
    """`parts` float32 arrays totalling `nbytes`, every page touched, array i full of i + 1."""
    n = max(1, nbytes // parts // 4)
    return {"layer_%d/kernel" % i: np.full(n, float(i + 1), np.float32) for i in range(parts)}


def _load_gcs_emulator():
    spec = importlib.util.spec_from_file_location("rayhooks_bench_gcs_emulator",
                                                  os.path.join(REPO_ROOT, "tests", "gcs_emulator.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.GcsEmulator


class Gcs:
    """The tests' GCS emulator for the length of a benchmark; the environment it sets is undone at stop."""

    _ENV = ("STORAGE_EMULATOR_HOST", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT")

    def __init__(self):
        self._saved = {k: os.environ.get(k) for k in self._ENV}
        # gcsfs reads this when first imported: with its experimental zonal/HNS support on, every upload
        # first spends 60 s on a gRPC probe the emulator does not serve.
        os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
        import gcsfs
        import gcsfs.core
        if gcsfs.GCSFileSystem is not gcsfs.core.GCSFileSystem:
            self.stop_env()
            raise RuntimeError("gcsfs was imported earlier in this process with GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT "
                               "on, which makes every upload to the emulator wait 60 s; run with "
                               "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false")
        self.server = None
        try:
            self.server = _load_gcs_emulator()().start()
            self.server.make_bucket(BUCKET)
        except BaseException:
            self.stop()
            raise
        self.options = self.server.options
        self.fs = gcsfs.GCSFileSystem(**self.options)

    def url(self, name):
        return "gs://%s/%s" % (BUCKET, name)

    def stop(self):
        if self.server is not None:
            self.server.stop()
            self.server = None
        self.stop_env()

    def stop_env(self):
        for key, value in self._saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _start_gcs():
    try:
        return Gcs(), None
    except Exception as e:  # no emulator installed, or it would not start: the gs:// rows say so
        return None, "%s: %s" % (type(e).__name__, e)


def _drop_cache():
    """Writes back dirty pages (untimed), so the next local write does not pay for the previous one's."""
    if hasattr(os, "sync"):
        os.sync()


# -- part 1: persist throughput -------------------------------------------------------------

def measure_persist(size, repeats, tmp, gcs):
    """{protocol: {method: [seconds per repeat]}} for rayhooks write_data and the raw fsspec anchors."""
    import fsspec
    arrays = make_arrays(size)
    nbytes = sum(a.nbytes for a in arrays.values())
    data = b"".join(a.tobytes() for a in arrays.values())
    src = os.path.join(tmp, "put-source.bin")
    with open(src, "wb") as f:
        f.write(data)

    protocols = {"file": (fsspec.filesystem("file"), "file://" + os.path.join(tmp, "persist-rh"),
                          os.path.join(tmp, "persist-raw"), None)}
    os.makedirs(os.path.join(tmp, "persist-raw"), exist_ok=True)
    if gcs is not None:
        protocols["gs"] = (gcs.fs, gcs.url("persist-rh-%d" % size), "%s/persist-raw-%d" % (BUCKET, size),
                           gcs.options)

    out = {"nbytes": nbytes, "protocols": {}}
    for proto, (fs, url, raw_root, options) in protocols.items():
        store = rh.CheckpointStore(rh.Storage(url, options))
        store.storage.makedirs()
        local = proto == "file"
        counter = iter(range(10 ** 9))

        def rh_write():
            step = next(counter)
            if local:
                _drop_cache()
            started = time.perf_counter()
            files = store.write_data(step, arrays)
            took = time.perf_counter() - started
            store.storage.delete(sorted(files))
            return took

        def raw_pipe():
            path = "%s/pipe-%d.bin" % (raw_root, next(counter))
            if local:
                _drop_cache()
            started = time.perf_counter()
            fs.pipe_file(path, data)
            took = time.perf_counter() - started
            fs.rm(path)
            return took

        def raw_put():
            path = "%s/put-%d.bin" % (raw_root, next(counter))
            if local:
                _drop_cache()
            started = time.perf_counter()
            fs.put_file(src, path)
            took = time.perf_counter() - started
            fs.rm(path)
            return took

        def raw_fsync():
            path = "%s/fsync-%d.bin" % (raw_root, next(counter))
            _drop_cache()
            started = time.perf_counter()
            with open(path, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            took = time.perf_counter() - started
            os.remove(path)
            return took

        methods = [("rh_write_data", rh_write), ("pipe", raw_pipe), ("put", raw_put)]
        if local:
            methods.append(("write_fsync", raw_fsync))
        for _, fn in methods:  # warm-up: connections, first-touch of the writer's buffers
            fn()
        times = {name: [] for name, _ in methods}
        for r in range(repeats):
            for name, fn in (methods if r % 2 == 0 else methods[::-1]):
                times[name].append(fn())
        out["protocols"][proto] = times
    return out


# -- part 2: commit latency ------------------------------------------------------------------

class _CommitProbe(rh.CheckpointSaverListener):
    def __init__(self):
        self.before, self.after = {}, {}

    def before_save(self, session, step):
        self.before[step] = time.perf_counter()

    def after_save(self, session, step):
        self.after[step] = time.perf_counter()


def _busy_numpy(scratch, secs):
    """About `secs` of numpy work (releases the GIL, as real steps mostly do)."""
    end = time.perf_counter() + secs
    while time.perf_counter() < end:
        np.sin(scratch, out=scratch)


def measure_commit(asynchronous, size, saves, tmp, step_secs):
    arrays = make_arrays(size)
    values = list(arrays.values())
    scratch = np.ones(1 << 14, np.float32)

    def step():
        _busy_numpy(scratch, step_secs)
        for a in values:
            a[0] += 1.0

    clock = rh.ManualClock(0.0)
    probe = _CommitProbe()
    kind = rh.AsyncCheckpointSaverHook if asynchronous else rh.CheckpointSaverHook
    hook = kind("file://" + tmp, save_secs=1.0, clock=clock, listeners=[probe], save_graph_def=False)
    store = hook.store
    persist, commit = {}, {}
    real_write, real_commit = store.write_data, store.commit

    def write_data(step_no, tensors, *args, **kwargs):
        started = time.perf_counter()
        try:
            return real_write(step_no, tensors, *args, **kwargs)
        finally:
            persist[step_no] = time.perf_counter() - started

    def commit_(step_no, files, *args, **kwargs):
        started = time.perf_counter()
        try:
            return real_commit(step_no, files, *args, **kwargs)
        finally:
            commit[step_no] = time.perf_counter() - started

    store.write_data, store.commit = write_data, commit_  # the instance's, so the hook's writer calls these

    sess = rh.MonitoredSession(hooks=[hook], state=arrays)
    saved, snapshots = [], {}

    def wait_after_save(step_no):
        deadline = time.monotonic() + WAIT_SECS
        while step_no not in probe.after:
            if time.monotonic() > deadline:
                raise TimeoutError("after_save(%d) not called after %.0fs" % (step_no, WAIT_SECS))
            sess.run(step)  # the async hook dispatches after_save at a run, in the training thread

    wait_after_save(0)
    for _ in range(saves):
        for _ in range(3):
            sess.run(step)
        clock.advance(1.0)
        sess.run(step)  # triggers the save
        step_no = sess.global_step
        snapshots[step_no] = hook.last_stall_secs
        saved.append(step_no)
        wait_after_save(step_no)
    sess.close()
    skipped = getattr(hook, "skipped_saves", 0)
    if skipped:
        raise AssertionError("%d saves were skipped; each save must start with the previous committed" % skipped)
    rows = []
    for s in saved:
        snap_end = probe.before[s] + snapshots[s]
        latency = probe.after[s] - snap_end
        rows.append({"step": s, "snapshot": snapshots[s], "persist": persist[s], "commit_call": commit[s],
                     "latency": latency, "overhead": latency - persist[s]})
    return {"saves": rows, "committed": sorted(int(i.step) for i in store.committed()),
            "nbytes": sum(a.nbytes for a in values)}


def raytrain_commit_fn(config):
    """On the Ray Train worker: report checkpoints of `size` bytes; times report() and the commit after it."""
    import ray.train
    from ray.train import Checkpoint, CheckpointConsistencyMode, CheckpointUploadMode
    arrays = make_arrays(config["size"])
    records = []
    rng = random.Random(0)
    for i in range(config["reports"]):
        directory = tempfile.mkdtemp(prefix="rt-commit-")
        save_npy_dir(arrays, directory)
        name = "ckpt-%06d" % i
        time.sleep(rng.uniform(0, config["poll_secs"]))  # sample the controller's poll phase
        started = time.perf_counter()
        ray.train.report({"i": i}, checkpoint=Checkpoint.from_directory(directory), checkpoint_dir_name=name,
                         checkpoint_upload_mode=CheckpointUploadMode.SYNC)
        reported = time.perf_counter() - started
        found = ray.train.get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED,
                                                       timeout_s=WAIT_SECS)
        visible = time.perf_counter() - started
        shutil.rmtree(directory, ignore_errors=True)
        records.append({"persist": reported, "latency": visible, "overhead": visible - reported,
                        "found": any(c.checkpoint.path.rstrip("/").endswith(name) for c in found)})
    with open(config["out"], "w") as f:
        json.dump(records, f)


def measure_raytrain_commit(size, reports, tmp):
    import ray
    ray_mod, started = ensure_ray(sys.modules[__name__])
    out = os.path.join(tmp, "raytrain-commit.json")
    poll = raytrain_poll_secs()
    try:
        began = time.perf_counter()
        result = raytrain_fit(raytrain_commit_fn, {"size": size, "reports": reports, "poll_secs": poll,
                                                   "out": out},
                              os.path.join(tmp, "raytrain-storage"), "commit")
        wall = time.perf_counter() - began
        with open(out) as f:
            records = json.load(f)
    finally:
        if started:
            ray.shutdown()
    return {"reports": records, "fit_secs": wall, "poll_secs": poll,
            "final_checkpoint": None if result.checkpoint is None else result.checkpoint.path}


# -- part 3: restore time --------------------------------------------------------------------

def measure_restore(size, repeats, tmp, gcs):
    import tensorflow as tf
    arrays = make_arrays(size)
    keys = list(arrays)
    variables = {"v%d" % i: tf.Variable(arrays[k]) for i, k in enumerate(keys)}
    ckpt = tf.train.Checkpoint(**variables)
    np_state = {k: v.copy() for k, v in arrays.items()}
    expected = {k: float(i + 1) for i, k in enumerate(keys)}

    tf2_prefix = ckpt.write(os.path.join(tmp, "tf2", "ckpt"))
    tf_saver = rh.TrackableSaver(ckpt)
    np_saver = rh.NumpySaver(np_state)

    def commit(url, options, saver):
        store = rh.CheckpointStore(rh.Storage(url, options))
        snapshot = saver.snapshot()
        try:
            store.commit(1, store.write_data(1, snapshot.tensors))
        finally:
            snapshot.done()
        return store

    stores = {("tf", "file"): commit("file://" + os.path.join(tmp, "rh-tf"), None, tf_saver),
              ("np", "file"): commit("file://" + os.path.join(tmp, "rh-np"), None, np_saver)}
    if gcs is not None:
        stores[("tf", "gs")] = commit(gcs.url("restore-tf-%d" % size), gcs.options, tf_saver)
        stores[("np", "gs")] = commit(gcs.url("restore-np-%d" % size), gcs.options, np_saver)

    zeros = np.zeros_like(arrays[keys[0]])

    def clobber_tf():
        for v in variables.values():
            v.assign(zeros)

    def check_tf(what):
        for i, v in enumerate(variables.values()):
            got = float(v[0].numpy())
            if got != float(i + 1):
                raise AssertionError("%s restored %g into v%d, expected %g" % (what, got, i, i + 1))

    def clobber_np():
        for v in np_state.values():
            v.fill(0.0)

    def check_np(what):
        for k, v in np_state.items():
            if float(v[0]) != expected[k] or float(v[-1]) != expected[k]:
                raise AssertionError("%s restored %g into %s, expected %g" % (what, float(v[0]), k, expected[k]))

    def timed(clobber, restore, check, what):
        def fn():
            clobber()
            started = time.perf_counter()
            restore()
            took = time.perf_counter() - started
            check(what)
            return took
        return fn

    methods = [("tf2_local", timed(clobber_tf, lambda: ckpt.restore(tf2_prefix), check_tf, "TF2 restore"))]
    for (kind, proto), store in stores.items():
        saver, clobber, check = (tf_saver, clobber_tf, check_tf) if kind == "tf" else (np_saver, clobber_np, check_np)
        methods.append(("rh_%s_%s" % (kind, proto),
                        timed(clobber, lambda s=store, sv=saver: s.restore_latest(sv), check, "rh %s %s" % (kind, proto))))
        if proto == "file":
            methods.append(("rh_%s_%s_noverify" % (kind, proto),
                            timed(clobber, lambda s=store, sv=saver: s.restore_latest(sv, verify=False), check,
                                  "rh %s %s (no verify)" % (kind, proto))))
    for _, fn in methods:  # warm-up: TF's restore graph, gcsfs connections
        fn()
    times = {name: [] for name, _ in methods}
    for r in range(repeats):
        for name, fn in (methods if r % 2 == 0 else methods[::-1]):
            times[name].append(fn())
    return {"nbytes": sum(a.nbytes for a in arrays.values()), "times": times}


# -- the figure ----------------------------------------------------------------------------------

def run(quick=False, tiny=False, gcs=True, ray=True, tmp_root=None):
    cfg = _config(quick, tiny)
    own_tmp = tmp_root is None
    tmp_root = tmp_root or tempfile.mkdtemp(prefix="rayhooks-bench-storage-")
    os.makedirs(tmp_root, exist_ok=True)
    data = {"config": cfg, "persist": {}, "commit": {}, "raytrain_commit": None, "restore": None,
            "gcs_error": None, "raytrain_error": None}
    server = None
    try:
        if gcs:
            server, data["gcs_error"] = _start_gcs()
        for size in cfg["persist_sizes"]:
            tmp = tempfile.mkdtemp(prefix="persist-", dir=tmp_root)
            data["persist"][size] = measure_persist(size, cfg["persist_repeats"], tmp, server)
            shutil.rmtree(tmp, ignore_errors=True)
        for label, asynchronous in (("sync", False), ("async", True)):
            tmp = tempfile.mkdtemp(prefix="commit-%s-" % label, dir=tmp_root)
            data["commit"][label] = measure_commit(asynchronous, cfg["commit_size"], cfg["commit_saves"], tmp,
                                                   cfg["step_secs"])
            shutil.rmtree(tmp, ignore_errors=True)
        if ray:
            tmp = tempfile.mkdtemp(prefix="raytrain-", dir=tmp_root)
            data["raytrain_commit"] = measure_raytrain_commit(cfg["commit_size"], cfg["ray_reports"], tmp)
            shutil.rmtree(tmp, ignore_errors=True)
        tmp = tempfile.mkdtemp(prefix="restore-", dir=tmp_root)
        data["restore"] = measure_restore(cfg["restore_size"], cfg["restore_repeats"], tmp, server)
        shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if server is not None:
            server.stop()
        if own_tmp:
            shutil.rmtree(tmp_root, ignore_errors=True)
    return _report(data)


def _ms(stat):
    return stat.format(1 if stat.median >= 10 else 2)


PERSIST_LABELS = {
    "rh_write_data": "rayhooks CheckpointStore.write_data (the background writer's path)",
    "pipe": "raw fsspec pipe_file(path, bytes) (anchor)",
    "put": "raw fsspec put_file(local file, path)",
    "write_fsync": "raw open/write/os.fsync (durability-matched)",
}
RESTORE_LABELS = {
    "tf2_local": "TF2 tf.train.Checkpoint.restore, local disk (anchor)",
    "rh_tf_file": "rayhooks restore_latest, TrackableSaver, file://",
    "rh_tf_file_noverify": "  same, restore_latest(verify=False)",
    "rh_np_file": "rayhooks restore_latest, NumpySaver, file://",
    "rh_np_file_noverify": "  same, restore_latest(verify=False)",
    "rh_tf_gs": "rayhooks restore_latest, TrackableSaver, gs:// (emulator)",
    "rh_np_gs": "rayhooks restore_latest, NumpySaver, gs:// (emulator)",
}


def _report(data):
    headers = ["state", "to", "method", "MB/s median [min–max]", "ms median", "rayhooks / this (paired MB/s)"]
    rows, targets, notes, extra = [], [], [], []
    summary = {"persist": {}, "commit": {}, "restore": {}}

    # part 1
    for size, res in data["persist"].items():
        nbytes = res["nbytes"]
        label = fmt_mb(nbytes)
        for proto, times in res["protocols"].items():
            to = "file://" if proto == "file" else "gs:// (emulator)"
            for method, secs in times.items():
                mbps = Stat.of([nbytes / MB / s for s in secs])
                ratio = None
                if method != "rh_write_data":
                    ratio = statistics.median(paired_ratios(secs, times["rh_write_data"]))  # anchor s / rh s
                rows.append([label, to, PERSIST_LABELS[method], mbps.format(0), "%.1f" % (1e3 * statistics.median(secs)),
                             "—" if ratio is None else fmt_ratio(ratio)])
                summary["persist"].setdefault(size, {}).setdefault(proto, {})[method] = {
                    "MBps": mbps.to_dict(), "rh_over_this": ratio}
            got = summary["persist"][size][proto]
            ratio = got["pipe"]["rh_over_this"]
            fsync = ("; %s of open/write/fsync" % fmt_ratio(got["write_fsync"]["rh_over_this"])
                     if "write_fsync" in got else "")
            targets.append(Target(
                "%s persist to %s: rayhooks write_data >= %.1fx the MB/s of raw fsspec pipe_file of the same bytes"
                % (label, to, PERSIST_TARGET),
                "%s (rayhooks %.0f MB/s, pipe %.0f MB/s; paired over %d repeats%s)" % (
                    fmt_ratio(ratio), got["rh_write_data"]["MBps"]["median"], got["pipe"]["MBps"]["median"],
                    len(times["pipe"]), fsync),
                ratio >= PERSIST_TARGET, PERSIST_TARGET / ratio if ratio else None,
                score_range(paired_ratios(times["pipe"], times["rh_write_data"]), PERSIST_TARGET,
                            higher_is_better=True)))
    if data["gcs_error"]:
        notes.append("gs:// rows missing: the GCS emulator did not start (%s)" % data["gcs_error"])

    # part 2
    commit_rows = []
    for label, res in data["commit"].items():
        saves = res["saves"]
        st = {k: Stat.of([s[k] for s in saves]).scaled(1e3) for k in ("snapshot", "persist", "commit_call",
                                                                       "latency", "overhead")}
        summary["commit"][label] = {k: v.to_dict() for k, v in st.items()}
        name = "rayhooks %s (local, file://)" % ("AsyncCheckpointSaverHook" if label == "async"
                                                 else "CheckpointSaverHook")
        commit_rows.append([fmt_mb(res["nbytes"]), name, _ms(st["snapshot"]), _ms(st["persist"]),
                            _ms(st["commit_call"]), _ms(st["latency"]), "%s (%d)" % (_ms(st["overhead"]), len(saves))])
        missing = [s["step"] for s in saves if s["step"] not in res["committed"]]
        if missing and len(res["committed"]) < 5:  # retention keeps the newest 5
            notes.append("%s: saves %s were not committed" % (name, missing))
        over = st["overhead"].median
        targets.append(Target("%s: commit latency (snapshot -> after_save) minus persist <= %.0f ms"
                              % (name, COMMIT_TARGET_MS),
                              "%s ms (of which store.commit %s ms; %d saves of %s)" % (
                                  _ms(st["overhead"]), _ms(st["commit_call"]), len(saves), fmt_mb(res["nbytes"])),
                              over <= COMMIT_TARGET_MS, cost_score(over, COMMIT_TARGET_MS),
                              score_range((st["overhead"].min, st["overhead"].max), COMMIT_TARGET_MS)))
    rt = data["raytrain_commit"]
    if rt is not None:
        recs = rt["reports"]
        st = {k: Stat.of([r[k] for r in recs]).scaled(1e3) for k in ("persist", "latency", "overhead")}
        summary["commit"]["raytrain"] = {k: v.to_dict() for k, v in st.items()}
        commit_rows.append([fmt_mb(data["commit"]["sync"]["nbytes"]) if data["commit"] else "—",
                            "Ray Train report(checkpoint=...) SYNC, 1 worker (anchor)", "—",
                            _ms(st["persist"]) + " (report() call)", "—", _ms(st["latency"]),
                            "%s (%d)" % (_ms(st["overhead"]), len(recs))])
        if not all(r["found"] for r in recs):
            notes.append("Ray Train: some reported checkpoints were not among the committed ones")
        notes.append("Ray Train's controller polls its workers every %.1f s (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S), "
                     "so a reported checkpoint is registered up to that long after report() returns; "
                     "persist = the report() call (copy to storage_path), latency = until "
                     "get_all_reported_checkpoints(COMMITTED) lists it." % rt["poll_secs"])
    extra.append(("Commit latency (ms, median [min–max] over saves): snapshot → after_save, and beyond the "
                  "persist time", ["state", "saver", "snapshot", "persist (write_data)", "store.commit()",
                                   "snapshot → after_save", "latency − persist (n)"], commit_rows))

    # part 3
    res = data["restore"]
    if res is not None:
        times = res["times"]
        anchor = times["tf2_local"]
        restore_rows = []
        for method, secs in times.items():
            st = Stat.of(secs).scaled(1e3)
            ratio = statistics.median(paired_ratios(secs, anchor))
            summary["restore"][method] = {"ms": st.to_dict(), "x_tf2_local": ratio}
            restore_rows.append([fmt_mb(res["nbytes"]), RESTORE_LABELS[method], "%s (%d)" % (_ms(st), st.n),
                                 fmt_ratio(ratio)])
        extra.append(("Restore of the latest checkpoint (ms, median [min–max] over repeats):",
                      ["state", "method", "ms (n)", "x TF2 local (paired)"], restore_rows))
        for method in ("rh_tf_file", "rh_np_file"):
            r = summary["restore"][method]["x_tf2_local"]
            targets.append(Target("%s restore: %s <= %.1fx TF2 tf.train.Checkpoint.restore from local disk"
                                  % (fmt_mb(res["nbytes"]), RESTORE_LABELS[method], RESTORE_TARGET),
                                  "%s (this %s ms, TF2 %s ms; paired over %d repeats)" % (
                                      fmt_ratio(r), _ms(Stat.of(times[method]).scaled(1e3)),
                                      _ms(Stat.of(anchor).scaled(1e3)), len(anchor)),
                                  r <= RESTORE_TARGET, r / RESTORE_TARGET,
                                  score_range(paired_ratios(times[method], anchor), RESTORE_TARGET)))

    notes += [
        "Persist: one caller writes one file (rayhooks: the data file, then its small index); 'rayhooks / this' is "
        "the median over repeats of rayhooks' MB/s over the anchor's in the same repeat (> 1: rayhooks faster).",
        "file://: rayhooks writes to a temporary name, fsyncs and renames; fsspec's pipe/put do not fsync, so "
        "their bytes may still be in the page cache when the call returns. os.sync() runs (untimed) before each "
        "local write.",
        "gs://: the emulator is a Python server on loopback, so these MB/s measure it as much as the client. It "
        "appends each chunk of a resumable upload by rewriting the whole object so far, so its cost grows with the "
        "square of the chunk count: rayhooks streams through gcsfs's file object in %d MB parts, pipe_file and "
        "put_file send 50 MB chunks." % (storage_module._UPLOAD_PART_BYTES >> 20),
        "Restore: restore_latest verifies the crc32c of every file, then restores (TrackableSaver: TF's own "
        "restore of the bundle; from gs:// it first downloads the files to a local directory).",
    ]
    return BenchResult(NAME, TITLE, headers, rows, targets, notes,
                       {"raw": data, "summary": summary}, extra)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--no-gcs", action="store_true")
    parser.add_argument("--no-ray", action="store_true")
    args = parser.parse_args(argv)
    print(run(quick=args.quick, tiny=args.tiny, gcs=not args.no_gcs, ray=not args.no_ray).markdown())


if __name__ == "__main__":
    sys.exit(main())
