"""The chief: owns the schedule, runs chief-only hooks, commits and dispatches listeners.

A plain class: `rayhooks.ray_backend` wraps it in `ray.remote` in one place,
and the local backend calls it from a thread. Its life:

    start()                       -> hooks.begin(); listeners.begin(); the step to start from
    workers_created(step)         -> hooks.after_create_session(session, coord); first plan
    report(progress) ...          -> per reported step: hooks.before_run/after_run;
                                     summaries written; shards collected;
                                     when every shard of S is durable:
                                       commit S; listeners.after_save(session, S)
                                     new actions and stops sent to the workers
    worker_end(i, step)           -> the final save, if step S was not just saved
    finish()                      -> listeners.end; hooks.end(session); the result

Checkpoint listeners see `before_save(S)` when S is announced, before any
worker snapshots it, and `after_save(S)` once S is committed. Only then is S
settled with the writers, which hold at most `max_in_flight + 1` unsettled
saves each: a slow `after_save` holds back the saves, as in TF1, rather
than letting uncommitted checkpoints pile up in storage.
"""

import json
import logging
import time
from typing import Dict, List, Optional

from rayhooks.checkpoint_hooks import IGNORED_FIRST_STOP
from rayhooks.checkpoints import MANIFEST_SUFFIX
from rayhooks.coordinator import Coordinator
from rayhooks.handle import SessionHandle, resolve_fetches
from rayhooks.plan import CHECKPOINT, SUMMARY, Action, Planner, Schedule
from rayhooks.session_run_hook import SessionRunArgs, SessionRunContext, SessionRunValues
from rayhooks.summary_hook import _as_summary
from rayhooks.summary_writer import SummaryWriterCache

logger = logging.getLogger("rayhooks")

HINT_SLACK_SECS = 0.002


class Chief:
    """Turns worker reports into decisions. `send(worker_index, update)` must not block."""

    def __init__(self, spec, num_workers: int, send, clock=time.time, report_latency: float = 0.1,
                 report_interval: Optional[float] = None):
        self.spec = spec
        self.num_workers = num_workers
        self._send = send
        self._clock = clock
        self._latency = report_latency
        self._interval = report_latency if report_interval is None else report_interval
        self.coord = Coordinator()
        self.session = SessionHandle(checkpoint_dir=spec.checkpoint_dir, summary_dir=spec.summary_dir,
                                     is_chief=True, num_workers=num_workers,
                                     store=spec.checkpoint.store if spec.checkpoint else None)
        self.progress: Dict[int, int] = {}
        self._rates: Dict[int, float] = {}
        self._last_seen: Dict[int, tuple] = {}
        self._heard_at: Dict[int, float] = {}
        self._replayed = None
        self._metrics = {}
        self._announced: Dict[int, Action] = {}
        self._shards: Dict[int, dict] = {}
        self._ended: Dict[int, int] = {}
        self.committed: List[int] = []
        self.skipped_saves = 0
        self.failed_saves = 0
        self._shard_health: Dict[int, dict] = {}
        self._worker_retries: Dict[int, int] = {}
        self.errors: List[str] = []
        self._failure: Optional[BaseException] = None  # a chief-only hook or listener raised: finish() raises it
        self._last_checkpoint_step = None
        self._rules: Dict[str, Action] = {}
        self._before_saved = set()
        self._recovered_from = -1  # a restarted chief: the checkpoint it rebuilt from (-1: none)
        self._created_at = None  # the step of the save made as the workers were created
        self._cancelled = set()  # planned steps a writer skipped: the final save must not count on them
        self._final_saves = set()  # final saves announced by a worker's end, which the other writers owe too
        self.recoveries = 0
        self._furthest = 0
        self._max_rate = 0.0
        self._rate_scan_at = 0.0
        self.preemptions = 0
        self._preempted_run = False
        self._last_pass_preempted = False
        self.planner = None
        self._restarted = False  # set by `recover`: the directory's claim is this run's own

    # -- lifecycle ------------------------------------------------------------

    def start(self) -> Optional[int]:
        """Runs `begin`; returns the step of the checkpoint workers will restore, or None."""
        for hook in self.spec.hooks:
            hook.begin()
        ck = self.spec.checkpoint
        latest = None
        if ck is not None:
            ck.store.storage.check_writable()
            ck.store.refuse_foreign()
            # Before the latest is read: workers resume from what it finds.
            ck.store.claim(token=self.spec.run_token, restarted=self._restarted)
            for listener in ck.listeners:
                listener.begin()
            info = ck.store.latest()
            latest = info.step if info else None
            self.session.latest_checkpoint = info.url if info else None
            if info is not None and ck.all_workers_write:
                self._check_shard_count(ck, info)
        if self.spec.summary is not None:
            self._summary_writer = self.spec.summary.make_writer()
        return latest

    def _check_shard_count(self, ck, info) -> None:
        """With all_workers_write each worker restores its own shard: the counts must match.

        Otherwise a new worker would silently restore worker 0's state, and shards of
        workers that are gone would be silently dropped.
        """
        manifest = json.loads(ck.store.storage.read_bytes(info.prefix + MANIFEST_SUFFIX))
        writers = manifest.get("writers")
        # One writer: every worker held worker 0's state (all_workers_write=False), so any count resumes.
        if writers is None or len(writers) <= 1 or len(writers) == self.num_workers:
            return
        raise ValueError(
            "[step=%d] checkpoint %s holds one shard per worker for %d workers (all_workers_write=True), "
            "but this run has %d: each worker restores its own shard, so launch it with num_workers=%d "
            "to resume from it, or start a new checkpoint_dir (seeding the state yourself) to change "
            "the number of workers" % (info.step, info.url, len(writers), self.num_workers, len(writers)))

    def workers_created(self, start_step: int) -> dict:
        """All workers restored and are at `start_step`; returns their first update."""
        self.session.global_step = start_step
        self._replayed = start_step
        self.progress = {i: start_step for i in range(self.num_workers)}
        self._furthest = max(self._furthest, start_step)
        schedules = []
        if self.spec.checkpoint is not None:
            schedules.append(Schedule(CHECKPOINT, self.spec.checkpoint.timer))
        if self.spec.summary is not None:
            schedules.append(Schedule(SUMMARY, self.spec.summary.timer, first_offset=1,
                                      fetches=self.spec.summary.fetches))
        recovering = self.planner is not None
        if not recovering:
            for schedule in schedules:  # a hook object reused from an earlier launch (local backend)
                schedule.timer.reset()
            self.planner = Planner(start_step, schedules, last_step=self.spec.last_step)
        for hook in self.spec.hooks:  # again after a recovery, as TF1's recovered session did
            hook.after_create_session(self.session, self.coord)
        if self.spec.summary is not None:
            self._summary_writer.add_session_log("START", start_step + 1)
        if recovering:
            latest = self.spec.checkpoint.store.latest() if self.spec.checkpoint is not None else None
            first = {"actions": self._rules_after(None if latest is None else latest.step),
                     "stop_step": self.planner.stop_step}
            if self._failure is not None:  # it ignores their reports: no save of theirs may wait for it
                first.update(settled=None, chief_failed=True)
            return first
        self._created_at = start_step
        stop = self.planner.initial_stop()
        actions = self.planner.tick(start_step, self.planner.min_margin)
        if self.session.latest_checkpoint is not None:
            # The workers restore `start_step`'s checkpoint: it is not written again (TF
            # restores lazily created variables from its files later), and its after_save
            # ran in the run that committed it (I3). The rule resumes one period later.
            # A seconds schedule's first save is the restored checkpoint itself: its deadline
            # counts from now, as the step rule's period counts from `start_step`.
            resumed = [a for a in actions if a.kind == CHECKPOINT and a.step == start_step]
            for a in resumed:
                if not a.every:
                    self.planner.done(a)
            actions = [a if a not in resumed else Action(a.step + a.every, a.kind, a.fetches, a.every)
                       for a in actions if a not in resumed or a.every]
            self._last_checkpoint_step = start_step
        actions = self._announce(actions)
        return {"actions": actions, "stop_step": stop}

    def workers_lost(self, why: str) -> None:
        """The worker group is gone and will be restarted from the latest committed checkpoint.

        What was in flight is dropped: shards of uncommitted steps are partials
        now, and garbage collection removes them after the next commit.
        """
        logger.warning("workers lost (%s); restarting them from the latest committed checkpoint", why)
        self.recoveries += 1
        self._shards.clear()
        self._ended.clear()
        self._final_saves.clear()
        self._announced.clear()
        self._last_seen.clear()
        self._heard_at.clear()
        self._rates.clear()
        for schedule in self.planner.schedules:
            schedule.pending = None
        self.planner.stop_step = self.spec.last_step  # an emergency stop belonged to the old group

    def _rules_after(self, committed: Optional[int]) -> List[Action]:
        """Each step rule, restarted after the latest committed step: a committed checkpoint is never rewritten."""
        out = []
        for rule in self._rules.values():
            first = rule.step
            if committed is not None and committed >= rule.step:
                first = rule.step + rule.every * ((committed - rule.step) // rule.every + 1)
            out.append(Action(first, rule.kind, rule.fetches, rule.every))
        return out

    def _announce(self, actions: List[Action]) -> List[Action]:
        for action in actions:
            if action.every:
                self._rules[action.kind] = action
            else:
                self._announced[action.step * 2 + (action.kind == SUMMARY)] = action
            stop = self.planner.stop_step if self.planner is not None else None
            if action.kind == CHECKPOINT and (stop is None or action.step <= stop):
                self._before_save(action.step)  # a step past the stop is never saved: no before_save
        return actions

    def _before_save(self, step: int) -> None:
        """Runs before_save(step) once: when announced, or at the latest before its commit."""
        if step in self._before_saved:
            return
        self._before_saved.add(step)
        for listener in self.spec.checkpoint.listeners:
            listener.before_save(self.session, step)

    def _expects_checkpoint(self, step: int) -> bool:
        rule = self._rules.get(CHECKPOINT)
        on_rule = rule is not None and step >= rule.step and (step - rule.step) % rule.every == 0
        return on_rule or (step * 2) in self._announced

    def _broadcast(self, actions=(), stop_step=None) -> None:
        if not actions and stop_step is None:
            return
        self._broadcast_update({"actions": list(actions), "stop_step": stop_step})

    def _broadcast_update(self, update) -> None:
        for i in range(self.num_workers):
            self._send(i, update)

    def _settle(self, step: Optional[int], failed: bool = False, restarted: bool = False) -> None:
        """Tells the writers that their saves up to `step` (None: all) need this chief no more.

        `failed`: nor will any later one (the chief ignores reports once it failed).
        """
        ck = self.spec.checkpoint
        if ck is None:
            return
        update = {"settled": step, "chief_failed": True} if failed else {"settled": step}
        if restarted:
            update["restarted"] = True  # the writers report their uncommitted shards again
        for i in range(self.num_workers if ck.all_workers_write else 1):
            self._send(i, update)

    # -- reports --------------------------------------------------------------

    def report(self, *args, **kwargs) -> None:
        """Progress from one worker. Called without the worker waiting for it.

        Nobody waits on a report, so an error a chief-only hook or a listener
        raises here is kept, every worker is stopped, and `finish` raises it (I6).
        """
        if self._failure is not None:
            return
        try:
            self._report(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 -- re-raised by finish()
            self._fail(e)

    def _fail(self, error: BaseException) -> None:
        logger.error("the chief failed handling a report; stopping every worker", exc_info=error)
        self._failure = error
        self.errors.append("chief: %r" % (error,))
        try:
            self._settle(None, failed=True)  # no save commits any more: none may wait for one
            self._broadcast((), self.planner.request_stop(max(self.progress.values(), default=0), self._margin()))
        except Exception:  # noqa: BLE001 -- the first error is the one to report
            logger.exception("could not stop the workers after the chief failed")

    def _report(self, worker: int, step: int, now: float, outputs: dict, shards: list, metrics: dict,
                stop_requested: bool = False, skipped: tuple = (), preempted: bool = False,
                failed: tuple = ()) -> None:
        previous = self._last_seen.get(worker)
        if previous is not None and now > previous[1] and step > previous[0]:
            rate = self._rates[worker] = (step - previous[0]) / (now - previous[1])
            self._max_rate = max(self._max_rate, rate)
        self._last_seen[worker] = (step, now)
        self._heard_at[worker] = self._clock()  # this clock: the workers' may be set apart from it
        self.progress[worker] = max(self.progress.get(worker, 0), step)
        self._furthest = max(self._furthest, step)
        if worker == 0:
            self._metrics = metrics or self._metrics
            self.session.outputs = self._metrics  # what `session.run(name)` in chief hooks and listeners reads
            for s, values in sorted(outputs.items()):
                self._write_summaries(s, values)
            self._replay(step)
        # Only a worker that writes shards can skip a save: a late plan on a worker that
        # writes nothing (worker > 0 without all_workers_write) must not count or cancel it.
        ck = self.spec.checkpoint
        writes = ck is not None and (worker == 0 or ck.all_workers_write)
        for s in (skipped if writes else ()):
            self._cancel(s, "worker %d skipped it (its previous save was still in flight or not yet "
                            "committed, or the plan reached it late)" % worker)
        for s in (failed if writes else ()):
            self.failed_saves += 1
            self._cancel(s, "worker %d could not write it; the next save retries "
                            "(on_write_error='retry_next_save')" % worker, skipped=False)
        for s, worker_index, files, *health in shards:
            self._shards.setdefault(s, {})[worker_index] = files
            if health:
                self._shard_health.setdefault(s, {})[worker_index] = health[0]
                self._worker_retries[worker_index] = health[0].get("retries", 0)
            self._maybe_commit(s)
        stop = None
        if stop_requested:
            stop = self.planner.request_stop(max(self.progress.values()), self._margin())
        if preempted:
            stop = self._emergency_checkpoint(worker)
        self._tick(stop)

    def _emergency_checkpoint(self, worker: int) -> int:
        """A worker is being preempted: every worker saves and stops at the first step all can reach."""
        step = self.planner.request_stop(max(self.progress.values()), self._margin())
        logger.warning("[step=%d] worker %d is being preempted: emergency checkpoint and stop at step %d",
                       step, worker, step)
        self.preemptions += 1
        self._preempted_run = True
        if self.spec.checkpoint is not None and not self._expects_checkpoint(step):
            action = Action(step, CHECKPOINT)
            self._announce([action])
            self._broadcast([action], step)
        return step

    def needs_restart(self) -> bool:
        """True when this pass stopped early for a preemption: the driver restarts the workers."""
        preempted, self._preempted_run = self._preempted_run, False
        last = self.spec.last_step
        # Without a restart left, the run then ends preempted (its claim says so, at `finish`).
        self._last_pass_preempted = preempted and (last is None or max(self._ended.values(), default=0) < last)
        return self._last_pass_preempted

    def _margin(self) -> int:
        # The fastest worker's rate, refreshed when a report raises it (cheap) or once per
        # report interval (a full scan): a chief with 1024 workers must not scan per report.
        now = self._clock()
        if now >= self._rate_scan_at:
            self._max_rate = max(self._rates.values()) if self._rates else 0.0
            self._rate_scan_at = now + self._latency
        return self.planner.margin(self._max_rate, self._latency)

    def _tick(self, stop=None):
        furthest = self._furthest
        for key, action in list(self._announced.items()):
            if action.kind == SUMMARY and furthest > action.step:
                self.planner.done(action)
                del self._announced[key]
        margin = self._margin() if self._rates else None  # no rate yet: a margin would be a guess
        if margin is not None and self.planner.seconds_due():
            furthest = max(furthest, self._projected_furthest())
        actions = self._announce(self.planner.tick(furthest, margin))
        self._broadcast(actions, stop)
        hint = self.planner.report_hint(self._interval)
        if hint is not None:
            # A few ms past the deadline, so that the report finds it passed.
            self._broadcast_update({"report_in": hint + HINT_SLACK_SECS})

    def _projected_furthest(self) -> int:
        """The furthest step any worker has reached by now, from its last report and its rate.

        Scans every worker, so it runs once per seconds deadline, not per
        report: reports can be an interval old, and a step announced behind a
        worker would be skipped by it.
        """
        now = self._clock()
        furthest = self._furthest
        for worker, (step, _) in self._last_seen.items():
            age = min(max(now - self._heard_at.get(worker, now), 0.0), 2 * self._interval)
            furthest = max(furthest, step + int(self._rates.get(worker, self._max_rate) * age))
        return furthest

    def _replay(self, step: int) -> None:
        """Runs the chief-only hooks for each step worker 0 completed since the last report."""
        hooks = self.spec.hooks
        if self._replayed is None:  # a restarted chief: the steps before it came back are not replayed
            self._replayed = step
        if not self.spec.hooks:  # nothing to run per step: no per-step work either
            self._replayed = max(self._replayed, step)
            self.session.global_step = max(self.session.global_step, step)
            return
        while self._replayed < step:
            stale = self._replayed
            context = SessionRunContext(SessionRunArgs(None), self.session)
            self.session.global_step = stale
            requests = {h: r.fetches for h in hooks for r in [h.before_run(context)] if r is not None}
            self._replayed = self.session.global_step = stale + 1
            for hook in hooks:
                fetches = requests.get(hook)
                try:
                    results = None if fetches is None else resolve_fetches(fetches, self._metrics, stale)
                except KeyError:
                    raise KeyError(
                        "%s fetches %r, but it is a chief-only hook: under launch it runs on the chief, "
                        "where fetches resolve against worker 0's latest scalar step outputs (%s), sent "
                        "every report_interval. Pass it in hooks= to run it in every worker's training "
                        "loop, on each step's outputs" % (type(hook).__name__, fetches,
                                                          sorted(self._metrics) or "none yet")) from None
                hook.after_run(context, SessionRunValues(results, None, None))
            if context.stop_requested:
                self.planner.request_stop(max(self.progress.values()), self._margin())

    def _write_summaries(self, step: int, values: dict) -> None:
        for name in self.spec.summary.fetches:
            if name in values:
                self._summary_writer.add_summary(_as_summary(name, values[name]), step)
        self.spec.summary.timer  # the schedule already advanced when the step was announced

    # -- checkpoints ----------------------------------------------------------

    def _writers_for(self, step: int) -> int:
        return self.num_workers if self.spec.checkpoint.all_workers_write else 1

    def _maybe_commit(self, step: int) -> None:
        shards = self._shards.get(step, {})
        if len(shards) < self._writers_for(step):
            return
        del self._shards[step]
        files = {}
        for worker_index in sorted(shards):
            files.update(shards[worker_index])
        ck = self.spec.checkpoint
        if step in self.committed:
            # Its shards again: reported once more to a restarted chief, or a report Ray retried.
            logger.info("[step=%d] already committed; ignoring its shards reported again", step)
            self._settle(step)
            return
        if self.committed and step < max(self.committed):
            # Its shards arrived after a newer commit (a report retried across a chief restart):
            # that commit's clean-up may already have collected these files as partials, and
            # committing now would name files that are gone. Commits only move forward.
            if step <= self._recovered_from:  # reported again to a restarted chief: the one before settled it
                logger.info("[step=%d] its shards were reported again after step %d was committed; ignored",
                            step, max(self.committed))
            else:
                logger.warning("[step=%d] its shards arrived after step %d was committed; not committing it",
                               step, max(self.committed))
                self.skipped_saves += 1
            self._announced.pop(step * 2, None)
            self.planner.done(Action(step, CHECKPOINT))
            self._settle(step)
            return
        self._before_save(step)  # not for the shards refused above: their before_save ran, or never will
        try:
            info = ck.store.commit(step, files, extra={
                "num_workers": self.num_workers, "writers": sorted(shards),
                # what a restarted chief needs to follow the workers' step rules
                "rules": {kind: [rule.step, rule.every] for kind, rule in self._rules.items()}})
        except OSError as e:
            if ck.on_write_error != "retry_next_save":
                raise
            # As a failed write of a shard: counted, and the next save retries (its files are
            # partials now, collected by the next commit).
            self.failed_saves += 1
            self._announced.pop(step * 2, None)
            self._cancelled.add(step)  # a copy of its shards arriving later (a retried report) is no save
            self._shard_health.pop(step, None)
            self.planner.done(Action(step, CHECKPOINT))
            logger.error("[step=%d] its shards were written, but committing it failed (%s); training goes on "
                         "and the next save retries (on_write_error='retry_next_save')", step, e)
            self._settle(step)
            return
        self.committed.append(step)
        self._last_checkpoint_step = step
        self.session.latest_checkpoint = info.url
        self.session.global_step = max(self.session.global_step, step)
        shards_health = self._shard_health.get(step, {}).values()
        if shards_health:
            logger.info("[step=%d] Saved checkpoint %s (%.1f MB) in %.2fs; the training loop waited %.1f ms.",
                        step, info.url, info.nbytes / 1e6, max(h["persist_secs"] for h in shards_health),
                        max(h["stall_ms"] for h in shards_health))
        else:
            logger.info("[step=%d] committed %s (%.1f MB)", step, info.url, info.nbytes / 1e6)
        self._announced.pop(step * 2, None)
        self.planner.done(Action(step, CHECKPOINT))
        writer = SummaryWriterCache.get(ck.store.url, ck.store.storage.storage_options)
        writer.add_session_log("CHECKPOINT", step, checkpoint_path=ck.store.storage.url_of(ck.store.basename))
        self._write_health(writer, step, info)
        self._dispatch_after_save(step)
        self._settle(step)  # after after_save: a slower listener than the save period holds back saves
        rule = self._rules.get(CHECKPOINT)
        if rule is not None:  # the next save on the rule hears before_save now, before it can commit
            nxt = step + rule.every
            if self.planner.stop_step is None or nxt <= self.planner.stop_step:
                self._before_save(nxt)

    def _write_health(self, writer, step: int, info) -> None:
        """Checkpointing cost as TensorBoard scalars in the checkpoint dir, beside the loss curve.

        The slowest writer sets a sharded save's stall and persist time.
        """
        shards = list(self._shard_health.pop(step, {}).values())
        health = {"skipped_saves": self.skipped_saves, "failed_saves": self.failed_saves,
                  "retries": sum(self._worker_retries.values()), "bytes": info.nbytes}
        if shards:
            persisted = max(h["persist_secs"] for h in shards)
            health.update(stall_ms=max(h["stall_ms"] for h in shards), persist_secs=persisted,
                          MBps=info.nbytes / 1e6 / persisted if persisted > 0 else 0.0)
        writer.add_summary({"checkpoint/" + k: float(v) for k, v in health.items()}, step)

    def _dispatch_after_save(self, step: int) -> None:
        """after_save(step), at most once per step even across a chief restart (I3)."""
        ck = self.spec.checkpoint
        if ck.store.listeners_started(step):
            logger.warning("[step=%d] after_save already ran (before a chief restart); not again", step)
            return
        ck.store.mark_listeners_started(step, ck.on_write_error)
        stop = False
        for listener in ck.listeners:
            if listener.after_save(self.session, step):
                logger.info("[step=%d] A CheckpointSaverListener requested that training be stopped. "
                            "listener: %s", step, listener)
                stop = True
        if stop and step == self._created_at:
            logger.info("[step=%d] %s", step, IGNORED_FIRST_STOP)
        elif stop:
            self._broadcast((), self.planner.request_stop(max(self.progress.values()), self._margin()))

    def recover(self) -> None:
        """Rebuilds a restarted chief from storage: the workers kept training meanwhile.

        The latest committed checkpoint gives the step and the workers' step
        rules; its `after_save` runs now unless it already ran (I3). Progress
        lost while the chief was down is made up by the next reports, and the
        writers report again the shards they reported to the chief before.
        """
        self._restarted = True
        self.start()
        ck = self.spec.checkpoint
        info = ck.store.latest() if ck is not None else None
        step = info.step if info is not None else 0
        logger.warning("[step=%d] the chief restarted; recovering from %s", step,
                       info.url if info is not None else "nothing committed")
        self.session.global_step = step
        self.progress = {i: step for i in range(self.num_workers)}
        self._furthest = step
        schedules = []
        if ck is not None:
            schedules.append(Schedule(CHECKPOINT, ck.timer))
        if self.spec.summary is not None:
            schedules.append(Schedule(SUMMARY, self.spec.summary.timer, first_offset=1,
                                      fetches=self.spec.summary.fetches))
        self.planner = Planner(step, schedules, last_step=self.spec.last_step)
        self.planner.initial_stop()
        rules = {}
        if info is not None:
            manifest = json.loads(ck.store.storage.read_bytes(info.prefix + MANIFEST_SUFFIX))
            rules = manifest.get("rules", {})
        for action in self.planner.tick(step, self.planner.min_margin):
            if action.every and action.kind in rules:
                base, every = rules[action.kind]
                self._rules[action.kind] = Action(base, action.kind, action.fetches, every)
            elif action.every:
                self._rules[action.kind] = action
        if info is not None:
            self.committed.append(info.step)
            self._recovered_from = info.step
            self._last_checkpoint_step = info.step
            self._before_saved.update(s for s in range(max(0, step - 1), step + 1))
            self.session.latest_checkpoint = info.url
            self._dispatch_after_save(info.step)
        # What the workers reported to the chief before this one is lost: none of their saves
        # may wait for it, or they would wait (or skip every save) for good. They report their
        # uncommitted shards again, and those still newer than `info` commit.
        try:
            self._settle(None, restarted=True)
        except Exception as e:  # noqa: BLE001 -- a worker gone with the chief: its group is replaced anyway
            logger.warning("[step=%d] could not tell the workers that the restarted chief waits for none of "
                           "their earlier saves (%s); a worker group started from here hears of none", step, e)
        self._recovered = True

    def _cancel(self, step: int, why: str, skipped: bool = True) -> None:
        if self._announced.pop(step * 2, None) is not None or self._expects_checkpoint(step):
            self.skipped_saves += skipped
            self._cancelled.add(step)
            self._shards.pop(step, None)
            self._shard_health.pop(step, None)
            self.planner.done(Action(step, CHECKPOINT))
            self._settle(step)  # the other writers' shards of it will never commit
            logger.info("[step=%d] checkpoint skipped: %s", step, why)

    # -- the end --------------------------------------------------------------

    def worker_end(self, worker: int, step: int) -> List[Action]:
        """A worker left its loop at `step`: the final save, unless `step` was just saved."""
        self._ended[worker] = step
        self.progress[worker] = max(self.progress.get(worker, 0), step)
        ck = self.spec.checkpoint
        if self._failure is not None:  # the run fails at finish(): no final save
            return []
        if ck is not None and not ck.all_workers_write and 0 in self._ended:
            # Whichever of the two ends comes second sees it.
            for other in ([w for w in sorted(self._ended) if w != 0] if worker == 0 else [worker]):
                if self._ended[other] > self._ended[0]:
                    logger.warning("[step=%d] worker %d trained past worker 0, which left its loop at step %d; "
                                   "only worker 0 writes checkpoints (all_workers_write=False), so no step after "
                                   "%d was saved. End every worker together (StopAtStepHook, or a stop the chief "
                                   "decides), or pass all_workers_write=True",
                                   self._ended[other], other, self._ended[0], self._ended[0])
        if ck is not None and step in self._final_saves:
            # Another writer's end announced this final save: with all_workers_write, this
            # worker's shard is part of it (without it the checkpoint could never commit).
            return [Action(step, CHECKPOINT)] if ck.all_workers_write else []
        # A planned step that a writer skipped (in_flight="skip") is no save: the final one is still due.
        if ck is None or step == self._last_checkpoint_step or (
                self._expects_checkpoint(step) and step not in self._cancelled):
            return []
        action = Action(step, CHECKPOINT)
        if worker == 0 or ck.all_workers_write:
            self._announce([action])
            self._final_saves.add(step)
            return [action]
        return []

    def shard_done(self, step: int, worker_index: int, files: dict) -> None:
        self._shards.setdefault(step, {})[worker_index] = files
        self._maybe_commit(step)

    def worker_failed(self, worker: int, message: str) -> None:
        self.errors.append("worker %d: %s" % (worker, message))

    def _uncommitted_at_finish(self) -> Optional[RuntimeError]:
        """A save whose shards only partly reached this chief when every worker had ended.

        Writers report their uncommitted shards again to a restarted chief, but a
        writer lost with the chief (or one whose report arrived after a newer
        commit) cannot, and the checkpoint can never commit. At the end of the run
        that is the final checkpoint, lost without a word (I6).
        """
        if self.spec.checkpoint is None or self.errors or self._failure is not None:
            return None
        newest = max(self.committed, default=-1)
        lost = sorted(s for s in self._shards if s > newest and s not in self._cancelled)
        if not lost:
            return None
        step = lost[-1]
        ck = self.spec.checkpoint
        return RuntimeError(
            "[step=%d] the checkpoint of step %d in %s was not committed: only the shards of workers %s reached "
            "the chief (it restarted while the others were reported), and the run has ended. The newest "
            "committed checkpoint is %s; launch again with the same checkpoint_dir to resume from it"
            % (step, step, ck.store.url, sorted(self._shards[step]),
               "step %d" % newest if newest >= 0 else "none"))

    def flush_summaries(self) -> None:
        """Uploads every buffered summary now: the driver calls this before it kills the chief."""
        SummaryWriterCache.flush_all("before the chief was stopped")

    def finish(self) -> dict:
        """Runs the `end` callbacks once; returns what the run produced."""
        last_step = max(self._ended.values()) if self._ended else max(self.progress.values(), default=0)
        self.session.global_step = last_step
        lost = self._uncommitted_at_finish()
        if lost is not None:
            self.errors.append(str(lost))
        ended = "failed"
        try:
            if not self.errors:
                if self._replayed is not None:
                    self._replay(last_step)
                if self.spec.checkpoint is not None:
                    for listener in self.spec.checkpoint.listeners:
                        listener.end(self.session, last_step)
                for hook in self.spec.hooks:
                    hook.end(self.session)
                if self._failure is None:
                    ended = "preempted" if self._last_pass_preempted else "finished"
        finally:
            if self.spec.checkpoint is not None:  # failed or not (an `end` that raised too), the run is over
                self.spec.checkpoint.store.release(ended)
        if self.spec.summary is not None:
            self._summary_writer.flush()
        if self.spec.checkpoint is not None:
            SummaryWriterCache.get(self.spec.checkpoint.store.url,
                                   self.spec.checkpoint.store.storage.storage_options).flush()
        if self._failure is not None:
            raise self._failure
        if lost is not None:
            raise lost
        return {"last_step": last_step, "committed": list(self.committed), "metrics": dict(self._metrics),
                "recoveries": self.recoveries, "preemptions": self.preemptions,
                "skipped_saves": self.skipped_saves, "failed_saves": self.failed_saves,
                "latest_checkpoint": self.session.latest_checkpoint}
