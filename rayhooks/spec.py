"""`RunSpec`: what the chief and the workers of a launched run are told to do.

`launch` builds it from the user's hooks: the built-in checkpoint, summary and
stop hooks become schedules the chief plans ahead; every other chief-only
hook runs on the chief as it is. Everything here pickles, to reach Ray actors.
"""

import dataclasses
import signal
import uuid
from typing import List, Optional, Tuple

from rayhooks.basic_hooks import StopAtStepHook
from rayhooks.checkpoint_hooks import AsyncCheckpointSaverHook, CheckpointSaverHook
from rayhooks.checkpoints import CheckpointStore
from rayhooks.summary_hook import SummarySaverHook
from rayhooks.summary_writer import SummaryWriter, SummaryWriterCache
from rayhooks.timer import SecondOrStepTimer


@dataclasses.dataclass
class CheckpointSpec:
    store: CheckpointStore
    timer: SecondOrStepTimer
    listeners: list
    asynchronous: bool = True
    in_flight: str = "skip"
    max_in_flight: int = 1
    max_in_flight_bytes: Optional[int] = None
    all_workers_write: bool = False
    on_write_error: str = "raise"
    save_on_signals: tuple = (signal.SIGTERM,)


@dataclasses.dataclass
class SummarySpec:
    output_dir: str
    timer: SecondOrStepTimer
    fetches: Tuple[str, ...]
    storage_options: Optional[dict] = None
    flush_secs: Optional[float] = None          # None: the writer's defaults
    max_file_bytes: Optional[int] = None
    clock: Optional[object] = None
    # The hook's own summary_writer, which the chief writes through where it runs in this
    # process (the local backend); a Ray chief makes a writer with its settings instead.
    writer: Optional[SummaryWriter] = None

    def __getstate__(self):
        return dict(self.__dict__, writer=None)  # a writer holds locks and threads: its settings travel

    def make_writer(self) -> SummaryWriter:
        if self.writer is not None:
            # One events file for the directory where possible: TensorBoard, reloading a live
            # run, stops reading a file once a newer one appears beside it.
            SummaryWriterCache.adopt(self.writer)
            return self.writer
        return SummaryWriterCache.get(self.output_dir, self.storage_options, flush_secs=self.flush_secs,
                                      max_file_bytes=self.max_file_bytes, clock=self.clock)


@dataclasses.dataclass
class RunSpec:
    checkpoint_dir: Optional[str]
    summary_dir: Optional[str]
    hooks: list                                # chief-only hooks run as they are
    checkpoint: Optional[CheckpointSpec] = None
    summary: Optional[SummarySpec] = None
    last_step: Optional[int] = None
    # One per launch call: a chief Ray restarts tells its own claim on the directory from another run's.
    run_token: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex)


def build_spec(chief_hooks: List, all_workers_write: bool = False) -> RunSpec:
    """Sorts chief hooks into planned schedules and hooks that run on the chief as they are."""
    generic, checkpoint, summary, last_step = [], None, None, None
    for hook in chief_hooks:
        if isinstance(hook, CheckpointSaverHook):
            if checkpoint is not None:
                raise ValueError("launch supports one checkpoint hook per run; got a second for %s"
                                 % hook.store.url)
            asynchronous = isinstance(hook, AsyncCheckpointSaverHook)
            checkpoint = CheckpointSpec(
                store=hook.store, timer=hook._timer, listeners=hook._listeners, asynchronous=asynchronous,
                in_flight=getattr(hook, "_in_flight", "wait"),
                max_in_flight=getattr(hook, "_max_in_flight", 1),
                max_in_flight_bytes=getattr(hook, "_max_in_flight_bytes", None),
                all_workers_write=all_workers_write, on_write_error=hook._on_write_error,
                save_on_signals=hook._save_on_signals)
        elif isinstance(hook, SummarySaverHook):
            writer = hook._summary_writer
            if summary is not None or not (hook._output_dir or writer is not None):
                raise ValueError("launch supports one SummarySaverHook, with output_dir or summary_writer set")
            if writer is not None and not isinstance(writer, SummaryWriter):
                raise ValueError("under launch, summary_writer must be an rh.SummaryWriter: the chief writes "
                                 "the summaries, in its own process; got %r" % (writer,))
            ops = hook._get_summary_op()
            ops = [ops] if isinstance(ops, str) else list(ops or [])
            if not all(isinstance(op, str) for op in ops):
                raise ValueError("under launch, summary_op must name step outputs (strings): the values "
                                 "are fetched on worker 0 and written by the chief; got %r" % (ops,))
            if writer is not None:
                summary = SummarySpec(writer.url, hook._timer, tuple(ops), writer.storage.storage_options,
                                      writer.flush_secs, writer.max_file_bytes, writer._clock, writer)
            else:
                summary = SummarySpec(hook._output_dir, hook._timer, tuple(ops), hook._storage_options)
        elif isinstance(hook, StopAtStepHook):
            if hook._last_step is None:
                raise ValueError("under launch, give StopAtStepHook(last_step=...): num_steps depends on "
                                 "the restored step, which only the workers know when the hook is built")
            last_step = hook._last_step if last_step is None else min(last_step, hook._last_step)
        else:
            generic.append(hook)
    checkpoint_dir = checkpoint.store.url if checkpoint else None
    summary_dir = summary.output_dir if summary else None
    return RunSpec(checkpoint_dir, summary_dir, generic, checkpoint, summary, last_step)
