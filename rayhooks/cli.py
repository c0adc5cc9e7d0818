"""The `rayhooks` command line: inspect, verify, clean, restore and summarise runs.

    rayhooks ls URL                      committed (and partial) checkpoints
    rayhooks verify URL [--step N]       check every file's crc32c against its manifest
    rayhooks gc URL [--yes]              delete the partial files older than the newest commit
               [--older-than AGE]        and any others not written for AGE (a crashed run's leftovers)
    rayhooks restore URL --to DIR        download a checkpoint TF can read from DIR
    rayhooks summaries URL [--plot PNG]  the last value of each scalar tag

URLs are fsspec URLs (gs://, s3://, memory://, file:// or a local path);
`--storage-option KEY=VALUE` passes options to the filesystem.

Exit codes: 0 success, 1 a check failed (a damaged checkpoint), 2 bad input
(a URL that is not there or not a checkpoint directory, an unknown step, ...).
Only the command's output goes to stdout; progress bars, warnings and errors go
to stderr.
"""

import argparse
import contextlib
import datetime
import json
import logging
import os
import re
import sys
import time
import uuid
from typing import Dict, List, Optional, Tuple

PROG = "rayhooks"


class UsageError(Exception):
    """A mistake in what the user asked for: exit code 2, one line on stderr."""


# -- small helpers -----------------------------------------------------------


def _storage_option(text: str) -> Tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError("expected KEY=VALUE, got %r" % text)
    try:
        parsed = json.loads(value)
    except ValueError:
        parsed = value
    return key, parsed


def _step_arg(text: str) -> int:
    try:
        step = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("expected an integer step, got %r" % text) from None
    if step < 0:
        raise argparse.ArgumentTypeError("a step is >= 0, got %d" % step)
    return step


_AGE_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def _age_arg(text: str) -> float:
    """'90s', '30m', '12h', '2d' or plain seconds -> seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([smhd]?)\s*", text.lower())
    if m is None or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError("expected an age such as 90s, 30m, 12h or 2d, got %r" % text)
    return float(m.group(1)) * _AGE_UNITS[m.group(2)]


def human_size(nbytes: float) -> str:
    """1536 -> '1.5 KiB'."""
    n = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return "%d B" % n if unit == "B" else "%.1f %s" % (n, unit)
        n /= 1024
    raise AssertionError("unreachable")


def utc_iso(timestamp: Optional[float]) -> str:
    if timestamp is None:
        return "-"
    return datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _table(rows: List[List[str]], right: Tuple[int, ...] = ()) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _progress(args, **kwargs):
    """A bar on stderr: on a terminal only, as a training run's (`RAYHOOKS_PROGRESS`); never with -q."""
    from tqdm import tqdm
    from rayhooks import progress
    return tqdm(file=sys.stderr, disable=True if args.quiet else progress._disable(), dynamic_ncols=True, **kwargs)


def _open_storage(args):
    """The Storage at args.url; UsageError if the URL's protocol is unknown or the directory is missing."""
    from rayhooks.storage import Storage
    storage = Storage(args.url, dict(args.storage_option or []))
    storage.fs  # resolves the protocol: ValueError/ImportError with the URL and a fix
    if not storage.exists(""):
        raise UsageError("%s does not exist; check the URL (and --storage-option credentials)" % args.url)
    if storage.fs.isfile(storage._path("")):
        raise UsageError("%s is a file, not a directory; pass the run's directory" % args.url)
    return storage


def _open_store(args):
    """The CheckpointStore at args.url; UsageError if it is not a checkpoint directory."""
    from rayhooks.checkpoints import MANIFEST_SUFFIX, STATE_FILE, CheckpointStore
    storage = _open_storage(args)
    store = CheckpointStore(storage, basename=args.basename)
    names = storage.listdir()
    pattern = re.compile(re.escape(args.basename) + r"-(\d+)\..*$")
    if STATE_FILE in names or any(pattern.fullmatch(n) for n in names):
        try:
            if not any(n.endswith(MANIFEST_SUFFIX) for n in names):  # malformed ones: verify reports them
                store.refuse_foreign()
        except FileExistsError:
            state = store._read_state()
            raise UsageError("%s holds TF checkpoints that rayhooks did not write (latest: %s, no manifests): "
                             "rayhooks reads only its own; read these with tf.train.load_checkpoint(%r)"
                             % (args.url, state.model_checkpoint_path, args.url)) from None
        return store
    hint = "pass the directory the checkpoints were saved to (checkpoint_dir)"
    others = sorted({n[:-len(MANIFEST_SUFFIX)].rsplit("-", 1)[0] for n in names
                     if n.endswith(MANIFEST_SUFFIX) and "-" in n})
    if others:
        hint = "its manifests use basename %s: pass --basename %s" % (", ".join(others), others[0])
    else:
        inside = _checkpoint_dirs_in(storage, names, MANIFEST_SUFFIX)
        if inside:
            hint = "the checkpoints are in %s: pass that" % " or ".join(inside)
    raise UsageError("%s is not a checkpoint directory (no %s-*%s manifests, no %r state file); %s"
                     % (args.url, args.basename, MANIFEST_SUFFIX, STATE_FILE, hint))


def _step_of(store, name: str) -> Optional[int]:
    m = store._pattern.fullmatch(name)
    return int(m.group(1)) if m else None


def _well_formed(info) -> bool:
    """True when every file entry of the manifest has an int size and crc32c (verify needs both)."""
    return isinstance(info.files, dict) and bool(info.files) and all(
        isinstance(name, str) and isinstance(meta, dict)
        and all(isinstance(meta.get(k), int) and not isinstance(meta.get(k), bool) for k in ("bytes", "crc32c"))
        for name, meta in info.files.items())


def _committed(store):
    """(well-formed committed checkpoints, {step: manifest name} of the malformed ones)."""
    from rayhooks.checkpoints import MANIFEST_SUFFIX
    infos = store.committed()
    good = [i for i in infos if _well_formed(i)]
    known = {i.prefix + MANIFEST_SUFFIX for i in good}
    malformed = {}
    for name in store.storage.listdir():
        if name.endswith(MANIFEST_SUFFIX) and store._pattern.fullmatch(name) and name not in known:
            malformed[_step_of(store, name)] = name
    return good, malformed


def _checkpoint_dirs_in(storage, names, manifest_suffix, most=20):
    """URLs of the entries of `storage` that hold manifests (a run's `ckpt` subdirectory, say)."""
    found = []
    for name in sorted(names)[:most]:
        try:
            if any(n.endswith(manifest_suffix) for n in storage.child(name).listdir()):
                found.append(storage.url_of(name))
        except (OSError, ValueError):  # a file, not a directory; or unreadable: no hint from it
            continue
    return found


def _pick(store, args, infos):
    """The checkpoint args.step names, or the latest; UsageError when there is none."""
    if not infos:
        raise UsageError("%s has no committed checkpoints (no %s-*.manifest.json); run `rayhooks ls %s` "
                         "to see its partial files" % (args.url, args.basename, args.url))
    if args.step is None:
        return store.newest(infos)
    for info in infos:
        if info.step == args.step:
            return info
    partial = any(_step_of(store, n) == args.step for n in store.partials())
    raise UsageError("%s has no committed checkpoint at step %d%s; committed steps: %s"
                     % (args.url, args.step, " (only partial, uncommitted files)" if partial else "",
                        ", ".join(str(i.step) for i in infos)))


# -- ls ----------------------------------------------------------------------


def cmd_ls(args) -> int:
    store = _open_store(args)
    infos, malformed = _committed(store)
    partial_steps: Dict[Optional[int], List[str]] = {}
    for name in store.partials():
        partial_steps.setdefault(_step_of(store, name), []).append(name)
    newest = store.newest(infos)
    latest = newest.step if newest else None

    rows = []  # (sort key, cells)
    for info in infos:
        flags = []
        if info.step == latest:
            flags.append("latest")
        if info.preserved:
            flags.append("preserved")
        rows.append(((info.step, 0), [str(info.step), utc_iso(info.timestamp), human_size(info.nbytes),
                                      str(len(info.files)), ", ".join(flags)]))
    for step, names in partial_steps.items():
        sizes = []
        for name in names:
            try:
                sizes.append(store.storage.size(name))
            except FileNotFoundError:  # deleted (committed or collected) since the listing
                pass
        committed_step = step is not None and any(i.step == step for i in infos)
        flag = "partial (temporary leftovers)" if committed_step else "partial (uncommitted)"
        rows.append(((step if step is not None else -1, 1),
                     ["?" if step is None else str(step), "-", human_size(sum(sizes)), str(len(names)), flag]))
    for step, name in malformed.items():
        rows.append(((step, 2), [str(step), "-", "-", "-", "malformed manifest (`rayhooks verify`)"]))
    rows.sort(key=lambda r: r[0])
    header = ["STEP", "TIME (UTC)", "SIZE", "FILES", "STATUS"]
    print(_table([header] + [cells for _, cells in rows], right=(0, 2, 3)))
    n_partial = sum(len(v) for v in partial_steps.values())
    summary = "%s: %d committed checkpoint(s)" % (store.url, len(infos))
    if infos:
        summary += ", latest step %d (%s)" % (latest, newest.url)
    if n_partial:
        summary += ("; %d partial file(s) (`rayhooks gc` removes those older than the latest commit; newer "
                    "ones may belong to a save in flight, and go with `--older-than AGE` once none can be)"
                    % n_partial)
    print(summary)
    claim = store.writer_claim.read()
    if claim is not None:
        from rayhooks.claim import describe
        print("writer: %s" % describe(claim))
    return 0


# -- verify ------------------------------------------------------------------


def cmd_verify(args) -> int:
    from rayhooks.checkpoints import MANIFEST_SUFFIX
    store = _open_store(args)
    infos, malformed = _committed(store)
    if args.step is not None:
        if args.step in malformed:
            infos, unreadable = [], [malformed[args.step]]
        else:
            infos, unreadable = [_pick(store, args, infos)], []
    else:
        unreadable = [malformed[k] for k in sorted(malformed)]
        if not infos and not unreadable:
            raise UsageError("%s has no committed checkpoints (no %s-*%s); nothing to verify"
                             % (args.url, args.basename, MANIFEST_SUFFIX))
    bad = 0
    for info in infos:
        problems = store.verify(info)
        status = "BAD" if problems else "OK"
        print("%-3s  step %d  %s  (%d files, %s)" % (status, info.step, info.url, len(info.files),
                                                    human_size(info.nbytes)))
        for problem in problems:
            print("     - %s" % problem)
        bad += bool(problems)
    unreadable = [n for n in unreadable if store.storage.exists(n)]  # not dropped by retention since
    for name in unreadable:
        print("BAD  step %s  %s  (manifest unreadable or malformed)"
              % (_step_of(store, name), store.storage.url_of(name)))
        bad += 1
    total = len(infos) + len(unreadable)
    print("%d checkpoint(s) verified: %d OK, %d BAD" % (total, total - bad, bad))
    return 1 if bad else 0


# -- gc ----------------------------------------------------------------------


def _modified(storage, name: str) -> Optional[float]:
    """When `name` was last written, by the store's own clock; None when the store cannot say."""
    try:
        return storage.call("stat", name, storage.fs.modified, storage._path(name)).timestamp()
    except (NotImplementedError, FileNotFoundError):
        return None


def cmd_gc(args) -> int:
    from rayhooks.checkpoints import MANIFEST_SUFFIX, STATE_FILE
    store = _open_store(args)
    infos = store.committed()
    latest = infos[-1] if infos else None
    # A partial written after the newest commit may belong to a save in flight, whatever its
    # step: a run resumed below a damaged checkpoint saves steps under that checkpoint's.
    commit_times = [_modified(store.storage, i.prefix + MANIFEST_SUFFIX) for i in infos]
    newest_commit = max((t for t in commit_times if t is not None), default=None)
    # --older-than: the user's word that no save has been in flight that long (a crashed run never
    # resumed leaves its last saves' files newer than any commit, or in a directory with none).
    cutoff = None if args.older_than is None else time.time() - args.older_than
    doomed, kept = [], []
    for name in store.partials():
        step = _step_of(store, name)
        state_temporary = name.startswith(STATE_FILE + ".tmp-")  # a state file write cut short
        written = _modified(store.storage, name)
        if latest is not None and (state_temporary or step is not None and step < latest.step):
            if newest_commit is not None and written is not None and written < newest_commit:
                doomed.append(name)
                continue
            why = "written since the newest commit"
        else:
            why = ("no committed checkpoint yet" if latest is None else
                   "unknown step" if step is None else "newer than the latest commit")
        if cutoff is not None and written is not None and written < cutoff:
            doomed.append(name)
        else:
            kept.append((name, why))
    # S3 multipart uploads left open (their abort could not reach S3): the same rule, by when begun.
    uploads, uploads_kept = [], []
    for name, upload_id, begun in store.storage.open_uploads():
        step = _step_of(store, name)
        if latest is not None and step is not None and step < latest.step and \
                newest_commit is not None and begun < newest_commit or cutoff is not None and begun < cutoff:
            uploads.append((name, upload_id))
        else:
            uploads_kept.append(name)
    url_of = store.storage.url_of
    for name in doomed:
        print("%-12s  %s" % ("delete" if args.yes else "would delete", url_of(name)))
    for name, _ in uploads:
        print("%-12s  %s  (an unfinished upload)" % ("abort" if args.yes else "would abort", url_of(name)))
    for name, why in kept:
        print("%-12s  %s  (possibly in flight, kept: %s)" % ("keep", url_of(name), why))
    for name in uploads_kept:
        print("%-12s  %s  (an unfinished upload, possibly in flight)" % ("keep", url_of(name)))
    uploads_note = " and %d unfinished upload(s)" % len(uploads) if uploads else ""
    if (kept or uploads_kept) and args.older_than is None:
        print("(files kept as possibly in flight that a crashed run left behind go with --older-than AGE, "
              "e.g. `%s gc %s --older-than 1d`)" % (PROG, store.url))
    if not doomed and not uploads:
        print("nothing to delete in %s (%d partial file(s)%s kept)"
              % (store.url, len(kept), " and %d unfinished upload(s)" % len(uploads_kept) if uploads_kept else ""))
        return 0
    if not args.yes:
        print("dry run: %d partial file(s)%s would be deleted; rerun with --yes to delete them"
              % (len(doomed), uploads_note))
        return 0
    with _progress(args, total=len(doomed) + len(uploads), desc="deleting", unit="file") as bar:
        for name in doomed:
            store.storage.delete([name])
            bar.update(1)
        for name, upload_id in uploads:
            store.storage.abort_upload(name, upload_id)
            bar.update(1)
    print("deleted %d partial file(s)%s from %s" % (len(doomed), uploads_note, store.url))
    return 0


# -- restore -----------------------------------------------------------------


def _safe_name(url: str, name: str) -> str:
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise UsageError("%s: the manifest names a file %r outside the checkpoint directory; "
                         "refusing to restore it" % (url, name))
    return name


def cmd_restore(args) -> int:
    from rayhooks.checkpoints import MANIFEST_SUFFIX, STATE_FILE
    from rayhooks.formats import state_file

    store = _open_store(args)
    infos, malformed = _committed(store)
    if args.step is not None and args.step in malformed:
        print("BAD  step %d  %s  (manifest unreadable or malformed): not restored"
              % (args.step, store.storage.url_of(malformed[args.step])))
        return 1
    if args.step is None and not infos and malformed:
        print("BAD  %s: every manifest is unreadable or malformed (see `rayhooks verify`); nothing restored"
              % store.url)
        return 1
    info = _pick(store, args, infos)
    newer = [k for k in malformed if k is not None and k > info.step]
    if args.step is None and newer:
        _warn("%s: the manifest of step %d is malformed (see `rayhooks verify`); restoring step %d"
              % (args.url, max(newer), info.step))
    to = args.to[len("file://"):] if args.to.startswith("file://") else args.to
    if "://" in to:
        raise UsageError("--to %s is not a local directory: restore downloads a checkpoint for TensorFlow to "
                         "read from local disk (its readers do not speak every URL); pass a path" % args.to)
    dest = os.path.abspath(os.path.expanduser(to))
    if os.path.exists(dest) and not os.path.isdir(dest):
        raise UsageError("--to %s is a file; pass a directory to restore into" % args.to)
    src_root = store.storage.local_root
    if src_root is not None and os.path.isdir(dest) and os.path.samefile(src_root, dest):
        raise UsageError("--to %s is the checkpoint directory itself; pass another directory" % args.to)
    _refuse_foreign_destination(args.to, dest)
    os.makedirs(dest, exist_ok=True)

    # Without --step, as a session resumes: the newest checkpoint whose files check out.
    if args.step is not None:
        candidates = [info]
    else:
        first = store.newest(infos)
        # Then older steps, newest first; steps the state file passed over (a damaged one's) last.
        candidates = [first] + sorted((i for i in infos if i is not first),
                                      key=lambda i: (i.step < first.step, i.step), reverse=True)
    for n, info in enumerate(candidates):
        problems = _download(args, store, info, dest)
        if not problems:
            break
        print("BAD  step %d  %s: not restored" % (info.step, info.url))
        for problem in problems:
            print("     - %s" % problem)
        if n + 1 < len(candidates):
            after = candidates[n + 1].step
            _warn("%s: step %d is damaged (see `rayhooks verify`); trying step %d%s"
                  % (args.url, info.step, after, ", the newest before it" if after < info.step else ""))
    else:
        return 1
    names = sorted(info.files)
    manifest_name = info.prefix + MANIFEST_SUFFIX
    # The manifest too, so that `rayhooks ls/verify DIR` work on the copy.
    _write_local(os.path.join(dest, manifest_name), store.storage.read_bytes(manifest_name))
    state = state_file.CheckpointState(model_checkpoint_path=info.prefix,
                                       all_model_checkpoint_paths=[info.prefix],
                                       all_model_checkpoint_timestamps=[info.timestamp])
    _write_local(os.path.join(dest, STATE_FILE), state_file.format_state(state).encode())
    print("restored step %d (%d files, %s, checksums OK) from %s to %s"
          % (info.step, len(names), human_size(info.nbytes), info.url, os.path.join(dest, info.prefix)))
    return 0


def _download(args, store, info, dest) -> List[str]:
    """Copies `info`'s files into `dest`, checking each one's checksum as it streams; returns the problems.

    Files land under their names only when all of them check out.
    """
    from rayhooks.checkpoints import MANIFEST_SUFFIX
    names = [_safe_name(store.url, n) for n in sorted(info.files)]
    _safe_name(store.url, info.prefix + MANIFEST_SUFFIX)
    tag = uuid.uuid4().hex[:12]
    staged, problems = [], []
    try:
        for name in names:
            meta = info.files[name]
            tmp = os.path.join(dest, "%s.tmp-%s" % (name, tag))
            staged.append((tmp, os.path.join(dest, name)))
            with _progress(args, total=meta["bytes"], desc=name, unit="B", unit_scale=True,
                           unit_divisor=1024, leave=False) as bar:
                try:
                    found, size = store.storage.crc32c(name, bar.update, copy_to=tmp)
                except FileNotFoundError:
                    problems.append("%s is missing" % store.storage.url_of(name))
                    continue
            if size != meta["bytes"] or found != meta["crc32c"]:
                problems.append("%s: expected %d bytes crc32c %08x, found %d bytes crc32c %08x"
                                % (store.storage.url_of(name), meta["bytes"], meta["crc32c"], size, found))
        if not problems:
            for tmp, final in staged:
                os.replace(tmp, final)
            staged = []
    finally:
        for tmp, _ in staged:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
    return problems


def _refuse_foreign_destination(to: str, dest: str) -> None:
    """UsageError if `dest` holds TF checkpoints rayhooks did not write: restore would replace
    their `checkpoint` state file, and `rayhooks gc` would then take them for stale partials."""
    from rayhooks.checkpoints import MANIFEST_SUFFIX, CheckpointStore
    from rayhooks.storage import Storage
    if not os.path.isdir(dest) or any(n.endswith(MANIFEST_SUFFIX) for n in os.listdir(dest)):
        return  # new, or written by rayhooks (an earlier restore, whatever its basename)
    try:
        CheckpointStore(Storage(dest)).refuse_foreign()
    except FileExistsError:
        raise UsageError("--to %s holds TF checkpoints that rayhooks did not write (named by its `checkpoint` "
                         "state file), which restoring would replace; pass a new or empty directory"
                         % to) from None


def _write_local(path: str, data: bytes) -> None:
    tmp = "%s.tmp-%s" % (path, uuid.uuid4().hex[:12])
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


# -- summaries ---------------------------------------------------------------


def _events_files(storage, run: str = ".") -> List[Tuple[str, object, str]]:
    """(run, storage, file name) of every events file in the directory and its subdirectories.

    Every level, as TensorBoard searches (`runs/evaluate/eval` is run `evaluate/eval`).
    """
    fs, root = storage.fs, storage._path("")
    found = []
    entries = storage.call("list", "", fs.ls, root, detail=True)
    for entry in sorted(entries, key=lambda e: e["name"]):
        if entry["name"].rstrip("/") == root.rstrip("/"):
            continue  # an object store's placeholder of the directory itself
        name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
        if entry.get("type") == "directory":
            found += _events_files(storage.child(name), name if run == "." else run + "/" + name)
        elif "tfevents" in name:
            found.append((run, storage, name))
    return found


def _scalar_of(value) -> Optional[float]:
    """The number in a Summary.Value holding a scalar, else None."""
    kind = value.WhichOneof("value")
    if kind == "simple_value":
        return float(value.simple_value)
    if kind != "tensor":
        return None
    plugin = value.metadata.plugin_data.plugin_name
    if plugin not in ("", "scalars"):
        return None
    from tensorboard.util import tensor_util
    try:
        array = tensor_util.make_ndarray(value.tensor)
    except Exception:  # an unsupported dtype: not a scalar we can print
        return None
    if array.size != 1 or array.dtype.kind not in "biuf":
        return None
    return float(array.reshape(()))


def cmd_summaries(args) -> int:
    from google.protobuf.message import DecodeError
    from tensorboard.compat.proto import event_pb2
    from rayhooks.formats.events import read_records

    if args.plot:
        parent = os.path.dirname(os.path.abspath(args.plot))
        if not os.path.isdir(parent):
            raise UsageError("--plot %s: directory %s does not exist; create it or pick another path"
                             % (args.plot, parent))
    storage = _open_storage(args)
    files = _events_files(storage)
    if not files:
        raise UsageError("%s has no events files (*tfevents*) in it or its subdirectories; pass the "
                         "summary_dir (or checkpoint_dir) of the run" % args.url)
    series: Dict[Tuple[str, str], List[Tuple[int, float, float]]] = {}
    for run, where, name in files:
        with where.open_read(name) as f:
            try:
                for record in read_records(f):
                    try:
                        event = event_pb2.Event.FromString(record)
                    except DecodeError:
                        _warn("%s: skipping an undecodable record" % where.url_of(name))
                        continue
                    if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
                        # A restart: as TensorBoard does, drop what the run had logged at
                        # this step or later (the orphans of the job that died).
                        for key, points in series.items():
                            if key[0] == run:
                                points[:] = [p for p in points if p[0] < event.step]
                        continue
                    if not event.HasField("summary"):
                        continue
                    for value in event.summary.value:
                        number = _scalar_of(value)
                        if number is not None:
                            series.setdefault((run, value.tag), []).append(
                                (event.step, number, event.wall_time))
            except ValueError as e:  # a torn tail: the file is still being written
                _warn("%s: %s; using the records before it" % (where.url_of(name), e))
    series = {key: points for key, points in series.items() if points}
    if not series:
        print("no scalar summaries in %d events file(s) under %s" % (len(files), storage.url))
        if args.plot:
            raise UsageError("%s has no scalar summaries to plot" % args.url)
        return 0
    rows = [["RUN", "TAG", "STEP", "VALUE", "TIME (UTC)"]]
    for (run, tag), points in sorted(series.items()):
        step, number, wall = points[-1]
        rows.append([run, tag, str(step), "%.7g" % number, utc_iso(wall)])
    print(_table(rows, right=(2, 3)))
    if args.plot:
        _plot(series, args.plot, storage.url)
        print("wrote %s (%d tag(s))" % (args.plot, len({t for _, t in series})))
    return 0


def _plot(series, path: str, title: str) -> None:
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("--plot needs matplotlib (%s); pip install matplotlib or rayhooks[plot]" % e) from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tags = sorted({tag for _, tag in series})
    runs = sorted({run for run, _ in series})
    fig, axes = plt.subplots(len(tags), 1, figsize=(8, 2.6 * len(tags)), squeeze=False, sharex=False)
    try:
        for ax, tag in zip(axes[:, 0], tags):
            for run in runs:
                points = series.get((run, tag))
                if points:
                    ax.plot([p[0] for p in points], [p[1] for p in points],
                            marker="." if len(points) < 50 else None, label=run)
            ax.set_title(tag)
            ax.set_xlabel("step")
            ax.grid(True, alpha=0.3)
            if len(runs) > 1:
                ax.legend(fontsize="small")
        fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)


# -- entry point -------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--storage-option", metavar="KEY=VALUE", type=_storage_option, action="append",
                        default=[], help="an fsspec storage option, repeatable; VALUE is parsed as JSON "
                                         "when it can be (e.g. token=anon, use_ssl=false)")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    ckpt = argparse.ArgumentParser(add_help=False)
    ckpt.add_argument("url", metavar="URL", help="the checkpoint directory (gs://, s3://, memory://, file:// "
                                                 "or a local path)")
    ckpt.add_argument("--basename", default="model.ckpt",
                      help="the checkpoints' basename (checkpoint_basename), default: %(default)s")

    parser = argparse.ArgumentParser(prog=PROG, description="Inspect, verify, clean up and restore rayhooks "
                                     "checkpoints, and read TensorBoard scalars, on any fsspec URL.",
                                     epilog="Exit codes: 0 ok, 1 a check failed, 2 bad input.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("ls", parents=[common, ckpt], help="list the checkpoints in a directory",
                       description="List committed checkpoints (step, UTC time, size, files), flag partial "
                                   "(uncommitted) files and mark the latest.")
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser("verify", parents=[common, ckpt], help="check the checkpoints' crc32c checksums",
                       description="Check every file of every committed checkpoint (or of --step) against "
                                   "the size and crc32c its manifest records. Exit code 1 if any is BAD.")
    p.add_argument("--step", type=_step_arg, help="verify only this step")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("gc", parents=[common, ckpt], help="delete stale partial checkpoint files",
                       description="Delete the uncommitted (partial) files of steps older than the newest "
                                   "commit, written before it; on S3, abort such steps' unfinished multipart "
                                   "uploads too. Other partial files may belong to a save in flight and are "
                                   "kept, unless --older-than says no save has been in flight that long. "
                                   "A dry run unless --yes.")
    p.add_argument("--yes", action="store_true", help="really delete (default: only list)")
    p.add_argument("--older-than", metavar="AGE", type=_age_arg,
                   help="also delete partial files (and abort uploads) of any step last written longer ago "
                        "than AGE (90s, 30m, 12h, 2d): the leftovers of a crashed run that was never resumed. "
                        "Only safe when no run has had a save in flight that long; ages are read from the "
                        "store's clock against this machine's")
    p.set_defaults(func=cmd_gc)

    p = sub.add_parser("restore", parents=[common, ckpt], help="download a checkpoint to a local directory",
                       description="Download a committed checkpoint into a local directory, verify its "
                                   "checksums and write a TF `checkpoint` state file there, so that "
                                   "tf.train.latest_checkpoint(DIR) returns it.")
    p.add_argument("--step", type=_step_arg, help="the step to restore (default: the latest)")
    p.add_argument("--to", required=True, metavar="DIR", help="local directory to restore into")
    p.set_defaults(func=cmd_restore)

    p = sub.add_parser("summaries", parents=[common], help="last value of each scalar summary",
                       description="Read the events files in URL and its subdirectories and print the last "
                                   "step and value of each scalar tag.")
    p.add_argument("url", metavar="URL", help="the summary directory (usually the checkpoint_dir)")
    p.add_argument("--plot", metavar="OUT.png", help="also plot every scalar tag against step into this PNG")
    p.set_defaults(func=cmd_summaries)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2), already printed by argparse
        return e.code if isinstance(e.code, int) else 2
    # Warnings of the storage libraries (gcsfs logs each exhausted retry with its traceback)
    # as one line each; the error itself is reported once, below.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLineFormatter())
    handler.setLevel(logging.WARNING)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        return args.func(args)
    except UsageError as e:
        return _fail(str(e))
    except (ValueError, FileNotFoundError, PermissionError, ImportError, OSError) as e:
        return _fail(_describe(args, e))
    except KeyboardInterrupt:
        print("%s: interrupted" % PROG, file=sys.stderr)
        return 130
    finally:
        root.removeHandler(handler)


class _OneLineFormatter(logging.Formatter):
    def format(self, record):
        return "%s: warning: %s" % (PROG, " ".join(record.getMessage().split()))


def _describe(args, exc: BaseException) -> str:
    msg = str(exc) or type(exc).__name__
    url = getattr(args, "url", "")
    to, filename = getattr(args, "to", None), getattr(exc, "filename", None)
    if to and isinstance(filename, str):
        dest = os.path.abspath(os.path.expanduser(to[len("file://"):] if to.startswith("file://") else to))
        if os.path.abspath(filename) == dest or os.path.abspath(filename).startswith(dest + os.sep):
            # The local destination failed, not the checkpoint's URL.
            return "--to %s: %s; check that this process can make and write that directory" % (to, msg)
    if url and url not in msg:
        msg = "%s: %s" % (url, msg)
    if isinstance(exc, PermissionError):
        msg += "; check this process's credentials (--storage-option) and the permissions"
    elif isinstance(exc, FileNotFoundError):
        msg += "; check the URL"
    return msg


def _warn(message: str) -> None:
    print("%s: warning: %s" % (PROG, message), file=sys.stderr)


def _fail(message: str) -> int:
    line = " ".join(message.split())  # one line, whatever the message held
    print("%s: error: %s" % (PROG, line), file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
