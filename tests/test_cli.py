"""The `rayhooks` command line: ls, verify, gc, restore, summaries, and its errors."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import json
import re
import time
import shutil
import subprocess

import numpy as np
import pytest

import rayhooks as rh
from rayhooks import cli, cli_common
from rayhooks.formats import state_file

T0 = 1_700_000_000.0  # 2023-11-14T22:13:20Z
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _tensors(step):
    return {"w": np.full((3, 4), step, np.float32), "count": np.array(step, np.int64)}


def _make_run(url):
    """Committed steps 10, 20, 30 (30 latest), a stale partial at 15 and an in-flight one at 40."""
    clock = rh.ManualClock(T0)
    store = rh.CheckpointStore(rh.Storage(url), clock=clock)
    for step in (10, 20, 30):
        store.commit(step, store.write_data(step, _tensors(step)))
        clock.advance(60)
    store.write_data(15, _tensors(15))  # written after the commits, so no commit collected it
    _age(url, _partial_names(15))  # ... but dated before the newest one: a crashed save's leftovers
    store.write_data(40, _tensors(40))
    return store


def _age(url, names):
    """Dates local files an hour before the newest manifest (for gc, they predate the last commit)."""
    if not os.path.isdir(url):
        return  # memory://: no mtimes to set
    newest = max(os.path.getmtime(os.path.join(url, n)) for n in os.listdir(url) if n.endswith(".manifest.json"))
    for name in names:
        os.utime(os.path.join(url, name), (newest - 3600, newest - 3600))


def _damage(run_dir, step):
    """Flips one bit in the middle of `step`'s data file; returns its path."""
    data = os.path.join(run_dir, "model.ckpt-%d.data-00000-of-00001" % step)
    raw = bytearray(open(data, "rb").read())
    raw[len(raw) // 2] ^= 0x01
    with open(data, "wb") as f:
        f.write(raw)
    return data


def _partial_names(step):
    return ["model.ckpt-%d.data-00000-of-00001" % step, "model.ckpt-%d.index" % step]


def _run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _row(out, step):
    """The ls row for `step`, as its cells: step, time, size, files, status."""
    for line in out.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if cells[0] == str(step):
            return cells + [""] * (5 - len(cells))
    raise AssertionError("no row for step %s in:\n%s" % (step, out))


@pytest.fixture
def run_dir(tmp_path):
    url = str(tmp_path / "run")
    _make_run(url)
    return url


# -- ls ------------------------------------------------------------------------


def test_ls_lists_committed_partials_and_latest(run_dir, capsys):
    code, out, err = _run(capsys, "ls", run_dir)
    assert code == 0
    assert out.splitlines()[0].split()[:2] == ["STEP", "TIME"]
    store = rh.CheckpointStore(rh.Storage(run_dir))
    for i, info in enumerate(store.committed()):
        assert _row(out, info.step) == [str(info.step), "2023-11-14T22:%02d:20Z" % (13 + i),
                                        cli_common.human_size(info.nbytes), "2",
                                        "latest" if info.step == 30 else ""]
    assert _row(out, 15)[1:] == ["-", cli_common.human_size(sum(
        os.path.getsize(os.path.join(run_dir, n)) for n in _partial_names(15))), "2", "partial (uncommitted)"]
    assert _row(out, 40)[4] == "partial (uncommitted)"
    assert "latest step 30" in out
    steps = [int(line.split()[0]) for line in out.splitlines()[1:] if line.split()[0].isdigit()]
    assert steps == [10, 15, 20, 30, 40]


def test_ls_on_memory_url(memory_url, capsys):
    _make_run(memory_url)
    code, out, err = _run(capsys, "ls", memory_url)
    assert code == 0
    assert _row(out, 30)[4] == "latest"
    assert _row(out, 40)[4] == "partial (uncommitted)"
    assert memory_url in out


def test_human_size_and_storage_option_parsing():
    assert cli_common.human_size(0) == "0 B"
    assert cli_common.human_size(1536) == "1.5 KiB"
    assert cli_common.human_size(3 * 1024 ** 3) == "3.0 GiB"
    assert cli_common.storage_option("token=anon") == ("token", "anon")
    assert cli_common.storage_option("use_ssl=false") == ("use_ssl", False)
    assert cli_common.storage_option("retries=3") == ("retries", 3)
    assert cli_common.storage_option('headers={"a": "b"}') == ("headers", {"a": "b"})


def test_storage_options_reach_fsspec(run_dir, capsys, monkeypatch):
    import fsspec
    seen = []
    real = fsspec.core.url_to_fs

    def recording(url, **options):
        seen.append(options)
        return real(url, **options)

    monkeypatch.setattr(fsspec.core, "url_to_fs", recording)
    code, out, _ = _run(capsys, "ls", run_dir, "--storage-option", "auto_mkdir=true",
                        "--storage-option", "label=run 1")
    assert code == 0 and _row(out, 30)[4] == "latest"
    assert seen and all(o == {"auto_mkdir": True, "label": "run 1"} for o in seen)


# -- verify --------------------------------------------------------------------


def test_verify_ok_then_detects_a_flipped_byte(run_dir, capsys):
    code, out, _ = _run(capsys, "verify", run_dir)
    assert code == 0
    assert [line.split()[:3] for line in out.splitlines()[:3]] == [
        ["OK", "step", "10"], ["OK", "step", "20"], ["OK", "step", "30"]]

    _damage(run_dir, 20)

    code, out, _ = _run(capsys, "verify", run_dir)
    assert code == 1
    lines = out.splitlines()
    bad = [line for line in lines if line.startswith("BAD")]
    assert len(bad) == 1 and bad[0].split()[:3] == ["BAD", "step", "20"]
    assert any("model.ckpt-20.data-00000-of-00001: expected" in line for line in lines)
    assert "1 BAD" in lines[-1]

    assert _run(capsys, "verify", run_dir, "--step", "30")[0] == 0
    code, out, _ = _run(capsys, "verify", run_dir, "--step", "20")
    assert code == 1 and out.startswith("BAD  step 20")


def test_verify_reports_a_malformed_manifest(run_dir, capsys):
    with open(os.path.join(run_dir, "model.ckpt-10.manifest.json"), "w") as f:
        f.write("{not json")
    code, out, _ = _run(capsys, "verify", run_dir)
    assert code == 1
    assert any(line.startswith("BAD  step 10") and "malformed" in line for line in out.splitlines())


def _strip_file_sizes(url, step):
    path = os.path.join(url, "model.ckpt-%d.manifest.json" % step)
    with open(path) as f:
        manifest = json.load(f)
    manifest["files"] = {name: {} for name in manifest["files"]}  # parses, but has no sizes or crcs
    with open(path, "w") as f:
        json.dump(manifest, f)


def test_a_manifest_without_sizes_is_bad_not_a_traceback(run_dir, tmp_path, capsys):
    _strip_file_sizes(run_dir, 30)
    code, out, err = _run(capsys, "verify", run_dir)
    assert code == 1 and "Traceback" not in err
    assert [line.split()[:3] for line in out.splitlines()[:3]] == [
        ["OK", "step", "10"], ["OK", "step", "20"], ["BAD", "step", "30"]]
    code, out, _ = _run(capsys, "ls", run_dir)
    assert code == 0 and _row(out, 30)[4].startswith("malformed manifest")
    assert _row(out, 20)[4] == "latest"
    dest = str(tmp_path / "restored")
    code, out, _ = _run(capsys, "restore", run_dir, "--step", "30", "--to", dest)
    assert code == 1 and out.startswith("BAD  step 30")
    code, out, err = _run(capsys, "restore", run_dir, "--to", dest, "-q")
    assert code == 0 and "restored step 20" in out and "step 30 is malformed" in err


def test_library_restore_latest_falls_back_past_a_manifest_without_sizes(run_dir):
    _strip_file_sizes(run_dir, 30)
    store = rh.CheckpointStore(rh.Storage(run_dir))
    state = {k: np.zeros_like(v) for k, v in _tensors(0).items()}
    info = store.restore_latest(rh.NumpySaver(state))  # documented: falls back to the newest that verifies
    assert info.step == 20 and state["count"] == 20


# -- gc ------------------------------------------------------------------------


def test_gc_dry_run_then_yes(run_dir, capsys):
    before = sorted(os.listdir(run_dir))
    code, out, _ = _run(capsys, "gc", run_dir)
    assert code == 0
    assert sorted(os.listdir(run_dir)) == before
    assert "dry run" in out and "--yes" in out
    lines = out.splitlines()
    for name in _partial_names(15):
        assert "would delete  %s/%s" % (run_dir, name) in lines
    for name in _partial_names(40):
        assert any(line.startswith("keep") and name in line and "possibly in flight, kept" in line
                   for line in lines)
    assert not any(line.startswith("keep") and "model.ckpt-15" in line for line in lines)

    code, out, err = _run(capsys, "gc", run_dir, "--yes", "--quiet")
    assert code == 0
    after = sorted(os.listdir(run_dir))
    assert after == sorted(set(before) - set(_partial_names(15)))
    assert set(_partial_names(40)) <= set(after)
    assert "deleted 2 partial file(s)" in out
    assert _run(capsys, "verify", run_dir)[0] == 0  # the committed checkpoints are intact

    code, out, _ = _run(capsys, "gc", run_dir, "--yes")
    assert code == 0 and "nothing to delete" in out and sorted(os.listdir(run_dir)) == after


def test_gc_deletes_the_temporary_of_a_state_file_write_cut_short(run_dir, capsys):
    import tensorflow as tf
    temporary = os.path.join(run_dir, "checkpoint.tmp-0123456789ab")
    with open(temporary, "wb") as f:
        f.write(b"model_checkpoint_path: \"mod")
    _age(run_dir, [os.path.basename(temporary)])
    code, out, _ = _run(capsys, "gc", run_dir)
    assert code == 0 and "would delete  %s" % temporary in out.splitlines()
    code, out, _ = _run(capsys, "gc", run_dir, "--yes", "--quiet")
    assert code == 0 and not os.path.exists(temporary)
    assert tf.train.latest_checkpoint(run_dir) == os.path.join(run_dir, "model.ckpt-30")


def test_gc_keeps_a_save_in_flight_below_a_damaged_checkpoint(run_dir, capsys, monkeypatch):
    # Step 30 is damaged: the next run resumes at 20 and saves step 25, under the damaged one.
    _damage(run_dir, 30)
    real_commit = rh.CheckpointStore.commit
    gc_runs = []

    def commit_after_a_gc(self, step, files, extra=None):  # the user runs gc while step 25 is in flight
        gc_runs.append(_run(capsys, "gc", run_dir, "--yes", "-q"))
        return real_commit(self, step, files, extra)

    monkeypatch.setattr(rh.CheckpointStore, "commit", commit_after_a_gc)
    state = {k: np.zeros_like(v) for k, v in _tensors(0).items()}

    def step():
        state["count"] += 1
        return {}

    with rh.MonitoredTrainingSession(checkpoint_dir=run_dir, state=state, save_checkpoint_steps=10,
                                     hooks=[rh.StopAtStepHook(last_step=25)]) as sess:
        assert sess.global_step == 20
        while not sess.should_stop():
            sess.run(step)
    monkeypatch.undo()
    assert [code for code, _, _ in gc_runs] == [0]
    out = gc_runs[0][1]
    assert "model.ckpt-25" not in "".join(line for line in out.splitlines() if line.startswith("delete"))
    assert "delete        %s/model.ckpt-15.index" % run_dir in out.splitlines()  # stale ones still go
    code, out, _ = _run(capsys, "verify", run_dir, "--step", "25")
    assert code == 0 and out.startswith("OK   step 25")


def _date_back(url, names, seconds):
    for name in names:
        then = time.time() - seconds
        os.utime(os.path.join(url, name), (then, then))


def test_gc_older_than_takes_a_crashed_runs_leftovers_newer_than_any_commit(run_dir, capsys):
    # Step 40's files are newer than the latest commit (30): a save in flight, or a crashed run's last.
    code, out, _ = _run(capsys, "gc", run_dir, "--yes", "-q")
    assert code == 0 and set(_partial_names(40)) <= set(os.listdir(run_dir))
    assert "--older-than" in out  # the kept files' way out is named
    code, out, _ = _run(capsys, "gc", run_dir, "--older-than", "1d", "--yes", "-q")
    assert code == 0 and "nothing to delete" in out  # written just now: possibly in flight still
    _date_back(run_dir, _partial_names(40), 2 * 86400)
    code, out, _ = _run(capsys, "gc", run_dir, "--older-than", "1d")
    assert code == 0 and set(_partial_names(40)) <= set(os.listdir(run_dir))  # a dry run
    assert "would delete  %s/%s" % (run_dir, _partial_names(40)[0]) in out.splitlines()
    code, out, _ = _run(capsys, "gc", run_dir, "--older-than", "1d", "--yes", "-q")
    assert code == 0 and "deleted 2 partial file(s)" in out
    assert not set(_partial_names(40)) & set(os.listdir(run_dir))
    assert _run(capsys, "verify", run_dir)[0] == 0
    assert rh.CheckpointStore(rh.Storage(run_dir)).latest().step == 30


def test_gc_older_than_in_a_directory_with_no_commit(tmp_path, capsys):
    run = tmp_path / "crashed"
    run.mkdir()
    names = _partial_names(10)
    for name in names:
        (run / name).write_bytes(b"half a checkpoint")
    code, out, _ = _run(capsys, "gc", str(run), "--yes", "-q")
    assert code == 0 and sorted(os.listdir(run)) == sorted(names)
    assert "no committed checkpoint yet" in out
    _date_back(str(run), names[:1], 3 * 3600)  # one of them last written 3 h ago
    code, out, _ = _run(capsys, "gc", str(run), "--older-than", "2h", "--yes", "-q")
    assert code == 0 and sorted(os.listdir(run)) == names[1:]


@pytest.mark.parametrize("age", ["0", "-5m", "soon", "3w"])
def test_gc_refuses_an_age_it_cannot_read(run_dir, capsys, age):
    code, _, err = _run(capsys, "gc", run_dir, "--older-than=" + age, "--yes")
    assert code == 2 and "90s, 30m, 12h or 2d" in err
    assert set(_partial_names(15)) <= set(os.listdir(run_dir))


def test_gc_older_than_reads_units():
    assert [cli_common.age_arg(a) for a in ("90", "90s", "30m", "1.5h", "2d", " 2D ")] == \
        [90, 90, 1800, 5400, 172800, 172800]


def test_gc_shows_progress_on_stderr_only(run_dir, capsys, monkeypatch):
    monkeypatch.setenv("RAYHOOKS_PROGRESS", "1")  # stderr is no terminal here
    code, out, err = _run(capsys, "gc", run_dir, "--yes")
    assert code == 0
    assert "deleting" in err  # tqdm's bar
    assert "deleting" not in out


@pytest.mark.parametrize("setting", [None, "0"])
def test_the_command_lines_bars_follow_rayhooks_progress(run_dir, capsys, monkeypatch, setting):
    if setting is None:
        monkeypatch.delenv("RAYHOOKS_PROGRESS", raising=False)  # not a terminal: no bar
    else:
        monkeypatch.setenv("RAYHOOKS_PROGRESS", setting)
    code, out, err = _run(capsys, "gc", run_dir, "--yes")
    assert code == 0 and "deleted 2 partial file(s)" in out
    assert "deleting" not in err


# -- restore -------------------------------------------------------------------


@pytest.mark.parametrize("where", ["file", "memory"])
def test_restore_is_readable_by_tensorflow(where, tmp_path, memory_url, capsys, monkeypatch):
    import tensorflow as tf
    monkeypatch.setenv("RAYHOOKS_PROGRESS", "1")  # the bars, on stderr that is no terminal here
    url = str(tmp_path / "run") if where == "file" else memory_url
    _make_run(url)
    dest = str(tmp_path / "restored")

    code, out, err = _run(capsys, "restore", url, "--step", "20", "--to", dest)
    assert code == 0, err
    assert "checksums OK" in out
    assert tf.train.latest_checkpoint(dest) == os.path.join(dest, "model.ckpt-20")
    reader = tf.train.load_checkpoint(dest)
    np.testing.assert_array_equal(reader.get_tensor("w"), _tensors(20)["w"])
    assert reader.get_tensor("count") == 20
    assert "model.ckpt-20" in err  # the per-file progress bar names the file
    assert not [n for n in os.listdir(dest) if ".tmp-" in n]

    # Without --step: the latest; the copy is itself a valid checkpoint directory.
    assert _run(capsys, "restore", url, "--to", dest)[0] == 0
    assert tf.train.latest_checkpoint(dest) == os.path.join(dest, "model.ckpt-30")
    assert tf.train.load_checkpoint(dest).get_tensor("count") == 30
    state = state_file.parse_state(open(os.path.join(dest, "checkpoint")).read())
    assert state.all_model_checkpoint_paths == ["model.ckpt-30"]
    assert _run(capsys, "verify", dest)[0] == 0


def _flip_a_byte(path):
    raw = bytearray(open(path, "rb").read())
    raw[0] ^= 0xFF
    with open(path, "wb") as f:
        f.write(raw)


def test_restore_refuses_a_damaged_checkpoint(run_dir, tmp_path, capsys):
    _flip_a_byte(os.path.join(run_dir, "model.ckpt-30.index"))
    dest = str(tmp_path / "restored")
    code, out, _ = _run(capsys, "restore", run_dir, "--step", "30", "--to", dest, "-q")
    assert code == 1
    assert out.startswith("BAD  step 30") and "model.ckpt-30.index: expected" in out
    assert os.listdir(dest) == []  # neither files nor a state file naming them


def test_restore_without_a_step_falls_back_past_a_damaged_latest_as_a_session_does(run_dir, tmp_path, capsys):
    _flip_a_byte(os.path.join(run_dir, "model.ckpt-30.index"))
    dest = str(tmp_path / "restored")
    code, out, err = _run(capsys, "restore", run_dir, "--to", dest, "-q")
    assert code == 0 and out.startswith("BAD  step 30") and "restored step 20" in out
    assert "step 30 is damaged" in err and "trying step 20" in err
    assert sorted(os.listdir(dest)) == ["checkpoint", "model.ckpt-20.data-00000-of-00001", "model.ckpt-20.index",
                                        "model.ckpt-20.manifest.json"]


@pytest.mark.parametrize("to", ["gs://bucket/x", "memory://x"])
def test_restore_to_a_url_that_is_not_local_is_refused(run_dir, tmp_path, capsys, monkeypatch, to):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    code, _, err = _run(capsys, "restore", run_dir, "--to", to)
    assert code == 2 and "is not a local directory" in err
    assert os.listdir(cwd) == []               # not ./gs:/bucket/x
    code, out, _ = _run(capsys, "restore", run_dir, "--to", "file://" + str(tmp_path / "local"), "-q")
    assert code == 0 and os.path.exists(tmp_path / "local" / "checkpoint")


def _tf1_saver_dir(tf_dir, steps):
    """A directory of checkpoints written by TF1's own `Saver`, at `steps`."""
    import tensorflow as tf
    with tf.Graph().as_default():
        step = tf.compat.v1.train.get_or_create_global_step()
        tf.compat.v1.get_variable("v", [5])
        saver = tf.compat.v1.train.Saver()
        with tf.compat.v1.Session() as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            for s in steps:
                sess.run(tf.compat.v1.assign(step, s))
                saver.save(sess, os.path.join(tf_dir, "model.ckpt"), global_step=step)
    return tf_dir


def test_restore_refuses_a_directory_of_tf_checkpoints(tmp_path, capsys):
    import tensorflow as tf
    tf_dir = _tf1_saver_dir(str(tmp_path / "tf1"), [1, 2])
    before = {n: open(os.path.join(tf_dir, n), "rb").read() for n in os.listdir(tf_dir)}
    run = str(tmp_path / "run")
    _make_run(run)  # steps 10..30: once restored there, gc would take TF's steps 1, 2 for stale partials

    code, out, err = _run(capsys, "restore", run, "--to", tf_dir)
    _assert_usage_error(code, out, err, tf_dir, "did not write", "new or empty directory")
    assert {n: open(os.path.join(tf_dir, n), "rb").read() for n in os.listdir(tf_dir)} == before
    assert tf.train.latest_checkpoint(tf_dir) == os.path.join(tf_dir, "model.ckpt-2")
    _run(capsys, "gc", tf_dir, "--yes", "-q")
    assert sorted(os.listdir(tf_dir)) == sorted(before)


def test_latest_is_what_a_run_resumed_below_a_damaged_checkpoint_committed(run_dir, tmp_path, capsys):
    import tensorflow as tf
    _damage(run_dir, 30)
    state = {k: np.zeros_like(v) for k, v in _tensors(0).items()}
    with rh.MonitoredTrainingSession(checkpoint_dir=run_dir, state=state, save_checkpoint_steps=10,
                                     hooks=[rh.StopAtStepHook(last_step=25)]) as sess:
        assert sess.global_step == 20  # 30 is damaged
        while not sess.should_stop():
            sess.run(lambda: {})
    assert tf.train.latest_checkpoint(run_dir) == os.path.join(run_dir, "model.ckpt-25")
    code, out, _ = _run(capsys, "ls", run_dir)
    assert code == 0 and _row(out, 25)[4] == "latest" and _row(out, 30)[4] == ""
    assert "latest step 25" in out
    dest = str(tmp_path / "restored")
    code, out, _ = _run(capsys, "restore", run_dir, "--to", dest, "-q")
    assert code == 0 and "restored step 25" in out
    assert tf.train.load_checkpoint(dest).get_tensor("count") == 20  # the lambda step trains nothing


# -- summaries -----------------------------------------------------------------


def _training_run(url):
    state = {"w": np.zeros(2, np.float32)}

    def step():
        state["w"] += 1
        return {"loss": 10.0 / float(state["w"][0])}

    with rh.MonitoredTrainingSession(checkpoint_dir=url, state=state, save_checkpoint_steps=2,
                                     save_summaries_steps=1, scaffold=rh.Scaffold(summary_op=["loss"]),
                                     hooks=[rh.StopAtStepHook(last_step=5)]) as sess:
        while not sess.should_stop():
            sess.run(step)


def _summary_row(out, run, tag):
    for line in out.splitlines():
        cells = line.split()
        if cells[:2] == [run, tag]:
            return cells
    raise AssertionError("no row for %s %s in:\n%s" % (run, tag, out))


def test_summaries_of_a_training_run_and_plot(tmp_path, capsys):
    import tensorflow as tf
    url = str(tmp_path / "run")
    _training_run(url)
    # A subdirectory with TF2's tensor-based scalars, as tf.summary writes them.
    with tf.summary.create_file_writer(os.path.join(url, "eval")).as_default():
        for s in (2, 4):
            tf.summary.scalar("accuracy", 0.25 * s, step=s)
    # And one two levels down, which TensorBoard finds too.
    with tf.summary.create_file_writer(os.path.join(url, "evaluate", "eval")).as_default():
        tf.summary.scalar("auc", 0.75, step=3)

    code, out, err = _run(capsys, "summaries", url)
    assert code == 0, err
    cells = _summary_row(out, ".", "loss")
    assert cells[2] == "5" and float(cells[3]) == pytest.approx(2.0)
    cells = _summary_row(out, "eval", "accuracy")
    assert cells[2] == "4" and float(cells[3]) == pytest.approx(1.0)
    cells = _summary_row(out, "evaluate/eval", "auc")
    assert cells[2] == "3" and float(cells[3]) == pytest.approx(0.75)

    png = str(tmp_path / "out.png")
    code, out, err = _run(capsys, "summaries", url, "--plot", png)
    assert code == 0, err
    with open(png, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    assert os.path.getsize(png) > 1000

    bad_png = str(tmp_path / "no-such-dir" / "out.png")
    code, out, err = _run(capsys, "summaries", url, "--plot", bad_png)
    _assert_usage_error(code, out, err, bad_png, "does not exist")


def test_summaries_survive_a_torn_tail(tmp_path, capsys):
    from rayhooks.formats import summaries, events
    url = str(tmp_path / "logs")
    os.makedirs(url)
    with open(os.path.join(url, events.event_filename()), "wb") as f:
        f.write(events.frame_record(events.file_version_event(T0)))
        for s in (1, 2):
            summary = summaries.from_mapping({"loss": float(s)})
            f.write(events.frame_record(events.summary_event(summary, s, T0 + s)))
        summary = summaries.from_mapping({"loss": 3.0})
        f.write(events.frame_record(events.summary_event(summary, 3, T0 + 3))[:-5])  # still being written
    code, out, err = _run(capsys, "summaries", url)
    assert code == 0
    cells = _summary_row(out, ".", "loss")
    assert cells[2:4] == ["2", "2"]
    assert "truncated" in err


# -- errors --------------------------------------------------------------------


def _assert_usage_error(code, out, err, *needles):
    assert code == 2
    assert out == ""
    assert "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith("rayhooks: error: "), err
    for needle in needles:
        assert needle in err


@pytest.mark.parametrize("command", ["ls", "verify", "gc", "restore", "summaries"])
def test_bad_urls_exit_2_with_one_line(command, tmp_path, capsys):
    extra = ["--to", str(tmp_path / "out")] if command == "restore" else []
    code, out, err = _run(capsys, command, "nosuchproto://bucket/run", *extra)
    _assert_usage_error(code, out, err, "nosuchproto://bucket/run", "Protocol not known")

    missing = str(tmp_path / "missing")
    code, out, err = _run(capsys, command, missing, *extra)
    _assert_usage_error(code, out, err, missing, "does not exist")

    empty = tmp_path / "not-a-run"
    empty.mkdir()
    (empty / "notes.txt").write_text("hello")
    code, out, err = _run(capsys, command, str(empty), *extra)
    if command == "summaries":
        _assert_usage_error(code, out, err, str(empty), "no events files")
    else:
        _assert_usage_error(code, out, err, str(empty), "not a checkpoint directory")
        _make_run(str(empty / "ckpt"))                  # the example's layout: OUT/ckpt beside OUT/logs
        code, out, err = _run(capsys, command, str(empty), *extra)
        _assert_usage_error(code, out, err, str(empty), "the checkpoints are in %s: pass that" % (empty / "ckpt"))


@pytest.mark.parametrize("command", ["ls", "verify", "gc", "restore"])
def test_tf_written_directories_are_named_not_listed_as_partials(command, tmp_path, capsys):
    import tensorflow as tf
    tf_dir = _tf1_saver_dir(str(tmp_path / "tf1"), [100])
    ckpt = tf.train.Checkpoint(v=tf.Variable(1.0))
    tf.train.CheckpointManager(ckpt, str(tmp_path / "tf2"), max_to_keep=1).save()
    extra = ["--to", str(tmp_path / "out")] if command == "restore" else []
    for url, latest in ((tf_dir, "model.ckpt-100"), (str(tmp_path / "tf2"), "ckpt-1")):
        code, out, err = _run(capsys, command, url, *extra)
        _assert_usage_error(code, out, err, url, "did not write", latest, "tf.train.load_checkpoint")


def test_other_basename_is_suggested(tmp_path, capsys):
    url = str(tmp_path / "run")
    store = rh.CheckpointStore(rh.Storage(url), basename="ckpt")
    store.commit(1, store.write_data(1, _tensors(1)))
    os.remove(os.path.join(url, "checkpoint"))
    code, out, err = _run(capsys, "ls", url)
    _assert_usage_error(code, out, err, "--basename ckpt")
    code, out, _ = _run(capsys, "ls", url, "--basename", "ckpt")
    assert code == 0 and _row(out, 1)[4] == "latest"


@pytest.mark.parametrize("command", ["verify", "restore"])
def test_unknown_step_exits_2(command, run_dir, tmp_path, capsys):
    extra = ["--to", str(tmp_path / "out")] if command == "restore" else []
    code, out, err = _run(capsys, command, run_dir, "--step", "25", *extra)
    _assert_usage_error(code, out, err, run_dir, "step 25", "10, 20, 30")
    code, out, err = _run(capsys, command, run_dir, "--step", "40", *extra)
    _assert_usage_error(code, out, err, "only partial")


def test_restore_needs_a_committed_checkpoint_and_another_directory(tmp_path, capsys):
    url = str(tmp_path / "run")
    rh.CheckpointStore(rh.Storage(url)).write_data(5, _tensors(5))  # a partial only
    code, out, err = _run(capsys, "restore", url, "--to", str(tmp_path / "out"))
    _assert_usage_error(code, out, err, url, "no committed checkpoints")

    run = str(tmp_path / "run2")
    _make_run(run)
    code, out, err = _run(capsys, "restore", run, "--to", run)
    _assert_usage_error(code, out, err, "checkpoint directory itself")


def test_help_and_argparse_errors(capsys):
    assert cli.main(["--help"]) == 0
    assert "restore" in capsys.readouterr().out
    for command in ("ls", "verify", "gc", "restore", "summaries"):
        assert cli.main([command, "--help"]) == 0
        assert "--storage-option" in capsys.readouterr().out
    assert cli.main(["restore", "/x"]) == 2  # --to is required
    assert "--to" in capsys.readouterr().err
    assert cli.main(["ls", "/x", "--storage-option", "novalue"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err


# -- the installed console script ----------------------------------------------


def test_console_script(run_dir):
    exe = shutil.which("rayhooks")
    assert exe is not None, "the rayhooks console script is not installed; run pip install -e ."
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    done = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0 and "verify" in done.stdout
    done = subprocess.run([exe, "ls", run_dir], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    assert _row(done.stdout, 30)[4] == "latest"


def test_a_storage_librarys_logged_traceback_is_one_line(tmp_path):
    """gcsfs logs each request that ran out of retries with its traceback. Caused for real (a
    host that does not resolve) it takes about 3 minutes of retries, so `exists` here raises
    and logs as gcsfs does."""
    import sys
    script = tmp_path / "offline.py"
    script.write_text(
        "import logging, sys\n"
        "from rayhooks import cli, storage\n"
        "def exists(self, name=''):  # as gcsfs does when storage.googleapis.com cannot be resolved\n"
        "    try:\n"
        "        raise ConnectionError('Cannot connect to host storage.googleapis.com:443')\n"
        "    except ConnectionError as e:\n"
        "        logging.getLogger('gcsfs').exception('_request out of retries on exception: %s', e)\n"
        "        raise\n"
        "storage.Storage.exists = exists\n"
        "sys.exit(cli.main(['ls', sys.argv[1]]))\n")
    env = dict(os.environ, PYTHONWARNINGS="ignore", TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.returncode == 2 and done.stdout == ""
    assert "Traceback" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("rayhooks: ")]
    assert lines == ["rayhooks: warning: _request out of retries on exception: Cannot connect to host "
                     "storage.googleapis.com:443",
                     "rayhooks: error: %s: Cannot connect to host storage.googleapis.com:443" % tmp_path]


def test_python_dash_m_rayhooks_is_the_same_command(run_dir):
    import sys
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    done = subprocess.run([sys.executable, "-m", "rayhooks", "ls", run_dir], capture_output=True, text=True,
                          timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    assert _row(done.stdout, 30)[4] == "latest"
    done = subprocess.run([sys.executable, "-m", "rayhooks", "ls", run_dir + "/nothing-here"],
                          capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 2  # the exit code reaches the shell


def test_restore_twice_into_the_same_directory_with_another_basename(tmp_path, capsys):
    run, out = str(tmp_path / "run"), str(tmp_path / "serving")
    store = rh.CheckpointStore(rh.Storage(run), basename="ckpt")
    store.commit(10, store.write_data(10, {"w": np.ones(4, np.float32)}))
    assert _run(capsys, "restore", run, "--basename", "ckpt", "--to", out, "-q")[0] == 0
    store.commit(20, store.write_data(20, {"w": np.full(4, 2, np.float32)}))
    code, stdout, err = _run(capsys, "restore", run, "--basename", "ckpt", "--to", out, "-q")
    assert code == 0, err
    assert stdout.startswith("restored step 20 ")


def test_latest_follows_the_steps_not_the_clocks_of_the_machines_that_committed(tmp_path, capsys):
    # The run resumed on a machine whose clock is an hour behind: its step 40 has an older timestamp
    # than step 20. The session and TF resume from 40; so do `ls` and `restore`.
    import tensorflow as tf
    url, state = str(tmp_path / "run"), {"w": np.zeros(3)}

    def train(last_step, clock):
        with rh.MonitoredTrainingSession(checkpoint_dir=url, state=state, save_checkpoint_steps=10,
                                         save_summaries_steps=None, hooks=[rh.StopAtStepHook(last_step=last_step)],
                                         clock=clock) as sess:
            while not sess.should_stop():
                sess.run(lambda: state.__setitem__("w", state["w"] + 1))
        return sess
    train(20, time.time)
    assert train(40, lambda: time.time() - 3600).global_step == 40
    infos = {i.step: i for i in rh.CheckpointStore(rh.Storage(url)).committed()}
    assert infos[40].timestamp < infos[20].timestamp  # the premise
    assert tf.train.latest_checkpoint(url) == os.path.join(url, "model.ckpt-40")
    code, out, _ = _run(capsys, "ls", url)
    assert code == 0 and _row(out, 40)[4] == "latest" and "latest step 40" in out
    code, out, _ = _run(capsys, "restore", url, "--to", str(tmp_path / "copy"), "-q")
    assert code == 0 and "restored step 40" in out
    assert tf.train.load_checkpoint(str(tmp_path / "copy")).get_tensor("w")[0] == 40


def test_restore_to_a_place_it_cannot_write_names_the_destination_not_the_source(run_dir, tmp_path, capsys):
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "sub").write_bytes(b"a file where a directory must go")
    code, _, err = _run(capsys, "restore", run_dir, "--to", str(blocked / "sub" / "copy"), "-q")
    assert code == 2
    assert "--to %s" % (blocked / "sub" / "copy") in err and "make and write that directory" in err
    assert run_dir not in err


def test_ls_names_the_run_that_writes_the_directory(tmp_path, capsys):
    url, state = str(tmp_path / "run"), {"w": np.zeros(2)}
    with rh.MonitoredTrainingSession(checkpoint_dir=url, state=state, save_checkpoint_steps=2,
                                     save_summaries_steps=None, hooks=[rh.StopAtStepHook(last_step=3)]) as sess:
        while not sess.should_stop():
            sess.run(lambda: None)
        code, out, _ = _run(capsys, "ls", url)
        assert code == 0 and "writer: run " in out and "pid %d" % os.getpid() in out and "not released" in out
    code, out, _ = _run(capsys, "ls", url)
    assert code == 0 and "; released " in out
