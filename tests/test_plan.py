"""Tier 1: the chief's planning as pure decisions (rayhooks.plan), and the
chief's seconds schedule driven by a fake clock and a fake transport.

Expected steps come from `tf.compat.v1.train.SecondOrStepTimer` run through
TF1's own hook arithmetic (`tf1_checkpoint_steps`, `tf1_summary_steps`), so a
drift in either side's trigger rules shows up here.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest
import tensorflow as tf

import rayhooks as rh
from rayhooks.chief import Chief
from rayhooks.plan import CHECKPOINT, SUMMARY, Action, Planner, Schedule, furthest_step
from rayhooks.spec import build_spec


# -- TF1's schedules, by TF1's own timer ----------------------------------------------------------

def tf1_checkpoint_steps(start, every, last):
    """The steps TF1's CheckpointSaverHook saves in a run from `start` to `last`.

    after_create_session saves at `start`; after_run saves at step g when
    the timer triggers for g; end saves `last` unless the timer just fired there.
    """
    timer = tf.compat.v1.train.SecondOrStepTimer(every_steps=every)
    steps = [start]
    timer.update_last_triggered_step(start)
    for global_step in range(start + 1, last + 1):
        if timer.should_trigger_for_step(global_step):
            timer.update_last_triggered_step(global_step)
            steps.append(global_step)
    if last != timer.last_triggered_step():
        steps.append(last)
    return steps


def tf1_summary_steps(start, every, last):
    """The steps TF1's SummarySaverHook writes in a run from `start` to `last`.

    before_run asks for a summary when `_next_step` is None (the first run) or
    the timer triggers for it; after_run records it at the new global step.
    """
    timer = tf.compat.v1.train.SecondOrStepTimer(every_steps=every)
    steps, next_step = [], None
    for stale in range(start, last):
        request = next_step is None or timer.should_trigger_for_step(next_step)
        global_step = stale + 1
        if request:
            timer.update_last_triggered_step(global_step)
            steps.append(global_step)
        next_step = global_step + 1
    return steps


def test_tf1_reference_arithmetic_is_what_the_brief_says():
    assert tf1_checkpoint_steps(0, 4, 10) == [0, 4, 8, 10]
    assert tf1_checkpoint_steps(0, 3, 9) == [0, 3, 6, 9]
    assert tf1_summary_steps(0, 3, 10) == [1, 4, 7, 10]


def _rule_steps(action, first, last):
    return [s for s in range(first, last + 1) if s >= action.step and (s - action.step) % action.every == 0]


# -- step-based schedules: one rule, announced once -----------------------------------------------

@pytest.mark.parametrize("start,every,last", [(0, 4, 10), (0, 3, 9), (5, 4, 17), (0, 1, 3), (7, 10, 7),
                                              (12, 5, 40)])
def test_checkpoint_step_rule_gives_tf1_steps(start, every, last):
    schedule = Schedule(CHECKPOINT, rh.SecondOrStepTimer(every_steps=every))
    planner = Planner(start, [schedule], last_step=last)
    assert planner.initial_stop() == last
    actions = planner.tick(start, planner.min_margin)
    assert actions == [Action(start, CHECKPOINT, (), every)]
    # A rule is announced once: later ticks, however far the workers are, add nothing.
    for furthest in range(start, last + 1):
        assert planner.tick(furthest, 50) == []
    planned = _rule_steps(actions[0], start, last)
    assert planned == [s for s in range(start, last + 1) if schedule.is_planned(s, planner.stop_step)]
    final = [] if planned[-1] == last else [last]  # the chief's final save, unless `last` was just saved
    assert planned + final == tf1_checkpoint_steps(start, every, last)


@pytest.mark.parametrize("start,every,last", [(0, 3, 10), (0, 1, 4), (4, 5, 30), (0, 100, 10)])
def test_summary_step_rule_starts_one_step_later_like_tf1(start, every, last):
    schedule = Schedule(SUMMARY, rh.SecondOrStepTimer(every_steps=every), first_offset=1, fetches=["loss"])
    planner = Planner(start, [schedule], last_step=last)
    planner.initial_stop()
    actions = planner.tick(start, 2)
    assert actions == [Action(start + 1, SUMMARY, ("loss",), every)]
    assert _rule_steps(actions[0], start, last) == tf1_summary_steps(start, every, last)


def test_rule_steps_past_the_stop_step_are_not_planned():
    schedule = Schedule(CHECKPOINT, rh.SecondOrStepTimer(every_steps=4))
    planner = Planner(10, [schedule], last_step=10)
    planner.initial_stop()
    assert planner.tick(10, 2) == [Action(10, CHECKPOINT, (), 4)]
    assert schedule.is_planned(10, planner.stop_step)
    assert not schedule.is_planned(14, planner.stop_step)
    assert schedule.is_planned(14)  # without a stop, the rule goes on


# -- seconds-based schedules: planned ahead by a margin -------------------------------------------

def test_secs_schedule_plans_the_first_step_past_the_deadline_that_workers_can_still_reach():
    clock = rh.ManualClock(100.0)
    schedule = Schedule(CHECKPOINT, rh.SecondOrStepTimer(every_secs=10, clock=clock))
    planner = Planner(0, [schedule])
    assert planner.tick(0, 2) == [Action(0, CHECKPOINT)]  # TF1: a save at session creation
    clock.advance(9.5)
    assert planner.tick(5, 3) == []                       # deadline not reached
    clock.advance(0.5)
    first = planner.tick(7, 3)
    assert first == [Action(10, CHECKPOINT)]              # furthest + margin: ahead of every worker
    assert first[0].every is None                         # announced once, not a rule
    clock.advance(100)
    assert planner.tick(9, 3) == []                       # at most one pending: 10 is not reached yet
    # Reached: the next deadline counts from when 10 was announced (t=110), already past at t=210.
    assert planner.tick(10, 4) == [Action(14, CHECKPOINT)]
    clock.advance(9)
    assert planner.tick(20, 4) == []
    clock.advance(1)
    assert planner.tick(20, 4) == [Action(24, CHECKPOINT)]


def test_report_hint_names_each_secs_deadline_once_when_it_falls_within_the_report_interval():
    clock = rh.ManualClock(100.0)
    ckpt = Schedule(CHECKPOINT, rh.SecondOrStepTimer(every_secs=10, clock=clock))
    summ = Schedule(SUMMARY, rh.SecondOrStepTimer(every_secs=10.5, clock=clock), first_offset=1)
    steps = Schedule(CHECKPOINT, rh.SecondOrStepTimer(every_steps=5))
    planner = Planner(0, [ckpt, summ, steps])
    planner.tick(0, 2)                                   # first triggers at t=100; the rule is a rule
    assert planner.tick(5, 2) == []                      # the first ones reached: nothing pending
    assert planner.report_hint(0.5) is None              # deadlines at 110 and 110.5: further than 0.5 s
    assert not planner.seconds_due()
    clock.advance(9.75)
    assert planner.report_hint(0.5) == pytest.approx(0.25)  # the checkpoint's, the sooner one
    assert planner.report_hint(0.5) is None              # hinted once; the summary's is 0.75 s away
    clock.advance(0.25)
    assert planner.seconds_due()
    assert planner.tick(40, 3) == [Action(43, CHECKPOINT)]
    assert not planner.seconds_due()                     # announced: pending, nothing due
    assert planner.report_hint(0.5) == pytest.approx(0.5)  # now the summary's, 0.5 s away
    ckpt.done(43)
    clock.advance(9.9)
    assert planner.report_hint(0.5) == pytest.approx(0.1)  # the next period's deadline, hinted anew


def test_report_hint_skips_a_deadline_already_past():
    clock = rh.ManualClock(0.0)
    planner = Planner(0, [Schedule(CHECKPOINT, rh.SecondOrStepTimer(every_secs=1, clock=clock))])
    planner.tick(0, 2)
    planner.tick(1, 2)
    clock.advance(2)
    assert planner.report_hint(0.5) is None and planner.seconds_due()


@pytest.mark.parametrize("furthest,margin", [(0, 2), (17, 2), (17, 40), (1000, 101)])
def test_secs_action_is_never_at_or_behind_the_furthest_worker(furthest, margin):
    clock = rh.ManualClock()
    planner = Planner(0, [Schedule(CHECKPOINT, rh.SecondOrStepTimer(every_secs=1, clock=clock))])
    planner.tick(0, 2)
    clock.advance(1)
    (action,) = planner.tick(furthest, margin)
    assert action.step == furthest + margin > furthest


def test_done_releases_a_pending_secs_action():
    """A cancelled save (skipped by a worker) must not block the schedule forever."""
    clock = rh.ManualClock()
    schedule = Schedule(CHECKPOINT, rh.SecondOrStepTimer(every_secs=10, clock=clock))
    planner = Planner(0, [schedule])
    planner.tick(0, 2)
    clock.advance(10)
    (pending,) = planner.tick(3, 2)
    clock.advance(10)
    assert planner.tick(4, 2) == []   # still pending: step 5 not reached
    planner.done(pending)
    assert planner.tick(4, 2) == [Action(6, CHECKPOINT)]


def test_secs_action_past_the_stop_step_is_dropped():
    clock = rh.ManualClock()
    schedule = Schedule(CHECKPOINT, rh.SecondOrStepTimer(every_secs=10, clock=clock))
    planner = Planner(0, [schedule], last_step=12)
    planner.initial_stop()
    planner.tick(0, 2)
    clock.advance(10)
    assert planner.tick(11, 3) == []  # 14 > 12: the final save at 12 covers it
    assert schedule.pending is None


@pytest.mark.parametrize("rate,latency,expected", [(0.0, 0.05, 2), (10.0, 0.125, 4), (100.0, 0.25, 51),
                                                   (1000.0, 0.5, 1001)])
def test_margin_covers_twice_the_steps_run_during_the_latency(rate, latency, expected):
    assert Planner(0, []).margin(rate, latency) == expected


def test_margin_is_at_least_min_margin():
    assert Planner(0, [], min_margin=7).margin(10.0, 0.125) == 7


# -- stops -----------------------------------------------------------------------------------------

def test_no_last_step_means_no_initial_stop():
    planner = Planner(0, [])
    assert planner.initial_stop() is None
    assert planner.stop_step is None


def test_requested_stop_is_ahead_of_every_worker_and_only_moves_earlier():
    planner = Planner(0, [])
    assert planner.request_stop(10, 4) == 14
    assert planner.request_stop(20, 4) == 14  # a later request never postpones an agreed stop
    assert planner.request_stop(11, 1) == 12  # an earlier reachable one wins
    assert planner.stop_step == 12


def test_requested_stop_never_goes_past_last_step():
    planner = Planner(0, [], last_step=15)
    assert planner.initial_stop() == 15
    assert planner.request_stop(10, 8) == 15
    assert planner.request_stop(10, 2) == 12


def test_furthest_step():
    assert furthest_step({}) == 0
    assert furthest_step({0: 3, 1: 7}) == 7


# -- the chief's seconds schedule, with a fake clock and a fake transport ---------------------------

class TraceListener(rh.CheckpointSaverListener):
    def __init__(self):
        self.trace = []

    def before_save(self, session, step):
        self.trace.append(("before_save", step))

    def after_save(self, session, step):
        self.trace.append(("after_save", step))

    def end(self, session, step):
        self.trace.append(("end", step))


def _recorder(sent, settled=None):
    """A chief's `send` that records plans in `sent`, and the writers' settled steps in `settled`
    (with "failed" where the chief will commit nothing more)."""
    def send(i, update):
        if "settled" in update:
            if settled is not None:
                settled.append((i, update["settled"]) + (("failed",) if update.get("chief_failed") else ()))
        else:
            sent.append((i, update))
    return send


def _chief(tmp_path, clock, num_workers=2, latency=0.5, all_workers_write=False, settled=None, **hook_kwargs):
    listener = TraceListener()
    hook = rh.CheckpointSaverHook(str(tmp_path), clock=clock, listeners=[listener], **hook_kwargs)
    sent = []
    chief = Chief(build_spec([hook], all_workers_write), num_workers, _recorder(sent, settled),
                  report_latency=latency)
    return chief, listener, sent, hook.store


def _shard(store, step, worker=0):
    """A durable shard as a worker reports it: (step, worker, files)."""
    prefix = None if worker == 0 else "%s.worker%d" % (store.prefix_for(step), worker)
    return (step, worker, store.write_data(step, {"w": np.full(2, step, np.float32)}, prefix=prefix))


def test_chief_ignores_a_stop_asked_for_after_the_first_save_as_tf1_and_honours_a_later_one(tmp_path):
    """TF1's hook ignores after_save's answer for the save made as the session is created."""
    chief, listener, sent, store = _chief(tmp_path, rh.ManualClock(0.0), save_steps=5)
    listener.after_save = lambda session, step: True
    chief.start()
    chief.workers_created(0)
    chief.report(0, 1, 1.0, {}, [_shard(store, 0)], {})
    assert chief.committed == [0] and not [u for _, u in sent if u.get("stop_step") is not None]
    chief.report(0, 6, 2.0, {}, [_shard(store, 5)], {})
    assert chief.committed == [0, 5] and [u for _, u in sent if u.get("stop_step") is not None]


def test_chief_plans_a_secs_save_from_the_hook_clock_and_measured_rates(tmp_path):
    clock = rh.ManualClock(1000.0)
    chief, listener, sent, store = _chief(tmp_path, clock, save_secs=60)
    assert chief.start() is None
    first = chief.workers_created(0)
    assert first == {"actions": [Action(0, CHECKPOINT)], "stop_step": None}
    assert listener.trace == [("before_save", 0)]

    # `now` is the worker's wall clock in the report: rates come from it, not from the schedule clock.
    chief.report(0, 1, 10.0, {}, [_shard(store, 0)], {})
    assert chief.committed == [0] and listener.trace[-1] == ("after_save", 0)
    chief.report(0, 21, 11.0, {}, [], {})
    chief.report(1, 25, 11.5, {}, [], {})
    clock.advance(59)
    chief.report(1, 26, 12.0, {}, [], {})            # worker 1: 2 steps/s
    assert sent == []                                # deadline not reached: nothing announced
    clock.advance(1)
    chief.report(0, 31, 11.5, {}, [], {})            # worker 0: 20 steps/s
    # margin = ceil(2 * 20 steps/s * 0.5 s) + 1 = 21 steps past the furthest worker (31).
    expected = Action(52, CHECKPOINT)
    assert [i for i, _ in sent] == [0, 1]
    assert all(update == {"actions": [expected], "stop_step": None} for _, update in sent)
    assert listener.trace[-1] == ("before_save", 52)  # before any worker can snapshot it

    chief.report(0, 53, 12.0, {}, [_shard(store, 52)], {})
    assert chief.committed == [0, 52]
    assert listener.trace[-1] == ("after_save", 52)
    assert [i.step for i in store.committed()] == [0, 52]


def test_chief_asks_workers_to_report_right_after_a_secs_deadline(tmp_path):
    clock = rh.ManualClock(1000.0)
    chief, listener, sent, store = _chief(tmp_path, clock, latency=0.05, save_secs=60)
    chief._interval = 0.5
    chief.start()
    chief.workers_created(0)
    chief.report(0, 1, 10.0, {}, [_shard(store, 0)], {})
    clock.advance(59.0)
    chief.report(0, 20, 11.0, {}, [], {})
    assert sent == []                                    # 1 s away: the periodic reports come first
    clock.advance(0.7)
    chief.report(0, 26, 11.3, {}, [], {})
    assert [i for i, _ in sent] == [0, 1]
    assert all(set(u) == {"report_in"} and u["report_in"] == pytest.approx(0.3, abs=0.01) for _, u in sent)
    del sent[:]
    chief.report(1, 26, 11.3, {}, [], {})
    assert sent == []                                    # hinted once per deadline


def test_chief_plans_a_secs_save_from_where_stale_workers_are_by_now(tmp_path):
    """Reports can be an interval old when a deadline passes: each worker is projected at its rate."""
    clock = rh.ManualClock(1000.0)
    chief_clock = rh.ManualClock(50.0)
    listener = TraceListener()
    hook = rh.CheckpointSaverHook(str(tmp_path), clock=clock, listeners=[listener], save_secs=60)
    sent = []
    chief = Chief(build_spec([hook], False), 2, _recorder(sent),
                  clock=chief_clock, report_latency=0.05, report_interval=0.5)
    chief.start()
    chief.workers_created(0)
    chief.report(0, 1, 10.0, {}, [_shard(hook.store, 0)], {})
    chief.report(1, 0, 10.0, {}, [], {})
    chief.report(1, 100, 11.0, {}, [], {})               # worker 1: 100 steps/s, heard at t=50
    chief_clock.advance(0.4)
    chief.report(0, 41, 11.4, {}, [], {})                # worker 0: 100 steps/s, heard at t=50.4
    clock.advance(60)
    chief_clock.advance(0.1)
    chief.report(0, 51, 11.5, {}, [], {})
    # Worker 1 was heard 0.5 s ago at step 100: by now it is near 150, past worker 0's 51.
    margin = chief._margin()
    assert margin in (11, 12)                            # ceil(2 * 100 steps/s * 0.05 s) + 1, up to rounding
    (announced,) = {u["actions"][0].step for _, u in sent if u.get("actions")}
    assert announced == 150 + margin
    assert listener.trace[-1] == ("before_save", 150 + margin)


def test_chief_ignores_a_late_plan_reported_by_a_worker_that_does_not_write(tmp_path):
    """Worker 1 writes nothing (only worker 0 does): its "arrived late" is no skipped save."""
    clock = rh.ManualClock()
    chief, listener, sent, store = _chief(tmp_path, clock, save_secs=10)
    chief.start()
    chief.workers_created(0)
    chief.report(0, 1, 1.0, {}, [_shard(store, 0)], {})
    clock.advance(10)
    chief.report(0, 2, 1.5, {}, [], {})
    ((_, update), _) = sent
    (action,) = update["actions"]
    chief.report(1, action.step + 5, 2.0, {}, [], {}, skipped=(action.step,))
    chief.report(0, action.step + 1, 2.0, {}, [_shard(store, action.step)], {})
    assert chief.committed == [0, action.step]
    assert chief.skipped_saves == 0


def test_chief_final_save_when_the_last_planned_step_was_skipped(tmp_path):
    """The last step lies on the rule but the writer skipped it: the run must still end saved."""
    chief, listener, sent, store = _chief(tmp_path, rh.ManualClock(), save_steps=5)
    chief.start()
    chief.workers_created(0)
    chief.report(0, 10, 1.0, {}, [_shard(store, 0)], {}, skipped=(5, 10))
    assert chief.skipped_saves == 2
    assert chief.worker_end(1, 10) == []               # worker 1 writes nothing
    assert chief.worker_end(0, 10) == [Action(10, CHECKPOINT)]
    chief.shard_done(10, 0, _shard(store, 10)[2])
    summary = chief.finish()
    assert summary["committed"] == [0, 10]
    assert listener.trace[-1] == ("end", 10)


def test_chief_no_final_save_when_the_last_step_is_already_planned(tmp_path):
    chief, listener, sent, store = _chief(tmp_path, rh.ManualClock(), save_steps=5)
    chief.start()
    chief.workers_created(0)
    chief.report(0, 10, 1.0, {}, [_shard(store, 0)], {})
    assert chief.worker_end(0, 10) == []               # 10 is on the rule; its shard is on the way
    chief.report(0, 10, 1.1, {}, [_shard(store, 5), _shard(store, 10)], {})
    assert chief.finish()["committed"] == [0, 5, 10]
    assert [e for e in listener.trace if e[0] == "end"] == [("end", 10)]


@pytest.mark.parametrize("first", [0, 1])
def test_chief_final_save_with_all_workers_write_is_owed_by_every_worker(tmp_path, first):
    chief, listener, sent, store = _chief(tmp_path, rh.ManualClock(), all_workers_write=True, save_steps=4)
    chief.start()
    chief.workers_created(0)
    chief.report(0, 10, 1.0, {}, [_shard(store, 0, 0)], {})
    chief.report(1, 10, 1.0, {}, [_shard(store, 0, 1)], {})
    assert chief.committed == [0]
    second = 1 - first
    assert chief.worker_end(first, 10) == [Action(10, CHECKPOINT)]
    assert chief.worker_end(second, 10) == [Action(10, CHECKPOINT)]  # its shard is part of step 10
    chief.shard_done(10, first, _shard(store, 10, first)[2])
    assert chief.committed == [0]                                   # one shard is not a checkpoint
    chief.shard_done(10, second, _shard(store, 10, second)[2])
    assert chief.committed == [0, 10]


class _Reports:
    """A worker's transport that records the steps it reports."""

    def __init__(self):
        self.steps = []

    def report(self, worker, step, *rest):
        self.steps.append(step)


def test_worker_reports_right_after_the_deadline_the_chief_named():
    """Periodic reports every 0.25 s; a hint makes the next one come at the deadline instead."""
    from rayhooks.handle import SessionHandle
    from rayhooks.session_run_hook import SessionRunArgs, SessionRunContext
    from rayhooks.worker import WorkerAgent

    clock = rh.ManualClock(0.0)
    reports = _Reports()
    agent = WorkerAgent(1, build_spec([], False), reports, report_interval=0.25, clock=clock)
    session = SessionHandle(worker_index=1, num_workers=2)
    agent.after_create_session(session, None)

    def step(secs):
        clock.advance(secs)
        session.global_step += 1
        agent.after_run(SessionRunContext(SessionRunArgs(None), session), None)

    step(0.01)
    assert reports.steps == [1]                 # the first run reports at once
    for _ in range(9):
        step(0.01)
    assert reports.steps == [1]                 # next periodic one at t=0.26
    agent.receive({"report_in": 0.032})         # at t=0.10: the deadline is at t=0.132
    for _ in range(3):
        step(0.01)
    assert reports.steps == [1]                 # t=0.13: not yet
    step(0.01)
    assert reports.steps == [1, 14]             # t=0.14: right after it, not at t=0.26
    for _ in range(24):
        step(0.01)
    assert reports.steps == [1, 14]
    step(0.01)
    step(0.01)
    assert reports.steps[:2] == [1, 14] and reports.steps[2] in (39, 40)  # then periodic: 0.25 s later


def test_chief_never_commits_a_step_older_than_its_latest_commit(tmp_path):
    """Shards of step 20 that arrive after 40 committed (a report retried across a chief restart):
    40's clean-up may have collected them as partials, so 20 must not become a checkpoint."""
    clock = rh.ManualClock(0.0)
    chief, listener, sent, store = _chief(tmp_path, clock, num_workers=1, save_steps=20)
    chief.start()
    chief.workers_created(0)
    chief.report(0, 1, 1.0, {}, [_shard(store, 0)], {})
    late = _shard(store, 20)
    chief.report(0, 41, 2.0, {}, [_shard(store, 40)], {})
    assert chief.committed == [0, 40]
    chief.report(0, 42, 3.0, {}, [late], {})
    assert chief.committed == [0, 40]
    assert [info.step for info in store.committed()] == [0, 40]
    assert chief.skipped_saves == 1
    assert ("after_save", 20) not in listener.trace


def test_a_chief_restarted_between_two_writers_shards_fails_the_run_rather_than_drop_its_last_checkpoint(tmp_path):
    """A chief restarted between the two writers' reports, whose first writer does not report its shard
    again (writers do, unless lost with the chief), never sees the checkpoint whole (I6)."""
    clock = rh.ManualClock(1000.0)
    chief, listener, sent, store = _chief(tmp_path, clock, all_workers_write=True, save_steps=50)
    chief.start()
    chief.workers_created(0)
    chief.report(0, 1, 10.0, {}, [_shard(store, 0, 0)], {})
    chief.report(1, 1, 10.0, {}, [_shard(store, 0, 1)], {})
    assert chief.committed == [0]
    chief.report(0, 50, 11.0, {}, [_shard(store, 50, 0)], {})   # worker 0's shard of the last save
    assert chief.worker_end(0, 50) == []                           # step 50 was planned: no final save

    # Ray restarts the chief actor: a new Chief rebuilt from storage hears only worker 1's shard,
    # which worker 1 writes once more if the new chief asks for a final save.
    restarted = Chief(chief.spec, 2, lambda i, update: None, report_latency=0.5)
    restarted.recover()
    restarted.report(1, 50, 11.0, {}, [_shard(store, 50, 1)], {})
    assert [a.step for a in restarted.worker_end(1, 50)] in ([], [50])
    with pytest.raises(RuntimeError, match=r"\[step=50\] the checkpoint of step 50 in .* was not committed: only "
                                           r"the shards of workers \[1\].*newest committed checkpoint is step 0; "
                                           r"launch again with the same checkpoint_dir"):
        restarted.finish()
    assert store.latest().step == 0 and store.verify(store.latest()) == []


class _ToChief:
    """A worker's transport that hands each call to whichever chief `chiefs[-1]` is now."""

    def __init__(self, chiefs):
        self.chiefs = chiefs

    def report(self, *args):
        self.chiefs[-1].report(*args)

    report_and_wait = report

    def worker_end(self, *args):
        return self.chiefs[-1].worker_end(*args)


def _wired_writers(tmp_path, num_writers, report_interval=0):
    """A chief and `num_writers` WorkerAgents wired as in a launched run (every one a writer), past the
    first save (step 0). Writers report to `chiefs[-1]`; while `dying[0]`, the chief's settles are lost."""
    import types
    from rayhooks.handle import SessionHandle
    from rayhooks.worker import WorkerAgent
    listener = TraceListener()
    spec = build_spec([rh.CheckpointSaverHook(str(tmp_path), save_steps=5, listeners=[listener])],
                      all_workers_write=num_writers > 1)
    run = types.SimpleNamespace(spec=spec, listener=listener, chiefs=[], agents=[], sessions=[], dying=[False])

    def send(i, update):
        if not (run.dying[0] and "settled" in update):
            run.agents[i].receive(update)

    run.new_chief = lambda: run.chiefs.append(Chief(spec, num_writers, send, report_latency=0.5))
    run.new_chief()
    for i in range(num_writers):
        run.agents.append(WorkerAgent(i, spec, _ToChief(run.chiefs), report_interval=report_interval))
        run.sessions.append(SessionHandle(worker_index=i, num_workers=num_writers))
        run.sessions[i].saver = rh.NumpySaver({"w": np.full(2, i, np.float32)})
    run.chiefs[0].start()
    first = run.chiefs[0].workers_created(0)
    for agent, session in zip(run.agents, run.sessions):
        agent.receive(first)
        agent.after_create_session(session, None)  # step 0: each writes its shard of the first save
        agent.flush_report(0)
    assert run.chiefs[0].committed == [0]
    return run


def test_writers_report_their_uncommitted_shards_again_to_a_restarted_chief_which_commits_them(tmp_path):
    """Ray restarts the chief after it heard worker 0's shard of step 5 and before worker 1's: the new
    chief hears worker 0's again, commits step 5 once whole, and after_save(5) runs once."""
    run = _wired_writers(tmp_path, 2)
    chiefs, agents = run.chiefs, run.agents
    for agent, session in zip(agents, run.sessions):
        session.global_step = 5
        agent._save(session, 5)
    agents[0].flush_report(5)                          # the old chief holds worker 0's shard of step 5 ...
    assert chiefs[0].committed == [0]

    run.new_chief()                                    # ... and dies; Ray restarts it
    chiefs[1].recover()
    agents[1].flush_report(5)                          # worker 1's shard reaches the new chief only
    assert chiefs[1].committed == [0]
    agents[0].flush_report(6)                          # worker 0 reports its shard of 5 again
    assert chiefs[1].committed == [0, 5]
    assert _verified_steps(run.spec) == [0, 5]
    assert [e for e in run.listener.trace if e[0] == "after_save"] == [("after_save", 0), ("after_save", 5)]
    assert agents[0]._reported == [] and agents[1]._reported == []   # settled: never sent again
    chiefs[1].finish()


def test_shards_reported_again_that_the_chief_before_committed_reach_no_listener(tmp_path):
    """The dying chief committed steps 5 and 10, but its settles never reached the writer, which
    reports both again: the new chief neither counts them as skipped nor calls before_save(5)."""
    run = _wired_writers(tmp_path, 1)
    agent, session = run.agents[0], run.sessions[0]
    run.dying[0] = True
    for step in (5, 10):
        session.global_step = step
        agent._save(session, step)
        agent.flush_report(step)
    assert run.chiefs[0].committed == [0, 5, 10] and [s[0] for s in agent._reported] == [5, 10]
    run.dying[0] = False
    run.new_chief()
    del run.listener.trace[:]
    run.chiefs[1].recover()
    agent.flush_report(11)
    assert run.chiefs[1].committed == [10] and run.chiefs[1].skipped_saves == 0
    assert run.listener.trace == [] and agent._reported == []


def test_a_writer_at_its_end_waits_for_its_last_shard_to_commit_across_a_chief_restart(tmp_path):
    """all_workers_write, the run ends at step 7 with a final save. Worker 0 ends first: its shard of 7
    reaches the chief, which dies before worker 1's. Worker 0 has left its loop, so only its end() can
    report the shard again to the restarted chief; the final checkpoint then commits whole."""
    import threading
    run = _wired_writers(tmp_path, 2, report_interval=0.01)
    chiefs, agents, sessions = run.chiefs, run.agents, run.sessions
    for session in sessions:
        session.global_step = 7
    reported = threading.Event()
    ended = threading.Event()

    def end_worker_0():
        agents[0].end(sessions[0])
        ended.set()

    original = chiefs[0].report
    chiefs[0].report = lambda *args: (original(*args), reported.set() if args[4] else None)
    threading.Thread(target=end_worker_0, daemon=True).start()
    assert reported.wait(30)                                 # worker 0's shard of 7 reached the old chief
    assert not ended.wait(0.2)                               # and its end waits for that checkpoint
    run.new_chief()                                          # the chief dies; Ray restarts it
    chiefs[1].recover()
    agents[1].end(sessions[1])
    assert ended.wait(30)
    assert chiefs[1].committed == [0, 7]
    assert _verified_steps(run.spec) == [0, 7]
    chiefs[1].finish()


def test_shards_asked_for_again_while_a_report_is_made_go_at_the_next_step_not_a_report_interval_later(tmp_path):
    """The chief dies holding worker 0's report of its shard of step 5, and the restarted chief asks for
    the shard again before that report call has returned. The shard goes with the next step's report,
    not one report interval (an hour here) later, when the report that was under way has finished."""
    from rayhooks.session_run_hook import SessionRunArgs, SessionRunContext
    run = _wired_writers(tmp_path, 1, report_interval=3600)
    agent, session = run.agents[0], run.sessions[0]

    class DiesWithTheReport(_ToChief):
        def report(self, *args):
            if args[4] and len(run.chiefs) == 1:  # the first report of a shard: lost with the chief
                run.new_chief()
                run.chiefs[1].recover()           # tells the writer, while its report is still being made
                return
            super().report(*args)

    agent._transport = DiesWithTheReport(run.chiefs)

    def run_step(step):
        session.global_step = step
        agent.after_run(SessionRunContext(SessionRunArgs(None), session), None)
    run_step(5)                                    # saves step 5 and reports the shard at once
    assert [s[0] for s in agent._shards] == [5]    # asked for again
    assert run.chiefs[1].committed == [0]
    run_step(6)
    assert run.chiefs[1].committed == [0, 5]
    assert _verified_steps(run.spec) == [0, 5]
    run.chiefs[1].finish()


def _verified_steps(spec):
    store = spec.checkpoint.store
    return [info.step for info in store.committed() if store.verify(info) == []]


# -- settling saves with the writers: what bounds uncommitted checkpoints behind a slow listener --

class _SeesSettled(TraceListener):
    """Records, in after_save, what the writers had been told was settled by then."""

    def __init__(self, settled):
        super().__init__()
        self.settled = settled
        self.settled_in_after_save = {}

    def after_save(self, session, step):
        super().after_save(session, step)
        self.settled_in_after_save[step] = list(self.settled)


@pytest.mark.parametrize("all_workers_write", [False, True])
def test_chief_settles_a_save_with_its_writers_only_after_after_save_returned(tmp_path, all_workers_write):
    settled = []
    chief, _, sent, store = _chief(tmp_path, rh.ManualClock(), all_workers_write=all_workers_write,
                                   settled=settled, save_steps=5)
    listener = _SeesSettled(settled)
    chief.spec.checkpoint.listeners.append(listener)
    chief.start()
    chief.workers_created(0)
    writers = [0, 1] if all_workers_write else [0]
    for w in writers:
        chief.report(w, 1, 1.0, {}, [_shard(store, 0, w)], {})
    assert chief.committed == [0]
    assert listener.settled_in_after_save[0] == []         # after_save(0) ran before anything was settled
    assert settled == [(w, 0) for w in writers]             # then every writer heard of it, and only writers
    del settled[:]
    for w in writers:
        chief.report(w, 6, 2.0, {}, [_shard(store, 5, w)], {})
    assert listener.settled_in_after_save[5] == []
    assert settled == [(w, 5) for w in writers]


def test_chief_settles_skipped_failed_and_late_saves_so_no_writer_waits_for_them(tmp_path):
    settled = []
    chief, _, sent, store = _chief(tmp_path, rh.ManualClock(), all_workers_write=True, settled=settled,
                                   save_steps=5)
    chief.start()
    chief.workers_created(0)
    chief.report(0, 1, 1.0, {}, [_shard(store, 0, 0)], {})
    chief.report(1, 1, 1.0, {}, [_shard(store, 0, 1)], {})
    del settled[:]
    chief.report(0, 6, 2.0, {}, [_shard(store, 5, 0)], {})  # worker 0 wrote step 5 ...
    assert settled == []
    chief.report(1, 6, 2.0, {}, [], {}, skipped=(5,))       # ... worker 1 skipped it: it never commits
    assert settled == [(0, 5), (1, 5)]
    del settled[:]
    chief.report(1, 11, 3.0, {}, [], {}, failed=(10,))      # a write that failed (retry_next_save)
    assert settled == [(0, 10), (1, 10)]


def test_a_restarted_or_failed_chief_settles_every_save(tmp_path):
    """A restarted chief never hears of the shards reported to the one before; a failed one commits nothing."""
    settled = []
    chief, listener, sent, store = _chief(tmp_path, rh.ManualClock(), save_steps=5)
    chief.start()
    chief.workers_created(0)
    chief.report(0, 1, 1.0, {}, [_shard(store, 0)], {})
    restarted = Chief(chief.spec, 2, _recorder([], settled), report_latency=0.5)
    restarted.recover()
    assert settled == [(0, None)]

    class Raises(rh.CheckpointSaverListener):
        def after_save(self, session, step):
            raise ValueError("the evaluation failed")

    del settled[:]
    restarted.spec.checkpoint.listeners.append(Raises())
    restarted.report(0, 6, 2.0, {}, [_shard(store, 5)], {})
    assert settled == [(0, None, "failed")]                  # after_save(5) raised: no later save commits
    with pytest.raises(ValueError, match="the evaluation failed"):
        restarted.finish()


def test_a_restarted_chief_that_cannot_reach_a_worker_still_recovers(tmp_path, caplog):
    """Ray restarts a chief while a worker is gone too (its node died): `ray.get_actor` raises in `send`.
    The worker group is replaced anyway, so the constructor must not fail on it."""
    chief, listener, sent, store = _chief(tmp_path, rh.ManualClock(), save_steps=5)
    chief.start()
    chief.workers_created(0)
    chief.report(0, 1, 1.0, {}, [_shard(store, 0)], {})

    def unreachable(i, update):
        raise ValueError("Failed to look up actor with name 'rayhooks-run-worker-%d'" % i)

    restarted = Chief(chief.spec, 2, unreachable, report_latency=0.5)
    with caplog.at_level("WARNING", logger="rayhooks"):
        restarted.recover()
    assert restarted.committed == [0]
    assert "could not tell the workers" in caplog.text and "Failed to look up actor" in caplog.text


def test_a_failed_chief_tells_a_new_worker_group_that_no_save_waits_for_it(tmp_path):
    chief, listener, sent, store = _chief(tmp_path, rh.ManualClock(), save_steps=5)

    class Raises(rh.CheckpointSaverListener):
        def after_save(self, session, step):
            raise ValueError("the evaluation failed")

    chief.spec.checkpoint.listeners.append(Raises())
    chief.start()
    chief.workers_created(0)
    chief.report(0, 1, 1.0, {}, [_shard(store, 0)], {})
    chief.workers_lost("worker 1: lost")
    first = chief.workers_created(0)
    assert first["settled"] is None and first["chief_failed"]


def _writer_agent(tmp_path, worker=0, **hook_kwargs):
    from rayhooks.handle import SessionHandle
    from rayhooks.worker import WorkerAgent
    spec = build_spec([rh.CheckpointSaverHook("file://" + str(tmp_path), save_steps=5, **hook_kwargs)],
                      all_workers_write=True)
    agent = WorkerAgent(worker, spec, _Reports(), report_interval=0)
    session = SessionHandle(worker_index=worker, num_workers=2)
    session.saver = rh.NumpySaver({"w": np.zeros(2, np.float32)})
    agent.after_create_session(session, None)
    return agent, session


def test_a_settle_that_overtakes_a_writers_own_save_leaves_nothing_waiting(tmp_path):
    """With all_workers_write, another writer skipped step 5 and the chief settled it with every
    writer before this one reached step 5: its shard of 5 never commits, so nothing may wait for it."""
    agent, session = _writer_agent(tmp_path)
    agent.receive({"settled": 5})
    for step in (5, 10):
        session.global_step = step
        agent._save(session, step)
    assert agent._unsettled == [10]
    assert agent._room_at_chief(15, wait=False)  # 10 alone waits for the chief: room for 15


def test_a_writer_holds_at_most_max_in_flight_plus_one_unsettled_saves(tmp_path):
    agent, session = _writer_agent(tmp_path)
    for step in (5, 10):
        session.global_step = step
        agent._save(session, step)
    assert agent._unsettled == [5, 10]
    assert not agent._room_at_chief(15, wait=False)
    agent.receive({"stop_step": 15})
    assert agent._room_at_chief(15, wait=True)        # the run's last save waits for no commit
    agent.receive({"settled": 5})
    assert agent._unsettled == [10] and agent._room_at_chief(20, wait=False)


def test_an_aborted_writer_waiting_for_the_chief_saves_nothing(tmp_path):
    agent, session = _writer_agent(tmp_path)
    for step in (5, 10):
        session.global_step = step
        agent._save(session, step)
    agent.abort()                                     # a peer failed: stop, with no save
    assert not agent._room_at_chief(15, wait=True)
