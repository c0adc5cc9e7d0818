"""Step/seconds timers, with an injectable clock.

`SecondOrStepTimer` keeps TensorFlow's trigger arithmetic exactly (see
`tf.compat.v1.train.SecondOrStepTimer`): the first call triggers, a step never
triggers twice in a row, and otherwise a trigger needs `every_steps` steps or
`every_secs` seconds since the last trigger. Unlike TensorFlow's, the clock is
an argument, so schedules are tested with a fake clock and no sleeping.
"""

import numbers
import time
from typing import Callable, Optional, Tuple

Clock = Callable[[], float]

NEVER_STEP = 1 << 62  # a step no run reaches: "not by step count" in the hooks' `_quiet_until`


class ManualClock:
    """A clock for tests and simulations: time moves only when told to."""

    def __init__(self, start: float = 0.0):
        self.now = float(start)

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def is_count(value, minimum: int = 0) -> bool:
    """Whether `value` is a whole number (numpy's too, not a bool) of at least `minimum`: a step count."""
    return not isinstance(value, bool) and isinstance(value, numbers.Integral) and value >= minimum


class SecondOrStepTimer:
    """Triggers at most once every `every_secs` seconds or `every_steps` steps."""

    def __init__(self, every_secs=None, every_steps=None, clock: Optional[Clock] = None,
                 names=("every_secs", "every_steps")):
        """`names`: the caller's own names for the two arguments, for its errors (e.g. save_secs, save_steps)."""
        if every_secs is None and every_steps is None:
            raise ValueError("Either every_secs or every_steps should be provided.")
        if every_secs is not None and every_steps is not None:
            raise ValueError("Can not provide both every_secs and every_steps.")
        # TF1 took any value: 0 triggers at every step (kept), a negative one did too and a string failed
        # at the first step (refused here). A whole float (100.0) counts as the integer.
        if every_steps is not None and not isinstance(every_steps, bool) and isinstance(every_steps, numbers.Real) \
                and not isinstance(every_steps, numbers.Integral) and float(every_steps).is_integer():
            every_steps = int(every_steps)
        if every_steps is not None and not is_count(every_steps):
            raise ValueError("%s must be a whole number of steps >= 0, got %r" % (names[1], every_steps))
        if every_secs is not None and (isinstance(every_secs, bool) or not isinstance(every_secs, numbers.Real)
                                       or not every_secs >= 0):
            raise ValueError("%s must be a number of seconds >= 0, got %r" % (names[0], every_secs))
        self._every_secs = every_secs
        self._every_steps = every_steps
        self._clock = clock or time.time
        self.reset()

    @property
    def clock(self) -> Clock:
        return self._clock

    @property
    def every_secs(self):
        return self._every_secs

    @property
    def every_steps(self):
        return self._every_steps

    def reset(self) -> None:
        self._last_triggered_step = None
        self._last_triggered_time = None

    def should_trigger_for_step(self, step: int) -> bool:
        if self._last_triggered_step is None:
            return True
        if self._last_triggered_step == step:
            return False
        if self._every_secs is not None:
            return self._clock() >= self._last_triggered_time + self._every_secs
        return step >= self._last_triggered_step + self._every_steps

    def update_last_triggered_step(self, step: int) -> Tuple[Optional[float], Optional[int]]:
        """Records a trigger at `step`; returns (elapsed_secs, elapsed_steps) since the last one."""
        now = self._clock()
        if self._last_triggered_time is None:
            elapsed = (None, None)
        else:
            elapsed = (now - self._last_triggered_time, step - self._last_triggered_step)
        self._last_triggered_time = now
        self._last_triggered_step = step
        return elapsed

    def last_triggered_step(self) -> Optional[int]:
        return self._last_triggered_step

    def next_time_trigger(self) -> Optional[float]:
        """The clock reading from which a seconds-based timer triggers, known in advance.

        None for a step-based timer or before the first trigger. A step that
        ends before it cannot trigger this timer, so a session can skip the
        hook on it and look at the clock alone.
        """
        if self._every_secs is None or self._last_triggered_time is None:
            return None
        return self._last_triggered_time + self._every_secs

    def next_step_trigger(self) -> Optional[int]:
        """The step at which a step-based timer triggers next, known in advance.

        None for a seconds-based timer (its trigger depends on the clock) or
        before the first trigger. This is what lets the chief announce a
        save before any worker reaches it.
        """
        if self._every_steps is None or self._last_triggered_step is None:
            return None
        return self._last_triggered_step + self._every_steps


class NeverTriggerTimer:
    """A timer that never triggers."""

    def reset(self) -> None:
        pass

    def should_trigger_for_step(self, step: int) -> bool:
        return False

    def update_last_triggered_step(self, step: int):
        return (None, None)

    def last_triggered_step(self):
        return None

    def next_step_trigger(self):
        return None

    def next_time_trigger(self):
        return None
