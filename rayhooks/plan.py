"""The chief's planning, as pure decisions: no Ray, no I/O, no threads.

Workers run ahead of the chief, so the chief cannot "save now": it announces
"snapshot after step S" for an S no worker has reached yet, and every worker
acts on the same S (DESIGN I1). A step-based schedule knows S in advance
(TF1's arithmetic: the first trigger at the starting step, then every N
steps). A seconds-based one, once its deadline passes, picks
S = (furthest step any worker reported) + margin, where the margin covers
the steps workers run while the announcement travels.

The planner turns (progress, clock) into `Action` values; the chief carries
them out. Tests drive it with a `ManualClock`.
"""

import dataclasses
import math
from typing import Dict, List, Optional, Tuple

CHECKPOINT = "checkpoint"
SUMMARY = "summary"


@dataclasses.dataclass(frozen=True)
class Action:
    """Something every worker does right after `step`."""

    step: int
    kind: str                       # CHECKPOINT or SUMMARY
    fetches: Tuple[str, ...] = ()   # step outputs to report (summaries)
    every: Optional[int] = None     # repeats every N steps after `step` (step-based schedules)


class Schedule:
    """One timer-driven action (a checkpoint or a summary schedule) planned ahead of the workers."""

    def __init__(self, kind, timer, first_offset=0, fetches=()):
        self.kind = kind
        self.timer = timer
        self.first_offset = first_offset  # TF1: checkpoints start at the initial step, summaries one later
        self.fetches = tuple(fetches)
        self.pending: Optional[int] = None
        self.hinted: Optional[float] = None  # the trigger time whose next deadline the workers were told of

    def plan(self, start_step: int, furthest: int, margin: int) -> Optional[Action]:
        """The next action to announce, if one is due and none is pending.

        A step-based schedule is announced once, as a rule the workers apply
        themselves (`Action.every`): its steps are TF1's exactly, however fast
        the workers run ahead of the chief.
        """
        if self.pending is not None and furthest >= self.pending:
            self.pending = None
        if self.pending is not None:
            return None
        last = self.timer.last_triggered_step()
        if last is None:
            step = start_step + self.first_offset
            self.timer.update_last_triggered_step(step)
            self.pending = step
            return Action(step, self.kind, self.fetches, self.timer.every_steps)
        if self.timer.every_steps is not None or margin is None:
            return None  # a seconds schedule waits until the workers' speed is known
        if self.timer.should_trigger_for_step(furthest + margin):
            step = furthest + margin
        else:
            return None
        self.timer.update_last_triggered_step(step)
        self.pending = step
        return Action(step, self.kind, self.fetches)

    def done(self, step: int) -> None:
        if self.pending == step:
            self.pending = None

    def seconds_until_due(self) -> Optional[float]:
        """For a seconds schedule with nothing pending: how long until its deadline, by its timer's clock."""
        timer = self.timer
        last_time = getattr(timer, "_last_triggered_time", None)
        if timer.every_secs is None or self.pending is not None or last_time is None:
            return None
        return last_time + timer.every_secs - timer._clock()

    def is_planned(self, step: int, stop_step: Optional[int] = None) -> bool:
        """Whether `step` carries this schedule's action (for rules, any step on the rule)."""
        last = self.timer.last_triggered_step()
        if self.timer.every_steps is None or last is None:
            return False
        base = last if self.first_offset == 0 else last
        return step >= base and (step - base) % self.timer.every_steps == 0 and \
            (stop_step is None or step <= stop_step)


class Planner:
    """Decides which steps carry actions and where the run stops."""

    def __init__(self, start_step: int, schedules: List[Schedule], last_step: Optional[int] = None,
                 min_margin: int = 2):
        self.start_step = start_step
        self.schedules = schedules
        self.last_step = last_step
        self.min_margin = min_margin
        self.stop_step: Optional[int] = None

    def margin(self, steps_per_sec: float, latency_secs: float) -> int:
        """Steps a worker runs while an announcement reaches it, with a safety factor of 2."""
        return max(self.min_margin, int(math.ceil(2 * steps_per_sec * latency_secs)) + 1)

    def tick(self, furthest: int, margin: int) -> List[Action]:
        """Actions to announce now, given the furthest step any worker reported."""
        out = []
        for schedule in self.schedules:
            action = schedule.plan(self.start_step, furthest, margin)
            if action is not None and (self.stop_step is None or action.step <= self.stop_step):
                out.append(action)
            elif action is not None:
                schedule.pending = None
        return out

    def report_hint(self, within: float) -> Optional[float]:
        """Seconds from now after which the workers should report, once per seconds deadline.

        A deadline within `within` seconds (the periodic report interval) that
        was not hinted yet is: the workers then report right after it, so the
        step announced for it is planned from fresh progress however long the
        report interval is. Deadlines further away are left to the periodic
        reports, the last of which arrives within `within` of them.
        """
        soonest, chosen = None, None
        for schedule in self.schedules:
            left = schedule.seconds_until_due()
            if left is None or left <= 0 or left > within or schedule.hinted == schedule.timer._last_triggered_time:
                continue
            if soonest is None or left < soonest:
                soonest, chosen = left, schedule
        if chosen is not None:  # a later deadline is hinted at the report this one brings
            chosen.hinted = chosen.timer._last_triggered_time
        return soonest

    def seconds_due(self) -> bool:
        """Whether a seconds schedule's deadline has passed and its step is not announced yet."""
        for schedule in self.schedules:
            left = schedule.seconds_until_due()
            if left is not None and left <= 0:
                return True
        return False

    def request_stop(self, furthest: int, margin: int) -> int:
        """The step every worker stops after: the earliest one still ahead of all of them."""
        step = furthest + margin
        if self.last_step is not None:
            step = min(step, max(self.last_step, furthest))
        if self.stop_step is None or step < self.stop_step:
            self.stop_step = step
        return self.stop_step

    def initial_stop(self) -> Optional[int]:
        if self.last_step is not None:
            self.stop_step = self.last_step
        return self.stop_step

    def done(self, action: Action) -> None:
        for schedule in self.schedules:
            if schedule.kind == action.kind:
                schedule.done(action.step)


def furthest_step(progress: Dict[int, int]) -> int:
    return max(progress.values()) if progress else 0
