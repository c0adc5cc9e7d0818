"""Following a checkpoint directory from another process: a sidecar evaluator's loop.

`checkpoints_iterator` is `tf.train.checkpoints_iterator` for a directory that
rayhooks writes, on any fsspec URL: it yields only committed checkpoints (their
manifest written, so never one still uploading), each as a `CommittedCheckpoint`
that restores with its checksums checked, and it ends by itself once the
training run writing the directory has finished.
"""

import logging
import numbers
import time
from typing import Callable, Optional

from rayhooks.checkpoints import MANIFEST_SUFFIX, CheckpointInfo, CheckpointStore
from rayhooks.claim import WriterClaim
from rayhooks.storage import RetryPolicy, Storage
from rayhooks.timer import is_count

logger = logging.getLogger("rayhooks")


class CommittedCheckpoint:
    """One committed checkpoint of a directory, as `checkpoints_iterator` yields it.

    `step` is its global step, `url` its prefix URL (what TF calls the
    checkpoint path) and `timestamp` when it was committed (seconds since the
    epoch, by the writing machine's clock).
    """

    def __init__(self, store: CheckpointStore, info: CheckpointInfo):
        self._store = store
        self._info = info

    @property
    def step(self) -> int:
        return self._info.step

    @property
    def url(self) -> str:
        return self._info.url

    @property
    def timestamp(self) -> float:
        return self._info.timestamp

    def __repr__(self):
        return "CommittedCheckpoint(step=%d, url=%r)" % (self.step, self.url)

    def restore(self, into, verify: bool = True, worker: Optional[int] = None) -> int:
        """Loads this checkpoint into `into`; returns its step.

        `into` is a `tf.train.Checkpoint` (or trackables, or a dict of numpy
        arrays), as the session's `state=`. With `verify`, every file's crc32c
        is checked (from a remote store, before anything is loaded), and a
        damaged checkpoint raises `ValueError`; from a local directory `into`
        may then hold part of it, as after a failed TF restore: restore the next
        checkpoint over it. `worker` picks a launch worker's own shard where the
        checkpoint has them (`all_workers_write=True`).
        """
        from rayhooks.savers import as_saver
        if worker is not None and not is_count(worker):
            raise ValueError("worker must be a worker's index (0, 1, ...) or None, got %r" % (worker,))
        saver = as_saver(into)
        info = self._info
        try:
            problems = self._store.restore_checked(info, saver, worker, verify=verify)
        except ValueError:
            raise  # a state that does not fit, or a missing shard: deleted or not, that is the error to see
        except Exception as e:
            if not self._still_committed():
                raise self._deleted() from e
            raise
        if problems and not self._still_committed():
            raise self._deleted()  # its files went missing because the checkpoint did
        if problems:
            raise ValueError(
                "[step=%d] checkpoint %s is damaged (%s), so what was restored is not that checkpoint. Skip it "
                "(catch ValueError and go on to the next one), or run `rayhooks verify %s`"
                % (info.step, info.url, "; ".join(problems), self._store.url))
        return info.step

    def read_tensors(self, keys=None) -> dict:
        """The checkpoint's tensors as numpy arrays by name (all, or those in `keys`), unchecked."""
        return self._store.reader(self._info).read_tensors(keys)

    def _deleted(self) -> FileNotFoundError:
        return FileNotFoundError(
            "[step=%d] %s was deleted before or while it was restored: the training run's retention removed it "
            "(it keeps max_to_keep checkpoints), or a run resumed below it committed that step again. Evaluate "
            "faster than the run saves, or keep more checkpoints (max_to_keep, keep_checkpoint_every_n_hours)"
            % (self._info.step, self._info.url))

    def _still_committed(self) -> bool:
        """Whether this very commit is still there (not deleted, nor replaced by a commit of the same step)."""
        try:
            return self._store.read_manifest(self._info.prefix + MANIFEST_SUFFIX) == self._info
        except Exception:  # noqa: BLE001 -- then the restore's own error is the one to see
            return True


def finished(claim: Optional[dict]) -> bool:
    """Whether a writer claim says its run ended for good: released, and not failed or preempted."""
    return bool(claim and claim.get("released")) and claim.get("ended", "finished") == "finished"


class _RunWatch:
    """Tells when the run writing a directory has finished, counting only a run seen after the iterator began.

    A claim already released as finished when the iterator is made may be an earlier
    run's, in a directory that a new run is about to resume: stopping on it would end
    the evaluator as the new run starts. So a finished claim counts only when it is
    another run's than the one found finished at the start (every claim, a restarted
    chief's too, has a run id of its own).
    """

    def __init__(self, claim: WriterClaim):
        self._claim = claim
        first = claim.read()
        self._earlier = first.get("run") if finished(first) else None  # None: no finished run found at the start

    def finished(self) -> bool:
        claim = self._claim.read()
        return finished(claim) and claim.get("run") != self._earlier  # each claim has a run id of its own


class _Manifests:
    """A directory's committed checkpoints, listed at each poll.

    A manifest is read once, except the newest one's, read at every poll: a run
    resumed below a damaged checkpoint commits that step again, under the same name.
    """

    def __init__(self, store: CheckpointStore):
        self._store = store
        self._read = {}
        self._hinted = False

    @property
    def url(self) -> str:
        return self._store.url

    def newest(self) -> Optional[CheckpointInfo]:
        store = self._store
        names = store.manifest_names()
        self._read = {name: self._read[name] if name in self._read else store.read_manifest(name)
                      for name in names}
        if not names and not self._hinted:
            self._hint_other_basename()
        newest = store.newest([info for info in self._read.values() if info is not None])
        if newest is not None:
            name = newest.prefix + MANIFEST_SUFFIX
            again = self._read[name] = store.read_manifest(name)
            if again != newest:
                return self.newest()  # changed (committed again) or gone since it was read: choose anew
        return newest

    def _hint_other_basename(self) -> None:
        self._hinted = True
        store = self._store
        others = sorted({name[:-len(MANIFEST_SUFFIX)].rsplit("-", 1)[0] for name in store.storage.listdir()
                         if name.endswith(MANIFEST_SUFFIX)} - {store.basename})
        if others:
            logger.warning("%s holds no checkpoints named %s-*, but some named %s-*: pass checkpoint_basename=%r "
                           "(the run's own)", store.url, store.basename, others[0], others[0])


def checkpoints_iterator(checkpoint_dir, min_interval_secs: float = 0, timeout: Optional[float] = None,
                         timeout_fn: Optional[Callable[[], bool]] = None, *, stop_when_finished: bool = True,
                         checkpoint_basename: str = "model.ckpt", storage_options: Optional[dict] = None,
                         retry: Optional[RetryPolicy] = None, poll_secs: float = 1.0,
                         clock: Callable[[], float] = time.monotonic,
                         sleep: Callable[[float], None] = time.sleep):
    """Yields each new committed checkpoint of `checkpoint_dir` as it appears, as a `CommittedCheckpoint`.

    As `tf.train.checkpoints_iterator`: it waits for a checkpoint other than
    the one it yielded last, yields the newest one (skipping those committed
    while the caller was busy), and lets at least `min_interval_secs` pass from
    one yield to the next. After `timeout` seconds without a new checkpoint it
    calls `timeout_fn`; no `timeout_fn`, or one that returns True, ends the
    iteration, and False waits again.

    Unlike TF's, it sees only checkpoints whose commit is complete, reads any
    fsspec URL (`gs://`, `s3://`, ...), and with `stop_when_finished` it ends
    once the run writing the directory has finished: after yielding that run's
    last checkpoint, when the run released the directory at a clean end. A run
    that failed or was preempted is waited for, as its restart resumes there.
    A run that had already finished when this function was called does not
    count (a new run may be about to resume its directory): to evaluate a
    finished run's last checkpoint and stop, pass `timeout=0`.

    `poll_secs` is how often the directory is listed; `clock` and `sleep` are
    for tests.
    """
    for name, value, low in (("min_interval_secs", min_interval_secs, 0), ("poll_secs", poll_secs, 0)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value >= low:
            raise ValueError("%s must be a number of seconds >= %s, got %r" % (name, low, value))
    if poll_secs == 0:
        raise ValueError("poll_secs must be above 0, got 0: the directory would be listed without pause")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, numbers.Real)
                                or not timeout >= 0):
        raise ValueError("timeout must be None (wait for ever) or a number of seconds >= 0, got %r" % (timeout,))
    if timeout_fn is not None and not callable(timeout_fn):
        raise TypeError("timeout_fn must be a function of no arguments returning True to stop, got %r"
                        % (timeout_fn,))
    storage = checkpoint_dir if isinstance(checkpoint_dir, Storage) else Storage(checkpoint_dir, storage_options,
                                                                                  retry)
    store = CheckpointStore(storage, checkpoint_basename)
    # Now, not at the first `next()`: which run had finished before the caller started its own.
    watch = _RunWatch(WriterClaim(storage, checkpoint_basename)) if stop_when_finished else None
    return _follow(store, watch, min_interval_secs, timeout, timeout_fn, poll_secs, clock, sleep)


def _follow(store, watch, min_interval_secs, timeout, timeout_fn, poll_secs, clock, sleep):
    last = None  # (step, timestamp) of the checkpoint yielded last
    manifests = _Manifests(store)
    while True:
        found = _wait_for_new(manifests, watch, last, timeout, poll_secs, clock, sleep)
        if found is _FINISHED:
            logger.info("%s: the training run has finished and its last checkpoint was seen; stopping", store.url)
            return
        if found is None:
            if timeout_fn is None:
                logger.info("%s: timed out waiting for a new checkpoint", store.url)
                return
            if timeout_fn():
                return
            continue
        started = clock()
        last = (found.step, found.timestamp)
        logger.info("[step=%d] found a new checkpoint at %s", found.step, found.url)
        yield CommittedCheckpoint(store, found)
        wait = started + min_interval_secs - clock()
        if wait > 0:
            sleep(wait)


_FINISHED = object()


def _wait_for_new(manifests, watch, last, timeout, poll_secs, clock, sleep):
    """The newest committed checkpoint other than `last`; None on timeout; `_FINISHED` when the run is over."""
    deadline = None if timeout is None else clock() + timeout
    announced = False
    while True:
        # The claim before the listing: a run releases only after its last commit, so a
        # release seen here means that listing has the run's last checkpoint.
        ended = watch is not None and watch.finished()
        newest = manifests.newest()
        if newest is not None and (newest.step, newest.timestamp) != last:
            return newest
        if ended:
            return _FINISHED
        if not announced:
            logger.info("waiting for a new checkpoint at %s", manifests.url)
            announced = True
        if deadline is not None and clock() + poll_secs > deadline:
            return None
        sleep(poll_secs)
