"""``python -m benchmarks.readme_table [RESULTS.md ...]``: quotes the targets of committed results in the README.

Rewrites the README's performance table (after ``<!-- PERF-TABLE -->``, up to
the first blank line after the table) from the ``## Targets`` list of each
results file, so the README quotes the committed figures word for word. The
hand-written notes below the table (the misses and their causes) are left for
a person to bring up to date.
"""

import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
README = os.path.join(os.path.dirname(HERE), "README.md")
MARK = "<!-- PERF-TABLE -->"
_TARGET = re.compile(r"^- (MET|MISSED) — (.*)$")


def parse(path):
    """(command line, date line, machine line, [(target, measured, met)]) of one results.md."""
    text = open(path).read()
    command = re.search(r"^Command: (.*)$", text, re.M).group(1)
    date = re.search(r"^- Date: .*$", text, re.M).group(0)
    machine = re.search(r"^- Machine: .*$", text, re.M).group(0)
    targets_block = text.split("## Targets", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in targets_block.splitlines():
        m = _TARGET.match(line.strip())
        if m:
            name, _, measured = m.group(2).partition(": ")
            rows.append((name, measured, m.group(1) == "MET"))
    return command, date, machine, rows


def table(paths):
    lines = []
    for path in paths:
        command, date, machine, rows = parse(path)
        rel = os.path.relpath(path, os.path.dirname(README))
        plot = os.path.splitext(rel)[0] + ".png"
        lines += ["Quoted from [%s](%s) (%s; plot: [%s](%s)), taken on this project's 2-core VM:"
                  % (rel, rel, command.rstrip("."), plot, plot), date, machine, "",
                  "| target | measured (median [min–max]) | |", "|---|---|---|"]
        lines += ["| %s | %s | %s |" % (name, measured, "met" if met else "**MISSED**") for name, measured, met in rows]
        lines.append("")
    return lines


def main(argv=None):
    paths = [os.path.abspath(p) for p in (argv or [os.path.join(HERE, "results.md")])]
    readme = open(README).read().split("\n")
    start = readme.index(MARK) + 1
    end = start
    while end < len(readme) and not readme[end].startswith("Missed targets") and "<!-- /PERF-TABLE -->" \
            not in readme[end] and not readme[end].startswith("Notes on the"):
        end += 1
    readme[start:end] = table(paths)
    with open(README, "w") as f:
        f.write("\n".join(readme))
    print("README table rewritten from %s" % ", ".join(os.path.relpath(p) for p in paths))


if __name__ == "__main__":
    main(sys.argv[1:])
