"""Checkpoints on storage: write, commit, list, verify, restore, retain.

The commit protocol (DESIGN I2, "never a torn latest"):

    check the writer claim (`rayhooks.claim`)             # another run took over: stop
    write prefix.data-00000-of-00001 and prefix.index    # any order, retried
    check the claim; write prefix.manifest.json; check   # the commit point (withdrawn if taken over)
    rewrite `checkpoint` (TF's state file)                # names committed ones only
    delete what retention drops: manifest first, then data

A checkpoint is committed exactly when its manifest exists: object stores
have no atomic rename, but a single object is written whole or not at all.
The manifest records each file's size and crc32c, so restore can prove what
it reads. Everything without a manifest is a partial: readers never see it,
and `collect_partials` deletes the ones older than the newest commit.
"""

import dataclasses
import io
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import weakref
from typing import Dict, List, Optional

from rayhooks import progress
from rayhooks.claim import DirectoryTakenOver, WriterClaim
from rayhooks.formats import bundle, state_file
from rayhooks.storage import Storage

logger = logging.getLogger("rayhooks")

STATE_FILE = "checkpoint"
MANIFEST_SUFFIX = ".manifest.json"
LISTENERS_SUFFIX = ".after_save"
_TEMPORARY = re.compile(r".*\.tmp-[0-9a-f]{12}")  # a local write's temporary (Storage names them so)
MANIFEST_FORMAT = "rayhooks.checkpoint/1"
_SHARD = re.compile(r".*\.worker(\d+)\.index")  # a launch worker's own shard (all_workers_write)


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    """One committed checkpoint, as its manifest describes it."""

    step: int
    prefix: str          # e.g. "model.ckpt-100", relative to the directory
    url: str             # the full prefix URL, what TF calls the checkpoint path
    files: Dict[str, dict]
    timestamp: float
    preserved: bool = False

    @property
    def nbytes(self) -> int:
        return sum(f["bytes"] for f in self.files.values())


class RetentionPolicy:
    """Which committed checkpoints to keep, like `tf.train.CheckpointManager`.

    `max_to_keep=None` keeps every one; so does 0, as in TF1's `Saver` and Estimator's
    `RunConfig(keep_checkpoint_max=0)` (`CheckpointManager` refuses 0).
    """

    def __init__(self, max_to_keep: Optional[int] = 5, keep_checkpoint_every_n_hours: Optional[float] = None):
        if max_to_keep is not None and max_to_keep < 0:
            raise ValueError("max_to_keep must be >= 1, or None or 0 (keep all), got %r" % (max_to_keep,))
        if keep_checkpoint_every_n_hours is not None and not keep_checkpoint_every_n_hours > 0:
            raise ValueError("keep_checkpoint_every_n_hours must be > 0 hours, or None (keep none extra), got %r"
                             % (keep_checkpoint_every_n_hours,))
        self.max_to_keep = max_to_keep or None
        self.keep_every_secs = None if keep_checkpoint_every_n_hours is None else keep_checkpoint_every_n_hours * 3600

    def split(self, infos: List[CheckpointInfo], last_preserved: float):
        """Returns (kept, preserved_forever, dropped, new last_preserved); infos oldest first."""
        if self.max_to_keep is None or len(infos) <= self.max_to_keep:
            return infos, [], [], last_preserved
        cut = len(infos) - self.max_to_keep
        kept, preserved, dropped = infos[cut:], [], []
        for info in infos[:cut]:
            if self.keep_every_secs is not None and info.timestamp - last_preserved >= self.keep_every_secs:
                preserved.append(info)
                last_preserved = info.timestamp
            else:
                dropped.append(info)
        return kept, preserved, dropped, last_preserved


class CheckpointStore:
    """The checkpoints under one directory URL. Constructing one does no I/O."""

    def __init__(self, storage: Storage, basename: str = "model.ckpt",
                 retention: Optional[RetentionPolicy] = None, clock=time.time):
        if not isinstance(basename, str) or not basename or "/" in basename or "\\" in basename \
                or basename in (".", ".."):
            raise ValueError("checkpoint_basename must be a file name (no '/'), got %r; put directories in "
                             "checkpoint_dir" % (basename,))
        self.storage = storage
        self.basename = basename
        self.retention = retention or RetentionPolicy()
        self._clock = clock
        self._pattern = re.compile(re.escape(basename) + r"-(\d+)(\..*)$")
        self.writer_claim = WriterClaim(storage, basename)

    # -- the one writer (see `rayhooks.claim`) ------------------------------------

    def claim(self, token: Optional[str] = None, restarted: bool = False) -> None:
        """Makes this store the directory's writer; see `WriterClaim.take`."""
        self.writer_claim.take(token, restarted)

    def release(self, ended: str = "finished") -> None:
        """Gives the directory up at the end of a run; see `WriterClaim.release`."""
        self.writer_claim.release(ended)

    def check_claim(self, step: int) -> None:
        """Raises `DirectoryTakenOver` if another run claimed the directory since this store did."""
        self.writer_claim.check(step)

    @property
    def url(self) -> str:
        return self.storage.url

    def prefix_for(self, step: int) -> str:
        return "%s-%d" % (self.basename, step)

    # -- writing --------------------------------------------------------------

    def write_data(self, step: int, tensors, prefix: Optional[str] = None, on_bytes=None) -> Dict[str, dict]:
        """Persists the tensors of `step` as one TF bundle; returns per-file size and crc32c.

        `prefix` names a per-worker shard; by default the checkpoint's own prefix.
        `on_bytes(n)` hears of the data bytes as they are written (a retried write counts again).
        """
        # Before, too: a run taken over must not write over the files of a step the run that
        # took over may have committed under the same names (its own commit would fail later).
        self.check_claim(step)
        prefix = prefix or self.prefix_for(step)
        data_name = bundle.data_filename(prefix)
        index_name = bundle.index_filename(prefix)

        def produce(fileobj):
            index = io.BytesIO()
            stats = _write(progress.CountingWriter(fileobj, on_bytes) if on_bytes else fileobj, index, tensors)
            return index.getvalue(), stats

        index_bytes, stats = self.storage.write_with(data_name, produce, fresh=True)
        self.storage.write_bytes(index_name, index_bytes)
        return {data_name: {"bytes": stats["data_bytes"], "crc32c": stats["data_crc32c"]},
                index_name: {"bytes": stats["index_bytes"], "crc32c": stats["index_crc32c"]}}

    def commit(self, step: int, files: Dict[str, dict], extra: Optional[dict] = None) -> CheckpointInfo:
        """Makes `step` the latest checkpoint, then applies retention."""
        prefix = self.prefix_for(step)
        now = self._clock()
        manifest = {"format": MANIFEST_FORMAT, "step": int(step), "prefix": prefix,
                    "timestamp": now, "files": files}
        if extra:
            manifest.update(extra)
        # On a local disk a file's fsync keeps its bytes but not its name: the data files' names
        # are made durable before the manifest can be, and the manifest's before after_save runs.
        self.storage.sync_directory()
        self.check_claim(step)
        self.storage.write_bytes(prefix + MANIFEST_SUFFIX, json.dumps(manifest, indent=1).encode())
        self.storage.sync_directory()
        # Again once the manifest is there: a run that claimed the directory in between may
        # have listed the checkpoints before it. The manifest is withdrawn then (its files are
        # partials again): a checkpoint of a run taken over must not be resumed from later.
        try:
            self.check_claim(step)
        except DirectoryTakenOver:
            try:
                self.storage.delete([prefix + MANIFEST_SUFFIX])
            except Exception as e:  # noqa: BLE001 -- reported with the error below
                logger.error("[step=%d] could not withdraw the manifest of %s: %s", step, prefix, e)
            raise
        info = CheckpointInfo(step, prefix, self.storage.url_of(prefix), files, now)
        self._retain(info)
        return info

    def _retain(self, newest: CheckpointInfo) -> None:
        # Oldest first, as CheckpointManager orders by save time. A checkpoint of a higher step
        # than the one just committed belongs to a run resumed below it (it did not verify): it
        # counts as the oldest, and the one just committed is the latest, for TF's readers too.
        infos = sorted((i for i in self.committed() if not i.preserved),
                       key=lambda i: (i.step <= newest.step, i.step))
        old = self._read_state()
        last_preserved = old.last_preserved_timestamp if old is not None else \
            (infos[0].timestamp if infos else newest.timestamp)
        kept, preserved, dropped, last_preserved = self.retention.split(infos, last_preserved)
        for info in preserved:  # kept forever, and off the list, as CheckpointManager does
            manifest = json.loads(self.storage.read_bytes(info.prefix + MANIFEST_SUFFIX))
            manifest["preserved"] = True
            self.storage.write_bytes(info.prefix + MANIFEST_SUFFIX, json.dumps(manifest, indent=1).encode())
        state = state_file.CheckpointState(
            model_checkpoint_path=kept[-1].prefix,
            all_model_checkpoint_paths=[i.prefix for i in kept],
            all_model_checkpoint_timestamps=[i.timestamp for i in kept],
            last_preserved_timestamp=last_preserved)
        # The checkpoint is committed by now (its manifest is written): the state file is for
        # TF's readers, and clearing old files is housekeeping; a failure in either must not
        # turn a good save into a failed one.
        try:
            self.storage.write_bytes(STATE_FILE, state_file.format_state(state).encode())
        except Exception as e:  # noqa: BLE001 -- logged; the next commit writes it again
            logger.error("[step=%d] committed, but TF's `checkpoint` state file in %s could not be updated "
                         "(%s): rayhooks resumes from step %d all the same, while plain TF's "
                         "tf.train.latest_checkpoint names an older checkpoint until a later commit rewrites "
                         "the file; old checkpoints are kept until then", newest.step, self.url, e, newest.step)
            return  # the old state file may name what retention would delete
        try:
            for info in dropped:  # the manifest goes first: a half-deleted checkpoint is then a partial
                self.storage.delete([info.prefix + MANIFEST_SUFFIX])
                self.storage.delete(sorted(info.files) + [info.prefix + LISTENERS_SUFFIX])
            self.collect_partials(before=newest.step)
        except Exception as e:  # noqa: BLE001 -- logged; `rayhooks gc` finishes the job later
            logger.warning("[step=%d] committed, but old or partial files could not be removed: %s; "
                           "`rayhooks gc %s` removes partial files later", newest.step, e, self.url)

    def refuse_foreign(self) -> None:
        """Raises if the directory holds TF checkpoints that rayhooks did not write.

        rayhooks would otherwise ignore them (they have no manifest) and, at its
        first commit, rewrite the `checkpoint` state file that names them.
        """
        if self.committed():
            return
        state = self._read_state()
        if state is None:
            return
        # TF1's Saver (and so Estimator and MonitoredTrainingSession) writes absolute paths
        # (or URLs); any checkpoint named there whose files lie in this directory counts.
        theirs = [p for p in state.all_model_checkpoint_paths or [state.model_checkpoint_path]
                  if self.storage.exists(bundle.index_filename(p.rstrip("/").rsplit("/", 1)[-1]))]
        if theirs:
            raise FileExistsError(
                "%s holds TF checkpoints that rayhooks did not write (latest: %s) and that it would "
                "not touch; train into a new checkpoint_dir, and start from the old weights with "
                "tf.train.Checkpoint(...).restore(tf.train.latest_checkpoint(%r)) before training"
                % (self.url, theirs[-1], self.url))

    def mark_listeners_started(self, step: int, on_write_error: str = "raise") -> None:
        """Records that after_save(step) is being dispatched, before it runs (at most once, I3).

        Under `on_write_error="retry_next_save"` a failed write is logged, not raised: the
        checkpoint is committed, only the marker a restarted Ray chief reads is missing.
        """
        try:
            self.storage.write_bytes(self.prefix_for(step) + LISTENERS_SUFFIX, b"")
        except OSError as e:
            if on_write_error != "retry_next_save":
                raise
            logger.error("[step=%d] committed, but its after_save marker could not be written (%s); training "
                         "goes on (on_write_error='retry_next_save')", step, e)

    def listeners_started(self, step: int) -> bool:
        return self.storage.exists(self.prefix_for(step) + LISTENERS_SUFFIX)

    # -- reading --------------------------------------------------------------

    def committed(self) -> List[CheckpointInfo]:
        """Committed checkpoints, oldest first. Unreadable manifests are skipped with a warning."""
        infos = (self.read_manifest(name) for name in self.manifest_names())
        return sorted((info for info in infos if info is not None), key=lambda i: i.step)

    def latest(self) -> Optional[CheckpointInfo]:
        """The committed checkpoint of the highest step, reading manifests from the newest until one parses."""
        names = self.manifest_names()
        for name in sorted(names, key=lambda n: int(self._pattern.fullmatch(n).group(1)), reverse=True):
            info = self.read_manifest(name)
            if info is not None:
                return info
        return None

    def newest(self, infos: List[CheckpointInfo]) -> Optional[CheckpointInfo]:
        """Of `infos` (committed checkpoints), the newest, as far as the manifests and TF's state file tell.

        The highest step, as a session tries it first, except where the state file names a
        checkpoint committed later than every higher one: a run resumed below a damaged
        checkpoint commits lower steps, and names them there. Clock-free where it matters:
        machines' clocks are compared only when the state file lags (its write failed).
        """
        if not infos:
            return None
        state = self._read_state()
        named = None
        if state is not None and state.model_checkpoint_path:
            prefix = state.model_checkpoint_path.rstrip("/").rsplit("/", 1)[-1]
            named = next((i for i in infos if i.prefix == prefix), None)
        if named is None:
            return max(infos, key=lambda i: i.step)
        later = [i for i in infos if i.step > named.step and i.timestamp >= named.timestamp]
        return max(later, key=lambda i: i.step) if later else named

    def manifest_names(self) -> List[str]:
        """The names of the manifests in the directory (of this basename), one per committed checkpoint."""
        return [name for name in self.storage.listdir()
                if name.endswith(MANIFEST_SUFFIX) and self._pattern.fullmatch(name)]

    def read_manifest(self, name) -> Optional[CheckpointInfo]:
        """The checkpoint a manifest describes; None if it is gone, or malformed (with a warning)."""
        try:
            manifest = json.loads(self.storage.read_bytes(name))
            if manifest.get("format") != MANIFEST_FORMAT:
                raise ValueError("format %r" % manifest.get("format"))
            _check_files(manifest["files"])
            return CheckpointInfo(int(manifest["step"]), manifest["prefix"], self.storage.url_of(manifest["prefix"]),
                                  dict(manifest["files"]), float(manifest["timestamp"]),
                                  bool(manifest.get("preserved", False)))
        except FileNotFoundError:
            return None  # deleted by retention between list and read
        except (ValueError, KeyError, TypeError) as e:
            logger.warning("ignoring malformed manifest %s: %s", self.storage.url_of(name), e)
            return None

    def get(self, step: int) -> Optional[CheckpointInfo]:
        for info in self.committed():
            if info.step == step:
                return info
        return None

    def _read_state(self):
        try:
            text = self.storage.read_bytes(STATE_FILE).decode()
        except FileNotFoundError:
            return None
        try:
            return state_file.parse_state(text, self.storage.url_of(STATE_FILE))
        except ValueError as e:
            logger.warning("%s; it will be rewritten at the next commit", e)
            return None

    def partials(self) -> List[str]:
        """Files of this basename that belong to no checkpoint with a manifest.

        A step whose manifest exists but does not parse is not a partial: it
        is reported as malformed and never deleted by garbage collection.
        """
        names = self.storage.listdir()
        committed = {name[:-len(MANIFEST_SUFFIX)] for name in names if name.endswith(MANIFEST_SUFFIX)}
        out = []
        for name in names:
            m = self._pattern.fullmatch(name)
            if m and "%s-%s" % (self.basename, m.group(1)) not in committed:
                out.append(name)
            elif _TEMPORARY.fullmatch(name) and (name.startswith(self.basename)
                                                 or name.startswith(STATE_FILE + ".tmp-")):
                out.append(name)  # a local write cut short before its rename
        return out

    def collect_partials(self, before: Optional[int] = None) -> List[str]:
        """Deletes partial files of steps below `before` (default: the highest committed step).

        Partial files of later steps may belong to saves still in flight. A commit
        passes its own step: a run resumed below a damaged checkpoint writes steps
        under that checkpoint's, and those must not be taken for stale.
        """
        if before is None:
            latest = self.latest()
            if latest is None:
                return []
            before = latest.step

        def stale(name):
            m = self._pattern.fullmatch(name)
            return bool(m) and int(m.group(1)) < before

        doomed = [name for name in self.partials()
                  # a state file's temporary: the commit that wrote it is over
                  if stale(name) or name.startswith(STATE_FILE + ".tmp-")]
        self.storage.delete(doomed)
        self.storage.abort_uploads(stale)  # S3 uploads left open when their own abort could not get through
        return doomed

    # -- verification and restore ---------------------------------------------

    def verify(self, info: CheckpointInfo, on_bytes=None, copy_to: Optional[Dict[str, str]] = None) -> List[str]:
        """Returns the problems found in `info`'s files (empty when every checksum matches).

        `copy_to` maps file names to local paths: those files are downloaded as they are checked.
        """
        problems = (self.check_file(name, meta, on_bytes, (copy_to or {}).get(name))
                    for name, meta in sorted(info.files.items()))
        return [problem for problem in problems if problem is not None]

    def check_file(self, name: str, meta: dict, on_bytes=None, copy_to: Optional[str] = None) -> Optional[str]:
        """The problem with one file of a manifest's table (`meta`: its bytes and crc32c), or None.

        `copy_to`: a local path the file is downloaded to as it is checked.
        """
        try:
            crc, size = self.storage.crc32c(name, on_bytes, copy_to)
        except FileNotFoundError:
            return "%s is missing" % self.storage.url_of(name)
        if size != meta["bytes"] or crc != meta["crc32c"]:
            return ("%s: expected %d bytes crc32c %08x, found %d bytes crc32c %08x"
                    % (self.storage.url_of(name), meta["bytes"], meta["crc32c"], size, crc))
        return None

    def reader(self, info: CheckpointInfo, worker: Optional[int] = None, on_bytes=None) -> "CheckpointReader":
        """Reads `info`; with `worker`, that worker's own shard where the checkpoint has one.

        A checkpoint with no worker shards (only worker 0 wrote) reads the same for
        every worker; one with shards but not this worker's is refused.
        """
        prefix = info.prefix
        if worker:
            shard = "%s.worker%d" % (info.prefix, worker)
            if bundle.index_filename(shard) in info.files:
                prefix = shard
            else:
                found = sorted({int(m.group(1)) for m in map(_SHARD.fullmatch, info.files) if m})
                if found:
                    raise ValueError("[step=%d] %s has no shard of worker %d: its workers %s each wrote their "
                                     "own (all_workers_write=True); restore it as one of those workers, or as "
                                     "worker 0" % (info.step, info.url, worker, ", ".join(map(str, [0] + found))))
        return CheckpointReader(self.storage, info, prefix, on_bytes)

    def restore_latest(self, saver, verify: bool = True, worker: Optional[int] = None,
                       progress_file=None) -> Optional[CheckpointInfo]:
        """Restores the newest checkpoint that verifies; falls back to older ones with a warning.

        A restore that takes over a second shows a progress bar of the bytes read
        (see `rayhooks.progress`). Returns None when nothing is committed; raises
        ValueError, naming the URL and the steps, when every committed checkpoint
        is damaged.
        """
        infos = self.committed()
        for info in reversed(infos):
            bar = progress.byte_bar("restoring step %d from %s" % (info.step, self.url),
                                    info.nbytes * (2 if verify and self.storage.is_local else 1),
                                    file=progress_file)
            try:
                problems = self.restore_checked(info, saver, worker, bar.update, verify)
            finally:
                bar.close()
            if problems:
                logger.warning("[step=%d] checkpoint %s is damaged (%s); falling back to the previous one",
                               info.step, info.url, "; ".join(problems))
                continue
            return info
        if infos:
            # Starting from scratch here would silently throw the run away (and retention
            # would then delete the damaged checkpoints, which may still be salvageable).
            raise ValueError(
                "%s: every committed checkpoint is damaged (steps %s; see the warnings above or run "
                "`rayhooks verify %s`), so there is nothing to resume from. Repair or move the damaged "
                "checkpoints away, or train into a new checkpoint_dir to start over."
                % (self.url, ", ".join(str(i.step) for i in infos), self.url))
        return None

    def restore_checked(self, info, saver, worker=None, on_bytes=None, verify=True) -> List[str]:
        """Restores `info` with its checksums checked; returns the problems.

        In a local directory the check runs on another thread while TF
        restores (in C++, without the GIL), so it costs little extra time; a
        checkpoint that fails it has been restored anyway, and the caller then
        restores an older one over it. From a remote store see
        `_restore_checked_download`.
        """
        if not verify:
            saver.restore(self.reader(info, worker, on_bytes))
            return []
        if not self.storage.is_local:
            return self._restore_checked_download(info, saver, worker, on_bytes)
        found, failed = [], []

        def check():
            try:
                found.extend(self.verify(info, on_bytes))
            except BaseException as e:  # noqa: BLE001 -- raised in the restoring thread below
                failed.append(e)

        checker = threading.Thread(target=check, name="rayhooks-verify", daemon=True)
        checker.start()
        try:
            saver.restore(self.reader(info, worker, on_bytes))
        except Exception:
            checker.join()
            if found:  # damaged data made the restore fail: report the damage, not the symptom
                return found
            raise
        checker.join()
        if failed:  # a check that could not run has not passed
            raise failed[0]
        return found

    def _restore_checked_download(self, info, saver, worker, on_bytes) -> List[str]:
        """From a remote store: reads every file once, downloading the ones the restore reads as they are
        checked, and restores from that local copy only when all match (a damaged checkpoint is not loaded).

        Checking while restoring, as for a local directory, would fetch those files twice.
        """
        shard = self.reader(info, worker).prefix
        staged = _TempDir()
        try:
            problems = self.verify(info, on_bytes, copy_to={
                name: os.path.join(staged.name, name)
                for name in (bundle.index_filename(shard), bundle.data_filename(shard))})
            if not problems:
                # The reader's local copy keeps the directory for as long as a saver holds it (TF
                # restores some variables only when they are created); else it goes with `staged`.
                saver.restore(CheckpointReader(Storage(staged.name), info, shard, keep=staged))
        except BaseException:
            staged.cleanup()
            raise
        if problems:
            staged.cleanup()
        return problems


class CheckpointReader:
    """Read access to one committed checkpoint, handed to `saver.restore`."""

    def __init__(self, storage: Storage, info: CheckpointInfo, prefix: Optional[str] = None, on_bytes=None,
                 keep=None):
        self.storage = storage
        self.info = info
        self.prefix = prefix or info.prefix
        self.on_bytes = on_bytes  # hears of the bytes read or downloaded, for a progress bar
        self._keep = keep  # what the files' directory lives as long as (a downloaded copy's _TempDir)

    @property
    def url(self) -> str:
        return self.info.url

    @property
    def step(self) -> int:
        return self.info.step

    def read_tensors(self, keys=None, into=None) -> dict:
        """The tensors by name; `into`: arrays to read them into in place where all fit (see `read_bundle`)."""
        index = self.storage.read_bytes(bundle.index_filename(self.prefix))
        with self.storage.open_read(bundle.data_filename(self.prefix)) as data:
            if self.on_bytes is not None:
                data = progress.CountingReader(data, self.on_bytes)
            return bundle.read_bundle(index, data, keys=keys, into=into)

    def local_copy(self) -> "LocalCopy":
        """A local prefix TF can read, kept until the returned object is garbage collected."""
        names = [bundle.index_filename(self.prefix), bundle.data_filename(self.prefix)]
        if self.storage.is_local:
            return LocalCopy("%s/%s" % (self.storage.local_root, self.prefix), self._keep)
        tmp = _TempDir()
        for name in names:
            self.storage.get_to_local(name, os.path.join(tmp.name, name), self.on_bytes)
        return LocalCopy("%s/%s" % (tmp.name, self.prefix), tmp)


@dataclasses.dataclass
class LocalCopy:
    prefix: str
    directory: object  # a _TempDir for a downloaded copy (deleted with this object), or None


class _TempDir:
    """A local directory for a downloaded checkpoint, removed with the last reference to this object.

    As `tempfile.TemporaryDirectory`, without its ResourceWarning: being dropped is
    this one's normal end (TF may read the files until then).
    """

    def __init__(self):
        self.name = tempfile.mkdtemp(prefix="rayhooks-restore-")
        self._finalizer = weakref.finalize(self, shutil.rmtree, self.name, ignore_errors=True)

    def cleanup(self) -> None:
        self._finalizer()


def _check_files(files) -> None:
    """A manifest's file table: plain names in this directory, each with a size and a crc32c."""
    if not isinstance(files, dict) or not files:
        raise ValueError("no file table")
    for name, meta in files.items():
        if not isinstance(name, str) or "/" in name or "\\" in name or name in (".", "..") or not name:
            raise ValueError("file name %r is not a plain name in the directory" % (name,))
        if not isinstance(meta, dict) or not isinstance(meta.get("bytes"), int) \
                or not isinstance(meta.get("crc32c"), int):
            raise ValueError("file %r has no integer bytes and crc32c" % (name,))


def _write(data_file, index_file, tensors):
    writer = bundle.BundleWriter(data_file, index_file)
    for key, value in tensors.items():
        writer.add(key, value)
    return writer.finish()

