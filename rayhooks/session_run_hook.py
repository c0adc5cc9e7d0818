"""The hook protocol: what a hook sees, and when.

The call order is TensorFlow's `SessionRunHook` contract, unchanged:

    call hooks.begin()
    restore the latest committed checkpoint, if any
    call hooks.after_create_session(session, coord)
    while not stop is requested:
      call hooks.before_run(run_context)      # may return SessionRunArgs
      try:
        outputs = step_fn(*args)               # your training step
      except (OutOfRangeError, StopIteration):
        break
      call hooks.after_run(run_context, run_values)
    call hooks.end(session)                    # not called if the step raised

`session` is a `rayhooks.SessionHandle` (not a `tf.Session`): it carries the
global step, the run's directories, the latest committed checkpoint and a way
to restore one; `session.run(fetches)` resolves fetches like a hook's
`SessionRunArgs` does, against the latest step outputs.

Fetches name what the hook wants from the step: a string is the name of a
value your step function returned (a dict entry; a non-dict return value is
called "output"); the name "global_step" is the step before the run, as TF1's
cached global-step read; a `tf.Variable` (or anything with `.numpy()`) is
read; a callable is called; lists, tuples and dicts nest.
"""

import collections

# Fetch name for the global step as it was before the run (TF1's cached read).
GLOBAL_STEP = "global_step"


class SessionRunHook:
    """Hook to extend calls to `MonitoredSession.run()`. Every method is optional."""

    def begin(self):
        """Called once before the session is created."""

    def after_create_session(self, session, coord):
        """Called when the session is ready (after restore), and again after a recovery."""

    def before_run(self, run_context):
        """Called before each run; may return a `SessionRunArgs` naming fetches."""
        return None

    def after_run(self, run_context, run_values):
        """Called after each run with the fetched values in `run_values.results`."""

    def end(self, session):
        """Called at the end of the session, unless the step raised."""


class SessionRunArgs(collections.namedtuple("SessionRunArgs", ["fetches", "feed_dict", "options"])):
    """What a hook asks of the next run: `fetches` (see the module docstring).

    `feed_dict` and `options` exist for signature compatibility with TF1; a TF2
    step function has no feeds, so a non-empty `feed_dict` is rejected when the
    session runs.
    """

    def __new__(cls, fetches, feed_dict=None, options=None):
        return super().__new__(cls, fetches, feed_dict, options)


class SessionRunValues(collections.namedtuple("SessionRunValues", ["results", "options", "run_metadata"])):
    """What a hook gets back: `results` has the structure of its fetches."""


class SessionRunContext:
    """Per-run context handed to `before_run` and `after_run`."""

    __slots__ = ("_original_args", "_session", "_stop_requested")

    def __init__(self, original_args, session):
        self._original_args = original_args
        self._session = session
        self._stop_requested = False

    @property
    def original_args(self):
        """The `SessionRunArgs` of the step being run: fetches is the step function."""
        return self._original_args

    @property
    def session(self):
        """The `SessionHandle` of the run."""
        return self._session

    @property
    def stop_requested(self):
        return self._stop_requested

    def request_stop(self):
        """Stops the loop after this run: `should_stop()` becomes True."""
        self._stop_requested = True


def check_hooks(hooks, argument: str = "hooks") -> list:
    """`hooks` as a list; a TypeError for what cannot run as a hook here, saying what to pass instead."""
    hooks = list(hooks or [])
    for hook in hooks:
        if isinstance(hook, type):
            raise TypeError("%s holds the class %s, not a hook: pass an instance, %s(...)"
                            % (argument, hook.__name__, hook.__name__))
        cls = type(hook)
        if cls.__module__.startswith("tensorflow.") and cls.__name__ != "SessionRunHook":
            import rayhooks
            if hasattr(rayhooks, cls.__name__):
                fix = "pass rh.%s instead: the same arguments, for TF2 code" % cls.__name__
            else:
                fix = "rayhooks has no %s: write a SessionRunHook of your own" % cls.__name__
            raise TypeError("%s holds TensorFlow's own tf.compat.v1.train.%s, a TF1 graph hook that needs a "
                            "tf.Graph and a tf.compat.v1.Session; %s" % (argument, cls.__name__, fix))
        if not isinstance(hook, SessionRunHook) and not hasattr(hook, "after_run"):
            raise TypeError("%s must hold SessionRunHook instances, got %r" % (argument, hook))
    return hooks
