"""A tfevents writer on any fsspec URL, buffered and flushed in the background.

Records queue in memory and reach storage every `flush_secs` (TF's default,
120 s), at `flush()` and at `close()`. On a local disk the events file is
appended to. An object store cannot append, so there each flush uploads the
whole file again, as TF's own GCS filesystem does; unlike TF, the writer
starts a new events file once the current one reaches `max_file_bytes`
(8 MB there by default), so a long run's flushes stay small instead of
growing with the run. TensorBoard reads a run's events files in name order,
and every new name sorts after the last. A flush error is kept and raised at
the next `add_*`, `flush` or `close` (DESIGN I6).
"""

import atexit
import logging
import os
import tempfile
import threading
import time
import weakref

from tensorboard.compat.proto import event_pb2, summary_pb2

from rayhooks.formats import events, summaries
from rayhooks.storage import Storage

logger = logging.getLogger("rayhooks")


OBJECT_STORE_MAX_FILE_BYTES = 8 << 20


class SummaryWriter:
    """Writes events files in the directory at `url`. Constructing one does no I/O.

    `max_file_bytes`: start a new events file once a flush has left the
    current one at least this large. None (the default) means 8 MB on an
    object store, where every flush uploads the whole file, and no limit on
    a local disk, where flushes append; 0 means no limit.

    A deep copy of a writer (a local `launch` copies its workers' hooks) is
    the writer itself: one writer per events file, safe to share between threads.
    """

    def __init__(self, url, storage_options=None, flush_secs=120, clock=time.time, max_file_bytes=None):
        self.storage = url if isinstance(url, Storage) else Storage(url, storage_options)
        self.flush_secs = flush_secs
        if max_file_bytes is None:
            max_file_bytes = 0 if self.storage.is_local else OBJECT_STORE_MAX_FILE_BYTES
        if max_file_bytes < 0:
            raise ValueError("max_file_bytes must be 0 (no limit) or more, got %r" % (max_file_bytes,))
        self.max_file_bytes = max_file_bytes
        self._clock = clock
        self._lock = threading.Lock()
        # One flush at a time: two overlapping uploads of the whole file to an object
        # store could finish out of order (the older one winning), and two local appends
        # could land out of order.
        self._flush_lock = threading.Lock()
        self._pending = []
        self._spool = None
        self._spool_name = None  # the file whose uploaded bytes `_spool` holds
        self._filename = None
        self._last_filename = None
        self._error = None
        self._thread = None
        self._closed = threading.Event()

    @property
    def url(self):
        return self.storage.url

    @property
    def file_url(self):
        return None if self._filename is None else self.storage.url_of(self._filename)

    def _add(self, record: bytes) -> None:
        self._raise_if_failed()
        with self._lock:
            if self._closed.is_set():
                # Used again after close() (e.g. a hook kept it across
                # SummaryWriterCache.clear()): reopen on a new file, as TF1's
                # FileWriter.reopen() does, rather than rewrite the closed one.
                self._closed.clear()
                self._filename = None
            if self._filename is None:
                self._open_file_locked()
            self._pending.append(events.frame_record(record))
        if self._thread is None and self.flush_secs:
            # Its own stop signal: an add during close() reopens the writer (clears `_closed`),
            # which must not keep the thread that close() is joining alive.
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._flush_loop, args=(self._stop,),
                                            name="rayhooks-summary-flush", daemon=True)
            self._thread.start()

    def _open_file_locked(self) -> None:
        """Names a new events file and puts its file_version record first (caller holds `_lock`)."""
        now = self._clock()
        if self._last_filename is not None:
            # TensorBoard reads a directory's files in name order and never goes back to an
            # earlier one; the seconds in the name decide that order (the counter after the
            # pid does not sort as a number), so two files begun in one second would misorder.
            now = max(now, events.filename_time(self._last_filename) + 1)
        self._filename = self._last_filename = events.event_filename(now=now)
        self._pending.insert(0, events.frame_record(events.file_version_event(self._clock())))

    def add_summary(self, summary, global_step=None):
        """Adds a `Summary` proto, TF1 serialized `Summary` bytes, or a {tag: value} mapping."""
        if isinstance(summary, (bytes, bytearray)):
            summary = summaries.parse_serialized(bytes(summary))
        elif isinstance(summary, dict):
            summary = summaries.from_mapping(summary)
        elif not isinstance(summary, summary_pb2.Summary):
            if hasattr(summary, "SerializeToString"):  # TF's own Summary class, same wire format
                summary = summaries.parse_serialized(summary.SerializeToString())
            else:
                raise TypeError("add_summary takes a Summary, serialized Summary bytes or a dict, got %r"
                                % type(summary).__name__)
        self._add(events.summary_event(summary, int(global_step or 0), self._clock()))

    def add_scalar(self, tag, value, global_step):
        self.add_summary(summaries.to_summary([summaries.scalar(tag, value)]), global_step)

    def add_session_log(self, session_log, global_step=None, checkpoint_path=""):
        """Adds a session log: a status name ("START", "STOP", "CHECKPOINT") or a `SessionLog`."""
        msg = ""
        if not isinstance(session_log, str):
            status = event_pb2.SessionLog.SessionStatus.Name(session_log.status)
            checkpoint_path = checkpoint_path or session_log.checkpoint_path
            msg = session_log.msg
        else:
            status = session_log
        self._add(events.session_log_event(status, int(global_step or 0), self._clock(),
                                           checkpoint_path=checkpoint_path, msg=msg))

    def add_graph(self, graph_def_bytes, global_step=0):
        self._add(events.graph_event(graph_def_bytes, int(global_step), self._clock()))

    def _flush_loop(self, stop):
        while not stop.wait(self.flush_secs):
            try:
                self._flush_pending()
            except Exception as e:  # kept for the training thread: a flusher thread cannot raise to it
                with self._lock:
                    self._error = self._error or e
                logger.error("summary flush to %s failed: %s", self.url, e)

    def _flush_pending(self):
        with self._flush_lock:
            self._flush_pending_locked()

    def _flush_pending_locked(self):
        with self._lock:
            batch, self._pending = self._pending, []
            name = self._filename
        if not batch:
            return
        data = b"".join(batch)
        try:
            if self.storage.is_local:
                path = os.path.join(self.storage.local_root, name)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "ab", buffering=0) as f:  # unbuffered: nothing left to flush at close
                    start = f.seek(0, os.SEEK_END)
                    try:
                        view = memoryview(data)
                        while view:
                            view = view[f.write(view):]
                    except BaseException:
                        # A torn record would hide every later one from readers;
                        # the batch is retried whole, so cut back to where it began.
                        try:
                            f.truncate(start)
                        except OSError:
                            pass
                        raise
                    size = f.tell()
            else:
                if self._spool_name != name:
                    # Another file's bytes (closed and reopened, or rolled over): never upload them under `name`.
                    self._drop_spool()
                if self._spool is None:
                    self._spool = tempfile.TemporaryFile(prefix="rayhooks-events-")
                    self._spool_name = name
                size = self._spool.seek(0, os.SEEK_END) + len(data)
                self._spool.write(data)
                self._spool.seek(0)
                spool = self._spool
                self.storage.write_with(name, lambda f: _copy(spool, f), fresh=True)
        except BaseException:
            with self._lock:  # nothing is dropped: the batch goes back in front for the next try
                self._pending[:0] = batch
            if self._spool is not None:
                self._spool.truncate(self._spool.seek(0, os.SEEK_END) - len(data))
            raise
        if self.max_file_bytes and size >= self.max_file_bytes:
            self._start_next_file(name)

    def _start_next_file(self, full: str) -> None:
        """Later records go to a new file, named to sort after `full`, which is never written again."""
        with self._lock:
            if self._filename != full:  # closed and reopened on a new file meanwhile
                return
            self._filename = None
            if self._pending:  # added since this flush took its batch: they open the new file
                self._open_file_locked()
        self._drop_spool()

    def _drop_spool(self) -> None:
        """Forgets the uploaded copy of the current file (caller holds `_flush_lock`)."""
        if self._spool is not None:
            self._spool.close()
        self._spool = self._spool_name = None

    def _raise_if_failed(self):
        with self._lock:
            error, self._error = self._error, None
        if error is not None:
            raise OSError("writing summaries to %s failed: %s" % (self.url, error)) from error

    def flush(self):
        self._raise_if_failed()
        self._flush_pending()

    def __deepcopy__(self, memo):
        return self  # one writer per events file: copies of hooks (a local run's workers') share it

    def close(self):
        self._closed.set()
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        self.flush()
        with self._flush_lock:  # a flush from another thread (the atexit one) may be using it
            self._drop_spool()


def check_summary_writer(writer, hook: str, needs) -> None:
    """Refuses a `summary_writer=` the hook could not write through, at construction, not at its first summary."""
    if writer is None or isinstance(writer, SummaryWriter):
        return
    missing = [name for name in needs if not callable(getattr(writer, name, None))]
    if missing:
        raise TypeError("%s(summary_writer=) got a %s, which has no %s(); pass an rh.SummaryWriter(logdir) "
                        "(or rh.SummaryWriterCache.get(logdir)). TensorFlow's tf.summary writers record from "
                        "inside the step, not from a hook" % (hook, type(writer).__name__, "() or ".join(missing)))


def _copy(src, dst, chunk=8 << 20):
    src.seek(0)
    while True:
        block = src.read(chunk)
        if not block:
            return
        dst.write(block)


class SummaryWriterCache:
    """One shared writer per directory, as TF's `SummaryWriterCache`."""

    _lock = threading.Lock()
    _writers = {}

    @classmethod
    def get(cls, url, storage_options=None, *, flush_secs=None, max_file_bytes=None, clock=None):
        """The writer for `url`. The first call that names the directory makes it, with these
        settings (None: `SummaryWriter`'s defaults); a later call that asks for other settings
        gets the same writer, and a warning."""
        key = Storage(url).url
        asked = {"flush_secs": flush_secs, "max_file_bytes": max_file_bytes, "clock": clock}
        with cls._lock:
            writer = cls._writers.get(key)
            if writer is None:
                writer = cls._writers[key] = SummaryWriter(
                    url, storage_options, **{k: v for k, v in asked.items() if v is not None})
                return writer
        differ = ["%s=%r" % (k, v) for k, v in asked.items()
                  if v is not None and v != getattr(writer, "_clock" if k == "clock" else k)]
        if differ:
            logger.warning("the summary writer for %s was made before with other settings; %s ignored "
                           "(one writer per directory)", key, ", ".join(differ))
        return writer

    @classmethod
    def adopt(cls, writer: "SummaryWriter") -> "SummaryWriter":
        """Makes `writer` the shared one for its directory, unless the directory has one already
        (returned then): what else writes there (checkpoint events) goes to the same file."""
        with cls._lock:
            return cls._writers.setdefault(writer.url, writer)

    @classmethod
    def clear(cls):
        with cls._lock:
            writers, cls._writers = list(cls._writers.values()), {}
        for writer in writers:
            writer.close()


    @classmethod
    def flush_all(cls, when="now"):
        """Uploads what every shared writer holds; a failure is logged, naming the URL, and the rest go on."""
        with cls._lock:
            writers = list(cls._writers.values())

        def flush(writer):
            try:
                writer.flush()
            except Exception as e:  # at exit, or on the way out of a failed run: no one left to raise to
                logger.error("could not flush summaries to %s %s: %s", writer.url, when, e)
        # Side by side: a store that is down makes each flush retry for its client's whole
        # retry budget (~45 s on S3), and a process exiting should wait for that once, not once a writer.
        threads = []
        for writer in writers[1:]:
            thread = threading.Thread(target=flush, args=(writer,), name="rayhooks-summary-flush-all")
            try:
                thread.start()
            except RuntimeError:  # no new threads at this point of the interpreter's shutdown
                flush(writer)
                continue
            threads.append(thread)
        if writers:
            flush(writers[0])
        for thread in threads:
            thread.join()


def _flush_all_at_exit():
    """Buffered events reach storage even when no hook's `end` ran (a step raised)."""
    SummaryWriterCache.flush_all("at exit")


# fsspec filesystems close their connections at exit through `weakref.finalize` (gcsfs's
# aiohttp session does), whose one atexit hook is registered when the process makes its first
# finalizer. atexit runs hooks last-registered first: registering that hook now, before ours,
# makes the flush above run while those connections are still open.
weakref.finalize(_flush_all_at_exit, lambda: None)
atexit.register(_flush_all_at_exit)
