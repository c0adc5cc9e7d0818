"""`SessionHandle`: what hooks and listeners receive as `session`.

In TF1 this was a `tf.Session`. In TF2 there is no session, so rayhooks hands
over a small, picklable handle with what hooks actually used the session for:

==================  ==========================================================
`global_step`       the step (int); after a run it counts that run
`checkpoint_dir`    URL of the checkpoint directory, or None
`summary_dir`       URL of the summary directory, or None
`latest_checkpoint` URL prefix of the newest committed checkpoint, or None
`is_chief`          True on the process that runs chief-only hooks
`worker_index`      this worker's index (0 in local mode)
`num_workers`       workers in the run (1 in local mode)
`alive_workers`     indexes of the workers the chief hears from
`run(fetches)`      resolves fetches as `SessionRunArgs` do, against the last
                    step's outputs (TF1 hooks call `session.run` in `end`)
`restore(...)`      loads a committed checkpoint into the run's state, or into
                    other objects (an evaluation copy of the model, say)
==================  ==========================================================
"""

import threading
import time
from typing import Optional

from rayhooks.session_run_hook import GLOBAL_STEP


class _BeforeFirstStep(dict):
    """A session's outputs before its first step: empty, and a fetch from them says why."""


NO_STEP_YET = _BeforeFirstStep()


def resolve_fetches(fetches, outputs, stale_step):
    """The values of `fetches` (see `rayhooks.session_run_hook`) given a step's outputs."""
    if fetches is None:
        return None
    if isinstance(fetches, str):
        if fetches == GLOBAL_STEP and GLOBAL_STEP not in outputs:
            return stale_step
        try:
            value = outputs[fetches]
        except KeyError:
            if outputs is NO_STEP_YET:
                raise FetchKeyError("fetch %r: no step has run in this session yet (it stopped before its first), "
                               "so there is no output of a step to fetch" % (fetches,)) from None
            raise FetchKeyError("fetch %r is not an output of the step; the step returned %s. Return a dict "
                           "from your step function whose keys name the values hooks fetch."
                           % (fetches, sorted(outputs) or "nothing")) from None
        # TF1's session.run returned numpy values: a tf.function's EagerTensor outputs become numpy
        # here, so hooks log, compare and format them as they did in TF1.
        if hasattr(value, "numpy"):
            return value.numpy()
        if is_per_replica(value):
            raise FetchTypeError("fetch %r is a per-replica value (%s) of a tf.distribute strategy; return "
                            "strategy.reduce(tf.distribute.ReduceOp.MEAN, ..., axis=None) (or SUM) from the step "
                            "instead of strategy.run's result" % (fetches, type(value).__name__))
        return value
    if isinstance(fetches, dict):
        return {k: resolve_fetches(v, outputs, stale_step) for k, v in fetches.items()}
    if isinstance(fetches, (list, tuple)):
        return type(fetches)(resolve_fetches(v, outputs, stale_step) for v in fetches)
    if hasattr(fetches, "numpy"):
        return fetches.numpy()
    if callable(fetches):
        return fetches()
    return fetches


class FetchKeyError(KeyError):
    """A fetch that names no output of the step; `_fetched_by` adds the hook and the step."""


class FetchTypeError(TypeError):
    """A fetch whose value hooks cannot use (a per-replica value); `_fetched_by` adds the hook and the step."""


def is_per_replica(value) -> bool:
    """A tf.distribute value with one component per replica (PerReplica, Mirrored): no numpy of its own."""
    return type(value).__module__.startswith("tensorflow.python.distribute.")


def as_outputs(result) -> dict:
    """A step's return value as named outputs: a dict as is, anything else as 'output'."""
    if result is None:
        return {}
    if isinstance(result, dict):
        return result
    return {"output": result}


class SessionHandle:
    """The `session` of hooks and listeners. Picklable: live objects stay behind."""

    def __init__(self, checkpoint_dir=None, summary_dir=None, is_chief=True, worker_index=0,
                 num_workers=1, saver=None, store=None):
        self.global_step = 0
        self.checkpoint_dir = checkpoint_dir
        self.summary_dir = summary_dir
        self.is_chief = is_chief
        self.worker_index = worker_index
        self.num_workers = num_workers
        self.alive_workers = list(range(num_workers))
        self.latest_checkpoint: Optional[str] = None
        self.outputs = NO_STEP_YET
        self.saver = saver
        self._store = store
        self._woken = False
        self._alarm = None

    def wake(self) -> None:
        """Makes the next run call every hook: for hooks whose state changes outside the loop.

        Hooks that declare `_quiet_until` are skipped on runs that cannot
        trigger them; a signal, a finished background save or a plan from
        the chief calls this (from any thread) to end such a quiet stretch.
        """
        self._woken = True

    def wake_in(self, seconds: float) -> None:
        """Calls `wake()` after `seconds`, from a timer thread (the earliest of pending requests wins)."""
        if self._alarm is None:
            self._alarm = Alarm(self.wake)
        self._alarm.set(seconds)

    def _close_alarm(self) -> None:
        if self._alarm is not None:
            self._alarm.close()

    def __getstate__(self):
        state = dict(self.__dict__)
        state["saver"] = None
        state["outputs"] = {}
        state["_alarm"] = None
        return state

    def __repr__(self):
        return "SessionHandle(global_step=%d, checkpoint_dir=%r, worker_index=%d/%d)" % (
            self.global_step, self.checkpoint_dir, self.worker_index, self.num_workers)

    def run(self, fetches):
        return resolve_fetches(fetches, self.outputs, self.global_step)

    def restore(self, checkpoint=None, into=None):
        """Restores a committed checkpoint; returns its step.

        `checkpoint` is a step number, a checkpoint URL prefix, or None for the
        latest. `into` is what to load into (a `tf.train.Checkpoint`, trackables
        or a dict of numpy arrays); by default the run's own state.
        """
        from rayhooks.savers import as_saver
        if self._store is None:
            raise ValueError("this session has no checkpoint_dir, so there is nothing to restore")
        infos = self._store.committed()
        if checkpoint is None:
            chosen = infos[-1] if infos else None
        else:
            chosen = next((i for i in infos if checkpoint in (i.step, i.url, i.prefix)), None)
        if chosen is None:
            raise FileNotFoundError("%s: no committed checkpoint %s" % (
                self.checkpoint_dir, "yet" if checkpoint is None else repr(checkpoint)))
        saver = as_saver(into) if into is not None else self.saver
        if saver is None:
            raise ValueError("nothing to restore into: pass into=..., or give the session state=")
        saver.restore(self._store.reader(chosen))
        return chosen.step


class Alarm:
    """One daemon thread that calls `fn` at the earliest requested time; `pending` is that time."""

    def __init__(self, fn, clock=time.monotonic):
        self._fn = fn
        self._clock = clock
        self._cond = threading.Condition()
        self.pending = None
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="rayhooks-alarm", daemon=True)
        self._thread.start()

    def set(self, seconds: float) -> None:
        at = self._clock() + max(0.0, seconds)
        with self._cond:
            if self.pending is None or at < self.pending:
                self.pending = at
                self._cond.notify()

    def _loop(self):
        with self._cond:
            while not self._closed:
                if self.pending is None:
                    self._cond.wait()
                    continue
                left = self.pending - self._clock()
                if left > 0:
                    self._cond.wait(left)
                    continue
                self.pending = None
                self._fn()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
