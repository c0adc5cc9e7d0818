"""One run writes a checkpoint directory at a time: the claim file that says which.

Two runs saving into one directory (a job system starting a replacement while the
old process still runs) would delete each other's checkpoints: each one's
retention and clean-up take the other's files for its own, including ones whose
`after_save` said they were durable. A saving run claims the directory before it
reads what to resume from; each save checks the claim before its data and around
its manifest, and a run taken over stops with `DirectoryTakenOver`.

The claim is `<basename>.writer.json`: a run id, a sequence number (one above the
claim it replaced), host, pid, when, and a launch's token. A clean end marks it
released rather than deleting it, so that a run taken over earlier still finds a
newer claim there.
"""

import json
import logging
import os
import socket
import time
import uuid
from typing import Optional

logger = logging.getLogger("rayhooks")

WRITER_SUFFIX = ".writer.json"  # after the basename


class DirectoryTakenOver(RuntimeError):
    """Another run claimed the checkpoint directory since this one did: this run must not commit there.

    Two runs saving into one directory would delete each other's checkpoints (each
    one's retention and clean-up take the other's files for its own). The run that
    started last wins, as when a job system starts a replacement while the old
    process still runs; the old one stops at its next save with this error.
    """


class WriterClaim:
    """The claim on one directory, as one run holds it (`mine`: None until `take`)."""

    def __init__(self, storage, basename: str):
        self.storage = storage
        self.name = basename + WRITER_SUFFIX
        self.mine: Optional[dict] = None
        self.following: Optional[str] = None  # a launch worker's: the token of its chief's claim

    def follow(self, token: str) -> None:
        """For a writer that does not commit (a launch's worker): its saves check that the claim is still
        its launch's, so that workers of a run taken over stop writing too."""
        self.following = token

    def take(self, token: Optional[str] = None, restarted: bool = False) -> None:
        """Makes this run the directory's writer; a later claim (another run) makes its saves fail.

        Call it before reading the latest checkpoint to resume from. Claims are
        numbered: each is one above the claim it found, so a run tells a newer claim
        (it was taken over) from an older one written over its own (a run taken over
        marking its claim released, in a race with the claim that replaced it).
        `token` names the run across processes (a launch's), and `restarted` says this
        process replaces one of that run: a restarted chief. It claims again only over a
        claim of its own run; over another run's it raises `DirectoryTakenOver`.
        """
        url, previous = self.storage.url, self.read()
        seq = previous.get("seq", 0) + 1 if previous is not None and isinstance(previous.get("seq", 0), int) else 1
        mine = {"run": uuid.uuid4().hex, "seq": seq, "host": socket.gethostname(), "pid": os.getpid(),
                "since": time.time(), "token": token}
        if restarted and previous is not None and previous.get("token") != token:
            raise DirectoryTakenOver(
                "%s: the restarted chief finds the directory claimed by another run (%s); this run stops. Let "
                "one run write %s, or give each its own checkpoint_dir" % (url, _who(previous), url))
        if previous is not None and not previous.get("released"):
            who = _who(previous)
            if restarted:
                logger.info("%s: the restarted chief claims it again, from %s", url, who)
            elif previous.get("host") == mine["host"] and not _pid_alive(previous.get("pid")):
                logger.info("%s: taking over from %s, which ended without releasing it", url, who)
            else:
                logger.warning("%s: taking over from %s, which has not released it: it crashed, or it still "
                               "runs, and then its next save fails (one run writes a directory at a time)",
                               url, who)
        self.storage.write_bytes(self.name, json.dumps(mine).encode())
        self.mine = mine

    def release(self, ended: str = "finished") -> None:
        """Gives the claim up at the end of a run (best effort: a claim left behind only makes the next run say so).

        `ended` says how the run ended: "finished", "failed" or "preempted"; a
        sidecar evaluator (`rh.checkpoints_iterator`) stops only after a finished one.
        """
        mine, self.mine = self.mine, None
        if mine is None:
            return
        try:
            current = self.read()
            if current is not None and current.get("run") == mine["run"]:
                # Marked, not deleted: a run taken over earlier and still going must find a
                # newer claim here, not none (see `check`).
                released = dict(mine, released=time.time(), ended=ended)
                self.storage.write_bytes(self.name, json.dumps(released).encode())
        except Exception as e:  # noqa: BLE001 -- the run is over; the next one takes over all the same
            logger.info("%s: could not release the writer claim: %s", self.storage.url, e)

    def read(self) -> Optional[dict]:
        try:
            claim = json.loads(self.storage.read_bytes(self.name))
        except FileNotFoundError:
            return None
        except ValueError:  # a torn write of a crashed claim: no one's
            return None
        return claim if isinstance(claim, dict) else None

    def check(self, step: int) -> None:
        """Raises `DirectoryTakenOver` if another run claimed the directory since this one did."""
        mine = self.mine
        if mine is None:
            if self.following is not None:
                self._check_following(step)
            return
        current = self.read()
        if current is not None and current.get("run") == mine["run"]:
            return
        theirs = current.get("seq") if current is not None else None
        newer = isinstance(theirs, int) and (theirs, str(current.get("run"))) > (mine["seq"], mine["run"])
        if not newer:
            # Gone (deleted by hand, a bucket emptied) or older than this run's own claim (an
            # older run's release written over it): no newer run has claimed the directory.
            logger.warning("[step=%d] %s: the writer claim %s is %s; claiming the directory again", step,
                           self.storage.url, self.storage.url_of(self.name),
                           "gone" if current is None else "an older run's (%s)" % _who(current))
            self.storage.write_bytes(self.name, json.dumps(mine).encode())
            return
        raise _taken_over(step, self.storage.url, current)

    def _check_following(self, step: int) -> None:
        current = self.read()
        # None: nothing to follow yet or any more (its chief released it, or it was deleted by hand).
        if current is not None and current.get("token") != self.following:
            raise _taken_over(step, self.storage.url, current)


def _taken_over(step, url, claim) -> DirectoryTakenOver:
    return DirectoryTakenOver(
        "[step=%d] not committed: %s has another writer now (%s claimed it); two runs saving into one "
        "directory would delete each other's checkpoints, so this run stops. Let one run write %s, or give "
        "each its own checkpoint_dir" % (step, url, _who(claim), url))


def describe(claim: dict) -> str:
    """One line on a claim, for people: whose it is and whether it was released."""
    if not claim.get("released"):
        return "%s; not released: still running, or ended without a clean end" % _who(claim)
    ended = claim.get("ended")
    return "%s; released %s%s" % (_who(claim), _utc(claim["released"]), " (%s)" % ended if ended else "")


def _utc(timestamp) -> str:
    try:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(float(timestamp)))
    except (TypeError, ValueError):
        return "an unknown time"


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (TypeError, ValueError, ProcessLookupError):
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _who(claim: dict) -> str:
    return "run %s (host %s, pid %s, since %s)" % (claim.get("run"), claim.get("host"), claim.get("pid"),
                                                   _utc(claim.get("since")))
