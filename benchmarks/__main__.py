"""``python -m benchmarks [--quick] [--only NAME] [--out PATH]``: runs the benchmarks, prints a table per
figure, and writes them with the machine and the targets (MET/MISSED) to ``benchmarks/results.md``."""

import argparse
import importlib
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from benchmarks import BENCHMARKS
from benchmarks.common import format_machine, git_commit, machine_info

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results.md")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks",
                                     description="Runs the rayhooks benchmarks, prints a table per figure and "
                                                 "writes them, the machine and the targets to results.md.")
    parser.add_argument("--quick", action="store_true",
                        help="fewer repeats; 64 MB checkpoints, plus 512 MB once (under 10 minutes on 2 cores)")
    parser.add_argument("--only", action="append", choices=BENCHMARKS, metavar="NAME",
                        help="run only this benchmark (repeatable): %s" % ", ".join(BENCHMARKS))
    parser.add_argument("--out", default=DEFAULT_OUT, help="where to write the Markdown results")
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # smoke tests only
    args = parser.parse_args(argv)

    names = args.only or list(BENCHMARKS)
    mode = "tiny (smoke test, numbers meaningless)" if args.tiny else "quick" if args.quick else "full"
    started = time.perf_counter()
    commit = git_commit()  # what was measured: read before the run, as others may commit meanwhile
    results = []
    for name in names:
        module = importlib.import_module("benchmarks.bench_" + name)
        print("running %s (%s)..." % (name, mode), file=sys.stderr, flush=True)
        began = time.perf_counter()
        result = module.run(quick=args.quick, tiny=args.tiny)
        print("  %s took %.0f s" % (name, time.perf_counter() - began), file=sys.stderr, flush=True)
        results.append(result)
        print(result.markdown(), flush=True)
    elapsed = time.perf_counter() - started

    info = machine_info(commit)
    targets = [t for r in results for t in r.targets]
    summary = ["# rayhooks benchmarks", "",
               "Command: `python -m benchmarks%s%s` (%s mode), %.0f s in all." % (
                   " --quick" if args.quick else "", "".join(" --only " + n for n in args.only or []),
                   mode, elapsed), ""]
    summary += format_machine(info)
    summary += ["", "Every figure is a median over repeats, [min–max] beside it; comparisons are ratios "
                "against anchors measured in the same run. The machine is shared and noisy.", "",
                "## Targets", ""]
    summary += ["- " + t.line() for t in targets] + [""]
    text = "\n".join(summary) + "\n" + "\n".join(r.markdown() for r in results)
    out = os.path.abspath(args.out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        f.write(text)
    plot = _plot(targets, os.path.splitext(out)[0] + ".png")
    print("\n".join(["## Targets", ""] + ["- " + t.line() for t in targets]))
    if plot:
        print("Plot written to %s." % plot)
    print("\nResults written to %s (%.0f s)." % (out, elapsed))
    return 0


def _plot(targets, path):
    """One bar per target: measured / limit, so bars left of the line at 1.0 met their target."""
    scored = [t for t in targets if t.score is not None]
    if not scored:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import textwrap
    fig, ax = plt.subplots(figsize=(13, 0.6 * len(scored) + 1.5))
    names = ["\n".join(textwrap.wrap(t.name, 70)) for t in scored]
    ax.barh(range(len(scored)), [t.score for t in scored],
            color=["#2e7d32" if t.met else "#c62828" for t in scored])
    # Each bar's whisker spans its best and worst repeat, so noise shows beside the median.
    spans = [(i, t) for i, t in enumerate(scored) if t.score_range is not None]
    if spans:
        ax.errorbar([t.score for _, t in spans], [i for i, _ in spans], fmt="none", ecolor="black",
                    elinewidth=1, capsize=3,
                    xerr=[[max(t.score - t.score_range[0], 0) for _, t in spans],
                          [max(t.score_range[1] - t.score, 0) for _, t in spans]])
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_yticks(range(len(scored)), names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("measured / target limit (log scale; < 1 is MET, green); whiskers: best and worst repeat")
    ax.set_title("rayhooks: each target as measured / limit, in one run")
    fig.subplots_adjust(left=0.42, right=0.98)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(main())
