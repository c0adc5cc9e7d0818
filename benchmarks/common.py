"""Shared pieces of the benchmarks: statistics over repeats, RSS, tables, machine facts.

Every figure is a `Stat` (median, min and max over repeats). Comparisons are
ratios against an anchor measured in the same process, interleaved with the
subject, so that a noisy neighbour slows both sides of a ratio alike.
"""

import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MB = 1 << 20


# -- statistics -----------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Stat:
    """Median, min and max of `n` repeats of one figure."""

    median: float
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> "Stat":
        values = [float(v) for v in values]
        if not values:
            raise ValueError("Stat.of needs at least one value")
        return cls(statistics.median(values), min(values), max(values), len(values))

    def scaled(self, factor: float) -> "Stat":
        return Stat(self.median * factor, self.min * factor, self.max * factor, self.n)

    def format(self, digits: int = 2, unit: str = "") -> str:
        """`median [min–max]`, e.g. ``3.41 [3.20–4.02] µs``."""
        def f(x):
            return "%.*f" % (digits, x)
        text = "%s [%s–%s]" % (f(self.median), f(self.min), f(self.max))
        return "%s %s" % (text, unit) if unit else text

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def cost_score(value: float, limit: float) -> float:
    """A cost's score against `limit` (< 1 meets it). A cost can measure at or below zero in a
    noisy repeat (an overhead is a difference of two times); on the plot's log scale it sits at a
    thousandth of the limit."""
    return max(value / limit, 1e-3)


def score_range(values: Sequence[float], limit: float, higher_is_better: bool = False
                ) -> Optional[Tuple[float, float]]:
    """The (best, worst) repeat as a score against `limit` (< 1 meets it), for the plot's min–max bar."""
    values = [v for v in values if v is not None]
    if higher_is_better:
        scores = [limit / v for v in values if v > 0]
    else:
        scores = [cost_score(v, limit) for v in values]
    return (min(scores), max(scores)) if scores else None


def paired_ratios(subject: Sequence[float], anchor: Sequence[float]) -> List[float]:
    """subject[i] / anchor[i] for measurements taken side by side."""
    if len(subject) != len(anchor):
        raise ValueError("paired_ratios needs equal lengths, got %d and %d" % (len(subject), len(anchor)))
    return [s / a for s, a in zip(subject, anchor) if a > 0]


def time_call(fn: Callable[[], object]) -> float:
    """Wall seconds of one call."""
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def interleaved(anchor: Callable[[int], float], subjects: Dict[str, Callable[[int], float]], n: int,
                repeats: int, warmup: int = 1):
    """Per-step seconds of `anchor(n)` and of each subject (each returns the wall time of `n` steps).

    All of them run in every repeat, the order reversed every other repeat
    (A S1 S2, S2 S1 A, ...), so a slow patch on the machine lands on all.
    Returns (anchor_per_step, {name: subject_per_step}, {name: overhead_per_step}),
    lists with one entry per repeat; overhead = subject - anchor of the same repeat.
    """
    order = [("", anchor)] + list(subjects.items())
    for _ in range(warmup):
        for _, fn in order:
            fn(n)
    a_out = []
    s_out = {name: [] for name in subjects}
    d_out = {name: [] for name in subjects}
    for r in range(repeats):
        got = {}
        for name, fn in (order if r % 2 == 0 else order[::-1]):
            got[name] = fn(n) / n
        a_out.append(got[""])
        for name in subjects:
            s_out[name].append(got[name])
            d_out[name].append(got[name] - got[""])
    return a_out, s_out, d_out


# -- memory -----------------------------------------------------------------------

def proc_status_bytes(field: str, pid: str = "self") -> Optional[int]:
    """A `kB` field of /proc/<pid>/status (VmRSS, VmHWM, ...) in bytes; None where unavailable."""
    try:
        with open("/proc/%s/status" % pid) as f:
            for line in f:
                if line.startswith(field + ":"):
                    parts = line.split()
                    return int(parts[1]) * 1024
    except OSError:
        return None
    return None


def current_rss() -> Optional[int]:
    return proc_status_bytes("VmRSS")


def peak_rss() -> Optional[int]:
    """The process's high-water RSS; falls back to getrusage where /proc is missing."""
    hwm = proc_status_bytes("VmHWM")
    if hwm is not None:
        return hwm
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


# -- subprocess workers -----------------------------------------------------------

def run_worker(module: str, args: Sequence[str], timeout: float) -> dict:
    """Runs `python -m module args...` from the repository root; returns the JSON of its last stdout line.

    Workers run in a fresh process so that their memory high-water mark and
    their buffers are their own.
    """
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["PYTHONPATH"] = REPO_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-m", module] + list(args)
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    if proc.returncode != 0 or not lines:
        raise RuntimeError("benchmark worker %s failed (exit %d):\n%s" % (
            " ".join(cmd), proc.returncode, (proc.stdout + proc.stderr)[-4000:]))
    return json.loads(lines[-1])


def _plain(value):
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    raise TypeError("%r is not JSON serializable" % (value,))


def emit(result: dict) -> None:
    """What a worker prints last: one JSON line for `run_worker`."""
    sys.stdout.write(json.dumps(result, default=_plain) + "\n")
    sys.stdout.flush()


# -- machine ----------------------------------------------------------------------

def machine_info(commit: Optional[str] = None) -> dict:
    """The machine, the date, the versions; `commit` as read when the run started (else read now)."""
    cpu = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    ram = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    ram = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    versions = {"python": platform.python_version()}
    for name in ("numpy", "tensorflow", "rayhooks"):
        module = sys.modules.get(name)
        if module is not None:
            versions[name] = getattr(module, "__version__", "?")
    return {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z"),
        "commit": commit or git_commit(),
        "nproc": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu": cpu or platform.processor() or "unknown",
        "ram_gib": None if ram is None else round(ram / (1 << 30), 1),
        "platform": platform.platform(),
        "versions": versions,
    }


def git_commit() -> Optional[str]:
    """HEAD of the repository, marked dirty when rayhooks/ has uncommitted changes; None outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "rayhooks"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + (" with uncommitted changes in rayhooks/" if dirty else "")


def format_machine(info: dict) -> List[str]:
    versions = ", ".join("%s %s" % kv for kv in info["versions"].items())
    return [
        "- Date: %s" % info["date"],
        "- rayhooks commit: %s" % (info.get("commit") or "unknown"),
        "- Machine: nproc=%s (usable %s), CPU: %s, RAM: %s GiB" % (
            info["nproc"], info["affinity"], info["cpu"], info["ram_gib"]),
        "- Platform: %s" % info["platform"],
        "- Versions: %s" % versions,
    ]


# -- results ----------------------------------------------------------------------

@dataclasses.dataclass
class Target:
    """One target from the brief and whether this run met it."""

    name: str
    measured: str
    met: bool
    score: Optional[float] = None  # measured / limit, so 1.0 is the line between MET and MISSED (for the plot)
    score_range: Optional[Tuple[float, float]] = None  # the score of the best and worst repeat (the plot's bar)

    def line(self) -> str:
        return "%s — %s: %s" % ("MET" if self.met else "MISSED", self.name, self.measured)


@dataclasses.dataclass
class BenchResult:
    name: str
    title: str
    headers: List[str]
    rows: List[List[str]]
    targets: List[Target] = dataclasses.field(default_factory=list)
    notes: List[str] = dataclasses.field(default_factory=list)
    data: dict = dataclasses.field(default_factory=dict)   # raw numbers, for tests and later analysis
    extra_tables: List[tuple] = dataclasses.field(default_factory=list)  # (caption, headers, rows)

    def markdown(self) -> str:
        out = ["## %s" % self.title, "", markdown_table(self.headers, self.rows)]
        for caption, headers, rows in self.extra_tables:
            out += ["", caption, "", markdown_table(headers, rows)]
        if self.targets:
            out += ["", "Targets:", ""] + ["- " + t.line() for t in self.targets]
        if self.notes:
            out += ["", "Notes:", ""] + ["- " + n for n in self.notes]
        return "\n".join(out) + "\n"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured Markdown table with padded columns (readable as plain text too)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    for row in cells:
        if len(row) != len(headers):
            raise ValueError("row %r has %d cells, the table has %d columns" % (row, len(row), len(headers)))
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"
    return "\n".join([line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
                     + [line(r) for r in cells[1:]])


def fmt_ratio(x: Optional[float]) -> str:
    if x is None or not math.isfinite(x):
        return "n/a"
    return "%.2fx" % x if x < 100 else "%.0fx" % x


def fmt_mb(nbytes: Optional[int]) -> str:
    return "n/a" if nbytes is None else "%.0f MB" % (nbytes / MB)
