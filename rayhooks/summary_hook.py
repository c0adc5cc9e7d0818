"""`SummarySaverHook`: TF1's summary schedule, tfevents on any fsspec URL.

`summary_op` takes, besides TF1's serialized `Summary` bytes (or a tensor or
list of them), two TF2-friendly forms:

* names of step outputs, `"loss"` or `["loss", "accuracy"]`: numbers become
  scalars, arrays histograms, strings text, and serialized `Summary` bytes are
  written as they are;
* a callable, called on trigger steps with the step's outputs dict (or with
  no argument) and returning a `Summary`, bytes, or a {tag: value} dict.
"""

import inspect

from tensorboard.compat.proto import summary_pb2

from rayhooks.formats import summaries
from rayhooks.session_run_hook import GLOBAL_STEP, SessionRunArgs, SessionRunHook
from rayhooks.storage import Storage
from rayhooks.summary_writer import SummaryWriterCache, check_summary_writer
from rayhooks.timer import NEVER_STEP, SecondOrStepTimer


class SummarySaverHook(SessionRunHook):
    """Saves summaries every N steps or seconds; TF1's signature, any fsspec URL.

    `summary_op` (or `scaffold.summary_op`) says what to write: names of the
    step's outputs (a string or a list; each becomes a scalar, histogram or
    text summary by its value), a callable called on trigger steps with the
    step's outputs (or nothing) that returns a `Summary`, bytes or a dict of
    tag -> value, or TF1 serialized `Summary` bytes. `output_dir` is a directory URL;
    `summary_writer` a writer of your own instead (under `launch`, an
    `rh.SummaryWriter`: the chief writes with its settings). rayhooks' keyword-only
    extras: `clock` (for the seconds schedule) and `storage_options`.
    """

    def __init__(self, save_steps=None, save_secs=None, output_dir=None, summary_writer=None,
                 scaffold=None, summary_op=None, *, clock=None, storage_options=None):
        if (scaffold is None and summary_op is None) or (scaffold is not None and summary_op is not None):
            raise ValueError("Exactly one of scaffold or summary_op must be provided.")
        check_summary_writer(summary_writer, "SummarySaverHook", ("add_summary", "add_session_log", "flush"))
        self._summary_op = summary_op
        self._summary_writer = summary_writer
        self._output_dir = output_dir
        self._storage_options = storage_options
        self._scaffold = scaffold
        self._timer = SecondOrStepTimer(every_secs=save_secs, every_steps=save_steps, clock=clock,
                                        names=("save_secs", "save_steps"))

    def begin(self):
        if self._summary_writer is None and self._output_dir:
            Storage(self._output_dir, self._storage_options).check_writable()
            self._summary_writer = SummaryWriterCache.get(self._output_dir, self._storage_options)
        self._next_step = None
        self._due = 0
        self._ops = _normalise(self._get_summary_op())

    def _get_summary_op(self):
        if self._summary_op is not None:
            return self._summary_op
        return self._scaffold.summary_op

    def before_run(self, run_context):
        # TF1 fetched the global step on every run; the session already knows it,
        # so a step without a summary asks for nothing and costs no fetch.
        # The step after this run, from the session: runs the session skipped (see
        # `_quiet_until`) left `_next_step` behind, and it was always this otherwise.
        next_step = None if self._next_step is None else run_context.session.global_step + 1
        if next_step is not None and next_step < self._due:
            self._request_summary = False
            return None
        self._request_summary = next_step is None or self._timer.should_trigger_for_step(next_step)
        if self._request_summary and self._ops:
            return SessionRunArgs({"global_step": GLOBAL_STEP,
                                   "summary": [op for op in self._ops if not callable(op) or hasattr(op, "numpy")]})
        return None

    def after_run(self, run_context, run_values):
        if not self._summary_writer:
            return
        if not self._request_summary and self._next_step is not None:
            self._next_step = run_context.session.global_step + 1
            return
        global_step = run_context.session.global_step
        if self._next_step is None:
            self._summary_writer.add_session_log("START", global_step)
        if self._request_summary:
            self._timer.update_last_triggered_step(global_step)
            nxt = self._timer.next_step_trigger()
            self._due = 0 if nxt is None else nxt
            if self._ops:
                fetched = iter(run_values.results["summary"])
                outputs = run_context.session.outputs
                for op in self._ops:
                    if callable(op) and not hasattr(op, "numpy"):
                        value = op(outputs) if _takes_argument(op) else op()
                        name = getattr(op, "__name__", "summary")
                    else:
                        value = next(fetched)
                        name = op if isinstance(op, str) else "summary"
                    self._summary_writer.add_summary(_as_summary(name, value), global_step)
        self._next_step = global_step + 1

    def _quiet_until(self):
        if self._next_step is None:
            return 0
        if self._due == 0 and self._timer.next_time_trigger() is not None:
            return NEVER_STEP  # seconds: see _quiet_start_deadline
        return self._due

    def _quiet_start_deadline(self):
        """Runs starting before this clock reading cannot write a summary: it decides in before_run."""
        at = None if self._next_step is None else self._timer.next_time_trigger()
        return None if at is None else (self._timer.clock, at)

    def _not_due_this_run(self):
        self._request_summary = False

    def end(self, session=None):
        if self._summary_writer:
            self._summary_writer.flush()


def _normalise(op):
    if op is None:
        return []
    if isinstance(op, (list, tuple)):
        return list(op)
    return [op]


def _takes_argument(fn) -> bool:
    try:
        return len(inspect.signature(fn).parameters) >= 1
    except (TypeError, ValueError):
        return False


def _as_summary(name, value):
    """A `Summary` from what an op produced; ValueError naming the tag if it cannot be one."""
    if isinstance(value, summary_pb2.Summary):
        return value
    if hasattr(value, "numpy"):
        value = value.numpy()
    if isinstance(value, (bytes, bytearray)):
        try:
            return summaries.parse_serialized(bytes(value))
        except ValueError:
            return summaries.from_mapping({name: value})
    if isinstance(value, dict):
        return summaries.from_mapping(value)
    if hasattr(value, "SerializeToString"):
        return summaries.parse_serialized(value.SerializeToString())
    return summaries.from_mapping({name: value})
